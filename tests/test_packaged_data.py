"""A fresh machine: no ../shared, no $RWFT_DATA_DIR, an empty home, no network needed.

``rwft train`` with no data arguments must train on the PneumoniaMNIST copy shipped
inside the package (``plugins/data/pneumoniamnist_28.npz``), from any working directory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rwft.plugins.datasets_medmnist import packaged_npz


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_rwft_train_with_no_data_arguments_uses_the_packaged_pneumoniamnist(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in ("RWFT_DATA_DIR", "RWFT_CACHE_DIR", "RWFT_SHARED_DATA")}
    env |= {"HOME": str(home), "RWFT_LOAD_PLUGINS": "", "XDG_CACHE_HOME": str(home / ".cache")}
    work = tmp_path / "somewhere"
    work.mkdir()
    completed = subprocess.run(
        [sys.executable, "-m", "rwft.core.cli", "train", "train.epochs=1", "data.image_size=28",
         "data.max_train_images=256", "train.bootstrap=20", "train.num_threads=1", "output_dir=run"],
        cwd=work, env=env, capture_output=True, text=True, timeout=540)
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert Path(metrics["source"]) == packaged_npz()
    assert metrics["test"]["num_examples"] == 624  # PneumoniaMNIST's official test split
    assert 0.5 < metrics["test"]["auroc"]["value"] <= 1.0
    # The decoded-image cache went to the (fresh) home, nothing was looked for beside the checkout.
    assert list((home / ".cache" / "rwft").glob("medmnist-28px-*"))
