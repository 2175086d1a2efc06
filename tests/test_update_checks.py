"""Every reply is checked before aggregation: the hostile tester's replies (×1000 weights, NaN,
a wrong shape, other metric keys, no examples) are rejected with their reason, the round
aggregates the rest, the site is told, and no saved model is ever NaN."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from federation_helpers import in_process_federation
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rwft.clients import app as rwft_client
from rwft.core.config import UpdateChecksConfig
from rwft.core.errors import BrokenModelError
from rwft.federation.protocol import STATISTICS_KEY, WEIGHTS_KEY
from rwft.federation.update_checks import (
    REJECTED_REASON_KEY,
    check_replies,
    norm_limit,
    tell_rejected_sites,
)

RULES = UpdateChecksConfig()


def _sent() -> ArrayRecord:
    return ArrayRecord({WEIGHTS_KEY: Array(np.zeros(6, np.float32)), STATISTICS_KEY: Array(np.ones(2, np.float32))})


def _reply(node: int, weights, statistics=None, metrics=None) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    arrays = {WEIGHTS_KEY: Array(np.asarray(weights, np.float32)),
              STATISTICS_KEY: Array(np.asarray(np.ones(2) if statistics is None else statistics, np.float32))}
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    instruction.metadata.__dict__["_message_id"] = instruction.object_id
    reply = Message(RecordDict({"arrays": ArrayRecord(arrays),
                                "metrics": MetricRecord(metrics or {"num-examples": 10, "train-loss": 0.5})}),
                    reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def _check(replies):
    return check_replies(replies, _sent(), RULES, server_round=3, label_of=lambda r: f"site-{r.metadata.src_node_id}")


def _honest(node: int, size: float = 0.01) -> Message:
    return _reply(node, np.full(6, size * (1 + 0.1 * node)))


def test_honest_replies_pass_with_their_update_norms():
    checked = _check([_honest(1), _honest(2), _honest(3)])
    assert not checked.rejected and len(checked.accepted) == 3
    assert checked.update_l2[2] == pytest.approx(0.012 * math.sqrt(6), rel=1e-5)


@pytest.mark.parametrize(("rogue", "reason"), [
    (_reply(9, [np.nan, 0, 0, 0, 0, 0]), "NaN or Inf"),
    (_reply(9, [np.inf, 0, 0, 0, 0, 0]), "NaN or Inf"),
    (_reply(9, np.zeros(5)), "float32[5], the server sent float32[6]"),
    (_reply(9, np.zeros(6), metrics={"num-examples": 10, "made-up": 0.8}), "metric keys differ"),
    (_reply(9, np.zeros(6), metrics={"num-examples": 0, "train-loss": 0.5}), "num-examples is 0"),
    (_reply(9, np.full(6, 10.0)), "update norm"),  # ×1000 an honest update
])
def test_a_rogue_reply_is_rejected_with_its_reason_and_the_rest_aggregate(rogue, reason):
    checked = _check([_honest(1), _honest(2), _honest(3), rogue])
    assert [(r.site, r.round) for r in checked.rejected] == [("site-9", 3)]
    assert reason in checked.rejected[0].reason
    assert [r.metadata.src_node_id for r in checked.accepted] == [1, 2, 3]


def test_the_norm_rule_needs_three_updates_and_spares_ordinary_spread():
    assert norm_limit([1.0, 1000.0], RULES) == math.inf  # two sites: neither is the outlier
    assert norm_limit([0.0, 0.0, 0.0], RULES) == math.inf  # nobody moved: nothing to compare with
    assert norm_limit([1.0, 1.5, 2.0, 2.5], RULES) >= 2.5  # honest spread stays in
    assert norm_limit([1.0, 1.1, 1.2, 50.0], RULES) < 50.0


def test_a_rejected_site_alone_is_told_in_its_next_instruction():
    shared = ConfigRecord({"server-round": 4})
    messages = [Message(RecordDict({"config": shared}), dst_node_id=node, message_type="train") for node in (1, 9)]
    rejection = _check([_honest(1), _honest(2), _reply(9, [np.nan] * 6)]).rejected
    told = tell_rejected_sites(messages, rejection)
    assert "NaN" in told[1].content["config"][REJECTED_REASON_KEY]
    assert REJECTED_REASON_KEY not in told[0].content["config"] and REJECTED_REASON_KEY not in shared


def _trained_reply(node: int, model, sent: ArrayRecord, num_examples: int, steps: float) -> Message:
    from rwft.federation.protocol import TrainReply, shared_arrays

    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    instruction.metadata.__dict__["_message_id"] = instruction.object_id
    content = TrainReply(f"site-{node}", shared_arrays(model, False), num_examples, 10,
                         {"loss": 0.5, "steps": steps}, {}, {}).to_record()
    reply = Message(content, reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


@pytest.mark.timeout(600)
def test_an_honest_site_with_many_more_images_is_not_an_outlier(pneumoniamnist_npz):
    """Quantity skew: three small hospitals (96 images, 3 local steps) and a large one (20x:
    60 steps), each one real local epoch from the same global model. The large one moves
    about 4x as far (the raw rule rejected it); per local step it is ordinary. A x10 update
    is still rejected, and so is a x1000 one that claims a million steps."""
    import copy
    import dataclasses

    from rwft.core.config import load_config
    from rwft.core.data import load_splits
    from rwft.core.engine import fit, seed_everything
    from rwft.core.model import build_model
    from rwft.federation.protocol import shared_arrays

    cfg = load_config(None, ["data.image_size=28", "train.batch_size=32", "train.lr=0.002", "train.device=cpu",
                             "train.num_threads=1", f"data.root={pneumoniamnist_npz}"])
    splits = load_splits(cfg)
    splits = dataclasses.replace(splits, val=splits.val.subset(np.arange(64)))  # scored once per site: keep it small
    seed_everything(0)
    model = build_model(cfg.model, splits.num_classes)
    sent = shared_arrays(model, False)
    order = np.random.default_rng(0).permutation(len(splits.train))
    replies, start = [], 0
    for node, size in enumerate((96, 96, 96, 1920), start=1):
        site = dataclasses.replace(splits, train=splits.train.subset(order[start:start + size]))
        start += size
        local = copy.deepcopy(model)
        result = fit(local, site, cfg, epochs=1)
        replies.append(_trained_reply(node, local, sent, result.num_examples, result.steps))
    norms = [float(np.linalg.norm(r.content["arrays"][WEIGHTS_KEY].numpy() - sent[WEIGHTS_KEY].numpy()))
             for r in replies]
    assert norms[3] > RULES.norm_min_ratio * float(np.median(norms)), norms  # the raw rule's false alarm

    checked = check_replies(replies, sent, RULES, server_round=1, label_of=lambda r: f"site-{r.metadata.src_node_id}")
    assert not checked.rejected, [r.reason for r in checked.rejected]

    def scaled(reply: Message, factor: float, node: int, steps: float) -> Message:
        weights = reply.content["arrays"][WEIGHTS_KEY].numpy()
        delta = weights - sent[WEIGHTS_KEY].numpy()
        rogue = copy.deepcopy(model)
        rogue_reply = _trained_reply(node, rogue, sent, 96, steps)
        rogue_reply.content["arrays"] = ArrayRecord({**dict(rogue_reply.content["arrays"].items()),
                                                     WEIGHTS_KEY: Array(sent[WEIGHTS_KEY].numpy() + factor * delta)})
        return rogue_reply

    for rogue in (scaled(replies[0], 10.0, 9, 3), scaled(replies[0], 1000.0, 9, 1e6)):
        checked = check_replies([*replies, rogue], sent, RULES, server_round=1,
                                label_of=lambda r: f"site-{r.metadata.src_node_id}")
        assert [r.site for r in checked.rejected] == ["site-9"] and "update norm" in checked.rejected[0].reason


# A stock-Flower ClientApp wrapping rwft's: node 10 (site-0) sends what the hostile tester sent.
ROGUE_NODE = 10
rogue_app = ClientApp()
ROGUE_REPLY = {"kind": "shape"}


@rogue_app.train()
def _rogue_train(msg: Message, context: Context) -> Message:
    reply = rwft_client.train(msg, context)
    if context.node_id != ROGUE_NODE:
        return reply
    if ROGUE_REPLY["kind"] == "shape":
        weights = reply.content["arrays"][WEIGHTS_KEY].numpy()
        reply.content["arrays"] = ArrayRecord({**{k: v for k, v in reply.content["arrays"].items()},
                                               WEIGHTS_KEY: Array(weights[:-7].copy())})
    else:  # metric keys of its own, and a made-up score
        reply.content["metrics"] = MetricRecord({"num-examples": 10**6, "auroc": 0.8})
    return reply


@rogue_app.evaluate()
def _rogue_evaluate(msg: Message, context: Context) -> Message:
    return rwft_client.evaluate(msg, context)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["shape", "metric-keys"])
def test_a_rogue_stock_client_no_longer_crashes_the_server(kind, tmp_path, pneumoniamnist_npz, monkeypatch):
    from rwft.federation.inprocess import InProcessGrid

    monkeypatch.setitem(ROGUE_REPLY, "kind", kind)
    build = InProcessGrid.__init__
    monkeypatch.setattr(InProcessGrid, "__init__", lambda self, _, nodes, run: build(self, rogue_app, nodes, run))
    in_process_federation(tmp_path, pneumoniamnist_npz, ["federation.rounds=1", "federation.server_eval=false"],
                          sites=3)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["complete"]
    assert [(r["site"], r["round"]) for r in metrics["rounds"][1]["rejected"]] == [("site-0", 1)]
    assert set(metrics["rounds"][1]["sites"]["site-1"]["train"]) >= {"loss", "num-examples"}
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def _test_auroc(model_file, cfg) -> float:
    """The model's held-out test AUROC; 0.5 (chance) when its outputs are not finite."""
    from sklearn.metrics import roc_auc_score

    from rwft.core.data import load_splits
    from rwft.core.engine import predict
    from rwft.core.model import build_model

    model = build_model(cfg.model, 2)
    model.load_state_dict(torch.load(model_file, weights_only=False)["model"])
    test = load_splits(cfg).test
    probs = predict(model, test, cfg)[:, 1]
    return float(roc_auc_score(test.labels, probs)) if np.isfinite(probs).all() else 0.5


