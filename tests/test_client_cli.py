"""``rwft-client join``: the local data check comes first, and leaving stops the SuperNode."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from federation_helpers import Started, make_site_files, wait_for

from rwft.clients.cli import main
from rwft.federation.processes import free_port


def test_an_empty_site_is_refused_before_anything_starts(tmp_path, capsys):
    site = tmp_path / "empty"
    (site / "NORMAL").mkdir(parents=True)
    (site / "PNEUMONIA").mkdir()
    work = tmp_path / "work"
    code = main(["join", "--site", "hospitalA", "--server", "127.0.0.1:9", "--data", str(site),
                 "--workdir", str(work)])
    assert code == 2
    assert "rwft-client: error:" in capsys.readouterr().err
    assert not work.exists()  # no SuperNode, no files


def test_a_path_is_refused_as_a_site_label(tmp_path, capsys):
    assert main(["join", "--site", "/home/alice/site", "--server", "127.0.0.1:9", "--data", str(tmp_path)]) == 2
    assert "pseudonym" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_sigterm_leaves_the_federation_and_stops_the_supernode(tmp_path, pneumoniamnist_npz):
    data = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")[0]
    # No SuperLink at this address: the SuperNode keeps trying to connect, as it would while
    # the server restarts.
    client = Started([str(Path(sys.executable).parent / "rwft-client"), "join", "--site", "hospitalA",
                      "--server", f"127.0.0.1:{free_port()}", "--data", str(data), "--workdir",
                      str(tmp_path / "work"), "--image-size", "28"], tmp_path / "client.log")
    try:
        wait_for(lambda: "connecting to" in client.text() and _children(client.process.pid), 120, "the SuperNode")
        supernode = _children(client.process.pid)[0]
        time.sleep(2)
        os.kill(client.process.pid, signal.SIGTERM)  # to rwft-client alone, as `kill PID` does
        assert client.wait(timeout=60) == 130
        wait_for(lambda: not Path(f"/proc/{supernode}").exists(), 30, "the SuperNode to exit")
    finally:
        client.stop()
    assert "every file is readable" in client.text() and "left the federation" in client.text()
