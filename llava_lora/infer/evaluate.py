"""Base vs fine-tuned on the same samples: predictions, metrics and parameter counts.

    llava-lora eval --model MODEL_DIR --adapter RUN_DIR --data DATA --split test     # -> RUN_DIR/eval-test/
    llava-lora eval --model MODEL_DIR --adapter RUN_DIR --data DATA --index 3        # one sample, in full
    llava-lora eval --model MODEL_DIR --data DATA --limit 100                        # the base alone

One model is loaded; the base answers with its adapter switched off, the fine-tuned one with it on. Each
sample is asked as it was taught (``prompts.prompt_and_reference``: for a multi-turn record the last answer is
predicted from the history). Writes ``predictions.jsonl``, ``summary.json``, ``report.md`` and the resolved
``eval.yaml`` to OUT; a sample whose image cannot be read is skipped and listed in the summary.
"""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import config as cfglib
from ..chat import prompts
from ..config import device_field, field, image_dir_field, model_field, split_field
from ..data.records import Record, load_records, resolve_data
from ..errors import UsageError
from ..model.load import loaded_precision
from ..model.precision import load_dtype_field
from ..outdirs import OVERWRITE_HELP, check_out, new_folder
from . import metrics
from .answers import SYSTEMS, Prediction, predict
from .engine import GenerationSettings, settings_from

OUTPUTS = ("predictions.jsonl", "summary.json", "report.md", "eval.yaml")
LABELS = {"base": "base", "finetuned": "fine-tuned"}


@dataclass(kw_only=True)
class EvalConfig(GenerationSettings):
    model: str = model_field()
    data: str = field(help="data in any format `data check` reads (docs/data.md), or a folder holding chat.json / "
                         "SPLIT.json")
    adapter: str | None = field(None, help="RUN_DIR (or a checkpoint folder); without it the base is evaluated alone")
    split: str | None = split_field()
    image_dir: str | None = image_dir_field()
    limit: int | None = field(None, help="evaluate the first N usable samples only")
    index: int | None = field(None, help="show sample I (0-based, among usable samples) in full; writes files "
                                         "only with --out")
    batch_size: int = field(8, help="samples generated together (left-padded, KV-cached)")
    out: str | None = field(None, help="output folder; none: RUN_DIR/eval-<split or data name>, or ./eval-<...> "
                                       "without --adapter")
    overwrite: bool = field(False, help=OVERWRITE_HELP)
    examples: int = field(20, help="most differing examples shown in report.md")
    device: str | None = device_field()
    dtype: str = load_dtype_field()
    seed: int = field(0, help="seed for sampling (temperature > 0)")

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {self.limit}")
        if self.index is not None and self.index < 0:
            raise UsageError(f"--index must be >= 0, got {self.index}")
        if self.limit is not None and self.index is not None:
            raise UsageError("give --limit or --index, not both")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


# ---------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------


def choose_records(records: list[Record], limit: int | None, index: int | None, source: str) -> list[Record]:
    """The records to evaluate: all, the first ``limit``, or the one at ``index``."""
    if index is not None:
        if not records:
            raise UsageError(f"--index {index}: {source} has no usable sample")
        if index >= len(records):
            raise UsageError(f"--index {index} is out of range: {source} has {len(records)} usable samples "
                             f"(0..{len(records) - 1})")
        return [records[index]]
    return records[:limit] if limit is not None else records


# ---------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------


def score(predictions: list[Prediction], systems: Sequence[str]) -> dict[str, dict[str, float]]:
    refs = [p.reference for p in predictions]
    return {s: metrics.score_all([p.answers[s] for p in predictions], refs) for s in systems}


