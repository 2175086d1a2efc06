"""Shared test fixtures.

Real data comes from ``../shared/data`` (or ``$RWFT_SHARED_DATA``). Locally a missing
folder skips the tests that need it; in CI (``CI=true``) it fails them, so that a
broken checkout can never pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tests must never pick up third-party plugins installed in the environment by accident.
os.environ.setdefault("RWFT_LOAD_PLUGINS", "")


def _shared_data_dir() -> Path:
    return Path(os.environ.get("RWFT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder holding ``pneumoniamnist.npz`` and ``chest_xray/``."""
    path = _shared_data_dir()
    if not (path / "pneumoniamnist.npz").is_file() or not (path / "chest_xray").is_dir():
        message = (f"real X-ray data not found at {path}: set RWFT_SHARED_DATA to the folder "
                   "holding pneumoniamnist.npz and chest_xray/")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def pneumoniamnist_npz(shared_data: Path) -> Path:
    return shared_data / "pneumoniamnist.npz"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded-image caches go to one per-session temp folder, never to ~/.cache."""
    monkeypatch.setenv("RWFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "rwft-cache"))
