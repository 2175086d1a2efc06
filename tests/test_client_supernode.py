"""rwft's adjustments to Flower's SuperNode loop (``rwft.federation.flower_compat``) still apply to
the installed Flower, and a stray reply can no longer hold back the next one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from rwft.federation.flower_compat import POLL_S, _or_waiting_reply


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
    no_message = _or_waiting_reply(lambda **kwargs: None)
    state = _node_state_holding_a_reply(run_id=42)
    assert no_message(state=state) == 42  # the loop then pushes it now ...
    # ... and the push finds it: it asks the state for replies not yet taken.
    assert [m.metadata.run_id for m in state.get_messages_legacy(is_reply=True)] == [42]
    assert no_message(state=state) is None  # taken by the push: nothing waits any more


def test_a_pulled_message_goes_first():
    state = _node_state_holding_a_reply(run_id=42)
    assert _or_waiting_reply(lambda **kwargs: 7)(state=state) == 7
    assert len(state.get_messages_legacy(is_reply=True)) == 1


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
        assert node_loop._pull_and_store_message.__wrapped__.__name__ == "_pull_and_store_message"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr
    assert POLL_S < 1
