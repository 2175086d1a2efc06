"""The training recipe: optimiser, learning-rate schedule, loss, weight EMA and LP-FT stages.

``build_optimisation`` turns ``cfg.train`` into the objects one training stage needs;
the engine's ``Trainer`` calls it once per stage and otherwise only steps them. Every
default reproduces rwft's plain loop (AdamW over all trainable weights, one-cycle
schedule, unweighted cross-entropy), so a recipe key changes one thing at a time:

- ``train.layer_decay``: layer-wise learning-rate decay, timm's
  ``param_groups_layer_decay`` over the backbone's own layer order (adapter first,
  head last) and ``create_optimizer_v2``.
- ``train.warmup_epochs`` with ``train.schedule`` ``cosine``/``constant``/``onecycle``.
- ``train.label_smoothing`` and ``train.class_balance`` (``weights``: scikit-learn's
  "balanced" class weights in the loss; ``sampler``: each epoch drawn with replacement
  so that both classes are equally likely).
- ``train.ema_decay``: timm's ``ModelEmaV3``; validation and checkpoints use its weights.
- ``train.lp_epochs`` / ``train.ft_lr_scale``: LP-FT (Kumar et al., ICLR 2022): a linear
  probe first, so the new head does not wreck the pretrained features with large early
  gradients, then full fine-tuning at a lower rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from timm.models import group_parameters
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn

from rwft.core.config import TrainConfig
from rwft.core.data import ImageSplit
from rwft.core.errors import ConfigError

PROBE, FULL = "probe", "full"
ONECYCLE_DEFAULT_WARMUP = 0.15  # fraction of the steps the one-cycle lr rises (rwft's original setting)


@dataclass
class Optimisation:
    """What one training stage steps: built by ``build_optimisation``."""

    parameters: list[nn.Parameter]  # the trainable parameters of this stage
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per optimiser step
    loss_fn: nn.Module


def first_stage(train: TrainConfig) -> str:
    """``probe`` when LP-FT is on (``train.lp_epochs > 0``), else ``full``."""
    return PROBE if train.lp_epochs > 0 else FULL


def set_stage(model: nn.Module, stage: str) -> None:
    """Freeze (``probe``) or unfreeze (``full``) the backbone of an rwft model.

    In ``probe`` the backbone's weights are frozen and its BatchNorm layers stay in eval
    mode (``RwftModel`` keeps a probe-mode backbone in eval), exactly as ``model.mode=probe``.
    """
    if not (hasattr(model, "backbone") and hasattr(model, "mode")):
        raise ConfigError("train.lp_epochs needs an rwft model (adapter, backbone, head); "
                          f"got a {type(model).__name__}. Set train.lp_epochs=0.")
    model.mode = stage
    model.backbone.requires_grad_(stage == FULL)
    model.train(model.training)


def build_optimisation(model: nn.Module, train: TrainConfig, *, stage: str, steps_per_epoch: int,
                       epochs: int, train_labels: np.ndarray | None = None) -> Optimisation:
    """Optimiser, schedule and loss for one stage of ``epochs`` epochs of ``steps_per_epoch`` steps.

    ``stage`` is ``probe`` (LP-FT's first stage: lr ``train.lr``) or ``full`` (lr
    ``train.lr``, or ``train.lr * train.ft_lr_scale`` after a probe stage). Call
    ``set_stage`` first: only parameters with ``requires_grad`` are optimised.
    ``train_labels`` feed ``train.class_balance=weights``.
    """
    check_train_config(train)
    lr = train.lr * (train.ft_lr_scale if stage == FULL and train.lp_epochs > 0 else 1.0)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if train.layer_decay < 1.0:
        groups = param_groups_layer_decay(_LayerOrder(model), weight_decay=train.weight_decay,
                                          layer_decay=train.layer_decay)
        for group in groups:
            group["lr"] = lr * group["lr_scale"]  # torch schedulers scale each group's own lr
        optimizer = create_optimizer_v2(groups, opt="adamw", lr=lr, weight_decay=train.weight_decay)
    else:
        # Exactly rwft's original optimiser: AdamW, one weight decay for every parameter.
        optimizer = create_optimizer_v2(parameters, opt="adamw", lr=lr, weight_decay=train.weight_decay,
                                        filter_bias_and_bn=False)
    scheduler = build_scheduler(optimizer, train, total_steps=max(1, steps_per_epoch * epochs),
                                warmup_steps=round(train.warmup_epochs * steps_per_epoch))
    return Optimisation(parameters, optimizer, scheduler, build_loss(train, train_labels))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, *, total_steps: int,
                    warmup_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step torch scheduler for ``train.schedule`` with ``warmup_steps`` of linear warm-up.

    ``onecycle``: torch's ``OneCycleLR`` peaking at each group's lr, rising over the
    warm-up (15% of the steps when none is set). ``cosine``: linear warm-up, then cosine
    decay to zero. ``constant``: linear warm-up, then flat.
    """
    peaks = [group["lr"] for group in optimizer.param_groups]
    if train.schedule == "onecycle":
        rise = warmup_steps / total_steps if warmup_steps else ONECYCLE_DEFAULT_WARMUP
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps,
                                                   pct_start=min(max(rise, 1e-3), 0.999))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupThen(train.schedule, warmup_steps=warmup_steps, total_steps=total_steps))


