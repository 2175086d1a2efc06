"""Simulated sites: disjoint, complete, seeded, and as skewed as asked."""

from __future__ import annotations

import numpy as np
import pytest

from rwft.core.errors import ConfigError, DataError
from rwft.core.partition import PartitionScheme, describe_partition, parse_scheme, partition_indices

LABELS = np.array([0] * 1200 + [1] * 3500)  # PneumoniaMNIST's class ratio


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.1", "dirichlet:1", "quantity:0.5"])
def test_parts_are_disjoint_complete_seeded_and_large_enough(scheme: str) -> None:
    parts = partition_indices(LABELS, 5, scheme, seed=0)
    assert len(parts) == 5
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
    assert all(len(part) >= 10 for part in parts)
    again = partition_indices(LABELS, 5, scheme, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(LABELS, 5, scheme, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def pneumonia_share(parts: list[np.ndarray]) -> np.ndarray:
    return np.array([LABELS[part].mean() for part in parts])


def test_dirichlet_small_alpha_skews_labels_large_alpha_does_not() -> None:
    skewed = pneumonia_share(partition_indices(LABELS, 6, "dirichlet:0.1", seed=0))
    even = pneumonia_share(partition_indices(LABELS, 6, "dirichlet:1000", seed=0))
    assert skewed.max() - skewed.min() > 0.5
    assert even.max() - even.min() < 0.1


def test_quantity_skew_varies_sizes_not_labels() -> None:
    parts = partition_indices(LABELS, 6, "quantity:0.5", seed=0)
    sizes = [len(part) for part in parts]
    assert max(sizes) > 4 * min(sizes)
    big = [part for part in parts if len(part) > 200]
    assert np.all(np.abs(pneumonia_share(big) - LABELS.mean()) < 0.1)


def test_iid_sizes_are_equal_and_class_ratios_close() -> None:
    parts = partition_indices(LABELS, 4, "iid", seed=0)
    assert {len(part) for part in parts} == {1175}
    assert np.all(np.abs(pneumonia_share(parts) - LABELS.mean()) < 0.05)


def test_every_site_gets_the_minimum_even_with_extreme_skew() -> None:
    parts = partition_indices(LABELS, 20, "dirichlet:0.01", seed=3, min_size=25)
    assert min(len(part) for part in parts) >= 25
    with pytest.raises(DataError, match="cannot give each of 20 sites at least 300"):
        partition_indices(LABELS, 20, "iid", seed=0, min_size=300)


@pytest.mark.parametrize("bad", ["dirichlet", "dirichlet:", "dirichlet:-1", "dirichlet:abc", "quantity:inf",
                                 "iid:2", "label:0.5", ""])
def test_bad_scheme_strings_are_config_errors_listing_the_choices(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"use iid, dirichlet:ALPHA .* or quantity:ALPHA"):
        parse_scheme(bad)


def test_parse_scheme() -> None:
    assert parse_scheme("iid") == PartitionScheme("iid")
    assert parse_scheme(" dirichlet:0.5 ") == PartitionScheme("dirichlet", 0.5)
    assert parse_scheme("quantity:2") == PartitionScheme("quantity", 2.0)


def test_describe_partition_table() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    table = describe_partition([np.array([0, 2]), np.array([1, 3, 4])], labels, ("NORMAL", "PNEUMONIA"))
    assert [line.split() for line in table.splitlines()] == [
        ["site", "NORMAL", "PNEUMONIA", "total"], ["0", "1", "1", "2"], ["1", "1", "2", "3"], ["all", "2", "3", "5"]]
