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
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from rwft.clients.site import Site, site_for
from rwft.core.config import AttackConfig, RwftConfig, with_overrides
from rwft.core.engine import FitResult, evaluate_split, fit
from rwft.core.errors import PrivacyBudgetExhausted
from rwft.core.model import RwftModel
from rwft.core.plugins import get_registries
from rwft.core.site_algorithm import SiteAlgorithm, site_algorithm_for
from rwft.federation.attacks import attack_for, poison_data, poison_update
from rwft.federation.privacy import site_state_file, site_training_overrides
from rwft.federation.protocol import (
    EPSILON_NAME,
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
    """What the server learns when a site fails: the exception's type, never its text
    (except the text rwft wrote for the server, such as a spent privacy budget)."""


def _errors_stay_local(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Print a failure's traceback at the site and send on only its type: its text may hold local paths."""
    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except SiteError:
            raise  # already says only what the server may know
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
    train_scores = {"loss": result.train_loss, "steps": float(result.steps)}
    if result.privacy is not None:  # federation.dp: the epsilon this site has spent so far, over all rounds
        train_scores[EPSILON_NAME] = result.privacy["epsilon"]
    reply = TrainReply(site.label, arrays, result.num_examples,
                       len(site.splits.val), train_scores, global_val, scores_of(result.val))
    _log_round(site, instruction.server_round, reply)
    return Message(content=reply.to_record(), reply_to=msg)


def train_locally(site: Site, context: Context, model: RwftModel, instruction: Instruction,
                  attack: AttackConfig | None = None) -> FitResult:
    """Fine-tune ``model`` (the global weights just loaded) on the site's train split, as the strategy says
    (on labels a simulated ``attack`` flipped, if any)."""
    algorithm = _site_algorithm(site.cfg)
    algorithm.start(model, instruction.config, site.strategy_state(context))
    # fit draws each epoch's shuffle and augmentation from the seed: a new one every round.
    round_cfg = with_overrides(site.cfg, [f"seed={site.cfg.seed + instruction.server_round}",
                                          *site_training_overrides(site.cfg)])
    # federation.dp: one accountant over every round, kept at the site (a resumed federation reads it back).
    privacy_file = site_state_file(site.work_dir, site.federation_id)
    try:
        result = fit(model, poison_data(site.splits, attack), round_cfg, epochs=site.cfg.federation.local_epochs,
                     device=site.device, loss_terms=algorithm.loss_terms(),
                     privacy_state=_privacy_state(privacy_file) if round_cfg.train.dp.enabled else None,
                     privacy_rounds=site.cfg.federation.rounds)
    except PrivacyBudgetExhausted as exc:
        # Its text is rwft's own (numbers only), so the server may read it: it names the site.
        print(f"rwft site {site.label}: {exc}", file=sys.stderr, flush=True)
        site.logger().text("privacy/stopped", str(exc), instruction.server_round)
        raise SiteError(f"site {site.label} stopped training: {exc}") from None
    if result.privacy is not None:
        from rwft.core.privacy import save_state_file

        save_state_file(privacy_file, result.privacy)
        site.logger().scalars({"epsilon": result.privacy["epsilon"]}, instruction.server_round, prefix="privacy")
        print(f"rwft site {site.label}: privacy spent so far: epsilon {result.privacy['epsilon']:.3f} "
              f"(delta {result.privacy['delta']:g}, noise multiplier {result.privacy['noise_multiplier']:.3g})",
              flush=True)
    site.keep_local_weights(context)
    site.keep_strategy_state(context, algorithm.finish(model))
    return result


def _privacy_state(path: Path) -> dict | None:
    from rwft.core.privacy import load_state_file  # Opacus only where DP is on

    return load_state_file(path)


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
