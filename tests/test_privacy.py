"""What a site sends, proven: every reply of a whole federation (three rounds and the final
evaluation, real PneumoniaMNIST sites holding their own files, FedBN on) is captured as
the real ClientApp produced it and checked field by field. Only the model's travelling
weights, numbers that summarise whole splits, and the site's chosen pseudonym leave a site."""

from __future__ import annotations

import math

import numpy as np
import pytest
from federation_helpers import in_process_federation
from flwr.app import Context, Message, RecordDict

from rwft.clients.app import SiteError
from rwft.clients.app import app as client_app
from rwft.core.model import build_model
from rwft.federation.protocol import SITE_LABEL, WEIGHTS_KEY, layout, run_config_for


@pytest.fixture(scope="module")
def federation(tmp_path_factory, pneumoniamnist_npz):
    tmp = tmp_path_factory.mktemp("privacy")
    grid, cfg, _ = in_process_federation(tmp, pneumoniamnist_npz, ["federation.rounds=3", "federation.local_bn=true",
                                                                  "federation.server_eval=false"], simulated=False)
    return grid, cfg, tmp


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


@pytest.mark.timeout(300)
def test_replies_hold_only_travelling_weights_numbers_and_the_pseudonym(federation):
    grid, cfg, tmp = federation
    model = build_model(cfg.model, 2)
    sizes = {key: sum(model.state_dict()[name].numel() for name in names)
             for key, names in layout(model, local_bn=True).items()}
    assert set(sizes) == {WEIGHTS_KEY}  # FedBN: BatchNorm statistics and affine weights stay home
    replies = grid.replies
    assert len(replies) == 2 * 3 + 2  # two sites, three training rounds and the final evaluation
    for reply in replies:
        assert not reply.has_error()
        content = reply.content
        assert set(content.keys()) <= {"arrays", "metrics", "site"}
        for record in content.array_records.values():
            for key, array in record.items():
                values = array.numpy()
                # The weights of this model, nothing shaped like images, nothing else.
                assert key in sizes and values.ndim == 1 and values.size == sizes[key] and values.dtype == np.float32
        for record in content.metric_records.values():
            for key, value in record.items():
                # One number per key: a list could carry a value per image.
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert list(content.config_records) == ["site"]
        assert dict(content.config_records["site"]) == {"label": content.config_records["site"]["label"]}
        label = content.config_records["site"]["label"]
        assert label in ("hospital0", "hospital1") and SITE_LABEL.match(label)
        # No string anywhere (metadata included) names a file, a folder or this machine's paths.
        strings = [s for record in content.config_records.values() for v in record.values() for s in _strings(v)]
        strings += [reply.metadata.message_type, reply.metadata.group_id]
        for text in strings:
            assert "/" not in text and ".npz" not in text and str(tmp) not in text


def test_counts_are_totals_of_whole_splits(federation):
    grid, _, _ = federation
    for reply in grid.replies:
        metrics = reply.content.metric_records["metrics"]
        assert float(metrics["num-examples"]).is_integer() and metrics["num-examples"] >= 10
        for key, value in metrics.items():
            if key.endswith(("auroc", "accuracy", "sensitivity", "specificity", "precision", "f1", "auprc")):
                assert math.isnan(value) or 0.0 <= value <= 1.0


def test_a_failing_site_sends_only_the_type_of_its_error(tmp_path, pneumoniamnist_npz):
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from rwft.core.config import load_config

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    secret_path = tmp_path / "patients" / "ward-7" / "missing.npz"
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}"])
    context = Context(run_id=1, node_id=5, node_config={"site": "hospitalA", "data-dir": str(secret_path)},
                      state=RecordDict(), run_config=run_config_for(cfg, num_classes=2, federation_id="x",
                                                                    resume=False))
    message = Message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=5, message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id
    with pytest.raises(SiteError) as excinfo:
        client_app(message, context)
    assert str(excinfo.value) == "DataError at the site (the site's log has the details)"
    assert "ward-7" not in str(excinfo.value) and excinfo.value.__cause__ is None
