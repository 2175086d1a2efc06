"""The one config schema every entry point speaks (OmegaConf structured dataclasses).

Experiment YAML files hold only what differs from these defaults; ``key=value``
overrides come last. Unknown keys and wrong types are errors that name the key. The
resolved config is saved as ``config.yaml`` in the run directory.
"""

from __future__ import annotations

import os
import sys
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
    batchnorm: str = "train"  # train | frozen (ImageNet statistics and affine kept, timm freeze_batch_norm_2d; DP needs it)


@dataclass
class DicomConfig:
    windowing: str = "auto"  # auto: the file's VOI LUT or window when present | none: the full modality range


@dataclass
class AugmentConfig:
    """Per-image training augmentation (``rwft.core.augment``); the defaults are rwft's original light warp."""

    rotation: float = 7.0  # largest rotation, degrees either way
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])  # zoom factor range (>1 zooms in)
    translate: float = 0.06  # largest shift, fraction of the image side
    crop_scale: list[float] | None = None  # [min, max] area kept by a random resized crop; replaces scale/translate
    brightness: float = 0.1  # intensity multiplied by a factor in [1 - b, 1 + b]
    contrast: float = 0.1  # distance from the image mean scaled by a factor in [1 - c, 1 + c]
    gamma: float = 0.0  # pixel ** g, g log-uniform in [1/(1 + gamma), 1 + gamma]; 0 = off
    hflip: float = 0.0  # probability of a horizontal flip; 0 by default: a mirrored chest is not a real film


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
    positive_class: str | None = None  # the class sensitivity/AUROC are about; default: rwft.core.classes' rule
    class_map: dict[str, str] = field(default_factory=dict)  # rename the data's classes: FOLDER=CLASS
    medmnist_size: int = 28  # medmnist without data.root: 28 = the copy shipped with rwft; 64/128/224 download (medmnist extra)
    labels_csv: str | None = None  # dicom: CSV of file,label for a flat PACS export (paths relative to data.root)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)  # what data.augment=true does


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
    # The training recipe (rwft.core.recipe); every default keeps the plain AdamW loop.
    lp_epochs: int = 0  # LP-FT: first train only the head for this many epochs (linear probe), then everything
    ft_lr_scale: float = 0.1  # LP-FT: the full fine-tuning stage runs at lr * ft_lr_scale
    layer_decay: float = 1.0  # layer-wise lr decay: a layer k below the head trains at lr * layer_decay**k; 1 = off
    ema_decay: float = 0.0  # EMA of the weights (timm ModelEmaV3); validation and checkpoints use it; 0 = off
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    class_balance: str = "none"  # none | weights (class-weighted loss, sklearn "balanced") | sampler (balanced batches)
    warmup_epochs: float = 0.0  # linear lr warm-up (cosine/constant); onecycle: its rising phase (default 15%)
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
    round_timeout_s: float = 900.0  # a round goes on with the replies it has after this long (a dead site costs at most this)
    sites: int = 3  # rwft simulate: how many hospitals to simulate
    partition: str = "iid"  # rwft simulate: iid | dirichlet:ALPHA | quantity:ALPHA (rwft.core.partition)
    site_shifts: list[str] = field(default_factory=list)  # rwft simulate: per site a scanner shift (rwft.core.shift), "" = none
    feddyn_alpha: float = 0.01  # FedDyn's regularisation weight (used by strategy=feddyn)
    update_checks: UpdateChecksConfig = field(default_factory=lambda: UpdateChecksConfig())
    attack: AttackConfig = field(default_factory=lambda: AttackConfig())  # simulated adversarial sites
    dp: DPConfig = field(default_factory=lambda: DPConfig())  # sample-level DP-SGD at every site (Opacus)
    server_dp: ServerDPConfig = field(default_factory=lambda: ServerDPConfig())  # user-level DP (strategy=dp-fedavg)


@dataclass
class EvalConfig:
    """How validation turns into a decision and test numbers (``rwft.core.thresholds``, ``rwft.core.testtime``)."""

    threshold: str = "youden"  # youden | sensitivity:T | specificity:T (target reached on validation)
    calibration: str = "none"  # none | temperature (fitted on validation; reported probabilities calibrated)
    tta: int = 0  # test-time augmentation: augmented views averaged with the plain image; 0 = off
    adabn: bool = False  # also report test metrics with BatchNorm statistics re-estimated on the test images (transductive)


