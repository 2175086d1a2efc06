"""The central view of a federation: one ``RoundRecord`` per round, in ``metrics.json`` and in TensorBoard.

One ``tensorboard --logdir RUN_DIR/tb`` shows, per round (the TensorBoard step), each
quantity once, with the score scopes of ``rwft.federation.protocol``:

- ``global/*``: the global model on the server's held-out validation split (AUROC,
  accuracy, sensitivity, specificity, loss), when ``federation.server_eval`` is on;
- ``federation/participating_sites``, ``federation/round_seconds``, the names of the
  sites that trained (text), the strategy's aggregate of the sites' training
  (``federation/train/*``: loss and steps averaged by training images, and
  ``num-examples``, the images trained on), and ``federation/global_val/*``: the sites'
  scores of the round's global model averaged over the sites by validation images;
- per site: ``site/<name>/train/*`` (its training loss, steps and images),
  ``site/<name>/local_val/*`` (its validation split after its local training),
  ``site/<name>/global_val/*`` (the round's global model on its validation split) and
  ``site/<name>/update_l2`` (the L2 norm of its update);
- ``federation/rejected_replies`` and, as text, ``federation/rejected``: the replies the
  update checks left out of the round and why (``rwft.federation.update_checks``; in
  ``metrics.json`` each round's ``rejected`` lists round, site and reason).

The sites score a round's global model when it reaches them, with the next round's
training message (``rwft.server.rounds``), so the ``global_val`` scores of round r are
added to round r's record one round later (after the last round, by a final
evaluation). Every number comes from what the sites report (``rwft.clients.app``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rwft.core.tblog import RunLogger
from rwft.federation.protocol import GLOBAL_VAL, LOCAL_VAL, TRAIN, VAL_EXAMPLES_KEY
from rwft.server.rounds import Evaluation, RoundResult

HELDOUT = "global"  # the global model on the server's held-out validation split (metrics.json key, TB prefix)


@dataclass
class SiteRecord:
    """One site in one round's record."""

    train: dict[str, float] = field(default_factory=dict)
    local_val: dict[str, float] = field(default_factory=dict)
    global_val: dict[str, float] = field(default_factory=dict)  # arrives a round later
    update_l2: float | None = None
    error: str = ""
    val_examples: int | None = None  # the weight of its global_val scores

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {TRAIN: self.train, LOCAL_VAL: self.local_val, GLOBAL_VAL: self.global_val,
                                 VAL_EXAMPLES_KEY: self.val_examples, "update_l2": self.update_l2}
        return entry | ({"error": self.error} if self.error else {})

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> SiteRecord:
        return cls(dict(entry.get(TRAIN, {})), dict(entry.get(LOCAL_VAL, {})), dict(entry.get(GLOBAL_VAL, {})),
                   entry.get("update_l2"), str(entry.get("error", "")), entry.get(VAL_EXAMPLES_KEY))


@dataclass
class RoundRecord:
    """What ``metrics.json`` (``rounds``) and ``state.pt`` (``history``) hold about one round."""

    round: int
    heldout: dict[str, float]  # HELDOUT: empty without federation.server_eval
    sites: dict[str, SiteRecord] = field(default_factory=dict)
    finished_at: float = field(default_factory=time.time)
    seconds: float | None = None  # None for round 0, before training
    train: dict[str, float] | None = None  # the strategy's aggregate; None for round 0
    global_val: dict[str, float] = field(default_factory=dict)  # the sites' mean scores, a round later
    rejected: list[dict[str, Any]] = field(default_factory=list)  # round, site, reason (rwft.federation.update_checks)

    @property
    def trained(self) -> list[str]:
        """The sites whose training this round's model includes."""
        return [name for name, site in self.sites.items() if site.train]

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"round": self.round, "finished_at": self.finished_at, HELDOUT: self.heldout,
                                  "sites": {name: site.to_dict() for name, site in self.sites.items()}}
        if self.train is not None:
            record |= {"seconds": self.seconds, TRAIN: self.train, "rejected": self.rejected}
        if self.global_val:
            record[GLOBAL_VAL] = self.global_val
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> RoundRecord:
        return cls(int(record["round"]), dict(record.get(HELDOUT, {})),
                   {name: SiteRecord.from_dict(site) for name, site in record.get("sites", {}).items()},
                   float(record.get("finished_at", 0.0)), record.get("seconds"), record.get(TRAIN),
                   dict(record.get(GLOBAL_VAL, {})), list(record.get("rejected", [])))


