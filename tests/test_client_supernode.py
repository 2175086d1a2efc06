"""rwft's adjustments to Flower (``rwft.federation.flower_compat``) still apply to the installed
Flower, and when Flower drifts (another release series, a changed signature) each adjustment is
dropped with a message saying what is lost, while Flower runs unchanged."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from rwft.federation.flower_compat import (
    POLL_S,
    SUPERNODE_WAITS,
    WARM_WORKER,
    gate,
    runtime_api,
    signature_problem,
)


def test_the_patches_apply_to_the_installed_flower():
    # In a fresh interpreter, as in `python -m rwft.clients.supernode`: nothing else patched yet.
    code = textwrap.dedent("""
        import time
        from rwft.federation.flower_compat import patch_grid, patch_supernode
        import flwr.supernode.start_client_internal as node_loop
        assert patch_supernode() and patch_supernode() and patch_grid()
        started = time.monotonic()
        node_loop.time.sleep(3)
        assert time.monotonic() - started < 1, "the 3 s idle wait is not capped"
        assert node_loop.pull_objects.keywords["backoff_cap"] <= 1
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr
    assert POLL_S < 1


def test_the_warm_workers_flower_internals_are_the_ones_rwft_was_written_for():
    api = runtime_api()
    assert api is not None and callable(api.push_message) and callable(api.pull_and_inflate_object_from_tree)


def test_another_flower_series_turns_each_adjustment_off_and_says_what_is_lost(capsys):
    assert gate(SUPERNODE_WAITS, [], version="1.42.3")
    assert not gate(SUPERNODE_WAITS, [], version="1.43.0")
    said = capsys.readouterr().err
    assert "the SuperNode's capped waits is off (Flower 1.43.0 is not the 1.42.* series" in said
    assert "polls every 3 s" in said and "Flower itself runs unchanged" in said
    assert runtime_api(version="2.0.0") is None  # rwft-client then runs Flower's stock launcher
    assert "the warm ClientApp worker is off" in capsys.readouterr().err


def test_a_changed_signature_turns_the_adjustment_off(capsys, monkeypatch):
    def pull_objects(object_ids, pull_object_fn, *, timeout):  # a later Flower's, say
        return {}

    assert "takes (object_ids, pull_object_fn, timeout)" in signature_problem(
        "pull_objects", pull_objects, ("object_ids", "pull_object_fn"))
    assert not gate(SUPERNODE_WAITS, [("pull_objects", pull_objects, ("object_ids", "pull_object_fn"))])
    assert "an idle SuperNode polls every 3 s" in capsys.readouterr().err
    monkeypatch.setenv("RWFT_FLOWER_ADJUSTMENTS", "off")
    assert not gate(WARM_WORKER, [])
    assert "RWFT_FLOWER_ADJUSTMENTS=off" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_a_drifted_supernode_stays_stock():
    # In a fresh interpreter: Flower's pull_objects "changed" before rwft patches.
    code = textwrap.dedent("""
        import time
        import flwr.supernode.start_client_internal as node_loop
        stock = node_loop.pull_objects
        def changed(object_ids, pull_object_fn, *, timeout=None):
            return stock(object_ids, pull_object_fn)
        node_loop.pull_objects = changed
        from rwft.federation.flower_compat import patch_supernode
        assert patch_supernode() is False
        assert node_loop.pull_objects is changed and node_loop.time is time  # left as Flower has it
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.stdout.strip() == "ok", done.stderr
    assert "the SuperNode's capped waits is off (start_client_internal.pull_objects takes " \
        "(object_ids, pull_object_fn, timeout)" in done.stderr


def test_the_warm_worker_abandons_a_message_that_stops_arriving_but_not_one_it_was_stopped_for(monkeypatch):
    """A SuperLink gone mid-transfer: the task is given up after STALL_S of waiting. A site whose
    own process was stopped (SIGSTOP, a suspended machine) waited for nothing: once it runs
    again it keeps pulling (abandoning the task left the SuperNode waiting for a reply for ever)."""
    from rwft.clients import worker

    api = runtime_api()
    monkeypatch.setattr(worker, "STALL_S", 0.5)
    monkeypatch.setattr(worker, "TRY_GAP_S", 0.1)

    def never(object_id: str) -> bytes:
        raise api.ObjectUnavailableError(object_id)

    guarded = worker._stall_guard(api, never)
    started = time.monotonic()
    with pytest.raises(api.ObjectPullError, match="no part of the message arrived"):
        while True:
            try:
                guarded("abc")
            except api.ObjectUnavailableError:
                time.sleep(0.05)
    assert 0.5 <= time.monotonic() - started < 5

    arrived = {"now": False}

    def later(object_id: str) -> bytes:
        if not arrived["now"]:
            raise api.ObjectUnavailableError(object_id)
        return b"weights"

    guarded = worker._stall_guard(api, later)
    with pytest.raises(api.ObjectUnavailableError):
        guarded("abc")
    time.sleep(1.0)  # this process "stopped" for twice STALL_S
    with pytest.raises(api.ObjectUnavailableError):
        guarded("abc")  # still waiting, not abandoned
    arrived["now"] = True
    assert guarded("abc") == b"weights"
