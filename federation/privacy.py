"""Differential privacy in a federation: what the server and the sites agree on.

- **Sample-level, at each site** (``federation.dp``): every site trains with DP-SGD
  (``rwft.core.privacy``) on its own images, with its own accountant over all rounds
  (kept in the site's work directory, ``site_state_file``). ``site_training_overrides``
  makes a site's training config use ``federation.dp`` as ``train.dp``. Each site reports
  the epsilon it has spent so far as the train score ``dp-epsilon``
  (``rwft.federation.protocol.EPSILON_NAME``), one number like its loss.
- **User-level, at the server** (strategy ``dp-fedavg``, ``federation.server_dp``): each
  site's whole update of the shared weights is clipped and the mean is noised
  (``rwft.plugins.strategies_dp``). ``server_epsilon`` is the (epsilon, delta) of the rounds
  released so far, by Opacus' RDP analysis of the Gaussian mechanism. Every aggregated
  site's update is in every round's release: no subsampling amplification is claimed
  (Flower samples a fixed number of sites, not a Poisson sample).
"""

from __future__ import annotations

from pathlib import Path

from rwft.core.config import RwftConfig
from rwft.core.errors import ConfigError

SERVER_EPSILON_METRIC = "dp-server-epsilon"  # the federation's user-level epsilon, in the round's train aggregate
DP_KEYS = ("enabled", "noise_multiplier", "target_epsilon", "delta", "max_grad_norm", "accountant")


def site_training_overrides(cfg: RwftConfig) -> list[str]:
    """``key=value`` overrides that make a site's training use ``federation.dp`` (as ``train.dp``)."""
    dp = cfg.federation.dp
    if not dp.enabled:
        return []
    return [f"train.dp.{key}={'null' if getattr(dp, key) is None else getattr(dp, key)}" for key in DP_KEYS]


def site_state_file(work_dir: Path, federation_id: str) -> Path:
    """Where a site keeps its accountant's state for one federation (it never leaves the site)."""
    return work_dir / "privacy" / f"{federation_id}.pt"


def check_federation_dp(cfg: RwftConfig, site_half: bool) -> None:
    """Refuse ``federation.dp`` with a strategy whose sites train differently (``site_half``), naming it."""
    if cfg.federation.dp.enabled and site_half:
        raise ConfigError(f"federation.dp cannot be combined with federation.strategy={cfg.federation.strategy}: "
                          "its sites add a term to the training loss whose gradient is not a mean over examples, "
                          "which DP-SGD would drop. Use fedavg (or dp-fedavg, fedmedian, ...).")


def server_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """User-level epsilon after ``rounds`` releases of the clipped, noised mean (Opacus RDP, no subsampling)."""
    if rounds < 1:
        return 0.0
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent  # Opacus only where DP is on
    from opacus.accountants.rdp import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=rounds, orders=orders)
    epsilon, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(epsilon)
