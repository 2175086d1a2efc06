"""The plugin system: registries, duplicate and unknown names, misspelled hooks, and a
real third-party plugin (``examples/backbone_plugin``) found through entry-point metadata."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pluggy
import pytest
import torch

from rwft.core.config import ModelConfig
from rwft.core.errors import PluginError, WeightsError
from rwft.core.hookspecs import hookimpl
from rwft.core.model import RwftModel, build_model, trainable_parameters
from rwft.core.plugins import collect_registries, get_registries, make_plugin_manager

EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "backbone_plugin"


class DuplicateLite0:
    """A plugin that claims a name the built-in EfficientNet-Lite plugin already has."""

    @staticmethod
    @hookimpl
    def register_backbones(register):
        register("efficientnet_lite0", lambda **kwargs: None)


class MisspelledHook:
    @staticmethod
    @hookimpl
    def register_backbone(register):  # should be register_backbones
        register("never_seen", lambda **kwargs: None)


def test_built_in_features_are_registered_by_their_plugins():
    registries = get_registries()
    expected = {
        "efficientnet_lite0": "rwft.plugins.backbones_efficientnet_lite",
        "timm/": "rwft.plugins.backbones_timm",
        "torchvision/": "rwft.plugins.backbones_torchvision",
    }
    assert {name: registries.backbones.get(name).plugin for name in expected} == expected
    assert {"replicate", "conv1x1", "weightsum"} <= set(registries.adapters.names())
    assert all(r.description for kind in ("backbones", "adapters") for r in registries.of(kind))


BLOCK_FLOWER = """
import sys
class BlockFlower:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("flwr", "ray"):
            raise ImportError(f"{name} is hidden by this test")
sys.meta_path.insert(0, BlockFlower())
from rwft.core.plugins import get_registries
print(sorted(get_registries().strategies.names()))
"""


def test_centralised_training_needs_no_flower():
    """The strategy plugin imports Flower only when a federation builds a strategy, so
    ``rwft train`` and ``rwft plugins`` work where Flower is not installed (a GPU image)."""
    result = subprocess.run([sys.executable, "-c", BLOCK_FLOWER], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fedavg" in result.stdout and "krum" in result.stdout


def test_duplicate_name_names_both_plugins():
    pm = make_plugin_manager(extra_plugins=(DuplicateLite0,))
    with pytest.raises(PluginError, match="'efficientnet_lite0' is registered twice") as excinfo:
        collect_registries(pm)
    assert "rwft.plugins.backbones_efficientnet_lite" in str(excinfo.value)
    assert "DuplicateLite0" in str(excinfo.value)


def test_unknown_name_lists_close_matches():
    with pytest.raises(PluginError, match="Did you mean: weightsum") as excinfo:
        get_registries().adapters.get("weightsun")
    assert "Known adapters: conv1x1, replicate, weightsum" in str(excinfo.value)


def test_misspelled_hook_name_is_caught():
    with pytest.raises(pluggy.PluginValidationError, match="register_backbone"):
        make_plugin_manager(extra_plugins=(MisspelledHook,))


@pytest.fixture
def installed_example_plugin(tmp_path, monkeypatch):
    """Make ``examples/backbone_plugin`` look pip-installed: real ``*.dist-info`` metadata
    with its entry point on ``sys.path``, and its module importable."""
    dist_info = tmp_path / "rwft_tiny_backbone-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: rwft-tiny-backbone\nVersion: 0.1.0\n")
    (dist_info / "entry_points.txt").write_text("[rwft]\ntiny_cnn = rwft_tiny_backbone\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN))
    yield
    sys.modules.pop("rwft_tiny_backbone", None)  # the next test imports it afresh, or not at all


def test_example_plugin_registers_through_its_entry_point(installed_example_plugin, monkeypatch):
    monkeypatch.setenv("RWFT_LOAD_PLUGINS", "tiny_cnn")
    registries = collect_registries(make_plugin_manager())
    assert registries.backbones.get("tiny_cnn").plugin == "tiny_cnn"

    model = build_model(ModelConfig(backbone="tiny_cnn", pretrained=False, adapter="weightsum"),
                        num_classes=2, registries=registries)
    assert isinstance(model, RwftModel)
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    images, labels = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    before = model.head.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(model.head.weight, before)


def test_example_plugin_pretrained_without_weights_says_what_to_do(installed_example_plugin, monkeypatch):
    monkeypatch.setenv("RWFT_LOAD_PLUGINS", "tiny_cnn")
    registries = collect_registries(make_plugin_manager())
    with pytest.raises(WeightsError, match="model.weights=PATH or model.pretrained=false"):
        build_model(ModelConfig(backbone="tiny_cnn"), num_classes=2, registries=registries)


def test_installed_plugin_is_not_loaded_when_excluded(installed_example_plugin, monkeypatch):
    monkeypatch.setenv("RWFT_LOAD_PLUGINS", "")
    registries = collect_registries(make_plugin_manager())
    assert "tiny_cnn" not in registries.backbones
    assert "rwft_tiny_backbone" not in sys.modules


@pytest.mark.integration
def test_rwft_train_runs_with_the_example_plugin_backbone(installed_example_plugin, monkeypatch, tmp_path,
                                                          pneumoniamnist_npz):
    from rwft.core.config import load_config
    from rwft.core.plugins import reset_registries
    from rwft.core.run import train

    monkeypatch.setenv("RWFT_LOAD_PLUGINS", "tiny_cnn")
    reset_registries()  # the process-wide registries now include the installed plugin
    try:
        cfg = load_config(overrides=[
            "model.backbone=tiny_cnn", "model.pretrained=false", f"data.root={pneumoniamnist_npz}",
            "data.image_size=28", "data.max_train_images=800", "train.epochs=2", "train.lr=0.01",
            "train.bootstrap=0", "train.device=cpu", f"output_dir={tmp_path}"])
        result = train(cfg, progress=False)
    finally:
        reset_registries()
    assert result.metrics["test"]["auroc"]["value"] > 0.7  # chance is 0.5
