"""The ``torchvision/`` backbone family: torchvision classification models, e.g.
``model.backbone=torchvision/densenet121``.

Every model is built without weights (``get_model(arch, weights=None)``) and then, when
pretrained, gets a state-dict *file* loaded into it: ``model.weights=PATH``, or by default
the file of torchvision's ``DEFAULT`` weights, downloaded once into the torch hub cache
(where torchvision itself keeps it). One loader, whichever way the file arrived.

The classifier's last ``nn.Linear`` (in ``fc``, ``classifier``, ``heads`` or ``head``)
becomes an identity, so the model returns the features that fed it (VGG and AlexNet keep
their pretrained 4096-wide hidden layers, ConvNeXt its final LayerNorm).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from rwft.core.errors import PluginError, WeightsError
from rwft.core.hookspecs import Register, hookimpl
from rwft.core.model import Backbone, load_state_dict_file

# The statistics every torchvision ImageNet classification weight was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIER_ATTRIBUTES = ("fc", "classifier", "heads", "head")
# torchvision's DenseNet checkpoints predate a rename ('norm.1' -> 'norm1'); its own
# loader (torchvision.models.densenet._load_state_dict) renames them the same way.
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def build_backbone(arch: str, *, pretrained: bool, weights: str | None) -> Backbone:
    """The ``torchvision/`` factory (contract: ``hookspecs.register_backbones``)."""
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join('torchvision/' + name for name in close)}?" if close else ""
        raise PluginError(f"torchvision has no classification model {arch!r}.{hint} "
                          f"Known: {', '.join(known)}.")
    model = torchvision.models.get_model(arch, weights=None)
    if pretrained:
        path = Path(weights) if weights else _download_default_weights(arch)
        state_dict = _rename_legacy_densenet_keys(load_state_dict_file(path))
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise WeightsError(f"weights file {path} does not fit torchvision/{arch}: {exc}") from exc
    _match_pretrained_input_transform(model, pretrained)
    _drop_auxiliary_classifiers(model)
    # transform_input mixes the three channels before the first convolution: no folding.
    first_conv = None if getattr(model, "transform_input", False) else _first_conv(model)
    return Backbone(module=model, num_features=_strip_classifier(model, arch),
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv=first_conv)


def _download_default_weights(arch: str) -> Path:
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path))
        except Exception as exc:  # urllib raises many types; all mean "no file"
            raise WeightsError(
                f"could not download the weights of torchvision/{arch} from {url}: {exc}\n"
                f"Offline? Copy that file to {path}, or set model.weights=PATH, "
                "or model.pretrained=false to train from scratch."
            ) from exc
    return path


def _rename_legacy_densenet_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # In place, so that the state dict keeps its version metadata (BatchNorm reads it).
    for key in list(state_dict):
        legacy = _LEGACY_DENSENET_KEY.match(key)
        if legacy:
            state_dict[legacy.group(1) + legacy.group(2)] = state_dict.pop(key)
    return state_dict


def _match_pretrained_input_transform(model: nn.Module, pretrained: bool) -> None:
    # GoogLeNet and Inception-v3 weights were trained on inputs in [-1, 1]; with
    # transform_input the model maps ImageNet-normalised inputs there, as torchvision
    # enables it when it loads those weights.
    if hasattr(model, "transform_input"):
        model.transform_input = pretrained


def _drop_auxiliary_classifiers(model: nn.Module) -> None:
    # GoogLeNet/Inception return (logits, aux logits) in training mode; a backbone
    # returns one tensor, and the auxiliary heads classify ImageNet, not X-rays.
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, name):
                setattr(model, name, None)


def _strip_classifier(model: nn.Module, arch: str) -> int:
    for attribute in CLASSIFIER_ATTRIBUTES:
        classifier = getattr(model, attribute, None)
        if isinstance(classifier, nn.Linear):
            setattr(model, attribute, nn.Identity())
            return classifier.in_features
        if isinstance(classifier, nn.Sequential):
            linear_positions = [i for i, layer in enumerate(classifier) if isinstance(layer, nn.Linear)]
            if linear_positions:
                last = linear_positions[-1]
                num_features = classifier[last].in_features
                classifier[last] = nn.Identity()
                return num_features
    raise PluginError(f"torchvision/{arch} has no linear classifier rwft knows how to remove "
                      f"(looked in {', '.join(CLASSIFIER_ATTRIBUTES)}); use a timm model instead.")


def _first_conv(model: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if isinstance(module, nn.Conv2d))


@hookimpl
def register_backbones(register: Register) -> None:
    register("torchvision/", build_backbone,
             "torchvision classification models (torchvision/ARCH); ImageNet DEFAULT weights "
             "from the torch hub cache or model.weights=PATH")
