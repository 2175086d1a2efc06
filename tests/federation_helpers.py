"""Shared by the federation tests: real site data, a tiny budget, and processes that always stop.

Sites get real PneumoniaMNIST images (``../shared/data``): each site's npz holds its own
part of every official split, in MedMNIST's layout, as a hospital's export would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rwft.core.partition import write_site_files

BIN = Path(sys.executable).parent

# Seconds per round on 2 CPU cores, yet enough training that the global model improves.
TINY = ["data.image_size=28", "train.batch_size=32", "train.max_steps_per_epoch=8", "train.lr=0.002",
        "data.max_train_images=1200", "train.bootstrap=50", "train.device=cpu"]


def make_site_files(npz: Path, count: int, out: Path, scheme: str = "iid") -> list[Path]:
    """``count`` MedMNIST-layout npz files, each with its own part of every split of ``npz``."""
    return write_site_files(npz, count, out, scheme)


class Started:
    """A command started in its own process group, output to ``log``; ``stop`` ends the whole group."""

    def __init__(self, command: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(list(command), stdout=self._out, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=env)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def kill9(self) -> None:
        """What a crash does: SIGKILL to the command and every process it started in its group."""
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self._out.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def join(site: str, server: str, data: Path, work: Path, image_size: int = 28, extra: Sequence[str] = ()) -> Started:
    """``rwft-client join`` for one site (``extra``: more of its arguments)."""
    return Started([str(BIN / "rwft-client"), "join", "--site", site, "--server", server, "--data", str(data),
                    "--workdir", str(work), "--image-size", str(image_size), "--threads", "1", *extra],
                   work.parent / f"{site}.log")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def in_process_federation(tmp_path: Path, npz: Path, overrides: Sequence[str] = (), *, sites: int = 2,
                          registries=None, simulated: bool = True):
    """Run a whole federation in this process (``federation/inprocess.py``); returns the grid and config.

    Simulated sites (``partition-id``) split ``npz``'s train split; otherwise each site gets
    its own npz file, as ``rwft-client join`` would.
    """
    from rwft.clients.app import app as client_app
    from rwft.core.config import load_config
    from rwft.federation.inprocess import InProcessGrid
    from rwft.server.app import run_federation
    from rwft.server.launch import prepare_federation

    cfg, run_config = prepare_federation(load_config(None, [*TINY, "data.max_train_images=300",
                                                            "train.max_steps_per_epoch=2", f"data.root={npz}",
                                                            f"output_dir={tmp_path / 'run'}", *overrides]),
                                         resume=False)
    if simulated:
        nodes = {10 + i: {"partition-id": i, "num-partitions": sites} for i in range(sites)}
    else:
        files = make_site_files(npz, sites, tmp_path / "data")
        nodes = {10 + i: {"site": f"hospital{i}", "data-dir": str(path), "work-dir": str(tmp_path / f"site{i}")}
                 for i, path in enumerate(files)}
    grid = InProcessGrid(client_app, nodes, run_config)
    run_federation(grid, run_config, registries)
    return grid, cfg, run_config
