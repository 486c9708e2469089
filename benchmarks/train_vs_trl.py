"""Training throughput: ``llava-lora train`` against TRL's ``SFTTrainer`` on the same model, data and steps.

    .venv/bin/pip install -e '.[bench]'                                  # TRL (once)
    .venv/bin/python benchmarks/train_vs_trl.py --shape proportional      # ~4 min on 2 idle CPU cores
    .venv/bin/python benchmarks/train_vs_trl.py --shape real-vocab        # ~6 min
    .venv/bin/python benchmarks/train_vs_trl.py --shape proportional --warmup 1 --steps 2 --no-bf16  # a quick look
    .venv/bin/python benchmarks/train_vs_trl.py --shape real-vocab --compile --warmup 3   # + both compiled, ~14 min
    .venv/bin/python benchmarks/train_vs_trl.py --shape proportional --repeats 3 --no-bf16  # medians, ~7 min

Model: a shape of ``benchmarks/shapes/`` (random weights, composed by ``llava-lora build``). Data: a synthetic
CC3M-like set (one turn: ``<image>`` + a brief-description instruction -> a caption of 10-30 tokens).

Both trainers do the same work: LoRA r=4 (alpha 8, dropout 0) on the language model's q_proj/v_proj, the projector
trained in full, the vision tower frozen; the same batches in the same order (TRL's sampler made sequential over the
records in the order our sampler draws them); batch 6, AdamW at a constant learning rate of 1e-3, gradient clipping
0.3, seed 42, the same precision, gradient checkpointing off in both (``--gradient-checkpointing`` turns it on in
both), the same number of DataLoader workers. TRL is configured as its documentation shows for VLM fine-tuning: a
data set of conversational ``messages`` + ``images`` (decoded by ``datasets``), the processor as
``processing_class``, ``assistant_only_loss=True``, ``max_length=None``, a peft ``LoraConfig``.

Each trainer runs in its own process, so each peak memory is its own (RSS on CPU, allocated memory on a GPU).
Step times are wall-clock from the end of the last warm-up step to the end of the last step, data loading
included. Prints samples/s, tokens/s (non-padding tokens, image tokens included), peak memory, the ratios
ours/TRL, the losses of both (they must agree: the same work), and the MFU: useful model FLOPs per second
(counted in ``workloads.step_flops``) over the FLOP/s of a 2048x2048 matmul in the same precision, measured in
this run. Where the CPU has bf16 instructions, our trainer also runs with ``--precision bf16`` (frozen weights
loaded in bf16, fp32 masters of LoRA and the projector, CPU autocast) and its gain is printed, with its losses
checked against fp32's (within 1% on every step) and its MFU against the bf16 matmul peak (target 60% on
``proportional``). With ``--compile``, ours runs again with ``--compile`` and TRL with ``torch_compile=True``
(the compilation falls in the warm-up steps: give ``--warmup 3``), each compared with the other. A shared or
virtual machine's speed drifts by several percent from minute to minute: ``--repeats N`` runs the trainers N
times, taking turns, and counts each one's median time. Each target is printed with PASS or MISS.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SEED = 42
LORA = dict(r=4, alpha=8)
TARGETS = {  # shape -> (min samples/s ratio ours/TRL, max peak-memory ratio ours/TRL or None)
    "proportional": (2.0, None),
    "real-vocab": (10.0, 0.4),
}
STEPS = {"real-vocab": (1, 4)}  # shape -> default (warm-up, timed) steps where TRL is too slow for (2, 8)
MFU_TARGET = 0.75  # on `proportional`, fp32
BF16_MFU_TARGET = 0.60  # on `proportional`, bf16 (frozen weights in bf16), of the measured bf16 matmul peak
LOSS_TOLERANCE = 0.01  # relative, on every step's loss


# --------------------------------------------------------------------------------------------------------
# Work: the records each step consumes, and the FLOPs of that work
# --------------------------------------------------------------------------------------------------------

def batches(n_records: int, batch_size: int, steps: int) -> list[list[int]]:
    """Record indices of each step, in the order ``llava-lora train --no-group-by-length`` draws them."""
    from llava_lora.train.sampler import ResumableBatchSampler

    return list(itertools.islice(iter(ResumableBatchSampler(n_records, batch_size, SEED)), steps))


def sample_sizes(model_dir: Path, data_dir: Path) -> list[tuple[int, int, int]]:
    """(tokens, supervised next-token positions, images) per record, as our trainer encodes it."""
    from transformers import AutoConfig, AutoTokenizer

    from llava_lora.chat import encode
    from llava_lora.data.records import load_records, resolve_data

    config, tok = AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    out = []
    for r in load_records(resolve_data(data_dir, None, None)[0])[0]:
        enc = encode.encode(tok, r, config.image_token_id, config.image_seq_length, None)
        out.append((len(enc.input_ids), int((enc.labels[1:] != encode.IGNORE_INDEX).sum()), int(r.image is not None)))
    return out


def timed_flops(sizes: list[tuple[int, int, int]], model_dir: Path) -> float:
    """Model FLOPs of the useful work over samples of ``sizes`` (tokens, supervised, images): the count
    ``workloads.step_flops`` writes out term by term, on the real token counts (padding is not useful work)."""
    from transformers import AutoConfig

    from workloads import step_flops

    tokens, supervised, images = zip(*sizes)
    return step_flops(AutoConfig.from_pretrained(model_dir), list(tokens), sum(supervised), sum(images),
                      LORA["r"])["total"]


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of an n x n x n matmul, the best of repeated timings over ~``seconds``."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


# --------------------------------------------------------------------------------------------------------
# The two trainers, each in a child process
# --------------------------------------------------------------------------------------------------------

def lora_digest(peft_model) -> str:
    """A hash of the initial LoRA A matrices (B starts at zero): equal digests, equal starting points."""
    h = hashlib.sha256()
    for name, p in sorted(peft_model.named_parameters()):
        if "lora_A" in name:
            h.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def peak_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_ours(a) -> dict:
    from llava_lora.train import loop as train

    seen = {}
    apply_lora = train.apply_lora

    def recording_apply_lora(*args, **kwargs):
        peft_model = apply_lora(*args, **kwargs)
        seen["lora_init"] = lora_digest(peft_model)
        return peft_model

    train.apply_lora = recording_apply_lora
    out = Path(a.out)
    cfg = train.TrainConfig(
        model=a.model, data=a.data, out=str(out), overwrite=True, lora_r=LORA["r"], lora_alpha=LORA["alpha"],
        lora_dropout=0.0, learning_rate=a.lr, lr_scheduler="constant", warmup_ratio=0.0,
        max_steps=a.warmup + a.steps, batch_size=a.batch_size, max_grad_norm=0.3,
        gradient_checkpointing=a.gradient_checkpointing, precision=a.precision, group_by_length=False,
        save_every=10 ** 6, log_every=1, seed=SEED, num_workers=a.num_workers, device=a.device, tensorboard=False,
        compile=a.compile)
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
        train.main(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[a.warmup:]
    return {"losses": [r["loss"] for r in rows], "seconds": sum(r["step_time"] for r in timed),
            "tokens": round(sum(r["tokens_per_s"] * r["step_time"] for r in timed)), **seen}


def trl_dataset(data_dir: Path, order: list[int]):
    """The records as TRL's VLM examples show them: conversational ``messages`` + ``images`` decoded by datasets."""
    import datasets

    from llava_lora.chat import prompts
    from llava_lora.data.records import load_records, resolve_data, resolve_image

    file, image_root = resolve_data(data_dir, None, None)
    records = load_records(file)[0]
    rows = {"messages": [], "images": []}
    for i in order:
        # the same content parts (image before or after the text) as our converter, so the tokens are the same
        rows["messages"].append(prompts.messages(records[i]))
        rows["images"].append([str(resolve_image(image_root, records[i].image))])
    return datasets.Dataset.from_dict(rows).cast_column("images", datasets.List(datasets.Image()))


