"""``llava-lora data check DATA``: validate every record and image of a LLaVA data set, report the bad ones.

    llava-lora data check data/cc3m --json report.json      # exit 0: all usable, 1: some are not
    llava-lora data check data/cc3m --model MODEL_DIR       # and each record's tokens against train's limit

The checks themselves are ``data/check.py``'s; this command adds what needs a model (with ``--model``, each record
tokenised with its chat template: ``too_long``, ``encode_failed``, and the encoder's own ``empty_supervision`` /
``image_token_mismatch``), one report per data source, and the ``--json`` file. Reason codes: ``errors.REASONS``.
Duplicate ids are listed but do not change the exit code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import field, image_dir_field, split_field
from .data.check import check_file, print_report
from .data.records import Record, resolve_data
from .data.sources import parse_sources
from .errors import UsageError
from .prompts import DEFAULT_MAX_LENGTH, model_context_length, record_length_fn


@dataclass
class CheckConfig:
    data: str | list = field(positional=True, help="a LLaVA .json/.jsonl file, or a folder holding chat.json (in a "
                                                   "--config file also a list of sources: see data/sources.py)")
    image_dir: str | None = image_dir_field()
    split: str | None = split_field()
    json: str | None = field(None, help="write the full report (every bad record) to this JSON file")
    model: str | None = field(None, help="model folder whose tokenizer counts tokens for the too_long check")
    max_length: int | None = field(None, help="with --model: flag records longer than this many tokens (default: "
                                              "train's default max_length, 2048, or the model's context if shorter)")
    workers: int = field(0, help="processes decoding images; 0: one per CPU core, 1: no pool")

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
