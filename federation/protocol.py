"""What the Flower server and every site must agree on: the run's config, the messages, which weights travel.

Both apps (``rwft.server.app`` and ``rwft.clients.app``) import this module, so the two
sides cannot drift apart. Every key of every message is defined here and nowhere else.

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
- **The messages** (``Instruction``, ``TrainReply``, ``EvaluateReply``, each with
  ``to_record``/``from_record``). The server's instructions are what Flower's strategies
  build (``configure_train``/``configure_evaluate``): the global weights under ``arrays``
  and a ``config`` record with ``server-round`` and whatever the strategy tells its sites
  (FedProx's ``proximal-mu``). A site replies with the weights that travel, one
  ``MetricRecord`` of numbers and its label.

**The scores a site reports, one vocabulary.** A site scores a model on its own
validation split with ``SCORE_NAMES`` (``rwft.core.metrics.METRIC_NAMES`` and the
cross-entropy ``loss``). Which model it scored is the *scope*, and the same scope names
are used in the messages (``"<scope>/<score>"``), in ``metrics.json`` and in every
TensorBoard log, the server's and the sites':

- ``global_val``: the global model as the site received it (in a training reply: the
  previous round's global model; in an evaluation reply: the final one);
- ``local_val``: the site's model after its local training this round;
- ``train``: the site's local training itself (``train/loss``, ``train/steps``).

``num-examples`` (Flower's aggregation weight) is the number of training images in a
training reply and of validation images in an evaluation reply; ``val-num-examples``
is always the number of validation images, the weight of a site's scores when the
server averages them over the sites (``mean_scores``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from omegaconf import OmegaConf
from torch import nn

from rwft.core.config import RwftConfig, to_yaml, with_overrides
from rwft.core.errors import ConfigError
from rwft.core.metrics import METRIC_NAMES

RUN_CONFIG_KEY = "rwft-config"  # the resolved RwftConfig as YAML text
NUM_CLASSES_KEY = "num-classes"  # so that every site builds the same head
FEDERATION_ID_KEY = "federation-id"  # stable across resumed runs: sites key their local weights by it
RESUME_KEY = "resume"  # the ServerApp continues the federation in cfg.output_dir instead of starting one
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
    # Buffers that are no parameter, such as a frozen BatchNorm's fixed affine weights
    # (model.batchnorm=frozen), are never trained: they travel with the statistics, so that
    # server-side DP noise and server optimisers touch only what training changes.
    parameters = {name for name, _ in model.named_parameters()}
    fixed = {n for n in travelling if n.endswith(STATISTICS_SUFFIXES) or n not in parameters}
    groups = {WEIGHTS_KEY: [n for n in travelling if n not in fixed],
              STATISTICS_KEY: [n for n in travelling if n in fixed]}
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


# --- The messages --------------------------------------------------------------------------

ARRAYS_KEY = "arrays"  # the ArrayRecord of weights (Flower strategies' default ``arrayrecord_key``)
CONFIG_KEY = "config"  # the instruction's ConfigRecord (Flower strategies' default ``configrecord_key``)
METRICS_KEY = "metrics"  # a reply's one MetricRecord (Flower aggregates exactly one)
SITE_KEY = "site"  # a reply's ConfigRecord holding the site's label, and nothing else
LABEL_KEY = "label"
SERVER_ROUND_KEY = "server-round"  # set by Flower's strategies in every instruction
NUM_EXAMPLES_KEY = "num-examples"  # Flower's aggregation weight (``weighted_by_key``)
VAL_EXAMPLES_KEY = "val-num-examples"  # the weight of a site's scores

GLOBAL_VAL = "global_val"  # scope: the global model a site received, on its validation split
LOCAL_VAL = "local_val"  # scope: the site's model after its local training, on its validation split
TRAIN = "train"  # scope: the site's local training
SCORE_NAMES: tuple[str, ...] = (*METRIC_NAMES, "loss")  # what a site reports for each scored model
TRAIN_NAMES = ("loss", "steps")  # what a site reports about its local training
# With federation.dp a site also reports, in scope ``train``, the epsilon it has spent so far
# (rwft.federation.privacy); the strategies' aggregate is the largest, the federation's worst site.
EPSILON_NAME = "dp-epsilon"

Scalar = int | float | str | bool


def score_key(scope: str, name: str) -> str:
    """The message key of score ``name`` in ``scope`` (``global_val/auroc``), also its TensorBoard tag suffix."""
    return f"{scope}/{name}"


def scores_of(scores: Mapping[str, float]) -> dict[str, float]:
    """``SCORE_NAMES`` from an evaluation's result, NaN where it has none (every reply has every key:
    Flower refuses to aggregate records whose keys differ)."""
    return {name: float(scores.get(name, math.nan)) for name in SCORE_NAMES}


@dataclass
class Instruction:
    """What the server sends a site: the global weights, the round and the strategy's values.

    Flower's strategies build it (``configure_train``/``configure_evaluate``); ``to_record``
    builds the same content (for tests and rwft's own strategies).
    """

    server_round: int
    arrays: ArrayRecord
    config: dict[str, Scalar] = field(default_factory=dict)  # every value of the config record

    def to_record(self) -> RecordDict:
        return RecordDict({ARRAYS_KEY: self.arrays,
                           CONFIG_KEY: ConfigRecord({**self.config, SERVER_ROUND_KEY: self.server_round})})

    @classmethod
    def from_record(cls, content: RecordDict) -> Instruction:
        config = dict(content.config_records[CONFIG_KEY]) if CONFIG_KEY in content.config_records else {}
        server_round = config.get(SERVER_ROUND_KEY, 0)
        if not isinstance(server_round, int):
            raise ValueError(f"the server sent {SERVER_ROUND_KEY}={server_round!r}, not a round number")
        arrays = content.array_records.get(ARRAYS_KEY)
        if arrays is None:
            raise ValueError(f"the server's message holds no {ARRAYS_KEY!r} record: it was not sent by rwft")
        return cls(server_round, arrays, config)  # type: ignore[arg-type]

    def number(self, key: str, default: float) -> float:
        """A number the strategy sent (FedProx's ``proximal-mu``); ``ValueError`` if it is something else."""
        value = self.config.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"the server sent {key}={value!r}, not a number")
        return float(value)


@dataclass
class TrainReply:
    """A site's answer to a training instruction."""

    label: str
    arrays: ArrayRecord  # the weights that travel, after local training
    num_examples: int  # training images seen per epoch (the aggregation weight)
    val_examples: int  # images in the site's validation split (the weight of its scores)
    train: dict[str, float]  # TRAIN_NAMES
    global_val: dict[str, float]  # SCORE_NAMES of the global model it received
    local_val: dict[str, float]  # SCORE_NAMES of its model after training

    def to_record(self) -> RecordDict:
        metrics: dict[str, float | int] = {NUM_EXAMPLES_KEY: self.num_examples, VAL_EXAMPLES_KEY: self.val_examples}
        for scope, values in ((TRAIN, self.train), (GLOBAL_VAL, self.global_val), (LOCAL_VAL, self.local_val)):
            metrics |= {score_key(scope, name): value for name, value in values.items()}
        return RecordDict({ARRAYS_KEY: self.arrays, METRICS_KEY: MetricRecord(metrics),
                           SITE_KEY: ConfigRecord({LABEL_KEY: self.label})})

    @classmethod
    def from_record(cls, content: RecordDict) -> TrainReply:
        metrics = _numbers(content)
        return cls(label_of(content), content.array_records.get(ARRAYS_KEY, ArrayRecord()),
                   int(metrics.get(NUM_EXAMPLES_KEY, 0)), int(metrics.get(VAL_EXAMPLES_KEY, 0)),
                   _scope(metrics, TRAIN), _scope(metrics, GLOBAL_VAL), _scope(metrics, LOCAL_VAL))


@dataclass
class EvaluateReply:
    """A site's answer to an evaluation instruction: its scores of the global model."""

    label: str
    val_examples: int
    global_val: dict[str, float]

    def to_record(self) -> RecordDict:
        metrics: dict[str, float | int] = {NUM_EXAMPLES_KEY: self.val_examples, VAL_EXAMPLES_KEY: self.val_examples}
        metrics |= {score_key(GLOBAL_VAL, name): value for name, value in self.global_val.items()}
        return RecordDict({METRICS_KEY: MetricRecord(metrics), SITE_KEY: ConfigRecord({LABEL_KEY: self.label})})

    @classmethod
    def from_record(cls, content: RecordDict) -> EvaluateReply:
        metrics = _numbers(content)
        return cls(label_of(content), int(metrics.get(VAL_EXAMPLES_KEY, 0)), _scope(metrics, GLOBAL_VAL))


def label_of(content: RecordDict) -> str:
    """The label a reply claims (unchecked: the server replaces an invalid one by the node id)."""
    site = content.config_records.get(SITE_KEY)
    return str(site.get(LABEL_KEY, "")) if site is not None else ""


def mean_scores(sites: Iterable[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """Each score averaged over ``(scores, val_examples)`` pairs, weighted by the validation images.

    A site's NaN (AUROC on a validation split with one class) is left out of that score's
    mean rather than making it NaN.
    """
    pairs = list(sites)
    mean: dict[str, float] = {}
    for name in sorted({name for scores, _ in pairs for name in scores}):
        kept = [(scores[name], weight) for scores, weight in pairs
                if name in scores and not math.isnan(scores[name]) and weight > 0]
        if kept:
            mean[name] = sum(value * weight for value, weight in kept) / sum(weight for _, weight in kept)
    return mean


def aggregate_train_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """The strategies' ``train_metrics_aggr_fn``: the ``train`` scope averaged by training images.

    Flower's default averages every key of the replies by ``num-examples``, the training
    set size, which is the wrong weight for the validation scores (the server averages
    those by ``val-num-examples``, ``mean_scores``) and showed each of them twice.
    """
    pairs = [(_scope(_numbers(record), TRAIN), float(_numbers(record).get(weighting_metric_name, 0.0)))
             for record in records]
    total = sum(weight for _, weight in pairs)
    aggregate = {**mean_scores(pairs), weighting_metric_name: total}
    epsilons = [scores[EPSILON_NAME] for scores, _ in pairs if EPSILON_NAME in scores]
    if epsilons:  # a mean of privacy budgets means nothing: the worst site's is the federation's
        aggregate[EPSILON_NAME] = max(epsilons)
    return MetricRecord(aggregate)


def _numbers(content: RecordDict) -> dict[str, float]:
    return {key: float(value) for record in content.metric_records.values() for key, value in record.items()
            if isinstance(value, (int, float))}


def _scope(metrics: Mapping[str, float], scope: str) -> dict[str, float]:
    prefix = f"{scope}/"
    return {key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)}
