"""The order of training batches: every record in every epoch, resumable at any micro-step, the same under DDP;
records a worker could not load kept out of later batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..data.records import text_pieces


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


def estimated_lengths(records, image_tokens: int) -> list[int]:
    """Token counts guessed from characters (~3.5 per token): enough to group by length, and free."""
    return [image_tokens * len(r.images)
            + (sum(len(p) for t in r.turns for p in text_pieces(t.text)) + len(r.system or "")) * 2 // 7
            for r in records]


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
