"""The one training and evaluation loop.

Centralised runs (``rwft train``), each hospital's local round in the Flower client,
and Ray trials all train through ``Trainer``/``fit`` and score through ``predict``/
``evaluate_split``: one loop, so a result in one setting means the same in the others.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rwft.core import recipe
from rwft.core.config import RwftConfig, TrainConfig
from rwft.core.data import DatasetSplits, ImageSplit, iterate_batches, num_batches
from rwft.core.errors import BrokenModelError, ConfigError
from rwft.core.metrics import binary_metrics
from rwft.core.tblog import RunLogger

if TYPE_CHECKING:
    from rwft.core.privacy import PrivateTraining


def select_device(train: TrainConfig) -> torch.device:
    """``train.device``: "auto" takes the GPU when there is one, else the CPU."""
    if train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={train.device} but no CUDA GPU is visible; use train.device=auto or cpu.")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global random states (torch CPU and CUDA, numpy, Python) as tensors, lists and numbers.

    Dropout draws from torch's global generator, so a resumed run must continue it
    where the interrupted run stood, not re-seed it. Only plain types and tensors, so
    that a checkpoint holding this loads with ``torch.load(weights_only=True)``.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def restore_rng_state(state: dict) -> None:
    """Undo ``rng_state``: every global generator continues where it was captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the GPU ("auto" or "bf16"); fp32 elsewhere.

    bf16 keeps fp32's exponent range, so no loss scaling is needed.
    """
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device``; channels_last on the GPU, where convolutions run faster in it."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


LOSS_FLUSH_STEPS = 20


@dataclass
class FitResult:
    num_examples: int  # training examples seen per epoch (the FedAvg weight)
    train_loss: float  # mean loss of the last epoch
    val: dict[str, float] = field(default_factory=dict)  # validation metrics of the kept weights
    steps: int = 0
    best_epoch: int = 0  # 1-based epoch whose weights were kept
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch val metrics
    privacy: dict | None = None  # with train.dp: PrivateTraining.summary() | state_dict() after training


class Trainer:
    """Optimiser, schedule and step counter around one model.

    ``proximal_mu > 0`` adds FedProx's term mu/2·||w - w0||² with w0 the weights when
    the trainer was created (the global model a federated client just received).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: RwftConfig,
        *,
        steps_per_epoch: int,
        epochs: int,
        device: torch.device | None = None,
        proximal_mu: float = 0.0,
        global_step: int = 0,
        train_labels: np.ndarray | None = None,
        loss_terms: Sequence[Callable[[], torch.Tensor]] = (),
        train_size: int = 0,
        privacy_rounds: int = 1,
    ) -> None:
        self.cfg = cfg
        self.device = device or select_device(cfg.train)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.model = prepare_model(model, self.device)
        # The recipe (rwft.core.recipe): optimiser, schedule and loss per stage, EMA, LP-FT.
        self.steps_per_epoch, self.epochs, self.train_labels = steps_per_epoch, epochs, train_labels
        self.privacy: PrivateTraining | None = None
        self.stage = recipe.first_stage(cfg.train)
        self._build_stage(epochs)
        self.ema = recipe.build_ema(self.model, cfg.train)
        # train.dp (rwft.core.privacy): DP-SGD. Wrapped after the EMA copied the model (Opacus'
        # hooks must not be copied with it); LP-FT's second stage is wrapped in _build_stage.
        if cfg.train.dp.enabled:
            if loss_terms or proximal_mu > 0:
                raise ConfigError(f"differential privacy cannot be combined with federation.strategy="
                                  f"{cfg.federation.strategy}: its sites add a loss term whose gradient is not a "
                                  "mean over examples, which DP-SGD would drop. Use fedavg or another strategy "
                                  "that only aggregates differently.")
            from rwft.core.privacy import PrivateTraining  # Opacus only for private runs

            self.privacy = PrivateTraining(cfg.train.dp, train_size=train_size, batch_size=cfg.train.batch_size,
                                           planned_steps=steps_per_epoch * epochs * privacy_rounds)
            self.optimizer = self.privacy.wrap(self.model, self.optimizer)
        self.proximal_mu = proximal_mu
        self.anchor = [p.detach().clone() for p in self.parameters] if proximal_mu > 0 else []
        self.global_step = global_step
        self.loss_terms = list(loss_terms)  # added to every step's loss (rwft.core.site_algorithm)

    def _build_stage(self, epochs: int) -> None:
        if self.stage == recipe.PROBE or self.cfg.train.lp_epochs > 0:
            recipe.set_stage(self.model, self.stage)
        stage = recipe.build_optimisation(self.model, self.cfg.train, stage=self.stage, epochs=epochs,
                                          steps_per_epoch=self.steps_per_epoch, train_labels=self.train_labels)
        self.parameters, self.optimizer, self.scheduler = stage.parameters, stage.optimizer, stage.scheduler
        if self.privacy is not None:  # the scheduler steps the same param_groups through the wrapper
            self.optimizer = self.privacy.wrap(self.model, stage.optimizer)
        self.loss_fn = stage.loss_fn.to(self.device)

    def begin_epoch(self, epoch: int) -> None:
        """LP-FT: after ``train.lp_epochs`` probe epochs, unfreeze and rebuild the optimisation
        for the remaining epochs at ``train.lr * train.ft_lr_scale``."""
        if self.stage == recipe.PROBE and epoch >= self.cfg.train.lp_epochs:
            self.stage = recipe.FULL
            self._build_stage(max(1, self.epochs - self.cfg.train.lp_epochs))

    @property
    def eval_model(self) -> nn.Module:
        """The weights to validate and keep: the EMA when ``train.ema_decay > 0``, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def train_epoch(
        self,
        split: ImageSplit,
        *,
        epoch_seed: int,
        logger: RunLogger | None = None,
        progress: bool = False,
        description: str = "train",
    ) -> float:
        """One pass over ``split``; returns the mean training loss."""
        train = self.cfg.train
        generator = torch.Generator().manual_seed(epoch_seed)
        split = recipe.epoch_split(split, train, generator)
        batches: Iterator = iterate_batches(
            split, train.batch_size, shuffle=True, augment=self.cfg.data.augment,
            generator=generator, device=self.device, augmentation=self.cfg.data.augmentation,
        )
        limit = num_batches(split, train.batch_size)
        if train.max_steps_per_epoch:
            limit = min(limit, train.max_steps_per_epoch)
        if self.privacy is not None:
            self.privacy.check_budget(limit)
            batches = self.privacy.poisson_batches(split, limit, augment=self.cfg.data.augment, generator=generator,
                                                   device=self.device, augmentation=self.cfg.data.augmentation)
        self.model.train()
        total, count = 0.0, 0
        # Losses stay on the device until a flush: reading one per step would make the
        # CPU wait for the GPU every step, so the next batch could not be prepared
        # while the current one trains. One read per LOSS_FLUSH_STEPS keeps per-step logs.
        pending: list[tuple[int, torch.Tensor, float, int]] = []
        bar = tqdm(total=limit, desc=description, leave=False, disable=not progress)

        def flush() -> None:
            nonlocal total, count
            if not pending:
                return
            values = torch.stack([loss for _, loss, _, _ in pending]).float().cpu().tolist()
            for (step, _, lr, size), value in zip(pending, values):
                total += value * size
                count += size
                if logger is not None:
                    logger.scalar("train/loss", value, step)
                    logger.scalar("train/lr", lr, step)
            bar.update(len(pending))
            bar.set_postfix(loss=f"{values[-1]:.3f}")
            pending.clear()

        for step, (images, labels) in enumerate(batches):
            if step >= limit:
                break
            lr = self.optimizer.param_groups[0]["lr"]
            loss = self.train_step(images, labels)
            pending.append((self.global_step, loss, lr, len(labels)))
            if len(pending) >= LOSS_FLUSH_STEPS:
                flush()
        flush()
        bar.close()
        return total / max(count, 1)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimiser step; returns the (detached, still on-device) loss."""
        if self.privacy is not None and len(labels) == 0:  # an empty Poisson sample: noise only, still a step
            self.privacy.noise_only_step()
            loss = torch.zeros((), device=self.device)
        else:
            loss = self._loss_step(images, labels)
        # OneCycle refuses to step past its total; a capped epoch can end early.
        if self.scheduler.last_epoch + 1 < getattr(self.scheduler, "total_steps", math.inf):
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step + 1)
        self.global_step += 1
        return loss.detach()

    def _loss_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.cfg.train.precision):
            loss = self.loss_fn(self.model(images).float(), labels)
        if self.proximal_mu > 0:
            drift = sum(torch.sum((p - a) ** 2) for p, a in zip(self.parameters, self.anchor))
            loss = loss + 0.5 * self.proximal_mu * drift
        for term in self.loss_terms:
            loss = loss + term()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def state_dict(self) -> dict:
        """Optimiser, schedule, step counter and the global random states: all a resumed run needs."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "global_step": self.global_step, "rng": rng_state(), "stage": self.stage,
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                **({"privacy": self.privacy.state_dict()} if self.privacy is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stage", self.stage) != self.stage:  # resumed after LP-FT's switch
            self.begin_epoch(self.cfg.train.lp_epochs)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_step = int(state["global_step"])
        if "rng" in state:
            restore_rng_state(state["rng"])
        if self.privacy is not None and state.get("privacy") is not None:
            self.privacy.load_state_dict(state["privacy"])

    def close(self) -> None:
        """Remove what DP-SGD added to the model (a federated site trains the same model every round)."""
        if self.privacy is not None:
            self.privacy.close()


@dataclass(frozen=True)
class ResumeState:
    """Where a checkpointed run stopped, for ``fit`` to continue it as if never interrupted.

    Data order and augmentation need nothing here: each epoch draws them from its own
    generator seeded with ``seed * 1000 + epoch``. Dropout draws from the global
    generator, whose state travels in ``trainer["rng"]``.
    """

    epoch: int  # epochs finished (0: none yet)
    trainer: dict | None = None  # Trainer.state_dict() after that epoch; None when no epoch finished
    best_auroc: float = -math.inf  # best validation AUROC so far (the best.pt on disk)


EpochCallback = Callable[[int, Trainer, dict[str, float], bool], None]


def fit(
    model: nn.Module,
    splits: DatasetSplits,
    cfg: RwftConfig,
    *,
    epochs: int,
    device: torch.device | None = None,
    logger: RunLogger | None = None,
    proximal_mu: float = 0.0,
    select_best: bool = False,
    progress: bool = False,
    on_epoch_end: EpochCallback | None = None,
    resume: ResumeState | None = None,
    loss_terms: Sequence[Callable[[], torch.Tensor]] = (),
    privacy_state: dict | None = None,
    privacy_rounds: int = 1,
) -> FitResult:
    """Train ``epochs`` epochs on ``splits.train``, scoring ``splits.val`` after each.

    With ``select_best`` the weights of the best validation-AUROC epoch are restored
    at the end. ``on_epoch_end(epoch, trainer, val_metrics, is_best)`` is where
    callers checkpoint; ``resume`` continues a run from such a checkpoint (the model
    must already hold its weights), bit for bit on the CPU.

    With ``train.dp`` (``rwft.core.privacy``) the training is DP-SGD: ``privacy_state``
    continues an earlier accounting (a site's previous rounds), ``privacy_rounds`` is how
    many ``fit`` calls a ``target_epsilon`` budget must cover, and the result's ``privacy``
    holds the epsilon spent and the accountant's state. ``PrivacyBudgetExhausted`` when the
    next epoch would spend more than the budget.
    """
    resume = resume or ResumeState(epoch=0)
    steps = num_batches(splits.train, cfg.train.batch_size)
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    trainer = Trainer(model, cfg, steps_per_epoch=steps, epochs=epochs, device=device, proximal_mu=proximal_mu,
                      train_labels=splits.train.labels, loss_terms=loss_terms, train_size=len(splits.train),
                      privacy_rounds=privacy_rounds)
    try:
        return _fit_epochs(trainer, splits, cfg, epochs=epochs, logger=logger, select_best=select_best,
                           progress=progress, on_epoch_end=on_epoch_end, resume=resume, privacy_state=privacy_state,
                           steps=steps)
    finally:
        trainer.close()


def _fit_epochs(trainer: Trainer, splits: DatasetSplits, cfg: RwftConfig, *, epochs: int, logger: RunLogger | None,
                select_best: bool, progress: bool, on_epoch_end: EpochCallback | None, resume: ResumeState,
                privacy_state: dict | None, steps: int) -> FitResult:
    start_epoch, best_auroc = resume.epoch, resume.best_auroc
    if resume.trainer is not None:
        trainer.load_state_dict(resume.trainer)
    if privacy_state is not None and trainer.privacy is not None:
        trainer.privacy.load_state_dict(privacy_state)
    first_step = trainer.global_step
    best_state, best_epoch, history, train_loss = None, start_epoch, [], float("nan")
    for epoch in range(start_epoch, epochs):
        trainer.begin_epoch(epoch)
        train_loss = trainer.train_epoch(
            splits.train, epoch_seed=cfg.seed * 1000 + epoch, logger=logger, progress=progress,
            description=f"epoch {epoch + 1}/{epochs}",
        )
        val = evaluate_split(trainer.eval_model, splits.val, cfg, device=trainer.device) if len(splits.val) else {}
        val["train_loss"] = train_loss
        history.append(val)
        if logger is not None:
            logger.scalars(val, step=epoch + 1, prefix="val")
            if trainer.privacy is not None:
                logger.scalars(trainer.privacy.summary(), step=epoch + 1, prefix="privacy")
        auroc = val.get("auroc", float("nan"))
        is_best = not math.isnan(auroc) and auroc > best_auroc
        if is_best or best_state is None:
            best_epoch = epoch + 1
            if is_best:
                best_auroc = auroc
            if select_best:
                best_state = {k: v.detach().clone() for k, v in trainer.eval_model.state_dict().items()}
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, trainer, val, is_best)
    if select_best and best_state is not None:
        trainer.model.load_state_dict(best_state)
    elif trainer.ema is not None:  # the caller (a federated site, rwft train) keeps the EMA weights
        trainer.model.load_state_dict(trainer.ema.module.state_dict())
    kept_val = history[best_epoch - start_epoch - 1] if select_best and history else (history[-1] if history else {})
    return FitResult(
        num_examples=min(len(splits.train), steps * cfg.train.batch_size),
        train_loss=train_loss, val=kept_val, steps=trainer.global_step - first_step,
        best_epoch=best_epoch, history=history,
        privacy=trainer.privacy.summary() | trainer.privacy.state_dict() if trainer.privacy is not None else None,
    )


@torch.no_grad()
def predict(model: nn.Module, split: ImageSplit, cfg: RwftConfig, device: torch.device | None = None) -> np.ndarray:
    """Softmax probabilities ``(N, num_classes)`` for every image of ``split`` (no augmentation)."""
    device = device or select_device(cfg.train)
    model = prepare_model(model, device)
    was_training = model.training
    model.eval()
    outputs = []
    batches = iterate_batches(split, cfg.train.batch_size * 2, shuffle=False, augment=False,
                              generator=None, device=device)
    for images, _ in batches:
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, cfg.train.precision):
            logits = model(images)
        outputs.append(torch.softmax(logits.float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 2), dtype=np.float32)


def evaluate_split(
    model: nn.Module,
    split: ImageSplit,
    cfg: RwftConfig,
    threshold: float = 0.5,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Binary metrics (positive = class 1) plus cross-entropy loss on ``split``."""
    probs = predict(model, split, cfg, device)
    if not np.isfinite(probs).all():
        # Scoring would either crash inside scikit-learn or, worse, report a made-up number.
        broken = int((~np.isfinite(probs)).any(axis=1).sum())
        raise BrokenModelError(f"the model's outputs are NaN or infinite on {broken} of {len(split)} images, so its "
                               "weights are broken: training diverged (lower train.lr), or, in a federation, a "
                               "site's update was aggregated unchecked (keep federation.update_checks.enabled=true "
                               "or use a robust strategy).")
    metrics = binary_metrics(split.labels, probs[:, 1], threshold)
    picked = probs[np.arange(len(split)), split.labels]
    metrics["loss"] = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))
    metrics["num_examples"] = float(len(split))
    return metrics
