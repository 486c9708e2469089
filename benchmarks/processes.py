"""Throughput and memory per process count: one `llava-lora train` run of 1 and of 2 processes under DDP and under
FSDP2, side by side, on the ``proportional`` shape.

    .venv/bin/python benchmarks/processes.py                 # ~6 min on 2 idle CPU cores
    .venv/bin/python benchmarks/processes.py --steps 4       # a quick look

Model: the ``proportional`` shape (benchmarks/shapes/proportional.yaml, built here with random weights), data:
synthetic shapes (one image each). Every run trains the same global batch (``--global-batch``, split over the
processes), fp32, gradient checkpointing off, one thread per process (on 2 cores, 2 processes use both: this
measures what the distribution costs, not a speed-up, which needs one device per process). samples/s: the median of
the logged steps after the first two (the first compiles the fused kernels); peak RSS: the largest sum over the
launch's processes, sampled every 0.2 s, and the largest single process. The machine may be shared: say so beside
the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from llava_lora.data import synth
from llava_lora.train.distributed import config_path
from workloads import make_model

BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(strategy: str, processes: int) -> list[str]:
    if strategy == "ddp" and processes == 1:
        return [str(BIN / "llava-lora")]
    return [str(BIN / "accelerate"), "launch", "--config_file", str(config_path(strategy)), "--num_processes",
            str(processes), "--main_process_port", str(_port()), "-m", "llava_lora"]


def run(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS of all the launch's processes together, of the largest one, in GiB; the output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    top = psutil.Process(proc.pid)
    total = single = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            rss = [p.memory_info().rss for p in [top, *top.children(recursive=True)]]
            total, single = max(total, sum(rss)), max(single, max(rss))
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{out[-3000:]}")
    return total / 2**30, single / 2**30, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="processes-") as tmp:
        root = Path(tmp)
        model_dir = make_model(root, "proportional")
        with contextlib.redirect_stdout(io.StringIO()):
            synth.main(synth.SynthConfig(out=str(root / "data"), n=max(64, args.global_batch * args.steps)))
        print(f"proportional shape, {args.steps} steps of {args.global_batch} samples, fp32, 1 thread per process, "
              f"{os.cpu_count()} CPUs")
        print(f"{'run':<14} {'samples/s':>9} {'peak RSS, all':>14} {'largest process':>16}")
        for strategy, processes in (("ddp", 1), ("ddp", 2), ("fsdp2", 1), ("fsdp2", 2)):
            out = root / f"{strategy}-{processes}"
            cmd = [*launcher(strategy, processes), "train", "--model", str(model_dir), "--data", str(root / "data"),
                   "--out", str(out), "--max-steps", str(args.steps), "--batch-size",
                   str(args.global_batch // processes), "--precision", "fp32", "--no-gradient-checkpointing",
                   "--num-workers", "0", "--no-tensorboard", "--log-every", "1", "--save-every", str(args.steps)]
            total, single, printed = run(cmd)
            line = next((x for x in printed.splitlines() if x.startswith("processes: ")), "?")
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            speed = statistics.median(r["samples_per_s"] for r in rows if "loss" in r and r["step"] > 2)
            label = "one process" if line == "processes: one process" else f"{strategy} x{processes}"
            print(f"{label:<14} {speed:9.2f} {total:11.2f} GiB {single:13.2f} GiB   ({line.split(':')[1].strip()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
