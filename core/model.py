"""Model assembly: channel adapter -> input normalisation -> backbone -> dropout -> linear head.

``build_model(config.model, num_classes)`` is the one way every entry point (centralised
training, Ray trials, the Flower server and clients) gets a model, so that all of them
train exactly the same network. Backbones and adapters come from the plugin registries
(``rwft.core.hookspecs``); this module owns the parts every backbone shares.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from rwft.core.config import ModelConfig
from rwft.core.errors import ConfigError, PluginError, RwftError, WeightsError
from rwft.core.plugins import Registration, Registries, call_factory, describe_registration, get_registries

MODES = ("full", "probe")
# Image size at which a backbone's total stride is measured (its last feature map must stay > 1 px).
STRIDE_PROBE_SIZE = 64


@dataclass
class Backbone:
    """What a backbone factory returns (see ``hookspecs.register_backbones``)."""

    module: nn.Module  # (N, in_chans, H, W) normalised -> (N, num_features)
    num_features: int
    mean: tuple[float, ...]  # per-channel input normalisation the weights expect
    std: tuple[float, ...]
    # Attribute path of the first convolution, e.g. "conv_stem"; None when its RGB kernels
    # cannot be folded into one channel (the input reaches several convolutions, or is
    # mixed across channels before the first one); the weightsum adapter then refuses.
    first_conv: str | None
    in_chans: int = 3
    # Attribute path (inside ``module``) of the layer whose activations Grad-CAM explains
    # (rwft predict --saliency): the last feature map with spatial extent. None: rwft.core.saliency
    # picks the last module with a 2-D spatial output.
    saliency_layer: str | None = None


def weights_file(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it is an existing file, else a ``WeightsError`` saying what to do."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsError(
            f"weights file {file} does not exist. Set model.weights to the path of a "
            "pretrained weights file, or model.pretrained=false to train from scratch."
        )
    return file


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``torch.save``d state dict (tensors only, never pickled code) onto the CPU."""
    file = weights_file(path)
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or non-torch files
        raise WeightsError(f"weights file {file} is not a readable torch state dict: {exc}") from exc
    if not isinstance(state_dict, dict):
        raise WeightsError(f"weights file {file} holds a {type(state_dict).__name__}, "
                           "not a state dict (a mapping of names to tensors).")
    return state_dict


def resolve_backbone(name: str, registries: Registries) -> tuple[Registration, str | None]:
    """The registration that builds backbone ``name`` and the ``arch`` to pass its factory.

    Tried in order: an exactly registered name (``arch`` is ``None``); ``family/arch``
    for a registered family (a name ending in ``/``); any timm model name, as
    ``timm/name``. Anything else raises ``PluginError`` listing close matches.
    """
    backbones = registries.backbones
    if name in backbones and not name.endswith("/"):
        return backbones.get(name), None
    family, slash, arch = name.partition("/")
    if slash and family + "/" in backbones:
        if not arch:
            raise PluginError(f"backbone {name!r} names a family but no architecture: "
                              f"write {name}ARCH, for example timm/resnet18.")
        return backbones.get(family + "/"), arch
    if "timm/" in backbones and timm.is_model(name):
        return backbones.get("timm/"), name
    raise PluginError(backbones.unknown_message(name) + _close_timm_models(name))


def _close_timm_models(name: str) -> str:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.75)
    return f" Close timm models: {', '.join(close)}." if close else ""