def _held_out_auroc(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["final"]["test"]["auroc"]["value"]


@pytest.mark.timeout(900)
def test_a_x1000_site_under_fedavg_is_rejected_and_the_model_stays_useful(tmp_path, pneumoniamnist_npz):
    attack = ["federation.attack.sites=[site-0]", "federation.attack.kind=scale", "federation.attack.factor=1000"]
    # The finding, reproduced: without the norm rule FedAvg averages the x1000 update in, and the
    # global model's outputs are no longer a classifier's (NaN, or chance).
    # The first one to score that model (here a site, in one process with the server) refuses it
    # as broken, in one line that names the unchecked update, instead of crashing in scikit-learn.
    with pytest.raises((rwft_client.SiteError, BrokenModelError), match="BrokenModelError|NaN or infinite"):
        in_process_federation(tmp_path / "unchecked", pneumoniamnist_npz,
                              [*attack, "federation.rounds=1", "federation.server_eval=false",
                               "federation.update_checks.enabled=false"], sites=3)
    grid, _, _ = in_process_federation(tmp_path / "checked", pneumoniamnist_npz, [*attack, "federation.rounds=2"],
                                       sites=3)
    assert _held_out_auroc(tmp_path / "checked" / "run") > 0.7

    run_dir = tmp_path / "checked" / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for record in metrics["rounds"][1:]:
        assert [r["site"] for r in record["rejected"]] == ["site-0"] and "update norm" in record["rejected"][0]["reason"]
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("federation/rejected_replies")] == [1.0, 1.0]
    text = events.Tensors("federation/rejected/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("site-0: its update norm")
    # The site was told: its round-2 training message and the final evaluation carry the reason.
    told = [m for m in grid.instructions if m.metadata.dst_node_id == ROGUE_NODE]
    assert [REJECTED_REASON_KEY in m.content["config"] for m in told] == [False, True, True]
    assert REJECTED_REASON_KEY not in next(m for m in grid.instructions if m.metadata.dst_node_id == 11).content["config"]


@pytest.mark.timeout(600)
def test_nan_from_every_site_never_reaches_the_saved_model(tmp_path, pneumoniamnist_npz):
    """With server_eval=false the tester found a 100 % NaN model.pt: now the round keeps the last model."""
    in_process_federation(tmp_path, pneumoniamnist_npz, [
        "federation.attack.sites=[site-0,site-1]", "federation.attack.kind=nan", "federation.rounds=1",
        "federation.server_eval=false", "federation.update_checks.enabled=false"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {r["site"] for r in metrics["rounds"][1]["rejected"]} == {"site-0", "site-1"}
    assert all("NaN" in r["reason"] for r in metrics["rounds"][1]["rejected"])
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
