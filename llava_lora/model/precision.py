"""Dtypes and precision, in one place: the table of dtype names, what this CPU computes fast (asked of torch, measured),
whether a model fits in fp32, the precision a training run computes in (``train_precision``) and the dtype inference
loads in (``inference_dtype``): fast on every CPU (``cpu_policy``)."""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import field
from ..errors import UsageError


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
# Frozen weights stored in bf16 and computed in fp32 (kernels/weight_only.py): a --precision and a --dtype of its own.
WEIGHT_ONLY = "bf16-weights"
DtypeName = Literal[("auto", *DTYPES, WEIGHT_ONLY)]  # a --dtype flag: auto keeps the checkpoint's own, or fp32
PrecisionName = Literal[("auto", *PRECISION_DTYPES, WEIGHT_ONLY)]  # train --precision: auto picks what is fast


def load_dtype_field() -> Any:
    """The ``--dtype`` field of the commands that load a model for inference (eval, generate, demo)."""
    return field("auto", help=f"auto (the checkpoint's own dtype; on a CPU without fast bf16, float32 where the "
                              f"model fits in half the free memory, else {WEIGHT_ONLY}), {', '.join(DTYPES)}, "
                              f"{WEIGHT_ONLY} (bfloat16 weights computed in float32)")


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


# bf16 is taken on a CPU only where its matmuls measure at least this multiple of fp32's speed here: some AVX512-BF16
# CPUs without AMX run oneDNN's bf16 matmuls at about half fp32's (an Intel Xeon: 153 against 274 GFLOP/s at 2048^3).
BF16_MIN_SPEEDUP = 1.0
_PROBE = (256, 1024, 1024)  # m, k, n: ~0.5 GFLOP a matmul, a few ms at oneDNN's speed on one thread


@functools.lru_cache(maxsize=None)
def matmul_gflops(half: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(fp32, ``half``) matmul GFLOP/s measured here on one thread, best of 8 each after a warm-up, interleaved:
    ~0.1 s, once a process. One thread needs one free core, so a busy machine (a data worker, another run) rarely
    touches the best time; the ratio is the same on two threads. Only called where oneDNN takes ``half`` (never the
    reference kernel, where one probe would take seconds)."""
    m, k, n = _PROBE
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    pairs = {torch.float32: (a, b), half: (a.to(half), b.to(half))}
    best = dict.fromkeys(pairs, math.inf)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rep in range(9):  # the first round warms up and is not counted
            for dtype, (x, y) in pairs.items():
                t = time.perf_counter()
                x @ y
                if rep:
                    best[dtype] = min(best[dtype], time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return tuple(2 * m * k * n / best[dtype] / 1e9 for dtype in (torch.float32, half))  # type: ignore[return-value]


def cpu_half_fast(half: torch.dtype = torch.bfloat16) -> tuple[bool, str]:
    """(whether torch computes this CPU's ``half`` matmuls natively and faster than fp32, why), asked of torch and
    measured: a bf16 matmul goes to oneDNN only where oneDNN is enabled and supports bf16 here (AVX-512); elsewhere,
    or with oneDNN switched off, it takes ATen's reference kernel, 100-300x slower than fp32. oneDNN on AVX-512
    without the bf16 instructions emulates them, and with them it is not always faster than fp32 (without AMX): the
    matmul is timed (``matmul_gflops``). float16 is native only where oneDNN has it (AVX512-FP16, AMX-FP16)."""
    name = "bf16" if half == torch.bfloat16 else "fp16"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False, f"oneDNN is off, so torch's {name} matmuls take the reference kernel (~1/100 of fp32's speed)"
    if half == torch.float16:
        if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
            return False, "this CPU has no native fp16: torch's fp16 matmuls take the reference kernel"
        native = "this CPU computes fp16 natively (oneDNN"
    else:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False, ("this CPU has no native bf16 (torch sends bf16 matmuls to oneDNN only with AVX-512): they "
                           "take the reference kernel, ~1/100 of fp32's speed")
        flags = cpu_bf16_flags()
        if not flags:
            return False, f"this CPU has no native bf16 (no {'/'.join(NATIVE_BF16_FLAGS[:2])}): oneDNN emulates it"
        native = f"this CPU computes bf16 natively ({', '.join(flags)}"
    fp32, fast = matmul_gflops(half)
    speed = f"{name} matmuls at {fast / fp32:.2f}x fp32's here: {fast:.0f} against {fp32:.0f} GFLOP/s measured"
    if fast < BF16_MIN_SPEEDUP * fp32:
        return False, f"{native}, but slower than fp32: {speed})"
    return True, f"{native}; {speed})"


def cpu_bf16_fast() -> bool:
    return cpu_half_fast()[0]


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
    size = f"{need / 1e9:.1f} GB" if need >= 1e8 else f"{need / 1e6:.1f} MB"
    return fits, (f"the model in fp32 ({size}) {'fits' if fits else 'does not fit'} in "
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
    natively and faster than fp32; else "fp32" where the model fits in fp32 with room to spare, and "weights" (frozen
    weights stored in ``half``, computed in fp32: kernels/weight_only.py) where it does not. Training, the held-out evaluation during it,
    eval, generate, demo and export all decide by it."""
    fast, why = cpu_half_fast(half)
    if fast:
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


def frozen_dtype(precision: str) -> torch.dtype:
    """The dtype a training run holds its frozen weights in: its precision's, bf16 for ``WEIGHT_ONLY``."""
    return torch.bfloat16 if precision == WEIGHT_ONLY else PRECISION_DTYPES[precision]


def autocast_precision(precision: str) -> str:
    """accelerate's ``mixed_precision`` for a run: "no" where the compute is fp32 (fp32, ``WEIGHT_ONLY``)."""
    return "no" if precision in ("fp32", WEIGHT_ONLY) else precision