class RwftModel(nn.Module):
    """Grayscale X-ray in ``[0, 1]``, shape ``(N, 1, H, W)`` -> logits ``(N, num_classes)``.

    ``adapter`` (1 channel -> ``backbone.in_chans``) -> per-channel normalisation with the
    statistics the backbone's weights expect -> ``backbone`` -> dropout -> ``head``.

    In ``probe`` mode the backbone's parameters are frozen and the backbone stays in eval
    mode even after ``model.train()``, so BatchNorm statistics stay the pretrained ones;
    the adapter and the head train. In ``full`` mode everything trains.
    """

    def __init__(self, backbone: Backbone, adapter: nn.Module, num_classes: int, *,
                 dropout: float = 0.0, mode: str = "full") -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"model.mode={mode!r} is not one of {', '.join(MODES)}.")
        self.mode = mode
        self.adapter = adapter
        mean, std = _normalisation(backbone)
        # Buffers follow the model to its device; not persistent because they follow from
        # the backbone choice and need not travel in every checkpoint and Flower message.
        self.register_buffer("input_mean", mean, persistent=False)
        self.register_buffer("input_std", std, persistent=False)
        self.backbone = backbone.module
        self.saliency_layer = backbone.saliency_layer  # see Backbone.saliency_layer
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, num_classes)
        if mode == "probe":
            self.backbone.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> RwftModel:
        super().train(mode)
        if self.mode == "probe":
            self.backbone.eval()  # a linear probe reads fixed pretrained features
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (self.adapter(images) - self.input_mean) / self.input_std
        return self.head(self.dropout(self.backbone(x)))


