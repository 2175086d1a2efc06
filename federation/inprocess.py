"""A Flower ``Grid`` that hands each message straight to a ClientApp in this process.

The ServerApp's code (``rwft.server.app.run_federation``) runs unchanged against it, and
every reply a site sends is kept in ``replies`` for inspection. Each node has its own
``Context`` (node config, persistent state) for the whole run, as a SuperNode keeps it.
Tests that need real processes (SuperLink, SuperNodes, Ray) live in
``test_federation_integration.py``, ``test_resume.py`` and ``test_simulation.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 0


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: Mapping[int, dict[str, Any]],
                 run_config: Mapping[str, Any], *, errors_as_replies: bool = False) -> None:
        """``errors_as_replies``: a ClientApp's exception becomes an error reply, worded as Flower's
        SuperNode runtime words it, instead of reaching the caller (the default, so tests see tracebacks)."""
        self.errors_as_replies = errors_as_replies
        # What Flower's runtime sets in a ServerApp process before messages can be made.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
        self.client_app = client_app
        self.contexts = {node_id: Context(run_id=1, node_id=node_id, node_config=dict(config), state=RecordDict(),
                                          run_config=dict(run_config))
                         for node_id, config in node_configs.items()}
        self.online = set(self.contexts)
        self.instructions: list[Message] = []  # every message the server sent
        self.replies: list[Message] = []  # every message a site sent back
        self._pending: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.instructions.append(message)
            try:
                reply = self.client_app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as exc:
                if not self.errors_as_replies:
                    raise
                reason = str(type(exc)) + ":<'" + str(exc) + "'>"  # flwr.supernode.runtime.run_clientapp's form
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
            self.replies.append(reply)
            self._pending[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(message_id) for message_id in list(message_ids) if message_id in self._pending]

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.online)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)