def round_record(server_round: int, heldout: dict[str, float], result: RoundResult | None) -> RoundRecord:
    """The record of one round (``result`` is ``None`` for round 0, before training)."""
    record = RoundRecord(server_round, heldout)
    if result is not None:
        record.seconds, record.train = result.seconds, result.train
        record.sites = {site.label: SiteRecord(site.train, site.local_val, update_l2=site.update_l2, error=site.error)
                        for site in result.sites}
        record.rejected = [rejection.as_record() for rejection in result.rejected]
    return record


def attach_evaluation(record: RoundRecord, evaluation: Evaluation) -> None:
    """Add the sites' scores of the record's global model (they arrive a round later)."""
    for label, scores in evaluation.sites.items():
        site = record.sites.setdefault(label, SiteRecord())
        site.global_val, site.val_examples = scores, evaluation.val_examples[label]
    record.global_val = evaluation.aggregate


def log_round(logger: RunLogger, record: RoundRecord) -> None:
    """Write one ``RoundRecord`` to TensorBoard (step = round)."""
    step = record.round
    logger.scalars(record.heldout, step, prefix=HELDOUT)
    if record.train is not None:
        logger.scalar("federation/participating_sites", len(record.trained), step)
        logger.scalar("federation/round_seconds", record.seconds or 0.0, step)
        logger.text("federation/sites", ", ".join(record.trained) or "(none)", step)
        logger.scalars(record.train, step, prefix=f"federation/{TRAIN}")
        logger.scalar("federation/rejected_replies", len(record.rejected), step)
        if record.rejected:
            logger.text("federation/rejected", "\n\n".join(f"{r['site']}: {r['reason']}" for r in record.rejected),
                        step)
        for name, site in record.sites.items():
            logger.scalars(site.train, step, prefix=f"site/{name}/{TRAIN}")
            logger.scalars(site.local_val, step, prefix=f"site/{name}/{LOCAL_VAL}")
            if site.update_l2 is not None:
                logger.scalar(f"site/{name}/update_l2", site.update_l2, step)
    logger.flush()


def log_evaluation(logger: RunLogger, evaluation: Evaluation) -> None:
    """Write the sites' scores of round ``evaluation.round``'s global model (step = that round)."""
    for label, scores in evaluation.sites.items():
        logger.scalars(scores, evaluation.round, prefix=f"site/{label}/{GLOBAL_VAL}")
    logger.scalars(evaluation.aggregate, evaluation.round, prefix=f"federation/{GLOBAL_VAL}")
    logger.flush()


def round_summary(record: RoundRecord | Mapping[str, Any], last_round: int,
                  previous: Evaluation | None = None) -> str:
    """One line for the terminal (``record`` as kept in ``state.pt``'s history is accepted too)."""
    if not isinstance(record, RoundRecord):
        record = RoundRecord.from_dict(record)
    parts = [f"round {record.round}/{last_round}"]
    if record.train is not None:
        trained = record.trained
        parts.append(f"{len(trained)} site(s) trained ({', '.join(trained)}) in {record.seconds or 0.0:.1f} s")
        failed = [f"{name}: {site.error}" for name, site in record.sites.items() if site.error]
        if failed:
            parts.append("failed: " + "; ".join(failed))
        if record.rejected:
            parts.append("rejected: " + "; ".join(f"{r['site']}: {r['reason']}" for r in record.rejected))
    if record.heldout:
        parts.append("held-out " + ", ".join(f"{k} {v:.3f}" for k, v in record.heldout.items()))
    if previous is not None and "auroc" in previous.aggregate:
        parts.append(f"sites' val AUROC of round {previous.round}'s model {previous.aggregate['auroc']:.3f}")
    return " | ".join(parts)
