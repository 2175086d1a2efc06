"""Channel adapters: a grayscale X-ray (one channel, values in [0, 1]) in front of a
backbone pretrained on RGB photographs (``model.adapter``).

All three start out computing the same function (the grayscale image seen as a gray RGB
image), so the pretrained features are intact at step 0; they differ in what can learn:

- ``replicate``: copy the channel; nothing to learn.
- ``conv1x1``: a learned 1x1 convolution (a per-channel gain and offset), starting as
  a copy; it trains in ``probe`` mode too.
- ``weightsum``: sum the first convolution's RGB kernels into one input channel, as timm
  does for ``in_chans=1``: the same output for a third of the first layer's multiply-adds.
  Equal to ``replicate`` when the three channels share one normalisation (EfficientNet-
  Lite's 0.5/0.5); with ImageNet statistics it uses their average, which is close.
"""

from __future__ import annotations

import torch
from timm.models import adapt_input_conv
from torch import nn

from rwft.core.errors import PluginError
from rwft.core.hookspecs import Register, hookimpl
from rwft.core.model import Backbone


class Replicate(nn.Module):
    """``(N, 1, H, W)`` -> ``(N, channels, H, W)`` by repeating the channel (a view, no copy)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.expand(-1, self.channels, -1, -1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def replicate(backbone: Backbone) -> nn.Module:
    return Replicate(backbone.in_chans)


def conv1x1(backbone: Backbone) -> nn.Module:
    conv = nn.Conv2d(1, backbone.in_chans, kernel_size=1)
    with torch.no_grad():  # start as replicate: every output channel = the input
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    return conv


def weightsum(backbone: Backbone) -> nn.Module:
    """Fold the RGB kernels of ``backbone.first_conv`` into one input channel, in place."""
    conv = backbone.module.get_submodule(backbone.first_conv) if backbone.first_conv else None
    if not isinstance(conv, nn.Conv2d) or conv.in_channels != 3 or conv.groups != 1:
        raise PluginError(
            f"the weightsum adapter needs a backbone whose input enters one ordinary 3-channel "
            f"nn.Conv2d; this backbone's first_conv is {backbone.first_conv!r} ({type(conv).__name__}). "
            "Use model.adapter=replicate or conv1x1."
        )
    with torch.no_grad():
        folded = adapt_input_conv(1, conv.weight)  # sum over the input-channel dimension
    # Replacing the weight keeps the conv's class (timm's Conv2dSame pads differently).
    conv.weight = nn.Parameter(folded, requires_grad=conv.weight.requires_grad)
    conv.in_channels = 1
    backbone.in_chans = 1
    return nn.Identity()


@hookimpl
def register_adapters(register: Register) -> None:
    register("replicate", replicate, "copy the grayscale channel to the backbone's 3 channels")
    register("conv1x1", conv1x1, "learned 1x1 convolution 1 -> 3 channels, initialised to replicate")
    register("weightsum", weightsum,
             "sum the first convolution's RGB kernels into one input channel (timm in_chans=1)")