def run_trl(a) -> dict:
    from peft import LoraConfig
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from llava_lora.model.adapters import PROJECTOR, lora_target_regex
    from llava_lora.train.runtime import resolve_attn_implementation

    steps = a.warmup + a.steps
    order = [i for batch in batches(a.n_records, a.batch_size, steps) for i in batch]
    dataset = trl_dataset(Path(a.data), order)

    class Clock(TrainerCallback):
        ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    class SequentialSFTTrainer(SFTTrainer):
        """Our order: the data set is already in it, so no shuffling."""

        losses: list[float] = []
        tokens: list[int] = []

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.tokens.append(int(inputs["attention_mask"].sum()))
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append(float(loss.detach()))
            return loss

    # loaded as our trainer loads it: the same dtype and attention kernels
    dtype = torch.bfloat16 if a.device == "cuda" and a.precision == "bf16" else torch.float32
    attn = resolve_attn_implementation("auto", a.device)
    torch.manual_seed(SEED)  # as our trainer does before loading: the same LoRA initialisation
    model = LlavaForConditionalGeneration.from_pretrained(a.model, dtype=dtype, attn_implementation=attn)
    processor = AutoProcessor.from_pretrained(a.model)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, bias="none",
                             target_modules=lora_target_regex(["q_proj", "v_proj"]), modules_to_save=[PROJECTOR])
    args = SFTConfig(
        output_dir=a.out, max_steps=steps, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.3, weight_decay=0.0,
        bf16=a.precision == "bf16", gradient_checkpointing=a.gradient_checkpointing,
        assistant_only_loss=True, max_length=None, dataloader_num_workers=a.num_workers,
        logging_steps=1, save_strategy="no", report_to="none", seed=SEED, use_cpu=a.device == "cpu",
        disable_tqdm=True, torch_compile=a.compile)
    clock = Clock()
    trainer = SequentialSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                                   peft_config=peft_config, callbacks=[clock])
    lora_init = lora_digest(trainer.model)
    trainer.train()
    return {"losses": trainer.losses, "seconds": clock.ends[-1] - clock.ends[a.warmup - 1],
            "tokens": sum(trainer.tokens[a.warmup:]), "lora_init": lora_init}


