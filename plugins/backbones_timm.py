"""The ``timm/`` backbone family: any timm model, e.g. ``model.backbone=timm/convnext_atto``.

A bare timm name (``model.backbone=resnet18``) also lands here when no plugin registers
that exact name (``rwft.core.model.resolve_backbone``). A pretrained tag selects the
weights: ``timm/resnet18.a1_in1k``.

Pretrained weights come from the Hugging Face hub, or from a local file with
``model.weights=PATH``. Both go through the one ``timm.create_model`` call: the file is
passed as ``pretrained_cfg_overlay=dict(file=PATH)``, which timm reads in place of the hub
(``timm.models._builder._resolve_pretrained_source``), applying the model's own checkpoint
filter. The file must therefore be the checkpoint the hub serves for that model (a
``model.safetensors`` / ``pytorch_model.bin`` copied from ``timm/<arch>``, or the
``state_dict()`` of ``timm.create_model(arch)``), classifier included.

The model is built *with* its classifier and the classifier removed afterwards
(``reset_classifier(0)``): with ``num_classes=0`` at creation timm loads non-strictly
and a file whose names do not match would silently leave the model random.
"""

from __future__ import annotations

import difflib

import timm
from torch import nn

from rwft.core.errors import PluginError, WeightsError
from rwft.core.hookspecs import Register, hookimpl
from rwft.core.model import Backbone, weights_file


def build_backbone(arch: str, *, pretrained: bool, weights: str | None) -> Backbone:
    """The ``timm/`` factory (contract: ``hookspecs.register_backbones``)."""
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join('timm/' + name for name in close)}?" if close else ""
        raise PluginError(f"timm has no model {arch!r}.{hint} `timm.list_models()` lists them all.")
    overlay = dict(file=str(weights_file(weights))) if pretrained and weights else None
    try:
        model = timm.create_model(arch, pretrained=pretrained, pretrained_cfg_overlay=overlay)
    except (RuntimeError, OSError) as exc:
        if not pretrained:
            raise
        source = f"file {weights}" if weights else "the Hugging Face hub"
        raise WeightsError(
            f"could not load the pretrained weights of timm/{arch} from {source}: {exc}\n"
            "Offline? Copy the model's weights file from the hub and set model.weights=PATH, "
            "or set model.pretrained=false to train from scratch."
        ) from exc
    model.reset_classifier(0)  # forward() now returns pooled features
    return _describe(model)


def _describe(model: nn.Module) -> Backbone:
    """Describe a timm model built with its classifier removed (``num_classes=0``)."""
    cfg = model.pretrained_cfg
    first_conv = cfg.get("first_conv")
    if isinstance(first_conv, (tuple, list)):  # several input stems (CrossViT, FastViT)
        first_conv = first_conv[0] if len(first_conv) == 1 else None
    # Models with a pre-logits layer (MobileNetV3's conv_head) return its width instead.
    num_features = getattr(model, "head_hidden_size", None) or model.num_features
    # timm's feature_info names each stage's output module; the last one is the deepest feature map.
    feature_info = getattr(model, "feature_info", None) or [{}]
    return Backbone(module=model, num_features=num_features, mean=tuple(cfg["mean"]),
                    std=tuple(cfg["std"]), first_conv=first_conv, in_chans=cfg["input_size"][0],
                    saliency_layer=feature_info[-1].get("module"))


@hookimpl
def register_backbones(register: Register) -> None:
    register("timm/", build_backbone,
             "any timm model (timm/ARCH[.TAG]); pretrained from the Hugging Face hub or model.weights=PATH")
