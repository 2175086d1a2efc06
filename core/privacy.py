"""Sample-level differential privacy: DP-SGD (Abadi et al. 2016) with Opacus and its accountant.

``train.dp`` (``rwft train``) and ``federation.dp`` (every site of a federation) turn it on.
Each training example's gradient is clipped to ``max_grad_norm`` and Gaussian noise of
standard deviation ``noise_multiplier * max_grad_norm`` is added to each batch's sum
(Opacus' ``GradSampleModule`` + ``DPOptimizer``). Opacus' accountant (PRV, or RDP) turns
the steps taken into the (epsilon, delta) spent on this training set.

How it fits rwft's one training loop (``rwft.core.engine``):

- **Batches are Poisson samples**, which is what the accountant's subsampled-Gaussian
  analysis assumes: each step takes every training image independently with probability
  ``q = batch_size / N`` (``poisson_batches``), as Opacus' ``DPDataLoader`` does. rwft
  draws them from the split in memory with the epoch's seeded generator and the same
  augmentation as every other run, rather than through a ``DataLoader``: one data path,
  no worker processes per federated round. An empty sample still takes a step (noise
  only) and is counted, so the analysis holds exactly.
- **BatchNorm is frozen** (``model.batchnorm=frozen``, ``timm.layers.freeze_batch_norm_2d``:
  ImageNet statistics and affine weights become fixed buffers): batch statistics mix
  examples, which per-example clipping cannot bound. Config loading refuses DP without it.
- **The budget**: with ``target_epsilon`` and no ``noise_multiplier`` the noise is chosen
  so that the planned steps (every epoch, and for a site every round) spend exactly the
  budget. Before each epoch the steps it would take are accounted on a copy of the
  accountant; if that passes ``target_epsilon``, training stops with
  ``PrivacyBudgetExhausted`` and nothing of that epoch is trained or counted.
- **The accountant's state** is part of ``Trainer.state_dict()`` (``last.pt`` of
  ``rwft train``) and of what a site keeps between rounds (``save_state_file``), so resumed
  runs and federations keep counting; a resumed run keeps the noise it was planned with.
- **LP-FT's stage switch** builds a new optimiser: ``PrivateTraining.wrap`` is called again
  for it, with the same accountant, so both stages' steps are noised, clipped and counted.

The model that is trained is the caller's own module (Opacus' hooks are added to it and
removed by ``close``), so checkpoints keep their keys. Loss terms that are not a mean over
examples (FedProx's and FedDyn's regularisers) are refused: DP-SGD would silently drop
their gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch import nn

from rwft.core.checkpoint import atomic_write_bytes
from rwft.core.config import AugmentConfig, DPConfig
from rwft.core.data import ImageSplit, iterate_batches
from rwft.core.errors import ConfigError, PrivacyBudgetExhausted

# A budget check passes within this relative tolerance: Opacus' noise search stops just below the target.
BUDGET_TOLERANCE = 1e-3
STATE_KEYS = ("accountant", "noise_multiplier", "sample_rate", "delta")


__all__ = ["PrivacyBudgetExhausted", "PrivateTraining", "epsilon_after", "load_state_file", "save_state_file"]


class PrivateTraining:
    """DP-SGD for one training set: the accountant, the noise, and the wrapped optimiser of the current stage.

    ``wrap(model, optimizer)`` returns the ``DPOptimizer`` to step (call it again when the
    optimiser is rebuilt); ``epsilon()`` is what has been spent so far; ``close()`` removes
    Opacus' hooks from the model.
    """

    def __init__(self, dp: DPConfig, *, train_size: int, batch_size: int, planned_steps: int) -> None:
        if train_size < 1:
            raise ConfigError("differential privacy needs at least one training image.")
        if not 0 < dp.delta < 1 / train_size:
            raise ConfigError(f"dp.delta={dp.delta:g} must be below 1/N = {1 / train_size:.3g} (N={train_size} "
                              "training images): a larger delta allows leaking whole examples.")
        self.dp = dp
        self.train_size = train_size
        self.sample_rate = min(1.0, batch_size / train_size)
        self.delta = float(dp.delta)
        self.accountant: IAccountant = create_accountant(dp.accountant)
        if dp.noise_multiplier is not None:
            self.noise_multiplier = float(dp.noise_multiplier)
        else:
            self.noise_multiplier = float(get_noise_multiplier(
                target_epsilon=dp.target_epsilon, target_delta=self.delta, sample_rate=self.sample_rate,
                steps=max(1, planned_steps), accountant=dp.accountant))
        self.module: GradSampleModule | None = None
        self.optimizer: DPOptimizer | None = None

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        """Per-example gradients for ``model``'s trainable parameters, and ``optimizer`` made DP-SGD."""
        self.close()
        # functorch (vmap) per-example gradients: measured on 2 CPU threads at 28 px, a step cost
        # 1.15x a plain one this way and about 2x with Opacus' default hooks (unfold + einsum).
        self.module = GradSampleModule(model, force_functorch=True)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                     max_grad_norm=self.dp.max_grad_norm,
                                     expected_batch_size=max(1, round(self.sample_rate * self.train_size)))
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return self.optimizer

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(self.delta)) if self.accountant.history else 0.0

    def steps(self) -> int:
        return int(sum(entry[2] for entry in self.accountant.history))

    def check_budget(self, steps: int) -> None:
        """``PrivacyBudgetExhausted`` if ``steps`` more steps would spend more than ``target_epsilon``."""
        if self.dp.target_epsilon is None:
            return
        after = copy.deepcopy(self.accountant)
        after.history.append((self.noise_multiplier, self.sample_rate, steps))
        spent_after = float(after.get_epsilon(self.delta))
        if spent_after > self.dp.target_epsilon * (1 + BUDGET_TOLERANCE):
            raise PrivacyBudgetExhausted(
                f"privacy budget exhausted: epsilon {self.epsilon():.3g} of {self.dp.target_epsilon:g} "
                f"(delta {self.delta:g}) is spent and {steps} more steps would reach {spent_after:.3g}, so "
                "training on this data stops here. Raise target_epsilon only if your privacy policy allows.")

    def poisson_batches(self, split: ImageSplit, steps: int, *, augment: bool, generator: torch.Generator,
                        device: torch.device, augmentation: AugmentConfig | None = None,
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` batches, each image in each with probability ``sample_rate`` (see the module docstring)."""
        for _ in range(steps):
            chosen = torch.nonzero(torch.rand(len(split), generator=generator) < self.sample_rate).flatten()
            if len(chosen) == 0:
                yield (torch.zeros((0, 1, *split.images.shape[1:]), device=device),
                       torch.zeros(0, dtype=torch.int64, device=device))
                continue
            yield from iterate_batches(split.subset(chosen.numpy()), len(chosen), shuffle=False, augment=augment,
                                       generator=generator, device=device, augmentation=augmentation)

    def noise_only_step(self) -> None:
        """The step of an empty Poisson sample: no gradient, the noise all the same, and counted."""
        if self.optimizer is None:
            raise RuntimeError("PrivateTraining.wrap() first")
        self.optimizer.zero_grad(set_to_none=True)
        for param in self.optimizer.params:
            param.grad_sample = torch.zeros((0, *param.shape), device=param.device, dtype=param.dtype)
        self.optimizer.step()

    def summary(self) -> dict[str, float]:
        """What a run may log and a site may report: epsilon spent, delta, noise, sample rate, steps counted."""
        return {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": float(self.steps())}

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.delta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the accounting of ``state`` (a ``state_dict``), with the noise it was planned with."""
        mechanism = state["accountant"].get("mechanism")
        if mechanism != self.accountant.mechanism():
            raise ConfigError(f"the saved privacy accounting used the {mechanism} accountant, this run "
                              f"{self.accountant.mechanism()}: keep dp.accountant={mechanism}.")
        self.accountant.load_state_dict(copy.deepcopy(dict(state["accountant"])))
        self.noise_multiplier = float(state["noise_multiplier"])
        if self.optimizer is not None:
            self.optimizer.noise_multiplier = self.noise_multiplier
        self.delta = float(state["delta"])

    def close(self) -> None:
        """Remove Opacus' hooks and per-example gradients from the model (a site's model is reused every round)."""
        if self.module is not None:
            self.module.remove_hooks()
            for param in self.module._module.parameters():
                for name in ("grad_sample", "summed_grad"):
                    if hasattr(param, name):
                        delattr(param, name)
        self.module, self.optimizer = None, None


def load_state_file(path: Path) -> dict[str, Any] | None:
    """A saved accounting state (``PrivateTraining.state_dict``), or ``None`` before the first training."""
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def save_state_file(path: Path, state: dict[str, Any]) -> None:
    """Save the accounting state atomically: a crash never loses what was already spent."""
    kept = {key: state[key] for key in STATE_KEYS}
    atomic_write_bytes(path, lambda handle: torch.save(kept, handle))


def epsilon_after(accountant: str, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` DP-SGD steps run through a fresh Opacus ``accountant`` (``prv``/``rdp``)."""
    if steps < 1:
        return 0.0
    fresh = create_accountant(accountant)
    fresh.history.append((noise_multiplier, sample_rate, steps))
    return float(fresh.get_epsilon(delta))