def _normalisation(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(backbone.mean, dtype=torch.float32)
    std = torch.tensor(backbone.std, dtype=torch.float32)
    if backbone.in_chans == 1 and len(mean) > 1:
        # The RGB kernels were folded into one channel (weightsum): one channel, one
        # statistic. Exact when the channels share their normalisation, close otherwise.
        mean, std = mean.mean(dim=0, keepdim=True), std.mean(dim=0, keepdim=True)
    if len(mean) != backbone.in_chans or len(std) != backbone.in_chans:
        raise PluginError(f"the backbone takes {backbone.in_chans} input channels but states "
                          f"{len(mean)} means and {len(std)} stds; its plugin must give one per channel.")
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def check_model_names(model_cfg: ModelConfig, registries: Registries | None = None) -> None:
    """Refuse an unknown backbone or adapter name now, before any data is read."""
    registries = registries or get_registries()
    registration, arch = resolve_backbone(model_cfg.backbone, registries)
    if registration.name == "timm/" and arch and not timm.is_model(arch):
        raise PluginError(f"timm has no model {arch!r} (model.backbone={model_cfg.backbone})."
                          + _close_timm_models(arch))
    registries.adapters.get(model_cfg.adapter)


def build_model(model_cfg: ModelConfig, num_classes: int,
                registries: Registries | None = None, *, image_size: int | None = None) -> RwftModel:
    """The model ``model_cfg`` describes, with a fresh ``num_classes``-way head.

    ``registries`` defaults to the built-in and installed plugins. Each plugin factory's
    result is checked against its contract (``rwft.core.plugins.call_factory``); with
    ``image_size`` the assembled model also runs one dry forward pass of a blank
    ``image_size`` image, which checks the backbone's stated feature count and that
    ``image_size`` is at least the backbone's total stride (smaller images shrink to
    nothing inside it). Raises ``PluginError`` for unknown names or a plugin breaking
    its contract (naming the plugin and its distribution), ``WeightsError`` when the
    pretrained weights cannot be loaded, ``ConfigError`` for contradictory settings.
    """
    registries = registries or get_registries()
    if model_cfg.weights and not model_cfg.pretrained:
        raise ConfigError(f"model.weights={model_cfg.weights} is set but model.pretrained=false "
                          "(scratch training reads no weights): unset one of the two.")
    registration, arch = resolve_backbone(model_cfg.backbone, registries)
    backbone = call_factory(registration, "a Backbone", lambda value: isinstance(value, Backbone),
                            arch=arch, pretrained=model_cfg.pretrained, weights=model_cfg.weights)
    _check_backbone(backbone, registration)
    adapter_registration = registries.adapters.get(model_cfg.adapter)
    adapter = call_factory(adapter_registration, "a torch.nn.Module", lambda value: isinstance(value, nn.Module),
                           backbone)
    model = RwftModel(backbone, adapter, num_classes, dropout=model_cfg.dropout, mode=model_cfg.mode)
    if model_cfg.batchnorm == "frozen":
        # DP-SGD needs it (rwft.core.privacy): every BatchNorm (timm's BatchNormAct2d too) becomes a
        # FrozenBatchNorm2d that keeps the pretrained statistics and affine weights as fixed buffers.
        model = timm.layers.freeze_batch_norm_2d(model)
    if image_size is not None:
        _dry_run(model, backbone, registration, adapter_registration, image_size, model_cfg.backbone)
    return model


def _check_backbone(backbone: Backbone, registration: Registration) -> None:
    problems = []
    if not isinstance(backbone.module, nn.Module):
        problems.append(f"module is a {type(backbone.module).__name__}, not a torch.nn.Module")
    if not isinstance(backbone.num_features, int) or backbone.num_features < 1:
        problems.append(f"num_features is {backbone.num_features!r}, not a positive int")
    if problems:
        raise PluginError(f"{describe_registration(registration)} returned a Backbone that breaks its contract: "
                          f"{'; '.join(problems)}. Fix or update the plugin.")


def _dry_run(model: RwftModel, backbone: Backbone, registration: Registration,
             adapter_registration: Registration, image_size: int, backbone_name: str) -> None:
    """Blank images through the model: the plugins' contracts and the smallest usable image size, checked now."""
    features, smallest = _forward_blank(model, adapter_registration, registration, backbone, image_size)
    if not isinstance(features, torch.Tensor) or tuple(features.shape) != (1, backbone.num_features):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise PluginError(f"{describe_registration(registration)} states num_features={backbone.num_features} "
                          f"but its module returns {shape} for one image, not (1, {backbone.num_features}). "
                          "Fix the plugin's Backbone(num_features=...) or its module's output.")
    if smallest > 1 or image_size >= STRIDE_PROBE_SIZE:
        return
    # The last feature map is one pixel: measure the backbone's total stride on a larger image.
    _, smallest_at_probe = _forward_blank(model, adapter_registration, registration, backbone, STRIDE_PROBE_SIZE)
    minimum = max(1, STRIDE_PROBE_SIZE // max(smallest_at_probe, 1) // 2)
    if image_size < minimum:
        raise ConfigError(f"data.image_size={image_size} is too small for model.backbone={backbone_name}: "
                          f"it shrinks images {2 * minimum}-fold, so below {minimum} px its last stages see a "
                          f"single pixel. Use data.image_size={minimum} or more (32+ is better).")


def _forward_blank(model: RwftModel, adapter_registration: Registration, registration: Registration,
                   backbone: Backbone, size: int) -> tuple[object, int]:
    """The backbone's output for one blank ``size`` image and the smallest side of its downsampled feature maps."""
    sides: list[int] = []

    def record(_module: nn.Module, _inputs: object, out: object) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            sides.append(min(out.shape[2:]))

    # Strided convolutions only: squeeze-and-excitation blocks pool to 1x1 at any image size.
    hooks = [module.register_forward_hook(record) for module in model.backbone.modules()
             if isinstance(module, nn.Conv2d) and max(module.stride) > 1]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            adapted = _call_plugin(adapter_registration, model.adapter, torch.zeros(1, 1, size, size))
            if not isinstance(adapted, torch.Tensor) or tuple(adapted.shape) != (1, backbone.in_chans, size, size):
                shape = tuple(adapted.shape) if isinstance(adapted, torch.Tensor) else type(adapted).__name__
                raise PluginError(f"{describe_registration(adapter_registration)} maps (1, 1, {size}, {size}) "
                                  f"images to {shape}, not (1, {backbone.in_chans}, {size}, {size}) as the "
                                  "adapter contract says. Fix the plugin.")
            features = _call_plugin(registration, model.backbone, (adapted - model.input_mean) / model.input_std)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return features, min(sides, default=size)


def _call_plugin(registration: Registration, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    try:
        return module(x)
    except RwftError:
        raise
    except Exception as exc:
        raise PluginError(f"{describe_registration(registration)} fails on a blank image in its first forward "
                          f"pass ({type(exc).__name__}: {exc}). Fix the plugin, or choose another.") from None


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should update (those with ``requires_grad``)."""
    return [p for p in model.parameters() if p.requires_grad]
