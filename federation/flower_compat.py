"""Where rwft adjusts Flower 1.42 at run time, in its own processes only, and why.

**Waits.** Flower waits on purpose in several places, sized for slow links and many nodes:

- the SuperNode sleeps 3 s after each poll of the SuperLink that finds no message, and
  checks every 0.5 s whether the ClientApp's reply is ready
  (``flwr.supernode.start_client_internal``);
- whoever downloads a message whose weights are still being uploaded retries after
  1 s, 2 s, 4 s ... up to 10 s (``pull_objects``): a SuperNode receiving the global model,
  a ClientApp reading it from its SuperNode, and the ServerApp collecting the sites'
  replies (``flwr.superlink.grid.http_grid``);
- ``Grid.send_and_receive`` sleeps 3 s between polls (rwft's own loop,
  ``rwft.server.rounds``, does not use it).

On loopback these waits, not training, were most of a round
(``benchmarks/RESULTS.md``). Each is capped at ``POLL_S``.

**A reply left behind.** The SuperNode pushes replies only right after it has pulled a
message, and then all replies it has. When the server dies while a message is on its
way, the SuperNode gives up on that message but leaves its task behind; the ClientApp
still answers it, that stray reply is pushed in place of the next message's, and the
next message's real reply then waits for a message that never comes (the server is
waiting for the reply). The SuperNode here also pushes waiting replies when no message
comes.

Each adjustment replaces a module attribute that Flower's loops look up at call time.
Should a Flower release move them, nothing is patched, rwft says so, and rounds are
slower (or, for the stray reply, a resumed federation may need its sites restarted).
"""

from __future__ import annotations

import functools
import sys
import time
import types
from typing import Any

POLL_S = 0.2  # an idle SuperNode polling at this rate costs about 5% of one core
PULL_BACKOFF = {"initial_backoff": 0.02, "backoff_cap": POLL_S}


class _CappedTime(types.ModuleType):
    """The ``time`` module, except that ``sleep`` never waits longer than ``POLL_S``."""

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, POLL_S))


def patch_supernode() -> bool:
    """Cap the SuperNode loop's waits and let it push stray replies (call before starting it)."""
    from flwr.supernode import start_client_internal as node_loop

    if isinstance(getattr(node_loop, "time", None), _CappedTime):
        return True  # already patched in this process
    if not (isinstance(getattr(node_loop, "time", None), types.ModuleType) and _has_pull(node_loop)
            and callable(getattr(node_loop, "_pull_and_store_message", None))):
        return _unchanged("SuperNode")
    node_loop.time = _CappedTime("time")  # type: ignore[assignment]
    _cap_pull(node_loop)
    node_loop._pull_and_store_message = _or_waiting_reply(node_loop._pull_and_store_message)  # type: ignore[attr-defined]
    return True


def patch_grid() -> bool:
    """Cap the ServerApp's waits for the sites' replies (call in the ServerApp process)."""
    from flwr.superlink.grid import http_grid

    if not _has_pull(http_grid):
        return _unchanged("ServerApp grid")
    _cap_pull(http_grid)
    return True


def _or_waiting_reply(pull_and_store: Any) -> Any:
    """The SuperNode's message pull; when it brings nothing but a reply waits, name that reply's run.

    The loop pushes replies only after a pull that names a run, so this lets it push the
    waiting reply now instead of after the next message.
    """
    @functools.wraps(pull_and_store)
    def pull(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull_and_store(*args, **kwargs)
        state = kwargs["state"]
        if run_id is None and (waiting := state.get_messages_legacy(is_reply=True)):
            # get_messages_legacy marks what it returns as taken, and the push that follows
            # asks for untaken replies only: left taken, it would wait for them forever
            # (the hang of a resumed federation). Put them back as they were.
            for reply in waiting:
                state.delete_messages(message_ids=[reply.metadata.message_id])
                state.store_message(reply)
            return int(waiting[0].metadata.run_id)
        return run_id

    return pull


def _has_pull(module: types.ModuleType) -> bool:
    return callable(getattr(module, "pull_objects", None))


def _cap_pull(module: types.ModuleType) -> None:
    pull = module.pull_objects  # type: ignore[attr-defined]
    if not isinstance(pull, functools.partial):  # idempotent: a ServerApp may run twice in one process
        module.pull_objects = functools.partial(pull, **PULL_BACKOFF)  # type: ignore[attr-defined]


def _unchanged(what: str) -> bool:
    print(f"rwft: this Flower version's {what} is not laid out as rwft expects; it runs unchanged "
          "(rounds take longer)", file=sys.stderr)
    return False
