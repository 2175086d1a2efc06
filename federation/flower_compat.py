"""Every place rwft reaches into Flower's internals, behind one gated door, and why.

rwft builds on Flower's public API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``,
the ``flower-*`` commands). Two things it needs are not public, so they live here, each
as an ``Adjustment`` that is applied only when the installed Flower is the series rwft
was tested with (``TESTED_SERIES``) and every function it touches still has the
parameters rwft relies on (``inspect.signature``). On drift rwft prints which adjustment
is off and what that costs, and keeps working, slower, instead of crashing at the first
message (``gate``). ``RWFT_FLOWER_ADJUSTMENTS=off`` turns them all off, a comma-separated
list of keys (``supernode-waits,grid-waits``) only those: how
``benchmarks/federated_overhead.py`` measures what each buys (``benchmarks/RESULTS.md``).

**Waits** (``SUPERNODE_WAITS``, ``GRID_WAITS``). Flower waits on purpose, sized for slow
links and many nodes:

- the SuperNode sleeps 3 s after each poll of the SuperLink that finds no message, and
  checks every 0.5 s whether the ClientApp's reply is ready
  (``flwr.supernode.start_client_internal``);
- whoever downloads a message whose weights are still being uploaded retries after
  1 s, 2 s, 4 s ... up to 10 s (``pull_objects``): a SuperNode receiving the global model,
  a ClientApp reading it from its SuperNode, and the ServerApp collecting the sites'
  replies (``flwr.superlink.grid.http_grid``);
- ``Grid.send_and_receive`` sleeps 3 s between polls (rwft's own loop,
  ``rwft.server.rounds``, does not use it).

On loopback these waits, not training, were most of a round. Each is capped at ``POLL_S``
by replacing a module attribute that Flower's loops look up at call time.

**The warm worker** (``WARM_WORKER``, ``runtime_api``). ``rwft.clients.worker`` speaks the
SuperNode's ClientApp runtime API from a long-lived process, with Flower's own
functions; without them ``rwft-client join`` runs Flower's stock launcher
(``flower-superexec``), one ClientApp process per message.

Both upstream problems (the fixed idle poll and backoff; the stray reply a SuperNode
keeps after its SuperLink restarts) are written down in the README's "Known limits". The
stray reply needs no internals: ``rwft-client join`` restarts its SuperNode when the
server comes back (``rwft.clients.cli``).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

POLL_S = 0.2  # an idle SuperNode polling at this rate costs about 5% of one core
PULL_BACKOFF = {"initial_backoff": 0.02, "backoff_cap": POLL_S}
TESTED_SERIES = "1.42."  # the Flower releases these adjustments were written and tested against
SWITCH = "RWFT_FLOWER_ADJUSTMENTS"  # "off": run Flower exactly as released; or keys of adjustments to leave off


@dataclass(frozen=True)
class Adjustment:
    key: str  # its name in RWFT_FLOWER_ADJUSTMENTS
    name: str  # what rwft changes
    lost: str  # what the federation loses when it cannot


SUPERNODE_WAITS = Adjustment("supernode-waits", "the SuperNode's capped waits",
                             "an idle SuperNode polls every 3 s and retries downloads after up to 10 s, so each "
                             "round takes seconds longer")
GRID_WAITS = Adjustment("grid-waits", "the ServerApp's capped download waits",
                        "the server collects each reply up to 10 s later, so each round takes seconds longer")
WARM_WORKER = Adjustment("warm-worker", "the warm ClientApp worker",
                         "every message starts a new ClientApp process that imports torch and loads the site's "
                         "data again (Flower's stock path), so each round takes seconds longer")

# The signatures rwft relies on, as (what, parameter names) of the installed, tested Flower.
PULL_OBJECTS = ("object_ids", "pull_object_fn", "max_concurrent_pulls", "max_time", "max_tries_per_object",
                "initial_backoff", "backoff_cap")



def flower_version() -> str:
    from flwr import __version__

    return str(__version__)


def signature_problem(what: str, function: Any, expected: Iterable[str]) -> str | None:
    """Why ``function`` is not what rwft relies on (``None`` when its parameters are exactly ``expected``)."""
    if not callable(function):
        return f"{what} is missing"
    try:
        found = tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return f"{what} has no readable signature"
    expected = tuple(expected)
    if found != expected:
        return f"{what} takes ({', '.join(found)}), rwft expects ({', '.join(expected)})"
    return None


def gate(adjustment: Adjustment, checks: Iterable[tuple[str, Any, Iterable[str]]], *,
         version: str | None = None) -> bool:
    """Whether ``adjustment`` may be applied; if not, say on stderr exactly what is lost, and why.

    ``checks`` are ``(what, function, parameter names)`` triples (``signature_problem``).
    """
    problems = []
    switched_off = {key.strip().lower() for key in os.environ.get(SWITCH, "").split(",")}
    if switched_off & {"off", adjustment.key}:
        problems.append(f"{SWITCH}={os.environ[SWITCH]}")
    version = version or flower_version()
    if not version.startswith(TESTED_SERIES):
        problems.append(f"Flower {version} is not the {TESTED_SERIES}* series rwft was tested with")
    problems += [problem for what, function, expected in checks
                 if (problem := signature_problem(what, function, expected)) is not None]
    if problems:
        print(f"rwft: {adjustment.name} is off ({'; '.join(problems)}): {adjustment.lost}. Flower itself runs "
              "unchanged.", file=sys.stderr, flush=True)
        return False
    return True


class _CappedTime(types.ModuleType):
    """The ``time`` module, except that ``sleep`` never waits longer than ``POLL_S``."""

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, POLL_S))


def patch_supernode(version: str | None = None) -> bool:
    """Cap the SuperNode loop's waits (call before starting it); whether they are capped."""
    from flwr.supernode import start_client_internal as node_loop

    if isinstance(getattr(node_loop, "time", None), _CappedTime):
        return True
    if not gate(SUPERNODE_WAITS, [
            ("start_client_internal.pull_objects", getattr(node_loop, "pull_objects", None), PULL_OBJECTS)],
            version=version) or getattr(node_loop, "time", None) is not time:
        return False
    node_loop.time = _CappedTime("time")  # type: ignore[assignment]
    _cap_pull(node_loop)
    return True


