"""``build_model``: name resolution, the input pipeline, and the full/probe training modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rwft.core.config import ModelConfig
from rwft.core.errors import ConfigError, PluginError
from rwft.core.model import build_model, resolve_backbone, trainable_parameters
from rwft.core.plugins import get_registries


def _batch_norm_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def _xrays(n: int = 4, size: int = 32) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(n, 1, size, size)


def test_default_model_maps_grayscale_xrays_to_logits():
    model = build_model(ModelConfig(), num_classes=2)
    assert model(_xrays()).shape == (4, 2)
    assert model.head.out_features == 2 and model.head.in_features == 1280


def test_backbone_receives_the_xray_normalised_as_its_weights_expect():
    model = build_model(ModelConfig(), num_classes=2)  # EfficientNet-Lite0: mean = std = 0.5
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = _xrays()
    model(x)
    torch.testing.assert_close(seen[0], (x.expand(-1, 3, -1, -1) - 0.5) / 0.5)


def test_probe_freezes_the_backbone_and_its_batch_norm_statistics():
    model = build_model(ModelConfig(mode="probe", adapter="conv1x1"), num_classes=2)
    before = _batch_norm_statistics(model)
    model.train()
    assert model.training and not model.backbone.training
    model(_xrays()).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    after = _batch_norm_statistics(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    expected = {id(p) for p in [*model.adapter.parameters(), *model.head.parameters()]}
    assert {id(p) for p in trainable_parameters(model)} == expected


def test_full_mode_trains_everything():
    model = build_model(ModelConfig(mode="full"), num_classes=2)
    before = _batch_norm_statistics(model)
    model.train()
    assert model.backbone.training
    model(_xrays()).sum().backward()
    assert len(trainable_parameters(model)) == len(list(model.parameters()))
    assert all(p.grad is not None for p in model.parameters())
    after = _batch_norm_statistics(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_scratch_has_the_same_architecture_with_other_weights():
    pretrained = build_model(ModelConfig(), num_classes=2)
    scratch = build_model(ModelConfig(pretrained=False), num_classes=2)
    assert pretrained.state_dict().keys() == scratch.state_dict().keys()
    stem = "backbone.conv_stem.weight"
    assert not torch.equal(pretrained.state_dict()[stem], scratch.state_dict()[stem])


def test_weights_file_with_scratch_is_a_contradiction():
    with pytest.raises(ConfigError, match="model.pretrained=false"):
        build_model(ModelConfig(pretrained=False, weights="lite0.pth"), num_classes=2)


def test_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="full, probe"):
        build_model(ModelConfig(mode="frozen", pretrained=False), num_classes=2)


@pytest.mark.parametrize(("name", "registered", "arch"), [
    ("efficientnet_lite0", "efficientnet_lite0", None),  # the plugin wins over timm's own name
    ("timm/resnet10t", "timm/", "resnet10t"),
    ("resnet10t.c3_in1k", "timm/", "resnet10t.c3_in1k"),  # a bare timm name, with its weight tag
    ("torchvision/resnet18", "torchvision/", "resnet18"),
])
def test_backbone_names_resolve(name, registered, arch):
    registration, resolved_arch = resolve_backbone(name, get_registries())
    assert (registration.name, resolved_arch) == (registered, arch)


def test_family_without_architecture_is_refused():
    with pytest.raises(PluginError, match="no architecture"):
        resolve_backbone("timm/", get_registries())


def test_unknown_backbone_lists_close_matches():
    with pytest.raises(PluginError, match=r"Did you mean: efficientnet_lite\d"):
        build_model(ModelConfig(backbone="efficientnet_lite"), num_classes=2)
    with pytest.raises(PluginError, match="Close timm models: .*resnet18"):
        build_model(ModelConfig(backbone="resnet-18"), num_classes=2)


def test_unknown_adapter_lists_close_matches():
    with pytest.raises(PluginError, match="Did you mean: conv1x1"):
        build_model(ModelConfig(adapter="conv1x2", pretrained=False), num_classes=2)
