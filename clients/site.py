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
layers, held in the node's Flower state and, so that a resumed federation finds them
again, in ``work-dir``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import lru_cache
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
        if not self.cfg.federation.local_bn:
            return
        kept = local_state(self.model, local_bn=True)
        context.state[LOCAL_WEIGHTS_KEY] = ArrayRecord(kept)
        atomic_write_bytes(self._kept_file(), lambda handle: torch.save(kept, handle))

    def logger(self) -> RunLogger:
        """This site's own TensorBoard log (``work_dir/tb``); it stays at the site."""
        if self._logger is None:
            self._logger = RunLogger(self.work_dir / "tb")
        return self._logger

    def _kept_weights(self, context: Context) -> dict[str, torch.Tensor] | None:
        if not self.cfg.federation.local_bn:
            return None
        if LOCAL_WEIGHTS_KEY in context.state:
            return context.state[LOCAL_WEIGHTS_KEY].to_torch_state_dict()  # type: ignore[union-attr]
        file = self._kept_file()
        if file.is_file():  # a resumed federation: a new Flower run, the same federation id
            return torch.load(file, map_location="cpu", weights_only=True)
        return None

    def _kept_file(self) -> Path:
        return self.work_dir / "local-weights" / f"{self.federation_id}.pt"


def site_for(context: Context) -> Site:
    """The ``Site`` of this node in this run (cached per process)."""
    node = dict(context.node_config)
    run = dict(context.run_config)
    return _cached_site(tuple(sorted(node.items())), tuple(sorted(run.items())))


@lru_cache(maxsize=4)
def _cached_site(node_items: tuple, run_items: tuple) -> Site:
    node: Mapping[str, object] = dict(node_items)
    run: Mapping[str, object] = dict(run_items)
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
