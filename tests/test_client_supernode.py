"""rwft's adjustments to Flower's SuperNode loop (``rwft.core.flower_patches``) still apply to
the installed Flower, and a stray reply can no longer hold back the next one."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from rwft.core.flower_patches import POLL_S, _or_waiting_reply


class _Reply:
    class metadata:  # noqa: N801 - mimics Message.metadata
        run_id = 42


class _State:
    def __init__(self, replies):
        self.replies = replies

    def get_messages_legacy(self, is_reply):
        assert is_reply
        return self.replies


def test_a_waiting_reply_is_pushed_even_when_no_message_comes():
    no_message = _or_waiting_reply(lambda **kwargs: None)
    assert no_message(state=_State([_Reply()])) == 42  # the loop then pushes it now
    assert no_message(state=_State([])) is None
    assert _or_waiting_reply(lambda **kwargs: 7)(state=_State([_Reply()])) == 7


def test_the_patches_apply_to_the_installed_flower():
    # In a fresh interpreter, as in `python -m rwft.clients.supernode`: nothing else patched yet.
    code = textwrap.dedent("""
        import time
        from rwft.core.flower_patches import patch_grid, patch_supernode
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