def child(a) -> int:
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = run_ours(a) if a.child == "ours" else run_trl(a)
    result["peak_memory"] = peak_memory(a.device)
    Path(a.result).write_text(json.dumps(result))
    return 0


def spawn(who: str, precision: str, model_dir: Path, data_dir: Path, n_records: int, work: Path, a,
          compile: bool = False, suffix: str = "") -> dict:
    """Run one trainer in a fresh process; its output goes to ``work/WHO-PRECISION[-compile]SUFFIX.log``."""
    tag = f"{who}-{precision}" + ("-compile" if compile else "") + suffix
    result, log = work / f"{tag}.json", work / f"{tag}.log"
    cmd = [sys.executable, __file__, "--child", who, "--model", str(model_dir), "--data", str(data_dir),
           "--out", str(work / f"run-{tag}"), "--result", str(result), "--n-records", str(n_records),
           "--precision", precision, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--num-workers", str(a.num_workers),
           "--device", a.device, "--{}gradient-checkpointing".format("" if a.gradient_checkpointing else "no-"),
           "--{}compile".format("" if compile else "no-")]
    start = time.perf_counter()
    with open(log, "w") as f:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        sys.exit(f"{tag} failed (exit {rc}); its log:\n" + log.read_text()[-4000:])
    print(f"  {tag}: done in {time.perf_counter() - start:.0f} s", flush=True)
    # the 1-minute load average at its end: above the core count, other work shared the cores with this run
    return {**json.loads(result.read_text()), "load": os.getloadavg()[0]}


