"""rwft's adjustments to Flower (``rwft.federation.flower_compat``) still apply to the installed
Flower, a stray reply can no longer hold back the next one, and when Flower drifts (another
release series, a changed signature) each adjustment is dropped with a message saying what is
lost, while Flower runs unchanged."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from rwft.federation.flower_compat import (
    POLL_S,
    STRAY_REPLY,
    SUPERNODE_WAITS,
    WARM_WORKER,
    _or_waiting_reply,
    gate,
    runtime_api,
    signature_problem,
)


def _node_state_holding_a_reply(run_id: int):
    """Flower's own SuperNode state, holding one ClientApp reply that waits to be pushed."""
    from flwr.app import Message, Metadata, RecordDict
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate import NodeStateFactory

    state = NodeStateFactory(ObjectStoreFactory()).state()
    # The instruction as the SuperLink hands it out (its metadata set by the SuperLink).
    instruction = Message(RecordDict(), metadata=Metadata(
        run_id=run_id, message_id="", src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="2",
        created_at=time.time(), ttl=3600, message_type="train"))
    instruction.metadata.__dict__["_message_id"] = instruction.object_id
    reply = Message(RecordDict(), reply_to=instruction)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    state.store_message(reply)
    return state


def test_a_waiting_reply_is_pushed_even_when_no_message_comes():
    no_message = _or_waiting_reply(lambda *, state: None)
    state = _node_state_holding_a_reply(run_id=42)
    assert no_message(state=state) == 42  # the loop then pushes it now ...
    # ... and the push finds it: it asks the state for replies not yet taken.
    assert [m.metadata.run_id for m in state.get_messages_legacy(is_reply=True)] == [42]
    assert no_message(state=state) is None  # taken by the push: nothing waits any more


def test_a_pulled_message_goes_first():
    state = _node_state_holding_a_reply(run_id=42)
    assert _or_waiting_reply(lambda *, state: 7)(state=state) == 7
    assert len(state.get_messages_legacy(is_reply=True)) == 1


def test_the_patches_apply_to_the_installed_flower():
    # In a fresh interpreter, as in `python -m rwft.clients.supernode`: nothing else patched yet.
    code = textwrap.dedent("""
        import time
        from rwft.federation.flower_compat import patch_grid, patch_supernode
        import flwr.supernode.start_client_internal as node_loop
        assert all(patch_supernode().values()) and all(patch_supernode().values()) and patch_grid()
        started = time.monotonic()
        node_loop.time.sleep(3)
        assert time.monotonic() - started < 1, "the 3 s idle wait is not capped"
        assert node_loop.pull_objects.keywords["backoff_cap"] <= 1
        assert node_loop._pull_and_store_message.__wrapped__.__name__ == "_pull_and_store_message"
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
    def pull_and_store(state, object_store, node_config, receive, *, timeout):  # a later Flower's, say
        return None

    assert "takes (state, object_store, node_config, receive, timeout)" in signature_problem(
        "_pull_and_store_message", pull_and_store, ("state", "object_store"))
    assert not gate(STRAY_REPLY, [("_pull_and_store_message", pull_and_store, ("state", "object_store"))])
    assert "a site may answer the resumed federation with a stale reply" in capsys.readouterr().err
    monkeypatch.setenv("RWFT_FLOWER_ADJUSTMENTS", "off")
    assert not gate(WARM_WORKER, [])
    assert "RWFT_FLOWER_ADJUSTMENTS=off" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_a_drifted_supernode_keeps_its_other_adjustments_and_stays_stock_where_it_drifted():
    # In a fresh interpreter: Flower's _pull_and_store_message "changed" before rwft patches.
    code = textwrap.dedent("""
        import time
        import flwr.supernode.start_client_internal as node_loop
        stock = node_loop._pull_and_store_message
        def changed(state, object_store, node_config, receive, get_run, get_fab, pull_object, confirm):
            return stock(state, object_store, node_config, receive, get_run, get_fab, pull_object, confirm, None)
        node_loop._pull_and_store_message = changed
        from rwft.federation.flower_compat import patch_supernode
        applied = patch_supernode()
        assert applied == {"the SuperNode's capped waits": True, "the SuperNode's push of a waiting reply": False}
        assert node_loop._pull_and_store_message is changed  # left as Flower has it
        assert node_loop.time.sleep is not time.sleep  # the waits are still capped
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.stdout.strip() == "ok", done.stderr
    assert "the SuperNode's push of a waiting reply is off (start_client_internal._pull_and_store_message takes " \
        "(state, object_store, node_config, receive, get_run, get_fab, pull_object, confirm)" in done.stderr


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
