"""The final score of a model: threshold chosen on validation, then the test split reported once.

``rwft train`` (``rwft.core.run``) and the federation server's held-out data
(``rwft.server.holdout``) both end with this, so a number in one means the same in the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rwft.core import testtime
from rwft.core.config import RwftConfig
from rwft.core.data import DatasetSplits


@dataclass
class FinalScore:
    report: dict[str, Any]  # threshold, val (at that threshold), test (with 95% bootstrap intervals), source
    test_probs: np.ndarray  # positive-class probabilities of the test images (for curves)

    @property
    def threshold(self) -> float:
        return float(self.report["threshold"])

    def test_values(self) -> dict[str, float]:
        """The test point estimates (``auroc`` -> value), as logged to TensorBoard under ``test/``."""
        return {name: entry["value"] for name, entry in self.report["test"].items() if isinstance(entry, dict)}


def final_score(model: nn.Module, splits: DatasetSplits, cfg: RwftConfig, device: torch.device | None) -> FinalScore:
    """The ``eval.*`` decision rule (default Youden's J) fitted on ``splits.val``, then ``splits.test``
    with ``cfg.train.bootstrap`` resamples (``rwft.core.testtime.score``)."""
    scored = testtime.score([model], splits, cfg, device)
    return FinalScore(scored.metrics | {"source": splits.source}, scored.test_probs)
