"""The one config schema every entry point speaks (OmegaConf structured dataclasses).

Experiment YAML files hold only what differs from these defaults; ``key=value``
overrides come last. Unknown keys and wrong types are errors that name the key. The
resolved config is saved as ``config.yaml`` in the run directory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rwft.core.errors import ConfigError

__all__ = ["MISSING", "RwftConfig", "load_config", "save_config", "to_container"]


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"  # registry name, timm name, or family/arch
    pretrained: bool = True  # false = same architecture, random init ("scratch")
    weights: str | None = None  # local weights file instead of the hub/package default
    adapter: str = "replicate"  # grayscale -> 3 channels: replicate | conv1x1 | weightsum
    mode: str = "full"  # full (fine-tune everything) | probe (frozen backbone, train the head)
    dropout: float = 0.2
    batchnorm: str = "train"  # train | frozen (ImageNet statistics kept, affine fixed; needed by train.dp/federation.dp)


@dataclass
class DataConfig:
    dataset: str = "medmnist"  # medmnist | chest_xray | a plugin's dataset
    root: str | None = None  # file or folder; else $RWFT_DATA_DIR; else the dataset's downloader
    image_size: int = 64
    val_fraction: float = 0.1  # carved from train (stratified) when the official val is tiny
    augment: bool = True
    on_bad_file: str = "error"  # error | skip (skipped files are reported)
    cache_dir: str | None = None  # decoded-image cache; default ~/.cache/rwft
    max_train_images: int | None = None  # stratified subsample for quick runs


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "onecycle"  # onecycle | constant
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    bootstrap: int = 1000  # resamples for the 95% confidence intervals
    max_steps_per_epoch: int | None = None  # cap for smoke runs and benchmarks
    num_threads: int | None = None  # torch CPU threads; None = torch's default
    dp: DPConfig = field(default_factory=lambda: DPConfig())  # sample-level DP-SGD of `rwft train` (Opacus)


@dataclass
class FederationConfig:
    rounds: int = 3
    local_epochs: int = 1
    strategy: str = "fedavg"
    min_sites: int = 2
    fraction: float = 1.0  # fraction of sites sampled for training each round
    local_bn: bool = False  # FedBN: BatchNorm statistics and affine parameters stay at each site
    proximal_mu: float = 0.01  # FedProx's proximal-term weight (used by strategy=fedprox)
    server_lr: float = 0.001  # server step of fedadam/fedyogi: Adam moves every weight by about this much per round
    trimmed_beta: float = 0.2  # fraction trimmed at each end by fedtrimmedavg
    krum_byzantine: int = 0  # sites Krum assumes may be malicious
    address: str = "127.0.0.1:9092"  # host:port the SuperLink serves (sites, flwr CLI); 0.0.0.0:PORT for remote sites
    certificates: str | None = None  # folder with ca.crt, server.crt, server.key (rwft-server certs): TLS
    site_keys: str | None = None  # folder of admitted sites' NAME.pub (rwft-client keygen); needs certificates
    wait_timeout_s: float = 600.0  # how long the server waits for min_sites before giving up
    server_eval: bool = True  # evaluate the global model on a server-side held-out set
    round_timeout_s: float = 3600.0  # a round goes on with the replies it has after this long
    sites: int = 3  # rwft simulate: how many hospitals to simulate
    partition: str = "iid"  # rwft simulate: iid | dirichlet:ALPHA | quantity:ALPHA (rwft.core.partition)
    dp: DPConfig = field(default_factory=lambda: DPConfig())  # sample-level DP-SGD at every site (Opacus)
    server_dp: ServerDPConfig = field(default_factory=lambda: ServerDPConfig())  # user-level DP (strategy=dp-fedavg)
    update_checks: UpdateChecksConfig = field(default_factory=lambda: UpdateChecksConfig())
    attack: AttackConfig = field(default_factory=lambda: AttackConfig())  # simulated adversarial sites


@dataclass
class RwftConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    seed: int = 0
    output_dir: str = "runs/latest"  # the run directory


_CHOICES = {
    "model.mode": ("full", "probe"),
    "data.on_bad_file": ("error", "skip"),
    "train.schedule": ("onecycle", "constant"),
    "train.precision": ("auto", "fp32", "bf16"),
    "model.batchnorm": ("train", "frozen"),
    "train.dp.accountant": ("prv", "rdp"),
    "federation.dp.accountant": ("prv", "rdp"),
    "federation.attack.kind": ("none", "nan", "scale", "signflip", "noise", "labelflip"),
}


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
) -> RwftConfig:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides.

    Returns a typed, read-only view (an OmegaConf structured config that behaves like
    ``RwftConfig``). Raises ``ConfigError`` naming the file or override at fault.
    """
    schema = OmegaConf.structured(RwftConfig)
    layers: list[Any] = [schema]
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist. Pass the path of a YAML file "
                              "(see examples/*.yaml).")
        try:
            layers.append(OmegaConf.load(file))
        except Exception as exc:
            raise ConfigError(f"config file {file} is not valid YAML: {exc}") from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value "
                              "(for example train.epochs=5).")
    try:
        merged = OmegaConf.merge(*layers)
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        where = f"in {path} or the overrides" if path else "in the overrides"
        raise ConfigError(f"invalid config {where}: {_short(exc)}. Run `rwft config` to see "
                          "every key with its default and type.") from exc
    _check_choices(merged)
    OmegaConf.set_readonly(merged, True)
    return merged  # type: ignore[return-value]


