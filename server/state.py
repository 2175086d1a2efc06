"""The server's record of a federation, written after every round so that a crash loses no round.

A federation lives in its run directory (``output_dir``)::

    config.yaml          the resolved config it was started with
    federation.json      its id (sites key their FedBN weights by it) and round target
    state.pt             the resume point: last completed round, global weights, strategy state,
                         per-round history. Written atomically and last: it is the commit.
    model.pt             the latest global model as an rwft checkpoint (``rwft evaluate RUN_DIR/model.pt``)
    metrics.json         the per-round history and, at the end, the held-out test report
    tb/                  the central TensorBoard log

A round is complete once ``state.pt`` names it. A crash before that (``kill -9`` in the
middle of writing ``model.pt``) resumes at the round before, so the round is run again,
never lost and never counted twice.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from rwft.core.checkpoint import atomic_write_bytes, save_checkpoint, write_json
from rwft.core.errors import RwftError

STATE_FILE = "state.pt"
FEDERATION_FILE = "federation.json"


@dataclass
class FederationState:
    """Everything needed to continue a federation after its last completed round."""

    round: int
    arrays: dict[str, np.ndarray]  # the global weights that travel (rwft.federation.protocol)
    strategy: dict[str, Any]  # see strategy_state
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per completed round, 0 first

    def array_record(self) -> ArrayRecord:
        return ArrayRecord({name: Array(value) for name, value in self.arrays.items()})


def create_federation(run_dir: Path) -> str:
    """Start a new federation in ``run_dir``; returns its id.

    Refuses a directory whose federation completed a round (that one is resumed, not
    overwritten); one that never got that far is started again under its id.
    """
    file = run_dir / FEDERATION_FILE
    if (run_dir / STATE_FILE).exists():
        raise RwftError(f"{run_dir} already holds a federation. Continue it with `--resume {run_dir}`, "
                        "or choose a new output_dir=...")
    if file.is_file():
        return federation_id(run_dir)
    new_id = uuid.uuid4().hex
    write_json(file, {"id": new_id})
    return new_id


def federation_id(run_dir: Path) -> str:
    """The id of the federation in ``run_dir`` (``RwftError`` if there is none)."""
    file = run_dir / FEDERATION_FILE
    if not file.is_file():
        raise RwftError(f"{run_dir} holds no federation ({FEDERATION_FILE} is missing): pass the run "
                        "directory a federation was started in.")
    return str(json.loads(file.read_text())["id"])


def load_state(run_dir: Path) -> FederationState | None:
    """The last committed state in ``run_dir``, or ``None`` if no round 0 was committed yet."""
    file = run_dir / STATE_FILE
    if not file.is_file():
        return None
    # weights_only: state.pt is data; a pickle that names code to run is refused (issue 8).
    payload = _as_numpy(torch.load(file, map_location="cpu", weights_only=True))
    return FederationState(payload["round"], payload["arrays"], payload["strategy"], payload["history"])


def commit(run_dir: Path, state: FederationState, model_checkpoint: dict[str, Any]) -> None:
    """Write the round's model and history, then ``state.pt`` (the commit point), each atomically."""
    save_checkpoint(run_dir / "model.pt", model_checkpoint)
    write_json(run_dir / "metrics.json", {"rounds": state.history})
    payload = {"round": state.round, "arrays": _as_tensors(state.arrays), "strategy": _as_tensors(state.strategy),
               "history": state.history}
    atomic_write_bytes(run_dir / STATE_FILE, lambda handle: torch.save(payload, handle))


def _as_tensors(value: Any) -> Any:
    """numpy arrays as tensors (in dicts and lists), so that ``torch.load(weights_only=True)`` reads them."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {key: _as_tensors(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_tensors(item) for item in value]
    return value


def _as_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {key: _as_numpy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_numpy(item) for item in value]
    return value


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: np.array(array.numpy(), copy=True) for name, array in record.items()}


WRAPPED_KEY = "__wrapped__"  # the state of the strategy a wrapper holds (Flower's DP wrappers: ``.strategy``)
# What Flower's own strategies learn that is not an array: the adaptive DP clipping norm,
# which moves every round (Andrew et al. 2021). rwft's strategies say it themselves.
LEARNED_BY_FLOWER = {"DifferentialPrivacyServerSideAdaptiveClipping": ("clipping_norm",),
                     "DifferentialPrivacyClientSideAdaptiveClipping": ("clipping_norm",)}


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What a strategy learns across rounds, by attribute name, so that a resumed federation goes on with it.

    Strategies keep their configuration in plain attributes (rebuilt from the config on
    resume) and what they learn in

    - numpy arrays or dicts/lists of them (FedAdam's and FedYogi's moments ``m_t``/``v_t``,
      FedAvgM's momentum, FedDyn's ``h``): saved whatever their name;
    - other values (a round counter, an adaptive clipping norm): saved when the strategy
      names them in a ``learned_attributes`` tuple (``rwft.plugins.strategies_feddyn``), or
      for Flower's own strategies, in ``LEARNED_BY_FLOWER``;
    - a strategy it wraps (``.strategy``, as Flower's DP wrappers hold it): saved under
      ``WRAPPED_KEY``, by the same rules.

    Private attributes (``_name``) are working memory within a round and never saved.
    """
    attributes = vars(strategy)
    learned = (*getattr(strategy, "learned_attributes", ()), *LEARNED_BY_FLOWER.get(type(strategy).__name__, ()))
    state = {name: value for name, value in attributes.items()
             if not name.startswith("_") and (_holds_arrays(value) or name in learned)}
    wrapped = attributes.get("strategy")
    if wrapped is not None and hasattr(wrapped, "aggregate_train"):
        state[WRAPPED_KEY] = strategy_state(wrapped)
    return state


def restore_strategy(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put what ``strategy_state`` saved back into a freshly built strategy."""
    for name, value in state.items():
        if name == WRAPPED_KEY:
            restore_strategy(strategy.strategy, value)  # type: ignore[attr-defined]
        else:
            setattr(strategy, name, value)


def _holds_arrays(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return True
    if isinstance(value, (dict, list)) and value:
        items = value.values() if isinstance(value, dict) else value
        return all(isinstance(item, np.ndarray) for item in items)
    return False
