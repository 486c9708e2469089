"""LoRA fine-tuning of a composed LLaVA model on LLaVA-format data.

    llava-lora train --model MODEL_DIR --data DATA --out RUN_DIR [--config recipe.yaml] [--resume]
    torchrun --standalone --nproc_per_node 2 -m llava_lora train ...   # DDP (gloo on CPU, NCCL on GPUs)
    accelerate launch --config_file fsdp.yaml -m llava_lora train ...

LoRA sits on the language model's attention (q_proj/v_proj by default), the projector is trained in full,
the vision tower is frozen and run without autograd. The loss is computed from the hidden states of the
supervised positions only: the lm_head never produces logits for the ~600 image and prompt positions of a
CC3M sample that carry no label. Right-padded batches run without an attention mask (the causal kernels' path).
On a GPU: flash attention, Liger's fused loss, torch.compile and 4-bit QLoRA (``--attn-implementation``,
``--fused-loss``, ``--compile``, ``--quantize``), each refused at start where it cannot apply. On a CPU: fused
RMSNorm and SwiGLU kernels (fused.py, ``--fused-kernels``), and in bf16 blocked eager attention (attention.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from . import attention, weight_only
from . import config as cfglib
from .adapters import RUN_FILE, apply_lora, init_from, lora_inputs_in_compute_dtype, save_adapter, wrapped_modules
from .config import Alias, device_field, field, image_dir_field, model_field, split_field
from .batches import Collator, DropFailed, ResumableBatchSampler, TrainDataset
from .data.images import locate_records
from .data.records import duplicate_ids, load_records, resolve_data
from .errors import RunFailed, UsageError
from .fused import fuse
from .data.sources import is_mixture, load_mixture, parse_sources
from .heldout import HeldOut, heldout_records
from .heldout import share as heldout_share
from .loss import LlavaLoss
from .outdirs import make_readable, move_into_place
from .modeling import (PRECISION_DTYPES, WEIGHT_ONLY, PrecisionName, contiguous_head_input, default_device,
                       dtype_name, format_param_stats, param_stats, quiet_transformers, train_precision)
from .prompts import DEFAULT_MAX_LENGTH, IGNORE_INDEX, image_tokens_per_image
from .runlog import RunLog, plot_loss, write_data_report

CONFIG_FILE = "config.yaml"
STATE_FILE = "training_state.pt"
# Keys that define a run: resuming with another value would continue a different experiment.
RUN_IDENTITY = ("model", "data", "split", "eval_data", "init_from", "lora_r", "lora_alpha", "lora_target",
                "train_projector", "batch_size", "gradient_accumulation_steps", "seed", "max_length")


@dataclass
class TrainConfig:
    model: str = model_field()
    data: str | list = field(help="LLaVA-format JSON/JSONL file, or a folder holding chat.json; in YAML also a list "
                                  "of sources {path, image_dir, weight, split} (a mixture, see data/sources.py)")
    out: str = field(help="RUN_DIR: adapter, checkpoints, logs")
    image_dir: str | None = image_dir_field()
    split: str | None = split_field()
    resume: bool = field(False, help="continue from the newest complete checkpoint in RUN_DIR")
    overwrite: bool = field(False, help="delete RUN_DIR's previous run and start over")
    lora_r: int = field(4, help="LoRA rank; 0: no LoRA, the projector alone (LLaVA's stage 1)")
    lora_alpha: int = field(8, help="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = field(0.05, help="dropout on the LoRA input")
    lora_target: list[str] = field(["q_proj", "v_proj"], help="language-model linear layers that get LoRA, by name, "
                                   "or a preset: attention (q/k/v/o), all-linear; vision-tower layers only as "
                                   "vision_tower.NAME")
    init_from: str | None = field(None, help="start from another run's trained weights (RUN_DIR or a checkpoint): "
                                             "its projector, and its LoRA when placed alike (LLaVA's stage 2 from "
                                             "stage 1); optimizer and schedule start fresh")
    train_projector: bool = field(True, help="train the multi-modal projector in full (saved with the adapter)")
    learning_rate: float = field(1e-3, help="peak learning rate of the LoRA matrices")
    projector_learning_rate: float | None = field(None, help="peak learning rate of the projector (default: "
                                                             "learning_rate)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    lr_scheduler: Literal["cosine", "linear", "constant"] = field("cosine", help="decay after warm-up")
    warmup_ratio: float = field(0.03, help="share of max_steps spent warming the learning rate up")
    max_steps: int | None = field(None, help="optimizer steps (default: 800, or as many as --num-epochs takes; "
                                             "given with --num-epochs, it wins, as in HF Trainer)")
    num_epochs: float | None = field(None, help="passes over the usable records, instead of --max-steps; the "
                                                "schedule is sized from it")
    batch_size: int = field(6, help="samples per micro-batch per process")
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimizer step")
    max_grad_norm: float = field(0.3, help="gradient clipping norm")
    gradient_checkpointing: bool = field(True, help="recompute the language model's activations in backward")
    precision: PrecisionName = field(
        "auto", help=f"compute and frozen-weight precision ({WEIGHT_ONLY}: frozen weights stored in bf16, computed in "
                     "fp32); auto: bf16 on a GPU that has it and on a CPU that computes it natively (AVX512-BF16/AMX); "
                     f"on other CPUs fp32 where the model fits in half the free memory, else {WEIGHT_ONLY}")
    max_length: int = field(DEFAULT_MAX_LENGTH, help="most tokens per sample; longer samples are cut in their "
                                                     "text, never in image tokens, or skipped")
    group_by_length: bool = field(True, help="batch samples of similar length together (less padding)")
    save_every: int = field(200, help="write checkpoint-N/ every this many steps")
    log_every: int = field(10, help="log metrics every this many steps")
    seed: int = field(42, help="seed of the data order, LoRA init and dropout")
    num_workers: int = field(2, help="DataLoader worker processes (image decoding, tokenisation)")
    device: str | None = device_field()
    num_threads: int | None = field(None, help="CPU threads for the model's kernels (default: torch's, one per "
                                               "core); 1 can be faster for tiny models beside a data worker")
    tensorboard: bool = field(True, help="write TensorBoard event files to RUN_DIR/tensorboard")
    eval_data: str | None = field(None, help="held-out records: a LLaVA file or folder, or a share of DATA held out by "
                                             "--seed (e.g. 0.05); their loss is logged every --eval-every steps")
    eval_split: str | None = field(None, help="with a folder --eval-data: its split file (e.g. val for val.json)")
    eval_image_dir: str | None = field(None, help="image root of a path --eval-data (default: found as for DATA)")
    eval_every: int | None = field(None, help="evaluate on the held-out records every N steps (default: save_every)")
    eval_samples: int = field(4, help="held-out records answered greedily at each evaluation, beside the base "
                                      "model's answers, in RUN_DIR/samples/step-N.jsonl")
    eval_max_new_tokens: int = field(32, help="most tokens of each held-out answer")
    save_total_limit: int | None = field(None, help="keep only the newest N checkpoints (and the best, with "
                                                    "--save-best)")
    save_best: bool = field(False, help="also keep the checkpoint of lowest held-out loss, named in run.json (needs "
                                        "--eval-data; each checkpoint is evaluated)")
    attn_implementation: Literal["auto", "sdpa", "eager", "blocked_eager", "flash_attention_2"] = field(
        "auto", help="attention kernels; auto: flash_attention_2 on a GPU where the flash_attn package is installed, "
                     "blocked_eager (eager attention in causal query blocks, attention.py) on a CPU in bf16, else sdpa")
    fused_loss: Literal["auto", "on", "off"] = field(
        "auto", help="Liger's fused linear cross-entropy for the lm_head and the loss (GPU, liger-kernel package); "
                     "auto: where available")
    fused_kernels: Literal["auto", "on", "off"] = field(
        "auto", help="the language model's RMSNorm and SwiGLU as torch.compile-fused kernels (fused.py; the first "
                     "step compiles them, seconds); auto: on a CPU where a C++ compiler is found, unless --compile "
                     "compiles the whole language model")
    compile: bool = field(False, help="torch.compile the language model: the first step compiles (seconds to "
                                      "minutes), then less activation memory (on a CPU, no faster steps)")
    quantize: Literal["none", "4bit"] = field(
        "none", help="QLoRA: load the language model in 4-bit NF4 through bitsandbytes (GPU only)")

    # The HF TrainingArguments (and peft / LLaVA script) names of the same settings, as flags and YAML keys.
    ALIASES: ClassVar[dict[str, Alias]] = {
        "per_device_train_batch_size": Alias("batch_size"), "save_steps": Alias("save_every"),
        "logging_steps": Alias("log_every"), "lr_scheduler_type": Alias("lr_scheduler"),
        "num_train_epochs": Alias("num_epochs"), "output_dir": Alias("out"), "model_name_or_path": Alias("model"),
        "dataloader_num_workers": Alias("num_workers"), "model_max_length": Alias("max_length"),
        "target_modules": Alias("lora_target"), "eval_steps": Alias("eval_every"),
        "bf16": Alias("precision", bool, lambda on: "bf16" if on else "fp32", "--precision bf16 (--no-bf16: fp32)"),
        "fp16": Alias("precision", bool, lambda on: "fp16" if on else "fp32", "--precision fp16 (--no-fp16: fp32)"),
    }

    def __post_init__(self):
        if self.max_steps is None and self.num_epochs is None:
            self.max_steps = 800
        checks = [
            (self.lora_r >= 0, "lora_r must be >= 0 (0: the projector alone)"), (self.batch_size > 0, "batch_size must be positive"),
            (self.max_steps is None or self.max_steps > 0, "max_steps must be positive"),
            (self.num_epochs is None or self.num_epochs > 0, "num_epochs must be positive"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.gradient_accumulation_steps > 0, "gradient_accumulation_steps must be positive"),
            (self.save_every > 0 and self.log_every > 0, "save_every and log_every must be positive"),
            (self.max_length > 0, "max_length must be positive"), (self.num_workers >= 0, "num_workers >= 0"),
            (self.num_threads is None or self.num_threads > 0, "num_threads must be positive"),
            (self.eval_every is None or self.eval_every > 0, "eval_every must be positive"),
            (self.eval_samples >= 0 and self.eval_max_new_tokens > 0, "eval_samples >= 0, eval_max_new_tokens > 0"),
            (self.save_total_limit is None or self.save_total_limit > 0, "save_total_limit must be positive"),
            (not self.save_best or self.eval_data is not None, "--save-best needs --eval-data"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)


# --------------------------------------------------------------------------------------------------------
# The fast path: options resolved against the device and the installed packages, at start
# --------------------------------------------------------------------------------------------------------

def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _lm_supports_sdpa(model_dir: str | None) -> bool:
    """Whether MODEL_DIR's language model has an SDPA path (Gemma 2's soft-capped attention has none)."""
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return True
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    text_config = AutoConfig.from_pretrained(model_dir).get_text_config()
    return getattr(MODEL_FOR_CAUSAL_LM_MAPPING.get(type(text_config), None), "_supports_sdpa", True)


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
        return "sdpa" if _lm_supports_sdpa(model_dir) else "eager"
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


def _fused_summary(fused: dict[str, int]) -> str:
    """'RMSNorm x17, SwiGLU x8', or 'off'."""
    return ", ".join(f"{kind} x{n}" for kind, n in fused.items() if n) or "off"


def _model_inputs(mb: dict, device) -> dict:
    """The batch on ``device``. A right-padded batch goes without its attention mask: under causal attention no
    real token sees a pad that follows it, so the mask changes nothing the loss reads, while without one the
    attention kernels take their causal path (no [B, 1, T, T] mask built, blocks above the diagonal skipped)."""
    mask = mb["attention_mask"]
    right_padded = not bool((mask[:, 1:] > mask[:, :-1]).any())  # no pad before a real token, on the CPU batch
    out = {k: mb[k].to(device) if mb[k] is not None else None for k in ("input_ids", "labels", "pixel_values")}
    out["attention_mask"] = None if right_padded else mask.to(device)
    return out


# --------------------------------------------------------------------------------------------------------
# RUN_DIR bookkeeping
# --------------------------------------------------------------------------------------------------------

def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (their state file is written last, then the folder renamed into place)."""
    out = []
    for p in run_dir.glob("checkpoint-*"):
        step = p.name.removeprefix("checkpoint-")
        if step.isdigit() and (p / STATE_FILE).is_file():
            out.append((int(step), p))
    return sorted(out)


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path, is_main: bool) -> Path | None:
    """Check RUN_DIR against --resume/--overwrite; return the checkpoint to resume from, if any."""
    saved = run_dir / CONFIG_FILE
    occupied = run_dir.is_dir() and any(p.name != "tensorboard" for p in run_dir.iterdir())
    if occupied and not (cfg.resume or cfg.overwrite):
        raise UsageError(f"--out {run_dir} already holds a run (pass --resume to continue it, or --overwrite to "
                         "start over)")
    if cfg.overwrite and occupied:
        if is_main:
            shutil.rmtree(run_dir)
        return None
    if cfg.resume and saved.is_file():
        previous = cfglib.load_yaml(saved)
        changed = [k for k in RUN_IDENTITY if str(previous.get(k)) != str(getattr(cfg, k))]
        if changed:
            diffs = ", ".join(f"{k}: {previous.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
            raise UsageError(f"--resume: {run_dir} holds a different run ({diffs}); use another --out or "
                             "--overwrite")
    found = checkpoints(run_dir) if cfg.resume else []
    return found[-1][1] if found else None


def _save_checkpoint(run_dir: Path, step: int, peft_model, optimizer, scheduler, model_dir: str,
                     meta: dict) -> Path:
    """checkpoint-N/: adapter + optimizer, scheduler and RNG state, renamed into place when complete; its
    run.json holds ``meta`` (the step, the held-out loss there if one was measured, how the run started)."""
    final = run_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=run_dir))
    try:
        save_adapter(peft_model, tmp, model_dir, meta)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / STATE_FILE)
        make_readable(tmp)
        move_into_place(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        done = checkpoints(run_dir)
        keep = f"; the last complete checkpoint is {done[-1][1]}" if done else ""
        raise UsageError(f"cannot write checkpoint-{step} in {run_dir}: {e.strerror or e}{keep}") from None
    return final


def best_checkpoint(run_dir: Path) -> tuple[Path, float] | None:
    """The complete checkpoint of lowest held-out loss (the earliest among equals), from each one's run.json."""
    scored = []
    for step, path in checkpoints(run_dir):
        loss = json.loads((path / RUN_FILE).read_text()).get("heldout_loss")
        if loss is not None and math.isfinite(loss):
            scored.append((loss, step, path))
    return (min(scored)[2], min(scored)[0]) if scored else None


def prune_checkpoints(run_dir: Path, limit: int, keep_best: bool) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``limit`` (the best one kept with ``keep_best``); a folder
    still being written is never complete, so never touched. Returns what was deleted."""
    done = [path for _, path in checkpoints(run_dir)]
    keep = set(done[-limit:])
    best = best_checkpoint(run_dir) if keep_best else None
    if best is not None:
        keep.add(best[0])
    gone = [p for p in done if p not in keep]
    for p in gone:
        shutil.rmtree(p)
    return gone


def _load_checkpoint(ckpt: Path, peft_model, optimizer, scheduler) -> int:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(ckpt / "adapter_model.safetensors")
    result = set_peft_model_state_dict(peft_model, weights)
    if getattr(result, "unexpected_keys", None):
        raise UsageError(f"{ckpt}: adapter keys do not fit the model, e.g. {result.unexpected_keys[:2]}")
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------

NOTHING_LEARNED_AFTER = 64  # records drawn without one supervised token before a run is stopped as hopeless

# What to do about the reasons a run can meet only skips for
_REMEDIES = {
    "empty_supervision": "the model's chat template marks no assistant turn: rebuild MODEL_DIR with `llava-lora "
                         "build ... --chat-template FILE`, a template whose assistant turns sit in {% generation %}"
                         " ... {% endgeneration %}",
    "too_long": "records do not fit --max-length: raise it",
    "missing_image": "images are not where the data says: pass --image-dir (the folder the `image` paths are "
                     "relative to)",
}


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``--max-steps``, else as many as ``--num-epochs`` passes take."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_epochs * steps_per_epoch / cfg.gradient_accumulation_steps))


class SupervisionWatch:
    """Stops a run that learns nothing: once ``patience`` records were drawn (or at the end) without one
    supervised token, it raises ``RunFailed`` with the skip counts by reason and what to do about them."""

    def __init__(self, patience: int):
        self.patience, self.drawn, self.supervised = patience, 0, 0
        self.reasons: Counter[str] = Counter()

    def update(self, supervised: int, drawn: int, skipped: list) -> None:
        self.supervised += supervised
        self.drawn += drawn
        self.reasons.update(s.reason for s in skipped)
        if not self.supervised and self.drawn >= self.patience:
            self.fail(f"the first {self.drawn} records drawn")

    def fail(self, what: str) -> None:
        counts = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common()) or "none skipped"
        todo = [f"- {_REMEDIES[r]}" for r in self.reasons if r in _REMEDIES]
        todo.append("- `llava-lora data check DATA --model MODEL_DIR` gives every record's reason")
        raise RunFailed(f"nothing to learn: {what} carry no supervised token (skipped: {counts}); no adapter "
                        "was written. What to do:\n" + "\n".join(todo))


def _estimated_lengths(records, image_tokens: int) -> list[int]:
    """Token counts guessed from characters (~3.5 per token): enough to group by length, and free."""
    return [(image_tokens if r.image else 0) + sum(len(t.text) for t in r.turns) * 2 // 7 for r in records]


def _quantization_config(dtype: torch.dtype):
    """QLoRA's recipe: NF4 with double quantisation for the language model; the vision tower, projector and
    lm_head keep their precision (the projector trains in full, the tower is small and sees no LoRA)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])


