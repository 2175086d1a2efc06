"""What an rwft model checkpoint holds, whoever wrote it.

``rwft train`` (``best.pt``, ``last.pt``) and the federation server (``model.pt``) write
the same payload, so that ``rwft evaluate`` (and anything else that reads a checkpoint)
takes either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from rwft.core.config import RwftConfig, to_container


def model_payload(cfg: RwftConfig, model: nn.Module, class_names: Sequence[str], *, epoch: int,
                  val: dict[str, float], threshold: float = 0.5, **extra: Any) -> dict[str, Any]:
    """The checkpoint of ``model``: weights (on the CPU), resolved config, class names, its epoch
    (a federation's round), its validation scores and decision threshold; ``extra`` is added
    (a federation's ``round``, a resumable run's ``trainer``)."""
    return {"model": {name: value.detach().cpu().clone() for name, value in model.state_dict().items()},
            "config": to_container(cfg), "class_names": list(class_names),
            # rwft orders classes negative first (rwft.core.classes): label 1 is the positive class.
            "positive_class": list(class_names)[1], "epoch": epoch, "val": val,
            "threshold": threshold, **extra}
