"""The optimizer and its schedule: AdamW over LoRA and the projector (each its own rate), warm-up then decay, and
``--resume-changed``'s new settings applied to a restored optimizer."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def make_optimizer(peft_model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the LoRA matrices and the projector, each group at its own learning rate."""
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    lora_params = [p for n, p in named if "lora_" in n]
    proj_params = [p for n, p in named if "lora_" not in n]
    groups = [{"params": lora_params, "lr": cfg.learning_rate}] if lora_params else []
    if proj_params:
        groups.append({"params": proj_params, "lr": cfg.projector_learning_rate or cfg.learning_rate})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg: TrainConfig, max_steps: int):
    """The learning-rate schedule: warm-up over ``warmup_ratio`` of the run, then ``lr_scheduler``'s decay."""
    from transformers import get_scheduler

    return get_scheduler(cfg.lr_scheduler if cfg.lr_scheduler != "constant" else "constant_with_warmup", optimizer,
                         num_warmup_steps=math.ceil(cfg.warmup_ratio * max_steps), num_training_steps=max_steps)


def reschedule(optimizer, peft_model, cfg: TrainConfig, max_steps: int, step: int):
    """--resume-changed: ``optimizer`` (its restored moments kept) takes the rates and decay of ``cfg`` (those an
    optimizer built from it would have), and a schedule built from ``cfg``, at ``step``."""
    for group, new in zip(optimizer.param_groups, make_optimizer(peft_model, cfg).param_groups):
        group["lr"] = group["initial_lr"] = new["lr"]
        group["weight_decay"] = new["weight_decay"]
    scheduler = make_scheduler(optimizer, cfg, max_steps)  # LambdaLR (every schedule of get_scheduler here)
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    return scheduler
