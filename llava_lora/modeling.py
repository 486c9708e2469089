"""The composed model's named parts, parameter statistics, and the one loader of MODEL_DIR [+ adapter]."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

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


def dtypes_by_role(model: torch.nn.Module) -> dict[str, set[torch.dtype]]:
    """The dtypes of a (peft-wrapped) model's parameters: ``frozen`` (the base's weights), ``LoRA`` and
    ``projector`` (peft's trained copy of it; the base's own copy counts as frozen)."""
    out: dict[str, set[torch.dtype]] = {"frozen": set(), "LoRA": set(), "projector": set()}
    for name, p in model.named_parameters():
        role = "LoRA" if "lora_" in name else "projector" if ".modules_to_save." in name else "frozen"
        out[role].add(p.dtype)
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


# The one table of dtype names: torch's own (--dtype of build, export, eval, generate, demo), the short ones
# accelerate uses (train --precision), and the dtype both name. Every list of names in the commands comes from it.
_DTYPE_TABLE = (
    ("float32", "fp32", torch.float32),
    ("bfloat16", "bf16", torch.bfloat16),
    ("float16", "fp16", torch.float16),
)
DTYPES: dict[str, torch.dtype] = {name: dtype for name, _, dtype in _DTYPE_TABLE}
PRECISION_DTYPES: dict[str, torch.dtype] = {short: dtype for _, short, dtype in _DTYPE_TABLE}
HALF = tuple(dtype for dtype in DTYPES.values() if dtype.itemsize == 2)
# Frozen weights stored in bf16 and computed in fp32 (weight_only.py): a --precision and a --dtype of its own.
WEIGHT_ONLY = "bf16-weights"
DtypeName = Literal[("auto", *DTYPES, WEIGHT_ONLY)]  # a --dtype flag: auto keeps the checkpoint's own, or fp32
PrecisionName = Literal[("auto", *PRECISION_DTYPES, WEIGHT_ONLY)]  # train --precision: auto picks what is fast

# CPU flags of native bf16 arithmetic: x86's AVX512-BF16 and AMX-BF16, Arm's BF16 extension.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# The model's fp32 weights may take at most this share of the memory available for fp32 to count as fitting.
FP32_ROOM = 0.5


def cpu_bf16_flags() -> list[str]:
    """This CPU's native-bf16 flags (from /proc/cpuinfo; none where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in NATIVE_BF16_FLAGS if f in flags]


def cpu_half_native(half: torch.dtype = torch.bfloat16) -> tuple[bool, str]:
    """(whether torch runs this CPU's ``half`` matmuls natively, why), asked of torch itself: a bf16 matmul goes to
    oneDNN only where oneDNN is enabled and supports bf16 here (AVX-512); elsewhere, or with oneDNN switched off,
    it takes ATen's reference kernel, 100-300x slower than fp32. oneDNN on AVX-512 without the bf16 instructions
    emulates them: no faster than fp32 either. float16 is native only where oneDNN has it (AVX512-FP16, AMX-FP16)."""
    name = "bf16" if half == torch.bfloat16 else "fp16"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False, f"oneDNN is off, so torch's {name} matmuls take the reference kernel (~1/100 of fp32's speed)"
    if half == torch.float16:
        if torch.ops.mkldnn._is_mkldnn_fp16_supported():
            return True, "this CPU computes fp16 natively (oneDNN)"
        return False, "this CPU has no native fp16: torch's fp16 matmuls take the reference kernel"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, ("this CPU has no native bf16 (torch sends bf16 matmuls to oneDNN only with AVX-512): they "
                       "take the reference kernel, ~1/100 of fp32's speed")
    flags = cpu_bf16_flags()
    if not flags:
        return False, f"this CPU has no native bf16 (no {'/'.join(NATIVE_BF16_FLAGS[:2])}): oneDNN emulates it"
    return True, f"this CPU computes bf16 natively ({', '.join(flags)})"


def cpu_has_native_bf16() -> bool:
    return cpu_half_native()[0]


def memory_available() -> int:
    """Bytes this process may still take: the kernel's MemAvailable, capped by a cgroup v2 memory limit."""
    have = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            have = room if have is None else min(have, room)
    except (OSError, ValueError):
        pass
    return have if have is not None else 0


def checkpoint_params(model_dir: str | Path) -> int:
    """Parameters in MODEL_DIR's safetensors files, read from their headers (no weight is loaded)."""
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def fp32_fits(model_dir: str | Path | None) -> tuple[bool, str]:
    """(whether MODEL_DIR's weights in fp32 fit with room to spare: at most ``FP32_ROOM`` of the memory available,
    the rest left to activations and the data; the sizes, said)."""
    params = checkpoint_params(model_dir) if model_dir is not None and Path(model_dir).is_dir() else 0
    need, have = 4 * params, memory_available()
    if not params or not have:
        return True, "model size or free memory unknown"
    fits = need <= FP32_ROOM * have
    return fits, (f"the model in fp32 ({need / 1e9:.1f} GB) {'fits' if fits else 'does not fit'} in "
                  f"{100 * FP32_ROOM:.0f}% of the {have / 1e9:.1f} GB available")


def checkpoint_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype MODEL_DIR's weights were saved in, from its config.json (transformers 5 writes ``dtype``,
    4.x ``torch_dtype``); float32 when it names none."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"{model_dir}/config.json names dtype {name!r}, which torch does not have")
    return dtype


