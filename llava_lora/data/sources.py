"""Data mixtures: several sources, in any mix of formats (``records.load_data``), each with its own image root and
weight.

    # recipe.yaml, for `llava-lora train --config recipe.yaml` or `llava-lora data check --config recipe.yaml`
    data:
      - {path: data/cc3m, weight: 1}                                  # folder: chat.json + images_dl/
      - {path: data/instruct.jsonl, image_dir: data/coco, weight: 2}  # each record twice per epoch
      - {path: "data/laion/{00000..00099}.tar", weight: 0.5}          # shards: half of them, chosen by the seed

A weight scales how often a source's records are drawn in an epoch: 2 puts each record in twice, 0.5 a half of
them, chosen by the seed. Every record keeps its source, so a skipped one is reported with it. JSONL sources are
read line by line (``records.iter_raw``), never held whole as text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Rejected, UsageError
from .images import locate_records
from .records import Record, load_records, resolve_data


@dataclass(frozen=True)
class Source:
    path: str
    image_dir: str | None = None
    weight: float = 1.0
    split: str | None = None


def parse_sources(data: str | list, split: str | None = None, image_dir: str | None = None) -> list[Source]:
    """The sources ``data`` names: one path (with ``split`` and ``image_dir``), or a list of paths and
    ``{path, image_dir, weight, split}`` mappings."""
    if isinstance(data, str):
        return [Source(data, image_dir, 1.0, split)]
    if not data:
        raise UsageError("data: an empty list names no source")
    keys = [f.name for f in fields(Source)]
    out = []
    for k, item in enumerate(data):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or "path" not in item:
            raise UsageError(f"data[{k}]: expected a path or a mapping with 'path', got {item!r}")
        unknown = sorted(set(item) - set(keys))
        if unknown:
            raise UsageError(f"data[{k}]: unknown key {unknown[0]!r} (a source has {', '.join(keys)})")
        weight = item.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise UsageError(f"data[{k}] ({item['path']}): weight must be a number > 0, got {weight!r}")
        out.append(Source(str(item["path"]), item.get("image_dir"), float(weight), item.get("split")))
    return out


@dataclass
class Mixture:
    """Records of every source, each repeated by its weight, with its image root and source name alongside."""

    records: list[Record] = field(default_factory=list)
    roots: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)  # their details name the source, when there are several
    files: list[tuple[Path, Path, int]] = field(default_factory=list)  # (records file, image root, usable records)

    @property
    def total(self) -> int:
        """Records read, before weighting."""
        return sum(n for _, _, n in self.files) + len(self.rejected)


def load_mixture(sources: list[Source], seed: int, locate: bool = True) -> Mixture:
    """Read every source (with ``locate``, records whose image is missing or outside its root are rejected
    here, by a stat) and weight them: ``floor(w)`` copies of each record, and a seeded ``frac(w)`` share more."""
    mix = Mixture()
    named = len(sources) > 1
    for k, src in enumerate(sources):
        data_file, root = resolve_data(src.path, src.split, src.image_dir)
        records, bad = load_records(data_file)
        if locate:
            records, unlocated = locate_records(records, root)
            bad = bad + unlocated
        mix.rejected += [r.with_source(str(data_file)) for r in bad] if named else bad
        mix.files.append((data_file, root, len(records)))
        whole, frac = divmod(src.weight, 1.0)
        picks = list(range(len(records))) * int(whole)
        extra = math.floor(frac * len(records) + 0.5)
        picks += sorted(np.random.default_rng([seed, 11, k]).permutation(len(records))[:extra].tolist())
        mix.records += [records[i] for i in picks]
        mix.roots += [root] * len(picks)
        mix.names += [str(data_file)] * len(picks)
    return mix


def is_mixture(data: Any) -> bool:
    return not isinstance(data, str)
