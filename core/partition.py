"""Simulated sites: one dataset's examples split into disjoint parts, one per site.

Real hospitals differ in how many images they have and in their case mix; the
schemes reproduce both, as in the federated-learning literature (Hsu et al. 2019;
Li et al., "Federated Learning on Non-IID Data Silos", 2021):

- ``iid``: a seeded shuffle cut into equal parts.
- ``dirichlet:ALPHA``: label skew. For every class, the shares of the sites are
  drawn from Dirichlet(ALPHA, ..., ALPHA); small ALPHA (0.1) gives sites dominated
  by one class, large ALPHA (100) approaches iid.
- ``quantity:ALPHA``: quantity skew. Site sizes are shares drawn from
  Dirichlet(ALPHA); labels stay iid within each site.

With the skewed schemes, every site first receives ``min_size`` examples at
random, so no site is left (nearly) empty however small ALPHA is; the rest is
shared out by the scheme. Resampling until every site is large enough, the usual
alternative, never terminates with two classes, many sites and a small ALPHA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwft.core.data import apportion, class_count_table
from rwft.core.errors import ConfigError, DataError

MIN_SITE_SIZE = 10
_SCHEME_HELP = ("iid, dirichlet:ALPHA (label skew) or quantity:ALPHA (size skew), with ALPHA > 0, "
                "e.g. dirichlet:0.5; a smaller ALPHA means more skew")


@dataclass(frozen=True)
class PartitionScheme:
    kind: str  # iid | dirichlet | quantity
    alpha: float | None = None


def parse_scheme(scheme: str) -> PartitionScheme:
    """``"iid"``, ``"dirichlet:0.5"`` or ``"quantity:1"`` as a ``PartitionScheme``; ``ConfigError`` otherwise."""
    kind, has_alpha, value = scheme.strip().partition(":")
    if kind == "iid" and not has_alpha:
        return PartitionScheme("iid")
    if kind in ("dirichlet", "quantity") and has_alpha:
        try:
            alpha = float(value)
        except ValueError:
            alpha = math.nan
        if alpha > 0 and math.isfinite(alpha):
            return PartitionScheme(kind, alpha)
    raise ConfigError(f"partition scheme {scheme!r} is not valid: use {_SCHEME_HELP}.")


def partition_indices(
    labels: np.ndarray,
    num_sites: int,
    scheme: str,
    seed: int,
    *,
    min_size: int = MIN_SITE_SIZE,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``num_sites`` disjoint, sorted index arrays covering all of it.

    ``scheme`` is parsed by ``parse_scheme``. Every site gets at least ``min_size``
    examples (``DataError`` if there are too few for that). The same arguments
    always give the same partition.
    """
    parsed = parse_scheme(scheme)
    labels = np.asarray(labels)
    if num_sites < 1:
        raise ConfigError(f"the number of sites must be at least 1, got {num_sites}.")
    if len(labels) < num_sites * min_size:
        raise DataError(f"{len(labels)} examples cannot give each of {num_sites} sites at least {min_size}: "
                        "use fewer sites or more data.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    if parsed.kind == "iid":
        return [np.sort(part) for part in np.array_split(order, num_sites)]

    reserved, rest = order[:num_sites * min_size], order[num_sites * min_size:]
    pieces: list[list[np.ndarray]] = [[reserved[site::num_sites]] for site in range(num_sites)]
    if parsed.kind == "quantity":
        groups = [rest]
    else:
        groups = [rest[labels[rest] == cls] for cls in np.unique(labels)]
    for group in groups:
        shares = rng.dirichlet(np.full(num_sites, parsed.alpha))
        sizes = apportion(len(group), shares)
        for site, piece in enumerate(np.split(group, np.cumsum(sizes)[:-1])):
            pieces[site].append(piece)
    return [np.sort(np.concatenate(site_pieces)) for site_pieces in pieces]


def describe_partition(parts: Sequence[np.ndarray], labels: np.ndarray, class_names: Sequence[str]) -> str:
    """A plain-text table: one row per site with its count of each class and its total."""
    labels = np.asarray(labels)
    rows = [(str(site), np.bincount(labels[part], minlength=len(class_names)).tolist())
            for site, part in enumerate(parts)]
    return class_count_table("site", rows, class_names)


def write_site_files(npz: str | Path, count: int, out: str | Path, scheme: str = "iid", seed: int = 0) -> list[Path]:
    """Split a MedMNIST ``npz`` into ``count`` site files ``out/site{i}.npz``, in MedMNIST's layout.

    Each site gets its own part of every official split (train, val, test), drawn with
    ``scheme`` as ``partition_indices`` does: what a hospital's export would look like, for
    trying ``rwft-client join`` with real data on one machine (tests, benchmarks).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = np.load(npz)
    parts = {split: partition_indices(data[f"{split}_labels"].ravel(), count, scheme, seed=seed)
             for split in ("train", "val", "test")}
    files = []
    for site in range(count):
        arrays = {}
        for split, indices in parts.items():
            arrays[f"{split}_images"] = data[f"{split}_images"][indices[site]]
            arrays[f"{split}_labels"] = data[f"{split}_labels"][indices[site]]
        files.append(out / f"site{site}.npz")
        np.savez(files[-1], **arrays)
    return files
