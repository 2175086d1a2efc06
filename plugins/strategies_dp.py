"""User-level differential privacy at the server: strategy ``dp-fedavg``.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` wrapped around FedAvg, with the
parts rwft needs changed (Flower's wrapper noises every array, BatchNorm running
variances included, which then went negative and made the model NaN):

- only the shared **weights** vector (``rwft.federation.protocol.WEIGHTS_KEY``) is clipped
  and noised. BatchNorm statistics must therefore carry no site information: the strategy
  requires ``federation.local_bn=true`` (FedBN: statistics stay at the sites) or
  ``model.batchnorm=frozen`` (statistics fixed at ImageNet's, identical everywhere);
- each site's update of the weights is clipped to ``federation.server_dp.clipping_norm``
  (a zero update stays zero, where Flower's clipping divides by its norm), the sites are
  averaged with **equal** weights (the sensitivity the noise assumes), and Gaussian noise
  of standard deviation ``noise_multiplier * clipping_norm / sites aggregated`` is added;
- the epsilon spent after each round (``rwft.federation.privacy.server_epsilon``, Opacus'
  RDP analysis, ``federation.server_dp.delta``) is added to the round's train metrics as
  ``dp-server-epsilon``: in ``metrics.json`` and the central TensorBoard
  (``federation/train/dp-server-epsilon``). It follows from the round number, so a resumed
  federation keeps counting.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from rwft.core.config import RwftConfig
from rwft.core.errors import ConfigError
from rwft.core.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

UNIT_WEIGHT_KEY = "rwft-dp-unit-weight"  # added to each reply so that FedAvg weighs every site equally


def dp_fedavg(config: RwftConfig, **common: Any) -> Strategy:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    from rwft.federation.privacy import SERVER_EPSILON_METRIC, server_epsilon
    from rwft.federation.protocol import WEIGHTS_KEY

    server_dp = config.federation.server_dp
    if not (config.federation.local_bn or config.model.batchnorm == "frozen"):
        raise ConfigError("federation.strategy=dp-fedavg noises only the shared weights, so BatchNorm statistics "
                          "must not carry site data: set federation.local_bn=true (FedBN) or model.batchnorm=frozen.")
    if server_dp.noise_multiplier <= 0 or server_dp.clipping_norm <= 0:
        raise ConfigError("federation.server_dp.noise_multiplier and clipping_norm must be positive.")

    class WeightsOnlyServerSideFixedClipping(DifferentialPrivacyServerSideFixedClipping):
        def aggregate_train(self, server_round: int,
                            replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = [reply for reply in replies if not reply.has_error()]
            if not replies:
                return None, None
            start = np.asarray(self.current_arrays[WEIGHTS_KEY].numpy(), np.float64)
            for reply in replies:
                arrays = reply.content["arrays"]
                update = np.asarray(arrays[WEIGHTS_KEY].numpy(), np.float64) - start
                norm = float(np.linalg.norm(update))
                clipped = update * min(1.0, self.clipping_norm / norm) if norm > 0 else update
                reply.content["arrays"] = ArrayRecord(
                    {**dict(arrays.items()), WEIGHTS_KEY: Array((start + clipped).astype(np.float32))})
                next(iter(reply.content.metric_records.values()))[UNIT_WEIGHT_KEY] = 1
            aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
            if aggregated is None:
                return None, metrics
            std = self.noise_multiplier * self.clipping_norm / len(replies)
            weights = aggregated[WEIGHTS_KEY].numpy()
            noised = weights + np.random.default_rng().normal(0.0, std, weights.shape)
            aggregated = ArrayRecord({**dict(aggregated.items()), WEIGHTS_KEY: Array(noised.astype(weights.dtype))})
            metrics = metrics if metrics is not None else MetricRecord()
            metrics[SERVER_EPSILON_METRIC] = server_epsilon(self.noise_multiplier, server_round, server_dp.delta)
            return aggregated, metrics

    inner = FedAvg(weighted_by_key=UNIT_WEIGHT_KEY, **common)
    return WeightsOnlyServerSideFixedClipping(inner, noise_multiplier=server_dp.noise_multiplier,
                                              clipping_norm=server_dp.clipping_norm,
                                              num_sampled_clients=max(1, common.get("min_train_nodes", 1)))


@hookimpl
def register_strategies(register: Register) -> None:
    register("dp-fedavg", dp_fedavg, "FedAvg with user-level DP: each site's weight update clipped, Gaussian "
                                     "noise on the mean (federation.server_dp; needs local_bn or frozen BatchNorm)")
