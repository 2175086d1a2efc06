"""Checkpoints written atomically, so that a crash never leaves a half-written file.

A checkpoint is a plain dict saved with ``torch.save``: model weights, the resolved
config that built the model, class names (in label order) and the positive class,
the validation-chosen threshold and, for resuming, optimiser state, progress
counters and random states. Everything in it is a tensor or plain data (numbers,
strings, lists, dicts), so it is read with ``torch.load(weights_only=True)``: a
checkpoint can never run code.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from rwft.core.errors import RwftError


def atomic_write_bytes(path: str | os.PathLike[str], write: Any) -> Path:
    """Call ``write(file_object)`` on a temp file beside ``path``, then rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    return atomic_write_bytes(path, lambda handle: torch.save(payload, handle))


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=True).encode()
    return atomic_write_bytes(path, lambda handle: handle.write(text))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise RwftError(f"checkpoint {file} does not exist. Pass a file written by rwft "
                        "(RUN_DIR/best.pt or RUN_DIR/last.pt).")
    try:
        # weights_only: a checkpoint is data. A pickle may name any Python callable to run
        # on load, so one downloaded or shared .pt could otherwise run code on the host.
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise RwftError(f"checkpoint {file} holds Python objects beyond tensors and plain data (loading it could "
                        "run code), so rwft refuses to open it. Use a checkpoint written by rwft; if you wrote "
                        "this one yourself, re-save it with only tensors, numbers, strings, lists and dicts.") from None
    except Exception as exc:
        raise RwftError(f"checkpoint {file} cannot be read ({exc}); it is not an rwft checkpoint "
                        "or is damaged. Use another checkpoint from the run directory.") from exc
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise RwftError(f"checkpoint {file} is not an rwft checkpoint (no model/config inside).")
    return payload
