"""Where the model looked: Grad-CAM maps with the ``grad-cam`` package, drawn beside the image.

The target layer comes from the backbone plugin (``Backbone.saliency_layer``, kept on
the model as ``RwftModel.saliency_layer``); when a plugin names none, the last module
of the backbone whose output is a spatial ``(N, C, H, W)`` map larger than 1 x 1 at
224 px is used (``default_saliency_layer``) (the deepest convolutional feature map, where Grad-CAM is usually
taken). The explained output is the logit of the positive class
(``ClassifierOutputTarget``: rwft's head has one logit per class).

A Grad-CAM map shows which regions raised the model's score. It is *model attention*,
not a finding: saliency methods localise pathology worse than radiologists (Saporta et
al., Nature Machine Intelligence 2022), so every overlay carries that caption.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from rwft.core.errors import RwftError

CAPTION = "model attention, not a finding"
_PROBE_SIZE = 224


def target_layer(model: nn.Module) -> nn.Module:
    """The module of ``model.backbone`` whose activations Grad-CAM explains (see the module docstring)."""
    backbone: nn.Module = model.backbone  # type: ignore[assignment]
    path = getattr(model, "saliency_layer", None) or default_saliency_layer(model)
    try:
        layer = backbone.get_submodule(path)
    except AttributeError:
        raise RwftError(f"the backbone's saliency layer {path!r} does not exist in {type(backbone).__name__}: "
                        "its plugin must name a module of the backbone (Backbone.saliency_layer).") from None
    if not _has_spatial_output(model, layer):
        raise RwftError(f"the backbone's saliency layer {path!r} does not output a spatial (N, C, H, W) map (a "
                        "vision transformer's tokens?): Grad-CAM needs a convolutional feature map; use a CNN "
                        "backbone or a plugin that names one (Backbone.saliency_layer).")
    return layer


def gradcam(model: nn.Module, images: torch.Tensor, class_index: int = 1, layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM maps ``(N, H, W)`` in ``[0, 1]`` at the input's size, for class ``class_index``.

    ``images`` as the model takes them, ``(N, 1, H, W)`` in ``[0, 1]``. ``layer``
    defaults to ``target_layer(model)`` (pass it when calling per batch). Gradients are
    needed, so this must not run under ``torch.no_grad()``; the model is used in eval
    mode and its weights are not changed.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if not torch.is_grad_enabled():
        raise RuntimeError("Grad-CAM needs gradients: call gradcam() outside torch.no_grad()")
    was_training = model.training
    model.eval()
    try:
        with GradCAM(model=model, target_layers=[layer or target_layer(model)]) as cam:
            maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(class_index)] * len(images))
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return np.nan_to_num(np.asarray(maps, dtype=np.float32))


def overlay(image: np.ndarray, cam: np.ndarray, caption: str = CAPTION) -> Image.Image:
    """The grayscale ``image`` (uint8 ``(h, w)``) with ``cam`` (``(H, W)`` in [0, 1]) as a heat map on top.

    The map is resized to the image (bilinear); the caption is written in a band under
    the picture so that it never covers anatomy.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    height, width = image.shape
    resized = np.asarray(Image.fromarray(np.clip(cam, 0, 1).astype(np.float32), mode="F")
                         .resize((width, height), Image.Resampling.BILINEAR))
    rgb = np.repeat(image[:, :, None].astype(np.float32) / 255.0, 3, axis=2)
    heat = Image.fromarray(show_cam_on_image(rgb, np.clip(resized, 0, 1), use_rgb=True, image_weight=0.6))
    band = 16
    canvas = Image.new("RGB", (width, height + band), "black")
    canvas.paste(heat, (0, 0))
    ImageDraw.Draw(canvas).text((3, height + 2), caption, fill="white")
    return canvas


def default_saliency_layer(model: nn.Module) -> str:
    """The last module of ``model.backbone`` (in the order forward passes finish) that is called
    once and outputs a spatial map larger than 1 x 1 at 224 px: e.g. ``layer4`` of a ResNet."""
    backbone: nn.Module = model.backbone  # type: ignore[assignment]
    outputs: list[tuple[str, tuple[int, ...]]] = []
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: outputs.append((name, _shape(out))))
             for name, module in backbone.named_modules() if name]
    try:
        _probe(model)
    finally:
        for hook in hooks:
            hook.remove()
    calls: dict[str, int] = {}
    for name, _ in outputs:
        calls[name] = calls.get(name, 0) + 1
    # A module called twice (a shared ReLU) would give Grad-CAM two activations for one layer.
    spatial = [name for name, shape in outputs if len(shape) == 4 and shape[2] * shape[3] > 1 and calls[name] == 1]
    if not spatial:
        raise RwftError(f"{type(backbone).__name__} has no module with a spatial (N, C, H, W) output: Grad-CAM "
                        "needs a convolutional feature map; use a CNN backbone.")
    return spatial[-1]


def _has_spatial_output(model: nn.Module, layer: nn.Module) -> bool:
    seen: list[tuple[int, ...]] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.append(_shape(out)))
    try:
        _probe(model)
    finally:
        hook.remove()
    return bool(seen) and len(seen[-1]) == 4


def _probe(model: nn.Module) -> None:
    was_training = model.training
    model.eval()
    parameter = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, _PROBE_SIZE, _PROBE_SIZE, device=parameter.device))
    finally:
        model.train(was_training)


def _shape(output: object) -> tuple[int, ...]:
    return tuple(output.shape) if isinstance(output, torch.Tensor) else ()
