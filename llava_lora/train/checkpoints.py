"""RUN_DIR's bookkeeping: the run it holds (checked against --resume / --overwrite), its checkpoint-N/ folders
(written whole, pruned, the best one found), and the state a resumed run loads.

    RUN_DIR/config.yaml                 the resolved TrainConfig (RUN_IDENTITY: what a resume must not change)
    RUN_DIR/checkpoint-N/               adapter + run.json + training_state.pt (optimizer, scheduler, RNG)
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import torch

from .. import config as cfglib
from ..errors import UsageError
from ..model.adapters import RUN_FILE, save_adapter
from ..outdirs import new_folder
from .config import TrainConfig

CONFIG_FILE = "config.yaml"
STATE_FILE = "training_state.pt"


# Keys that define a run: resuming with another value would continue a different experiment.
RUN_IDENTITY = ("model", "data", "split", "eval_data", "init_from", "lora_r", "lora_alpha", "lora_target",
                "train_projector", "batch_size", "gradient_accumulation_steps", "seed", "max_length")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (their state file is written last, then the folder renamed into place)."""
    out = []
    for p in run_dir.glob("checkpoint-*"):
        step = p.name.removeprefix("checkpoint-")
        if step.isdigit() and (p / STATE_FILE).is_file():
            out.append((int(step), p))
    return sorted(out)


def prepare_run_dir(cfg: TrainConfig, run_dir: Path, is_main: bool) -> Path | None:
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


def save_checkpoint(run_dir: Path, step: int, peft_model, optimizer_state: dict, scheduler, model_dir: str,
                    meta: dict, adapter_state: dict | None = None) -> Path:
    """checkpoint-N/: adapter + optimizer, scheduler and RNG state, renamed into place when complete; its
    run.json holds ``meta`` (the step, the held-out loss there if one was measured, how the run started).
    ``adapter_state``, ``optimizer_state``: whole, gathered from every process's shards under FSDP."""
    final = run_dir / f"checkpoint-{step}"
    try:
        with new_folder(final, overwrite=True) as tmp:
            save_adapter(peft_model, tmp, model_dir, meta, adapter_state)
            torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                       tmp / STATE_FILE)
    except OSError as e:
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


def load_checkpoint(ckpt: Path, peft_model, scheduler) -> tuple[int, dict]:
    """The adapter weights, schedule and RNG of ``ckpt`` restored; returns (its step, the optimizer state, which is
    restored once the optimizer is prepared: under FSDP each process then takes its shard of it)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(ckpt / "adapter_model.safetensors")
    result = set_peft_model_state_dict(peft_model, weights)
    if getattr(result, "unexpected_keys", None):
        raise UsageError(f"{ckpt}: adapter keys do not fit the model, e.g. {result.unexpected_keys[:2]}")
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), state["optimizer"]
