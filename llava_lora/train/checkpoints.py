"""RUN_DIR's bookkeeping: the run it holds (checked against --resume / --overwrite), its checkpoint-N/ folders
(written whole, pruned, the best one found), and the state a resumed run loads.

    RUN_DIR/config.yaml                 the resolved TrainConfig (RUN_IDENTITY: what a resume must not change;
                                        OPTIMISATION: what only --resume-changed may)
    RUN_DIR/checkpoint-N/               adapter + run.json + training_state.pt (optimizer, scheduler, RNG), and
                                        manifest.json (every file's size and sha256), written last: complete
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import torch

from .. import config as cfglib
from ..errors import RunFailed, UsageError
from ..model.adapters import RUN_FILE, save_adapter
from ..outdirs import check_inputs, check_out, mark, new_folder
from .config import TrainConfig

CONFIG_FILE = "config.yaml"
STATE_FILE = "training_state.pt"
MANIFEST = "manifest.json"  # written last: the checkpoint is complete


# Keys that define a run: resuming with another value would continue a different experiment.
RUN_IDENTITY = ("model", "data", "split", "eval_data", "init_from", "lora_r", "lora_alpha", "lora_target",
                "train_projector", "batch_size", "gradient_accumulation_steps", "seed", "max_length")
# Keys that change the optimisation: a resume with another value is refused unless --resume-changed applies it.
OPTIMISATION = ("learning_rate", "projector_learning_rate", "weight_decay", "lr_scheduler", "warmup_ratio",
                "max_steps", "num_epochs", "max_grad_norm", "precision", "lora_dropout")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints: their manifest is written last, then the folder fsynced and renamed into place (a
    complete one may still be damaged later: ``verify`` reads it back)."""
    out = []
    for p in run_dir.glob("checkpoint-*"):
        step = p.name.removeprefix("checkpoint-")
        if step.isdigit() and (p / MANIFEST).is_file():
            out.append((int(step), p))
    return sorted(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """MANIFEST: every file's size and sha256; written last, it marks the checkpoint complete."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir())
             if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def verify(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (a file missing, of another size or checksum), or None if it verifies."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    for name in (STATE_FILE, "adapter_model.safetensors"):
        if name not in files:
            return f"its manifest lists no {name}"
    for name, want in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def newest_sound(run_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies; each newer one passed over is said, with why."""
    for step, path in reversed(checkpoints(run_dir)):
        why = verify(path)
        if why is None:
            return path
        print(f"--resume: skipping {path.name}: {why}", flush=True)
    return None


def train_inputs(cfg: TrainConfig) -> dict[str, object]:
    """What a run reads, by flag: RUN_DIR may neither be nor hold nor sit inside any of them."""
    data = cfg.data if isinstance(cfg.data, str) else [s.get("path") if isinstance(s, dict) else s for s in cfg.data]
    images = [] if isinstance(cfg.data, str) else [s.get("image_dir") for s in cfg.data if isinstance(s, dict)]
    return {"--model": cfg.model, "--data": data, "--image-dir": [cfg.image_dir, *images],
            "--eval-data": cfg.eval_data, "--eval-image-dir": cfg.eval_image_dir, "--init-from": cfg.init_from}


def prepare_run_dir(cfg: TrainConfig, run_dir: Path) -> tuple[Path | None, dict[str, list]]:
    """Check RUN_DIR against --resume/--overwrite and the run's inputs, deleting nothing (``clear_run_dir`` does,
    once the inputs have loaded); return the checkpoint to resume from (if any) and, with --resume-changed, the
    optimisation settings that differ from the run's ({key: [old, new]})."""
    saved = run_dir / CONFIG_FILE
    occupied = run_dir.is_dir() and any(p.name != "tensorboard" for p in run_dir.iterdir())
    if occupied and not (cfg.resume or cfg.overwrite):
        raise UsageError(f"--out {run_dir} already holds a run (pass --resume to continue it, or --overwrite to "
                         "start over)")
    check_inputs(run_dir, train_inputs(cfg), {}, "--out")
    if cfg.overwrite and occupied:
        check_out(run_dir, True)  # only a folder this tool wrote
        return None, {}
    changes: dict[str, list] = {}
    if cfg.resume and saved.is_file():
        previous = cfglib.load_yaml(saved)
        changed = [k for k in RUN_IDENTITY if str(previous.get(k)) != str(getattr(cfg, k))]
        if changed:
            raise UsageError(f"--resume: {run_dir} holds a different run ({_diffs(previous, cfg, changed)}); use "
                             "another --out or --overwrite")
        changes = {k: [previous.get(k), getattr(cfg, k)] for k in OPTIMISATION
                   if k in previous and str(previous.get(k)) != str(getattr(cfg, k))}
        if changes and not cfg.resume_changed:
            raise UsageError(f"--resume: these settings differ from the run's ({_diffs(previous, cfg, changes)}); "
                             "pass --resume-changed to continue with the new ones (the schedule recomputed), or "
                             "resume with the run's own")
    return (newest_sound(run_dir) if cfg.resume else None), changes


def _diffs(previous: dict, cfg: TrainConfig, keys) -> str:
    return ", ".join(f"{k}: {previous.get(k)!r} -> {getattr(cfg, k)!r}" for k in keys)


def check_not_finished(ckpt: Path, step: int, max_steps: int) -> None:
    """Refuse a resume from a run's last step: there is nothing left to train."""
    if step >= max_steps:
        raise UsageError(f"--resume: {ckpt} is step {step} and the run has {max_steps} steps: it is finished, "
                         "nothing to train (to train on, raise --max-steps and pass --resume-changed)")


def clear_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    """RUN_DIR ready for the run: with --overwrite the old run deleted (checked by ``prepare_run_dir``; called
    once the model and data have loaded), then marked as this tool's."""
    if cfg.overwrite and run_dir.is_dir():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mark(run_dir)


def save_checkpoint(run_dir: Path, step: int, peft_model, optimizer_state: dict, scheduler, model_dir: str,
                    meta: dict, adapter_state: dict | None = None, failed: set[int] | None = None) -> Path:
    """checkpoint-N/: adapter + optimizer, scheduler and RNG state, then its manifest (written last: complete),
    fsynced and renamed into place; its run.json holds ``meta`` (the step, the held-out loss there if one was
    measured, how the run started); ``adapter_state``, ``optimizer_state``: whole, gathered from every process's
    shards under FSDP; ``failed``: the records a worker could not load, never drawn again after a resume. A write
    that fails (a full disk) leaves no temporary folder and stops the run with one message naming the folder and
    the space a checkpoint takes."""
    final = run_dir / f"checkpoint-{step}"
    try:
        with new_folder(final, overwrite=True, owned=True) as tmp:
            save_adapter(peft_model, tmp, model_dir, meta, adapter_state)
            torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                        "failed": sorted(failed or ())},
                       tmp / STATE_FILE)
            write_manifest(tmp)
    except Exception as e:  # a full disk: OSError, torch's RuntimeError, safetensors' SafetensorError
        done = checkpoints(run_dir)
        keep = f"; the last complete checkpoint is {done[-1][1]}" if done else ""
        why = (e.strerror if isinstance(e, OSError) else None) or str(e).splitlines()[0] or type(e).__name__
        raise RunFailed(f"cannot write checkpoint-{step} in {run_dir}: {why}; a checkpoint takes about "
                        f"{_mb(checkpoint_bytes(peft_model))} and {_mb(shutil.disk_usage(run_dir).free)} are free "
                        f"there{keep}") from None
    return final


def checkpoint_bytes(peft_model) -> int:
    """What a checkpoint takes: the trained weights, and AdamW's two moments of each (all fp32)."""
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad) * 4 * 3


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


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


def load_checkpoint(ckpt: Path, peft_model, scheduler, failed: set[int] | None = None) -> tuple[int, dict]:
    """The adapter weights, schedule and RNG of ``ckpt`` restored (``failed`` gets the records it holds as failed);
    returns (its step, the optimizer state, which is restored once the optimizer is prepared: under FSDP each
    process then takes its shard of it)."""
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
    if failed is not None:
        failed.update(int(i) for i in state.get("failed", []))
    return int(state["step"]), state["optimizer"]
