"""Class identity: the positive class is named by a documented rule, never by folder order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rwft.core.classes import aligned, positive_index
from rwft.core.config import load_config
from rwft.core.data import load_splits
from rwft.core.errors import ConfigError, DataError


@pytest.mark.parametrize(
    "names, configured, positive",
    [(("NORMAL", "PNEUMONIA"), None, 1), (("ABNORMAL", "NORMAL"), None, 0), (("normal", "abnormal"), None, 1),
     (("Healthy", "COVID-19"), None, 1), (("positive", "negative"), None, 0), (("class 0", "class 1"), None, 1),
     (("cats", "dogs"), "Dogs", 1), (("ABNORMAL", "NORMAL"), "normal", 1)],
)
def test_positive_class_rule(names, configured, positive):
    assert positive_index(names, configured) == positive


def test_names_that_say_nothing_need_data_positive_class():
    with pytest.raises(ConfigError, match="set data.positive_class"):
        positive_index(("cats", "dogs"))
    with pytest.raises(ConfigError, match="not one of the data's classes"):
        positive_index(("NORMAL", "PNEUMONIA"), "COVID")


def _site(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            value = 30 if name == "NORMAL" else 220  # the classes differ, so labels can be checked by pixels
            Image.fromarray(np.full((24, 24), value + i % 5, np.uint8)).save(root / name / f"{i}.png")
    return root


def test_abnormal_folder_is_the_positive_class_though_it_sorts_first(tmp_path):
    site = _site(tmp_path / "site", {"ABNORMAL": 20, "NORMAL": 20})
    splits = load_splits(load_config(overrides=["data.dataset=chest_xray", f"data.root={site}", "data.image_size=16"]))
    assert splits.class_names == ("NORMAL", "ABNORMAL")
    for split in (splits.train, splits.val, splits.test):
        bright = split.images.reshape(len(split), -1).mean(axis=1) > 128
        np.testing.assert_array_equal(split.labels, bright.astype(int))  # ABNORMAL (bright) is label 1


def test_class_map_renames_and_a_checkpoints_order_is_matched_by_name(tmp_path):
    site = _site(tmp_path / "site", {"ABNORMAL": 20, "NORMAL": 20})
    base = ["data.dataset=chest_xray", f"data.root={site}", "data.image_size=16"]
    with pytest.raises(DataError, match=r"data.class_map.ABNORMAL=PNEUMONIA"):
        load_splits(load_config(overrides=base), class_order=("NORMAL", "PNEUMONIA"))
    splits = load_splits(load_config(overrides=[*base, "data.class_map.ABNORMAL=PNEUMONIA"]),
                         class_order=("NORMAL", "PNEUMONIA"))
    assert splits.class_names == ("NORMAL", "PNEUMONIA")
    bright = splits.train.images.reshape(len(splits.train), -1).mean(axis=1) > 128
    np.testing.assert_array_equal(splits.train.labels, bright.astype(int))
    # A model whose classes are in the other order gets the labels in its order.
    flipped = aligned(splits, ("pneumonia", "normal"))
    np.testing.assert_array_equal(flipped.train.labels, 1 - splits.train.labels)
