"""The defaults on both kinds of CPU, side by side in one run: native bf16 (AVX512-BF16/AMX) and none (AVX2-only,
taken here by switching oneDNN off: benchmarks/no_onednn/sitecustomize.py).

    .venv/bin/python benchmarks/cpu_kinds.py                       # ~6 min on 2 idle cores (tiny quickstart model)
    .venv/bin/python benchmarks/cpu_kinds.py --work qs-out --json cpu_kinds.json
    .venv/bin/python benchmarks/cpu_kinds.py --repeats 3       # every run 3 times, taking turns: medians, ~18 min

1. Matmul GFLOP/s (2048^3 fp32, 1024^3 bf16: the reference kernel is too slow for more), oneDNN on and off.
2. ``train`` (the quickstart recipe, ``--steps`` steps) and ``eval`` (the held-out split) on the quickstart's tiny
   model, each in a process of its own, for each kind: the default (``auto``), the fp32 path (``--precision fp32``
   / ``--dtype float32``) and the bf16 path (what ``auto`` was before it asked torch: ``--precision bf16`` /
   ``--dtype bfloat16``). samples/s of train from its metrics.jsonl (the rows after the first, which holds the
   compilation of the fused kernels), of eval from its summary.json. With ``--repeats N`` the whole set runs N
   times, round after round (so a slow minute of a shared machine hits every variant alike), and each figure is the
   median with its spread (min-max); the CPU seconds of each process (user + system) are printed beside it.

Targets: on the CPU without native bf16, each default >= 0.9x its fp32 path; on the native one, each default >= 0.9x
the bf16 path (no slower than before; the same computation, so the ratio is noise around 1). On a CPU without native
bf16 (a real AVX2 host) both kinds are that CPU, oneDNN on and off, and each is held to its fp32 path; the runs on the
reference bf16 kernel take a fifteenth of the steps (samples/s are comparable, CPU seconds are not).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
NO_ONEDNN = REPO / "benchmarks" / "no_onednn"  # on PYTHONPATH: oneDNN off in that process


def matmul_gflops(dtype: torch.dtype, n: int, reps: int = 3) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def matmuls() -> list[dict]:
    import warnings

    rows = []
    for onednn in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with torch.backends.mkldnn.flags(enabled=onednn):
                rows.append({"oneDNN": onednn, "fp32_2048": matmul_gflops(torch.float32, 2048),
                             "bf16_1024": matmul_gflops(torch.bfloat16, 1024, reps=1 if not onednn else 3)})
    return rows


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cli(args: list[str], native: bool, log: Path) -> tuple[float, float]:
    """Run ``llava-lora ARGS`` in its own process (oneDNN off unless ``native``); its wall and CPU seconds."""
    cmd = [sys.executable, "-m", "llava_lora", *args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if not native:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NO_ONEDNN), env.get("PYTHONPATH")]))
    t, cpu = time.perf_counter(), children_cpu_s()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - t, children_cpu_s() - cpu


def precision_line(log: Path) -> str:
    return next((l for l in log.read_text().splitlines() if l.startswith("precision ")), "?")[:140]


def train_rate(work: Path, tag: str, flags: list[str], native: bool, steps: int) -> dict:
    out = work / f"bench-train-{tag}"
    log = work / f"bench-train-{tag}.log"
    args = ["train", "--config", "quickstart", "--model", str(work / "model"), "--data", str(work / "data"),
            "--out", str(out), "--overwrite", "--max-steps", str(steps), "--log-every", str(steps // 4),
            "--save-every", str(steps), "--no-tensorboard", *flags]
    wall, cpu = cli(args, native, log)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]
    return {"what": "train", "run": tag, "samples_per_s": sum(rates) / len(rates), "wall_s": wall, "cpu_s": cpu,
            "precision": precision_line(log)}


def eval_rate(work: Path, tag: str, flags: list[str], native: bool) -> dict:
    out = work / f"bench-eval-{tag}"
    log = work / f"bench-eval-{tag}.log"
    args = ["eval", "--model", str(work / "model"), "--adapter", str(work / "run"), "--data", str(work / "data"),
            "--split", "test", "--max-new-tokens", "8", "--out", str(out), "--overwrite", *flags]
    wall, cpu = cli(args, native, log)
    summary = json.loads((out / "summary.json").read_text())
    return {"what": "eval", "run": tag, "samples_per_s": summary["samples_per_s"], "wall_s": wall, "cpu_s": cpu,
            "precision": precision_line(log)}


RUNS = [("default", [], []), ("fp32", ["--precision", "fp32"], ["--dtype", "float32"]),
        ("bf16", ["--precision", "bf16"], ["--dtype", "bfloat16"])]


def measure(work: Path, steps: int, repeats: int, half_fast: bool) -> list[dict]:
    """Every (kind, run) for train and eval, ``repeats`` rounds taking turns; one row per measurement.
    ``half_fast``: this CPU computes bf16 natively with oneDNN on (else that kind's bf16 run is the slow kernel too)."""
    rows = []
    for round_ in range(repeats):
        for native in (True, False):
            for tag, train_flags, eval_flags in RUNS:
                name = f"{'native' if native else 'avx2'}-{tag}"
                slow = tag == "bf16" and not (native and half_fast)
                n = max(8, steps // 15) if slow else steps  # the reference kernel is ~100x slower
                for row in (train_rate(work, name, train_flags, native, n), eval_rate(work, name, eval_flags, native)):
                    rows.append(dict(row, native=native, round=round_))
                    print(f"  round {round_ + 1}/{repeats} {row['what']:5} {name:14} {row['samples_per_s']:8.2f} "
                          f"samples/s, {row['cpu_s']:6.1f} CPU s", flush=True)
    return rows


def medians(rows: list[dict]) -> list[dict]:
    """One row per (kind, what, run): median samples/s and CPU s, and the samples/s spread."""
    out = []
    for key in dict.fromkeys((r["native"], r["what"], r["run"]) for r in rows):
        same = [r for r in rows if (r["native"], r["what"], r["run"]) == key]
        rates = [r["samples_per_s"] for r in same]
        out.append(dict(same[0], samples_per_s=statistics.median(rates), low=min(rates), high=max(rates),
                        cpu_s=statistics.median(r["cpu_s"] for r in same), n=len(same)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=".cache/cpu-kinds", help="quickstart folder to measure on (made if missing)")
    ap.add_argument("--steps", type=int, default=120, help="training steps per run")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of every run, taking turns (medians printed)")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    if not (work / "run" / "adapter_model.safetensors").is_file():
        print(f"making the quickstart in {work} (its model, data and adapter are measured)", flush=True)
        subprocess.run([sys.executable, "-m", "llava_lora", "quickstart", "--out", str(work), "--overwrite"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    from llava_lora.model.precision import cpu_half_fast

    half_fast, why = cpu_half_fast()
    print(f"CPU: {cpu}; {why}")
    for r in matmuls():
        print(f"matmul, oneDNN {'on ' if r['oneDNN'] else 'off'}: fp32 {r['fp32_2048']:.1f} GFLOP/s, bf16 "
              f"{r['bf16_1024']:.2f} GFLOP/s ({r['bf16_1024'] / r['fp32_2048']:.3f}x fp32)", flush=True)
    results = medians(measure(work, args.steps, args.repeats, half_fast))
    for native in (True, False):
        kind = ("this CPU as it is (oneDNN on): " + ("native bf16" if half_fast else "no native bf16") if native
                else "no native bf16 (oneDNN off: the AVX2 kernel)")
        rows = [r for r in results if r["native"] == native]
        print(f"\n{kind}: median of {args.repeats}")
        for r in rows:
            print(f"  {r['what']:5} {r['run']:14} {r['samples_per_s']:8.2f} samples/s ({r['low']:.2f}-{r['high']:.2f}), "
                  f"{r['cpu_s']:6.1f} CPU s  ({r['precision']})", flush=True)
        peer = "bf16" if native and half_fast else "fp32"
        for what in ("train", "eval"):
            got = next(r for r in rows if r["what"] == what and r["run"].endswith("-default"))
            ref = next(r for r in rows if r["what"] == what and r["run"].endswith(f"-{peer}"))
            ratio = got["samples_per_s"] / ref["samples_per_s"]
            print(f"  {'PASS' if ratio >= 0.9 else 'MISS'}: {what} default at {ratio:.2f}x the {peer} path")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
