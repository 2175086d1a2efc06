"""Aggregation strategies (``federation.strategy``): Flower's own, configured from the rwft config.

Each factory follows ``hookspecs.register_strategies``: it takes the whole run config
and the keyword arguments the server computes for every strategy (``common``: sampling
fractions and minimum site counts) and returns a ``flwr.serverapp.strategy`` object.
The server drives it round by round (``rwft.server.rounds``), so what a strategy keeps
between rounds in array attributes (FedAdam's moments) is checkpointed and resumed.

- ``fedavg``: weighted mean of the sites' weights (McMahan et al. 2017).
- ``fedprox``: FedAvg, and each site adds mu/2·||w − w_global||² to its training loss
  (Li et al. 2020); ``federation.proximal_mu``. Flower sends mu to the sites in the
  round's config (``proximal-mu``), which the rwft client passes to the engine.
- ``fedadam`` / ``fedyogi``: FedAvg's mean used as a pseudo-gradient for a server-side
  Adam / Yogi step (Reddi et al. 2021); ``federation.server_lr`` is the server step size,
  about the change of every weight per round, so fine-tuning wants it small (1e-3).
  BatchNorm's running statistics are averaged, not stepped (``AveragedStatisticsMixin``).
- ``fedmedian``: coordinate-wise median (Yin et al. 2018), robust to an outlier site.
- ``fedtrimmedavg``: coordinate-wise mean after trimming ``federation.trimmed_beta`` of
  the values at each end.
- ``krum``: the one site update closest to its neighbours (Blanchard et al. 2017);
  ``federation.krum_byzantine`` sites may be malicious.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy
from rwft.core.config import RwftConfig
from rwft.core.federated import STATISTICS_KEY
from rwft.core.hookspecs import Register, hookimpl


def fedavg(config: RwftConfig, **common: Any) -> Strategy:
    return FedAvg(**common)


def fedprox(config: RwftConfig, **common: Any) -> Strategy:
    return FedProx(proximal_mu=config.federation.proximal_mu, **common)


class AveragedStatisticsMixin:
    """Server optimisers step on weights; BatchNorm's running statistics are averaged instead.

    FedAdam and FedYogi move every array by about ``eta`` per round whatever its scale:
    a running variance of 1e-4 then turns negative and the model outputs NaN. Statistics
    are measurements, not parameters, so they take FedAvg's weighted mean. The result is
    also cast back to the sites' dtype (Flower's optimisers return float64, which would
    double every later message).
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        stepped, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if stepped is None:
            return stepped, metrics
        averaged, _ = FedAvg.aggregate_train(self, server_round, replies)  # type: ignore[arg-type]
        dtypes = {key: array.numpy().dtype for key, array in averaged.items()}  # type: ignore[union-attr]
        result = ArrayRecord({key: Array(stepped[key].numpy().astype(dtypes[key])) for key in stepped.keys()})
        if STATISTICS_KEY in result:
            result[STATISTICS_KEY] = averaged[STATISTICS_KEY]  # type: ignore[index]
        return result, metrics


class RwftFedAdam(AveragedStatisticsMixin, FedAdam):
    """FedAdam with BatchNorm statistics averaged (``AveragedStatisticsMixin``)."""


class RwftFedYogi(AveragedStatisticsMixin, FedYogi):
    """FedYogi with BatchNorm statistics averaged (``AveragedStatisticsMixin``)."""


def fedadam(config: RwftConfig, **common: Any) -> Strategy:
    return RwftFedAdam(eta=config.federation.server_lr, eta_l=config.train.lr, **common)


def fedyogi(config: RwftConfig, **common: Any) -> Strategy:
    return RwftFedYogi(eta=config.federation.server_lr, eta_l=config.train.lr, **common)


def fedmedian(config: RwftConfig, **common: Any) -> Strategy:
    return FedMedian(**common)


def fedtrimmedavg(config: RwftConfig, **common: Any) -> Strategy:
    return FedTrimmedAvg(beta=config.federation.trimmed_beta, **common)


def krum(config: RwftConfig, **common: Any) -> Strategy:
    return Krum(num_malicious_nodes=config.federation.krum_byzantine, **common)


@hookimpl
def register_strategies(register: Register) -> None:
    register("fedavg", fedavg, "weighted mean of the sites' weights (McMahan et al. 2017)")
    register("fedprox", fedprox, "FedAvg + proximal term mu/2·||w - w_global||² in each site's loss "
                                 "(federation.proximal_mu)")
    register("fedadam", fedadam, "server-side Adam on the mean update (federation.server_lr)")
    register("fedyogi", fedyogi, "server-side Yogi on the mean update (federation.server_lr)")
    register("fedmedian", fedmedian, "coordinate-wise median of the sites' weights")
    register("fedtrimmedavg", fedtrimmedavg, "coordinate-wise trimmed mean (federation.trimmed_beta)")
    register("krum", krum, "the site update closest to its neighbours (federation.krum_byzantine)")
