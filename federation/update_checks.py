"""Every reply is checked before it is aggregated: one broken or hostile site cannot spoil a round.

Flower's strategies trust their replies: a NaN, a ×1000 update or an array of the wrong
shape goes straight into the mean (one site made the global model useless, AUROC 0.5),
and a reply with other keys or shapes than the rest makes the strategy raise, which
stopped the whole federation. ``check_replies`` sorts a round's replies into those the
strategy may aggregate and ``Rejection``\\ s, each with the reason, so that the round
aggregates the rest. A reply is rejected when:

- its weights are not the arrays the server sent (other keys, shapes or dtype), or are
  not all finite (NaN, Inf);
- its metrics are not one record of finite numbers, with a positive ``num-examples``
  (the weight of its update: zero weight everywhere would make FedAvg divide by zero),
  and the same keys as most replies of the round (Flower averages key by key);
- its update norm ``||sent - returned||`` is far above the other sites': above
  ``max(median + k * MAD, ratio * median)`` of the round's norms (``federation.update_checks``;
  MAD scaled to estimate a standard deviation, as ``scipy.stats.median_abs_deviation(scale=
  "normal")``). The rule needs at least three updates: with two, neither is the outlier.
  Only too-large updates are rejected: a small update cannot move the mean far.

  Norms are compared per local step: each is divided by ``sqrt(steps / typical steps)``
  (the site's reported ``train/steps``; typical: the round's median). An honest hospital
  with many more images takes more local steps and moves further: on real PneumoniaMNIST
  updates (28 px, one local epoch) 10x the steps gave 2.8x the norm and 20x 3.8x,
  which the raw rule (3x the median) rejected, while norm / sqrt(steps) stayed within 10 %
  across sites (``tests/test_update_checks.py``). Steps are what a site says: a site
  counts at most ``norm_max_step_ratio`` times the typical steps, so a site lying about
  its steps gains at most ``sqrt(norm_max_step_ratio)`` in allowance (10 by default; a
  x1000 update is still rejected).

A rejected site is told with the next message it gets (``tell_rejected_sites``): its
instruction's config carries ``REJECTED_ROUND_KEY`` and ``REJECTED_REASON_KEY``. The
reasons are the server's own words about the reply, never anything a site sent.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from scipy.stats import median_abs_deviation

from rwft.core.config import UpdateChecksConfig
from rwft.federation.protocol import ARRAYS_KEY, TRAIN, WEIGHTS_KEY, score_key
from rwft.federation.protocol import NUM_EXAMPLES_KEY as WEIGHT_METRIC  # the metric Flower's strategies weight by

REJECTED_ROUND_KEY = "rwft-rejected-round"  # in the next instruction's config of a rejected site
REJECTED_REASON_KEY = "rwft-rejected-reason"
MIN_REPLIES_FOR_NORM_RULE = 3
STEPS_METRIC = score_key(TRAIN, "steps")  # the local steps a site reports with its update (rwft.clients.app)


@dataclass(frozen=True)
class Rejection:
    """One reply left out of a round's aggregation, and why (JSON-ready via ``as_record``)."""

    round: int
    site: str
    node_id: int
    reason: str

    def as_record(self) -> dict[str, object]:
        return {"round": self.round, "site": self.site, "reason": self.reason}


@dataclass
class CheckedReplies:
    """``accepted``: the replies the strategy may aggregate (error replies included, which Flower
    counts and skips); ``update_l2``: each accepted training reply's update norm, by node id."""

    accepted: list[Message]
    rejected: list[Rejection] = field(default_factory=list)
    update_l2: dict[int, float] = field(default_factory=dict)


