"""Augmentation: small, seeded, range-preserving, and never mirrors the chest."""

from __future__ import annotations

import torch

from rwft.core.augment import augment_batch


def chest_like_batch(n: int = 16, size: int = 32) -> torch.Tensor:
    """Soft gradient images whose left half is brighter (a stand-in for the heart's side)."""
    ramp = torch.linspace(0.9, 0.2, size)
    image = 0.1 + 0.7 * ramp.expand(size, size)
    return image.expand(n, 1, size, size).clone()


def test_keeps_shape_dtype_and_range_and_changes_the_images() -> None:
    x = chest_like_batch()
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.allclose(out, x, atol=1e-3)
    per_image_change = (out - x).abs().flatten(1).mean(dim=1)
    assert torch.all(per_image_change > 0)  # every image gets its own transform
    assert len(set(per_image_change.tolist())) == len(x)


def test_same_seed_same_result_other_seed_other_result() -> None:
    x = chest_like_batch()
    a = augment_batch(x, torch.Generator().manual_seed(7))
    b = augment_batch(x, torch.Generator().manual_seed(7))
    c = augment_batch(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_changes_are_small_and_never_a_horizontal_flip() -> None:
    x = chest_like_batch(n=256)
    out = augment_batch(x, torch.Generator().manual_seed(1))
    half = x.shape[-1] // 2
    left, right = out[..., :half].mean(dim=(1, 2, 3)), out[..., half:].mean(dim=(1, 2, 3))
    assert torch.all(left > right)  # laterality kept in every image
    centre = slice(8, 24)  # away from borders that the warp may bring in from outside
    assert (out[..., centre, centre] - x[..., centre, centre]).abs().mean() < 0.1
