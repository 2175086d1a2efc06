"""The central view of a federation: one record per round, in ``metrics.json`` and in TensorBoard.

One ``tensorboard --logdir RUN_DIR/tb`` shows, per round (the TensorBoard step):

- ``global/*``: the global model on the server's held-out validation split (AUROC,
  accuracy, sensitivity, specificity, loss), when ``federation.server_eval`` is on;
- ``federation/participating_sites``, ``federation/round_seconds``, the names of the
  sites that trained (text), the strategy's aggregate of the training metrics
  (``federation/train/*``) and the sites' scores of the round's global model averaged
  over the sites (``federation/evaluate/*``);
- per site: ``site/<name>/train/*`` (its training loss and example count),
  ``site/<name>/local_val/*`` (its validation split after its local training),
  ``site/<name>/val/*`` (the round's global model on its validation split) and
  ``site/<name>/update_l2`` (the L2 norm of its update);
- ``federation/rejected_replies`` and, as text, ``federation/rejected``: the replies the
  update checks left out of the round and why (``rwft.federation.update_checks``; in
  ``metrics.json`` each round's ``rejected`` lists round, site and reason).

The sites score a round's global model when it reaches them, with the next round's
training message (``rwft.server.rounds``), so ``val`` and ``evaluate`` of round r are
added to round r's record one round later (after the last round, by a final
evaluation). Every number comes from what the sites report (``rwft.clients.app``).
"""

from __future__ import annotations

import time
from typing import Any

from rwft.core.tblog import RunLogger
from rwft.server.rounds import Evaluation, RoundResult


def round_record(server_round: int, global_metrics: dict[str, float], result: RoundResult | None) -> dict[str, Any]:
    """The JSON-ready record of one round (``result`` is ``None`` for round 0, before training)."""
    record: dict[str, Any] = {"round": server_round, "finished_at": time.time(), "global": global_metrics,
                              "sites": {}}
    if result is None:
        return record
    record |= {"seconds": result.seconds, "train": result.train}
    for site in result.sites:
        entry: dict[str, Any] = {"train": site.train, "local_val": site.local_val, "update_l2": site.update_l2}
        if site.error:
            entry["error"] = site.error
        record["sites"][site.label] = entry
    record["rejected"] = [rejection.as_record() for rejection in result.rejected]
    return record


def attach_evaluation(record: dict[str, Any], evaluation: Evaluation) -> None:
    """Add the sites' scores of the record's global model (they arrive a round later)."""
    for label, scores in evaluation.sites.items():
        record["sites"].setdefault(label, {})["val"] = scores
    record["evaluate"] = evaluation.aggregate


def log_round(logger: RunLogger, record: dict[str, Any]) -> None:
    """Write one ``round_record`` to TensorBoard (step = round)."""
    step = record["round"]
    logger.scalars(record["global"], step, prefix="global")
    if "train" in record:
        trained = _trained(record)
        logger.scalar("federation/participating_sites", len(trained), step)
        logger.scalar("federation/round_seconds", record["seconds"], step)
        logger.text("federation/sites", ", ".join(trained) or "(none)", step)
        logger.scalars(record["train"], step, prefix="federation/train")
        logger.scalar("federation/rejected_replies", len(record.get("rejected", [])), step)
        if record.get("rejected"):
            logger.text("federation/rejected", "\n\n".join(f"{r['site']}: {r['reason']}" for r in record["rejected"]),
                        step)
        for name, site in record["sites"].items():
            logger.scalars(site.get("train", {}), step, prefix=f"site/{name}/train")
            logger.scalars(site.get("local_val", {}), step, prefix=f"site/{name}/local_val")
            if site.get("update_l2") is not None:
                logger.scalar(f"site/{name}/update_l2", site["update_l2"], step)
    logger.flush()


def log_evaluation(logger: RunLogger, evaluation: Evaluation) -> None:
    """Write the sites' scores of round ``evaluation.round``'s global model (step = that round)."""
    for label, scores in evaluation.sites.items():
        logger.scalars({k: v for k, v in scores.items() if k != "num-examples"}, evaluation.round,
                       prefix=f"site/{label}/val")
    logger.scalars(evaluation.aggregate, evaluation.round, prefix="federation/evaluate")
    logger.flush()


def round_summary(record: dict[str, Any], last_round: int, previous: Evaluation | None = None) -> str:
    """One line for the terminal."""
    parts = [f"round {record['round']}/{last_round}"]
    if "train" in record:
        trained = _trained(record)
        parts.append(f"{len(trained)} site(s) trained ({', '.join(trained)}) in {record['seconds']:.1f} s")
        failed = [f"{name}: {site['error']}" for name, site in record["sites"].items() if site.get("error")]
        if failed:
            parts.append("failed: " + "; ".join(failed))
        if record.get("rejected"):
            parts.append("rejected: " + "; ".join(f"{r['site']}: {r['reason']}" for r in record["rejected"]))
    if record["global"]:
        parts.append("held-out " + ", ".join(f"{k} {v:.3f}" for k, v in record["global"].items()))
    if previous is not None and "auroc" in previous.aggregate:
        parts.append(f"sites' val AUROC of round {previous.round}'s model {previous.aggregate['auroc']:.3f}")
    return " | ".join(parts)


def _trained(record: dict[str, Any]) -> list[str]:
    return [name for name, site in record["sites"].items() if site.get("train")]
