"""Batches of records: a record becomes token ids, labels and pixels in a DataLoader worker (``TrainDataset``), and
the collator pads them into a batch; training, its held-out loss and eval's loss read these. The order of
training batches is ``train/sampler.py``'s.

A record that turns out bad here (image unreadable, undecodable or refused by the image processor, answer
empty after tokenisation, too long) becomes a ``Rejected`` that travels with the batch to the training loop,
which reports it and adds its index to the set that ``DropFailed`` keeps out of later batches; the run goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.images import as_store, open_ref
from ..data.records import Record
from ..errors import BadRecord, Rejected
from . import encode


class TrainDataset(torch.utils.data.Dataset):
    """``records[i]`` -> dict(input_ids, labels, pixel_values [n_images, 3, H, W] | None), or a ``Rejected`` (its
    ``index`` is i).

    With ``cache_bytes``, each process keeps the samples it made, up to that many bytes, and serves them again:
    an epoch after the first then skips the image decoding, the image processor and the chat template (~2 ms a
    record of the quickstart's, as much as its training step's compute on a 2-core CPU). Deterministic work only:
    nothing in a sample is drawn at random, so a kept one equals a remade one."""

    def __init__(self, records: list[Record], image_root: Path | list[Path], processor, image_token_id: int,
                 image_tokens: int, max_length: int | None, sources: list[str] | None = None,
                 cache_bytes: int = 0):
        self.records = records
        self.cache: dict[int, dict] = {}
        self.cache_room = cache_bytes
        # one image root (a folder, a zip, a table's or shards' store), or one per record (a mixture); ``sources``
        # names each record's source in its rejection
        self.roots = None
        if isinstance(image_root, list):
            stores: dict[int, object] = {}  # one store per root object: a mixture repeats each source's root
            self.roots = [stores.setdefault(id(r), as_store(r)) for r in image_root]
        self.image_root = None if self.roots is not None else as_store(image_root)
        self.sources = sources
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict | Rejected:
        kept = self.cache.get(i)
        if kept is not None:
            return kept
        item = self._make(i)
        if self.cache_room and not isinstance(item, Rejected):
            size = item["input_ids"].nbytes + item["labels"].nbytes
            size += item["pixel_values"].nbytes if item["pixel_values"] is not None else 0
            if size <= self.cache_room:
                self.cache[i], self.cache_room = item, self.cache_room - size
        return item

    def _make(self, i: int) -> dict | Rejected:
        rec = self.records[i]
        try:
            enc = encode.encode(self.tokenizer, rec, self.image_token_id, self.image_tokens, self.max_length)
            root = self.roots[i] if self.roots is not None else self.image_root
            pixels = torch.stack([self._pixels(root, ref) for ref in rec.images]) if rec.images else None
        except BadRecord as e:
            rejected = e.rejected(rec.id, i)
            return rejected if self.sources is None else rejected.with_source(self.sources[i])
        return {"input_ids": enc.input_ids, "labels": enc.labels, "pixel_values": pixels}

    def _pixels(self, store, ref: str) -> torch.Tensor:
        """[3, H, W] of the image ``ref``; whatever fails, in the file or the processor, is a BadRecord."""
        pixels, why = encode.preprocess_image(self.image_processor, open_ref(store, ref))
        if why is not None:  # the processor's own limits: the record's reason, not the worker's death
            raise BadRecord("preprocess_failed", f"{store.name(ref)}: {why}")
        return pixels[0]


@dataclass
class Collator:
    """Right-pads a list of samples into one batch; rejected records travel alongside.

    Example (batch of 2: one image record of 5 text tokens + 16 image tokens, one text-only record of 7)::

        input_ids      [2, 21] int64   pad_token_id after each sample's end
        attention_mask [2, 21] int64   1 on real tokens
        labels         [2, 21] int64   answer tokens and their end-of-turn; -100 elsewhere (pads included)
        pixel_values   [1, 3, 336, 336] every image of every record, in batch and placeholder order (None if none)
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
        labels = np.full((len(samples), width), encode.IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(samples), width), dtype=np.int64)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = s["input_ids"], s["labels"], 1
        pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]  # each [n_images, 3, H, W]
        return {
            "input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask),
            "pixel_values": torch.cat(pixels) if pixels else None,
            "skipped": skipped, "n_samples": len(samples),
        }
