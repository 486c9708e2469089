"""The seed's real size on this machine: every stage of the CLI on Qwen1.5-4B + CLIP-L/14-336 shapes (random weights).

    .venv/bin/python benchmarks/real_size.py                  # ~19 min on 2 idle cores; sources cached after the first run
    .venv/bin/python benchmarks/real_size.py --only eval-compare
    .venv/bin/python benchmarks/real_size.py --json out.json
    .venv/bin/python benchmarks/real_size.py --no-onednn      # as a CPU without native bf16 (AVX2) runs it: ~35 min

Run it alone: a stage takes 9-13 GB, the fp32 comparison up to ~8 GB (wrap it in ``flock`` on a shared machine).

1. Sources (``benchmarks/real_size_sources.py``, cached in ``--workdir``, default ``.cache/real-size``, git-ignored):
   a Qwen2 LM in Qwen1.5-4B's shapes, bf16 on disk, and a full CLIPModel in CLIP-L/14-336's shapes, fp32 on disk;
   a CC3M-like data set of 16 photos and captions (``workloads.cc3m_like``).
2. The user's commands, each in a process of its own, as a user types them (flags at their defaults unless
   listed): ``build``; ``train --batch-size 1`` and ``train --batch-size 6`` (gradient checkpointing on, the
   default), ``--steps`` steps each (default 2); ``eval --limit 4 --max-new-tokens 8`` (base and fine-tuned); ``export`` (its
   self-check at its defaults); ``generate --max-new-tokens 16``; ``demo`` up to its first answer (the server is
   started, ``/compare_sample`` asked once for sample 0 through ``gradio_client``, base and fine-tuned, 8 tokens).
3. ``eval-compare``: eval today (the bf16 path of this tree) against the fp32 path before it (this package at
   ``--baseline-ref``, extracted with ``git archive``: frozen weights loaded in fp32 on a CPU, the vision tower run
   for base and fine-tuned apart), on the same model, adapter and samples, one after the other. At the full size the
   fp32 path needs ~24 GB; it runs at the real width (hidden 2560, vocab 151,936, the full CLIP-L tower) with
   ``--compare-layers`` decoder layers instead of 40, unless ``--compare-layers 40``.

Per stage: wall time (process start to exit, loading included), peak RSS of the stage's process (its VmHWM: the
main process; DataLoader workers are not added), that peak over the composed model's bf16 weight bytes, and
samples/s (train: steps after the first; eval: samples answered by both models per second of generation) or
tokens/s (generate, demo, export: new tokens per second of ``generate`` calls, timed inside the process).

4. ``train-compare``: a training step at batch 1 with frozen weights stored in bf16 and computed in fp32
   (``--precision bf16-weights``, what ``auto`` picks for the 4 B model on a CPU without native bf16) against plain
   fp32 (``--precision fp32``), the same model at the real width with ``--compare-layers`` decoder layers (the full
   model does not fit in fp32), ``--steps`` + 1 steps each, one after the other.

``--no-onednn`` runs every command with oneDNN switched off (benchmarks/no_onednn/sitecustomize.py): a bf16 matmul then
takes the reference kernel an AVX2-only CPU takes, fp32 is unchanged. There the default stages are build, train-b1,
eval, export, generate, demo and train-compare (batch 6 and eval-compare belong to the native bf16 path).

Targets (PASS/MISS): every stage at batch 1 <= 1.5x the bf16 weight bytes; train at batch 6 with gradient
checkpointing <= 16 GB (10^9 bytes); eval samples/s >= 2x the fp32 path's; export <= 2 min; a bf16-weights
training step <= 1.3x the fp32 one. Timing on a shared virtual machine is noisy (±10% from minute to minute); the
comparisons run side by side in one run for that reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
GB = 1e9
BASELINE_REF = "d88e7f8"  # main before frozen weights stayed in half precision (issue 11)

# On PYTHONPATH with --no-onednn: every command takes the bf16 matmul kernel of a CPU without native bf16.
NO_ONEDNN = REPO / "benchmarks" / "no_onednn"
extra_path: list[str] = []  # [NO_ONEDNN] under --no-onednn

# Runs one CLI command in this process and reports what the benchmark reads: every ``generate`` call's new tokens
# and seconds (timed around transformers' GenerationMixin.generate), and the process's own peak RSS at exit.
PROBE = r'''
import os, sys, time, json
import transformers.generation.utils as gu
_generate = gu.GenerationMixin.generate
def timed(self, *a, **kw):
    t = time.perf_counter()
    out = _generate(self, *a, **kw)
    seq = out.sequences if hasattr(out, "sequences") else out
    prompt = (kw.get("input_ids") if kw.get("input_ids") is not None else a[0]).shape[1]
    print("PROBE-GEN " + json.dumps({"tokens": int(seq.shape[0] * (seq.shape[1] - prompt)),
                                     "seconds": time.perf_counter() - t}), file=sys.stderr, flush=True)
    return out
gu.GenerationMixin.generate = timed
from llava_lora.cli import main
rc = main(sys.argv[1:])
status = open("/proc/self/status").read()
hwm = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM"))
print("PROBE-PEAK " + str(hwm * 1024), file=sys.stderr, flush=True)
sys.exit(rc)
'''


def log(msg: str) -> None:
    print(msg, flush=True)


def peak_of(pid: int) -> int:
    """VmHWM (peak resident set) of a live process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def run_stage(name: str, argv: list[str], workdir: Path, pythonpath: Path = REPO) -> dict:
    """``llava-lora ARGV`` in a fresh process: wall time, peak RSS, generate timings; its output in a log file."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*extra_path, str(pythonpath)]),
           "TOKENIZERS_PARALLELISM": "false"}
    logfile = workdir / "logs" / f"{name}.log"
    logfile.parent.mkdir(exist_ok=True)
    t = time.perf_counter()
    with open(logfile, "w") as f:
        done = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, stdout=f, stderr=subprocess.STDOUT,
                              cwd=workdir)
    wall = time.perf_counter() - t
    text = logfile.read_text()
    if done.returncode != 0:
        raise SystemExit(f"{name}: llava-lora {' '.join(argv)} failed (exit {done.returncode}); see {logfile}:\n"
                         + "\n".join(text.splitlines()[-15:]))
    peak = int(text.rsplit("PROBE-PEAK ", 1)[1].split()[0])
    gens = [json.loads(line.split("PROBE-GEN ", 1)[1]) for line in text.splitlines() if "PROBE-GEN " in line]
    return {"stage": name, "command": "llava-lora " + " ".join(argv), "wall_s": wall, "peak_rss": peak,
            "load_average": os.getloadavg()[1],  # 5 minutes: how shared the machine was during the stage
            "gen_tokens": sum(g["tokens"] for g in gens), "gen_seconds": sum(g["seconds"] for g in gens),
            "log": str(logfile), "output": text}


def run_demo(model: Path, adapter: Path, data: Path, workdir: Path) -> dict:
    """``llava-lora demo`` until the page has answered one comparison (base and fine-tuned) of sample 0."""
    from gradio_client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["demo", "--model", str(model), "--adapter", str(adapter), "--data", str(data), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*extra_path, str(REPO)]),
           "TOKENIZERS_PARALLELISM": "false"}
    logfile = workdir / "logs" / "demo.log"
    t = time.perf_counter()
    with open(logfile, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", PROBE, *argv], env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/"
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"demo exited ({proc.returncode}) before serving; see {logfile}")
                try:
                    client = Client(url, verbose=False)
                    break
                except Exception:  # not listening yet
                    time.sleep(2)
            ready = time.perf_counter() - t
            # index, max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty
            result = client.predict(0, 8, True, 0.7, 1.0, 0, 1.0, api_name="/compare_sample")
            wall = time.perf_counter() - t
            peak = peak_of(proc.pid)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    text = logfile.read_text()
    gens = [json.loads(line.split("PROBE-GEN ", 1)[1]) for line in text.splitlines() if "PROBE-GEN " in line]
    return {"stage": "demo", "command": "llava-lora " + " ".join(argv[:-2]) + " (+ one /compare_sample)",
            "wall_s": wall, "load_average": os.getloadavg()[1], "ready_s": ready, "peak_rss": peak, "gen_tokens": sum(g["tokens"] for g in gens),
            "gen_seconds": sum(g["seconds"] for g in gens), "log": str(logfile), "output": text,
            "answers": [result[0], result[2]]}


def train_rate(run_dir: Path) -> float | None:
    """Samples/s over the steps after the first (the first pays for warm-up)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = rows[1:] or rows
    return sum(r["samples_per_s"] * r["step_time"] for r in rows) / sum(r["step_time"] for r in rows) if rows else None


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def make_sources(root: Path, layers: int | None = None) -> Path:
    """Cached sources (``sources/``), or with ``layers``, a copy of the LM at fewer layers (``sources-L{n}/``)."""
    src = root / "sources"
    if not ((src / "llm" / "config.json").is_file() and (src / "clip" / "config.json").is_file()):
        log(f"writing the real-shape random sources to {src} (once; ~2 min, ~8 GB)")
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "real_size_sources.py"), str(src)], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if layers is None:
        return src
    small = root / f"sources-L{layers}"
    if not (small / "llm" / "config.json").is_file():
        subprocess.run([sys.executable, "-c", SLICE, str(src / "llm"), str(small / "llm"), str(layers)], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if not (small / "clip").exists():
        (small / "clip").symlink_to((src / "clip").resolve())
    return small


# The first N decoder layers of the source LM (same width, vocabulary, embeddings and head), tensor by tensor.
SLICE = r'''
import json, shutil, sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
src, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
tmp = out.with_name(out.name + ".tmp")
shutil.rmtree(tmp, ignore_errors=True)
tmp.mkdir(parents=True)
keep = {}
for f in sorted(src.glob("*.safetensors")):
    with safe_open(f, "pt") as s:
        for k in s.keys():
            if ".layers." in k and int(k.split(".layers.")[1].split(".")[0]) >= n:
                continue
            keep[k] = s.get_tensor(k)
save_file(keep, tmp / "model.safetensors", metadata={"format": "pt"})
for f in src.iterdir():
    if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
        shutil.copy2(f, tmp / f.name)
cfg = json.loads((tmp / "config.json").read_text())
cfg["num_hidden_layers"] = n
cfg.pop("layer_types", None)
(tmp / "config.json").write_text(json.dumps(cfg, indent=2))
tmp.rename(out)
'''


def make_data(root: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer

    from workloads import cc3m_like

    data = root / "data"
    if not (data / "chat.json").is_file():
        cc3m_like(data, n=16, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir))
    return data


def baseline_tree(root: Path, ref: str) -> Path:
    """This package as it was at ``ref`` (``git archive``), to run the fp32 path it had."""
    tree = root / f"baseline-{ref}"
    if not (tree / "llava_lora" / "cli.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "llava_lora"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def stages(args, root: Path) -> list[dict]:
    src = make_sources(root)
    data = make_data(root, src / "llm")
    model, merged = root / "model", root / "merged"
    image = next((data / "images_dl").glob("*.jpg"))
    steps = str(args.steps)
    # the later stages use the batch-6 run's adapter; without that stage (--only), the newest run there is
    planned = not args.only or "train-b6-gc" in args.only
    adapter = root / ("run-b6" if planned or (root / "run-b6" / "adapter_model.safetensors").is_file() else "run-b1")
    common_train = ["--data", str(data), "--max-steps", steps, "--log-every", "1", "--save-every", "1000",
                    "--overwrite", "--no-tensorboard"]
    plan = [
        ("build", ["build", "--llm", str(src / "llm"), "--vision", str(src / "clip"), "--out", str(model),
                   "--overwrite"]),
        ("train-b1", ["train", "--model", str(model), "--out", str(root / "run-b1"), "--batch-size", "1",
                      *common_train]),
        ("train-b6-gc", ["train", "--model", str(model), "--out", str(root / "run-b6"), "--batch-size", "6",
                         *common_train]),
        ("eval", ["eval", "--model", str(model), "--adapter", str(adapter), "--data", str(data),
                  "--limit", "4", "--max-new-tokens", "8", "--out", str(root / "eval"), "--overwrite"]),
        ("export", ["export", "--model", str(model), "--adapter", str(adapter), "--out", str(merged),
                    "--overwrite"]),
        ("generate", ["generate", "--model", str(model), "--adapter", str(adapter), "--image", str(image),
                      "--prompt", "Describe the image concisely.", "--max-new-tokens", "16"]),
    ]
    results = []
    for name, argv in plan:
        if args.only and name not in args.only:
            continue
        log(f"[{time.strftime('%H:%M:%S')}] {name}: llava-lora {' '.join(argv)}")
        r = run_stage(name, argv, root)
        if name.startswith("train"):
            r["samples_per_s"] = train_rate(root / ("run-b1" if name == "train-b1" else "run-b6"))
        if name == "eval":
            r["samples_per_s"] = json.loads((root / "eval" / "summary.json").read_text())["samples_per_s"]
        results.append(r)
        log(f"    {fmt_row(r, weight_bytes(model))}")
    if not args.only or "demo" in args.only:
        log(f"[{time.strftime('%H:%M:%S')}] demo: up to its first answer")
        r = run_demo(model, adapter, data, root)
        results.append(r)
        log(f"    {fmt_row(r, weight_bytes(model))} (page ready after {r['ready_s']:.0f} s)")
    return results


def eval_compare(args, root: Path) -> dict:
    """eval of this tree (bf16) and of the baseline (fp32), same model, adapter and samples, one after the other."""
    n = args.compare_layers
    model, run, data = compare_model(args, root)
    old = baseline_tree(root, args.baseline_ref)
    argv = ["eval", "--model", str(model), "--adapter", str(run), "--data", str(data), "--limit",
            str(args.compare_samples), "--max-new-tokens", "8", "--overwrite"]
    out = {}
    for name, tree in (("fp32", old), ("bf16", REPO)):
        log(f"[{time.strftime('%H:%M:%S')}] eval-compare {name} ({tree}), {n} layers")
        r = run_stage(f"eval-compare-{name}", [*argv, "--out", str(root / f"eval-compare-{name}")], root, tree)
        summary = json.loads((root / f"eval-compare-{name}" / "summary.json").read_text())
        r["samples_per_s"] = summary["samples_per_s"]
        r["answers"] = [json.loads(line) for line in
                        (root / f"eval-compare-{name}" / "predictions.jsonl").read_text().splitlines()]
        out[name] = r
        log(f"    {fmt_row(r, weight_bytes(model))}")
    same = sum(a["base"] == b["base"] and a["finetuned"] == b["finetuned"]
               for a, b in zip(out["fp32"]["answers"], out["bf16"]["answers"]))
    return {"layers": n, "weights": weight_bytes(model), "samples": args.compare_samples, "same_answers": same,
            "ratio": out["bf16"]["samples_per_s"] / out["fp32"]["samples_per_s"], **out}


def compare_model(args, root: Path) -> tuple[Path, Path, Path]:
    """(MODEL_DIR, RUN_DIR, DATA) at the real width with --compare-layers decoder layers, built and trained once."""
    n = args.compare_layers
    src = make_sources(root, None if n == 40 else n)
    data = make_data(root, src / "llm")
    model, run = root / f"compare-L{n}" / "model", root / f"compare-L{n}" / "run"
    if not (model / "config.json").is_file():
        run_stage(f"compare-L{n}-build", ["build", "--llm", str(src / "llm"), "--vision", str(src / "clip"), "--out",
                                          str(model), "--overwrite"], root)
    if not (run / "adapter_model.safetensors").is_file():  # any trained adapter will do: both evals use this one
        run_stage(f"compare-L{n}-train", ["train", "--model", str(model), "--data", str(data), "--out", str(run),
                                          "--batch-size", "2", "--max-steps", "1", "--overwrite", "--no-tensorboard"],
                  root)
    return model, run, data


def train_compare(args, root: Path) -> dict:
    """A batch-1 training step with bf16-stored frozen weights computed in fp32 against plain fp32, same model."""
    model, _, data = compare_model(args, root)
    out = {}
    for name in ("fp32", "bf16-weights"):
        log(f"[{time.strftime('%H:%M:%S')}] train-compare {name}, {args.compare_layers} layers")
        run = root / f"train-compare-{name}"
        r = run_stage(f"train-compare-{name}", ["train", "--model", str(model), "--data", str(data), "--out", str(run),
                                                "--batch-size", "1", "--max-steps", str(args.steps + 1), "--log-every",
                                                "1", "--save-every", "1000", "--overwrite", "--no-tensorboard",
                                                "--precision", name], root)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
        r["step_s"] = sum(row["step_time"] for row in rows) / len(rows)
        r["losses"] = [row["loss"] for row in rows]
        out[name] = r
        log(f"    {fmt_row(r, weight_bytes(model))}  {r['step_s']:.1f} s a step")
    return {"layers": args.compare_layers, "weights": weight_bytes(model),
            "ratio": out["bf16-weights"]["step_s"] / out["fp32"]["step_s"], **out}


def fmt_row(r: dict, weights: int) -> str:
    rate = ""
    if r.get("samples_per_s"):
        rate = f"{r['samples_per_s']:.3f} samples/s"
    elif r.get("gen_tokens"):
        rate = f"{r['gen_tokens'] / r['gen_seconds']:.2f} tokens/s ({r['gen_tokens']} tokens in generate)"
    load = f"  (load average {r['load_average']:.1f})" if "load_average" in r else ""
    return (f"{r['stage']:<14} {r['wall_s']:7.0f} s  peak RSS {r['peak_rss'] / GB:5.2f} GB  "
            f"{r['peak_rss'] / weights:4.2f}x bf16 weights  {rate}{load}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(results: list[dict], compare: dict | None, weights: int, tcompare: dict | None = None) -> list[str]:
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()}), "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
             f"composed model: {weights / GB:.2f} GB of bf16 weights", ""]
    lines += ["| stage | wall | peak RSS | ÷ bf16 weights | rate | load average |", "|---|---|---|---|---|---|"]
    for r in results:
        rate = (f"{r['samples_per_s']:.3f} samples/s" if r.get("samples_per_s") else
                f"{r['gen_tokens'] / r['gen_seconds']:.2f} tokens/s" if r.get("gen_tokens") else "")
        lines.append(f"| `{r['stage']}` | {r['wall_s']:.0f} s | {r['peak_rss'] / GB:.2f} GB | "
                     f"{r['peak_rss'] / weights:.2f}x | {rate} | {r.get('load_average', float('nan')):.1f} |")
    lines.append("")
    by = {r["stage"]: r for r in results}
    for r in results:
        if r["stage"] != "train-b6-gc":
            lines.append(f"{verdict(r['peak_rss'] <= 1.5 * weights)}: {r['stage']} peak RSS "
                         f"{r['peak_rss'] / GB:.2f} GB <= 1.5x bf16 weights ({1.5 * weights / GB:.2f} GB)")
    if "train-b6-gc" in by:
        p = by["train-b6-gc"]["peak_rss"]
        lines.append(f"{verdict(p <= 16 * GB)}: train at batch 6 with gradient checkpointing peak RSS "
                     f"{p / GB:.2f} GB <= 16 GB")
    if "export" in by:
        w = by["export"]["wall_s"]
        lines.append(f"{verdict(w <= 120)}: export in {w:.0f} s <= 120 s")
    if compare:
        lines.append(f"{verdict(compare['ratio'] >= 2)}: eval {compare['bf16']['samples_per_s']:.3f} vs "
                     f"{compare['fp32']['samples_per_s']:.3f} samples/s = {compare['ratio']:.2f}x the fp32 path "
                     f"(>= 2x), {compare['samples']} samples, real width with {compare['layers']} of 40 layers; "
                     f"peak RSS {compare['bf16']['peak_rss'] / GB:.2f} vs {compare['fp32']['peak_rss'] / GB:.2f} GB; "
                     f"identical answers (base and fine-tuned) on {compare['same_answers']} of {compare['samples']}")
    if tcompare:
        f, w = tcompare["fp32"], tcompare["bf16-weights"]
        lines.append(f"{verdict(tcompare['ratio'] <= 1.3)}: a bf16-weights training step at batch 1 takes "
                     f"{w['step_s']:.1f} s against fp32's {f['step_s']:.1f} s = {tcompare['ratio']:.2f}x (<= 1.3x), "
                     f"real width with {tcompare['layers']} of 40 layers; peak RSS {w['peak_rss'] / GB:.2f} vs "
                     f"{f['peak_rss'] / GB:.2f} GB; losses {w['losses']} vs {f['losses']}")
    return lines


