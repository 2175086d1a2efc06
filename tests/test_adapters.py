"""Channel adapters on a real pretrained backbone: every adapter starts as ``replicate``."""

from __future__ import annotations

import pytest
import torch

from rwft.core.config import ModelConfig
from rwft.core.errors import PluginError
from rwft.core.model import RwftModel, build_model, trainable_parameters
from rwft.core.plugins import get_registries
from rwft.plugins import backbones_timm, backbones_torchvision


def _lite0(adapter: str, mode: str = "full") -> RwftModel:
    return build_model(ModelConfig(backbone="efficientnet_lite0", adapter=adapter, mode=mode), num_classes=3)


@pytest.fixture(scope="module")
def xray() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(2, 1, 64, 64)


@pytest.fixture(scope="module")
def replicate_logits(xray) -> tuple[RwftModel, torch.Tensor]:
    model = _lite0("replicate").eval()
    with torch.no_grad():
        return model, model(xray)


@pytest.mark.parametrize("adapter", ["conv1x1", "weightsum"])
def test_adapter_at_init_reproduces_replicate(adapter, xray, replicate_logits):
    reference, expected = replicate_logits
    model = _lite0(adapter).eval()
    model.head.load_state_dict(reference.head.state_dict())  # heads are freshly random
    with torch.no_grad():
        logits = model(xray)
    # EfficientNet-Lite normalises every channel with 0.5/0.5, so weightsum is exact too.
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_conv1x1_trains_even_when_the_backbone_is_frozen(xray):
    model = _lite0("conv1x1", mode="probe")
    adapter_params = list(model.adapter.parameters())
    assert [tuple(p.shape) for p in adapter_params] == [(3, 1, 1, 1), (3,)]
    trainable = {id(p) for p in trainable_parameters(model)}
    assert all(id(p) in trainable for p in adapter_params)
    model(xray).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params)


def test_weightsum_folds_the_rgb_kernels_into_one_channel():
    backbone = get_registries().backbones.get("efficientnet_lite0").factory(
        arch=None, pretrained=True, weights=None)
    rgb_kernels = backbone.module.conv_stem.weight.detach().clone()
    adapter = get_registries().adapters.get("weightsum").factory(backbone)
    assert isinstance(adapter, torch.nn.Identity) and backbone.in_chans == 1
    torch.testing.assert_close(backbone.module.conv_stem.weight, rgb_kernels.sum(dim=1, keepdim=True))
    assert backbone.module(torch.rand(2, 1, 32, 32)).shape == (2, backbone.num_features)


def test_weightsum_with_imagenet_statistics_normalises_with_their_average():
    model = build_model(ModelConfig(backbone="torchvision/resnet18", pretrained=False,
                                    adapter="weightsum"), num_classes=2)
    mean = torch.tensor(backbones_torchvision.IMAGENET_MEAN).mean()
    torch.testing.assert_close(model.input_mean, mean.view(1, 1, 1, 1))
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2)


def test_weightsum_refuses_a_backbone_with_several_input_convolutions():
    backbone = backbones_timm.build_backbone("fastvit_t8", pretrained=False, weights=None)
    with pytest.raises(PluginError, match="Use model.adapter=replicate or conv1x1"):
        get_registries().adapters.get("weightsum").factory(backbone)