@dataclass
class RwftConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    seed: int = 0
    output_dir: str = "runs/latest"  # the run directory
    eval: EvalConfig = field(default_factory=EvalConfig)


_CHOICES = {
    "model.mode": ("full", "probe"),
    "data.on_bad_file": ("error", "skip"),
    "train.schedule": ("onecycle", "constant", "cosine"),
    "train.class_balance": ("none", "weights", "sampler"),
    "eval.calibration": ("none", "temperature"),
    "train.precision": ("auto", "fp32", "bf16"),
    "data.dicom.windowing": ("auto", "none"),
    "federation.attack.kind": ("none", "nan", "scale", "signflip", "noise", "labelflip"),
    "model.batchnorm": ("train", "frozen"),
    "train.dp.accountant": ("prv", "rdp"),
    "federation.dp.accountant": ("prv", "rdp"),
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
    if merged.model.mode == "probe" and not merged.model.pretrained:
        print("rwft: warning: model.mode=probe with model.pretrained=false trains a linear head on random "
              "features; set model.pretrained=true (or model.mode=full to train from scratch).", file=sys.stderr)
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
    if not cfg.train.lr > 0:
        raise ConfigError(f"train.lr must be above 0, got {cfg.train.lr} (typical: 1e-4 to 3e-3).")
    if cfg.train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay must be at least 0, got {cfg.train.weight_decay}.")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout}.")
    for key in ("train.bootstrap", "seed"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key} must be at least 0, got {OmegaConf.select(cfg, key)}.")
    for key in ("train.max_steps_per_epoch", "train.num_threads", "data.max_train_images"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be at least 1 (or null for no limit), got {value}.")
    if cfg.federation.update_checks.norm_max_step_ratio < 1:
        # Below 1 a site's steps would be capped under the round's typical steps (0: a division by zero).
        raise ConfigError("federation.update_checks.norm_max_step_ratio must be at least 1, got "
                          f"{cfg.federation.update_checks.norm_max_step_ratio}.")
    if not 0.0 < cfg.federation.fraction <= 1.0:
        raise ConfigError(f"federation.fraction must be in (0, 1], got {cfg.federation.fraction}.")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}.")
    if cfg.train.lp_epochs > 0 and cfg.model.mode != "full":
        raise ConfigError("train.lp_epochs (LP-FT) fine-tunes the whole model after the probe stage; "
                          "it needs model.mode=full.")
    _check_recipe(cfg)
    _check_privacy(cfg)


def _check_recipe(cfg: DictConfig) -> None:
    """The evaluation policy and augmentation ranges (training keys: ``recipe.check_train_config``)."""
    from rwft.core.thresholds import parse_policy  # scikit-learn/scipy only when a config is checked

    parse_policy(cfg.eval.threshold)
    if cfg.eval.tta < 0:
        raise ConfigError(f"eval.tta must be >= 0 (0 = off), got {cfg.eval.tta}.")
    crop = cfg.data.augmentation.crop_scale
    if crop is not None and not (len(crop) == 2 and 0.0 < crop[0] <= crop[1] <= 1.0):
        raise ConfigError(f"data.augmentation.crop_scale must be [min, max] with 0 < min <= max <= 1 "
                          f"(area fractions), got {list(crop)}.")
    if not 0.0 <= cfg.data.augmentation.hflip <= 1.0:
        raise ConfigError(f"data.augmentation.hflip is a probability in [0, 1], got {cfg.data.augmentation.hflip}.")


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


def load_resumed_config(config: str | os.PathLike[str] | None, overrides: Sequence[str],
                        resume: str | os.PathLike[str] | None) -> RwftConfig:
    """The config of a new run (``config`` + ``overrides``), or of the run in the directory ``resume``.

    A resumed run (``rwft train --resume``, ``rwft-server start --resume``, ``rwft simulate
    --resume``) starts from the ``config.yaml`` it saved (or ``config`` if given), then the
    overrides (``train.epochs=N``, ``federation.rounds=N`` let it go on longer), in its own
    directory.
    """
    if resume is None:
        return load_config(config, overrides)
    saved = Path(resume) / "config.yaml"
    if config is None and not saved.is_file():
        raise ConfigError(f"{resume} has no config.yaml: pass the run directory of an rwft run to resume.")
    return load_config(config or saved, [*overrides, f"output_dir={resume}"])