def check_replies(
    replies: Sequence[Message],
    sent: ArrayRecord | None,
    rules: UpdateChecksConfig,
    *,
    server_round: int,
    label_of: Callable[[Message], str],
) -> CheckedReplies:
    """Sort ``replies`` into accepted and rejected (see the module docstring).

    ``sent`` is the global model the round sent (``None`` for an evaluation round, whose
    replies carry only metrics). ``label_of`` names a reply's site for the log. With
    ``rules.enabled`` false only what would make aggregation itself crash or produce NaN is
    rejected (wrong keys or shapes, non-finite values, no examples): those checks are not
    optional, since nothing useful can be done with such a reply.
    """
    checked = CheckedReplies(accepted=[])
    candidates: list[Message] = []
    for reply in replies:
        if reply.has_error():
            checked.accepted.append(reply)
            continue
        reason = _content_problem(reply, sent)
        if reason:
            checked.rejected.append(_rejection(reply, server_round, label_of, reason))
        else:
            candidates.append(reply)

    usual_keys = _most_common_metric_keys(candidates)
    keyed: list[Message] = []
    for reply in candidates:
        keys = _metric_keys(reply)
        if keys != usual_keys:
            reason = (f"its metric keys differ from the other sites' (extra: {sorted(keys - usual_keys)}, "
                      f"missing: {sorted(usual_keys - keys)})")
            checked.rejected.append(_rejection(reply, server_round, label_of, reason))
        else:
            keyed.append(reply)

    norms = {reply.metadata.src_node_id: _update_norm(sent, reply) for reply in keyed} if sent is not None else {}
    per_step = _per_typical_step(norms, {reply.metadata.src_node_id: _local_steps(reply) for reply in keyed}, rules)
    limit = norm_limit(list(per_step.values()), rules) if rules.enabled else math.inf
    for reply in keyed:
        norm = norms.get(reply.metadata.src_node_id)
        if norm is not None and per_step[reply.metadata.src_node_id] > limit:
            reason = (f"its update norm {norm:.4g} ({per_step[reply.metadata.src_node_id]:.4g} at the round's "
                      f"typical local steps) is far above the other sites' (limit {limit:.4g}: median + "
                      f"{rules.norm_mad_k:g} MAD, at least {rules.norm_min_ratio:g} x median)")
            checked.rejected.append(_rejection(reply, server_round, label_of, reason))
        else:
            checked.accepted.append(reply)
            if norm is not None:
                checked.update_l2[reply.metadata.src_node_id] = norm
    return checked


def norm_limit(norms: Sequence[float], rules: UpdateChecksConfig) -> float:
    """The largest update norm accepted among ``norms`` (``inf`` with fewer than three norms)."""
    if len(norms) < MIN_REPLIES_FOR_NORM_RULE:
        return math.inf
    median = float(np.median(norms))
    if median <= 0.0:  # most sites did not move: nothing to compare against
        return math.inf
    mad = float(median_abs_deviation(norms, scale="normal"))
    return max(median + rules.norm_mad_k * mad, rules.norm_min_ratio * median)


def _per_typical_step(norms: Mapping[int, float], steps: Mapping[int, float | None],
                      rules: UpdateChecksConfig) -> dict[int, float]:
    """Each norm scaled to the round's median local steps: ``norm / sqrt(steps / median)``, with a
    site's steps capped at ``norm_max_step_ratio`` x the median (a site reporting none counts the median)."""
    reported = [value for value in steps.values() if value is not None]
    typical = float(np.median(reported)) if reported else 1.0
    scaled = {}
    for node, norm in norms.items():
        own = min(steps.get(node) or typical, rules.norm_max_step_ratio * typical)
        scaled[node] = norm / math.sqrt(own / typical)
    return scaled


def _local_steps(reply: Message) -> float | None:
    """The local steps a reply reports (``STEPS_METRIC``), None when it reports no usable number."""
    value = next(iter(reply.content.metric_records.values())).get(STEPS_METRIC)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
        return None
    return float(value)


