"""A warm ClientApp executor: every task of a SuperNode runs in one long-lived process.

With Flower's default isolation a SuperNode starts a new ``flwr-clientapp`` process for
every message, twice per round (train, evaluate): Python, Flower, torch and timm imports
take about 4 s on a 2-core machine, then the site's data and model are set up again.
``rwft-client join`` instead starts the SuperNode with ``--isolation process`` and runs
this loop beside it: it takes each ClientApp task from the SuperNode's runtime API, runs
rwft's ClientApp here, where the imports, the decoded images and the built model stay
warm (``rwft.clients.site``), and hands the reply back. It speaks the runtime API exactly
as a ``flwr-clientapp`` process does (``flwr.supernode.runtime.run_clientapp``), one task
at a time, with Flower's own functions, which are internal: they come through
``rwft.federation.flower_compat.runtime_api``. Should a Flower release move them, this
loop runs Flower's stock launcher instead (``flower-superexec``: one ``flwr-clientapp``
process per message, slower, as ``--isolation subprocess``). Only the wait for a
message's weights is shorter than Flower's (``PULL_BACKOFF``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus

from rwft.federation.flower_compat import POLL_S, PULL_BACKOFF, runtime_api
from rwft.federation.processes import scripts_first_on_path

STALL_S = 30.0  # even over a slow link a 5 MB chunk of weights arrives well within this
TRY_GAP_S = 5.0  # tries come every POLL_S at most; a longer gap is time this process was stopped, not waiting


def serve(runtime_address: str, client_app: ClientApp, stop: threading.Event) -> None:
    """Run the SuperNode's ClientApp tasks with ``client_app`` until ``stop`` is set."""
    api = runtime_api()
    if api is None:
        serve_stock(runtime_address, stop)
        return
    acquirer = _runtime_client(api, runtime_address, stop)
    try:
        while not stop.is_set():
            try:
                response = acquirer.AcquireTask(api.AcquireTaskRequest(supported_task_types=[api.TaskType.CLIENT_APP]))
                if response.HasField("task") and response.token:
                    run_task(api, runtime_address, response.token, client_app, stop)
                    continue
            except httpx.HTTPError as exc:  # the SuperNode is restarting or gone (then ``stop`` is set)
                if not stop.is_set():
                    print(f"rwft: lost the SuperNode's runtime API ({exc}); retrying", file=sys.stderr, flush=True)
            except Exception:  # noqa: BLE001 - one task's failure must not take the site out of the federation
                print("rwft: a task could not be completed; serving the next one:", file=sys.stderr, flush=True)
                traceback.print_exc()
            stop.wait(POLL_S)
    finally:
        acquirer.close()


def serve_stock(runtime_address: str, stop: threading.Event) -> None:
    """Flower's own launcher for the SuperNode's ClientApp tasks, until ``stop`` is set."""
    # flower-superexec starts each ClientApp as `flwr-clientapp`, by name.
    launcher = subprocess.Popen([str(Path(sys.executable).parent / "flower-superexec"), "--insecure",
                                 "--runtime-api-address", runtime_address, "--plugin-type", "clientapp"],
                                env=scripts_first_on_path(dict(os.environ)))
    try:
        while not stop.wait(POLL_S) and launcher.poll() is None:
            pass
    finally:
        launcher.terminate()
        try:
            launcher.wait(30)
        except subprocess.TimeoutExpired:
            launcher.kill()