# Trust settings (rwft.federation.update_checks, rwft.federation.attacks).


@dataclass
class UpdateChecksConfig:
    """Every training reply is checked before aggregation (``rwft.federation.update_checks``)."""

    enabled: bool = True
    # An update norm above max(median + norm_mad_k * MAD, norm_min_ratio * median) of the
    # round's updates is rejected (needs at least 3 replies; MAD scaled to a normal's std).
    norm_mad_k: float = 6.0
    norm_min_ratio: float = 3.0
    # Norms are compared per local step (norm / sqrt(steps / the round's median steps)): a site
    # with more images is not an outlier. A site's steps count at most this times the median.
    norm_max_step_ratio: float = 100.0


@dataclass
class AttackConfig:
    """Simulated adversarial sites (``rwft simulate`` and in-process federations only)."""

    sites: list[str] = field(default_factory=list)  # labels of the attacking sites, e.g. [site-0]
    kind: str = "none"  # none | nan | scale | signflip | noise | labelflip
    factor: float = 10.0  # scale: update times factor; signflip: -factor; noise: std = factor * update norm


# Differential privacy (rwft.core.privacy, rwft.federation.privacy, rwft.plugins.strategies_dp).


@dataclass
class DPConfig:
    """Sample-level differential privacy: DP-SGD (Opacus) on one training set (a site's, or ``rwft train``'s).

    Give ``noise_multiplier``, or ``target_epsilon`` and the noise is chosen so that the
    planned training (all epochs; for a site, every round) spends exactly that budget; with
    both, the noise is as given and ``target_epsilon`` is a cap. Training that would spend
    more than ``target_epsilon`` stops with ``PrivacyBudgetExhausted``. Needs
    ``model.batchnorm=frozen``.
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

    noise_multiplier: float = 1.0  # noise std / clipping_norm, on the sum of the aggregated sites' updates
    clipping_norm: float = 1.0  # each site's update of the shared weights is clipped to this L2 norm
    delta: float = 1e-5


def _check_privacy(cfg: DictConfig) -> None:
    """DP settings that cannot work, named by key (checked at load, so a federation fails before it starts)."""
    for key in ("train.dp", "federation.dp"):
        dp = OmegaConf.select(cfg, key)
        if not dp.enabled:
            continue
        if dp.noise_multiplier is None and dp.target_epsilon is None:
            raise ConfigError(f"{key}.enabled=true needs {key}.noise_multiplier (e.g. 1.0) or {key}.target_epsilon "
                              "(e.g. 3.0, the budget the whole run may spend).")
        for name in ("noise_multiplier", "target_epsilon", "max_grad_norm"):
            value = dp[name]
            if value is not None and not value > 0:
                raise ConfigError(f"{key}.{name} must be above 0, got {value}.")
        if not 0.0 < dp.delta < 1.0:
            raise ConfigError(f"{key}.delta must be in (0, 1) and below 1/N for N training images, got {dp.delta}.")
        if cfg.model.batchnorm != "frozen":
            raise ConfigError(f"{key}.enabled=true needs model.batchnorm=frozen: BatchNorm's batch statistics mix "
                              "the examples of a batch, so per-example gradients cannot be bounded (frozen keeps "
                              "the ImageNet statistics).")
        if cfg.train.class_balance != "none":
            raise ConfigError(f"{key} needs train.class_balance=none: a class-weighted loss or a resampled epoch "
                              "couples examples, which the DP-SGD analysis (Poisson sampling, per-example "
                              "clipping) does not allow.")
    server_dp = cfg.federation.server_dp
    if not (server_dp.noise_multiplier > 0 and server_dp.clipping_norm > 0 and 0.0 < server_dp.delta < 1.0):
        raise ConfigError("federation.server_dp.noise_multiplier and clipping_norm must be above 0 and "
                          f"delta in (0, 1); got {server_dp.noise_multiplier}, {server_dp.clipping_norm}, "
                          f"{server_dp.delta}.")
