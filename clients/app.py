"""The Flower ClientApp a hospital runs (``rwft.clients.app:app``).

``train``: load the global weights, score them on the site's validation split (the
previous round's global model, see ``rwft.server.rounds``), fine-tune
``federation.local_epochs`` on the site's train split with the shared engine
(``rwft.core.engine.fit``) as the strategy's site half says (``rwft.core.site_algorithm``:
FedProx's proximal term, FedDyn's regulariser), reply with the weights that travel, the
example counts and the scores. ``evaluate``: score the global model on the site's
validation split (after the last round). The messages and the names of the scores are
``rwft.federation.protocol``'s.

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
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from rwft.clients.site import Site, site_for
from rwft.core.config import AttackConfig, RwftConfig, with_overrides
from rwft.core.engine import FitResult, evaluate_split, fit
from rwft.core.model import RwftModel
from rwft.core.plugins import get_registries
from rwft.core.site_algorithm import SiteAlgorithm, site_algorithm_for
from rwft.federation.attacks import attack_for, poison_data, poison_update
from rwft.federation.protocol import (
    GLOBAL_VAL,
    LOCAL_VAL,
    TRAIN,
    EvaluateReply,
    Instruction,
    TrainReply,
    scores_of,
    shared_arrays,
)
from rwft.federation.update_checks import rejection_notice

app = ClientApp()


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
    instruction = Instruction.from_record(msg.content)
    _show_rejection(site, instruction.config, instruction.server_round)
    attack = attack_for(site.cfg.federation.attack, site.label, context.node_config)  # simulated sites only
    model = site.model_for_round(context, instruction.arrays)
    # The model as received is the previous round's global model: score it first, so that
    # the server needs no separate evaluation exchange per round (rwft.server.rounds).
    global_val = scores_of(_score(model, site))
    result = train_locally(site, context, model, instruction, attack)
    arrays = poison_update(instruction.arrays, shared_arrays(model, site.cfg.federation.local_bn), attack,
                           seed=site.cfg.seed + instruction.server_round)  # unchanged unless simulated
    reply = TrainReply(site.label, arrays, result.num_examples,
                       len(site.splits.val), {"loss": result.train_loss, "steps": float(result.steps)},
                       global_val, scores_of(result.val))
    _log_round(site, instruction.server_round, reply)
    return Message(content=reply.to_record(), reply_to=msg)


def train_locally(site: Site, context: Context, model: RwftModel, instruction: Instruction,
                  attack: AttackConfig | None = None) -> FitResult:
    """Fine-tune ``model`` (the global weights just loaded) on the site's train split, as the strategy says
    (on labels a simulated ``attack`` flipped, if any)."""
    algorithm = _site_algorithm(site.cfg)
    algorithm.start(model, instruction.config, site.strategy_state(context))
    # fit draws each epoch's shuffle and augmentation from the seed: a new one every round.
    round_cfg = with_overrides(site.cfg, [f"seed={site.cfg.seed + instruction.server_round}"])
    result = fit(model, poison_data(site.splits, attack), round_cfg, epochs=site.cfg.federation.local_epochs,
                 device=site.device, loss_terms=algorithm.loss_terms())
    site.keep_local_weights(context)
    site.keep_strategy_state(context, algorithm.finish(model))
    return result


@app.evaluate()
@_errors_stay_local
def evaluate(msg: Message, context: Context) -> Message:
    site = site_for(context)
    instruction = Instruction.from_record(msg.content)
    _show_rejection(site, instruction.config, instruction.server_round)
    model = site.model_for_round(context, instruction.arrays)
    reply = EvaluateReply(site.label, len(site.splits.val), scores_of(_score(model, site)))
    site.logger().scalars(reply.global_val, instruction.server_round, prefix=GLOBAL_VAL)
    site.logger().flush()
    return Message(content=reply.to_record(), reply_to=msg)


def _site_algorithm(cfg: RwftConfig) -> SiteAlgorithm:
    """The site half of the federation's strategy, from the strategy plugins installed here."""
    strategies = get_registries().strategies
    if cfg.federation.strategy not in strategies.names():
        print(f"rwft: strategy {cfg.federation.strategy!r} is not installed at this site: its sites train as "
              "FedAvg's do (right for a strategy that only aggregates differently; otherwise install its "
              "plugin here)", file=sys.stderr, flush=True)
        return SiteAlgorithm(cfg)
    return site_algorithm_for(strategies.get(cfg.federation.strategy).factory, cfg)


def _show_rejection(site: Site, config: Mapping[str, Any], server_round: int) -> None:
    """Tell the site's operator that the server left its last reply out of the aggregate, and why."""
    notice = rejection_notice(config)
    if notice:
        print(f"rwft site {site.label}: {notice}", file=sys.stderr, flush=True)
        site.logger().text("federation/rejected", notice, server_round)


def _score(model: RwftModel, site: Site) -> dict[str, float]:
    return evaluate_split(model, site.splits.val, site.cfg, device=site.device) if len(site.splits.val) else {}


def _log_round(site: Site, server_round: int, reply: TrainReply) -> None:
    """The site's own TensorBoard log and terminal line (the same scopes as the server's view)."""
    logger = site.logger()
    logger.scalars(reply.global_val, server_round - 1, prefix=GLOBAL_VAL)  # the model of the round before
    logger.scalars({"loss": reply.train["loss"]}, server_round, prefix=TRAIN)
    logger.scalars(reply.local_val, server_round, prefix=LOCAL_VAL)
    logger.flush()
    print(f"rwft site {site.label}: round {server_round}: trained on {reply.num_examples} images, loss "
          f"{reply.train['loss']:.3f}, local val AUROC {reply.local_val['auroc']:.3f}", flush=True)
