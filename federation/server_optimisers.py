"""Flower's server-side optimisers (FedAdam, FedYogi) made safe for models with BatchNorm."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedYogi

from rwft.federation.protocol import STATISTICS_KEY


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
