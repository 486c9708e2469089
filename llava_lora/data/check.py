"""``llava-lora data check DATA``: validate every record and image of a data set (any format), report the bad ones.

    llava-lora data check data/cc3m --json report.json      # exit 0: all usable, 1: some are not
    llava-lora data check data/cc3m --model MODEL_DIR       # and each record's tokens against train's limit

    report = check_file("data/cc3m/chat.json", "data/cc3m/images_dl")   # .bad: [Rejected], .usable: [Record]
    print_report(report, file, root)

Each record is parsed, its image resolved under the image root and fully decoded (in a process pool), and, given
a ``length_fn``, its token count compared with a limit. Ids carried by more than one record are listed apart:
those records are usable (and used by ``train``); they do not change the exit code. The command adds what needs
a tokenizer (with ``--model``, each record tokenised with its chat template by ``chat/encode.py``: ``too_long``,
``encode_failed``, and the encoder's own ``empty_supervision`` / ``image_token_mismatch``; imported only then, and
never a model's weights), one report per data source, and the ``--json`` file. Reason codes: ``errors.REASONS``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..config import field as config_field
from ..config import image_dir_field, split_field
from ..errors import BadRecord, Rejected, UsageError
from .images import as_store, check_ref
from .formats import MAPPINGS
from .records import Record, duplicate_ids, load_data, resolve_data
from .sources import parse_sources

PRINT_LIMIT = 50  # bad records printed; the rest are in --json
CHUNK = 256  # images per pool task: large enough to amortise pickling, small enough for a live progress bar
MIN_POOL = 256  # fewer unique images than this are checked in-process (a pool costs ~0.5 s to start)


@dataclass
class CheckReport:
    """What a check found: ``bad`` the records rejected; ``usable`` the records that passed, in order;
    ``duplicates`` {id: count} for ids that several parsed records carry."""

    total: int
    bad: list[Rejected]
    usable: list[Record]
    duplicates: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)  # records read per format (formats.py)
    system_prompts: int = 0  # records that carry their own system prompt (in place of the template's default)

    @property
    def counts(self) -> dict[str, int]:
        """Bad records per reason, most frequent first."""
        return dict(Counter(r.reason for r in self.bad).most_common())

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "usable": len(self.usable),
            "bad_count": len(self.bad),
            "counts": self.counts,
            "bad": [r.as_dict() for r in self.bad],
            "duplicate_ids": self.duplicates,
            "formats": self.formats,
            "system_prompts": self.system_prompts,
        }


def _check_images(store: Any, items: Sequence[tuple[int, str]]) -> dict[int, BadRecord]:
    """{index: why} for each image in ``items`` that cannot be resolved or decoded."""
    out = {}
    for index, ref in items:
        try:
            check_ref(store, ref)
        except BadRecord as e:
            out[index] = e
    return out


def _image_failures(images: list[str], root: Any, workers: int, progress: bool) -> dict[int, BadRecord]:
    """{index into ``images``: why}, decoding in ``workers`` processes."""
    from tqdm import tqdm

    items = list(enumerate(images))
    workers = workers or os.cpu_count() or 1
    found: dict[int, BadRecord] = {}
    bar = tqdm(total=len(items), unit="img", desc="images", disable=not progress or None, file=sys.stderr)
    with bar:
        if workers == 1 or len(items) < MIN_POOL:
            for start in range(0, len(items), CHUNK):
                chunk = items[start:start + CHUNK]
                found.update(_check_images(root, chunk))
                bar.update(len(chunk))
            return found
        # spawn, not fork: the caller may hold threads (tqdm, torch) that fork would copy half-locked.
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_check_images, root, items[s:s + CHUNK]): min(CHUNK, len(items) - s)
                       for s in range(0, len(items), CHUNK)}
            for fut in as_completed(futures):
                found.update(fut.result())
                bar.update(futures[fut])
    return found


def check_records(records: Sequence[Record], root: str | Path, *, workers: int = 0,
                  length_fn: Callable[[Record], int] | None = None, max_length: int | None = None,
                  progress: bool = True) -> CheckReport:
    """Check parsed records: each image resolves under ``root`` and decodes; with ``length_fn`` and
    ``max_length``, each record's token count (image tokens included) fits (reason ``too_long``).

    Every image of every record is decoded; each distinct one once, however many records share it (LLaVA-Instruct
    repeats them).
    """
    root = as_store(root)
    images = sorted({ref for r in records for ref in r.images})
    failures = _image_failures(images, root, workers, progress)
    failed = {images[i]: why for i, why in failures.items()}

    bad: list[Rejected] = []
    usable: list[Record] = []
    for rec in _maybe_progress(records, progress and length_fn is not None, "lengths"):
        why = next((failed[ref] for ref in rec.images if ref in failed), None)
        if why is None and length_fn is not None and max_length is not None:
            why = _length_verdict(length_fn, rec, max_length)
        if why is None:
            usable.append(rec)
        else:
            bad.append(why.rejected(rec.id))
    return CheckReport(total=len(records), bad=bad, usable=usable, duplicates=duplicate_ids(list(records)))


def _length_verdict(length_fn: Callable[[Record], int], rec: Record, max_length: int) -> BadRecord | None:
    """Why ``rec`` does not fit ``max_length`` or cannot be tokenised at all; None when it fits."""
    try:
        n = length_fn(rec)
    except BadRecord as e:  # e.g. empty_supervision: the chat template marks no answer token
        return e
    except Exception as e:  # the tokenizer's own failure on this record: its reason, not the check's end
        return BadRecord("encode_failed", f"{type(e).__name__}: {e}")
    return BadRecord("too_long", f"{n} tokens > max_length {max_length}") if n > max_length else None


def _maybe_progress(records: Sequence[Record], show: bool, desc: str) -> Iterable[Record]:
    if not show:
        return records
    from tqdm import tqdm

    return tqdm(records, unit="rec", desc=desc, file=sys.stderr, disable=None)


def check_file(file: str | Path, root: str | Path, **kwargs: Any) -> CheckReport:
    """``load_records`` + ``check_records``: parse errors come first in ``bad``, then image/length ones."""
    loaded = load_data(file)
    report = check_records(loaded.records, root, **kwargs)
    return CheckReport(total=len(loaded.records) + len(loaded.bad), bad=loaded.bad + report.bad,
                       usable=report.usable, duplicates=report.duplicates, formats=dict(loaded.formats),
                       system_prompts=sum(r.system is not None for r in loaded.records))


def print_report(report: CheckReport, file: Path, root: Path, out: TextIO | None = None,
                 limit: int = PRINT_LIMIT) -> None:
    """Summary by reason, then one line per bad record (at most ``limit``); to stdout by default."""
    out = out or sys.stdout
    print(f"{file}: {report.total:,} records, {len(report.usable):,} usable, {len(report.bad):,} not "
          f"(images: {root})", file=out)
    for fmt, n in report.formats.items():  # what was read, and how: a wrong guess shows here, not in training
        print(f"format {fmt} ({n:,} records): {MAPPINGS.get(fmt, fmt)}", file=out)
    if report.system_prompts:
        n = report.system_prompts
        print(f"system turns: {n:,} record{'s' * (n != 1)} carry a system prompt, written by the chat template in "
              "place of its default", file=out)
    if report.duplicates:
        shown = ", ".join(f"{rid} ({n}x)" for rid, n in list(report.duplicates.items())[:limit])
        more = len(report.duplicates) - limit
        n = len(report.duplicates)
        print(f"duplicate ids, records still used: {n:,} id{'s' if n > 1 else ''} on "
              f"{sum(report.duplicates.values()):,} records: {shown}" + (f" … and {more:,} more" if more > 0 else ""),
              file=out)
    if not report.bad:
        return
    width = max(len(r) for r in report.counts)
    for reason, n in report.counts.items():
        print(f"  {reason:<{width}}  {n:,}", file=out)
    print("bad records:", file=out)
    for r in report.bad[:limit]:
        print(f"  {r.id}  {r.reason}  {r.detail}", file=out)
    if len(report.bad) > limit:
        print(f"  … and {len(report.bad) - limit:,} more (see --json)", file=out)


@dataclass
class CheckConfig:
    data: str | list = config_field(positional=True, help="a .json/.jsonl file (LLaVA, ShareGPT, content parts), a folder "
                                                   "holding chat.json, parquet (a file or folder), a save_to_disk "
                                                   "folder, hf://datasets/OWNER/NAME, tar shards (a folder or "
                                                   "'s/{00000..00009}.tar'); in a --config file also a list of "
                                                   "sources: see data/sources.py")
    image_dir: str | None = image_dir_field()
    split: str | None = split_field()
    json: str | None = config_field(None, help="write the full report (every bad record) to this JSON file")
    model: str | None = config_field(None, help="model folder whose tokenizer counts tokens for the too_long check")
    max_length: int | None = config_field(None, help="with --model: flag records longer than this many tokens (default: "
                                              "train's default max_length, 2048, or the model's context if shorter)")
    workers: int = config_field(0, help="processes decoding images; 0: one per CPU core, 1: no pool")

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise UsageError(f"--workers must be >= 0, got {self.workers}")
        if self.max_length is not None and self.max_length < 1:
            raise UsageError(f"--max-length must be >= 1, got {self.max_length}")
        if self.model is None and self.max_length is not None:
            raise UsageError("--max-length needs --model (its tokenizer counts the tokens)")


def length_check(cfg: CheckConfig) -> tuple[Callable[[Record], int] | None, int | None]:
    """(record -> token count, the limit) with ``--model``; the limit defaults to what training would use."""
    if cfg.model is None:
        return None, None
    from ..chat.encode import DEFAULT_MAX_LENGTH, model_context_length, record_length_fn  # a tokenizer, no weights

    if not (Path(cfg.model) / "config.json").is_file():
        raise UsageError(f"--model {cfg.model}: not a MODEL_DIR (no config.json)")
    limit = cfg.max_length
    if limit is None:
        context = model_context_length(cfg.model)
        limit = min(DEFAULT_MAX_LENGTH, context or DEFAULT_MAX_LENGTH)
        print(f"too_long check: max_length {limit} (train's default {DEFAULT_MAX_LENGTH}; the model's context "
              f"{context}); set it with --max-length")
    return record_length_fn(cfg.model), limit


def main(cfg: CheckConfig) -> int:
    sources = parse_sources(cfg.data, cfg.split, cfg.image_dir)
    if len(sources) > 1 and (cfg.split or cfg.image_dir):
        raise UsageError("with a list of data sources, give each its own image_dir and split")
    length_fn, max_length = length_check(cfg)
    payloads, bad = [], 0
    for src in sources:  # each source with its own image root: one report each, and one exit code for all
        file, root = resolve_data(src.path, src.split, src.image_dir)
        report = check_file(file, root, workers=cfg.workers, length_fn=length_fn, max_length=max_length)
        if report.total == 0:
            raise UsageError(f"{file}: holds no records")
        print_report(report, file, root)
        payloads.append({"data": str(file), "image_root": str(root), "weight": src.weight, **report.to_dict()})
        bad += len(report.bad)
    if cfg.json:
        payload = payloads[0] if len(payloads) == 1 else {"sources": payloads}
        Path(cfg.json).write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
        print(f"report written to {cfg.json}")
    return 0 if not bad else 1
