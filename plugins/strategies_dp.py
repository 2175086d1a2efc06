"""User-level differential privacy at the server: strategy ``dp-fedavg``.

FedAvg wrapped in Flower's ``DifferentialPrivacyServerSideFixedClipping``
(``flwr.serverapp.strategy``), restricted to what DP must cover. Flower's wrapper clips
and noises every array of a reply, BatchNorm running statistics included (running
variances then went negative and the model NaN), and its own ε accounting needs
``flwr[dp]``, whose pins downgrade ``attrs``. Here:

- only the shared **weights** vector (``rwft.federation.protocol.WEIGHTS_KEY``: the
  trainable parameters) is clipped and noised, with the wrapper's own clipping
  (``compute_clip_model_update``) and noise (``compute_stdv``, ``add_gaussian_noise_inplace``).
  BatchNorm statistics must carry no site data, so the strategy needs
  ``federation.local_bn=true`` (FedBN: statistics never leave the sites) or
  ``model.batchnorm=frozen`` (ImageNet's statistics, fixed and identical everywhere); the
  global model keeps the statistics it sent, so no site's statistics ever reach it.
  ``num_batches_tracked`` never travels (``rwft.federation.protocol``);
- each site's update of the weights is clipped to ``federation.server_dp.clipping_norm``
  (a zero update stays zero; Flower's clipping would divide by its zero norm), the sites
  are averaged with **equal** weights (the sensitivity ``clipping_norm / n`` the noise
  assumes) and Gaussian noise of standard deviation ``noise_multiplier * clipping_norm /
  n`` is added, ``n`` being the sites actually aggregated that round (error replies are
  left out first: Flower's wrapper would skip the whole round);
- the epsilon spent after each round (``rwft.federation.privacy.server_epsilon``: Opacus'
  RDP analysis of the Gaussian mechanism, ``federation.server_dp.delta``) is added to the
  round's train aggregate as ``dp-server-epsilon`` (``metrics.json`` ``rounds[r].train``,
  central TensorBoard ``federation/train/dp-server-epsilon``) and printed. It follows
  from the round number, so a resumed federation keeps counting.
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

UNIT_WEIGHT_KEY = "dp-unit-weight"  # added to each accepted reply so that FedAvg weighs every site equally


def dp_fedavg(config: RwftConfig, **common: Any) -> Strategy:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
    from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_clip_model_update, compute_stdv

    from rwft.federation.privacy import SERVER_EPSILON_METRIC, server_epsilon
    from rwft.federation.protocol import WEIGHTS_KEY

    server_dp = config.federation.server_dp
    if not (config.federation.local_bn or config.model.batchnorm == "frozen"):
        raise ConfigError("federation.strategy=dp-fedavg noises only the shared weights, so BatchNorm statistics "
                          "must not carry site data: set federation.local_bn=true (FedBN) or model.batchnorm=frozen.")

    class WeightsOnlyServerSideFixedClipping(DifferentialPrivacyServerSideFixedClipping):
        """Flower's server-side fixed clipping over the shared weights only (see the module docstring)."""

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> Iterable[Message]:
            messages = super().configure_train(server_round, arrays, config, grid)
            self._sent = arrays  # the whole global model; self.current_arrays is what clipping is relative to
            self.current_arrays = ArrayRecord({WEIGHTS_KEY: arrays[WEIGHTS_KEY]})
            return messages

        def aggregate_train(self, server_round: int,
                            replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = [reply for reply in replies if not reply.has_error()]
            if not replies:
                return None, None
            start = [np.asarray(self.current_arrays[WEIGHTS_KEY].numpy())]
            for reply in replies:
                returned = [np.asarray(reply.content["arrays"][WEIGHTS_KEY].numpy()).copy()]
                if np.any(returned[0] != start[0]):  # Flower's clipping divides by the update's norm
                    compute_clip_model_update(param1=returned, param2=start, clipping_norm=self.clipping_norm)
                reply.content["arrays"] = ArrayRecord({WEIGHTS_KEY: Array(np.asarray(returned[0], np.float32))})
                next(iter(reply.content.metric_records.values()))[UNIT_WEIGHT_KEY] = 1
            self.num_sampled_clients = len(replies)  # the noise's scale follows the sites actually averaged
            mean, metrics = self.strategy.aggregate_train(server_round, replies)
            if mean is None:
                return None, metrics
            # The wrapper's own noise, through Flower's module functions (not its private method).
            noised = np.asarray(mean[WEIGHTS_KEY].numpy(), np.float32).copy()
            add_gaussian_noise_inplace([noised], compute_stdv(self.noise_multiplier, self.clipping_norm,
                                                              self.num_sampled_clients))
            aggregated = ArrayRecord({**{key: value for key, value in self._sent.items() if key != WEIGHTS_KEY},
                                      WEIGHTS_KEY: Array(noised)})
            epsilon = server_epsilon(self.noise_multiplier, server_round, server_dp.delta)
            metrics = metrics if metrics is not None else MetricRecord()
            metrics[SERVER_EPSILON_METRIC] = epsilon
            print(f"rwft: user-level DP after round {server_round}: epsilon {epsilon:.3f} (delta "
                  f"{server_dp.delta:g}, noise multiplier {self.noise_multiplier:g}, clipping norm "
                  f"{self.clipping_norm:g}, {len(replies)} site(s))", flush=True)
            return aggregated, metrics

    inner = FedAvg(**{**common, "weighted_by_key": UNIT_WEIGHT_KEY})
    return WeightsOnlyServerSideFixedClipping(inner, noise_multiplier=server_dp.noise_multiplier,
                                              clipping_norm=server_dp.clipping_norm,
                                              num_sampled_clients=max(1, common.get("min_train_nodes", 1)))


@hookimpl
def register_strategies(register: Register) -> None:
    register("dp-fedavg", dp_fedavg, "FedAvg with user-level DP: each site's weight update clipped, Gaussian noise "
                                     "on the equal-weight mean (federation.server_dp; needs local_bn or frozen "
                                     "BatchNorm)")
