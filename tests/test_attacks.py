"""Simulated adversarial sites: each attack does what it says to a real reply, only simulated
sites named in ``federation.attack.sites`` attack, and ``rwft simulate`` runs an attacker
end to end (real SuperLink, Ray actors) with its replies rejected."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from federation_helpers import BIN, TINY
from flwr.app import Array, ArrayRecord

from rwft.core.config import ConfigError, load_config
from rwft.core.data import DatasetSplits, ImageSplit
from rwft.federation.attacks import attack_for, poison_data, poison_update

RECEIVED = ArrayRecord({"weights": Array(np.zeros(100, np.float32)), "statistics": Array(np.ones(4, np.float32))})
HONEST = ArrayRecord({"weights": Array(np.full(100, 0.01, np.float32)),
                      "statistics": Array(np.full(4, 1.1, np.float32))})


def _attack(kind: str, factor: float = 10.0):
    return load_config(None, ["federation.attack.sites=[site-0]", f"federation.attack.kind={kind}",
                              f"federation.attack.factor={factor}"]).federation.attack


def _update(arrays: ArrayRecord, key: str = "weights") -> np.ndarray:
    return arrays[key].numpy().astype(np.float64) - RECEIVED[key].numpy()


@pytest.mark.parametrize(("kind", "factor", "expected"), [("scale", 1000.0, 1000.0), ("signflip", 5.0, -5.0)])
def test_scale_and_signflip_multiply_the_honest_update(kind, factor, expected):
    out = poison_update(RECEIVED, HONEST, _attack(kind, factor), seed=0)
    np.testing.assert_allclose(_update(out), expected * _update(HONEST), rtol=1e-4)
    np.testing.assert_allclose(_update(out, "statistics"), expected * _update(HONEST, "statistics"), rtol=1e-4)
    assert out["weights"].numpy().dtype == np.float32


def test_nan_and_noise():
    assert np.isnan(poison_update(RECEIVED, HONEST, _attack("nan"), seed=0)["weights"].numpy()).all()
    noisy = _update(poison_update(RECEIVED, HONEST, _attack("noise", 10.0), seed=0))
    honest_norm = np.linalg.norm(_update(HONEST))
    assert 7 * honest_norm < np.linalg.norm(noisy) < 13 * honest_norm  # about factor times the honest norm
    assert abs(np.corrcoef(noisy, np.arange(100))[0, 1]) < 0.5  # not the honest direction: noise


def test_labelflip_poisons_the_training_labels_only():
    split = ImageSplit(np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 1, 0]))
    splits = DatasetSplits(split, split, split, ("NORMAL", "PNEUMONIA"), "test")
    poisoned = poison_data(splits, _attack("labelflip"))
    assert poisoned.train.labels.tolist() == [1, 0, 0, 1] and poisoned.val.labels.tolist() == [0, 1, 1, 0]
    assert poison_update(RECEIVED, HONEST, _attack("labelflip"), seed=0) is HONEST


def test_only_named_simulated_sites_attack():
    attack = _attack("scale")
    assert attack_for(attack, "site-0", {"partition-id": 0}) is attack
    assert attack_for(attack, "site-1", {"partition-id": 1}) is None
    # A real hospital's client never turns against the federation, whatever the config says.
    assert attack_for(attack, "site-0", {"site": "site-0", "data-dir": "/x"}) is None
    assert attack_for(_attack("none"), "site-0", {"partition-id": 0}) is None


def test_an_unknown_attack_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="federation.attack.kind"):
        load_config(None, ["federation.attack.kind=bribe"])


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_rwft_simulate_with_an_attacker_rejects_its_replies(tmp_path, pneumoniamnist_npz):
    run_dir = tmp_path / "run"
    done = subprocess.run([str(BIN / "rwft"), "simulate", "--sites", "3", "--cpus", "2", *TINY,
                           f"data.root={pneumoniamnist_npz}", "federation.rounds=2", "federation.server_eval=false",
                           "federation.attack.sites=[site-0]", "federation.attack.kind=nan", f"output_dir={run_dir}"],
                          capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for record in metrics["rounds"][1:]:
        assert [(r["site"], "NaN" in r["reason"]) for r in record["rejected"]] == [("site-0", True)]
    assert "rejected: site-0" in done.stdout + done.stderr
