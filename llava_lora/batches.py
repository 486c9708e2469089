"""Training batches: a record becomes token ids, labels and pixels in a DataLoader worker, the collator pads them
into a batch, and the resumable sampler orders them (every record in every epoch).

A record that turns out bad here (image unreadable, undecodable or refused by the image processor, answer
empty after tokenisation, too long) becomes a ``Rejected`` that travels with the batch to the training loop,
which reports it and adds its index to the set that ``DropFailed`` keeps out of later batches; the run goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import prompts
from .data.images import open_image, resolve_image
from .data.records import Record
from .errors import BadRecord, Rejected


class TrainDataset(torch.utils.data.Dataset):
    """``records[i]`` -> dict(input_ids, labels, pixel_values | None), or a ``Rejected`` (its ``index`` is i)."""

    def __init__(self, records: list[Record], image_root: Path | list[Path], processor, image_token_id: int,
                 image_tokens: int, max_length: int | None, sources: list[str] | None = None):
        self.records = records
        # one image root, or one per record (a mixture); ``sources`` names each record's source in its rejection
        self.roots = image_root if isinstance(image_root, list) else None
        self.image_root = None if self.roots is not None else Path(image_root)
        self.sources = sources
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict | Rejected:
        rec = self.records[i]
        try:
            enc = prompts.encode(self.tokenizer, rec, self.image_token_id, self.image_tokens, self.max_length)
            root = self.roots[i] if self.roots is not None else self.image_root
            pixels = None if rec.image is None else self._pixels(root, rec.image)
        except BadRecord as e:
            rejected = e.rejected(rec.id, i)
            return rejected if self.sources is None else rejected.with_source(self.sources[i])
        return {"input_ids": enc.input_ids, "labels": enc.labels, "pixel_values": pixels}

    def _pixels(self, root: Path, rel: str) -> torch.Tensor:
        """[3, H, W] of the image ``rel``; whatever fails, in the file or the processor, is a BadRecord."""
        image = open_image(resolve_image(root, rel))
        try:
            return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        except Exception as e:  # the processor's own limits: the record's reason, not the worker's death
            raise BadRecord("preprocess_failed", f"{rel}: {type(e).__name__}: {e}") from None


@dataclass
class Collator:
    """Right-pads a list of samples into one batch; rejected records travel alongside.

    Example (batch of 2: one image record of 5 text tokens + 16 image tokens, one text-only record of 7)::

        input_ids      [2, 21] int64   pad_token_id after each sample's end
        attention_mask [2, 21] int64   1 on real tokens
        labels         [2, 21] int64   answer tokens and their end-of-turn; -100 elsewhere (pads included)
        pixel_values   [1, 3, 336, 336] one image per record that has one, in batch order (None if none)
        skipped        [Rejected("GCC_train_1", "truncated_image", "...", 7)]
    """

    pad_token_id: int

    def __call__(self, items: list[dict | Rejected]) -> dict:
        samples = [x for x in items if not isinstance(x, Rejected)]
        skipped = [x for x in items if isinstance(x, Rejected)]
        if not samples:
            return {"input_ids": None, "skipped": skipped, "n_samples": 0}
        width = max(len(s["input_ids"]) for s in samples)
        ids = np.full((len(samples), width), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(samples), width), prompts.IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(samples), width), dtype=np.int64)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = s["input_ids"], s["labels"], 1
        pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        return {
            "input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask),
            "pixel_values": torch.stack(pixels) if pixels else None,
            "skipped": skipped, "n_samples": len(samples),
        }


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Index batches for one process, from micro-step ``start`` on, forever (a new permutation per epoch).

    Every record is drawn in every epoch: an epoch's permutation is filled up to whole global batches by
    wrapping around to its start (as torch's ``DistributedSampler`` pads), so an epoch is
    ``ceil(n / (B * W))`` micro-steps. The global order is fixed by the seed alone; micro-step k takes positions
    [k*B*W, (k+1)*B*W) of it and rank r the r-th slice of B, so a resumed run sees exactly the batches the
    interrupted one would have. With ``lengths``, each chunk of 50 global batches is sorted by length before
    being cut into global batches (less padding), and the batches of a chunk are shuffled again.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1,
                 lengths: list[int] | None = None):
        if n == 0:
            raise ValueError("no records to sample from")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world = rank, world
        self.lengths = np.asarray(lengths) if lengths is not None else None

    @property
    def group(self) -> int:
        return self.batch_size * self.world

    def __len__(self) -> int:
        """Micro-steps per epoch."""
        return -(-self.n // self.group)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of one epoch: ``len(self) * B * W`` indices, each record at least once."""
        g = np.random.default_rng([self.seed, epoch])
        order = g.permutation(self.n)
        order = np.resize(order, len(self) * self.group)  # the ragged tail wraps around to the epoch's start
        if self.lengths is None:
            return order
        chunk = self.group * 50
        out = []
        for c in range(0, len(order), chunk):  # every chunk holds whole global batches: batches stay aligned
            part = order[c:c + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches = [part[b:b + self.group] for b in range(0, len(part), self.group)]
            out.extend(batches[j] for j in g.permutation(len(batches)))
        return np.concatenate(out)

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = len(self)
        step = self.start
        while True:
            epoch, k = divmod(step, per_epoch)
            order = self.epoch_order(epoch)
            while k < per_epoch:
                lo = k * self.group + self.rank * self.batch_size
                yield order[lo:lo + self.batch_size].tolist()
                k += 1
                step += 1


class DropFailed(torch.utils.data.Sampler):
    """The batches of ``batch_sampler`` without the indices in ``failed``, a set the training loop fills (in the
    main process, where the DataLoader draws batches) with each record a worker could not load.

    A failed record is reported once and not drawn again: its batch of a later epoch is one sample smaller (or
    empty, which the loop treats as a batch of skips, keeping DDP processes in step). Batches the DataLoader
    had already prefetched when the failure came back may still hold it; their skip is not reported twice.
    """

    def __init__(self, batch_sampler, failed: set[int]):
        self.batch_sampler, self.failed = batch_sampler, failed

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            yield [i for i in batch if i not in self.failed] if self.failed else batch

    def __len__(self) -> int:
        return len(self.batch_sampler)
