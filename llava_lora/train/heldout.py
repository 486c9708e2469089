"""Held-out evaluation: the training loss on records a run does not train on, and the answers to a few of them.

    llava-lora train ... --eval-data 0.05 --eval-every 100          # 5% of DATA held out by --seed
    llava-lora train ... --eval-data data/val.json --eval-samples 8  # a file (or a folder with --eval-split)

The loss is ``LlavaLoss``'s (the same masking, the same skips) summed over held-out tokens, so it is the number
``llava-lora eval`` reports for the same records. Under DDP each process takes every W-th record and the sums are
reduced: the figure equals a single process's (under FSDP every process also runs as many forwards and answers
the samples with the main one, as each forward gathers shards from all).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..chat.batches import TrainDataset
from ..data.images import locate_records
from ..data.records import Record, data_kind, load_records, resolve_data
from ..errors import Rejected, UsageError
from ..model.loss import loss_sums
from .distributed import sharded, whole_root


def share(spec: str | None) -> float | None:
    """The fraction that ``--eval-data`` names (``0.05``), or None when it names a path."""
    if spec is None:
        return None
    try:
        value = float(spec)
    except ValueError:
        return None
    if not 0 < value < 1:
        raise UsageError(f"--eval-data {spec}: a share of DATA to hold out must be in (0, 1)")
    return value


def split_off(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(training records, held-out records): ``ceil(fraction * n)`` records drawn by ``seed``, order kept."""
    n_out = math.ceil(fraction * len(records))
    if n_out >= len(records):
        raise UsageError(f"--eval-data {fraction} would hold out all {len(records)} records")
    held = set(np.random.default_rng([seed, 7]).permutation(len(records))[:n_out].tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def heldout_records(spec: str, split: str | None, image_dir: str | None, train_records: list[Record],
                    train_root: Path, seed: int) -> tuple[list[Record], list[Record], Path, list[Rejected]]:
    """(records to train on, held-out records, their image root, the held-out records left out: the file's parse
    errors, images not found). None left is an error: every evaluation would measure nothing (a NaN loss)."""
    fraction = share(spec)
    if fraction is not None:
        train, held = split_off(train_records, fraction, seed)
        root, bad = train_root, []
    else:
        if not Path(spec).exists() and data_kind(spec) == "json":  # shard patterns and hf:// are no path
            raise UsageError(f"--eval-data {spec}: no such file or folder (or give a share, e.g. 0.05)")
        data_file, root = resolve_data(spec, split, image_dir)
        train, (held, bad) = train_records, load_records(data_file)
    held, unlocated = locate_records(held, root)
    bad = bad + unlocated
    if not held:
        first = f" (first: {bad[0].id}: {bad[0].reason}: {bad[0].detail})" if bad else ""
        raise UsageError(f"--eval-data {spec}: no usable held-out record, {len(bad)} left out{first}; every "
                         "evaluation would measure nothing")
    return train, held, root, bad


class HeldOut:
    """Evaluates a training run on held-out records: the loss (every process its share, reduced) and, on the main
    process, greedy answers to the first ``samples`` records beside the base model's (computed once, kept in
    ``RUN_DIR/samples/base.jsonl``)."""

    def __init__(self, records: list[Record], image_root: Path, dataset: TrainDataset, processor, batch_size: int,
                 samples: int, max_new_tokens: int, run_dir: Path):
        self.records, self.image_root, self.dataset, self.processor = records, image_root, dataset, processor
        self.batch_size, self.samples = batch_size, records[:samples]
        self.max_new_tokens = max_new_tokens
        self.samples_dir = run_dir / "samples"
        self.base: dict | None = None  # the base model's answers, once computed

    def loss(self, loss_module, accelerator, sharded: bool = False) -> tuple[float, int, list[Rejected]]:
        """(mean loss per supervised held-out token over every process, tokens, this process's skips). ``sharded``
        (FSDP): a process whose share is a batch short runs one more forward, discarded, as every process must
        gather the same shards as often."""
        rank, world = accelerator.process_index, accelerator.num_processes
        mine = list(range(rank, len(self.dataset), world))
        pad = self.processor.tokenizer.pad_token_id
        total, tokens, skipped = loss_sums(loss_module, self.dataset, mine, self.batch_size, pad,
                                           accelerator.device, accelerator.autocast)
        most = -(-len(range(0, len(self.dataset), world)) // self.batch_size)  # rank 0's share is the largest
        for _ in range(most - -(-len(mine) // self.batch_size) if sharded else 0):
            loss_sums(loss_module, self.dataset, [0], 1, pad, accelerator.device, accelerator.autocast)
        sums = accelerator.reduce(torch.tensor([total, tokens], dtype=torch.float64, device=accelerator.device),
                                  reduction="sum")
        total, tokens = float(sums[0]), int(sums[1])
        return (total / tokens if tokens else float("nan")), tokens, skipped

    def answers(self, peft_model, step: int, write: bool = True) -> Path | None:
        """Write samples/step-N.jsonl: each sample's question, reference, base and fine-tuned answers (under FSDP
        every process answers, in step, and only the main one writes: ``write``)."""
        if not self.samples:
            return None
        import json

        from ..infer.answers import predict
        from ..infer.engine import GenerationSettings

        settings = GenerationSettings(max_new_tokens=self.max_new_tokens)
        base_file = self.samples_dir / "base.jsonl"
        if self.base is None and base_file.is_file():  # a resumed run's
            self.base = {r["id"]: r["base"] for r in map(json.loads, base_file.read_text().splitlines())}
        elif self.base is None:
            preds, _ = predict(peft_model, self.processor, self.samples, self.image_root, settings, self.batch_size,
                               ("base",), progress=False)
            self.base = {p.id: p.answers["base"] for p in preds}
            if write:
                self.samples_dir.mkdir(parents=True, exist_ok=True)
                base_file.write_text("".join(json.dumps({"id": k, "base": v}, ensure_ascii=False) + "\n"
                                             for k, v in self.base.items()))
        base = self.base
        preds, _ = predict(peft_model, self.processor, self.samples, self.image_root, settings, self.batch_size,
                           ("finetuned",), progress=False)
        if not write:
            return None
        out = self.samples_dir / f"step-{step}.jsonl"
        with open(out, "w") as f:
            for p in preds:
                row = {"id": p.id, "question": p.question, "reference": p.reference, "base": base.get(p.id),
                       "finetuned": p.answers["finetuned"]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return out


def evaluate_heldout(heldout: HeldOut, loss_module, accelerator, log, step: int, bar) -> float:
    """Held-out loss (logged as eval_loss) and, on the main process, the samples' answers; dropout off meanwhile."""
    unwrapped = accelerator.unwrap_model(loss_module)  # no DDP forward: no gradient follows
    unwrapped.eval()
    every = sharded(accelerator)  # FSDP: every process answers too, gathering the shards the main one needs
    try:
        loss, tokens, skipped = heldout.loss(unwrapped, accelerator, every)
        log.skipped(skipped, step)
        if accelerator.is_main_process or every:
            # as in training: half-precision frozen weights beside fp32 trained ones; under FSDP the root's own
            # weights (embeddings, projector, lm_head) gathered, as generate does not go through its forward
            with accelerator.autocast(), whole_root(unwrapped, every):
                heldout.answers(unwrapped.peft_model, step, write=accelerator.is_main_process)
        if accelerator.is_main_process:
            log.metrics({"step": step, "eval_loss": loss, "eval_tokens": tokens})
            bar.write(f"step {step}: held-out loss {loss:.4f} over {tokens} tokens")
    finally:
        unwrapped.train()
    accelerator.wait_for_everyone()
    return loss