def metric_rows(scores: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per metric: a column per system, and the change when both are there."""
    rows = []
    for m in metrics.METRICS:
        row: dict[str, Any] = {"metric": m, **{LABELS[s]: v[m] for s, v in scores.items()}}
        if len(scores) == 2:
            row["change"] = f"{scores['finetuned'][m] - scores['base'][m]:+.4f}"
        rows.append(row)
    return rows


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("llava-lora", "torch", "transformers", "peft", "sacrebleu", "rouge-score"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _md_cell(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>") or " "


def _md_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return _md_cell(v)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _flipped(p: Prediction) -> bool:
    """Fine-tuning made this answer right, or wrong."""
    return (metrics.exact_match_normalised(p.answers["base"], p.reference)
            != metrics.exact_match_normalised(p.answers["finetuned"], p.reference))


def _differences_md(predictions: list[Prediction], examples: int) -> list[str]:
    differ = [p for p in predictions if p.answers["base"] != p.answers["finetuned"]]
    shown = sorted(differ, key=lambda p: not _flipped(p))[:examples]  # the flipped ones say most: first
    lines = [f"## Where the two differ ({len(shown)} shown of {len(differ)})", ""]
    if not shown:
        return lines + ["The base and the fine-tuned model gave the same answer on every sample.", ""]
    rows = [{"id": p.id, "question": p.question, "reference": p.reference, "base": p.answers["base"],
             "fine-tuned": p.answers["finetuned"]} for p in shown]
    return lines + [_md_table(rows, ["id", "question", "reference", "base", "fine-tuned"]), ""]


def report_markdown(summary: dict[str, Any], predictions: list[Prediction], examples: int) -> str:
    """report.md: what was evaluated, the metrics table, parameters, differing answers, skipped samples."""
    both = len(summary["metrics"]) == 2
    stats = [dict(r, **{"% of all": f"{100 * r['share_of_all']:.2f}%",
                        "% trainable": f"{100 * r['trainable_share']:.2f}%"}) for r in summary["param_stats"]]
    adapter = f"`{summary['adapter']}`" if summary["adapter"] else "none"
    parts = [
        "# Evaluation: " + ("base vs fine-tuned" if both else "base model"), "",
        f"- model: `{summary['model']}`", f"- adapter: {adapter}",
        f"- data: `{summary['data']}`, {summary['samples']} samples evaluated, {len(summary['skipped'])} skipped",
        "- generation: " + ", ".join(f"{k}={v}" for k, v in summary["settings"].items()), "",
        "## Metrics", "", _md_table(metric_rows(summary["metrics"]), metric_columns(list(summary["metrics"]))), "",
        "EM, F1, BLEU-4 and ROUGE-L are in [0, 1]; CIDEr-D uses the COCO scale (0-10).", "",
        "## Parameters", "", _md_table(stats, ["part", "total", "trainable", "% of all", "% trainable"]), "",
    ]
    if both:
        parts += _differences_md(predictions, examples)
    if summary["skipped"]:
        parts += ["## Skipped samples", "", _md_table(summary["skipped"], ["id", "reason", "detail", "when"]), ""]
    return "\n".join(parts)


def show_one(record: Record, prediction: Prediction | None, skipped: list[dict[str, str]]) -> str:
    """One sample in full: history, question, reference and each answer."""
    shown = ", ".join(ref.replace("\0", "in the data: ") for ref in record.images)  # NUL: a table's or shard's
    lines = [f"id: {record.id}", f"image{'s' * (len(record.images) > 1)}: {shown or '(none: text-only)'}"]
    lines += [f"system: {record.system}"] if record.system is not None else []
    for turn in record.turns[:-2]:
        lines.append(f"{turn.role}: {turn.text}")
    lines += [f"question: {prompts.question(record)}", f"reference: {record.turns[-1].text}"]
    if prediction is None:
        s = skipped[0]
        raise UsageError(f"sample {record.id}: {s['reason']}: {s['detail']}")
    lines += [f"{LABELS[s]}: {a}" for s, a in prediction.answers.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------


def default_out(cfg: EvalConfig) -> Path | None:
    """OUT when --out is not given: beside the adapter, or in the working folder; none for --index."""
    if cfg.out is not None:
        return Path(cfg.out)
    if cfg.index is not None:
        return None
    # a shard pattern's braces or a hub spec's colon make no folder name
    name = "eval-" + re.sub(r"[^\w.-]+", "_", cfg.split or Path(cfg.data).stem).strip("_")
    return (Path(cfg.adapter) if cfg.adapter else Path.cwd()) / name


def write_outputs(out: Path, cfg: EvalConfig, summary: dict[str, Any], predictions: list[Prediction]) -> None:
    with new_folder(out, cfg.overwrite) as tmp:
        with open(tmp / "predictions.jsonl", "w") as f:
            for p in predictions:
                f.write(json.dumps(p.row(), ensure_ascii=False) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        (tmp / "report.md").write_text(report_markdown(summary, predictions, cfg.examples))
        cfglib.save(cfg, tmp / "eval.yaml")


def build_summary(cfg: EvalConfig, model, data_file: Path, image_root: Path, predictions: list[Prediction],
                  skipped: list[dict[str, str]], systems: Sequence[str], seconds: float) -> dict[str, Any]:
    from ..model.parts import param_stats

    return {
        "model": str(cfg.model), "adapter": str(cfg.adapter) if cfg.adapter else None,
        "data": str(data_file), "image_root": str(image_root), "split": cfg.split,
        "samples": len(predictions), "skipped": skipped,
        "metrics": score(predictions, systems), "param_stats": param_stats(model),
        "settings": {**asdict(settings_from(cfg)), "batch_size": cfg.batch_size, "dtype": loaded_precision(model),
                     "device": str(model.device)},
        "seconds": round(seconds, 3), "samples_per_s": round(len(predictions) / seconds, 3) if seconds else None,
        "versions": versions(),
    }


def metric_columns(systems: Sequence[str]) -> list[str]:
    return ["metric", *(LABELS[s] for s in systems)] + (["change"] if len(systems) == 2 else [])


def main(cfg: EvalConfig) -> int:
    import torch

    from ..model.load import load_model

    data_file, image_root = resolve_data(cfg.data, cfg.split, cfg.image_dir)
    records, bad = load_records(data_file)
    chosen = choose_records(records, cfg.limit, cfg.index, str(data_file))
    if not chosen:
        raise UsageError(f"{data_file}: no usable sample ({len(bad)} bad records; see `llava-lora data check`)")
    out = default_out(cfg)
    if out is not None:
        # before minutes of generation, not after; OUT may sit in RUN_DIR (its default: RUN_DIR/eval-<split>)
        check_out(out, cfg.overwrite, inputs={"--model": cfg.model, "--data": cfg.data, "--image-dir": cfg.image_dir},
                  homes={"--adapter": cfg.adapter})

    model, processor = load_model(cfg.model, cfg.adapter, cfg.dtype, cfg.device)
    systems = SYSTEMS if cfg.adapter else SYSTEMS[:1]
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    predictions, skipped = predict(model, processor, chosen, image_root, settings_from(cfg), cfg.batch_size,
                                   systems, progress=cfg.index is None)
    seconds = time.perf_counter() - start
    if cfg.index is not None:
        print(show_one(chosen[0], predictions[0] if predictions else None, skipped))
    if not predictions:
        raise UsageError(f"{data_file}: every selected sample was skipped (first: {skipped[0]['id']}: "
                         f"{skipped[0]['reason']})")
    # records the file could not parse come first: they are the data set's, whatever --limit chose
    skipped = [{**r.as_dict(), "when": "loading"} for r in bad] + skipped
    summary = build_summary(cfg, model, data_file, image_root, predictions, skipped, systems, seconds)
    if cfg.index is None:
        add_losses(summary, model, processor, chosen, image_root, cfg.batch_size, systems)
        print_summary(summary, systems)
    if out is not None:
        write_outputs(out, cfg, summary, predictions)
        print(f"wrote {', '.join(OUTPUTS)} to {out}")
    return 0


def add_losses(summary: dict[str, Any], model, processor, records: list[Record], image_root: Path,
               batch_size: int, systems: Sequence[str]) -> None:
    """Each system's training loss on the same records (teacher-forced, every answer supervised)."""
    from ..model.loss import model_loss

    summary["loss"] = {}
    for s in systems:
        loss, tokens = model_loss(model, processor, records, image_root, batch_size, adapter=s == "finetuned")
        summary["loss"][s] = {"loss": loss, "tokens": tokens}


def print_summary(summary: dict[str, Any], systems: Sequence[str]) -> None:
    from ..model.parts import format_param_stats
    from ..tables import format_table

    print(format_table(metric_rows(summary["metrics"]), metric_columns(systems)))
    print("loss (mean over answer tokens): " + ", ".join(f"{LABELS[s]} {v['loss']:.4f}"
                                                         for s, v in summary["loss"].items()))
    print("\n" + format_param_stats(summary["param_stats"]))
    print(f"\n{summary['samples']} samples in {summary['seconds']:.1f} s ({summary['samples_per_s']} samples/s), "
          f"{len(summary['skipped'])} skipped")