def _load_model(cfg: TrainConfig, device: str, precision: str, attn_implementation: str = "sdpa",
                gpu_index: int = 0):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = Path(cfg.model)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model {model_dir}: not a MODEL_DIR (no config.json); make one with `llava-lora build`")
    # Frozen weights in the run's precision on every device (bf16: 8.5 GB for the 4 B model, not 17), loaded
    # so once and never cast per forward; main() keeps fp32 masters of what is trained.
    dtype = frozen_dtype(precision)
    kwargs = {}
    if cfg.quantize == "4bit":  # quantised on loading, onto this process's GPU (a 4-bit model is not moved after)
        kwargs = {"quantization_config": _quantization_config(dtype), "device_map": {"": gpu_index}}
    blocked = attn_implementation == "blocked_eager"
    if blocked:  # loaded with a built-in implementation, switched after loading
        attn_implementation = "sdpa" if _lm_supports_sdpa(str(model_dir)) else "eager"
    with quiet_transformers():
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype,
                                                              attn_implementation=attn_implementation, **kwargs)
    if blocked:
        attention.use_blocked(model)
    contiguous_head_input(model)  # held-out answers generate
    return model, AutoProcessor.from_pretrained(model_dir)


def frozen_dtype(precision: str) -> torch.dtype:
    """The dtype frozen weights are held in: the run's precision, bf16 for ``WEIGHT_ONLY``."""
    return torch.bfloat16 if precision == WEIGHT_ONLY else PRECISION_DTYPES[precision]


