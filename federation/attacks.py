"""Simulated adversarial sites, so that robustness is an experiment anyone can rerun.

``federation.attack.sites=[site-0] federation.attack.kind=KIND federation.attack.factor=F``
makes the named simulated sites misbehave (``rwft simulate``, in-process federations):

- ``nan``: every value of the reply is NaN (a crashed or broken site);
- ``scale``: the update is multiplied by ``factor`` (``global + F·(local − global)``;
  ``factor=1000`` is the "×1000 weights" reply that turned FedAvg's model into a coin flip);
- ``signflip``: the update is reversed and scaled (``global − F·(local − global)``);
- ``noise``: the update is replaced by Gaussian noise whose norm is about ``F`` times the
  honest update's;
- ``labelflip``: the site trains on its training images with every label flipped (data
  poisoning); its reply is otherwise honest.

Attacks act on every array of the reply (weights and BatchNorm statistics alike, as a
stock ClientApp could). They apply only to simulated sites (a node with ``partition-id``):
the config travels to every site, and a real hospital's client must never be turned
against the federation by it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from rwft.core.config import AttackConfig
from rwft.core.data import DatasetSplits

UPDATE_ATTACKS = ("nan", "scale", "signflip", "noise")
DATA_ATTACKS = ("labelflip",)


def attack_for(attack: AttackConfig, label: str, node_config: Mapping[str, object]) -> AttackConfig | None:
    """``attack`` if this site (``label``) is a simulated attacker, else ``None``."""
    if attack.kind == "none" or label not in attack.sites or "partition-id" not in node_config:
        return None
    return attack


def poison_data(splits: DatasetSplits, attack: AttackConfig | None) -> DatasetSplits:
    """The splits the site trains on: with ``labelflip`` every training label is flipped."""
    if attack is None or attack.kind not in DATA_ATTACKS:
        return splits
    flipped = dataclasses.replace(splits.train, labels=(splits.num_classes - 1 - splits.train.labels))
    return dataclasses.replace(splits, train=flipped)


def poison_update(received: ArrayRecord, honest: ArrayRecord, attack: AttackConfig | None, seed: int) -> ArrayRecord:
    """The reply's arrays: ``honest`` itself, or what the attack makes of it (see the module docstring)."""
    if attack is None or attack.kind not in UPDATE_ATTACKS:
        return honest
    rng = np.random.default_rng(seed)
    out = {}
    for key in honest.keys():
        start = np.asarray(received[key].numpy(), np.float64)
        update = np.asarray(honest[key].numpy(), np.float64) - start
        if attack.kind == "nan":
            new = np.full_like(update, np.nan)
        elif attack.kind == "scale":
            new = start + attack.factor * update
        elif attack.kind == "signflip":
            new = start - attack.factor * update
        else:  # noise: about factor times the honest update's norm, spread over every coordinate
            scale = attack.factor * np.linalg.norm(update) / np.sqrt(max(update.size, 1))
            new = start + rng.normal(0.0, scale, size=update.shape)
        out[key] = Array(new.astype(honest[key].numpy().dtype))
    return ArrayRecord(out)