def tell_rejected_sites(messages: Iterable[Message], rejected: Sequence[Rejection]) -> list[Message]:
    """``messages`` with each rejected site's instruction config telling it the round and why.

    Each message gets its own copy of the config (Flower's strategies share one record
    between all of a round's messages), so no site learns about another.
    """
    by_node = {rejection.node_id: rejection for rejection in rejected}
    out = []
    for message in messages:
        rejection = by_node.get(message.metadata.dst_node_id)
        if rejection is not None and "config" in message.content.config_records:
            config = ConfigRecord(dict(message.content.config_records["config"]))
            config[REJECTED_ROUND_KEY] = rejection.round
            config[REJECTED_REASON_KEY] = rejection.reason
            message.content["config"] = config
        out.append(message)
    return out


def rejection_notice(config: Mapping[str, object]) -> str:
    """What a site's instruction config says about its rejected reply (``""`` when nothing was rejected)."""
    if REJECTED_REASON_KEY not in config:
        return ""
    return (f"the server left this site's reply of round {config.get(REJECTED_ROUND_KEY)} out of the "
            f"aggregate: {config[REJECTED_REASON_KEY]}")


def finite_arrays(arrays: ArrayRecord) -> bool:
    """Whether every value of every array is finite (the last guard before a model is kept)."""
    return all(np.isfinite(np.asarray(array.numpy())).all() for array in arrays.values())


def _content_problem(reply: Message, sent: ArrayRecord | None) -> str:
    """Why ``reply`` cannot be aggregated at all, or ``""``."""
    content = reply.content
    if sent is not None:
        if list(content.array_records) != [ARRAYS_KEY]:
            return f"it holds array records {sorted(content.array_records)}, not one {ARRAYS_KEY!r}"
        arrays = content.array_records[ARRAYS_KEY]
        if set(arrays.keys()) != set(sent.keys()):
            return f"its arrays are {sorted(arrays.keys())}, the server sent {sorted(sent.keys())}"
        for key in sent.keys():
            mine, theirs = sent[key], arrays[key]
            if tuple(theirs.shape) != tuple(mine.shape) or theirs.dtype != mine.dtype:
                return (f"array {key!r} is {theirs.dtype}{list(theirs.shape)}, the server sent "
                        f"{mine.dtype}{list(mine.shape)}")
            if not np.isfinite(np.asarray(theirs.numpy())).all():
                return f"array {key!r} holds NaN or Inf"
    if len(content.metric_records) != 1:
        return f"it holds {len(content.metric_records)} metric records, not one"
    metrics: MetricRecord = next(iter(content.metric_records.values()))
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"metric {key!r} is not a number"
    weight = metrics.get(WEIGHT_METRIC)
    if weight is None or not math.isfinite(float(weight)) or float(weight) <= 0:
        return f"{WEIGHT_METRIC} is {weight!r}, not a positive number (its update would carry no weight)"
    return ""


def _metric_keys(reply: Message) -> frozenset[str]:
    return frozenset(next(iter(reply.content.metric_records.values())).keys())


def _most_common_metric_keys(replies: Sequence[Message]) -> frozenset[str]:
    """The metric key set most replies share; a tie goes to the set seen first (replies in arrival order)."""
    counts = Counter(_metric_keys(reply) for reply in replies)
    return counts.most_common(1)[0][0] if counts else frozenset()


def _update_norm(sent: ArrayRecord, reply: Message) -> float:
    returned = reply.content.array_records[ARRAYS_KEY]
    key = WEIGHTS_KEY if WEIGHTS_KEY in sent else next(iter(sent.keys()))
    delta = np.asarray(returned[key].numpy(), np.float64) - np.asarray(sent[key].numpy(), np.float64)
    return float(np.sqrt(np.dot(delta.ravel(), delta.ravel())))


def _rejection(reply: Message, server_round: int, label_of: Callable[[Message], str], reason: str) -> Rejection:
    return Rejection(server_round, label_of(reply), reply.metadata.src_node_id, reason)
