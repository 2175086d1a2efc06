"""Getting a federation ready to submit: what ``rwft-server start`` and ``rwft simulate`` share.

Before any process starts: the run directory is claimed (a new federation) or checked
(a resumed one), the resolved config is saved, and the server's held-out data, if any,
is loaded once, which checks it, decodes it into the cache for the ServerApp and tells
how many classes the model has.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rwft.core.config import RwftConfig, load_resumed_config, save_config, with_overrides
from rwft.core.data import load_splits
from rwft.core.errors import RwftError
from rwft.federation.protocol import run_config_for
from rwft.server.app import DEFAULT_CLASS_NAMES
from rwft.server.state import create_federation, federation_id, load_state


def load_federation_config(config: str | None, overrides: Sequence[str], resume: str | None) -> RwftConfig:
    """The config of a new federation, or of the one in ``resume`` (``load_resumed_config``)."""
    return load_resumed_config(config, overrides, resume)


def prepare_federation(cfg: RwftConfig, *, resume: bool) -> tuple[RwftConfig, dict[str, Any]]:
    """``cfg`` with an absolute ``output_dir``, and the Flower run config of its federation."""
    # The ServerApp (and in simulation every site) runs in another working directory.
    absolute = {"output_dir": cfg.output_dir, "data.root": cfg.data.root, "data.cache_dir": cfg.data.cache_dir,
                "federation.certificates": cfg.federation.certificates, "federation.site_keys": cfg.federation.site_keys}
    cfg = with_overrides(cfg, [f"{key}={Path(value).expanduser().resolve()}"
                               for key, value in absolute.items() if value])
    run_dir = Path(cfg.output_dir)
    if resume:
        fid = federation_id(run_dir)
        state = load_state(run_dir)
        if state is None:
            raise RwftError(f"{run_dir} has no completed round to resume from; start the federation afresh "
                            "with a new output_dir.")
        if state.round >= cfg.federation.rounds and _complete(run_dir):
            raise RwftError(f"the federation in {run_dir} already completed its {state.round} rounds. To train "
                            "longer, resume it with federation.rounds=N.")
    num_classes = len(load_splits(cfg).class_names) if cfg.federation.server_eval else len(DEFAULT_CLASS_NAMES)
    if not resume:
        fid = create_federation(run_dir)
    save_config(cfg, run_dir)
    return cfg, run_config_for(cfg, num_classes=num_classes, federation_id=fid, resume=resume)


def _complete(run_dir: Path) -> bool:
    """Whether the federation also finished its final evaluation (a crash can come between)."""
    metrics = run_dir / "metrics.json"
    return metrics.is_file() and bool(json.loads(metrics.read_text()).get("complete"))
