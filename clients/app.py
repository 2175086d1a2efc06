"""The Flower ClientApp a hospital runs (``rwft.clients.app:app``).

``train``: load the global weights, score them on the site's validation split (the
previous round's global model, see ``rwft.server.rounds``), fine-tune
``federation.local_epochs`` on the site's train split with the shared engine
(``rwft.core.engine.fit``), reply with the weights that travel, the example counts and
scalar metrics. ``evaluate``: score the global model on the site's validation split
(after the last round).

What leaves the site, and nothing else (``tests/test_privacy.py`` checks every reply):

- the model weights that travel (``rwft.federation.protocol``: never FedBN's local layers);
- a ``MetricRecord`` of numbers, each a count or a mean over a whole split (loss, AUROC,
  accuracy, ...), never a value per image;
- the site's label, a pseudonym its operator chose to be shown to the federation
  (``--site``, checked to be 1-32 letters, digits, ``.``, ``_`` or ``-``, so never a path).

Images, paths, file names and anything per image stay at the site, as do the site's
own TensorBoard log and the text of its errors (the server learns only an error's type).
"""

from __future__ import annotations

import functools
import math
import sys
import traceback
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from rwft.clients.site import Site, site_for
from rwft.core.config import with_overrides
from rwft.core.data import ImageSplit
from rwft.core.engine import evaluate_split, fit
from rwft.core.model import RwftModel
from rwft.core.privacy import load_state_file, save_state_file
from rwft.federation.attacks import attack_for, poison_data, poison_update
from rwft.federation.privacy import EPSILON_METRIC, site_dp_overrides
from rwft.federation.protocol import RECEIVED_PREFIX, shared_arrays
from rwft.federation.update_checks import rejection_notice

app = ClientApp()

# Every reply carries the same metric keys (Flower refuses to average mismatched records).
VAL_METRICS = ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "precision", "f1", "loss")


class SiteError(RuntimeError):
    """What the server learns when a site fails: the exception's type, never its text."""


def _errors_stay_local(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Print a failure's traceback at the site and send on only its type: its text may hold local paths."""
    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            raise SiteError(f"{type(exc).__name__} at the site (the site's log has the details)") from None
    return guarded


@app.train()
@_errors_stay_local
def train(msg: Message, context: Context) -> Message:
    site = site_for(context)
    config = msg.content.config_records["config"]
    server_round = int(_number(config, "server-round", 0))
    _show_rejection(site, config, server_round)
    attack = attack_for(site.cfg.federation.attack, site.label, context.node_config)  # simulated sites only
    model = site.model_for_round(context, msg.content.array_records["arrays"])
    # The model as received is the previous round's global model: score it first, so that
    # the server needs no separate evaluation exchange per round (rwft.server.rounds).
    received = _val_metrics(_score(model, site.splits.val, site))
    site.logger().scalars(received, server_round - 1, prefix="global_val")
    # fit draws each epoch's shuffle and augmentation from the seed: a new one every round.
    round_cfg = with_overrides(site.cfg, [f"seed={site.cfg.seed + server_round}", *site_dp_overrides(site.cfg)])
    dp_file = site.work_dir / "privacy" / f"{site.federation_id}.pt"  # epsilon spent carries across rounds
    result = fit(model, poison_data(site.splits, attack), round_cfg, epochs=site.cfg.federation.local_epochs,
                 device=site.device, proximal_mu=_number(config, "proximal-mu", 0.0),
                 privacy_state=load_state_file(dp_file), privacy_rounds=site.cfg.federation.rounds)
    site.keep_local_weights(context)
    val = _val_metrics(result.val)
    site.logger().scalars({"loss": result.train_loss}, server_round, prefix="train")
    site.logger().scalars(val, server_round, prefix="local_val")
    site.logger().flush()
    print(f"rwft site {site.label}: round {server_round}: trained on {result.num_examples} images, loss "
          f"{result.train_loss:.3f}, local val AUROC {val['auroc']:.3f}", flush=True)
    metrics: dict[str, Any] = {"num-examples": result.num_examples, "train-loss": result.train_loss,
                               "steps": result.steps, f"{RECEIVED_PREFIX}num-examples": len(site.splits.val)}
    metrics |= {f"val-{name}": value for name, value in val.items()}
    metrics |= {f"{RECEIVED_PREFIX}{name}": value for name, value in received.items()}
    if result.privacy is not None:
        save_state_file(dp_file, result.privacy)
        site.logger().scalars({"epsilon": result.privacy["epsilon"]}, server_round, prefix="privacy")
        metrics[EPSILON_METRIC] = result.privacy["epsilon"]
        print(f"rwft site {site.label}: privacy spent so far: epsilon {result.privacy['epsilon']:.3f} "
              f"(delta {result.privacy['delta']:g})", flush=True)
    arrays = poison_update(msg.content.array_records["arrays"], shared_arrays(model, site.cfg.federation.local_bn),
                           attack, seed=site.cfg.seed + server_round)
    return _reply(msg, site, MetricRecord(metrics), arrays)


@app.evaluate()
@_errors_stay_local
def evaluate(msg: Message, context: Context) -> Message:
    site = site_for(context)
    server_round = int(_number(msg.content.config_records["config"], "server-round", 0))
    _show_rejection(site, msg.content.config_records["config"], server_round)
    model = site.model_for_round(context, msg.content.array_records["arrays"])
    val = _val_metrics(_score(model, site.splits.val, site))
    site.logger().scalars(val, server_round, prefix="global_val")
    site.logger().flush()
    metrics: dict[str, Any] = {"num-examples": len(site.splits.val)} | val
    return _reply(msg, site, MetricRecord(metrics))


def _number(config: ConfigRecord, key: str, default: float) -> float:
    """A number the server sent in the round's config (Flower's ``server-round``, FedProx's ``proximal-mu``)."""
    value = config.get(key, default)
    if not isinstance(value, (int, float)):
        raise ValueError(f"the server sent {key}={value!r}, not a number")
    return float(value)


def _show_rejection(site: Site, config: ConfigRecord, server_round: int) -> None:
    """Tell the site's operator that the server left its last reply out of the aggregate, and why."""
    notice = rejection_notice(config)
    if notice:
        print(f"rwft site {site.label}: {notice}", file=sys.stderr, flush=True)
        site.logger().text("federation/rejected", notice, server_round)


def _score(model: RwftModel, split: ImageSplit, site: Site) -> dict[str, float]:
    return evaluate_split(model, split, site.cfg, device=site.device) if len(split) else {}


def _val_metrics(scores: dict[str, float]) -> dict[str, float]:
    return {name: float(scores.get(name, math.nan)) for name in VAL_METRICS}


def _reply(msg: Message, site: Site, metrics: MetricRecord, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"label": site.label})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)
