"""Held-out evaluation during training and the checkpoints it keeps.

    .venv/bin/pytest tests/train/test_heldout.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fixtures.models import FAST, Models
from fixtures.data import write_good_dataset
from llava_lora import cli
from llava_lora.train import checkpoints
from llava_lora.model.adapters import RUN_FILE
from llava_lora.data.records import Record, Turn
from llava_lora.train.heldout import split_off


@pytest.fixture(scope="module")
def held(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("held")
    write_good_dataset(root, n=6, seed=1)
    return root / "chat.json"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(world: Models, data: Path, out: Path, *extra: str) -> int:
    return cli.main(["train", "--model", str(world.qwen_model), "--data", str(data), "--out", str(out), *FAST,
                     "--batch-size", "4", "--lora-dropout", "0", *extra])


# ----------------------------------------------------------------------------------------------------------
# splitting and pruning (no model)
# ----------------------------------------------------------------------------------------------------------

def _records(n: int) -> list[Record]:
    return [Record(id=f"r{i}", images=(), turns=(Turn("user", "q"), Turn("assistant", "a")))
            for i in range(n)]


def test_share_held_out_by_seed():
    records = _records(40)
    train_a, held_a = split_off(records, 0.1, seed=3)
    train_b, held_b = split_off(records, 0.1, seed=3)
    assert [r.id for r in held_a] == [r.id for r in held_b] and len(held_a) == 4
    assert {r.id for r in train_a} | {r.id for r in held_a} == {r.id for r in records}
    assert not {r.id for r in train_a} & {r.id for r in held_a}
    assert [r.id for r in split_off(records, 0.1, seed=4)[1]] != [r.id for r in held_a]


def _fake_checkpoint(run: Path, step: int, loss: float | None, complete: bool = True) -> Path:
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / RUN_FILE).write_text(json.dumps({"step": step} if loss is None else {"step": step, "heldout_loss": loss}))
    if complete:
        (path / checkpoints.STATE_FILE).write_bytes(b"")
        checkpoints.write_manifest(path)
    return path


def test_prune_keeps_newest_best_and_incomplete(tmp_path: Path):
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.2}
    for step, loss in losses.items():
        _fake_checkpoint(tmp_path, step, loss)
    writing = _fake_checkpoint(tmp_path, 6, None, complete=False)  # a resume cannot use it: not ours to delete
    assert checkpoints.best_checkpoint(tmp_path) == (tmp_path / "checkpoint-2", 1.0)
    gone = checkpoints.prune_checkpoints(tmp_path, limit=2, keep_best=True)
    assert sorted(p.name for p in gone) == ["checkpoint-1", "checkpoint-3"]
    assert [s for s, _ in checkpoints.checkpoints(tmp_path)] == [2, 4, 5] and writing.is_dir()
    checkpoints.prune_checkpoints(tmp_path, limit=1, keep_best=False)
    assert [s for s, _ in checkpoints.checkpoints(tmp_path)] == [5]  # the newest: what a resume needs


def test_a_heldout_set_with_no_usable_record_is_an_error_at_start(world: Models, data: Path, tmp_path: Path,
                                                                   capsys):
    held = tmp_path / "held"
    held.mkdir()
    qa = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    # every image missing: each evaluation would be a NaN loss over nothing
    (held / "chat.json").write_text(json.dumps([{"id": f"h{k}", "image": f"gone{k}.png", "conversations": qa}
                                                for k in range(3)]))
    run = tmp_path / "run"
    assert _train(world, data, run, "--max-steps", "2", "--eval-data", str(held / "chat.json")) == 2
    err = capsys.readouterr().err
    assert f"--eval-data {held / 'chat.json'}: no usable held-out record" in err and "missing_image" in err
    assert not run.exists()


# ----------------------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_heldout_loss_equals_eval_loss_and_samples_written(world: Models, data: Path, held: Path, tmp_path: Path,
                                                          capsys):
    run = tmp_path / "run"
    # fp32, as eval --dtype float32 below: the same numbers in the same precision
    assert _train(world, data, run, "--max-steps", "4", "--save-every", "4", "--eval-data", str(held),
                  "--eval-every", "2", "--eval-samples", "3", "--eval-max-new-tokens", "4", "--precision",
                  "fp32") == 0, \
        capsys.readouterr().err
    evals = [r for r in _rows(run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(math.isfinite(r["eval_loss"]) for r in evals)
    assert evals[1]["eval_loss"] != evals[0]["eval_loss"]
    for step in (2, 4):
        rows = [json.loads(x) for x in (run / "samples" / f"step-{step}.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all({"id", "question", "reference", "base", "finetuned"} <= r.keys() for r in rows)
    base = [json.loads(x) for x in (run / "samples" / "base.jsonl").read_text().splitlines()]
    assert [r["id"] for r in base] == [r["id"] for r in rows]

    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", str(world.qwen_model), "--adapter", str(run), "--data", str(held),
                     "--out", str(out), "--dtype", "float32", "--max-new-tokens", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"]["finetuned"]["tokens"] == evals[1]["eval_tokens"]
    assert summary["loss"]["finetuned"]["loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-4)
    assert summary["loss"]["base"]["loss"] != pytest.approx(evals[1]["eval_loss"], rel=1e-3)


@pytest.mark.slow
def test_save_best_and_limit_survive_resume(world: Models, data: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    flags = ["--save-every", "1", "--eval-data", "0.25", "--eval-samples", "0", "--save-total-limit", "2",
             "--save-best", "--learning-rate", "0.05"]
    assert _train(world, data, run, "--max-steps", "4", *flags) == 0, capsys.readouterr().err

    def check(last: int) -> None:
        losses = {r["step"]: r["eval_loss"] for r in _rows(run) if "eval_loss" in r}
        assert sorted(losses) == list(range(1, last + 1))  # every checkpoint was evaluated
        best = min(losses, key=lambda s: (losses[s], s))
        kept = [s for s, _ in checkpoints.checkpoints(run)]
        assert kept == sorted({best, last - 1, last})
        meta = json.loads((run / RUN_FILE).read_text())
        assert meta["best_checkpoint"] == f"checkpoint-{best}"
        assert meta["best_heldout_loss"] == pytest.approx(losses[best])

    check(4)
    assert _train(world, data, run, "--max-steps", "6", "--resume", "--resume-changed", *flags) == 0, \
        capsys.readouterr().err
    check(6)


def test_save_best_needs_eval_data(capsys):
    assert cli.main(["train", "--model", "m", "--data", "d", "--out", "o", "--save-best"]) == 2
    assert "--save-best needs --eval-data" in capsys.readouterr().err
