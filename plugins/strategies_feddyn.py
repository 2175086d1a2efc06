"""FedDyn (Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021): a
strategy with a site half, registered as ``federation.strategy=feddyn``.

Each site i keeps a vector ``g_i`` (its past gradient correction, zero at first) and trains
on its loss plus ``-<g_i, w> + alpha/2·||w - w_global||²``; after training it updates
``g_i <- g_i - alpha·(w_i - w_global)``. The server keeps ``h`` (zero at first) and, with
P the sites that replied and m the sites of the federation,
``h <- h - alpha·|P|/m·(mean_P(w_i) - w_global)`` and the new global model is
``mean_P(w_i) - h/alpha``. The local objectives' minima then line up with the global
one however different the sites' data are, where FedAvg's drift apart.

In rwft the pieces live where the contract puts them (``rwft.core.site_algorithm``): the
term enters the engine's loss through ``loss_terms``, ``g_i`` is what the site keeps
between rounds (in its node state and work directory: a resumed federation finds it),
``h`` is an array attribute of the server strategy and ``num_sites`` (m, the most sites
seen in one round) a learned number, both saved with every round (``rwft.server.state``).
``alpha`` is ``federation.feddyn_alpha``, sent to the sites with each round. The mean is
FedAvg's, weighted by training images; BatchNorm statistics are averaged, not corrected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from rwft.core.config import RwftConfig
from rwft.core.hookspecs import Register, hookimpl
from rwft.core.site_algorithm import LossTerm, SiteAlgorithm, StrategyPlugin, round_number

ALPHA_KEY = "feddyn-alpha"  # in the round's config, from the server to the sites


def feddyn(config: RwftConfig, **common: Any) -> Any:
    # Flower is imported when a federation builds its strategy, never when plugins load.
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg

    from rwft.federation.protocol import WEIGHTS_KEY

    class FedDyn(FedAvg):
        """FedDyn's server: FedAvg's mean, corrected by the running drift ``h`` (module docstring)."""

        learned_attributes = ("num_sites",)  # saved with every round besides the array ``h``

        def __init__(self, alpha: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.alpha = alpha
            self.h: dict[str, np.ndarray] = {}
            self.num_sites = 0

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> Iterable[Message]:
            self._sent = arrays[WEIGHTS_KEY].numpy().astype(np.float64)  # working memory, not state
            config[ALPHA_KEY] = self.alpha
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int,
                            replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            mean, metrics = super().aggregate_train(server_round, replies)
            if mean is None:
                return mean, metrics
            participants = sum(not reply.has_error() for reply in replies)
            self.num_sites = max(self.num_sites, participants)
            weights = mean[WEIGHTS_KEY].numpy().astype(np.float64)
            h = self.h.get(WEIGHTS_KEY, np.zeros_like(weights)).astype(np.float64)
            h = h - self.alpha * participants / self.num_sites * (weights - self._sent)
            self.h = {WEIGHTS_KEY: h.astype(np.float32)}  # saved with every round: half the size of float64
            result = ArrayRecord({key: mean[key] for key in mean.keys()})
            result[WEIGHTS_KEY] = Array((weights - h / self.alpha).astype(mean[WEIGHTS_KEY].numpy().dtype))
            return result, metrics

    return FedDyn(config.federation.feddyn_alpha, **common)


class DynamicRegulariser(SiteAlgorithm):
    """FedDyn at a site: ``-<g_i, w> + alpha/2·||w - w_global||²`` in the loss, ``g_i`` kept between rounds."""

    def start(self, model: nn.Module, round_config: Mapping[str, Any], kept: Mapping[str, torch.Tensor]) -> None:
        self.alpha = round_number(round_config, ALPHA_KEY, self.config.federation.feddyn_alpha)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.parameters = [p for _, p in named]
        self.anchor = [p.detach().clone() for p in self.parameters]
        self.correction = [kept[name].to(p.device) if name in kept else torch.zeros_like(p) for name, p in named]

    def loss_terms(self) -> list[LossTerm]:
        return [self._regulariser]

    def _regulariser(self) -> torch.Tensor:
        if self.anchor[0].device != self.parameters[0].device:  # the engine moved the model
            self.anchor = [a.to(p.device) for a, p in zip(self.anchor, self.parameters, strict=True)]
            self.correction = [g.to(p.device) for g, p in zip(self.correction, self.parameters, strict=True)]
        linear = sum(torch.sum(g * p) for g, p in zip(self.correction, self.parameters, strict=True))
        drift = sum(torch.sum((p - a) ** 2) for p, a in zip(self.parameters, self.anchor, strict=True))
        return 0.5 * self.alpha * drift - linear  # type: ignore[return-value]

    def finish(self, model: nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: (g - self.alpha * (p.detach() - a)).cpu()
                    for name, g, p, a in zip(self.names, self.correction, self.parameters, self.anchor, strict=True)}


@hookimpl
def register_strategies(register: Register) -> None:
    register("feddyn", StrategyPlugin(feddyn, DynamicRegulariser),
             "FedAvg with dynamic regularisation at the sites and drift correction at the server "
             "(Acar et al. 2021; federation.feddyn_alpha)")
