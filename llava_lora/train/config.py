"""The training config: one typed field per setting, with its help text, checked at construction.

    llava-lora train --help        # the flags, grouped as below (LoRA, optimisation, evaluation, checkpoints, kernels)

Flags and YAML keys share the field names (``config.add_arguments``); ``ALIASES`` holds the HF ``TrainingArguments``
spellings of the same settings, ``GROUPS`` the heading each field is listed under in ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..chat.encode import DEFAULT_MAX_LENGTH
from ..config import Alias, device_field, field, image_dir_field, model_field, split_field
from ..errors import UsageError
from ..model.precision import WEIGHT_ONLY, PrecisionName


@dataclass
class TrainConfig:
    model: str = model_field()
    data: str | list = field(help="data in any format `data check` reads (JSON/JSONL, parquet, save_to_disk, shards, "
                                  "hf://datasets/...; docs/data.md), or a folder holding chat.json; in YAML also a list "
                                  "of sources {path, image_dir, weight, split} (a mixture, see data/sources.py)")
    out: str = field(help="RUN_DIR: adapter, checkpoints, logs")
    image_dir: str | None = image_dir_field()
    split: str | None = split_field()
    resume: bool = field(False, help="continue from the newest complete checkpoint in RUN_DIR")
    overwrite: bool = field(False, help="delete RUN_DIR's previous run and start over (only a RUN_DIR llava-lora "
                                        "wrote)")
    resume_changed: bool = field(False, help="with --resume: apply optimisation settings that differ from the run's "
                                             "(learning rates, schedule, steps, precision, ...), the schedule "
                                             "recomputed; without it such a resume is refused")
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
    skip_nonfinite: int = field(0, help="steps whose loss or gradient norm is NaN/inf that may be skipped (no update, "
                                        "each reported) before the run stops; 0: the first one stops it")
    gradient_checkpointing: bool = field(True, help="recompute the language model's activations in backward")
    precision: PrecisionName = field(
        "auto", help=f"compute and frozen-weight precision ({WEIGHT_ONLY}: frozen weights stored in bf16, computed in "
                     "fp32); auto: bf16 on a GPU that has it and on a CPU that computes it natively and faster than "
                     f"fp32 (AVX512-BF16/AMX, timed); on other CPUs fp32 where the model fits in half the free "
                     f"memory, else {WEIGHT_ONLY}")
    max_length: int = field(DEFAULT_MAX_LENGTH, help="most tokens per sample; longer samples are cut in their "
                                                     "text, never in image tokens, or skipped")
    group_by_length: bool = field(True, help="batch samples of similar length together (less padding)")
    save_every: int = field(200, help="write checkpoint-N/ every this many steps")
    log_every: int = field(10, help="log metrics every this many steps")
    seed: int = field(42, help="seed of the data order, LoRA init and dropout")
    num_workers: int = field(2, help="DataLoader worker processes (image decoding, tokenisation)")
    sample_cache_mb: int = field(0, help="keep up to this many MB of prepared samples (token ids, pixels) in each "
                                         "data process, so that later epochs skip decoding and templating; 0: off")
    device: str | None = device_field()
    num_threads: int | None = field(None, help="CPU threads for the model's kernels (default: torch's, one per "
                                               "core); 1 can be faster for tiny models beside a data worker")
    tensorboard: bool = field(True, help="write TensorBoard event files to RUN_DIR/tensorboard")
    eval_data: str | None = field(None, help="held-out records: data in any format, or a share of DATA held out by "
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
                     "blocked_eager (eager attention in causal query blocks, kernels/attention.py) on a CPU in bf16, else sdpa")
    fused_loss: Literal["auto", "on", "off"] = field(
        "auto", help="Liger's fused linear cross-entropy for the lm_head and the loss (GPU, liger-kernel package); "
                     "auto: where available")
    fused_kernels: Literal["auto", "on", "off"] = field(
        "auto", help="the language model's RMSNorm and SwiGLU as torch.compile-fused kernels (kernels/fused.py; the first "
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

    # The headings of `llava-lora train --help` (the flags keep their names); what no group names is listed first.
    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "LoRA and what trains": ("lora_r", "lora_alpha", "lora_dropout", "lora_target", "train_projector", "init_from"),
        "optimisation": ("learning_rate", "projector_learning_rate", "weight_decay", "lr_scheduler", "warmup_ratio",
                         "max_steps", "num_epochs", "batch_size", "gradient_accumulation_steps", "max_grad_norm",
                         "skip_nonfinite", "gradient_checkpointing", "precision", "max_length", "group_by_length", "seed"),
        "evaluation on held-out records": ("eval_data", "eval_split", "eval_image_dir", "eval_every", "eval_samples",
                                           "eval_max_new_tokens"),
        "checkpoints and logs": ("save_every", "save_total_limit", "save_best", "log_every", "tensorboard"),
        "kernels and devices": ("attn_implementation", "fused_loss", "fused_kernels", "compile", "quantize", "device",
                                "num_threads", "num_workers", "sample_cache_mb"),
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
            (self.max_length > 0, "max_length must be positive"), (self.skip_nonfinite >= 0, "skip_nonfinite >= 0"), (self.num_workers >= 0, "num_workers >= 0"),
            (self.sample_cache_mb >= 0, "sample_cache_mb >= 0"),
            (self.num_threads is None or self.num_threads > 0, "num_threads must be positive"),
            (self.eval_every is None or self.eval_every > 0, "eval_every must be positive"),
            (self.eval_samples >= 0 and self.eval_max_new_tokens > 0, "eval_samples >= 0, eval_max_new_tokens > 0"),
            (self.save_total_limit is None or self.save_total_limit > 0, "save_total_limit must be positive"),
            (not self.save_best or self.eval_data is not None, "--save-best needs --eval-data"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