def run_task(api: types.SimpleNamespace, runtime_address: str, token: str, client_app: ClientApp,
             stop: threading.Event) -> None:
    """Pull one task's message and context, run ``client_app`` on it, push the reply and context."""
    client = _runtime_client(api, runtime_address, stop, api.RuntimeTokenHttpInterceptor(token))
    heartbeat = api.HeartbeatSender(lambda: _send_heartbeat(api, client))
    heartbeat.start()
    context: Context | None = None
    status, details = SubStatus.FAILED, ""
    try:
        try:
            message, context = _pull_task_input(api, client)
        except (api.ObjectPullError, RuntimeError) as exc:
            details = f"the task's message could not be read: {exc}"
            print(f"rwft: skipped a task: {details}", file=sys.stderr, flush=True)
            return
        try:
            reply = client_app(message=message, context=context)
            status = SubStatus.COMPLETED
        except Exception as exc:  # noqa: BLE001 - one failed task must not stop the site
            # rwft's ClientApp printed its traceback here and reduced the error to its type
            # (rwft.clients.app); this is what the server sees.
            details = f"{type(exc).__name__}: {exc}"
            print(f"rwft: the task failed: {details}", file=sys.stderr, flush=True)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        try:
            api.push_message(client, reply, context)
        except api.ObjectPushError as exc:
            # The SuperNode sent the reply on and dropped it before this process had handed over all
            # of it: the server no longer wanted it (the round went on without this site, which was
            # stopped or too slow). The site is fine; it serves the next round.
            status, details = SubStatus.FAILED, f"the reply came too late for its round ({exc})"
            print(f"rwft: {details}; serving the next round", file=sys.stderr, flush=True)
    finally:
        heartbeat.stop()
        api.push_task_output(client, context, status, details)
        client.close()


def _pull_task_input(api: types.SimpleNamespace, client: Any) -> tuple[Message, Context]:
    """``run_clientapp.pull_task_input``, waiting for the weights at ``POLL_S`` instead of 1 s, 2 s, ..."""
    task_input = client.PullTaskInput(api.PullTaskInputRequest())
    api.TaskIdentity.task_id = task_input.task_id
    api.TaskIdentity.run_id = task_input.run.run_id
    api.TaskIdentity.node_id = task_input.context.node_id
    context = api.context_from_proto(task_input.context)
    pulled = client.PullMessages(api.PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed out a task without a message")
    tree = pulled.message_object_trees[0]
    node = api.Node(node_id=context.node_id)
    message = api.pull_and_inflate_object_from_tree(
        tree,
        _stall_guard(api, api.make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)),
        api.make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        **PULL_BACKOFF,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: not part of the content
    return message, context


def _stall_guard(api: types.SimpleNamespace, pull: Callable[[str], bytes]) -> Callable[[str], bytes]:
    """``pull``, giving up once no part of the message has arrived for ``STALL_S`` seconds.

    The SuperNode hands out a task before it has the message's weights, and when the
    SuperLink goes down mid-transfer (a server crash) Flower leaves that task behind with
    weights that will never come. Abandoning it lets this site serve the resumed federation.
    Only time spent waiting counts: a gap between two tries longer than ``TRY_GAP_S`` means
    this process was not running (SIGSTOP, a suspended machine), and such a stalled site,
    once it runs again, gets the message the SuperNode is still receiving instead of
    abandoning it (the SuperNode would then wait for that task's reply and take no new one).
    """
    waited, last_try = 0.0, time.monotonic()

    def guarded(object_id: str) -> bytes:
        nonlocal waited, last_try
        now = time.monotonic()
        waited, last_try = waited + min(now - last_try, TRY_GAP_S), now
        try:
            content = pull(object_id)
        except api.ObjectUnavailableError:
            if waited > STALL_S:
                raise api.ObjectPullError(object_id, f"no part of the message arrived for {STALL_S:.0f} s") from None
            raise
        waited = 0.0
        return content

    return guarded


def _send_heartbeat(api: types.SimpleNamespace, client: Any) -> bool:
    try:
        return bool(client.SendTaskHeartbeat(api.SendTaskHeartbeatRequest()).success)
    except httpx.HTTPError:
        return False


def _runtime_client(api: types.SimpleNamespace, address: str, stop: threading.Event, *interceptors: Any) -> Any:
    """A client of the SuperNode's runtime API that retries as Flower's does, until ``stop`` is set.

    Flower's ClientApp process retries for ever, which is right for a process that dies
    with its SuperNode; this loop lives in ``rwft-client`` itself, which must notice a
    SuperNode that exited (a refused TLS certificate, say) and say why.
    """
    retry = api.make_simple_http_retry_invoker()
    flower_should_giveup = retry.should_giveup
    retry.should_giveup = lambda exc: stop.is_set() or bool(flower_should_giveup and flower_should_giveup(exc))
    return api.RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[api.RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors],
        retry_invoker=retry,
    )
