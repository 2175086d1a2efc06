"""The round loop never waits forever: too few sites and silent sites end in clear outcomes."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from rwft.server.rounds import NO_REPLY_IN_TIME, FederationError, exchange, wait_for_sites


class SilentGrid:
    """A grid with ``online`` nodes, of which only ``answering`` ever reply."""

    def __init__(self, online: int, answering: int) -> None:
        self.online, self.answering, self.sent = online, answering, []

    def get_node_ids(self):
        return list(range(1, self.online + 1))

    def push_messages(self, messages):
        self.sent = list(messages)
        for message in self.sent:
            message.metadata.__dict__["_message_id"] = message.object_id
        return [m.metadata.message_id for m in self.sent]

    def pull_messages(self, message_ids):
        return [Message(RecordDict(), reply_to=m) for m in self.sent[:self.answering]
                if m.metadata.message_id in set(message_ids)]


def test_waiting_for_sites_ends_with_a_clear_error():
    started = time.monotonic()
    with pytest.raises(FederationError, match=r"only 1 of federation.min_sites=2 sites are connected after 1 s"):
        wait_for_sites(SilentGrid(online=1, answering=1), min_sites=2, timeout_s=1.0)
    assert time.monotonic() - started < 5


def test_a_round_goes_on_with_the_replies_it_has_after_the_timeout():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = SilentGrid(online=3, answering=2)
    messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type="train")
                for n in grid.get_node_ids()]
    started = time.monotonic()
    replies = exchange(grid, messages, timeout_s=1.0)
    assert len(replies) == 3 and 1.0 <= time.monotonic() - started < 3
    # The silent site gets an error reply in its place: the round's record names it.
    late = [reply for reply in replies if reply.has_error()]
    assert [reply.metadata.src_node_id for reply in late] == [3] and late[0].error.code == NO_REPLY_IN_TIME
    assert "no reply within federation.round_timeout_s=1 s" in late[0].error.reason


def test_a_late_site_is_named_by_its_label(capsys):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = SilentGrid(online=2, answering=1)
    grid.site_label = {2: "hospitalB"}.get  # as VettedGrid knows it
    messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type="train")
                for n in grid.get_node_ids()]
    exchange(grid, messages, timeout_s=0.5)
    assert "rwft: site hospitalB (node 2): no reply within federation.round_timeout_s=0.5 s" in capsys.readouterr().out
