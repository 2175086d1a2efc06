"""Which site a reply speaks for: labels are unique, and bound to the admitting key.

A site names itself (``rwft-client join --site LABEL``, the ``site`` record of its
replies). Left at that, two clients with the same label would be merged into one site,
and a hospital holding any admitted key could report under another hospital's label. So
every reply passes through ``VettedGrid`` before the rounds see it:

- with site keys (``federation.site_keys``), the key's file name is the site's name
  (``rwft.server.admission`` records name -> node id): a reply whose label is not its
  key's name is refused;
- a label already used by another node that is still connected is refused (a site that
  restarts gets a new node id and takes its label back once the old node is gone).

A refused reply becomes an error reply with the reason (the round goes on without it,
and the reason is in the server's log and the round's site errors), and the refused site
is told on its own console, with the next message it gets (as for a rejected update,
``rwft.federation.update_checks.tell_rejected_sites``). Error replies and
sites left out at a round's timeout are named by their label, not by a node id alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Error, Message
from flwr.serverapp import Grid

from rwft.federation.protocol import CONFIG_KEY, SERVER_ROUND_KEY
from rwft.federation.update_checks import Rejection, tell_rejected_sites

IDENTITY_REFUSED = 4001  # the error code of a reply refused here (Flower's own codes are below 1000)


class VettedGrid:
    """``grid`` with every reply's site label checked (see the module docstring); everything else delegated."""

    def __init__(self, grid: Grid, run_dir: str | Path) -> None:
        self._grid = grid
        self._keys_file = Path(run_dir) / "superlink" / "site_keys.json"
        self._sent: dict[str, Message] = {}
        self._owner: dict[str, int] = {}  # label -> the node that used it first
        self._refused: dict[int, Rejection] = {}  # node id -> its last refused reply, until it is told

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        # Messages of the previous exchange still unanswered: rwft.server.rounds.exchange named their sites.
        self._sent.clear()
        messages = tell_rejected_sites(messages, [self._refused.pop(message.metadata.dst_node_id)
                                                  for message in messages if message.metadata.dst_node_id in
                                                  self._refused])
        ids = list(self._grid.push_messages(messages))
        self._sent.update(zip(ids, messages, strict=True))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for reply in self._grid.pull_messages(message_ids):
            original = self._sent.pop(reply.metadata.reply_to_message_id, None)
            if original is None:
                replies.append(reply)
            elif reply.has_error():
                # Errors the SuperLink makes for a site (it went away) come from the SuperLink's own node
                # id: say which site it was, from the message it was sent.
                site = self.name(original.metadata.dst_node_id)
                replies.append(Message(Error(reply.error.code, f"{site}: {reply.error.reason}"), reply_to=original))
            elif (reason := self.refusal(reply.metadata.src_node_id, _label(reply))) is not None:
                print(f"rwft: refused a reply: {reason}", flush=True)
                node_id = reply.metadata.src_node_id
                self._refused[node_id] = Rejection(_round(original), _label(reply), node_id, reason)
                replies.append(Message(Error(IDENTITY_REFUSED, reason), reply_to=original))
            else:
                replies.append(reply)
        return replies

    def name(self, node_id: int) -> str:
        """``site LABEL (node N)`` when the node's label is known, else ``node N``."""
        label = self.site_label(node_id)
        return f"site {label} (node {node_id})" if label else f"node {node_id}"

    def site_label(self, node_id: int) -> str | None:
        """The label node ``node_id`` is known by (its key's name, else the label it first used), or None."""
        return self._registered().get(node_id) or next(
            (label for label, owner in self._owner.items() if owner == node_id), None)

    def refusal(self, node_id: int, label: str) -> str | None:
        """Why node ``node_id`` may not speak for ``label``; None when it may."""
        registered = self._registered()
        if registered:
            name = registered.get(node_id)
            if name is None:
                return f"node {node_id} holds no admitted key (federation.site_keys)"
            if label != name:
                return (f"node {node_id} holds the key of site {name!r} but calls itself {label!r}: a site's label "
                        f"is its key's file name; that site joins with --site {name}")
        owner = self._owner.get(label)
        if owner is not None and owner != node_id and owner in set(self._grid.get_node_ids()):
            return (f"node {node_id} calls itself {label!r}, a label node {owner} already uses: every site "
                    "needs its own --site label")
        self._owner[label] = node_id
        return None

    def _registered(self) -> dict[int, str]:
        """node id -> site name, from the keys the coordinator registered (empty without site keys)."""
        if not self._keys_file.is_file():
            return {}
        return {int(entry["node_id"]): name for name, entry in json.loads(self._keys_file.read_text()).items()}


def _round(instruction: Message) -> int:
    config = instruction.content.config_records.get(CONFIG_KEY)
    value = config.get(SERVER_ROUND_KEY, 0) if config is not None else 0
    return int(value) if isinstance(value, int) else 0


def _label(reply: Message) -> str:
    record = reply.content.config_records.get("site")
    return str(record.get("label", "")) if record is not None else ""
