"""The composed model's named parts and their parameter counts (what build, train, eval and the demo print)."""

from __future__ import annotations

from typing import Any

import torch

from ..tables import format_table

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


def dtypes_by_role(model: torch.nn.Module) -> dict[str, set[torch.dtype]]:
    """The dtypes of a (peft-wrapped) model's parameters: ``frozen`` (the base's weights), ``LoRA`` and
    ``projector`` (peft's trained copy of it; the base's own copy counts as frozen)."""
    out: dict[str, set[torch.dtype]] = {"frozen": set(), "LoRA": set(), "projector": set()}
    for name, p in model.named_parameters():
        role = "LoRA" if "lora_" in name else "projector" if ".modules_to_save." in name else "frozen"
        out[role].add(p.dtype)
    return out


def format_param_stats(rows: list[dict[str, Any]], trainable: bool = True) -> str:
    shown = [dict(r, **{"% of all": f"{100 * r['share_of_all']:.2f}%",
                        "% trainable": f"{100 * r['trainable_share']:.2f}%"}) for r in rows]
    columns = ["part", "total", "trainable", "% of all", "% trainable"] if trainable else ["part", "total", "% of all"]
    return format_table(shown, columns)


def llava_of(model):
    """The LlavaForConditionalGeneration inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