@dataclass
class WarmupThen:
    """lr factor at step ``s``: ``(s + 1) / warmup_steps`` while warming up, then flat or cosine to 0.

    A class rather than a lambda so that ``LambdaLR.state_dict`` saves it with a checkpoint.
    """

    kind: str  # cosine | constant
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_loss(train: TrainConfig, train_labels: np.ndarray | None) -> nn.Module:
    """Cross-entropy with ``train.label_smoothing`` and, for ``class_balance=weights``, class weights."""
    weight = None
    if train.class_balance == "weights":
        if train_labels is None or len(train_labels) == 0:
            raise ConfigError("train.class_balance=weights needs the training labels; none were given.")
        weight = torch.as_tensor(balanced_class_weights(train_labels), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=train.label_smoothing)


def balanced_class_weights(labels: np.ndarray) -> np.ndarray:
    """scikit-learn's "balanced" weights ``n / (k * count_c)``, one per class ``0..max(label)``.

    A class missing from ``labels`` (a site that has none of it) gets weight 1: it never
    appears as a target, so its weight cannot matter, and the vector keeps one entry per logit.
    """
    labels = np.asarray(labels).astype(int)
    present = np.unique(labels)
    weights = np.ones(int(labels.max()) + 1)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights


def epoch_split(split: ImageSplit, train: TrainConfig, generator: torch.Generator) -> ImageSplit:
    """The images one epoch trains on: ``split`` itself, or for ``class_balance=sampler`` a
    class-balanced draw with replacement of the same size (torch's ``WeightedRandomSampler``
    rule: each image's weight is 1 / its class count), drawn from ``generator``."""
    if train.class_balance != "sampler" or len(split) == 0:
        return split
    counts = np.bincount(split.labels)
    weights = torch.as_tensor(1.0 / counts[split.labels], dtype=torch.float64)
    index = torch.multinomial(weights, len(split), replacement=True, generator=generator)
    return split.subset(index.numpy())


def build_ema(model: nn.Module, train: TrainConfig) -> ModelEmaV3 | None:
    """timm's EMA of ``model`` (parameters and BatchNorm buffers) for ``train.ema_decay > 0``, else None.

    Updated after every optimiser step as ``ema = decay * ema + (1 - decay) * weights``;
    the first update copies the weights (timm's ``step`` rule), so early epochs are not
    dragged towards the random head.
    """
    if train.ema_decay <= 0:
        return None
    return ModelEmaV3(model, decay=train.ema_decay)


def check_train_config(train: TrainConfig) -> None:
    """Refuse recipe values that cannot work, naming the key."""
    if not 0.0 < train.layer_decay <= 1.0:
        raise ConfigError(f"train.layer_decay must be in (0, 1] (1 = off), got {train.layer_decay}.")
    if not 0.0 <= train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0 = off), got {train.ema_decay}.")
    if not 0.0 <= train.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {train.label_smoothing}.")
    if train.lp_epochs < 0 or train.warmup_epochs < 0:
        raise ConfigError("train.lp_epochs and train.warmup_epochs must be >= 0.")
    if train.ft_lr_scale <= 0:
        raise ConfigError(f"train.ft_lr_scale must be > 0, got {train.ft_lr_scale}.")


class _LayerOrder:
    """An rwft model as timm's layer decay sees one of its own models: adapter, the backbone's
    layers in its own ``group_matcher`` order, head last.

    ``param_groups_layer_decay`` needs only ``named_parameters`` and ``group_matcher``. A
    backbone without a ``group_matcher`` (torchvision) is ordered by its top-level children.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        backbone = getattr(model, "backbone", None)
        if backbone is None:
            raise ConfigError("train.layer_decay needs an rwft model (adapter, backbone, head); "
                              f"got a {type(model).__name__}. Set train.layer_decay=1.")
        if hasattr(backbone, "group_matcher"):
            self.backbone_layers = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
        else:
            children = {name: i for i, (name, _) in enumerate(backbone.named_children())}
            self.backbone_layers = {name: children.get(name.split(".")[0], len(children))
                                    for name, _ in backbone.named_parameters()}

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.model.named_parameters()

    def group_matcher(self, coarse: bool = False) -> object:
        def ordinal(name: str) -> tuple[float, ...]:
            if name.startswith("backbone."):
                return (float(self.backbone_layers[name.removeprefix("backbone.")]),)
            if name.startswith("head."):
                return (math.inf,)
            return (-1.0,)  # the channel adapter sits below the stem

        return ordinal
