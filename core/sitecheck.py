"""The local data check a site runs before it joins a federation (``rwft-client join``).

It loads the site's data exactly as training will, through the dataset's own
factory (same scanning, decoding and carving, no second implementation), with bad
files left out rather than fatal so that all of them can be listed at once. It
reads local files only and sends nothing anywhere; it never downloads either: a
site check needs the site's own data path. As a side effect the decoded images are
cached, so the first federated round starts without decoding.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from rwft.core.config import DataConfig
from rwft.core.data import as_data_config, class_count_table, load_data, resolve_data_root
from rwft.core.errors import DataError
from rwft.core.plugins import Registries

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class SiteReport:
    """What a site holds, as training will see it. ``counts[split][i]`` counts class ``class_names[i]``."""

    dataset: str
    source: str
    image_size: int
    class_names: tuple[str, ...]
    counts: dict[str, list[int]]
    unreadable: tuple[str, ...]  # "path: reason and fix", left out of the counts

    @property
    def num_images(self) -> int:
        return sum(sum(counts) for counts in self.counts.values())

    @property
    def warnings(self) -> list[str]:
        """Splits that hold images but miss a class: the site can take part, but should know what that costs."""
        found = []
        for name in SPLIT_NAMES:
            missing = [cls for cls, count in zip(self.class_names, self.counts[name], strict=True) if count == 0]
            if not missing or not sum(self.counts[name]):
                continue
            cost = ("this site trains on one class only, which pulls the shared model towards it"
                    if name == "train" else
                    "AUROC is undefined on it, so the federation leaves this site out of that score's average")
            found.append(f"warning: the {name} split has no {', '.join(missing)} images: {cost}. Add images of "
                         "every class if this site has them.")
        return found

    def format(self) -> str:
        """The report as text for the terminal."""
        lines = [
            f"Site data check ({self.dataset}, read locally; nothing is sent)",
            f"source: {self.source}",
            f"decoded at {self.image_size}px and cached for training",
            class_count_table("split", [(name, self.counts[name]) for name in SPLIT_NAMES], self.class_names),
        ]
        if self.unreadable:
            lines.append(f"{len(self.unreadable)} unreadable file(s), left out (fix them, or train with "
                         "data.on_bad_file=skip):")
            lines += [f"  {entry}" for entry in self.unreadable]
        else:
            lines.append("every file is readable")
        return "\n".join(lines + self.warnings)


def check_site(
    data_cfg_or_path: DataConfig | str | os.PathLike[str],
    dataset: str = "chest_xray",
    image_size: int = 64,
    *,
    seed: int = 0,
    registries: Registries | None = None,
) -> SiteReport:
    """Check the data of one site and report what training will see.

    ``data_cfg_or_path`` is a ``DataConfig`` (plain or OmegaConf; its dataset and
    image size are used and ``dataset``/``image_size`` ignored) or the path of the
    site's data (read as ``dataset`` at ``image_size``). ``seed`` fixes the carving of
    val/test as in the run. Raises ``DataError`` when there is no data path, the data
    is empty or misses its structure (no class folders, a single class, empty class
    folders); unreadable files do not raise, they are listed in the report.
    """
    if isinstance(data_cfg_or_path, (str, os.PathLike)):
        data = DataConfig(dataset=dataset, root=os.fspath(data_cfg_or_path), image_size=image_size)
    else:
        data = as_data_config(data_cfg_or_path)
    if resolve_data_root(data) is None:
        raise DataError("the site check needs the site's data: pass its path (data.root=/path/to/site) or set "
                        "RWFT_DATA_DIR. It reads local files only and never downloads.")
    splits = load_data(dataclasses.replace(data, on_bad_file="skip"), seed=seed, registries=registries)
    counts = {name: getattr(splits, name).class_counts(splits.num_classes) for name in SPLIT_NAMES}
    report = SiteReport(data.dataset, splits.source, data.image_size, splits.class_names, counts, splits.skipped)
    if report.num_images == 0:
        raise DataError(f"no readable images at {splits.source}. Every file was left out:\n"
                        + "\n".join(f"  {entry}" for entry in splits.skipped))
    return report
