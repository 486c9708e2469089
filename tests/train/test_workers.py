"""A data worker that dies (a decoder's segfault, the OOM killer) stops the run naming the record it held, with the
data report written; ``--resume`` skips that record (the failed set is in the checkpoint).

    .venv/bin/pytest tests/train/test_workers.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from fixtures.data import write_good_dataset
from fixtures.models import FAST, Models
from llava_lora import cli
from llava_lora.chat import batches
from llava_lora.train import checkpoints, workers

pytestmark = pytest.mark.slow  # trains a tiny model with a worker process


def test_a_dead_worker_names_its_record_and_resume_skips_it(world: Models, tmp_path: Path, monkeypatch, capsys):
    data = tmp_path / "data"
    write_good_dataset(data, n=15)
    records = json.loads((data / "chat.json").read_text())
    with_image = next(r for r in records if r.get("image"))
    shutil.copy(data / "images_dl" / with_image["image"], data / "images_dl" / "poison.png")
    records.insert(3, {**with_image, "id": "poison", "image": "poison.png"})
    (data / "chat.json").write_text(json.dumps(records))
    real = batches.open_ref

    def decoder_that_crashes(store, ref, *args, **kwargs):
        if Path(ref).name == "poison.png" and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)  # as a segfault in a decoder, or the OOM killer, would
        return real(store, ref, *args, **kwargs)

    monkeypatch.setattr(batches, "open_ref", decoder_that_crashes)
    run = tmp_path / "run"
    args = ["train", "--model", str(world.qwen_model), "--data", str(data), "--out", str(run), *FAST,
            "--num-workers", "1", "--batch-size", "4", "--max-steps", "8", "--save-every", "4", "--precision", "fp32"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "a data worker died at step" in err and "poison (poison.png)" in err
    report = json.loads((run / "data_report.json").read_text())
    assert [s for s in report["samples"] if s["reason"] == "worker_died"][0]["id"] == "poison"
    assert not (run / "adapter_model.safetensors").exists()

    assert cli.main([*args, "--resume"]) == 0  # the poisoned record is never drawn again
    assert (run / "adapter_model.safetensors").is_file()
    state = torch.load(checkpoints.checkpoints(run)[-1][1] / checkpoints.STATE_FILE, weights_only=True)
    assert records.index(next(r for r in records if r["id"] == "poison")) in state["failed"]


def test_a_connection_broken_by_a_dying_worker_is_its_death(monkeypatch):
    """Killed while handing a batch over, a worker breaks its socket before torch names it dead: the broken
    connection waits for torch's own error (which names the pid); any other error is not a death."""
    from torch.utils.data._utils import signal_handling

    checks = []

    def torch_check():
        checks.append(1)
        if len(checks) == 3:  # torch sees the worker dead a moment after its socket closed
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed.")

    monkeypatch.setattr(signal_handling, "_error_if_any_worker_fails", torch_check)
    death = workers.worker_death(ConnectionResetError(104, "Connection reset by peer"))
    assert isinstance(death, RuntimeError) and "pid 4242" in str(death) and len(checks) == 3

    own = RuntimeError("DataLoader worker (pid 7) exited unexpectedly")
    assert workers.worker_death(own) is own
    assert workers.worker_death(ValueError("a bad record")) is None
    assert workers.worker_death(RuntimeError("shape mismatch")) is None

    monkeypatch.setattr(signal_handling, "_error_if_any_worker_fails", lambda: None)  # every worker alive
    monkeypatch.setattr(workers, "DEATH_WAIT_S", 0.1)
    assert workers.worker_death(EOFError()) is None
