"""RUN_DIR's checkpoints and logs: a manifest (sizes and checksums) written last marks a checkpoint complete, a
resume takes the newest that verifies (saying which it skipped and why), a full disk is one message with no
temporary folder left, and a torn last log line is no reason to fail.

    .venv/bin/pytest tests/train/test_checkpoints.py -q
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava_lora.errors import Rejected, RunFailed
from llava_lora.train import checkpoints, runlog


class _Adapter:
    """What save_checkpoint reads of a peft model: its trained parameters, and save_pretrained."""

    def __init__(self):
        self.w = torch.nn.Parameter(torch.ones(256))

    def parameters(self):
        return [self.w]

    def save_pretrained(self, folder: Path, state_dict: dict | None = None) -> None:
        save_file(state_dict or {"w": self.w.detach()}, str(Path(folder) / "adapter_model.safetensors"))


def _save(run: Path, step: int, model_dir: Path) -> Path:
    adapter = _Adapter()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return checkpoints.save_checkpoint(run, step, adapter, opt.state_dict(), sched, str(model_dir), {"step": step})


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    return folder


def test_manifest_marks_complete_and_resume_takes_the_newest_that_verifies(tmp_path: Path, model_dir: Path,
                                                                          capsys):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        _save(run, step, model_dir)
    half = run / "checkpoint-8"  # a folder without its manifest: never complete, never resumed from
    half.mkdir()
    (half / checkpoints.STATE_FILE).write_bytes(b"")
    assert [s for s, _ in checkpoints.checkpoints(run)] == [2, 4, 6]
    assert all(checkpoints.verify(p) is None for _, p in checkpoints.checkpoints(run))

    (run / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"")  # emptied by a crash
    state = run / "checkpoint-4" / checkpoints.STATE_FILE
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF  # one byte flipped: the same size
    state.write_bytes(bytes(data))
    assert checkpoints.newest_sound(run) == run / "checkpoint-2"
    printed = capsys.readouterr().out
    assert "skipping checkpoint-6: adapter_model.safetensors has 0 bytes" in printed
    assert "skipping checkpoint-4: training_state.pt does not match its checksum" in printed


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_full_disk_is_one_message_and_leaves_no_temporary_folder(tmp_path: Path, model_dir: Path,
                                                                    monkeypatch, error: Exception):
    run = tmp_path / "run"
    _save(run, 2, model_dir)

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(RunFailed) as e:
        _save(run, 4, model_dir)
    msg = str(e.value)
    assert msg.startswith(f"cannot write checkpoint-4 in {run}: ") and "\n" not in msg
    assert "a checkpoint takes about 3 KiB" in msg and "free there" in msg
    assert msg.endswith(f"the last complete checkpoint is {run / 'checkpoint-2'}")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2"]  # no .checkpoint-4.* left


def test_a_torn_last_log_line_is_tolerated(tmp_path: Path):
    metrics = tmp_path / runlog.METRICS
    rows = [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in (1, 2)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')  # the run died mid-write
    skips = tmp_path / "skipped.rank0.jsonl"
    skips.write_text(json.dumps({"id": "a", "reason": "missing_image", "detail": "a.jpg", "index": 0, "step": 1})
                     + '\n{"id": "b", "rea')
    assert runlog.plot_loss(tmp_path) == tmp_path / runlog.LOSS_CURVE
    report = runlog.write_data_report(tmp_path, 10, [Rejected("c", "invalid_json")])
    assert report["skipped"] == 2 and report["by_reason"] == {"invalid_json": 1, "missing_image": 1}
    log = runlog.RunLog(tmp_path, rank=0, main=True, tensorboard=False)  # a resumed run appends after it
    log.metrics({"step": 3, "loss": 0.5, "lr": 1e-3})
    log.close()
    assert [r["step"] for r in runlog.read_jsonl(metrics)] == [1, 2, 3]
    assert metrics.read_text().count("\n") == 3
