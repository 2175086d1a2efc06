"""The federated rounds: Flower's strategy methods, one exchange per round, from any round.

Each round calls the strategy as ``Strategy.start`` does (``configure_train`` -> replies ->
``aggregate_train``), so every ``flwr.serverapp.strategy`` works unchanged. Three things
differ, and are why this loop exists:

- **One exchange per round.** ``Strategy.start`` follows every training exchange with an
  evaluation exchange that sends the new global model to every site again. Here the
  training message does both: a site first scores the model it receives on its
  validation split, then trains (``rwft.clients.app``). So round r's replies carry the
  sites' scores of round r-1's global model, and after the last round one evaluation
  exchange (``evaluate_model``, the strategy's ``configure_evaluate``)
  scores the final model (the strategy's ``aggregate_evaluate`` is not used: the sites'
  scores are averaged by ``rwft.federation.protocol.mean_scores``, the same way every
  round). Every round moves the model down once instead of twice.
- **It starts at any round.** A resumed federation goes on at the round after its last
  checkpoint, with the real round number (FedAdam's bias correction depends on it).
- **No idle waits.** It polls for replies every ``POLL_S`` seconds, where
  ``Grid.send_and_receive`` sleeps 3 s (``rwft.federation.flower_compat`` has the other waits).

It also refuses to wait forever: before each round it waits at most
``federation.wait_timeout_s`` for ``federation.min_sites`` sites (Flower's node sampling
would wait silently without end), and a round goes on with the replies it has after
``federation.round_timeout_s``: a site that has not answered by then is recorded as failed,
by its label, with the reason (``NO_REPLY_IN_TIME``), and the server's log names it at once.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from rwft.core.config import UpdateChecksConfig
from rwft.core.errors import RwftError
from rwft.federation.flower_compat import POLL_S
from rwft.federation.protocol import SITE_LABEL, EvaluateReply, TrainReply, label_of, mean_scores, update_norm
from rwft.federation.update_checks import Rejection, check_replies, finite_arrays, tell_rejected_sites

NO_REPLY_IN_TIME = 4002  # the error code of the reply ``exchange`` makes for a site that did not answer in time
SiteLabels = Callable[[int], "str | None"]  # node id -> the site label the server knows it by, if any


class FederationError(RwftError):
    """The federation cannot go on (too few sites, every reply failed)."""


@dataclass
class Evaluation:
    """How the sites scored one round's global model on their validation splits (scope ``global_val``)."""

    round: int
    sites: dict[str, dict[str, float]]  # site label -> its scores
    val_examples: dict[str, int]  # site label -> its validation images
    aggregate: dict[str, float]  # weighted by each site's number of validation images (``mean_scores``)

    @classmethod
    def of(cls, server_round: int, sites: dict[str, tuple[dict[str, float], int]]) -> Evaluation:
        return cls(server_round, {label: scores for label, (scores, _) in sites.items()},
                   {label: count for label, (_, count) in sites.items()}, mean_scores(sites.values()))


@dataclass
class SiteResult:
    """What one site reported about its training in one round (numbers only, see ``rwft.clients.app``)."""

    label: str
    node_id: int
    train: dict[str, float] = field(default_factory=dict)  # scope ``train``: loss, steps, num-examples
    local_val: dict[str, float] = field(default_factory=dict)  # scope ``local_val``
    update_l2: float | None = None  # ||site weights - global weights sent||
    error: str = ""  # why its reply failed, if it did


