"""``rwft simulate``: the same ServerApp and ClientApp on Flower's simulation engine (Ray)."""

from __future__ import annotations

import json
import subprocess

import pytest
from federation_helpers import BIN, TINY

from rwft.server.simulation import main

pytestmark = pytest.mark.integration


@pytest.mark.timeout(840)
def test_tiny_simulation_of_two_hospitals_with_label_skew_then_resumed(tmp_path, pneumoniamnist_npz):
    run_dir = tmp_path / "run"
    done = subprocess.run([str(BIN / "rwft"), "simulate", "--sites", "2", "--partition", "dirichlet:0.5",
                           "--cpus", "2", *TINY, f"data.root={pneumoniamnist_npz}", "federation.rounds=2",
                           f"output_dir={run_dir}"], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Per-site class counts first: dirichlet:0.5 over the 1200 sampled training images.
    table = done.stdout.split("training images per site and class")[1]
    assert "NORMAL" in table and "PNEUMONIA" in table and "all" in table and "1200" in table
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2] and metrics["complete"]
    assert set(metrics["rounds"][2]["sites"]) == {"site-0", "site-1"}
    assert (run_dir / "sites" / "site-0" / "tb").is_dir()  # the simulated sites' own logs

    # Resumed with one more round: rounds 1 and 2 stay as they were, round 3 is added.
    resumed = subprocess.run([str(BIN / "rwft"), "simulate", "--resume", str(run_dir), "--cpus", "2",
                              "federation.rounds=3"], capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming after round 2 of 3" in resumed.stdout + resumed.stderr
    after = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in after["rounds"]] == [0, 1, 2, 3] and after["complete"]
    for before, kept in zip(metrics["rounds"], after["rounds"][:3], strict=True):
        # What the round committed is kept; only the sites' scores of round 2's model, which
        # arrive with round 3, are added to it.
        assert (kept["finished_at"], kept["global"]) == (before["finished_at"], before["global"])
        assert kept.get("train") == before.get("train")


def test_a_bad_partition_scheme_is_refused_before_anything_starts(tmp_path, pneumoniamnist_npz, capsys):
    code = main(["--sites", "2", "--partition", "dirichlet:-1", f"data.root={pneumoniamnist_npz}",
                 f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "partition scheme 'dirichlet:-1' is not valid" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
