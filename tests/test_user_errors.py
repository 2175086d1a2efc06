"""Every user mistake the tester of issue 11 made, fed to the real ``rwft`` command: one line
that names the problem and the fix, exit code 2, never a traceback. Plugins are checked at
their border and blamed by name; a broken plugin is left out unless RWFT_STRICT_PLUGINS=1;
a checkpoint is data and never runs code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rwft.core.config import load_config, to_container
from rwft.core.model import build_model

pytestmark = pytest.mark.integration

PLUGIN = '''
import torch
from rwft.core.hookspecs import hookimpl
from rwft.core.model import Backbone


def raising(backbone):
    raise ValueError("adapter exploded")


def wrong_type(backbone):
    return "not a module"


def miscounted(*, arch, pretrained, weights):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return Backbone(module=module, num_features=16, mean=(0.5,) * 3, std=(0.5,) * 3, first_conv="0")


@hookimpl
def register_adapters(register):
    register("exploding", raising)
    register("wrongtype", wrong_type)


@hookimpl
def register_backbones(register):
    register("miscounted", miscounted)
'''


def _install(root: Path, dist: str, entry: str, module: str, source: str) -> None:
    """A pip-installed-looking plugin: *.dist-info with an rwft entry point, and its module."""
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[rwft]\n{entry} = {module}\n")
    (root / f"{module}.py").write_text(source)


@pytest.fixture(scope="module")
def plugins_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site-packages")
    _install(root, "rwft-bad-things", "bad_things", "rwft_bad_things", PLUGIN)
    _install(root, "rwft-broken", "broken", "rwft_broken", "import a_module_that_does_not_exist\n")
    return root


def _rwft(*args: str, env: dict[str, str] | None = None, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, **(env or {}))
    if extra_path is not None:
        environment["PYTHONPATH"] = os.pathsep.join([str(extra_path), environment.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "rwft.core.cli", *args], capture_output=True, text=True,
                          timeout=400, env=environment)


def _one_line_error(done: subprocess.CompletedProcess, *expected: str) -> None:
    err = done.stderr
    assert done.returncode == 2, (done.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    flat = " ".join(err.split())
    for text in expected:
        assert text in flat, (text, err[-3000:])


@pytest.fixture(scope="module")
def npz_data(pneumoniamnist_npz) -> list[str]:
    return [f"data.root={pneumoniamnist_npz}", "data.image_size=32", "train.device=cpu", "train.epochs=1",
            "train.bootstrap=0", "data.max_train_images=200"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as rwft writes it (weights untrained: only its identity matters here)."""
    cfg = load_config(overrides=["model.pretrained=false", "data.image_size=32"])
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save({"model": build_model(cfg.model, 2).state_dict(), "config": to_container(cfg),
                "class_names": ["NORMAL", "PNEUMONIA"], "positive_class": "PNEUMONIA", "epoch": 1, "val": {},
                "threshold": 0.5}, path)
    return path


def test_config_values_out_of_range(tmp_path, npz_data):
    _one_line_error(_rwft("train", *npz_data, "train.lr=-1", f"output_dir={tmp_path}/a"), "train.lr must be above 0")
    _one_line_error(_rwft("config", "train.epochs=0"), "train.epochs must be at least 1")
    _one_line_error(_rwft("config", "model.dropout=1.5"), "model.dropout must be in [0, 1)")
    _one_line_error(_rwft("config", "federation.update_checks.norm_max_step_ratio=0"),
                    "norm_max_step_ratio must be at least 1")


def test_image_size_below_the_backbones_minimum(tmp_path, npz_data):
    done = _rwft("train", *npz_data, "data.image_size=7", "model.pretrained=false", f"output_dir={tmp_path}/a")
    _one_line_error(done, "data.image_size=7 is too small for model.backbone=efficientnet_lite0",
                    "Use data.image_size=16 or more")


def test_probe_on_random_weights_warns(tmp_path):
    done = _rwft("config", "model.mode=probe", "model.pretrained=false")
    assert done.returncode == 0 and "warning: model.mode=probe with model.pretrained=false" in done.stderr


