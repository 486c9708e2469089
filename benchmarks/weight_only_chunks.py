"""One frozen linear layer on the bf16-weights path, by upcast chunk size, against fp32 and bf16 weights.

    .venv/bin/python benchmarks/weight_only_chunks.py                 # ~1 min: Qwen1.5-4B's MLP up_proj, 8 and 600 tokens
    .venv/bin/python benchmarks/weight_only_chunks.py --tokens 1 8 --rows 151936   # the lm_head
    PYTHONPATH=benchmarks/no_onednn .venv/bin/python benchmarks/weight_only_chunks.py   # as on an AVX2-only CPU

Times are CPU seconds of this process (user + system, ``time.process_time``) on one thread, so a busy machine
stretches them less than wall time; each variant is timed in turn, round after round, and the median printed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llava_lora.kernels import weight_only  # noqa: E402
from llava_lora.model.precision import cpu_half_fast  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_time_ms(fn, calls: int) -> float:
    fn()
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=6912, help="output features (6912: Qwen1.5-4B's MLP)")
    p.add_argument("--cols", type=int, default=2560, help="input features (2560: Qwen1.5-4B's hidden size)")
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 600], help="rows of the input")
    p.add_argument("--chunks", type=int, nargs="+", default=[26, 22, 20, 18], help="log2 of the chunk sizes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    native, why = cpu_half_fast()
    print(f"cpu: {cpu_name()}; native bf16: {native} ({why}); 1 thread; "
          f"weight [{args.rows}, {args.cols}]")
    weight = torch.randn(args.rows, args.cols).bfloat16()
    layer = torch.nn.Linear(args.cols, args.rows, bias=False).requires_grad_(False)
    layer.weight.data = weight
    weight_only.apply(layer)
    fp32 = weight.float()
    default = weight_only.CHUNK_ELEMENTS
    for tokens in args.tokens:
        x = torch.randn(tokens, args.cols)
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for log2 in args.chunks:
                weight_only.CHUNK_ELEMENTS = 1 << log2
                name = f"bf16-weights, chunk 2^{log2}" + (" (default)" if 1 << log2 == default else "")
                with torch.no_grad():
                    times.setdefault(name, []).append(cpu_time_ms(lambda: layer(x), args.calls))
            with torch.no_grad():
                times.setdefault("fp32 weights", []).append(cpu_time_ms(lambda: x @ fp32.T, args.calls))
                times.setdefault("bf16 weights, bf16 matmul", []).append(
                    cpu_time_ms(lambda: x.bfloat16() @ weight.T, args.calls))
        weight_only.CHUNK_ELEMENTS = default
        print(f"\n{tokens} tokens: CPU ms per call, median of {args.rounds} rounds of {args.calls}")
        for name, values in times.items():
            print(f"  {name:32s} {statistics.median(values):9.2f}")


if __name__ == "__main__":
    main()