def cpu_policy(model_dir: str | Path | None, half: torch.dtype = torch.bfloat16) -> tuple[str, str]:
    """(mode, why) that is fast on this CPU for a model in ``half`` precision: "half" where the CPU computes it
    natively; else "fp32" where the model fits in fp32 with room to spare, and "weights" (frozen weights stored in
    ``half``, computed in fp32: weight_only.py) where it does not. Training, the held-out evaluation during it,
    eval, generate, demo and export all decide by it."""
    native, why = cpu_half_native(half)
    if native:
        return "half", f"auto: {why}"
    fits, size = fp32_fits(model_dir)
    if fits:
        return "fp32", f"auto: {why}; {size}"
    return "weights", f"auto: {why}; {size}, so frozen weights stay {dtype_name(half)} and are computed in fp32"


def train_precision(requested: str, device: str, model_dir: str | Path | None = None) -> tuple[str, str]:
    """(precision, why) of a training run: ``requested`` unless it is ``auto``; auto is bf16 on a GPU that has it
    (else fp32) and ``cpu_policy`` on a CPU (bf16, fp32 or ``WEIGHT_ONLY``)."""
    if requested != "auto":
        return requested, "asked for"
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU computes bf16"
        return "fp32", "auto: this GPU has no bf16"
    mode, why = cpu_policy(model_dir)
    return {"half": "bf16", "fp32": "fp32", "weights": WEIGHT_ONLY}[mode], why


def inference_dtype(requested: str, model_dir: str | Path, device: str) -> tuple[torch.dtype, bool, str]:
    """(dtype the model is loaded in, whether its frozen weights are computed in fp32 from that dtype, why) for eval,
    generate, demo and export: the checkpoint's own dtype unless ``requested`` names another; on a CPU, a half
    checkpoint goes by ``cpu_policy``. One copy, never cast per forward but for ``WEIGHT_ONLY``'s layer by layer."""
    if requested == WEIGHT_ONLY:
        return torch.bfloat16, True, "asked for"
    if requested != "auto":
        return resolve_dtype(requested), False, "asked for"
    dtype = checkpoint_dtype(model_dir)
    if device != "cpu" or dtype not in HALF:
        return dtype, False, "auto: the checkpoint's own dtype"
    mode, why = cpu_policy(model_dir, dtype)
    return (torch.float32 if mode == "fp32" else dtype), mode == "weights", why


def precision_label(dtype: torch.dtype, weight_only: bool) -> str:
    """How the start line names a loaded model's precision: 'bfloat16', or 'bfloat16 weights, float32 compute'."""
    return f"{dtype_name(dtype)} weights, float32 compute" if weight_only else dtype_name(dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(name: str) -> torch.dtype | str:
    """A dtype name (long or short) as torch's dtype; ``auto`` stays "auto" (the checkpoint's own dtype)."""
    if name == "auto":
        return "auto"
    try:
        return DTYPES.get(name) or PRECISION_DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype '{name}' (choose auto, {', '.join(DTYPES)}, {WEIGHT_ONLY})") from None


def is_half(name: str) -> bool:
    """True for a 16-bit float dtype's name."""
    return DTYPES.get(name, PRECISION_DTYPES.get(name)) in HALF


def load_model(model_dir: str | Path, adapter: str | Path | None = None, dtype: str = "auto",
               device: str | None = None, quiet: bool = False):
    """(model, processor) for MODEL_DIR, with the adapter of RUN_DIR attached when given.

    One copy of the weights, in the checkpoint's own dtype (``dtype`` names another), serves base and
    fine-tuned answers: with an adapter, the base is the same model under ``model.disable_adapter()``. The
    adapter's matrices load as peft loads them (float32: the few MB it saved, exactly), and frozen weights are
    never cast on the fly, but where they are stored in half precision for fp32 compute (weight_only.py: a layer's
    weight upcast for its own matmul). Prints one line saying which precision runs and why, unless ``quiet``.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"MODEL_DIR {model_dir} is not a model folder (no config.json); make one with "
                         "`llava-lora build`")
    device = device or default_device()
    torch_dtype, upcast, why = inference_dtype(dtype, model_dir, device)
    if not quiet:
        print(f"precision {precision_label(torch_dtype, upcast)} on {device} ({why})")
    with quiet_transformers():
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(model_dir)
    if adapter is not None:
        from .adapters import attach_adapter

        model = attach_adapter(model, adapter, model_dir)
    if upcast:
        from . import weight_only

        weight_only.apply(model)
    contiguous_head_input(model)
    model.to(device).eval()
    return model, processor


def llava_of(model):
    """The LlavaForConditionalGeneration inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def contiguous_head_input(model) -> None:
    """Hand the lm_head a contiguous input. Generation gives it the last position of each row, a strided slice of
    [B, T, D]; a bias-free Linear on a non-contiguous 3-D bf16 input on a CPU becomes a bmm that copies the weight
    once per row (pytorch/pytorch#151934): at Qwen1.5-4B's vocabulary, 3 GB and 10 s more per prefill of 4 rows."""
    def contiguous(module, args):
        return (args[0].contiguous(), *args[1:])

    llava_of(model).lm_head.register_forward_pre_hook(contiguous)
