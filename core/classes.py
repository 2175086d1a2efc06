"""Class identity: which class is positive, and how a dataset's classes line up with a model's.

Sensitivity, specificity and AUROC all mean "of the positive class", so rwft never
lets folder order decide it. The rule, applied to every run's data
(``rwft.core.data.load_splits``):

1. ``data.positive_class`` when set (matched case-insensitively);
2. else the one class whose name is positive-like: a word of it (case-insensitive,
   split at anything not a letter or digit) is one of ``POSITIVE_WORDS``
   (pneumonia, abnormal, positive, ...);
3. else, when exactly one class is negative-like (``NEGATIVE_WORDS``: normal,
   negative, healthy, ...), the other one;
4. else, for unnamed classes (``class 0``/``class 1``, a MedMNIST file without
   names), label 1, MedMNIST's convention for the finding;
5. else an error asking for ``data.positive_class``.

The data are then put in the one canonical order, negative first and positive
second (label 1 is positive everywhere downstream), and every checkpoint stores
that order and the positive class's name. Evaluating a checkpoint maps the data's
classes to the checkpoint's by name (after ``data.class_map`` renames them) and
refuses names that do not match.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from rwft.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from rwft.core.data import DatasetSplits

POSITIVE_WORDS = frozenset({"pneumonia", "abnormal", "positive", "disease", "diseased", "sick", "pathological",
                            "malignant", "tumor", "tumour", "covid", "opacity"})
NEGATIVE_WORDS = frozenset({"normal", "negative", "healthy", "benign"})
_UNNAMED = re.compile(r"class \d+")


def _words(name: str) -> set[str]:
    return set(re.split(r"[^0-9a-z]+", name.casefold())) - {""}


def positive_index(class_names: Sequence[str], configured: str | None = None) -> int:
    """The label of the positive class among ``class_names`` (two classes), per the module's rule."""
    names = list(class_names)
    if configured is not None:
        found = [i for i, name in enumerate(names) if name.casefold() == configured.casefold()]
        if not found:
            raise ConfigError(f"data.positive_class={configured!r} is not one of the data's classes "
                              f"({', '.join(names)}): set it to one of them.")
        return found[0]
    positive = [i for i, name in enumerate(names) if _words(name) & POSITIVE_WORDS]
    if len(positive) == 1:
        return positive[0]
    negative = [i for i, name in enumerate(names) if _words(name) & NEGATIVE_WORDS and i not in positive]
    if len(negative) == 1 and len(names) == 2:
        return 1 - negative[0]
    if all(_UNNAMED.fullmatch(name) for name in names):
        return len(names) - 1
    raise ConfigError(f"cannot tell which class is positive among {', '.join(names)} (no single name is "
                      f"pneumonia/abnormal/positive-like): set data.positive_class to one of them.")


def renamed(splits: DatasetSplits, class_map: Mapping[str, str]) -> DatasetSplits:
    """``splits`` with classes renamed per ``data.class_map`` (data name -> name to use, case-insensitive)."""
    if not class_map:
        return splits
    lookup = {str(key).casefold(): str(value) for key, value in class_map.items()}
    unknown = [key for key in class_map if str(key).casefold() not in {n.casefold() for n in splits.class_names}]
    if unknown:
        raise ConfigError(f"data.class_map names {', '.join(map(str, unknown))}, which the data at {splits.source} "
                          f"does not have (its classes: {', '.join(splits.class_names)}).")
    names = tuple(lookup.get(name.casefold(), name) for name in splits.class_names)
    return dataclasses.replace(splits, class_names=names)


def reordered(splits: DatasetSplits, order: Sequence[int]) -> DatasetSplits:
    """``splits`` whose new class ``i`` is the old class ``order[i]`` (labels remapped)."""
    order = list(order)
    if order == list(range(len(order))):
        return splits
    new_label = np.empty(len(order), dtype=np.int64)
    new_label[order] = np.arange(len(order))

    def remap(split):  # type: ignore[no-untyped-def]
        return dataclasses.replace(split, labels=new_label[split.labels]) if len(split) else split

    return dataclasses.replace(splits, train=remap(splits.train), val=remap(splits.val), test=remap(splits.test),
                               class_names=tuple(splits.class_names[i] for i in order))


def positive_last(splits: DatasetSplits, configured: str | None = None) -> DatasetSplits:
    """Two-class ``splits`` in the canonical order: negative label 0, positive label 1."""
    if splits.num_classes != 2:
        return splits
    positive = positive_index(splits.class_names, configured)
    return reordered(splits, [1 - positive, positive])


def aligned(splits: DatasetSplits, model_classes: Sequence[str]) -> DatasetSplits:
    """``splits`` with labels in the order of ``model_classes`` (a checkpoint's), matched by name.

    Names match case-insensitively. Raises ``DataError`` saying how to map them
    (``data.class_map``) when the data's classes are not the model's.
    """
    model = [name.casefold() for name in model_classes]
    data = [name.casefold() for name in splits.class_names]
    if sorted(model) != sorted(data):
        missing = [n for n in splits.class_names if n.casefold() not in model]
        example = (f"data.class_map.{missing[0]}={[m for m in model_classes if m.casefold() not in data][0]}"
                   if missing and len(set(model) - set(data)) else "data.class_map.FOLDER=CLASS")
        raise DataError(f"the data's classes ({', '.join(splits.class_names)}) are not the model's "
                        f"({', '.join(model_classes)}): name which data class is which model class, "
                        f"e.g. {example}.")
    return dataclasses.replace(reordered(splits, [data.index(name) for name in model]),
                               class_names=tuple(model_classes))


def describe(class_names: Sequence[str]) -> str:
    """One line for the start of a run: every label with its name, the positive one marked."""
    if len(class_names) != 2:
        return "classes: " + ", ".join(f"{i} {name}" for i, name in enumerate(class_names))
    return f"classes: 0 {class_names[0]} (negative), 1 {class_names[1]} (positive: sensitivity, AUROC)"