def cpu_model() -> str:
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(REPO / ".cache" / "real-size"), help="cache and outputs")
    ap.add_argument("--steps", type=int, default=2, help="training steps per train stage (the rate: those after the first)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="stages to run: build train-b1 train-b6-gc eval export generate demo eval-compare "
                         "train-compare")
    ap.add_argument("--no-onednn", action="store_true",
                    help="oneDNN off in every command: the bf16 kernel of a CPU without native bf16 (AVX2)")
    ap.add_argument("--compare-layers", type=int, default=8, help="decoder layers of the eval comparison's model")
    ap.add_argument("--compare-samples", type=int, default=4, help="samples of the eval comparison")
    ap.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the fp32 path to compare eval with")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()
    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.no_onednn:
        extra_path.append(str(NO_ONEDNN))
        args.only = args.only or ["build", "train-b1", "eval", "export", "generate", "demo", "train-compare"]
    results = stages(args, root) if not args.only or set(args.only) - {"eval-compare", "train-compare"} else []
    compare = eval_compare(args, root) if not args.only or "eval-compare" in args.only else None
    tcompare = train_compare(args, root) if not args.only or "train-compare" in args.only else None
    weights = (weight_bytes(root / "model") if (root / "model").is_dir() else
               (compare or tcompare)["weights"])
    lines = report(results, compare, weights, tcompare)
    if args.no_onednn:
        lines.insert(1, "oneDNN off in every command (--no-onednn): bf16 matmuls take the reference kernel of a CPU "
                        "without native bf16")
    print("\n" + "\n".join(lines))
    if args.json:
        slim = [{k: v for k, v in r.items() if k != "output"} for r in results]
        if compare:
            compare = {k: ({kk: vv for kk, vv in v.items() if kk != "output"} if isinstance(v, dict) else v)
                       for k, v in compare.items()}
        if tcompare:
            tcompare = {k: ({kk: vv for kk, vv in v.items() if kk != "output"} if isinstance(v, dict) else v)
                        for k, v in tcompare.items()}
        Path(args.json).write_text(json.dumps({"stages": slim, "eval_compare": compare, "train_compare": tcompare,
                                               "report": lines}, indent=2))


if __name__ == "__main__":
    main()
