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
RMSNorm and SwiGLU kernels (kernels/fused.py, ``--fused-kernels``), and in bf16 blocked eager attention
(kernels/attention.py).

This file is the run itself (``TrainingRun``: setup phases, the step, the loop, saving). Beside it: its config
(config.py), RUN_DIR's checkpoints (checkpoints.py), the optimizer and schedule (optim.py), the fast-path options resolved at start (runtime.py), the
batch order (sampler.py), held-out evaluation (heldout.py), the guard against learning nothing (watch.py) and the
logs (runlog.py).
"""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path

import torch

from .. import config as cfglib
from ..chat.batches import Collator, TrainDataset
from ..chat.encode import IGNORE_INDEX, image_tokens_per_image
from ..data.images import locate_records
from ..data.records import duplicate_ids, load_records, resolve_data
from ..data.sources import is_mixture, load_mixture, parse_sources
from ..errors import RunFailed, UsageError
from ..kernels import lora as fused_lora
from ..kernels import weight_only
from ..kernels.fused import fuse
from ..model.adapters import apply_lora, init_from, lora_inputs_in_compute_dtype, save_adapter, wrapped_modules
from ..model.load import load_for_training
from ..model.loss import LlavaLoss
from ..model.parts import format_param_stats, param_stats
from ..model.precision import (WEIGHT_ONLY, autocast_precision, default_device, dtype_name, frozen_dtype,
                               train_precision)
from .checkpoints import (CONFIG_FILE, best_checkpoint, check_not_finished, checkpoints, clear_run_dir,
                          load_checkpoint, prepare_run_dir, prune_checkpoints, save_checkpoint)
from .config import TrainConfig
from .heldout import HeldOut, evaluate_heldout, heldout_records
from .heldout import share as heldout_share
from .optim import make_optimizer, make_scheduler, reschedule
from .runlog import RunLog, Throughput, plot_loss, write_data_report
from .distributed import describe, make_accelerator, optimizer_state, restore_optimizer, sharded, trained_state
from .runtime import (check_compile, check_quantize, fused_summary, keep_cpu_heap, resolve_attn_implementation,
                      resolve_fused_kernels, resolve_fused_loss)
from .sampler import DropFailed, ResumableBatchSampler, estimated_lengths
from .watch import NOTHING_LEARNED_AFTER, FiniteWatch, SupervisionWatch
from .workers import WatchedDataset, died_on, stop_for_dead_worker, worker_death


def _model_inputs(mb: dict, device) -> dict:
    """The batch on ``device``. A right-padded batch goes without its attention mask: under causal attention no
    real token sees a pad that follows it, so the mask changes nothing the loss reads, while without one the
    attention kernels take their causal path (no [B, 1, T, T] mask built, blocks above the diagonal skipped)."""
    mask = mb["attention_mask"]
    right_padded = not bool((mask[:, 1:] > mask[:, :-1]).any())  # no pad before a real token, on the CPU batch
    out = {k: mb[k].to(device) if mb[k] is not None else None for k in ("input_ids", "labels", "pixel_values")}
    out["attention_mask"] = None if right_padded else mask.to(device)
    return out


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``--max-steps``, else as many as ``--num-epochs`` passes take."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_epochs * steps_per_epoch / cfg.gradient_accumulation_steps))


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


class TrainingRun:
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
        self._setup_run_dir()
        self._setup_loader()
        self._setup_optimizer()
        self._report()

    def _setup_runtime(self) -> None:
        """Device, precision and the fast-path options, refused here (before RUN_DIR is touched or a model loaded)
        where they cannot apply; the accelerator; the checkpoint to resume from."""
        cfg = self.cfg
        self.device = cfg.device or default_device()
        self.precision, self.precision_why = train_precision(cfg.precision, self.device, cfg.model)
        check_quantize(cfg.quantize, self.device)
        check_compile(cfg.compile, self.device)
        self.attn_implementation = resolve_attn_implementation(cfg.attn_implementation, self.device, cfg.model,
                                                               self.precision)
        self.fused_loss = resolve_fused_loss(cfg.fused_loss, self.device)
        self.fused_kernels = resolve_fused_kernels(cfg.fused_kernels, self.device, cfg.compile)
        self.accelerator = make_accelerator(self.device, autocast_precision(self.precision))
        acc = self.accelerator
        self.is_main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        self.resume_from, self.resume_changes = prepare_run_dir(cfg, self.run_dir)  # checked; nothing deleted yet

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
            self.parse_errors = self.parse_errors + held_errors
        if len(self.records) < cfg.batch_size * self.world:
            raise UsageError(f"{self.data_file}: {len(self.records)} usable records, fewer than one batch of "
                             f"{cfg.batch_size * self.world}")

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
        if self.device == "cpu" and self.precision != WEIGHT_ONLY:  # bf16-weights: memory is what is short there
            keep_cpu_heap()  # (with it there, real size at batch 1: RSS 12.08 -> 12.39 GB, steps no faster)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        model, self.processor = load_for_training(cfg, self.device, self.precision, self.attn_implementation,
                                            self.accelerator.local_process_index)
        self.fused = fuse(model.model.language_model) if self.fused_kernels else {}
        self.peft_model = wrap_for_training(model, cfg)
        if self.precision == WEIGHT_ONLY:
            weight_only.apply(self.peft_model)
        self.fused_lora = 0
        if autocast_precision(self.precision) == "no":  # fp32 compute: LoRA's update added by one addmm
            self.fused_lora = fused_lora.apply(self.peft_model)
        else:
            lora_inputs_in_compute_dtype(self.peft_model)
        self.trainable = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.run_meta = {"lora_r": cfg.lora_r,
                         "init_from": str(Path(cfg.init_from).resolve()) if cfg.init_from else None}
        if cfg.init_from:
            loaded = init_from(self.peft_model, cfg.init_from, cfg.model)
            if self.is_main:
                print(f"starting from {cfg.init_from}: {loaded['projector']} projector and {loaded['lora']} LoRA "
                      "tensors")
        if cfg.compile:  # in place, so parameter names (and so checkpoints) stay those of the plain model
            # dynamic: every batch has its own padded length; the default (static first, dynamic on the second
            # shape) compiles twice. AOTAutograd recomputes the fused element-wise ops (norms, SiLU, RoPE) in the
            # backward instead of saving their outputs.
            model.model.language_model.compile(dynamic=True)
        self.model = model

    def _setup_run_dir(self) -> None:
        """RUN_DIR once the data and the model have loaded (so a typo in an input deletes nothing): the old run
        deleted with --overwrite, the resolved config saved."""
        if self.is_main:
            clear_run_dir(self.cfg, self.run_dir)
            cfglib.save(self.cfg, self.run_dir / CONFIG_FILE)
        self.accelerator.wait_for_everyone()

    def _setup_loader(self) -> None:
        """Datasets, the resumable sampler, the DataLoader, and the run's length in steps."""
        cfg, config = self.cfg, self.model.config
        image_tokens = image_tokens_per_image(config)
        dataset = TrainDataset(self.records, self.image_root, self.processor, config.image_token_id, image_tokens,
                               cfg.max_length, self.sources, cache_bytes=cfg.sample_cache_mb << 20)
        self.heldout = None
        if self.held is not None:
            held_dataset = TrainDataset(self.held, self.held_root, self.processor, config.image_token_id,
                                        image_tokens, cfg.max_length)
            self.heldout = HeldOut(self.held, self.held_root, held_dataset, self.processor, cfg.batch_size,
                                   cfg.eval_samples, cfg.eval_max_new_tokens, self.run_dir)
        lengths = estimated_lengths(self.records, image_tokens) if cfg.group_by_length else None
        self.sampler = ResumableBatchSampler(len(self.records), cfg.batch_size, cfg.seed, rank=self.rank,
                                             world=self.world, lengths=lengths)
        self.max_steps = total_steps(cfg, len(self.sampler))
        self.failed = died_on(self.run_dir) if cfg.resume else set()  # records a worker could not load, never drawn
        self.watched = WatchedDataset(dataset, cfg.num_workers)  # which record each worker holds, should it die
        self.loader = torch.utils.data.DataLoader(
            self.watched, batch_sampler=DropFailed(self.sampler, self.failed),
            collate_fn=Collator(self.processor.tokenizer.pad_token_id),
            num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
            prefetch_factor=4 if cfg.num_workers > 0 else None, pin_memory=self.device == "cuda",
            # its own generator: creating the iterator must not draw from the global RNG that dropout uses,
            # or a resumed run's dropout masks would be shifted by one draw
            generator=torch.Generator().manual_seed(cfg.seed))

    def _setup_optimizer(self) -> None:
        """AdamW over LoRA and projector (each its own rate), the schedule, the resumed state (with
        --resume-changed the new settings applied to it), and the loss module prepared for the accelerator."""
        cfg = self.cfg
        optimizer = make_optimizer(self.peft_model, cfg)
        self.scheduler = make_scheduler(optimizer, cfg, self.max_steps)
        self.start_step, optimizer_state = (load_checkpoint(self.resume_from, self.peft_model, self.scheduler,
                                                            self.failed) if self.resume_from else (0, None))
        if self.resume_from:
            check_not_finished(self.resume_from, self.start_step, self.max_steps)
        self.sampler.start = self.start_step * cfg.gradient_accumulation_steps
        self.finite = FiniteWatch(cfg.skip_nonfinite)
        self.loss_module, self.optimizer = self.accelerator.prepare(
            LlavaLoss(self.peft_model, self.fused_loss, vision_every_step=self.world > 1), optimizer)
        if optimizer_state is not None:
            restore_optimizer(self.accelerator, self.loss_module, self.optimizer, optimizer_state)
            if self.resume_changes:  # applied for real: the rates and decay, the schedule recomputed from here
                self.scheduler = reschedule(optimizer, self.peft_model, cfg, self.max_steps, self.start_step)
                self.run_meta["resumed_with_changes"] = {"step": self.start_step, **self.resume_changes}
        # FSDP2 replaced each parameter by its shard: what clipping and the zero-loss guard see
        self.trainable = [p for p in self.loss_module.parameters() if p.requires_grad]
        self.image_params = [p for n, p in self.loss_module.named_parameters()
                             if p.requires_grad and ("multi_modal_projector" in n or "vision_tower" in n)]

    def _report(self) -> None:
        if not self.is_main:
            return
        cfg, accum = self.cfg, self.cfg.gradient_accumulation_steps
        print(f"training {cfg.model} on {self.data_file} ({len(self.records)} records, {len(self.parse_errors)} "
              f"rejected) -> {self.run_dir}")
        frozen = dtype_name(frozen_dtype(self.precision))
        compute = "float32" if autocast_precision(self.precision) == "no" else frozen
        print(f"precision {self.precision} on {self.device} ({self.precision_why}): frozen weights in {frozen}, "
              f"computed in {compute}; trained ones (LoRA, projector) in float32")
        print(f"processes: {describe(self.accelerator)}")
        print(f"device {self.device} x{self.world}, precision {self.precision}, attention {self.attn_implementation}, "
              f"fused loss {'on' if self.fused_loss else 'off'}, fused kernels {fused_summary(self.fused)}, "
              f"compile {'on' if cfg.compile else 'off'}, quantize "
              f"{cfg.quantize}; "
              + (f"LoRA r={cfg.lora_r} on {len(wrapped_modules(self.peft_model))} modules"
                 f"{' (each update one addmm)' if self.fused_lora else ''}; " if cfg.lora_r else
                 "no LoRA (the projector alone); ")
              + (f"resuming from {self.resume_from.name}" if self.resume_from else "starting fresh"))
        print(f"{self.max_steps} steps of {cfg.batch_size * self.world * accum} samples: "
              f"{self.max_steps * accum / len(self.sampler):.2f} epochs of {len(self.sampler)} micro-steps")
        print(format_param_stats(param_stats(self.peft_model)))

    # ----------------------------------------------------------------------------------------------------- step
    def train_step(self, micro: list[dict], global_supervised: torch.Tensor, meter: Throughput, step: int = 0
                   ) -> float:
        """Forward and backward over the micro-batches of one optimizer step, then the update (none where the loss
        or gradient norm is not finite: ``FiniteWatch``); returns the mean loss per supervised token over the whole
        global batch."""
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
        images = sum(mb.get("pixel_values") is not None for mb in micro)
        if world > 1 and not int(acc.reduce(torch.tensor(images, device=acc.device), reduction="sum")):
            for p in self.image_params:  # no image in the global batch: no step for them, as on one process
                p.grad = None  # (the blank image gave them zeros, which AdamW would step on with its momentum)
        self.grad_norm = acc.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        mean_loss = float(acc.reduce(step_loss, reduction="sum") / global_supervised)
        if self.finite.allows_update(step, mean_loss, float(self.grad_norm), self._last_good):  # NaN/inf: no update
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss

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
        self.last_saved = self.drawn = self.start_step
        eval_every = cfg.eval_every or cfg.save_every
        batches = iter(self.loader)
        bar = tqdm(total=max_steps, initial=self.start_step, disable=not self.is_main, desc="train",
                   dynamic_ncols=True)
        meter = Throughput()
        self.loss_module.train()
        try:
            for step in range(self.start_step + 1, max_steps + 1):
                micro = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
                self.drawn = step  # a worker dying before this leaves the weights those after step - 1
                meter.loss += self.train_step(micro, self._supervised(micro, step), meter, step)
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
                    heldout_loss = evaluate_heldout(self.heldout, self.loss_module, self.accelerator, self.log,
                                                    step, bar)
                if save_now:
                    self.save_checkpoint(step, heldout_loss)
        except (RuntimeError, ConnectionError, EOFError) as e:  # a dead data worker, wherever the main process is
            raise (stop_for_dead_worker(self, death) if (death := worker_death(e)) else e) from None
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
        adapter_state = self._adapter_state()  # every process: under FSDP each gives its shards
        opt_state = optimizer_state(self.accelerator, self.loss_module, self.optimizer)
        if self.is_main:
            meta = {**self.run_meta, "step": step}
            if heldout_loss is not None:
                meta["heldout_loss"] = heldout_loss
            save_checkpoint(self.run_dir, step, self._peft(), opt_state, self.scheduler, self.cfg.model, meta,
                            adapter_state, self.failed)
            if self.cfg.save_total_limit:
                prune_checkpoints(self.run_dir, self.cfg.save_total_limit, self.cfg.save_best)
            plot_loss(self.run_dir)
        self.last_saved = step

    def _last_good(self) -> str:
        done = checkpoints(self.run_dir)
        return str(done[-1][1]) if done else "none (no checkpoint written yet)"

    def _peft(self):
        return self.accelerator.unwrap_model(self.loss_module).peft_model

    def _adapter_state(self) -> dict | None:
        """The trained weights gathered whole where the model holds shards (FSDP), else None (the model's own)."""
        return trained_state(self.accelerator, self.loss_module, self._peft()) if sharded(self.accelerator) else None

    def finish(self) -> None:
        """The final adapter in RUN_DIR (naming the best checkpoint with --save-best), the data report, the curve."""
        self.accelerator.wait_for_everyone()
        adapter_state = self._adapter_state()
        if self.is_main:
            best = best_checkpoint(self.run_dir) if self.cfg.save_best else None
            meta = {**self.run_meta, "step": self.last_saved}
            if best is not None:
                meta.update(best_checkpoint=best[0].name, best_heldout_loss=best[1])
            save_adapter(self._peft(), self.run_dir, self.cfg.model, meta, adapter_state)
            report = write_data_report(self.run_dir, self.n_records, self.parse_errors, duplicate_ids(self.records))
            curve = plot_loss(self.run_dir)
            print(f"adapter written to {self.run_dir} (step {self.last_saved}); loss curve {curve}; "
                  f"{report['skipped']} records skipped, see {self.run_dir / 'data_report.json'}")
            if best is not None:
                print(f"best checkpoint: {best[0]} (held-out loss {best[1]:.4f})")
        self.accelerator.end_training()


def main(cfg: TrainConfig) -> int:
    run = TrainingRun(cfg)
    run.setup()
    run.train()
    run.finish()
    return 0


def _empty_batch(pad_token_id: int) -> dict:
    ids = torch.full((1, 2), pad_token_id, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, IGNORE_INDEX),
            "pixel_values": None, "n_samples": 0, "skipped": []}

