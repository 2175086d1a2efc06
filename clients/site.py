"""One site's side of a federated run: its config, its data, its model and what it keeps.

``site_for(context)`` resolves a Flower ``Context`` into a ``Site``:

- **Deployment** (``rwft-client join``): the node config holds ``site`` (the pseudonymous
  label the federation sees), ``data-dir`` (the site's X-rays: a chest_xray folder or a
  MedMNIST npz), optionally ``dataset`` and ``work-dir`` (this site's TensorBoard logs and
  FedBN weights; they never leave it).
- **Simulation** (``rwft simulate``): Flower gives each virtual node ``partition-id`` and
  ``num-partitions``. The run's own dataset (``data.root`` on this machine) is loaded, its
  train split is cut into sites with ``federation.partition`` and the run seed
  (``rwft.core.partition``), and every site carves its validation split out of its part,
  as a hospital would.

Sites are cached per process, keyed by everything that determines them: the warm worker
(``rwft.clients.worker``) and Flower's simulation actors serve every round from one
process, so a round starts without loading data or building a model. The model is reset
to its freshly built weights before each message, so nothing carries over between rounds
or runs except what a site keeps on purpose: with ``federation.local_bn`` its BatchNorm
layers, and whatever the strategy's site half keeps between rounds
(``rwft.core.site_algorithm``, FedDyn's gradient correction), each held in the node's
Flower state and, so that a resumed federation finds it again, in ``work-dir``. A site
evicted from the cache closes its TensorBoard writer.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context

from rwft.core.checkpoint import atomic_write_bytes
from rwft.core.config import RwftConfig
from rwft.core.data import DatasetSplits, ImageSplit, load_splits, stratified_split
from rwft.core.engine import select_device
from rwft.core.errors import ConfigError, DataError
from rwft.core.model import RwftModel, build_model
from rwft.core.partition import partition_indices
from rwft.core.shift import shift_images, site_shifts
from rwft.core.tblog import RunLogger
from rwft.federation.protocol import (
    FEDERATION_ID_KEY,
    NUM_CLASSES_KEY,
    check_site_label,
    config_from_run,
    load_shared,
    local_state,
)

LOCAL_WEIGHTS_KEY = "rwft-local-weights"  # in the node's Flower state (context.state)
STRATEGY_STATE_KEY = "rwft-strategy-state"  # what the strategy's site half keeps, likewise
CACHED_SITES = 4  # sites (of different runs or nodes) one process keeps warm


def dataset_for_path(path: str) -> str:
    """The dataset that reads ``path``: an ``.npz`` file is ``medmnist``, a folder ``chest_xray``."""
    return "medmnist" if path.endswith(".npz") else "chest_xray"


@dataclasses.dataclass
class Site:
    """A site's resolved config, data and model (see the module docstring)."""

    label: str
    cfg: RwftConfig
    splits: DatasetSplits
    work_dir: Path
    federation_id: str
    model: RwftModel
    initial_state: dict[str, torch.Tensor]
    device: torch.device
    _logger: RunLogger | None = None

    def model_for_round(self, context: Context, arrays: ArrayRecord) -> RwftModel:
        """The model reset to its built weights, then the site's kept weights, then ``arrays``."""
        self.model.load_state_dict(self.initial_state)
        kept = self._kept_weights(context)
        if kept is not None:
            self.model.load_state_dict(kept, strict=False)
        load_shared(self.model, arrays, self.cfg.federation.local_bn)
        return self.model

    def keep_local_weights(self, context: Context) -> None:
        """Store what stays at the site (FedBN's layers) in the node state and in ``work_dir``."""
        if self.cfg.federation.local_bn:
            self._keep(context, LOCAL_WEIGHTS_KEY, self._kept_file("local-weights"),
                       local_state(self.model, local_bn=True))

    def strategy_state(self, context: Context) -> dict[str, torch.Tensor]:
        """What the strategy's site half kept after this site's last round (empty before the first)."""
        return self._kept(context, STRATEGY_STATE_KEY, self._kept_file("strategy-state")) or {}

    def keep_strategy_state(self, context: Context, state: dict[str, torch.Tensor]) -> None:
        if state:
            self._keep(context, STRATEGY_STATE_KEY, self._kept_file("strategy-state"), state)

    def logger(self) -> RunLogger:
        """This site's own TensorBoard log (``work_dir/tb``), opened on first use; it stays at the site."""
        if self._logger is None:
            self._logger = RunLogger(self.work_dir / "tb")
        return self._logger

    def close(self) -> None:
        """Close the TensorBoard writer (a later ``logger()`` opens it again)."""
        if self._logger is not None:
            self._logger.close()
            self._logger = None

    def _kept_weights(self, context: Context) -> dict[str, torch.Tensor] | None:
        if not self.cfg.federation.local_bn:
            return None
        return self._kept(context, LOCAL_WEIGHTS_KEY, self._kept_file("local-weights"))

    @staticmethod
    def _keep(context: Context, key: str, file: Path, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {name: value.detach().cpu() for name, value in tensors.items()}
        context.state[key] = ArrayRecord(tensors)
        atomic_write_bytes(file, lambda handle: torch.save(tensors, handle))

    @staticmethod
    def _kept(context: Context, key: str, file: Path) -> dict[str, torch.Tensor] | None:
        if key in context.state:
            return context.state[key].to_torch_state_dict()  # type: ignore[union-attr]
        if file.is_file():  # a resumed federation: a new Flower run, the same federation id
            return torch.load(file, map_location="cpu", weights_only=True)
        return None

    def _kept_file(self, kind: str) -> Path:
        return self.work_dir / kind / f"{self.federation_id}.pt"


_SITES: OrderedDict[tuple, Site] = OrderedDict()  # least recently used first


def site_for(context: Context) -> Site:
    """The ``Site`` of this node in this run, cached per process (``CACHED_SITES``, least recently used out)."""
    node = dict(context.node_config)
    run = dict(context.run_config)
    key = (tuple(sorted(node.items())), tuple(sorted(run.items())))
    site = _SITES.pop(key, None) or _build_site(node, run)
    _SITES[key] = site
    while len(_SITES) > CACHED_SITES:
        _, evicted = _SITES.popitem(last=False)
        evicted.close()
    return site


def _build_site(node: Mapping[str, object], run: Mapping[str, object]) -> Site:
    if "partition-id" in node:
        label, cfg, splits = _simulated_site(node, run)
        work_dir = Path(cfg.output_dir) / "sites" / label
    elif "data-dir" in node:
        label, cfg, splits = _deployed_site(node, run)
        work_dir = Path(str(node.get("work-dir") or f"rwft-site-{label}"))
    else:
        raise ConfigError("this SuperNode has no site data: start it with `rwft-client join --site NAME "
                          "--data PATH`, or run `rwft simulate`.")
    num_classes = int(run.get(NUM_CLASSES_KEY, 2))  # type: ignore[call-overload]
    if splits.num_classes != num_classes:
        raise DataError(f"site {label} has {splits.num_classes} classes ({', '.join(splits.class_names)}) but "
                        f"the federation trains a {num_classes}-class model.")
    if len(splits.train) == 0:
        raise DataError(f"site {label} has no training images.")
    model = build_model(cfg.model, num_classes)
    initial_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return Site(label, cfg, splits, work_dir, str(run.get(FEDERATION_ID_KEY, "default")), model,
                initial_state, select_device(cfg.train))


def _deployed_site(node: Mapping[str, object], run: Mapping[str, object]) -> tuple[str, RwftConfig, DatasetSplits]:
    label = check_site_label(str(node.get("site", "")))
    data_dir = str(node["data-dir"])
    dataset = str(node.get("dataset") or dataset_for_path(data_dir))
    # The run decides the model and training; where the data is and how it is cached is the site's.
    cfg = config_from_run(run, {"data.root": data_dir, "data.dataset": dataset,
                                "data.cache_dir": node.get("cache-dir") or None})
    return label, cfg, load_splits(cfg, site=True)


def _simulated_site(node: Mapping[str, object], run: Mapping[str, object]) -> tuple[str, RwftConfig, DatasetSplits]:
    site, num_sites = int(node["partition-id"]), int(node["num-partitions"])  # type: ignore[call-overload]
    cfg = config_from_run(run)
    whole = load_splits(cfg)
    part = whole.train.subset(partition_indices(whole.train.labels, num_sites, cfg.federation.partition,
                                                cfg.seed)[site])
    # federation.site_shifts: this simulated hospital's scanner differs (rwft.core.shift); train and val alike.
    scanner = site_shifts(cfg.federation.site_shifts, num_sites)[site]
    part = ImageSplit(shift_images(part.images, scanner, cfg.seed + site), part.labels)
    keep, held_out = stratified_split(part.labels, cfg.data.val_fraction, cfg.seed)
    splits = dataclasses.replace(whole, train=part.subset(keep), val=part.subset(held_out),
                                 test=ImageSplit.empty(cfg.data.image_size),
                                 source=f"{whole.source}, simulated site {site} of {num_sites}")
    return f"site-{site}", cfg, splits
