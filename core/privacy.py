"""Sample-level differential privacy: DP-SGD (Abadi et al. 2016) with Opacus and its accountant.

``train.dp`` (``rwft train``) and ``federation.dp`` (every site of a federation) turn it on.
Each training example's gradient is clipped to ``max_grad_norm`` and Gaussian noise of
standard deviation ``noise_multiplier * max_grad_norm`` is added to each batch's sum
(Opacus' ``GradSampleModule`` + ``DPOptimizer``). Opacus' accountant (PRV, or RDP) turns
the steps taken into the (epsilon, delta) spent on this training set.

How it fits rwft's one training loop (``rwft.core.engine``):

- **Batches are Poisson samples**, which is what the accountant's subsampled-Gaussian
  analysis assumes: each step takes every training image independently with probability
  ``q = batch_size / N`` (``poisson_batches``), ``N / batch_size`` steps per epoch, as
  Opacus' ``DPDataLoader`` does. rwft draws them from the split in memory with the
  epoch's seeded generator and the same device-side augmentation as every other run,
  rather than through a ``DataLoader`` (``make_private``'s path): one data path, no worker
  processes per federated round. An empty sample still takes a step (noise only) and is
  counted, so the analysis holds exactly.
- **BatchNorm is frozen** (``model.batchnorm=frozen``: ImageNet statistics and affine
  parameters fixed, ``timm.layers.freeze_batch_norm_2d``): batch statistics mix examples,
  which per-example clipping cannot bound. Required; the error says how to set it.
- **The budget**: with ``target_epsilon`` and no ``noise_multiplier`` the noise is chosen
  so that the planned steps (epochs, and for a site every round) spend exactly the
  budget. Before each epoch the steps it would take are accounted on a copy of the
  accountant; if that passes ``target_epsilon`` training stops with
  ``PrivacyBudgetExhausted``.
- **The accountant's state** is part of ``Trainer.state_dict()`` (``last.pt`` of
  ``rwft train``) and of what a site keeps between rounds, so resumed runs keep counting.

The model that is trained is the caller's own module (Opacus' hooks are added to it and
removed by ``close``), so checkpoints keep their keys.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch import nn

from rwft.core.checkpoint import atomic_write_bytes
from rwft.core.config import DPConfig
from rwft.core.data import ImageSplit, iterate_batches
from rwft.core.errors import ConfigError, RwftError

# A budget check passes within this relative tolerance: the noise search stops just below the target.
BUDGET_TOLERANCE = 1e-3


class PrivacyBudgetExhausted(RwftError):
    """Training more would spend more than the configured (epsilon, delta) budget."""


def check_dp_config(dp: DPConfig, key: str, *, batchnorm: str, proximal_mu: float = 0.0) -> None:
    """``ConfigError`` naming ``key`` (``train.dp`` or ``federation.dp``) when DP cannot run as configured."""
    if dp.noise_multiplier is None and dp.target_epsilon is None:
        raise ConfigError(f"{key}.enabled=true needs {key}.noise_multiplier (e.g. 1.0) or {key}.target_epsilon "
                          "(e.g. 3.0), the budget the whole run may spend.")
    if dp.noise_multiplier is not None and dp.noise_multiplier <= 0:
        raise ConfigError(f"{key}.noise_multiplier must be positive, got {dp.noise_multiplier}.")
    if dp.target_epsilon is not None and dp.target_epsilon <= 0:
        raise ConfigError(f"{key}.target_epsilon must be positive, got {dp.target_epsilon}.")
    if dp.max_grad_norm <= 0:
        raise ConfigError(f"{key}.max_grad_norm must be positive, got {dp.max_grad_norm}.")
    if batchnorm != "frozen":
        raise ConfigError(f"{key}.enabled=true needs model.batchnorm=frozen: BatchNorm's batch statistics mix "
                          "examples, so per-example gradients cannot be clipped (the ImageNet statistics are kept).")
    if proximal_mu > 0:
        raise ConfigError(f"{key} cannot be combined with FedProx's proximal term (its gradient is not per "
                          "example): use another federation.strategy.")


@dataclass
class PrivateTraining:
    """DP-SGD around one model and optimiser; ``epsilon()`` is what has been spent so far."""

    dp: DPConfig
    sample_rate: float
    noise_multiplier: float
    delta: float
    accountant: IAccountant
    module: GradSampleModule
    optimizer: DPOptimizer

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(self.delta)) if self.accountant.history else 0.0

    def check_budget(self, steps: int) -> None:
        """``PrivacyBudgetExhausted`` if ``steps`` more steps would spend more than ``target_epsilon``."""
        if self.dp.target_epsilon is None:
            return
        after = copy.deepcopy(self.accountant)
        after.history.append((self.noise_multiplier, self.sample_rate, steps))
        spent_after = float(after.get_epsilon(self.delta))
        if spent_after > self.dp.target_epsilon * (1 + BUDGET_TOLERANCE):
            raise PrivacyBudgetExhausted(
                f"privacy budget exhausted: {self.epsilon():.3g} of epsilon {self.dp.target_epsilon:g} "
                f"(delta {self.delta:g}) is spent and {steps} more steps would reach {spent_after:.3g}; "
                "training on this data stops here. Raise target_epsilon only if your privacy policy allows.")

    def poisson_batches(self, split: ImageSplit, steps: int, *, augment: bool, generator: torch.Generator,
                        device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` batches, each image in each with probability ``sample_rate`` (see the module docstring)."""
        for _ in range(steps):
            chosen = torch.nonzero(torch.rand(len(split), generator=generator) < self.sample_rate).flatten()
            if len(chosen) == 0:
                size = split.images.shape[1:]
                yield torch.zeros((0, 1, *size), device=device), torch.zeros(0, dtype=torch.int64, device=device)
                continue
            yield from iterate_batches(split.subset(chosen.numpy()), len(chosen), shuffle=False, augment=augment,
                                       generator=generator, device=device)

    def noise_only_step(self) -> None:
        """The step of an empty Poisson sample: no gradient, noise all the same, and counted."""
        self.optimizer.zero_grad(set_to_none=True)
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    param.grad_sample = torch.zeros((0, *param.shape), device=param.device, dtype=param.dtype)
        self.optimizer.step()

    def summary(self) -> dict[str, float]:
        """Numbers a site may report and a run may log: epsilon spent, delta, noise, steps counted."""
        steps = sum(entry[2] for entry in self.accountant.history)
        return {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": float(steps)}

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.delta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the accounting of ``state`` (a ``state_dict``), with the noise it was planned with."""
        if state["accountant"].get("mechanism") != self.accountant.mechanism():
            raise ConfigError(f"the saved privacy accounting used the {state['accountant'].get('mechanism')} "
                              f"accountant, this run {self.accountant.mechanism()}: keep dp.accountant as it was.")
        self.accountant.load_state_dict(state["accountant"])
        self.noise_multiplier = self.optimizer.noise_multiplier = float(state["noise_multiplier"])
        self.delta = float(state["delta"])

    def close(self) -> None:
        """Remove Opacus' hooks from the model (a site's model is reused every round)."""
        self.module.remove_hooks()


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dp: DPConfig,
    *,
    train_size: int,
    batch_size: int,
    planned_steps: int,
) -> PrivateTraining:
    """Wrap ``model`` and ``optimizer`` for DP-SGD on a training set of ``train_size`` images.

    ``planned_steps``: every step the budget must cover (all epochs, all rounds), used to
    choose the noise from ``target_epsilon``. ``PrivateTraining.load_state_dict`` then
    continues an earlier run's accounting with its noise, so a resumed run spends its
    budget as planned at the start.
    """
    if train_size < 1:
        raise ConfigError("differential privacy needs at least one training image.")
    sample_rate = min(1.0, batch_size / train_size)
    delta = dp.delta
    if not 0 < delta < 1 / train_size:
        raise ConfigError(f"dp.delta={delta:g} must be below 1/N = {1 / train_size:.3g} (N={train_size} "
                          "training images): a larger delta allows leaking whole examples.")
    accountant = create_accountant(dp.accountant)
    if dp.noise_multiplier is not None:
        noise = float(dp.noise_multiplier)
    else:
        noise = float(get_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=delta,
                                           sample_rate=sample_rate, steps=max(1, planned_steps),
                                           accountant=dp.accountant))
    # functorch (vmap) per-example gradients: measured on 2 CPU threads at 28 px, a step cost
    # 1.15x a plain one this way and about 2x with Opacus' default hooks (unfold + einsum).
    module = GradSampleModule(model, force_functorch=True)
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=noise, max_grad_norm=dp.max_grad_norm,
                               expected_batch_size=max(1, round(sample_rate * train_size)))
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return PrivateTraining(dp, sample_rate, noise, delta, accountant, module, dp_optimizer)


def load_state_file(path: Path) -> dict[str, Any] | None:
    """A saved accounting state (``PrivateTraining.state_dict``), or ``None`` before the first training."""
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def save_state_file(path: Path, state: dict[str, Any]) -> None:
    """Save the accounting state (atomically: a crash never loses what was already spent)."""
    kept = {key: state[key] for key in ("accountant", "noise_multiplier", "sample_rate", "delta")}
    atomic_write_bytes(path, lambda handle: torch.save(kept, handle))


def epsilon_after(dp: DPConfig, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` DP-SGD steps run by hand through a fresh accountant (for checks and reports)."""
    accountant = create_accountant(dp.accountant)
    accountant.history.append((noise_multiplier, sample_rate, steps))
    return float(accountant.get_epsilon(delta)) if steps else 0.0
