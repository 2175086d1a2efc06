"""Aggregation strategies (``federation.strategy``): Flower's own, configured from the rwft config.

Each factory follows ``hookspecs.register_strategies``: it takes the whole run config
and the keyword arguments the server computes for every strategy (``common``: sampling
fractions, minimum site counts, how training metrics are averaged) and returns a
``flwr.serverapp.strategy`` object. The server drives it round by round
(``rwft.server.rounds``), so what a strategy learns between rounds (FedAdam's moments) is
checkpointed and resumed (``rwft.server.state``). A strategy whose sites train
differently registers a ``StrategyPlugin`` with its site half (``rwft.core.site_algorithm``):
here FedProx; FedDyn is its own plugin (``rwft.plugins.strategies_feddyn``).

- ``fedavg``: weighted mean of the sites' weights (McMahan et al. 2017).
- ``fedprox``: FedAvg, and each site adds mu/2·||w − w_global||² to its training loss
  (Li et al. 2020); ``federation.proximal_mu``. Flower sends mu to the sites in the
  round's config (``proximal-mu``); the site half (``ProximalTerm``) adds the term.
- ``fedadam`` / ``fedyogi``: FedAvg's mean used as a pseudo-gradient for a server-side
  Adam / Yogi step (Reddi et al. 2021); ``federation.server_lr`` is the server step size,
  about the change of every weight per round, so fine-tuning wants it small (1e-3).
  BatchNorm's running statistics are averaged, not stepped (``rwft.federation.server_optimisers``).
- ``fedmedian``: coordinate-wise median (Yin et al. 2018), robust to an outlier site.
- ``fedtrimmedavg``: coordinate-wise mean after trimming ``federation.trimmed_beta`` of
  the values at each end.
- ``krum``: the one site update closest to its neighbours (Blanchard et al. 2017);
  ``federation.krum_byzantine`` sites may be malicious.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rwft.core.config import RwftConfig
from rwft.core.hookspecs import Register, hookimpl
from rwft.core.model import trainable_parameters
from rwft.core.site_algorithm import LossTerm, SiteAlgorithm, StrategyPlugin, round_number

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

# Flower is imported inside each factory, when a federation builds its strategy: listing
# or loading plugins (``rwft train``, ``rwft plugins``) then needs no Flower at all.


def fedavg(config: RwftConfig, **common: Any) -> Strategy:
    from flwr.serverapp.strategy import FedAvg

    return FedAvg(**common)


def fedprox(config: RwftConfig, **common: Any) -> Strategy:
    from flwr.serverapp.strategy import FedProx

    return FedProx(proximal_mu=config.federation.proximal_mu, **common)


class ProximalTerm(SiteAlgorithm):
    """FedProx at a site: mu/2·||w − w_global||² added to the loss, with the mu the server sent."""

    PROXIMAL_MU_KEY = "proximal-mu"  # the key Flower's FedProx sends mu under

    def start(self, model: nn.Module, round_config: Mapping[str, Any], kept: Mapping[str, torch.Tensor]) -> None:
        self.mu = round_number(round_config, self.PROXIMAL_MU_KEY, self.config.federation.proximal_mu)
        self.parameters = trainable_parameters(model)
        self.anchor = [p.detach().clone() for p in self.parameters]

    def loss_terms(self) -> list[LossTerm]:
        return [self._proximal] if self.mu > 0 else []

    def _proximal(self) -> torch.Tensor:
        if self.anchor and self.anchor[0].device != self.parameters[0].device:  # the engine moved the model
            self.anchor = [a.to(p.device) for a, p in zip(self.anchor, self.parameters, strict=True)]
        drift = sum(torch.sum((p - a) ** 2) for p, a in zip(self.parameters, self.anchor, strict=True))
        return 0.5 * self.mu * drift  # type: ignore[return-value]


def fedadam(config: RwftConfig, **common: Any) -> Strategy:
    from rwft.federation.server_optimisers import RwftFedAdam

    return RwftFedAdam(eta=config.federation.server_lr, eta_l=config.train.lr, **common)


def fedyogi(config: RwftConfig, **common: Any) -> Strategy:
    from rwft.federation.server_optimisers import RwftFedYogi

    return RwftFedYogi(eta=config.federation.server_lr, eta_l=config.train.lr, **common)


def fedmedian(config: RwftConfig, **common: Any) -> Strategy:
    from flwr.serverapp.strategy import FedMedian

    return FedMedian(**common)


def fedtrimmedavg(config: RwftConfig, **common: Any) -> Strategy:
    from flwr.serverapp.strategy import FedTrimmedAvg

    return FedTrimmedAvg(beta=config.federation.trimmed_beta, **common)


def krum(config: RwftConfig, **common: Any) -> Strategy:
    from flwr.serverapp.strategy import Krum

    return Krum(num_malicious_nodes=config.federation.krum_byzantine, **common)


@hookimpl
def register_strategies(register: Register) -> None:
    register("fedavg", fedavg, "weighted mean of the sites' weights (McMahan et al. 2017)")
    register("fedprox", StrategyPlugin(fedprox, ProximalTerm), "FedAvg + proximal term mu/2·||w - w_global||² in each site's loss "
                                 "(federation.proximal_mu)")
    register("fedadam", fedadam, "server-side Adam on the mean update (federation.server_lr)")
    register("fedyogi", fedyogi, "server-side Yogi on the mean update (federation.server_lr)")
    register("fedmedian", fedmedian, "coordinate-wise median of the sites' weights")
    register("fedtrimmedavg", fedtrimmedavg, "coordinate-wise trimmed mean (federation.trimmed_beta)")
    register("krum", krum, "the site update closest to its neighbours (federation.krum_byzantine)")
