"""LoRA fine-tuning of a composed LLaVA model on LLaVA-format data.

    llava-lora train --model MODEL_DIR --data DATA --out RUN_DIR [--config recipe.yaml] [--resume]
    torchrun --standalone --nproc_per_node 2 -m llava_lora train ...   # DDP (gloo on CPU, NCCL on GPUs)
    accelerate launch --config_file fsdp.yaml -m llava_lora train ...

LoRA sits on the language model's attention (q_proj/v_proj by default), the projector is trained in full,
the vision tower is frozen and run without autograd. The loss is computed from the hidden states of the
supervised positions only: the lm_head never produces logits for the ~600 image and prompt positions of a
CC3M sample that carry no label. Right-padded batches run without an attention mask (the causal kernels' path).
On a GPU: flash attention, Liger's fused loss, torch.compile and 4-bit QLoRA (``--attn-implementation``,
``--fused-loss``, ``--compile``, ``--quantize``), each refused at start where it cannot apply.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from . import config as cfglib
from .adapters import apply_lora, save_adapter, wrapped_modules
from .config import field
from .data.dataset import Collator, ResumableBatchSampler, TrainDataset
from .data.records import load_records, resolve_data
from .errors import UsageError
from .fsutil import make_readable, move_into_place
from .modeling import PRECISION_DTYPES, format_param_stats, param_stats, quiet_transformers, train_precision
from .prompts import IGNORE_INDEX, image_tokens_per_image
from .runlog import RunLog, plot_loss, write_data_report

CONFIG_FILE = "config.yaml"
STATE_FILE = "training_state.pt"
# Keys that define a run: resuming with another value would continue a different experiment.
RUN_IDENTITY = ("model", "data", "split", "lora_r", "lora_alpha", "lora_target", "train_projector", "batch_size",
                "gradient_accumulation_steps", "seed", "max_length")


@dataclass
class TrainConfig:
    model: str = field(help="MODEL_DIR written by `llava-lora build`")
    data: str = field(help="LLaVA-format JSON/JSONL file, or a folder holding chat.json")
    out: str = field(help="RUN_DIR: adapter, checkpoints, logs")
    image_dir: str | None = field(None, help="image root (default: DATA's images_dl/, else images/, else DATA)")
    split: str | None = field(None, help="data split file in a DATA folder (default: chat.json)")
    resume: bool = field(False, help="continue from the newest complete checkpoint in RUN_DIR")
    overwrite: bool = field(False, help="delete RUN_DIR's previous run and start over")
    lora_r: int = field(4, help="LoRA rank")
    lora_alpha: int = field(8, help="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = field(0.05, help="dropout on the LoRA input")
    lora_target: list[str] = field(["q_proj", "v_proj"], help="language-model module names that get LoRA")
    train_projector: bool = field(True, help="train the multi-modal projector in full (saved with the adapter)")
    learning_rate: float = field(1e-3, help="peak learning rate of the LoRA matrices")
    projector_learning_rate: float | None = field(None, help="peak learning rate of the projector (default: "
                                                             "learning_rate)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    lr_scheduler: Literal["cosine", "linear", "constant"] = field("cosine", help="decay after warm-up")
    warmup_ratio: float = field(0.03, help="share of max_steps spent warming the learning rate up")
    max_steps: int = field(800, help="optimizer steps")
    batch_size: int = field(6, help="samples per micro-batch per process")
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimizer step")
    max_grad_norm: float = field(0.3, help="gradient clipping norm")
    gradient_checkpointing: bool = field(True, help="recompute the language model's activations in backward")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        "auto", help="compute and frozen-weight precision; auto: bf16 on a GPU that has it and on a CPU (native "
                     "there with AVX512-BF16/AMX, else emulated but half the memory), else fp32")
    max_length: int = field(2048, help="most tokens per sample; longer samples are cut in their text, never in "
                                       "image tokens, or skipped")
    group_by_length: bool = field(True, help="batch samples of similar length together (less padding)")
    save_every: int = field(200, help="write checkpoint-N/ every this many steps")
    log_every: int = field(10, help="log metrics every this many steps")
    seed: int = field(42, help="seed of the data order, LoRA init and dropout")
    num_workers: int = field(2, help="DataLoader worker processes (image decoding, tokenisation)")
    device: str | None = field(None, help="cpu or cuda (default: cuda when available)")
    num_threads: int | None = field(None, help="CPU threads for the model's kernels (default: torch's, one per "
                                               "core); 1 can be faster for tiny models beside a data worker")
    tensorboard: bool = field(True, help="write TensorBoard event files to RUN_DIR/tensorboard")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = field(
        "auto", help="attention kernels; auto: flash_attention_2 on a GPU where the flash_attn package is installed, "
                     "else sdpa")
    fused_loss: Literal["auto", "on", "off"] = field(
        "auto", help="Liger's fused linear cross-entropy for the lm_head and the loss (GPU, liger-kernel package); "
                     "auto: where available")
    compile: bool = field(False, help="torch.compile the language model: the first step compiles (seconds to "
                                      "minutes), then ~40% less activation memory (on a CPU, no faster steps)")
    quantize: Literal["none", "4bit"] = field(
        "none", help="QLoRA: load the language model in 4-bit NF4 through bitsandbytes (GPU only)")

    def __post_init__(self):
        checks = [
            (self.lora_r > 0, "lora_r must be positive"), (self.batch_size > 0, "batch_size must be positive"),
            (self.max_steps > 0, "max_steps must be positive"), (self.learning_rate > 0, "learning_rate must be > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.gradient_accumulation_steps > 0, "gradient_accumulation_steps must be positive"),
            (self.save_every > 0 and self.log_every > 0, "save_every and log_every must be positive"),
            (self.max_length > 0, "max_length must be positive"), (self.num_workers >= 0, "num_workers >= 0"),
            (self.num_threads is None or self.num_threads > 0, "num_threads must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)


# --------------------------------------------------------------------------------------------------------
# The fast path: options resolved against the device and the installed packages, at start
# --------------------------------------------------------------------------------------------------------

def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_attn_implementation(choice: str, device: str) -> str:
    """The transformers ``attn_implementation`` of ``--attn-implementation`` on ``device``."""
    if choice == "auto":
        return "flash_attention_2" if device == "cuda" and _installed("flash_attn") else "sdpa"
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


def check_compile(enabled: bool, device: str) -> None:
    """torch.compile's CPU code is C++ built on the spot: refuse up front where no compiler is found, rather than
    fail at the first step after the model has loaded."""
    if not enabled or device != "cpu":
        return
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()  # the compiler inductor itself would use: $CXX, else g++
    except exc.InvalidCxxCompiler:
        raise UsageError("--compile on a CPU needs a C++ compiler for torch.compile's generated code (g++, or the "
                         "one $CXX names); install one or drop --compile") from None


def _model_inputs(mb: dict, device) -> dict:
    """The batch on ``device``. A right-padded batch goes without its attention mask: under causal attention no
    real token sees a pad that follows it, so the mask changes nothing the loss reads, while without one the
    attention kernels take their causal path (no [B, 1, T, T] mask built, blocks above the diagonal skipped)."""
    mask = mb["attention_mask"]
    right_padded = not bool((mask[:, 1:] > mask[:, :-1]).any())  # no pad before a real token, on the CPU batch
    out = {k: mb[k].to(device) if mb[k] is not None else None for k in ("input_ids", "labels", "pixel_values")}
    out["attention_mask"] = None if right_padded else mask.to(device)
    return out


class LlavaLoss(torch.nn.Module):
    """``forward(batch) -> (summed token cross-entropy, supervised token count)`` of a peft-wrapped LLaVA.

    The same computation as ``LlavaForConditionalGeneration(labels=...)``, rearranged: the frozen vision
    tower runs under ``no_grad``, and the lm_head and the loss see only the positions whose next token is
    supervised (with ``fused_loss``, Liger's kernel computes them chunk by chunk, never all the logits at once).
    One module, so DDP/FSDP wrap the whole step.
    """

    def __init__(self, peft_model, fused_loss: bool = False):
        super().__init__()
        self.peft_model = peft_model
        llava = peft_model.get_base_model()
        layer = llava.config.vision_feature_layer
        if not isinstance(layer, int) or llava.config.vision_feature_select_strategy != "default":
            raise UsageError("training supports one vision feature layer with the 'default' strategy")
        self.feature_layer = layer
        self.fused = None
        if fused_loss:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self.fused = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def forward(self, input_ids, attention_mask, labels, pixel_values=None):
        llava = self.peft_model.get_base_model()
        embeds = llava.model.get_input_embeddings()(input_ids)  # [B, T, D]
        if pixel_values is not None:
            tower = llava.model.vision_tower
            with torch.no_grad():
                hidden = tower(pixel_values.to(tower.dtype), output_hidden_states=True).hidden_states
                feats = hidden[self.feature_layer][:, 1:]  # [N, P, Dv], CLS dropped
            feats = llava.model.multi_modal_projector(feats)  # [N, P, D]
            image_mask = (input_ids == llava.config.image_token_id).unsqueeze(-1)  # [B, T, 1]
            embeds = embeds.masked_scatter(image_mask, feats.to(embeds.dtype))
        hidden = llava.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                            use_cache=False).last_hidden_state  # [B, T, D]
        targets = labels[:, 1:]  # position t predicts token t + 1
        supervised = targets != IGNORE_INDEX  # [B, T-1]
        hidden = hidden[:, :-1][supervised]  # [N_sup, D]
        if self.fused is not None:
            loss = self.fused(llava.lm_head.weight, hidden, targets[supervised], llava.lm_head.bias)
            return (loss[0] if isinstance(loss, tuple) else loss), supervised.sum()
        logits = llava.lm_head(hidden).float()  # [N_sup, V]
        return F.cross_entropy(logits, targets[supervised], reduction="sum"), supervised.sum()


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


def _save_checkpoint(run_dir: Path, step: int, peft_model, optimizer, scheduler, model_dir: str) -> Path:
    """checkpoint-N/: adapter + optimizer, scheduler and RNG state, renamed into place when complete."""
    final = run_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=run_dir))
    try:
        save_adapter(peft_model, tmp, model_dir, {"step": step})
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
    dtype = PRECISION_DTYPES[precision]
    kwargs = {}
    if cfg.quantize == "4bit":  # quantised on loading, onto this process's GPU (a 4-bit model is not moved after)
        kwargs = {"quantization_config": _quantization_config(dtype), "device_map": {"": gpu_index}}
    with quiet_transformers():
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype,
                                                              attn_implementation=attn_implementation, **kwargs)
    return model, AutoProcessor.from_pretrained(model_dir)


def main(cfg: TrainConfig) -> int:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    run_dir = Path(cfg.out)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision, precision_why = train_precision(cfg.precision, device)
    # refused here, before RUN_DIR is touched or a model loaded: an option that cannot apply is never ignored
    check_quantize(cfg.quantize, device)
    check_compile(cfg.compile, device)
    attn_implementation = resolve_attn_implementation(cfg.attn_implementation, device)
    fused_loss = resolve_fused_loss(cfg.fused_loss, device)
    # A process may train more than once (tests, a notebook), with another precision each time: accelerate keeps
    # the first's mixed precision in a process-wide state and refuses a change. The distributed state is kept.
    AcceleratorState._reset_state()
    # find_unused_parameters: a micro-batch without images leaves the projector without gradients
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="no" if precision == "fp32" else precision,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    resume_from = _prepare_run_dir(cfg, run_dir, is_main)
    accelerator.wait_for_everyone()
    data_file, image_root = resolve_data(cfg.data, cfg.split, cfg.image_dir)
    records, parse_errors = load_records(data_file)
    if len(records) < cfg.batch_size * world:
        raise UsageError(f"{data_file}: {len(records)} usable records, fewer than one batch of "
                         f"{cfg.batch_size * world}")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfglib.save(cfg, run_dir / CONFIG_FILE)

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, processor = _load_model(cfg, device, precision, attn_implementation, accelerator.local_process_index)
    if cfg.gradient_checkpointing:
        model.model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target,
                            cfg.train_projector)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()  # the optimizer keeps fp32 masters of what it trains
    if cfg.compile:  # in place, so parameter names (and so checkpoints) stay those of the plain model
        # dynamic: every batch has its own padded length; the default (static first, dynamic on the second
        # shape) compiles twice. AOTAutograd recomputes the fused element-wise ops (norms, SiLU, RoPE) in the
        # backward instead of saving their outputs: 38-44% less peak RSS in the CPU benchmarks, no faster step.
        model.model.language_model.compile(dynamic=True)
    image_tokens = image_tokens_per_image(model.config)
    dataset = TrainDataset(records, image_root, processor, model.config.image_token_id, image_tokens,
                           cfg.max_length)
    lora_params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    proj_params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    groups = [{"params": lora_params, "lr": cfg.learning_rate}]
    if proj_params:
        groups.append({"params": proj_params, "lr": cfg.projector_learning_rate or cfg.learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler if cfg.lr_scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
                              num_training_steps=cfg.max_steps)
    start_step = _load_checkpoint(resume_from, peft_model, optimizer, scheduler) if resume_from else 0
    loss_module, optimizer = accelerator.prepare(LlavaLoss(peft_model, fused_loss), optimizer)

    accum = cfg.gradient_accumulation_steps
    sampler = ResumableBatchSampler(len(records), cfg.batch_size, cfg.seed, start=start_step * accum, rank=rank,
                                    world=world,
                                    lengths=_estimated_lengths(records, image_tokens) if cfg.group_by_length else None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=Collator(processor.tokenizer.pad_token_id),
        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers > 0 else None, pin_memory=device == "cuda",
        # its own generator: creating the iterator must not draw from the global RNG that dropout uses,
        # or a resumed run's dropout masks would be shifted by one draw
        generator=torch.Generator().manual_seed(cfg.seed))
    log = RunLog(run_dir, rank, is_main, cfg.tensorboard)
    if is_main:
        print(f"training {cfg.model} on {data_file} ({len(records)} records, {len(parse_errors)} rejected) "
              f"-> {run_dir}")
        print(f"precision {precision} on {device} ({precision_why}): frozen weights in "
              f"{str(PRECISION_DTYPES[precision]).removeprefix('torch.')}, trained ones (LoRA, projector) in float32")
        print(f"device {device} x{world}, precision {precision}, attention {attn_implementation}, fused loss "
              f"{'on' if fused_loss else 'off'}, compile {'on' if cfg.compile else 'off'}, quantize {cfg.quantize}; "
              f"LoRA r={cfg.lora_r} on {len(wrapped_modules(peft_model))} modules; "
              + (f"resuming from {resume_from.name}" if resume_from else "starting fresh"))
        print(format_param_stats(param_stats(peft_model)))

    batches = iter(loader)
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not is_main, desc="train", dynamic_ncols=True)
    window = {"loss": 0.0, "tokens": 0, "samples": 0, "steps": 0, "time": time.perf_counter()}
    last_saved = start_step
    loss_module.train()
    try:
        for step in range(start_step + 1, cfg.max_steps + 1):
            micro = [next(batches) for _ in range(accum)]
            for mb in micro:
                log.skipped(mb["skipped"], step)
            supervised = torch.tensor(sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum())
                                          for mb in micro if mb["input_ids"] is not None), device=accelerator.device)
            global_supervised = accelerator.reduce(supervised, reduction="sum").clamp(min=1)
            step_loss = torch.zeros((), device=accelerator.device)
            for j, mb in enumerate(micro):
                if mb["input_ids"] is None:
                    # Every record was skipped (and reported). Under DDP each process must still run a
                    # forward and backward, so an all-padding batch with no label stands in (zero gradient).
                    mb = _empty_batch(processor.tokenizer.pad_token_id)
                sync = accelerator.no_sync(loss_module) if j < accum - 1 else contextlib.nullcontext()
                with sync, accelerator.autocast():
                    loss_sum, _ = loss_module(**_model_inputs(mb, accelerator.device))
                    # Token mean over the whole global batch; DDP averages gradients over processes.
                    loss = loss_sum / global_supervised * world
                accelerator.backward(loss)
                step_loss += loss_sum.detach()
                window["tokens"] += int(mb["attention_mask"].sum())
                window["samples"] += mb["n_samples"]
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            mean_loss = float(accelerator.reduce(step_loss, reduction="sum") / global_supervised)
            window["loss"] += mean_loss
            window["steps"] += 1
            lr = scheduler.get_last_lr()[0]
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                elapsed = time.perf_counter() - window["time"]
                row = {"step": step, "loss": window["loss"] / window["steps"], "lr": lr,
                       "grad_norm": float(grad_norm), "samples_per_s": window["samples"] * world / elapsed,
                       "tokens_per_s": window["tokens"] * world / elapsed, "step_time": elapsed / window["steps"],
                       "epoch": step * accum * cfg.batch_size * world / len(records)}
                log.metrics(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{row['samples_per_s']:.1f}")
                window = {"loss": 0.0, "tokens": 0, "samples": 0, "steps": 0, "time": time.perf_counter()}
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                accelerator.wait_for_everyone()
                if is_main:
                    unwrapped = accelerator.unwrap_model(loss_module).peft_model
                    _save_checkpoint(run_dir, step, unwrapped, optimizer, scheduler, cfg.model)
                    plot_loss(run_dir)
                last_saved = step
    finally:
        bar.close()
        log.close()

    accelerator.wait_for_everyone()
    if is_main:
        unwrapped = accelerator.unwrap_model(loss_module).peft_model
        save_adapter(unwrapped, run_dir, cfg.model, {"step": last_saved})
        report = write_data_report(run_dir, len(records) + len(parse_errors), parse_errors)
        curve = plot_loss(run_dir)
        print(f"adapter written to {run_dir} (step {last_saved}); loss curve {curve}; "
              f"{report['skipped']} records skipped, see {run_dir / 'data_report.json'}")
    accelerator.end_training()
    return 0


def _empty_batch(pad_token_id: int) -> dict:
    ids = torch.full((1, 2), pad_token_id, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, IGNORE_INDEX),
            "pixel_values": None, "n_samples": 0, "skipped": []}

