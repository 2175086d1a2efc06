"""The Flower ServerApp of a federation (``rwft.server.app:app``).

It reads the run's config (``rwft.federation.protocol``), takes the strategy from the strategy
registry, and runs the rounds (``rwft.server.rounds``). After round 0 (the starting
weights) and after every round it scores the global model on the server's held-out
data (``rwft.server.holdout``), commits the round to the run directory
(``rwft.server.state``) and logs it (``rwft.server.central_view``). After the last round
the sites score the final model, and the held-out test split is reported once. A resumed
federation (``rwft-server start --resume``) goes on after its last committed round.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from rwft.core.checkpoint import save_checkpoint, write_json
from rwft.core.config import RwftConfig
from rwft.core.engine import seed_everything
from rwft.core.errors import RwftError
from rwft.core.model import RwftModel, build_model
from rwft.core.model_file import model_payload
from rwft.core.plugins import Registries, call_factory, get_registries
from rwft.core.site_algorithm import StrategyPlugin
from rwft.core.tblog import RunLogger
from rwft.federation.flower_compat import patch_grid
from rwft.federation.privacy import check_federation_dp
from rwft.federation.protocol import (
    NUM_CLASSES_KEY,
    RESUME_KEY,
    aggregate_train_metrics,
    config_from_run,
    load_shared,
    shared_arrays,
)
from rwft.federation.update_checks import Rejection
from rwft.server.central_view import (
    RoundRecord,
    attach_evaluation,
    log_evaluation,
    log_round,
    round_record,
    round_summary,
)
from rwft.server.holdout import Holdout
from rwft.server.rounds import Evaluation, RoundResult, evaluate_model, run_rounds
from rwft.server.site_identity import VettedGrid
from rwft.server.state import FederationState, arrays_of, commit, load_state, restore_strategy, strategy_state
from rwft.server.superlink import server_run_config

# Both built-in datasets name their classes so; a server without held-out data has no other source.
DEFAULT_CLASS_NAMES = ("NORMAL", "PNEUMONIA")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    patch_grid()
    run_federation(grid, server_run_config(context.run_config))  # full config, not the sites' (trust-ops)


def make_strategy(cfg: RwftConfig, registries: Registries | None = None) -> Strategy:
    """The strategy ``federation.strategy`` names, with the sampling every strategy shares."""
    federation = cfg.federation
    common = {
        "fraction_train": federation.fraction,
        "fraction_evaluate": 1.0,  # every site scores the global model on its validation split
        "min_train_nodes": max(1, math.ceil(federation.fraction * federation.min_sites)),
        "min_evaluate_nodes": federation.min_sites,
        "min_available_nodes": federation.min_sites,
        "train_metrics_aggr_fn": aggregate_train_metrics,  # the training numbers only, by training images
    }
    registration = (registries or get_registries()).strategies.get(federation.strategy)
    check_federation_dp(cfg, site_half=isinstance(registration.factory, StrategyPlugin))  # before any site trains
    return call_factory(registration, "a Flower Strategy", lambda value: isinstance(value, Strategy), cfg, **common)


def run_federation(grid: Grid, run_config: Mapping[str, Any], registries: Registries | None = None,
                   on_round: Callable[[RoundRecord], None] | None = None) -> ArrayRecord:
    """Run (or resume) the federation ``run_config`` describes; returns the final global weights.

    ``on_round(record)`` is called with each round's record once the round is committed
    (a sweep reports it to its scheduler from there, ``rwft.experiments.trials``).
    """
    cfg = config_from_run(run_config)
    grid = VettedGrid(grid, cfg.output_dir)  # type: ignore[assignment]  # labels unique, bound to keys (trust-ops)
    federation = Federation(cfg, int(run_config[NUM_CLASSES_KEY]), make_strategy(cfg, registries))
    with federation.open():
        state = load_state(federation.run_dir)
        if run_config.get(RESUME_KEY):
            if state is None:
                raise RwftError(f"nothing to resume in {federation.run_dir}: no round was completed. "
                                "Start it afresh.")
            restore_strategy(federation.strategy, state.strategy)
            federation.history = [RoundRecord.from_dict(record) for record in state.history]
            arrays, first_round = state.array_record(), state.round + 1
            print(f"rwft: resuming after round {state.round} of {cfg.federation.rounds}", flush=True)
        elif state is not None:
            raise RwftError(f"{federation.run_dir} already holds a federation at round {state.round}: resume "
                            "it, or choose a new output_dir.")
        else:
            arrays, first_round = shared_arrays(federation.model, cfg.federation.local_bn), 1
            federation.commit(0, arrays, None)
        arrays = run_rounds(
            grid, federation.strategy, arrays, first_round=first_round, last_round=cfg.federation.rounds,
            min_sites=cfg.federation.min_sites, wait_timeout_s=cfg.federation.wait_timeout_s,
            round_timeout_s=cfg.federation.round_timeout_s,
            on_round=lambda result: federation.commit(result.round, result.arrays, result, on_round),
            update_checks=cfg.federation.update_checks,
        )
        federation.finish(evaluate_model(grid, federation.strategy, cfg.federation.rounds, arrays,
                                         cfg.federation.round_timeout_s, federation.last_rejected), arrays)
    return arrays


class Federation:
    """The server's side of one federation: its global model, records, checkpoints and logs.

    Built without side effects; ``open()`` seeds the RNGs, builds the model, loads the
    held-out data and opens the TensorBoard writer, for as long as its ``with`` block runs.
    """

    def __init__(self, cfg: RwftConfig, num_classes: int, strategy: Strategy) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.run_dir = Path(cfg.output_dir)
        self.strategy = strategy
        self.history: list[RoundRecord] = []
        self._model: RwftModel | None = None
        self._logger: RunLogger | None = None
        self.holdout: Holdout | None = None
        self.last_rejected: list[Rejection] = []  # told to their sites with the final evaluation

    @contextlib.contextmanager
    def open(self) -> Iterator[Federation]:
        seed_everything(self.cfg.seed)  # the same starting head, hence the same round 0, on every run
        self._model = build_model(self.cfg.model, self.num_classes)
        self.holdout = Holdout.load(self.cfg, self._model) if self.cfg.federation.server_eval else None
        with RunLogger(self.run_dir / "tb") as logger:
            self._logger = logger
            try:
                yield self
            finally:
                self._logger = None

    @property
    def model(self) -> RwftModel:
        if self._model is None:
            raise RuntimeError("Federation.open() first")
        return self._model

    @property
    def logger(self) -> RunLogger:
        if self._logger is None:
            raise RuntimeError("Federation.open() first")
        return self._logger

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.holdout.splits.class_names) if self.holdout else DEFAULT_CLASS_NAMES

    def commit(self, server_round: int, arrays: ArrayRecord, result: RoundResult | None,
               on_round: Callable[[RoundRecord], None] | None = None) -> None:
        """Score, checkpoint, then log round ``server_round`` (``result`` is ``None`` for round 0)."""
        record = round_record(server_round, self.holdout.evaluate(arrays) if self.holdout else {}, result)
        self.last_rejected = result.rejected if result is not None else []
        if result is not None and self.history:  # the sites' scores of the previous round's model
            attach_evaluation(self.history[-1], result.previous_model)
        self.history.append(record)
        load_shared(self.model, arrays, self.cfg.federation.local_bn)
        commit(self.run_dir, FederationState(server_round, arrays_of(arrays), strategy_state(self.strategy),
                                             [r.to_dict() for r in self.history]),
               self._checkpoint(server_round, threshold=0.5))
        # Logged after the commit: a crash in between loses points of the curves, never
        # duplicates them (a resumed federation does not repeat a committed round).
        log_round(self.logger, record)
        if result is not None:
            log_evaluation(self.logger, result.previous_model)
        previous = result.previous_model if result is not None else None
        print(f"rwft: {round_summary(record, self.cfg.federation.rounds, previous)}", flush=True)
        if on_round is not None:
            on_round(record)

    def finish(self, evaluation: Evaluation, arrays: ArrayRecord) -> None:
        """Record the sites' scores of the final model and the held-out test report."""
        attach_evaluation(self.history[-1], evaluation)
        log_evaluation(self.logger, evaluation)
        metrics: dict[str, Any] = {"rounds": [r.to_dict() for r in self.history], "complete": True}
        if self.holdout is not None:
            final = self.holdout.final_score(arrays)
            metrics["final"] = final.report
            save_checkpoint(self.run_dir / "model.pt", self._checkpoint(self.cfg.federation.rounds,
                                                                        threshold=final.threshold))
            self.logger.scalars(final.test_values(), self.cfg.federation.rounds, prefix="test")
            print(f"rwft: held-out test AUROC {final.test_values()['auroc']:.3f} (threshold "
                  f"{final.threshold:.3f} chosen on validation)", flush=True)
        write_json(self.run_dir / "metrics.json", metrics)
        if "auroc" in evaluation.aggregate:
            print(f"rwft: final model on the sites' validation splits: AUROC {evaluation.aggregate['auroc']:.3f}",
                  flush=True)

    def _checkpoint(self, server_round: int, *, threshold: float) -> dict[str, Any]:
        """The global model as an rwft checkpoint (``rwft.core.model_file``), so that ``rwft evaluate`` reads it."""
        return model_payload(self.cfg, self.model, self.class_names, epoch=server_round, val={},
                             threshold=threshold, round=server_round)