@dataclass
class RoundResult:
    round: int
    arrays: ArrayRecord  # the new global weights
    train: dict[str, float]  # the strategy's aggregate of the train metrics
    sites: list[SiteResult]
    previous_model: Evaluation  # the sites' scores of the model they received (round - 1's)
    seconds: float
    rejected: list[Rejection] = field(default_factory=list)  # replies left out (rwft.federation.update_checks)


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    *,
    first_round: int,
    last_round: int,
    min_sites: int,
    wait_timeout_s: float,
    round_timeout_s: float,
    on_round: Callable[[RoundResult], None],
    update_checks: UpdateChecksConfig | None = None,
) -> ArrayRecord:
    """Run rounds ``first_round..last_round``; ``on_round`` sees each result before the next starts.

    Every reply is checked before the strategy sees it (``rwft.federation.update_checks``);
    a rejected site is told with its next instruction. An aggregate that is not finite is
    never kept: the round then keeps the global model it started from.
    """
    rules = update_checks or UpdateChecksConfig()
    rejected: list[Rejection] = []
    for server_round in range(first_round, last_round + 1):
        wait_for_sites(grid, min_sites, wait_timeout_s)
        result = run_round(grid, strategy, arrays, server_round, round_timeout_s, rules=rules, rejected=rejected)
        arrays, rejected = result.arrays, result.rejected
        on_round(result)
    return arrays


def run_round(grid: Grid, strategy: Strategy, arrays: ArrayRecord, server_round: int, timeout_s: float, *,
              rules: UpdateChecksConfig | None = None, rejected: list[Rejection] | None = None) -> RoundResult:
    """One round: the strategy's instructions out (telling the sites whose replies were
    ``rejected`` last round), the sites' replies read and checked, the accepted ones
    aggregated by the strategy. An aggregate that is not finite is never kept."""
    started = time.monotonic()
    instructions = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
    replies = exchange(grid, tell_rejected_sites(instructions, rejected or []), timeout_s)
    labels: dict[int, SiteResult] = {}
    checked = check_replies(replies, arrays, rules or UpdateChecksConfig(), server_round=server_round,
                            label_of=functools.partial(_label, labels, _site_labels(grid)))
    now_rejected = list(checked.rejected)
    sites, received = read_train_replies(checked.accepted, arrays, _site_labels(grid))
    new_arrays, train_metrics = strategy.aggregate_train(server_round, checked.accepted)
    if new_arrays is not None and not finite_arrays(new_arrays):
        now_rejected.append(Rejection(server_round, "(aggregate)", -1, "the aggregate is not finite; the round "
                                      "keeps the global model it started from"))
        new_arrays = arrays
    if new_arrays is None and now_rejected:
        new_arrays = arrays  # every reply was rejected: nothing to aggregate, the model stays as it was
    if new_arrays is None:
        raise FederationError(f"round {server_round}: no usable training reply; site errors: "
                              + "; ".join(f"{s.label}: {s.error}" for s in sites if s.error))
    return RoundResult(server_round, new_arrays, _floats(train_metrics), sites,
                       Evaluation.of(server_round - 1, received), time.monotonic() - started, now_rejected)


def read_train_replies(replies: Iterable[Message], sent: ArrayRecord, site_labels: SiteLabels | None = None
                       ) -> tuple[list[SiteResult], dict[str, tuple[dict[str, float], int]]]:
    """Each site's training report, and its scores of the model it received (label -> scores, val images).

    ``site_labels`` names the sites of error replies, which carry no label of their own.
    """
    sites: dict[int, SiteResult] = {}
    received: dict[str, tuple[dict[str, float], int]] = {}
    for message in replies:
        site = _site(sites, message, site_labels)
        if message.has_error():
            site.error = message.error.reason or f"error code {message.error.code}"
            continue
        reply = TrainReply.from_record(message.content)
        site.train = {**reply.train, "num-examples": float(reply.num_examples)}
        site.local_val = reply.local_val
        received[site.label] = (reply.global_val, reply.val_examples)
        if len(reply.arrays):
            site.update_l2 = update_norm(sent, reply.arrays)
    return sorted(sites.values(), key=lambda s: s.label), received


