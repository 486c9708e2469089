"""The training sampler: every record in every epoch, aligned batches, resumable order.

    .venv/bin/pytest tests/train/test_sampler.py -q
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from llava_lora.train.sampler import ResumableBatchSampler


def _batches(sampler: ResumableBatchSampler, n: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("n, batch, world", [(9, 2, 1), (9, 2, 2), (7, 3, 1), (200, 6, 1), (301, 4, 2), (5, 5, 1)])
def test_every_record_in_every_epoch(n: int, batch: int, world: int, grouped: bool):
    """The issue's case (9 records, batch 2, 3 epochs) among others: each epoch visits every record, on every
    rank's batches together, and each batch is full."""
    lengths = list(np.random.default_rng(0).integers(10, 500, size=n)) if grouped else None
    ranks = [ResumableBatchSampler(n, batch, seed=42, rank=r, world=world, lengths=lengths) for r in range(world)]
    per_epoch = len(ranks[0])
    assert per_epoch == -(-n // (batch * world))
    for epoch in range(3):
        seen = set()
        for r in ranks:
            r.start = epoch * per_epoch
            for b in _batches(r, per_epoch):
                assert len(b) == batch
                seen.update(b)
        assert seen == set(range(n)), f"epoch {epoch} missed {set(range(n)) - seen}"


def test_length_grouping_groups_and_keeps_each_record_once_per_chunk():
    n, batch = 600, 6
    lengths = list(np.random.default_rng(1).integers(10, 1000, size=n))
    sampler = ResumableBatchSampler(n, batch, seed=0, lengths=lengths)
    batches = _batches(sampler, len(sampler))
    assert sorted(i for b in batches for i in b) == list(range(n))  # no wrap needed: each once
    spread = np.mean([np.ptp([lengths[i] for i in b]) for b in batches])
    assert spread < 0.2 * np.ptp(lengths)  # batches of similar lengths


def test_resume_continues_the_same_order():
    lengths = list(range(50))
    whole = _batches(ResumableBatchSampler(50, 4, seed=3, lengths=lengths), 40)
    resumed = _batches(ResumableBatchSampler(50, 4, seed=3, start=17, lengths=lengths), 23)
    assert resumed == whole[17:]


def test_epochs_differ_and_seed_fixes_order():
    a = ResumableBatchSampler(30, 5, seed=1)
    assert a.epoch_order(0).tolist() != a.epoch_order(1).tolist()
    assert a.epoch_order(1).tolist() == ResumableBatchSampler(30, 5, seed=1).epoch_order(1).tolist()
