"""Model assembly: channel adapter -> backbone -> classification head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Backbone:
    """What a backbone factory returns (see ``hookspecs.register_backbones``)."""

    module: nn.Module  # (N, in_chans, H, W) normalised -> (N, num_features)
    num_features: int
    mean: tuple[float, ...]  # per-channel input normalisation the weights expect
    std: tuple[float, ...]
    first_conv: str  # attribute path of the first convolution, e.g. "conv_stem"
    in_chans: int = 3
