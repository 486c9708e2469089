"""peft's LoRA forward against the fused one (``llava_lora/kernels/lora.py``), forward and backward, side by side in
one process (rounds interleaved), float32: the time of every LoRA-targeted linear of one training step.

    .venv/bin/python benchmarks/lora_fused.py                 # the quickstart's shapes and the seed's at batch 1
    .venv/bin/python benchmarks/lora_fused.py --threads 1

Prints the median of ``--rounds`` rounds per workload and the ratio; say which CPU the figures came from.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from peft import LoraConfig, get_peft_model

from llava_lora.kernels import lora

# (name, tokens a step, layers, [(in, out) of each targeted linear], r, alpha)
WORKLOADS = [
    ("quickstart (16 x 144 tokens, 2 layers, r=16 on all 7 linears)", 2304, 2,
     [(128, 128), (128, 64), (128, 64), (128, 128), (128, 256), (128, 256), (256, 128)], 16, 32),
    ("seed at batch 1 (600 tokens, 1 of 40 layers, r=4 on q/v)", 600, 1, [(2560, 2560), (2560, 2560)], 4, 8),
]


class _Layer(torch.nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.linears = torch.nn.ModuleList(torch.nn.Linear(i, o) for i, o in shapes)

    def forward(self, xs):
        return [m(x) for m, x in zip(self.linears, xs)]


def _model(shapes, r, alpha, layers):
    torch.manual_seed(0)
    model = torch.nn.ModuleList(_Layer(shapes) for _ in range(layers))
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=r"\d+\.linears\.\d+")
    return get_peft_model(model, cfg)


def _round(model, xs, grads) -> float:
    start = time.perf_counter()
    for layer in model.base_model.model:
        for y, g in zip(layer(xs), grads):
            y.backward(g)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads,"
          f" cpu capability {torch.backends.cpu.get_cpu_capability()}")
    for name, tokens, layers, shapes, r, alpha in WORKLOADS:
        peft_model, fused_model = _model(shapes, r, alpha, layers), _model(shapes, r, alpha, layers)
        lora.apply(fused_model)
        xs = [torch.randn(tokens, i, requires_grad=True) for i, _ in shapes]
        grads = [torch.randn(tokens, o) for _, o in shapes]
        times = {"peft": [], "fused": []}
        for _ in range(args.rounds + 1):  # the first round warms up and is dropped below
            times["peft"].append(_round(peft_model, xs, grads))
            times["fused"].append(_round(fused_model, xs, grads))
        med = {k: sorted(v[1:])[len(v[1:]) // 2] * 1e3 for k, v in times.items()}
        print(f"{name}: peft {med['peft']:.2f} ms, fused {med['fused']:.2f} ms, "
              f"{med['peft'] / med['fused']:.2f}x")


if __name__ == "__main__":
    main()