def evaluate_model(grid: Grid, strategy: Strategy, server_round: int, arrays: ArrayRecord,
                   timeout_s: float, rejected: list[Rejection] | None = None) -> Evaluation:
    """Send ``arrays`` (round ``server_round``'s global model) to the sites to score on their validation splits.

    The aggregate is ``mean_scores``, as for the scores that come with each round's
    training replies, so that the final point of a curve is averaged like the others.
    ``rejected``: the last training round's rejections, told to their sites with this
    message. Replies that cannot be averaged (other metric keys, no examples) are left out.
    """
    nodes: dict[int, SiteResult] = {}
    sites: dict[str, tuple[dict[str, float], int]] = {}
    instructions = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
    replies = exchange(grid, tell_rejected_sites(instructions, rejected or []), timeout_s)
    checked = check_replies(replies, None, UpdateChecksConfig(), server_round=server_round,
                            label_of=functools.partial(_label, nodes, _site_labels(grid)))
    for message in checked.accepted:
        if not message.has_error():
            reply = EvaluateReply.from_record(message.content)
            sites[_site(nodes, message).label] = (reply.global_val, reply.val_examples)
    return Evaluation.of(server_round, sites)


def exchange(grid: Grid, messages: Iterable[Message], timeout_s: float) -> list[Message]:
    """Send ``messages`` and collect the replies that arrive within ``timeout_s``.

    A site that has not answered by then gets an error reply in its place (code
    ``NO_REPLY_IN_TIME``): the round goes on without it, and its record says which site
    was late. (A site whose SuperNode is gone is answered sooner, by the SuperLink's own
    error reply, once it misses its heartbeats.)
    """
    messages = list(messages)
    sent = dict(zip(grid.push_messages(messages), messages, strict=True))
    pending = set(sent)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending -= {reply.metadata.reply_to_message_id for reply in arrived}
        if pending:
            time.sleep(POLL_S)
    site_labels = _site_labels(grid)
    for message_id in sorted(pending):
        late = sent[message_id]
        reason = f"no reply within federation.round_timeout_s={timeout_s:g} s: the round went on without it"
        node_id = late.metadata.dst_node_id
        name = f"site {label} (node {node_id})" if (label := site_labels(node_id)) else f"node {node_id}"
        print(f"rwft: {name}: {reason}", flush=True)
        replies.append(Message(Error(NO_REPLY_IN_TIME, reason), reply_to=late))
    return replies


def wait_for_sites(grid: Grid, min_sites: int, timeout_s: float) -> None:
    """Return once ``min_sites`` sites are connected; ``FederationError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < min_sites:
        if time.monotonic() >= deadline:
            raise FederationError(f"only {connected} of federation.min_sites={min_sites} sites are connected "
                                  f"after {timeout_s:.0f} s (federation.wait_timeout_s). Start the missing sites "
                                  "(`rwft-client join`) and resume the federation, or lower federation.min_sites.")
        time.sleep(1.0)


def _site(sites: dict[int, SiteResult], reply: Message, site_labels: SiteLabels | None = None) -> SiteResult:
    node_id = reply.metadata.src_node_id
    if node_id not in sites:
        if reply.has_error():  # no content: the server's own name for the node, if it has one
            label = (site_labels(node_id) if site_labels else None) or ""
        else:
            label = label_of(reply.content)
        # The label becomes a TensorBoard tag: anything but a valid pseudonym is replaced by the node id.
        sites[node_id] = SiteResult(label if SITE_LABEL.match(label) else f"node-{node_id}", node_id)
    return sites[node_id]


def _label(sites: dict[int, SiteResult], site_labels: SiteLabels, reply: Message) -> str:
    return _site(sites, reply, site_labels).label


def _site_labels(grid: Grid) -> SiteLabels:
    """How ``grid`` names a node by its site label (``VettedGrid.site_label``); a plain grid knows no labels."""
    return getattr(grid, "site_label", lambda node_id: None)


def _floats(record: MetricRecord | None) -> dict[str, float]:
    """The record's numbers (lists, which rwft's sites never send, are left out)."""
    return {key: float(value) for key, value in (record or {}).items() if isinstance(value, (int, float))}
