"""Differential privacy in a federation: what server and sites agree on.

- **Sample-level, at each site** (``federation.dp``): every site trains with DP-SGD
  (``rwft.core.privacy``) on its own images; ``site_dp_overrides`` makes the site's
  training config use ``federation.dp``. Each site reports the epsilon it has spent so far
  as the train metric ``EPSILON_METRIC`` (one number, like its loss); the server logs it
  per site and round.
- **User-level, at the server** (strategy ``dp-fedavg``, ``federation.server_dp``): each
  site's whole update is clipped and the mean is noised (``rwft.plugins.strategies_dp``);
  ``server_epsilon`` is the (epsilon, delta) of the rounds released so far, by Opacus'
  RDP analysis of the Gaussian mechanism. Every sampled site's update is in every
  round's release (no subsampling amplification is claimed: Flower samples a fixed number
  of sites, not Poisson).
"""

from __future__ import annotations

from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

from rwft.core.config import RwftConfig

EPSILON_METRIC = "dp-epsilon"  # a site's epsilon spent so far (sample-level DP), in its train reply
SERVER_EPSILON_METRIC = "dp-server-epsilon"  # the federation's user-level epsilon, in the round's train metrics


def site_dp_overrides(cfg: RwftConfig) -> list[str]:
    """``key=value`` overrides that make a site's training use ``federation.dp`` (as ``train.dp``)."""
    dp = cfg.federation.dp
    if not dp.enabled:
        return []
    return [f"train.dp.{key}={'null' if getattr(dp, key) is None else getattr(dp, key)}"
            for key in ("enabled", "noise_multiplier", "target_epsilon", "delta", "max_grad_norm", "accountant")]


def server_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """User-level epsilon after ``rounds`` releases of the clipped, noised mean (RDP, no subsampling)."""
    if rounds < 1:
        return 0.0
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=rounds, orders=orders)
    epsilon, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(epsilon)
