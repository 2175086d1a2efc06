"""Light augmentation for chest X-ray batches, vectorised over the batch.

Each image gets its own small random affine warp (rotation, scale, translation)
and brightness/contrast jitter: the variation between two acquisitions of the same
chest (patient position, distance to the detector, exposure), nothing more. All
images of a batch are warped in one ``affine_grid``/``grid_sample`` call on the
batch's device, so on a GPU augmentation costs next to nothing.

There is deliberately no horizontal flip: chest anatomy is lateralised (the heart
sits on the patient's left, the liver on the right, the aortic knob left), so a
mirrored film is not a plausible X-ray, and laterality itself can carry diagnostic
signal (dextrocardia, side of a consolidation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_ROTATION_DEGREES = 7.0
SCALE_RANGE = (0.9, 1.1)
MAX_TRANSLATION = 0.06  # fraction of the image side
MAX_BRIGHTNESS_CHANGE = 0.10  # intensity multiplied by a factor in [0.9, 1.1]
MAX_CONTRAST_CHANGE = 0.10  # distance from the image mean scaled by a factor in [0.9, 1.1]


def augment_batch(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A randomly warped and jittered copy of ``x``, float ``(N, C, H, W)`` in [0, 1].

    Returns a tensor of the same shape, dtype and device, clipped to [0, 1]. The
    random parameters are drawn from ``generator`` on the generator's own device
    (``None``: torch's global CPU generator) and then moved to ``x``'s device, so the
    same generator state gives the same result on CPU and GPU inputs. Regions that a
    warp brings in from outside the frame are black, as on a collimated film.
    """
    n = x.shape[0]
    draw_device = generator.device if generator is not None else torch.device("cpu")

    def uniform(half_width: float, centre: float = 0.0) -> torch.Tensor:
        u = torch.rand(n, generator=generator, device=draw_device)
        # non_blocking: a blocking host-to-GPU copy would wait for the queued training step.
        return (centre + (2 * u - 1) * half_width).to(device=x.device, dtype=x.dtype, non_blocking=True)

    angle = uniform(math.radians(MAX_ROTATION_DEGREES))
    scale = uniform((SCALE_RANGE[1] - SCALE_RANGE[0]) / 2, centre=sum(SCALE_RANGE) / 2)
    # affine_grid's coordinates span [-1, 1]: one image side is 2 units.
    shift_x, shift_y = uniform(2 * MAX_TRANSLATION), uniform(2 * MAX_TRANSLATION)
    brightness = uniform(MAX_BRIGHTNESS_CHANGE, centre=1.0)
    contrast = uniform(MAX_CONTRAST_CHANGE, centre=1.0)

    # theta maps output coordinates to input coordinates: the inverse of the
    # rotation-and-zoom we want to see, hence the division by scale.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], dim=1),
                         torch.stack([sin, cos, shift_y], dim=1)], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    mean = warped.mean(dim=(1, 2, 3), keepdim=True)
    jittered = ((warped - mean) * contrast.view(-1, 1, 1, 1) + mean) * brightness.view(-1, 1, 1, 1)
    return jittered.clamp_(0.0, 1.0)
