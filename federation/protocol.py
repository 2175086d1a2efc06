"""What the Flower server and every site must agree on: the run's config and which weights travel.

Both apps (``rwft.server.app`` and ``rwft.clients.app``) import this module, so the two
sides cannot drift apart.

- **The config travels once per run**, as the resolved YAML text in Flower's run config
  (``RUN_CONFIG_KEY``). Every site rebuilds exactly the model and training settings the
  server chose from it and replaces only what is its own: where its data is.
- **Who a site is**: a pseudonymous label its operator chooses (``SITE_LABEL``), the only
  text a site ever sends.
- **Which weights travel**: every floating-point entry of the model's state dict, except
  with ``federation.local_bn=true`` (FedBN, Li et al., ICLR 2021) the BatchNorm layers'
  running statistics and affine parameters, which stay at each site. Integer buffers
  (BatchNorm's ``num_batches_tracked``) never travel: averaging a step counter means nothing.
  They travel as two flat vectors, ``weights`` and ``statistics`` (``shared_arrays``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from omegaconf import OmegaConf
from torch import nn

from rwft.core.config import RwftConfig, to_yaml, with_overrides
from rwft.core.errors import ConfigError

RUN_CONFIG_KEY = "rwft-config"  # the resolved RwftConfig as YAML text
NUM_CLASSES_KEY = "num-classes"  # so that every site builds the same head
FEDERATION_ID_KEY = "federation-id"  # stable across resumed runs: sites key their local weights by it
RESUME_KEY = "resume"  # the ServerApp continues the federation in cfg.output_dir instead of starting one
RECEIVED_PREFIX = "received-"  # train-reply metrics of the global model a site received, before training
WEIGHTS_KEY = "weights"  # flat float32 vector of every travelling weight (see shared_arrays)
STATISTICS_KEY = "statistics"  # flat float32 vector of BatchNorm running statistics, when they travel
STATISTICS_SUFFIXES = ("running_mean", "running_var")  # torch's names for BatchNorm statistics


# A site's label is shown to the whole federation: a short pseudonym, never a path or a file name.
SITE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


def check_site_label(label: str) -> str:
    """``label`` if it is a valid pseudonymous site label, else ``ConfigError`` saying why."""
    if not SITE_LABEL.match(label):
        raise ConfigError(f"site label {label!r} is not allowed: the federation sees it, so it must be a "
                          "short pseudonym (1-32 letters, digits, '.', '_' or '-', starting with a letter "
                          "or digit), never a path or a file name. Example: --site hospitalA.")
    return label


def run_config_for(cfg: RwftConfig, *, num_classes: int, federation_id: str,
                   resume: bool) -> dict[str, str | int | bool]:
    """The Flower run config that carries ``cfg`` to the ServerApp and every ClientApp."""
    return {RUN_CONFIG_KEY: to_yaml(cfg), NUM_CLASSES_KEY: num_classes,
            FEDERATION_ID_KEY: federation_id, RESUME_KEY: resume}


def config_from_run(run_config: Mapping[str, object], replace: Mapping[str, Any] | None = None) -> RwftConfig:
    """The ``RwftConfig`` a run carries, with ``replace`` (dotted key -> value) applied last.

    A site replaces what is its own (``data.root``, ``data.cache_dir``); values are set
    as given, never parsed, so a path with spaces or colons stays a path. Raises
    ``ConfigError`` when the run was not started by rwft (no ``rwft-config`` key).
    """
    text = run_config.get(RUN_CONFIG_KEY)
    if not isinstance(text, str) or not text:
        raise ConfigError(f"this Flower run carries no {RUN_CONFIG_KEY!r}: start federations with "
                          "`rwft-server start` or `rwft simulate`, not a bare `flwr run`.")
    raw = OmegaConf.create(text)
    for key, value in (replace or {}).items():
        OmegaConf.update(raw, key, value, merge=False)
    return with_overrides(raw, [])  # type: ignore[arg-type]


def local_keys(model: nn.Module, local_bn: bool) -> frozenset[str]:
    """State-dict keys that never leave the site (see the module docstring)."""
    keys = {name for name, value in model.state_dict().items() if not value.is_floating_point()}
    if local_bn:
        for module_name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                prefix = f"{module_name}." if module_name else ""
                keys.update(prefix + name for name, _ in module.named_parameters(recurse=False))
                keys.update(prefix + name for name, _ in module.named_buffers(recurse=False))
    return frozenset(keys)


def layout(model: nn.Module, local_bn: bool) -> dict[str, list[str]]:
    """Which state-dict keys travel in which flat array, in state-dict order."""
    keep = local_keys(model, local_bn)
    travelling = [name for name in model.state_dict() if name not in keep]
    groups = {WEIGHTS_KEY: [n for n in travelling if not n.endswith(STATISTICS_SUFFIXES)],
              STATISTICS_KEY: [n for n in travelling if n.endswith(STATISTICS_SUFFIXES)]}
    return {key: names for key, names in groups.items() if names}


def shared_arrays(model: nn.Module, local_bn: bool) -> ArrayRecord:
    """The weights that travel, as float32 vectors: ``weights`` and (unless kept local) ``statistics``.

    One flat vector per group rather than one array per tensor: Flower moves every array
    as its own HTTP object, and 247 round trips per message (EfficientNet-Lite0) cost
    seconds each way. Flower's strategies all work coordinate by coordinate or on whole
    update vectors (FedAvg, FedProx, FedAdam, FedYogi, FedMedian, FedTrimmedAvg, Krum),
    so they aggregate the vectors exactly as they would the tensors.
    """
    state = model.state_dict()
    return ArrayRecord({key: Array(torch.cat([state[name].detach().reshape(-1).float().cpu() for name in names])
                                   .numpy())
                        for key, names in layout(model, local_bn).items()})


def load_shared(model: nn.Module, arrays: ArrayRecord, local_bn: bool) -> None:
    """Copy the vectors of ``shared_arrays`` back into ``model``'s tensors.

    Raises ``ValueError`` when the vectors do not fit the model: the two sides built
    different models, which must never be averaged silently.
    """
    state = model.state_dict()
    groups = layout(model, local_bn)
    if set(arrays.keys()) != set(groups):
        raise ValueError(f"received arrays {sorted(arrays.keys())}, this model expects {sorted(groups)}: "
                         "the server and this site configured different models (or federation.local_bn).")
    with torch.no_grad():
        for key, names in groups.items():
            vector = torch.from_numpy(np.asarray(arrays[key].numpy()))
            sizes = [state[name].numel() for name in names]
            if vector.numel() != sum(sizes):
                raise ValueError(f"received {key} has {vector.numel()} values, this model {sum(sizes)}: the "
                                 "server and this site built different models.")
            for name, part in zip(names, torch.split(vector, sizes), strict=True):
                state[name].copy_(part.view_as(state[name]))


def local_state(model: nn.Module, local_bn: bool) -> dict[str, torch.Tensor]:
    """The entries that stay at the site (with FedBN what a site keeps between rounds)."""
    keep = local_keys(model, local_bn)
    return {name: value.detach().cpu().clone() for name, value in model.state_dict().items() if name in keep}


def update_norm(before: ArrayRecord, after: ArrayRecord) -> float:
    """L2 norm of a site's weight update, ``after - before`` (BatchNorm statistics are no update)."""
    delta = after[WEIGHTS_KEY].numpy().astype(np.float64) - before[WEIGHTS_KEY].numpy().astype(np.float64)
    return math.sqrt(float(np.dot(delta, delta)))