def patch_grid(version: str | None = None) -> bool:
    """Cap the ServerApp's waits for the sites' replies (call in the ServerApp process)."""
    from flwr.superlink.grid import http_grid

    if isinstance(getattr(http_grid, "pull_objects", None), functools.partial):
        return True  # a ServerApp may run twice in one process
    if not gate(GRID_WAITS, [("http_grid.pull_objects", getattr(http_grid, "pull_objects", None), PULL_OBJECTS)],
                version=version):
        return False
    _cap_pull(http_grid)
    return True


def _cap_pull(module: types.ModuleType) -> None:
    module.pull_objects = functools.partial(module.pull_objects, **PULL_BACKOFF)  # type: ignore[attr-defined]


def runtime_api(version: str | None = None) -> types.SimpleNamespace | None:
    """Flower's ClientApp-runtime internals the warm worker speaks (``rwft.clients.worker``), by their
    Flower names; ``None`` (and why, on stderr) when they moved: then use Flower's stock path."""
    try:
        from flwr.common.serde import context_from_proto
        from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
        from flwr.proto.runtime_pb2 import (  # pylint: disable=no-name-in-module
            AcquireTaskRequest,
            PullAppMessagesRequest,
            PullTaskInputRequest,
            SendTaskHeartbeatRequest,
        )
        from flwr.supercore.constant import TaskType
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import (
            ObjectPullError,
            ObjectPushError,
            ObjectUnavailableError,
            pull_and_inflate_object_from_tree,
        )
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output
    except ImportError as exc:
        gate(WARM_WORKER, [(f"{exc.name or 'a Flower module'}", None, ())], version=version)
        return None
    checks = [
        ("run_clientapp.push_message", push_message, ("client", "message", "context")),
        ("run_clientapp.push_task_output", push_task_output, ("client", "context", "sub_status", "details")),
        ("pull_and_inflate_object_from_tree", pull_and_inflate_object_from_tree,
         ("object_tree", "pull_object_fn", "confirm_object_received_fn", "return_type", "max_concurrent_pulls",
          "max_time", "max_tries_per_object", "initial_backoff", "backoff_cap")),
        ("HeartbeatSender", HeartbeatSender, ("heartbeat_fn",)),
        ("RuntimeHttpClient.from_server_address", RuntimeHttpClient.from_server_address,
         ("server_address", "insecure", "root_certificates", "interceptors", "retry_invoker")),
        ("context_from_proto", context_from_proto, ("context_proto",)),
        ("make_simple_http_retry_invoker", make_simple_http_retry_invoker, ()),
        ("make_pull_object_fn_protobuf", make_pull_object_fn_protobuf, ("pull_object_protobuf", "node", "run_id")),
        ("make_confirm_message_received_fn_protobuf", make_confirm_message_received_fn_protobuf,
         ("confirm_message_received_protobuf", "node", "run_id")),
    ]
    if not gate(WARM_WORKER, checks, version=version):
        return None
    return types.SimpleNamespace(
        context_from_proto=context_from_proto, Node=Node, AcquireTaskRequest=AcquireTaskRequest,
        PullAppMessagesRequest=PullAppMessagesRequest, PullTaskInputRequest=PullTaskInputRequest,
        SendTaskHeartbeatRequest=SendTaskHeartbeatRequest, TaskType=TaskType, HeartbeatSender=HeartbeatSender,
        make_confirm_message_received_fn_protobuf=make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf=make_pull_object_fn_protobuf, ObjectPullError=ObjectPullError,
        ObjectPushError=ObjectPushError, ObjectUnavailableError=ObjectUnavailableError, pull_and_inflate_object_from_tree=pull_and_inflate_object_from_tree,
        RuntimeTokenHttpInterceptor=RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor=RuntimeVersionHttpInterceptor,
        make_simple_http_retry_invoker=make_simple_http_retry_invoker, RuntimeHttpClient=RuntimeHttpClient,
        TaskIdentity=TaskIdentity, push_message=push_message, push_task_output=push_task_output)
