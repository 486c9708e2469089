"""Runs that would go silently wrong, stopped or told: a NaN/inf loss or gradient norm (the run stops at that step,
naming the last good checkpoint, or with --skip-nonfinite skips it), a resume whose optimisation settings differ
from the run's (refused, or with --resume-changed applied for real), a damaged newest checkpoint (passed over),
a resume of a finished run.

    .venv/bin/pytest tests/train/test_guards.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.models import FAST, Models
from llava_lora import cli
from llava_lora.model.loss import LlavaLoss
from llava_lora.train import checkpoints
from llava_lora.train import loop as train

pytestmark = pytest.mark.slow  # each test trains a tiny model for a few steps


def _train(world: Models, data: Path, out: Path, *extra: str) -> int:
    return cli.main(["train", "--model", str(world.qwen_model), "--data", str(data), "--out", str(out), *FAST,
                     "--batch-size", "4", "--log-every", "1", "--save-every", "2", "--precision", "fp32", *extra])


def _nan_at(monkeypatch, steps: set[int]) -> None:
    """The loss made NaN at the given steps (one forward per step here: no accumulation, no held-out set)."""
    calls = {"n": 0}

    class Poisoned(LlavaLoss):
        def forward(self, *args, **kwargs):
            loss_sum, tokens = super().forward(*args, **kwargs)
            calls["n"] += 1
            return (loss_sum * float("nan") if calls["n"] in steps else loss_sum), tokens

    monkeypatch.setattr(train, "LlavaLoss", Poisoned)


def _finite(folder: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(folder / "adapter_model.safetensors")).values())


def test_a_nan_loss_stops_the_run_at_that_step(world: Models, data: Path, tmp_path: Path, monkeypatch, capsys):
    run = tmp_path / "run"
    _nan_at(monkeypatch, set(range(3, 100)))  # from step 3 on, as a diverging run
    assert _train(world, data, run, "--max-steps", "6") == 1
    err = capsys.readouterr().err
    assert "the run diverged: step 3: the loss is nan" in err
    assert f"The last good checkpoint is {run / 'checkpoint-2'}" in err
    assert not (run / "adapter_model.safetensors").exists()  # no adapter, let alone a NaN one
    assert [s for s, _ in checkpoints.checkpoints(run)] == [2] and _finite(run / "checkpoint-2")
    assert (run / "data_report.json").is_file()


def test_skip_nonfinite_skips_and_reports_each_step(world: Models, data: Path, tmp_path: Path, monkeypatch,
                                                    capsys):
    run = tmp_path / "run"
    _nan_at(monkeypatch, {3, 4})
    assert _train(world, data, run, "--max-steps", "6", "--skip-nonfinite", "2") == 0
    out = capsys.readouterr().out
    assert "step 3: the loss is nan" in out and "(1 of --skip-nonfinite 2)" in out
    assert "step 4: the loss is nan" in out and "(2 of --skip-nonfinite 2)" in out
    assert _finite(run) and _finite(run / "checkpoint-4")


def test_resume_refuses_changed_settings_unless_told_and_then_applies_them(world: Models, data: Path,
                                                                           tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert _train(world, data, run, "--max-steps", "4") == 0
    capsys.readouterr()
    # finished: said so, nothing trained
    assert _train(world, data, run, "--max-steps", "4", "--resume") == 2
    assert "is step 4 and the run has 4 steps: it is finished" in capsys.readouterr().err
    # other settings: listed, refused, RUN_DIR untouched
    before = (run / "config.yaml").read_text()
    assert _train(world, data, run, "--max-steps", "8", "--learning-rate", "0.02", "--lr-scheduler", "constant",
                  "--resume") == 2
    err = capsys.readouterr().err
    assert "max_steps: 4 -> 8" in err and "learning_rate: 0.001 -> 0.02" in err and "lr_scheduler: 'cosine'" in err
    assert "--resume-changed" in err and (run / "config.yaml").read_text() == before
    # the newest checkpoint damaged: passed over, said why; the new settings applied from checkpoint-2 on
    (run / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"")
    assert _train(world, data, run, "--max-steps", "8", "--learning-rate", "0.02", "--lr-scheduler", "constant",
                  "--resume", "--resume-changed") == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint-4: adapter_model.safetensors has 0 bytes" in out and "resuming from checkpoint-2" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows}
    assert [lrs[s] for s in range(3, 9)] == pytest.approx([0.02] * 6)  # the new constant rate, not the old cosine
    meta = json.loads((run / "run.json").read_text())
    assert meta["step"] == 8
    assert meta["resumed_with_changes"]["step"] == 2
    assert meta["resumed_with_changes"]["learning_rate"] == [0.001, 0.02]
    assert meta["resumed_with_changes"]["max_steps"] == [4, 8]