def _short(exc: OmegaConfBaseException) -> str:
    return str(exc).strip().splitlines()[0] + (f" (key: {exc.full_key})" if getattr(exc, "full_key", None) else "")


def _check_choices(cfg: DictConfig) -> None:
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}.")
    for key in ("data.image_size", "train.epochs", "train.batch_size", "federation.rounds",
                "federation.local_epochs", "federation.min_sites"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {OmegaConf.select(cfg, key)}.")
    if not 0.0 < cfg.federation.fraction <= 1.0:
        raise ConfigError(f"federation.fraction must be in (0, 1], got {cfg.federation.fraction}.")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}.")


def to_container(cfg: RwftConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: RwftConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: RwftConfig, run_dir: str | os.PathLike[str]) -> Path:
    """Write the resolved config next to the results (``RUN_DIR/config.yaml``)."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_yaml(cfg))
    return out


def with_overrides(cfg: RwftConfig, overrides: Sequence[str]) -> RwftConfig:
    """A copy of ``cfg`` with ``key=value`` overrides applied and re-validated."""
    base = OmegaConf.structured(RwftConfig)
    merged = OmegaConf.merge(base, cfg)
    if overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"invalid override: {_short(exc)}") from exc
    _check_choices(merged)
    OmegaConf.set_readonly(merged, True)
    return merged  # type: ignore[return-value]


# Privacy and trust settings (rwft.core.privacy, rwft.federation.update_checks, rwft.federation.attacks).


@dataclass
class DPConfig:
    """Sample-level differential privacy: DP-SGD (Opacus) on one training set (a site's, or rwft train's).

    Give ``noise_multiplier``, or ``target_epsilon`` and the noise is chosen so that the
    planned training spends exactly that budget; with both, the noise is as given and
    ``target_epsilon`` is a cap. Training that would spend more than ``target_epsilon``
    stops with ``PrivacyBudgetExhausted``. Needs ``model.batchnorm=frozen``.
    """

    enabled: bool = False
    noise_multiplier: float | None = None  # sigma: Gaussian noise std / max_grad_norm
    target_epsilon: float | None = None  # the (epsilon, delta) budget of the whole run
    delta: float = 1e-5  # must be below 1/N (N training images)
    max_grad_norm: float = 1.0  # each example's gradient is clipped to this L2 norm
    accountant: str = "prv"  # prv (tighter) | rdp


@dataclass
class ServerDPConfig:
    """User-level DP at the server (strategy ``dp-fedavg``): each site's update clipped, Gaussian noise added."""

    noise_multiplier: float = 1.0  # noise std / clipping_norm, on the sum of the sampled sites' updates
    clipping_norm: float = 1.0  # each site's update of the shared weights is clipped to this L2 norm
    delta: float = 1e-5


@dataclass
class UpdateChecksConfig:
    """Every training reply is checked before aggregation (``rwft.federation.update_checks``)."""

    enabled: bool = True
    # An update norm above max(median + norm_mad_k * MAD, norm_min_ratio * median) of the
    # round's updates is rejected (needs at least 3 replies; MAD scaled to a normal's std).
    norm_mad_k: float = 6.0
    norm_min_ratio: float = 3.0


@dataclass
class AttackConfig:
    """Simulated adversarial sites (``rwft simulate`` and in-process federations only)."""

    sites: list[str] = field(default_factory=list)  # labels of the attacking sites, e.g. [site-0]
    kind: str = "none"  # none | nan | scale | signflip | noise | labelflip
    factor: float = 10.0  # scale: update times factor; signflip: -factor; noise: std = factor * update norm
