"""The fast path of a training run: each option resolved against the device and the installed packages at
start, and refused there (before RUN_DIR is touched or a model loaded) where it cannot apply.

    --attn-implementation   resolve_attn_implementation   flash attention / blocked eager (CPU, bf16) / SDPA / eager
    --fused-loss            resolve_fused_loss            Liger's fused linear cross-entropy (CUDA)
    --fused-kernels         resolve_fused_kernels         RMSNorm + SwiGLU fused by torch.compile (CPU, C++ compiler)
    --compile, --quantize   check_compile, check_quantize torch.compile's C++ compiler; bitsandbytes on CUDA
    (CPU, no bf16-weights)  keep_cpu_heap                 glibc keeps freed activation memory instead of re-mapping it

The run's precision is ``model.precision.train_precision``'s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util

from ..errors import UsageError
from ..model.load import lm_supports_sdpa


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_attn_implementation(choice: str, device: str, model_dir: str | None = None,
                                precision: str = "fp32") -> str:
    """The attention of ``--attn-implementation`` on ``device`` (auto: flash attention where installed on a GPU;
    blocked eager on a CPU in bf16, where SDPA's CPU kernel gains nothing from bf16; else SDPA where the language
    model has it, else eager)."""
    if choice == "auto":
        if device == "cuda" and _installed("flash_attn"):
            return "flash_attention_2"
        if device == "cpu" and precision == "bf16":
            return "blocked_eager"
        return "sdpa" if lm_supports_sdpa(model_dir) else "eager"
    if choice == "flash_attention_2" and (device != "cuda" or not _installed("flash_attn")):
        raise UsageError("--attn-implementation flash_attention_2 needs a CUDA device and the flash-attn package "
                         "(pip install flash-attn); use sdpa")
    return choice


def resolve_fused_loss(choice: str, device: str) -> bool:
    """Whether the loss uses Liger's fused linear cross-entropy (Triton kernels: CUDA only)."""
    available = device == "cuda" and _installed("liger_kernel")
    if choice == "on" and not available:
        raise UsageError("--fused-loss on needs a CUDA device and the liger-kernel package (pip install "
                         "liger-kernel); use --fused-loss off")
    return available if choice == "auto" else choice == "on"


def check_quantize(choice: str, device: str) -> None:
    """4-bit loading is bitsandbytes' CUDA kernels: refuse it up front elsewhere, never ignore it."""
    if choice == "4bit" and device != "cuda":
        raise UsageError(f"--quantize 4bit needs a CUDA device (bitsandbytes' 4-bit kernels); this run is on "
                         f"{device}: use --quantize none")
    if choice == "4bit" and not _installed("bitsandbytes"):
        raise UsageError("--quantize 4bit needs the bitsandbytes package (pip install bitsandbytes)")


def _has_cpp_compiler() -> bool:
    """Whether torch.compile's CPU code (C++ built on the spot) can be built: the compiler inductor itself would
    use, $CXX, else g++."""
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return False
    return True


def check_compile(enabled: bool, device: str) -> None:
    """Refuse --compile up front on a CPU without a C++ compiler, rather than fail at the first step after the
    model has loaded."""
    if enabled and device == "cpu" and not _has_cpp_compiler():
        raise UsageError("--compile on a CPU needs a C++ compiler for torch.compile's generated code (g++, or the "
                         "one $CXX names); install one or drop --compile")


def resolve_fused_kernels(choice: str, device: str, compile_all: bool = False) -> bool:
    """Whether the language model's RMSNorm and SwiGLU run as torch.compile-fused kernels: on a CPU (inductor's
    C++), where they were measured; a GPU keeps the eager kernels unless the whole model is compiled (--compile,
    which fuses these itself)."""
    if choice == "on" and compile_all:
        raise UsageError("--fused-kernels on with --compile: the compiled language model fuses its norms and SwiGLU "
                         "itself; drop one of the two")
    if choice == "off" or compile_all:
        return False
    if device != "cpu":
        if choice == "on":
            raise UsageError(f"--fused-kernels on is for a CPU (this run is on {device}); use --fused-kernels off")
        return False
    if not _has_cpp_compiler():
        if choice == "on":
            raise UsageError("--fused-kernels on needs a C++ compiler for torch.compile's generated code (g++, or "
                             "the one $CXX names); install one or use --fused-kernels off")
        return False
    return True


def fused_summary(fused: dict[str, int]) -> str:
    """'RMSNorm x17, SwiGLU x8', or 'off'."""
    return ", ".join(f"{kind} x{n}" for kind, n in fused.items() if n) or "off"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_MMAP_THRESHOLD = 64 << 20  # blocks under this come from the heap and are reused
HEAP_TRIM_THRESHOLD = 256 << 20  # free memory at the heap's top kept up to this, not handed back


def keep_cpu_heap() -> bool:
    """Let glibc's malloc reuse freed activation blocks rather than hand them back and map them again next step.

    Why: by default a freed block over the (adaptive, at most 32 MB) mmap threshold is unmapped, and free memory at
    the heap's top over the trim threshold is returned, so every step faults the same activation memory in again:
    ~7,700 minor page faults a step in the quickstart on an AVX2 EPYC, 41 s of system time in a 309 s run, and
    ~10% of a step. With blocks up to 64 MB reused and 256 MB of the heap kept, a step faults a few pages. Costs
    RSS, the kept top and what lies free inside the heap: +0.31 GB at the real size with bf16-weights, which is why
    train leaves that path alone; blocks over 64 MB (a real model's weights) are mapped as before. Returns whether
    it applied (glibc only; elsewhere nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD))
