"""Augmentation for chest X-ray batches, vectorised over the batch.

Each image gets its own random affine warp (rotation, zoom, shift, or a random resized
crop) and intensity jitter (brightness, contrast, gamma): the variation between two
acquisitions of the same chest (patient position, distance to the detector, exposure,
detector response), nothing more. All images of a batch are warped in one
``affine_grid``/``grid_sample`` call on the batch's device, so on a GPU augmentation
costs next to nothing. ``data.augmentation`` (``AugmentConfig``) sets the ranges; its
defaults are rwft's original light warp.

There is no horizontal flip by default (``hflip=0``): chest anatomy is lateralised (the
heart sits on the patient's left, the liver on the right, the aortic knob left), so a
mirrored film is not a plausible X-ray, and laterality itself can carry diagnostic
signal (dextrocardia, side of a consolidation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rwft.core.config import AugmentConfig

DEFAULTS = AugmentConfig()


def augment_batch(x: torch.Tensor, generator: torch.Generator | None,
                  settings: AugmentConfig | None = None) -> torch.Tensor:
    """A randomly warped and jittered copy of ``x``, float ``(N, C, H, W)`` in [0, 1].

    ``settings`` (default: ``AugmentConfig()``) gives the ranges. Returns a tensor of
    the same shape, dtype and device, clipped to [0, 1]. The random parameters are drawn
    from ``generator`` on the generator's own device (``None``: torch's global CPU
    generator) and then moved to ``x``'s device, so the same generator state gives the
    same result on CPU and GPU inputs. Regions that a warp brings in from outside the
    frame are black, as on a collimated film. Gamma and flips draw random numbers only
    when they are on, so turning them on leaves the other draws unchanged.
    """
    s = settings if settings is not None else DEFAULTS
    n = x.shape[0]
    draw_device = generator.device if generator is not None else torch.device("cpu")

    def uniform(half_width: float | torch.Tensor, centre: float = 0.0) -> torch.Tensor:
        u = torch.rand(n, generator=generator, device=draw_device)
        # non_blocking: a blocking host-to-GPU copy would wait for the queued training step.
        return (centre + (2 * u - 1) * half_width).to(device=x.device, dtype=x.dtype, non_blocking=True)

    angle = uniform(math.radians(s.rotation))
    if s.crop_scale is not None:
        # Random resized crop (square): keep a random area fraction a of the frame, at a
        # random place inside it, and zoom it to full size: zoom 1/sqrt(a).
        low, high = s.crop_scale
        side = uniform((high - low) / 2, centre=(low + high) / 2).clamp_(min=1e-3).sqrt_()
        scale = 1.0 / side
        # How far the crop's centre may move, in grid units, so that it samples only inside the
        # outermost pixel centres (at +-(1 - 1/side_in_pixels) with align_corners=False).
        room = (1.0 - side).to(draw_device)
        shift_x = uniform(room * (1 - 1 / x.shape[-1]))
        shift_y = uniform(room * (1 - 1 / x.shape[-2]))
    else:
        scale = uniform((s.scale[1] - s.scale[0]) / 2, centre=sum(s.scale) / 2)
        # affine_grid's coordinates span [-1, 1]: one image side is 2 units.
        shift_x, shift_y = uniform(2 * s.translate), uniform(2 * s.translate)
    brightness = uniform(s.brightness, centre=1.0)
    contrast = uniform(s.contrast, centre=1.0)

    # theta maps output coordinates to input coordinates: the inverse of the
    # rotation-and-zoom we want to see, hence the division by scale.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    if s.hflip > 0:
        mirror = torch.where(uniform(0.5, centre=0.5) < s.hflip, -1.0, 1.0).to(x.dtype)
        theta = torch.stack([torch.stack([cos * mirror, -sin, shift_x], dim=1),
                             torch.stack([sin * mirror, cos, shift_y], dim=1)], dim=1)
    else:
        theta = torch.stack([torch.stack([cos, -sin, shift_x], dim=1),
                             torch.stack([sin, cos, shift_y], dim=1)], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if s.gamma > 0:
        # Log-uniform gamma: darkening and brightening the mid-tones equally likely.
        gamma = uniform(math.log1p(s.gamma)).exp()
        warped = warped.clamp_(0.0, 1.0).pow_(gamma.view(-1, 1, 1, 1))

    mean = warped.mean(dim=(1, 2, 3), keepdim=True)
    jittered = ((warped - mean) * contrast.view(-1, 1, 1, 1) + mean) * brightness.view(-1, 1, 1, 1)
    return jittered.clamp_(0.0, 1.0)