def autocast_precision(precision: str) -> str:
    """accelerate's ``mixed_precision`` for a run: "no" where the compute is fp32 (fp32, ``WEIGHT_ONLY``)."""
    return "no" if precision in ("fp32", WEIGHT_ONLY) else precision


def wrap_for_training(model, cfg: TrainConfig):
    """What training does to a loaded model: gradient checkpointing of the language model (if asked), LoRA and the
    projector made trainable (everything else frozen), and fp32 masters of what trains."""
    if cfg.gradient_checkpointing:
        model.model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target, cfg.train_projector)
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # the optimizer keeps fp32 masters of what it trains
    return peft_model


def make_optimizer(peft_model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the LoRA matrices and the projector, each group at its own learning rate."""
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    lora_params = [p for n, p in named if "lora_" in n]
    proj_params = [p for n, p in named if "lora_" not in n]
    groups = [{"params": lora_params, "lr": cfg.learning_rate}] if lora_params else []
    if proj_params:
        groups.append({"params": proj_params, "lr": cfg.projector_learning_rate or cfg.learning_rate})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


class Throughput:
    """Training figures averaged over the steps since the last log row."""

    def __init__(self):
        self.loss, self.tokens, self.samples, self.steps, self.start = 0.0, 0, 0, 0, time.perf_counter()

    def row(self, step: int, world: int) -> dict:
        elapsed = time.perf_counter() - self.start
        return {"step": step, "loss": self.loss / self.steps, "samples_per_s": self.samples * world / elapsed,
                "tokens_per_s": self.tokens * world / elapsed, "step_time": elapsed / self.steps}


class Recipe:
    """One training run, in phases a reader can hold in view (after torchtune's single-device LoRA recipe):
    ``setup`` (runtime, data, model, loader, optimizer), ``train_step``, ``train`` (the loop: log, evaluate, save),
    ``save_checkpoint`` and ``finish``. ``main`` runs them in order; a benchmark can call ``setup`` and
    ``train_step`` alone."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.run_dir = cfg, Path(cfg.out)

    # ---------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        self._setup_runtime()
        self._setup_data()
        self._setup_model()
        self._setup_loader()
        self._setup_optimizer()
        self._report()

    def _setup_runtime(self) -> None:
        """Device, precision and the fast-path options, refused here (before RUN_DIR is touched or a model loaded)
        where they cannot apply; the accelerator; the checkpoint to resume from."""
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.state import AcceleratorState

        cfg = self.cfg
        self.device = cfg.device or default_device()
        self.precision, self.precision_why = train_precision(cfg.precision, self.device, cfg.model)
        check_quantize(cfg.quantize, self.device)
        check_compile(cfg.compile, self.device)
        self.attn_implementation = resolve_attn_implementation(cfg.attn_implementation, self.device, cfg.model,
                                                               self.precision)
        self.fused_loss = resolve_fused_loss(cfg.fused_loss, self.device)
        self.fused_kernels = resolve_fused_kernels(cfg.fused_kernels, self.device, cfg.compile)
        # One process may run several trainings (a notebook, the tests), each with its own precision; accelerate
        # keeps the first one's in a process-wide singleton (the distributed state, PartialState, is kept).
        AcceleratorState._reset_state()
        # find_unused_parameters: a micro-batch without images leaves the projector without gradients
        self.accelerator = Accelerator(
            cpu=self.device == "cpu", mixed_precision=autocast_precision(self.precision),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        acc = self.accelerator
        self.is_main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        self.resume_from = _prepare_run_dir(cfg, self.run_dir, self.is_main)
        acc.wait_for_everyone()

    def _setup_data(self) -> None:
        """The training records, the held-out ones, and RUN_DIR with the resolved config."""
        cfg = self.cfg
        self.sources = None  # per-record source names, for a mixture
        if is_mixture(cfg.data):
            self._setup_mixture()
        else:
            self.data_file, self.image_root = resolve_data(cfg.data, cfg.split, cfg.image_dir)
            self.records, self.parse_errors = load_records(self.data_file)
            # Images that are missing or outside the root are found now, by a stat, and never reach the sampler.
            self.records, unlocated = locate_records(self.records, self.image_root)
            self.parse_errors += unlocated
            self.n_records = len(self.records) + len(self.parse_errors)  # read, for the data report
        self.held, self.held_root = None, None
        if cfg.eval_data is not None:
            self.records, self.held, self.held_root, held_errors = heldout_records(
                cfg.eval_data, cfg.eval_split, cfg.eval_image_dir, self.records, self.image_root, cfg.seed)
            if heldout_share(cfg.eval_data) is None:  # a file of its own: its records were read too
                self.n_records += len(self.held) + len(held_errors)
            self.held, unlocated = locate_records(self.held, self.held_root)
            self.parse_errors = self.parse_errors + held_errors + unlocated
        if len(self.records) < cfg.batch_size * self.world:
            raise UsageError(f"{self.data_file}: {len(self.records)} usable records, fewer than one batch of "
                             f"{cfg.batch_size * self.world}")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfglib.save(cfg, self.run_dir / CONFIG_FILE)

    def _setup_mixture(self) -> None:
        """Several sources: records weighted, each with its own image root (and its source in every report)."""
        cfg = self.cfg
        if cfg.image_dir or cfg.split:
            raise UsageError("with a list of data sources, give each its own image_dir and split")
        if heldout_share(cfg.eval_data) is not None:
            raise UsageError(f"--eval-data {cfg.eval_data}: a share cannot be held out of a mixture; give a file")
        mix = load_mixture(parse_sources(cfg.data), cfg.seed)
        self.records, self.parse_errors, self.sources = mix.records, mix.rejected, mix.names
        self.n_records = mix.total  # read, before weighting
        self.image_root = mix.roots
        self.data_file = " + ".join(f"{f} ({n} records)" for f, _, n in mix.files)

    def _setup_model(self) -> None:
        """MODEL_DIR with LoRA (and the projector) trainable in fp32, everything else frozen."""
        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        model, self.processor = _load_model(cfg, self.device, self.precision, self.attn_implementation,
                                            self.accelerator.local_process_index)
        self.fused = fuse(model.model.language_model) if self.fused_kernels else {}
        self.peft_model = wrap_for_training(model, cfg)
        if self.precision == WEIGHT_ONLY:
            weight_only.apply(self.peft_model)
        elif self.precision != "fp32":
            lora_inputs_in_compute_dtype(self.peft_model)
        self.trainable = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.run_meta = {"lora_r": cfg.lora_r,
                         "init_from": str(Path(cfg.init_from).resolve()) if cfg.init_from else None}
        if cfg.init_from:
            loaded = init_from(self.peft_model, cfg.init_from)
            if self.is_main:
                print(f"starting from {cfg.init_from}: {loaded['projector']} projector and {loaded['lora']} LoRA "
                      "tensors")
        if cfg.compile:  # in place, so parameter names (and so checkpoints) stay those of the plain model
            # dynamic: every batch has its own padded length; the default (static first, dynamic on the second
            # shape) compiles twice. AOTAutograd recomputes the fused element-wise ops (norms, SiLU, RoPE) in the
            # backward instead of saving their outputs.
            model.model.language_model.compile(dynamic=True)
        self.model = model

    def _setup_loader(self) -> None:
        """Datasets, the resumable sampler, the DataLoader, and the run's length in steps."""
        cfg, config = self.cfg, self.model.config
        image_tokens = image_tokens_per_image(config)
        dataset = TrainDataset(self.records, self.image_root, self.processor, config.image_token_id, image_tokens,
                               cfg.max_length, self.sources)
        self.heldout = None
        if self.held is not None:
            held_dataset = TrainDataset(self.held, self.held_root, self.processor, config.image_token_id,
                                        image_tokens, cfg.max_length)
            self.heldout = HeldOut(self.held, self.held_root, held_dataset, self.processor, cfg.batch_size,
                                   cfg.eval_samples, cfg.eval_max_new_tokens, self.run_dir)
        lengths = _estimated_lengths(self.records, image_tokens) if cfg.group_by_length else None
        self.sampler = ResumableBatchSampler(len(self.records), cfg.batch_size, cfg.seed, rank=self.rank,
                                             world=self.world, lengths=lengths)
        self.max_steps = total_steps(cfg, len(self.sampler))
        self.failed: set[int] = set()  # records a worker could not load: reported once, not drawn again
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=DropFailed(self.sampler, self.failed),
            collate_fn=Collator(self.processor.tokenizer.pad_token_id),
            num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
            prefetch_factor=4 if cfg.num_workers > 0 else None, pin_memory=self.device == "cuda",
            # its own generator: creating the iterator must not draw from the global RNG that dropout uses,
            # or a resumed run's dropout masks would be shifted by one draw
            generator=torch.Generator().manual_seed(cfg.seed))

    def _setup_optimizer(self) -> None:
        """AdamW over LoRA and projector (each its own rate), the schedule, the resumed state, and the loss module
        prepared for the accelerator."""
        from transformers import get_scheduler

        cfg = self.cfg
        optimizer = make_optimizer(self.peft_model, cfg)
        self.scheduler = get_scheduler(
            cfg.lr_scheduler if cfg.lr_scheduler != "constant" else "constant_with_warmup", optimizer,
            num_warmup_steps=math.ceil(cfg.warmup_ratio * self.max_steps), num_training_steps=self.max_steps)
        self.start_step = (_load_checkpoint(self.resume_from, self.peft_model, optimizer, self.scheduler)
                           if self.resume_from else 0)
        self.sampler.start = self.start_step * cfg.gradient_accumulation_steps
        self.loss_module, self.optimizer = self.accelerator.prepare(LlavaLoss(self.peft_model, self.fused_loss),
                                                                    optimizer)

    def _report(self) -> None:
        if not self.is_main:
            return
        cfg, accum = self.cfg, self.cfg.gradient_accumulation_steps
        print(f"training {cfg.model} on {self.data_file} ({len(self.records)} records, {len(self.parse_errors)} "
              f"rejected) -> {self.run_dir}")
        compute = "float32" if autocast_precision(self.precision) == "no" else dtype_name(frozen_dtype(self.precision))
        print(f"precision {self.precision} on {self.device} ({self.precision_why}): frozen weights in "
              f"{dtype_name(frozen_dtype(self.precision))}, computed in {compute}; trained ones (LoRA, projector) in "
              "float32")
        print(f"device {self.device} x{self.world}, precision {self.precision}, attention {self.attn_implementation}, "
              f"fused loss {'on' if self.fused_loss else 'off'}, fused kernels {_fused_summary(self.fused)}, "
              f"compile {'on' if cfg.compile else 'off'}, quantize "
              f"{cfg.quantize}; "
              + (f"LoRA r={cfg.lora_r} on {len(wrapped_modules(self.peft_model))} modules; " if cfg.lora_r else
                 "no LoRA (the projector alone); ")
              + (f"resuming from {self.resume_from.name}" if self.resume_from else "starting fresh"))
        print(f"{self.max_steps} steps of {cfg.batch_size * self.world * accum} samples: "
              f"{self.max_steps * accum / len(self.sampler):.2f} epochs of {len(self.sampler)} micro-steps")
        print(format_param_stats(param_stats(self.peft_model)))

    # ----------------------------------------------------------------------------------------------------- step
    def train_step(self, micro: list[dict], global_supervised: torch.Tensor, meter: Throughput) -> float:
        """Forward and backward over the micro-batches of one optimizer step, then the update; returns the mean
        loss per supervised token over the whole global batch."""
        acc, world, accum = self.accelerator, self.world, len(micro)
        step_loss = torch.zeros((), device=acc.device)
        for j, mb in enumerate(micro):
            if mb["input_ids"] is None:
                # Every record was skipped (and reported). Under DDP each process must still run a forward and
                # backward, so an all-padding batch with no label stands in (zero gradient).
                mb = _empty_batch(self.processor.tokenizer.pad_token_id)
            sync = acc.no_sync(self.loss_module) if j < accum - 1 else contextlib.nullcontext()
            with sync, acc.autocast():
                loss_sum, _ = self.loss_module(**_model_inputs(mb, acc.device))
                if not loss_sum.requires_grad:  # projector alone and no image here: a zero with a graph,
                    loss_sum = loss_sum + sum(p.sum() for p in self.trainable) * 0.0  # so every rank's backward runs
                # Token mean over the whole global batch; DDP averages gradients over processes.
                loss = loss_sum / global_supervised * world
            acc.backward(loss)
            step_loss += loss_sum.detach()
            meter.tokens += int(mb["attention_mask"].sum())
            meter.samples += mb["n_samples"]
        self.grad_norm = acc.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(acc.reduce(step_loss, reduction="sum") / global_supervised)

    def _supervised(self, micro: list[dict], step: int) -> torch.Tensor:
        """Supervised tokens of the global batch (at least 1); skipped records reported, the watch told."""
        acc = self.accelerator
        for mb in micro:
            fresh = [x for x in mb["skipped"] if x.index not in self.failed]
            self.failed.update(x.index for x in fresh)
            self.log.skipped(fresh, step)
        supervised = acc.reduce(torch.tensor(sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum())
                                                 for mb in micro if mb["input_ids"] is not None), device=acc.device),
                                reduction="sum")
        drawn = acc.reduce(torch.tensor(sum(mb["n_samples"] + len(mb["skipped"]) for mb in micro),
                                        device=acc.device), reduction="sum")
        self.watch.update(int(supervised), int(drawn), [s for mb in micro for s in mb["skipped"]])
        return supervised.clamp(min=1)

    # ----------------------------------------------------------------------------------------------------- loop
    def train(self) -> None:
        """Steps from the start (or the resumed step) to the end: log, evaluate on held-out records, save."""
        from tqdm.auto import tqdm

        cfg, max_steps = self.cfg, self.max_steps
        self.log = RunLog(self.run_dir, self.rank, self.is_main, cfg.tensorboard)
        self.watch = SupervisionWatch(min(len(self.records), NOTHING_LEARNED_AFTER))
        self.last_saved = self.start_step
        eval_every = cfg.eval_every or cfg.save_every
        batches = iter(self.loader)
        bar = tqdm(total=max_steps, initial=self.start_step, disable=not self.is_main, desc="train",
                   dynamic_ncols=True)
        meter = Throughput()
        self.loss_module.train()
        try:
            for step in range(self.start_step + 1, max_steps + 1):
                micro = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
                meter.loss += self.train_step(micro, self._supervised(micro, step), meter)
                meter.steps += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == max_steps:
                    row = self._log_row(step, meter)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                    samples_s=f"{row['samples_per_s']:.1f}")
                    meter = Throughput()
                if step == max_steps and not self.watch.supervised:
                    self.watch.fail(f"all {self.watch.drawn} records drawn in {max_steps - self.start_step} steps")
                save_now = (step % cfg.save_every == 0 or step == max_steps) and self.watch.supervised
                heldout_loss = None
                if self.heldout is not None and (step % eval_every == 0 or step == max_steps
                                                 or (cfg.save_best and save_now)):
                    heldout_loss = _evaluate_heldout(self.heldout, self.loss_module, self.accelerator, self.log,
                                                     step, bar)
                if save_now:
                    self.save_checkpoint(step, heldout_loss)
        except RunFailed:
            if self.is_main:
                write_data_report(self.run_dir, self.n_records, self.parse_errors)
            raise
        finally:
            bar.close()
            self.log.close()

    def _log_row(self, step: int, meter: Throughput) -> dict:
        accum, world = self.cfg.gradient_accumulation_steps, self.world
        row = {**meter.row(step, world), "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(self.grad_norm),
               "epoch": step * accum * self.cfg.batch_size * world / len(self.records)}
        self.log.metrics(row)
        return row

    def save_checkpoint(self, step: int, heldout_loss: float | None) -> None:
        """checkpoint-N/ (with the held-out loss at N, if measured), the save limit applied, the curve redrawn."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            meta = {**self.run_meta, "step": step}
            if heldout_loss is not None:
                meta["heldout_loss"] = heldout_loss
            _save_checkpoint(self.run_dir, step, self._peft(), self.optimizer, self.scheduler, self.cfg.model, meta)
            if self.cfg.save_total_limit:
                prune_checkpoints(self.run_dir, self.cfg.save_total_limit, self.cfg.save_best)
            plot_loss(self.run_dir)
        self.last_saved = step

    def _peft(self):
        return self.accelerator.unwrap_model(self.loss_module).peft_model

    def finish(self) -> None:
        """The final adapter in RUN_DIR (naming the best checkpoint with --save-best), the data report, the curve."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            best = best_checkpoint(self.run_dir) if self.cfg.save_best else None
            meta = {**self.run_meta, "step": self.last_saved}
            if best is not None:
                meta.update(best_checkpoint=best[0].name, best_heldout_loss=best[1])
            save_adapter(self._peft(), self.run_dir, self.cfg.model, meta)
            report = write_data_report(self.run_dir, self.n_records, self.parse_errors, duplicate_ids(self.records))
            curve = plot_loss(self.run_dir)
            print(f"adapter written to {self.run_dir} (step {self.last_saved}); loss curve {curve}; "
                  f"{report['skipped']} records skipped, see {self.run_dir / 'data_report.json'}")
            if best is not None:
                print(f"best checkpoint: {best[0]} (held-out loss {best[1]:.4f})")
        self.accelerator.end_training()


def main(cfg: TrainConfig) -> int:
    recipe = Recipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.finish()
    return 0


def _evaluate_heldout(heldout: HeldOut, loss_module, accelerator, log: RunLog, step: int, bar) -> float:
    """Held-out loss (logged as eval_loss) and, on the main process, the samples' answers; dropout off meanwhile."""
    unwrapped = accelerator.unwrap_model(loss_module)  # no DDP forward: no gradient follows
    unwrapped.eval()
    try:
        loss, tokens, skipped = heldout.loss(unwrapped, accelerator)
        log.skipped(skipped, step)
        if accelerator.is_main_process:
            with accelerator.autocast():  # as in training: half-precision frozen weights beside fp32 trained ones
                heldout.answers(unwrapped.peft_model, step)
            log.metrics({"step": step, "eval_loss": loss, "eval_tokens": tokens})
            bar.write(f"step {step}: held-out loss {loss:.4f} over {tokens} tokens")
    finally:
        unwrapped.train()
    accelerator.wait_for_everyone()
    return loss


def _empty_batch(pad_token_id: int) -> dict:
    ids = torch.full((1, 2), pad_token_id, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, IGNORE_INDEX),
            "pixel_values": None, "n_samples": 0, "skipped": []}

