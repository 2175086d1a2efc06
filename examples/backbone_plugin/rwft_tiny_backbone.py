"""rwft-tiny-backbone: the smallest complete rwft backbone plugin.

After ``pip install examples/backbone_plugin`` a user writes ``model.backbone=tiny_cnn``.
rwft finds this module through the ``rwft`` entry point in ``pyproject.toml``, calls
``register_backbones`` once at start-up, and calls ``build_tiny_cnn`` whenever a model
with this backbone is built. The contract every backbone factory follows is the
docstring of ``rwft.core.hookspecs.register_backbones``.
"""

from __future__ import annotations

from torch import nn

from rwft.core.errors import WeightsError
from rwft.core.hookspecs import Register, hookimpl
from rwft.core.model import Backbone, load_state_dict_file


class TinyCNN(nn.Module):
    """Three strided conv blocks and global average pooling: ``(N, 3, H, W) -> (N, 64)``."""

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        # rwft's weightsum adapter folds this layer's RGB kernels into one grayscale
        # channel; the factory names it in Backbone.first_conv.
        self.stem = nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1, bias=False)
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, self.num_features, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(self.num_features), nn.ReLU(),
        )
        # A backbone returns pooled features; rwft adds the dropout and classification head.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, images):
        return self.pool(self.blocks(self.stem(images)))


def build_tiny_cnn(*, arch: str | None, pretrained: bool, weights: str | None) -> Backbone:
    """The factory: rwft passes these three keyword arguments to every backbone factory.

    ``arch`` is only used by families (names ending in "/"); a plain name gets ``None``.
    """
    module = TinyCNN()
    if pretrained:
        # Real plugins load their published weights here (from the hub, a package, ...)
        # and must also accept model.weights=PATH through the same code. TinyCNN has no
        # published weights, so it needs a file - or model.pretrained=false.
        if weights is None:
            raise WeightsError("tiny_cnn has no published pretrained weights: set "
                               "model.weights=PATH or model.pretrained=false.")
        module.load_state_dict(load_state_dict_file(weights))
    return Backbone(
        module=module,
        num_features=TinyCNN.num_features,
        # rwft scales the [0, 1] X-ray with these before the backbone: state the
        # statistics your weights were trained with (here: [0, 1] -> [-1, 1]).
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        first_conv="stem",
    )


@hookimpl
def register_backbones(register: Register) -> None:
    # One call per backbone; the name is what users write in model.backbone.
    register("tiny_cnn", build_tiny_cnn, "example plugin: a three-layer CNN (rwft-tiny-backbone)")
