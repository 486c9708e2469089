"""The composed model's named parts, parameter statistics, and the one loader of MODEL_DIR [+ adapter]."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError

# Part name -> module path inside LlavaForConditionalGeneration (transformers 5 layout).
PARTS: dict[str, str] = {
    "vision tower": "model.vision_tower",
    "projector": "model.multi_modal_projector",
    "language model": "model.language_model",
    "lm_head": "lm_head",
}
_PEFT_PREFIX = "base_model.model."


def part_of(name: str) -> str:
    """The part a parameter belongs to; LoRA matrices form their own part."""
    if "lora_" in name:
        return "LoRA"
    name = name.removeprefix(_PEFT_PREFIX)
    for part, prefix in PARTS.items():
        if name == prefix or name.startswith(prefix + "."):
            return part
    return "other"


def param_stats(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Total and trainable parameters per part (shared tensors counted once; peft's frozen copy of a
    ``modules_to_save`` module is not counted, its trained copy is). An adapter's parameters count as
    trainable even when it was loaded frozen for inference: they are what fine-tuning trains."""
    rows: dict[str, dict[str, Any]] = {p: {"part": p, "total": 0, "trainable": 0} for p in [*PARTS, "LoRA"]}
    stand_in = getattr(model, "lora_stand_in", False)  # a projector-only run's frozen no-op LoRA (adapters.py)
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or ".original_module." in name:
            continue
        seen.add(id(p))
        row = rows.setdefault(part_of(name), {"part": part_of(name), "total": 0, "trainable": 0})
        row["total"] += p.numel()
        trained = p.requires_grad or ("lora_" in name and not stand_in) or ".modules_to_save." in name
        row["trainable"] += p.numel() if trained else 0
    out = [r for r in rows.values() if r["total"] or r["part"] in PARTS]
    total = sum(r["total"] for r in out)
    trainable = sum(r["trainable"] for r in out)
    out.append({"part": "all", "total": total, "trainable": trainable})
    for r in out:
        r["share_of_all"] = r["total"] / total if total else 0.0
        r["trainable_share"] = r["trainable"] / r["total"] if r["total"] else 0.0
    return out


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table (numbers right-aligned, with thousands separators)."""
    def cell(v: Any) -> str:
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1 else f"{v:,.2f}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]
    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, numeric)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def format_param_stats(rows: list[dict[str, Any]], trainable: bool = True) -> str:
    shown = [dict(r, **{"% of all": f"{100 * r['share_of_all']:.2f}%",
                        "% trainable": f"{100 * r['trainable_share']:.2f}%"}) for r in rows]
    columns = ["part", "total", "trainable", "% of all", "% trainable"] if trainable else ["part", "total", "% of all"]
    return format_table(shown, columns)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load progress bars and load reports (ours say what matters)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str) -> torch.dtype | str:
    """A dtype name as torch's dtype; ``auto`` stays "auto" (the checkpoint's own dtype)."""
    if name == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise UsageError(f"unknown dtype '{name}' (choose auto, float32, bfloat16, float16)") from None


def load_model(model_dir: str | Path, adapter: str | Path | None = None, dtype: str = "auto",
               device: str | None = None):
    """(model, processor) for MODEL_DIR, with the adapter of RUN_DIR attached when given.

    One model in memory serves base and fine-tuned answers: with an adapter, the base is the same
    model under ``model.disable_adapter()``.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"MODEL_DIR {model_dir} is not a model folder (no config.json); make one with "
                         "`llava-lora build`")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype)
    with quiet_transformers():
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype)
    if device == "cpu" and dtype == "auto" and model.dtype in (torch.float16, torch.bfloat16):
        model = model.float()  # half precision matmuls are slow or unsupported on many CPUs
    processor = AutoProcessor.from_pretrained(model_dir)
    if adapter is not None:
        from .adapters import attach_adapter

        model = attach_adapter(model, adapter, model_dir)
    model.to(device).eval()
    return model, processor
