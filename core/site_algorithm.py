"""The site's half of a federated strategy: what a site does differently in its local training.

A strategy plugin (``rwft.core.hookspecs.register_strategies``) whose sites train
differently registers a ``StrategyPlugin``: the server's strategy factory plus ``site``,
a factory of ``SiteAlgorithm``. For every training message the ClientApp builds the run
strategy's ``SiteAlgorithm`` and lets it

- add terms to the local training loss (``loss_terms``: FedProx's proximal term, FedDyn's
  dynamic regulariser), through the engine's generic ``loss_terms`` (``rwft.core.engine.fit``);
- keep tensors at the site from one round to the next (``finish`` returns them, ``start``
  gets them back). rwft keeps them in the node's state and in the site's work directory,
  so that a resumed federation finds them again (FedDyn's gradient correction, a
  SCAFFOLD control variate); they never leave the site.

Nothing here knows Flower: an algorithm sees the torch model, the numbers the server's
strategy sent with the round (``round_config``) and what it kept. A strategy that
changes nothing at the sites registers a plain factory and its sites get ``SiteAlgorithm``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rwft.core.config import RwftConfig

LossTerm = Callable[[], torch.Tensor]  # called once per training step; its value is added to the loss


class SiteAlgorithm:
    """Plain local training (FedAvg and every strategy that only aggregates differently).

    Contract, per training message: ``start`` once with the model as received (global
    weights loaded), then training with ``loss_terms()`` added to every step's loss, then
    ``finish`` once with the trained model, returning what the site keeps for ``start``
    of its next round (an empty dict keeps nothing).
    """

    def __init__(self, config: RwftConfig) -> None:
        self.config = config

    def start(self, model: nn.Module, round_config: Mapping[str, Any], kept: Mapping[str, torch.Tensor]) -> None:
        """Take what this round needs: the received weights, the strategy's values, the kept state."""

    def loss_terms(self) -> list[LossTerm]:
        return []

    def finish(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {}


@dataclass(frozen=True)
class StrategyPlugin:
    """A strategy with a site half: ``register(name, StrategyPlugin(server, site), description)``.

    ``server(config, **common)`` is the strategy factory of ``register_strategies``;
    ``site(config)`` builds the ``SiteAlgorithm`` each site runs.
    """

    server: Callable[..., Any]
    site: Callable[[RwftConfig], SiteAlgorithm]

    def __call__(self, config: RwftConfig, **common: Any) -> Any:
        return self.server(config, **common)


def site_algorithm_for(factory: object, config: RwftConfig) -> SiteAlgorithm:
    """The site half of the registered strategy ``factory`` (plain training for a server-only strategy)."""
    return factory.site(config) if isinstance(factory, StrategyPlugin) else SiteAlgorithm(config)


def round_number(round_config: Mapping[str, Any], key: str, default: float) -> float:
    """A number the server's strategy sent with the round; ``ValueError`` naming it if it is not one."""
    value = round_config.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"the server sent {key}={value!r}, not a number")
    return float(value)