def test_unwritable_output_dir(tmp_path, npz_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_error(_rwft("train", *npz_data, f"output_dir={blocker}/run"), f"output_dir {blocker}/run cannot be written")


def test_unknown_backbone_is_refused_before_any_data_is_read(tmp_path):
    done = _rwft("train", "model.backbone=efficientnet_lite9", f"data.root={tmp_path}/not-there.npz",
                 f"output_dir={tmp_path}/a")
    _one_line_error(done, "unknown backbone 'efficientnet_lite9'")  # not the missing data


def test_evaluate_with_another_backbone_or_image_size(checkpoint):
    _one_line_error(_rwft("evaluate", str(checkpoint), "model.backbone=resnet18"),
                    "model.backbone=resnet18 differs from the checkpoint's")
    _one_line_error(_rwft("evaluate", str(checkpoint), "data.image_size=64"),
                    "data.image_size=64 differs from the checkpoint's data.image_size=32")


def test_evaluate_data_whose_classes_are_not_the_models(checkpoint, tmp_path):
    from PIL import Image

    for name in ("ABNORMAL", "NORMAL"):
        (tmp_path / "site" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((40, 40), 20 * i, np.uint8)).save(tmp_path / "site" / name / f"{i}.png")
    _one_line_error(_rwft("evaluate", str(checkpoint), str(tmp_path / "site")),
                    "are not the model's (NORMAL, PNEUMONIA)", "data.class_map.ABNORMAL=PNEUMONIA")


def test_starting_into_a_run_directory(checkpoint, npz_data):
    run_dir = checkpoint.parent
    (run_dir / "config.yaml").write_text("seed: 0\n")
    _one_line_error(_rwft("train", *npz_data, f"output_dir={run_dir}"), "already holds a run", "--overwrite")
    assert (run_dir / "config.yaml").read_text() == "seed: 0\n"
    (run_dir / "config.yaml").unlink()


def _write_npz(path: Path, source: Path, *, train_classes: tuple[int, ...] = (0, 1), test_size: int | None = None):
    with np.load(source) as npz:
        arrays = {key: npz[key] for key in npz.files}
    keep = np.isin(arrays["train_labels"].ravel(), train_classes)
    arrays["train_images"], arrays["train_labels"] = arrays["train_images"][keep], arrays["train_labels"][keep]
    if test_size is not None:
        arrays["test_images"], arrays["test_labels"] = arrays["test_images"][:test_size], arrays["test_labels"][:test_size]
    np.savez(path, **arrays)
    return path


def test_one_class_or_empty_splits_are_refused_before_training(tmp_path, pneumoniamnist_npz):
    one_class = _write_npz(tmp_path / "pneumoniamnist.npz", pneumoniamnist_npz, train_classes=(1,))
    _one_line_error(_rwft("train", f"data.root={one_class}", "data.image_size=32", f"output_dir={tmp_path}/a"),
                    "the train split of", "has no images of class NORMAL")
    (tmp_path / "b").mkdir()
    empty_test = _write_npz(tmp_path / "b" / "pneumoniamnist.npz", pneumoniamnist_npz, test_size=0)
    _one_line_error(_rwft("train", f"data.root={empty_test}", "data.image_size=32", f"output_dir={tmp_path}/c"),
                    "the test split of", "has no images")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_a_plugin_factory_that_raises_or_breaks_its_contract_is_named(tmp_path, plugins_dir, npz_data):
    env = {"RWFT_LOAD_PLUGINS": "bad_things"}
    base = [*npz_data, "model.pretrained=false"]
    _one_line_error(_rwft("train", *base, "model.adapter=exploding", f"output_dir={tmp_path}/a", env=env,
                          extra_path=plugins_dir),
                    "adapter 'exploding' of plugin 'bad_things' (distribution rwft-bad-things) failed",
                    "ValueError: adapter exploded")
    _one_line_error(_rwft("train", *base, "model.adapter=wrongtype", f"output_dir={tmp_path}/b", env=env,
                          extra_path=plugins_dir),
                    "adapter 'wrongtype' of plugin 'bad_things' (distribution rwft-bad-things) returned a str, "
                    "not a torch.nn.Module")
    _one_line_error(_rwft("train", *base, "model.backbone=miscounted", f"output_dir={tmp_path}/c", env=env,
                          extra_path=plugins_dir),
                    "backbone 'miscounted' of plugin 'bad_things' (distribution rwft-bad-things) states "
                    "num_features=16 but its module returns (1, 8)")


def test_a_broken_plugin_is_left_out_unless_strict(plugins_dir):
    env = {"RWFT_LOAD_PLUGINS": "broken,bad_things"}
    done = _rwft("plugins", "--json", env=env, extra_path=plugins_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'broken'" in done.stderr and "distribution rwft-broken" in done.stderr and "left out" in done.stderr
    assert "miscounted" in done.stdout  # the other plugin still works
    _one_line_error(_rwft("plugins", env={**env, "RWFT_STRICT_PLUGINS": "1"}, extra_path=plugins_dir),
                    "the rwft plugin 'broken'", "RWFT_STRICT_PLUGINS is set")


def test_an_unknown_name_in_rwft_load_plugins(plugins_dir):
    _one_line_error(_rwft("plugins", env={"RWFT_LOAD_PLUGINS": "bad_thing"}, extra_path=plugins_dir),
                    "RWFT_LOAD_PLUGINS names bad_thing, which no installed package provides",
                    "installed rwft plugins:", "bad_things")


class _RunsACommand:
    """Pickles into a call of os.system: what a malicious .pt shared as a 'checkpoint' does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    payload = torch.load(checkpoint, weights_only=True) | {"extra": _RunsACommand(marker)}
    evil = tmp_path / "run" / "last.pt"
    evil.parent.mkdir()
    torch.save(payload, evil)
    _one_line_error(_rwft("evaluate", str(evil)), f"checkpoint {evil} holds Python objects beyond tensors",
                    "refuses to open it")
    (tmp_path / "run" / "config.yaml").write_text((checkpoint.parent / "config.yaml").read_text()
                                                  if (checkpoint.parent / "config.yaml").exists() else "seed: 0\n")
    _one_line_error(_rwft("train", "--resume", str(tmp_path / "run")), "holds Python objects beyond tensors")
    assert not marker.exists()  # the command in the pickle never ran
