"""The wheel holds one importable ``rwft`` package with its four parts and console scripts."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_wheel_builds_installs_and_imports(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=240)
    wheel = next(tmp_path.glob("rwft-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("rwft/core/hookspecs.py", "rwft/core/engine.py", "rwft/plugins/adapters.py",
                   "rwft/server/app.py", "rwft/clients/app.py", "rwft/experiments/sweep.py"):
        assert module in names, module
    # The sample data a fresh install trains on, with its attribution and licence (CC BY 4.0).
    for data_file in ("rwft/plugins/data/pneumoniamnist_28.npz", "rwft/plugins/data/README.txt",
                      "rwft/plugins/data/CC-BY-4.0.txt"):
        assert data_file in names, data_file
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("rwft = rwft.core.cli:main", "rwft-server = rwft.server.cli:main",
                   "rwft-client = rwft.clients.cli:main"):
        assert script in entry_points

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=120)
    # Import from the unpacked wheel, not the editable checkout: run outside the repo,
    # with the wheel's folder first on the path.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import rwft.core.plugins as p; "
         "print(p.__file__); print(len(p.get_registries().backbones.names())); "
         "from rwft.plugins.datasets_medmnist import packaged_npz; import numpy as np; "
         "print(packaged_npz()); print(len(np.load(packaged_npz())['train_images']))", str(target)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=True)
    module_file, backbone_count, npz_file, train_count = probe.stdout.split()
    assert module_file.startswith(str(target))
    assert int(backbone_count) >= 3
    assert npz_file.startswith(str(target)) and int(train_count) == 4708
