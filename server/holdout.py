"""The server's own held-out data: how good the global model is, without any site's data.

With ``federation.server_eval=true`` the server loads ``data`` from its config (a dataset
no site trains on; ``rwft simulate`` gives the sites the train split and keeps val and
test here). After every round the global model is scored on the **validation** split
(the curve in TensorBoard); at the end the decision threshold is chosen on validation
and the **test** split is reported once, with bootstrap intervals, by the same function
as ``rwft train`` (``rwft.core.scoring.final_score``).

With ``federation.local_bn`` (FedBN) there is no global BatchNorm: the server scores the
shared weights with the backbone's own BatchNorm layers, which understates what each
site's model (shared weights + its BatchNorm) does; the sites' own scores
(``site/<name>/val``) are the ones to read then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord

from rwft.core.config import RwftConfig
from rwft.core.data import DatasetSplits, load_splits
from rwft.core.engine import evaluate_split, select_device
from rwft.core.errors import DataError
from rwft.core.model import RwftModel
from rwft.core.scoring import FinalScore, final_score
from rwft.federation.protocol import load_shared

# The scores shown per round (the clinical ones; evaluate_split computes more).
ROUND_METRICS = ("auroc", "accuracy", "sensitivity", "specificity", "loss")


@dataclass
class Holdout:
    cfg: RwftConfig
    splits: DatasetSplits
    model: RwftModel  # built like the sites' model; its non-travelling weights stay as built
    device: torch.device

    @classmethod
    def load(cls, cfg: RwftConfig, model: RwftModel) -> Holdout:
        try:
            splits = load_splits(cfg)
        except DataError as exc:
            raise DataError(f"the server's held-out evaluation (federation.server_eval=true) needs data: {exc} "
                            "Point data.root at held-out images no site trains on, or set "
                            "federation.server_eval=false.") from exc
        return cls(cfg, splits, model, select_device(cfg.train))

    def evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        """The global model's scores on the validation split."""
        load_shared(self.model, arrays, self.cfg.federation.local_bn)
        scores = evaluate_split(self.model, self.splits.val, self.cfg, device=self.device)
        return {name: scores[name] for name in ROUND_METRICS}

    def final_score(self, arrays: ArrayRecord) -> FinalScore:
        """Threshold chosen on validation, then the test split with 95% bootstrap intervals (as ``rwft train``)."""
        load_shared(self.model, arrays, self.cfg.federation.local_bn)
        return final_score(self.model, self.splits, self.cfg, self.device)
