"""Data workers that die (a decoder's segfault, the OOM killer): which record each held, so that the run stops
naming them, with the data report written, and a resumed run skips them (the failed set is in the checkpoint).

    dataset = WatchedDataset(TrainDataset(...), num_workers)   # each worker notes the record it is loading
    except (RuntimeError, ConnectionError, EOFError) as e:
        if death := worker_death(e): raise stop_for_dead_worker(run, death)
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from ..errors import Rejected, RunFailed
from .checkpoints import save_checkpoint
from .runlog import read_jsonl, write_data_report


class WatchedDataset(torch.utils.data.Dataset):
    """``dataset`` whose workers note, in shared memory, the record each is loading (pid, index; -1: none)."""

    def __init__(self, dataset, num_workers: int):
        self.dataset = dataset
        self.held = torch.full((max(num_workers, 1), 2), -1, dtype=torch.long).share_memory_()  # [worker, 2]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        info = torch.utils.data.get_worker_info()
        if info is None:  # loaded in the main process: a crash there is the run's own
            return self.dataset[i]
        slot = self.held[info.id]
        slot[0], slot[1] = os.getpid(), i
        item = self.dataset[i]
        slot[1] = -1
        return item

    def held_by_dead(self, error: BaseException) -> list[int]:
        """The record(s) the worker named in ``error`` held when it died (those of every busy worker if it names
        none)."""
        named = re.search(r"pid\(?s?\)?\s*([\d, ]+)", str(error))  # "(pid 12)", "(pid(s) 12, 13)"
        pids = {int(p) for p in re.findall(r"\d+", named.group(1))} if named else set()
        busy = [(int(pid), int(i)) for pid, i in self.held.tolist() if i >= 0]
        return sorted({i for pid, i in busy if pid in pids} or {i for _, i in busy})


def died_on(run_dir: Path) -> set[int]:
    """The records a data worker died on in RUN_DIR's earlier runs (their skip logs): a resume never draws them,
    whether or not a checkpoint was written after."""
    return {int(r["index"]) for log in sorted(run_dir.glob("skipped.rank*.jsonl")) for r in read_jsonl(log)
            if r.get("reason") == "worker_died"}


def is_worker_death(error: BaseException) -> bool:
    """Whether ``error`` is torch's DataLoader saying one of its worker processes died."""
    return isinstance(error, RuntimeError) and "DataLoader worker" in str(error)


# How long a broken connection waits for torch to see the worker behind it dead (it exits as its socket closes).
DEATH_WAIT_S = 2.0


def worker_death(error: BaseException) -> RuntimeError | None:
    """torch's "DataLoader worker (pid N) is killed" error behind ``error``, or None.

    Why: a worker killed while handing a batch over (its tensors go by file descriptor over a socket) breaks that
    connection first, so the main process gets a ConnectionResetError or EOFError, not torch's error; torch's own
    check (SIGCHLD's handler, which may run at any later point) names the worker a moment after."""
    if is_worker_death(error):
        return error
    if not isinstance(error, (ConnectionError, EOFError)):
        return None
    from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails

    deadline = time.monotonic() + DEATH_WAIT_S
    try:
        while time.monotonic() < deadline:
            _error_if_any_worker_fails()  # raises torch's error once the worker is seen dead
            time.sleep(0.02)
    except RuntimeError as death:  # from the check, or from SIGCHLD's handler running it meanwhile
        return death if is_worker_death(death) else None
    return None


def stop_for_dead_worker(run, error: BaseException) -> RunFailed:
    """What a dead worker means for ``run`` (a TrainingRun): its record(s) reported (reason ``worker_died``) in the
    data report and added to the failed set, a checkpoint of the last step done written holding that set (one
    process, no step half done: torch raises the death wherever the main process is), and the RunFailed to raise."""
    done = run.scheduler.last_epoch  # steps whose update is complete
    step = done + 1
    held = run.watched.held_by_dead(error)
    run.failed.update(held)
    why = str(error).splitlines()[0]
    run.log.skipped([Rejected(run.records[i].id, "worker_died", f"{run.records[i].image or 'no image'}: {why}", i)
                     for i in held], step)
    names = ", ".join(f"{run.records[i].id} ({run.records[i].image or 'no image'})" for i in held) or "unknown"
    saved = ""
    if run.world == 1 and run.drawn == done:  # no step half done: the weights are those after step `done`
        save_checkpoint(run.run_dir, done, run._peft(), run.optimizer.state_dict(), run.scheduler, run.cfg.model,
                        {**run.run_meta, "step": done}, failed=run.failed)
        saved = f" from checkpoint-{done}, which holds them as failed,"
    if run.is_main:
        write_data_report(run.run_dir, run.n_records, run.parse_errors)
    return RunFailed(f"a data worker died at step {step} ({why}) while loading record(s) {names}; they are in "
                     f"{run.run_dir / 'data_report.json'}, and --resume continues{saved} without them")