def median_run(name: str, runs: list[dict]) -> dict:
    """One trainer's repeated runs as one: the median time, the highest peak memory and load. The work is the
    same every time, so the losses must be too."""
    for r in runs[1:]:  # a tolerance, not equality: threaded CPU reductions may round in another order
        if r["tokens"] != runs[0]["tokens"] or max(rel(x, y) for x, y in zip(r["losses"], runs[0]["losses"])) > 1e-5:
            sys.exit(f"{name}: repeated runs did not do the same work (losses or tokens differ)")
    seconds = sorted(r["seconds"] for r in runs)
    if len(runs) > 1:
        print(f"  {name}: {len(runs)} runs, timed steps in " + ", ".join(f"{t:.1f}" for t in seconds)
              + " s; the median counts", flush=True)
    return {**runs[0], "seconds": seconds[len(seconds) // 2], "peak_memory": max(r["peak_memory"] for r in runs),
            "load": max(r["load"] for r in runs)}


# --------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def report(shape: str, a, runs: dict, flops: float, peaks: dict, device: str) -> list[tuple[str, bool]]:
    samples = a.steps * a.batch_size
    mem = "peak alloc" if device == "cuda" else "peak RSS"
    print(f"\n{shape}: {a.steps} timed steps of {a.batch_size} samples after {a.warmup} warm-up, gradient "
          f"checkpointing {'on' if a.gradient_checkpointing else 'off'}, {a.num_workers} DataLoader workers, "
          f"{torch.get_num_threads()} threads; {flops / a.steps / 1e9:.0f} GFLOP of useful work per step")
    print(f"  matmul peak (2048^3): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    print(f"  {'':20}{'samples/s':>10}{'tokens/s':>10}{mem:>12}{'MFU':>7}{'load':>6}   losses (first .. last)")
    for name, r in runs.items():
        precision = name.split()[-1].strip("()")
        mfu = flops / r["seconds"] / peaks[precision]
        r["mfu"] = mfu
        print(f"  {name:20}{samples / r['seconds']:10.2f}{r['tokens'] / r['seconds']:10.0f}"
              f"{r['peak_memory'] / 2**30:9.2f} GB{mfu:7.0%}{r['load']:6.1f}   {r['losses'][0]:.4f} .. "
              f"{r['losses'][-1]:.4f}")
    ours, checks = runs["ours (fp32)"], []
    for variant in ("", "+compile"):  # each of ours against TRL run the same way (compiled or not)
        trl_name = f"TRL{variant} (fp32)" if f"TRL{variant} (fp32)" in runs else "TRL (fp32)"
        mine, trl = runs.get(f"ours{variant} (fp32)"), runs.get(trl_name)
        if mine is None or trl is None:
            continue
        versus = f"ours{variant} / {trl_name.split()[0]}"
        speed, memory = trl["seconds"] / mine["seconds"], mine["peak_memory"] / trl["peak_memory"]
        tokens = (mine["tokens"] / mine["seconds"]) / (trl["tokens"] / trl["seconds"])
        print(f"  {versus}: samples/s {speed:.2f}x, tokens/s {tokens:.2f}x, "
              f"{mem} {memory:.2f}x; same tokens: {mine['tokens'] == trl['tokens']}, same initial LoRA: "
              f"{mine.get('lora_init') == trl.get('lora_init')}")
        worst = max(rel(x, y) for x, y in zip(mine["losses"], trl["losses"]))
        final = rel(mine["losses"][-1], trl["losses"][-1])
        min_speed, max_memory = TARGETS.get(shape, (None, None))
        if min_speed:
            checks.append((f"{shape}: samples/s {versus} >= {min_speed}x (fp32): {speed:.2f}x", speed >= min_speed))
        if max_memory:
            checks.append((f"{shape}: {mem} {versus} <= {max_memory}x: {memory:.2f}x", memory <= max_memory))
        checks.append((f"{shape}: losses of {versus} agree within {LOSS_TOLERANCE:.0%} on every step (fp32): "
                       f"worst {worst:.3%}, final {final:.3%}", worst <= LOSS_TOLERANCE))
    if shape == "proportional":
        for name, r in runs.items():
            if name.startswith("ours"):
                target = BF16_MFU_TARGET if name.endswith("(bf16)") else MFU_TARGET
                checks.append((f"{shape}: MFU {name} >= {target:.0%} of its precision's matmul peak: "
                               f"{r['mfu']:.0%}", r["mfu"] >= target))
    bf16 = runs.get("ours (bf16)")
    if bf16 is not None:
        worst = max(rel(x, y) for x, y in zip(bf16["losses"], ours["losses"]))
        print(f"  bf16 (frozen weights in bf16, fp32 LoRA and projector, autocast): "
              f"{ours['seconds'] / bf16['seconds']:.2f}x the samples/s of fp32, {mem} "
              f"{bf16['peak_memory'] / ours['peak_memory']:.2f}x; losses differ from fp32 by at most {worst:.2%} "
              f"(final {rel(bf16['losses'][-1], ours['losses'][-1]):.2%})")
        checks.append((f"{shape}: losses of ours bf16 within {LOSS_TOLERANCE:.0%} of ours fp32 on every step: "
                       f"worst {worst:.3%}", worst <= LOSS_TOLERANCE))
    return checks


def prepare(shape: str, root: Path, n_records: int) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    from workloads import cc3m_like, make_model

    model_dir = root / shape / "model"
    if not (model_dir / "config.json").is_file():
        make_model(root / shape, shape)
    data_dir = root / shape / f"data-{n_records}"
    if not (data_dir / "chat.json").is_file():
        cc3m_like(data_dir, n_records, AutoTokenizer.from_pretrained(model_dir))
    return model_dir, data_dir


def bench_shape(shape: str, root: Path, a) -> list[tuple[str, bool]]:
    warmup, timed_steps = STEPS.get(shape, (2, 8))
    a = argparse.Namespace(**{**vars(a), "warmup": a.warmup or warmup, "steps": a.steps or timed_steps})
    steps = a.warmup + a.steps
    n_records = steps * a.batch_size
    t0 = time.perf_counter()
    model_dir, data_dir = prepare(shape, root, n_records)
    print(f"{shape}: model and {n_records} CC3M-like records ready in {time.perf_counter() - t0:.0f} s "
          f"({root / shape})", flush=True)
    sizes = sample_sizes(model_dir, data_dir)
    timed = batches(n_records, a.batch_size, steps)[a.warmup:]
    flops = timed_flops([sizes[i] for batch in timed for i in batch], model_dir)

    precisions = ["fp32"] + (["bf16"] if a.bf16 else [])
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: matmul_peak(dtypes[p], a.device) for p in precisions}
    work = root / shape / "runs"
    work.mkdir(exist_ok=True)
    plan = {"ours (fp32)": ("ours", "fp32", False)}  # name -> (trainer, precision, compile)
    if a.trl:
        plan["TRL (fp32)"] = ("trl", "fp32", False)
    if a.bf16:
        plan["ours (bf16)"] = ("ours", "bf16", False)
    if a.compile:
        plan["ours+compile (fp32)"] = ("ours", "fp32", True)
        if a.trl and a.trl_compile:
            plan["TRL+compile (fp32)"] = ("trl", "fp32", True)
    # with --repeats, the runs take turns (ours, TRL, ours, TRL, ...), so a slow spell of the machine falls on both
    repeats = {name: [] for name in plan}
    for i in range(a.repeats):
        for name, (who, precision, compile) in plan.items():
            repeats[name].append(spawn(who, precision, model_dir, data_dir, n_records, work, a, compile,
                                       f"-r{i + 1}" if a.repeats > 1 else ""))
    runs = {name: median_run(name, rs) for name, rs in repeats.items()}
    # the machine may be shared: the matmul peak is measured again after the runs, and the higher one counts
    peaks = {p: max(v, matmul_peak(dtypes[p], a.device)) for p, v in peaks.items()}
    return report(shape, a, runs, flops, peaks, a.device)


def main() -> int:
    from workloads import shapes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=shapes() + ["all"], default="all")
    parser.add_argument("--steps", type=int, help="timed steps (default: 8; real-vocab 4)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, kernels and caches warm up (default: 2; "
                                                   "real-vocab 1)")
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers, in both trainers")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also run ours with --precision bf16 (default: where the CPU has bf16 instructions)")
    parser.add_argument("--trl", action=argparse.BooleanOptionalAction, default=True, help="run TRL's SFTTrainer")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="also run ours with --compile (torch.compile; its compilation is in the warm-up steps, "
                             "give it --warmup 3)")
    parser.add_argument("--trl-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="with --compile, also run TRL with torch_compile=True")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each trainer this many times, taking turns, and count the median time (odd is best)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--workdir", help="keep the built models, data and run logs here (default: a temp folder)")
    # a child process runs one trainer
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    for hidden in ("--model", "--data", "--out", "--result", "--precision"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--n-records", type=int, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        return child(a)
    if (a.warmup is not None and a.warmup < 1) or (a.steps is not None and a.steps < 1) or a.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1")
    if a.bf16 is None:
        a.bf16 = a.device == "cuda" or cpu_has_bf16()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}; load average "
          f"{os.getloadavg()[0]:.1f} (other work on the machine slows every figure)", flush=True)
    with contextlib.ExitStack() as stack:
        root = Path(a.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="train_vs_trl-")))
        root.mkdir(parents=True, exist_ok=True)
        checks = []
        for shape in (shapes() if a.shape == "all" else [a.shape]):
            checks += bench_shape(shape, root, a)
    print("\ntargets:")
    for text, ok in checks:
        print(f"  {verdict(ok)}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
