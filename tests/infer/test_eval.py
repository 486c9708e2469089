"""``llava-lora eval``: base vs fine-tuned from one model, batched generation, outputs, bad inputs.

    .venv/bin/pytest tests/infer/test_eval.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fixtures.trained import World, eval_world
from llava_lora.infer import answers, evaluate
from llava_lora import cli, outdirs
from fixtures.models import auto_cpu_dtype
from llava_lora.data.records import load_records, resolve_data
from llava_lora.infer.engine import GenerationSettings
from llava_lora.infer.metrics import METRICS
from llava_lora.model.parts import dtypes_by_role
from llava_lora.model.load import load_model

pytestmark = pytest.mark.slow  # every test here trains or serves a model: `make test` runs them

SETTINGS = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return eval_world(tmp_path_factory)


@pytest.fixture(scope="session")
def tuned(world):
    """(model with adapter, processor), loaded once."""
    return load_model(world.model, world.run, device="cpu")


@pytest.fixture(scope="session")
def mixed(world, tmp_path_factory) -> tuple[list, Path]:
    """(records, image root): single- and multi-turn records with images, and text-only ones, in one list."""
    train = json.loads((world.data / "chat.json").read_text())
    test = json.loads((world.data / "test.json").read_text())
    multi = [r for r in train if len(r["conversations"]) > 2][:3]
    text_only = [{"id": f"text_{i}", "conversations": [{"from": "human", "value": q},
                                                       {"from": "gpt", "value": a}]}
                 for i, (q, a) in enumerate([("Say the word red.", "red"), ("What shape has three sides?", "triangle")])]
    path = tmp_path_factory.mktemp("mixed") / "mixed.json"
    path.write_text(json.dumps(test[:6] + multi + text_only))
    records, bad = load_records(path)
    assert not bad and len(records) == 11
    return records, world.data / "images_dl"


def run_cli(*args: str) -> int:
    return cli.main(["eval", *map(str, args)])


# ------------------------------------------------------------------------------------------ end to end


def test_eval_finetuned_beats_base_on_held_out(world, capsys):
    rc = run_cli("--model", world.model, "--adapter", world.run, "--data", world.data, "--split", "test",
                 "--max-new-tokens", 6, "--batch-size", 8)
    assert rc == 0
    out = world.run / "eval-test"  # default: beside the adapter, named after the split
    assert sorted(p.name for p in out.iterdir()) == sorted([*evaluate.OUTPUTS, outdirs.MARKER])
    summary = json.loads((out / "summary.json").read_text())
    base, tuned = summary["metrics"]["base"], summary["metrics"]["finetuned"]
    assert tuned["exact_match"] > base["exact_match"]
    assert tuned["token_f1"] > base["token_f1"]
    assert tuple(base) == METRICS and summary["samples"] == 40 and summary["skipped"] == []
    parts = {r["part"]: r for r in summary["param_stats"]}
    assert {"vision tower", "projector", "language model", "lm_head", "LoRA", "all"} <= set(parts)
    assert parts["LoRA"]["trainable"] > 0 and parts["vision tower"]["trainable"] == 0
    assert {"torch", "transformers", "peft"} <= set(summary["versions"])
    assert summary["settings"]["max_new_tokens"] == 6 and summary["settings"]["temperature"] == 0.0

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and set(rows[0]) == {"id", "question", "reference", "base", "finetuned"}
    test = {r["id"]: r for r in json.loads((world.data / "test.json").read_text())}
    assert [r["id"] for r in rows] == list(test)  # data order, whatever the batching order was
    assert rows[0]["reference"] == test[rows[0]["id"]]["conversations"][-1]["value"]

    report = (out / "report.md").read_text()
    assert "## Metrics" in report and "## Where the two differ" in report and "exact_match" in report
    printed = capsys.readouterr().out
    assert "exact_match_normalised" in printed and "fine-tuned" in printed and "LoRA" in printed


def test_eval_without_adapter_evaluates_base_alone(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli("--model", world.model, "--data", world.data, "--split", "test", "--limit", 5,
                   "--max-new-tokens", 4) == 0
    out = tmp_path / "eval-test"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["metrics"]) == ["base"] and summary["adapter"] is None and summary["samples"] == 5
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and "finetuned" not in rows[0]
    assert "LoRA" not in {r["part"] for r in summary["param_stats"]}


def test_index_shows_one_sample_in_full(world, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a multi-turn record: the history is shown and the last answer is the reference
    records, _ = load_records(resolve_data(world.data)[0])
    index = next(i for i, r in enumerate(records) if len(r.turns) > 2)
    rec = records[index]
    assert run_cli("--model", world.model, "--adapter", world.run, "--data", world.data, "--index", index,
                   "--max-new-tokens", 4) == 0
    printed = capsys.readouterr().out
    assert f"id: {rec.id}" in printed
    assert f"user: {rec.turns[0].text}" in printed and f"assistant: {rec.turns[1].text}" in printed
    assert f"question: {rec.turns[-2].text}" in printed and f"reference: {rec.turns[-1].text}" in printed
    assert "\nbase: " in printed and "\nfine-tuned: " in printed
    assert list(tmp_path.iterdir()) == [] and not (world.run / "eval-data").exists()  # --index writes nothing


# ------------------------------------------------------------------------------------------ generation


def test_batched_and_one_by_one_greedy_answers_are_identical(world, mixed):
    """In float32: left padding, masks and positions are right. (In bf16 a batch's other shapes round differently,
    and a near-tie between two tokens may go either way.)"""
    model, processor = load_model(world.model, world.run, dtype="float32", device="cpu")
    records, root = mixed
    batched, skipped = answers.predict(model, processor, records, root, SETTINGS, batch_size=8, progress=False)
    single, _ = answers.predict(model, processor, records, root, SETTINGS, batch_size=1, progress=False)
    assert skipped == [] and len(batched) == len(records)
    assert [p.answers for p in batched] == [p.answers for p in single]
    # the multi-turn records are asked their last question, with the history before it
    multi = next(p for p, r in zip(batched, records) if len(r.turns) > 2)
    rec = next(r for r in records if r.id == multi.id)
    assert (multi.question, multi.reference) == (rec.turns[-2].text, rec.turns[-1].text)


def test_one_copy_in_the_checkpoint_dtype(tuned):
    """eval loads the bf16 MODEL_DIR once, in bf16 on a CPU that computes it natively (no fp32 copy), in fp32 on
    one that does not (the tiny model fits); peft's LoRA matrices in float32."""
    model, _ = tuned
    dtype = auto_cpu_dtype()
    assert dtypes_by_role(model) == {"frozen": {dtype}, "LoRA": {torch.float32}, "projector": {dtype}}


def test_vision_tower_runs_once_per_batch_for_base_and_finetuned(tuned, mixed):
    model, processor = tuned
    records, root = mixed
    with_images = [r for r in records if r.image][:4]
    tower = model.get_base_model().model.vision_tower.embeddings  # runs once per pass of the tower
    calls = []
    hook = tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        both, _ = answers.predict(model, processor, with_images, root, SETTINGS, 8, progress=False)
        assert len(calls) == 1  # one batch: the tower ran once for both systems
        calls.clear()
        alone = {s: answers.predict(model, processor, with_images, root, SETTINGS, 8, (s,), progress=False)[0]
                 for s in ("base", "finetuned")}
        assert len(calls) == 2
    finally:
        hook.remove()
    assert "forward" not in vars(model.get_base_model().model.vision_tower)  # the cache is gone after the batch
    for s in ("base", "finetuned"):  # the shared features change no answer
        assert [p.answers[s] for p in both] == [p.answers[s] for p in alone[s]]


def test_lm_head_sees_a_contiguous_input_in_batched_generation(tuned, mixed):
    """Batched prefill hands the lm_head a strided slice (each row's last position); on a CPU in bf16 that slice
    costs a copy of the head's weight per row (pytorch#151934), so load_model makes it contiguous first."""
    model, processor = tuned
    records, root = mixed
    seen = []
    head = model.get_base_model().lm_head
    hook = head.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape, args[0].is_contiguous())))
    try:
        answers.predict(model, processor, [r for r in records if r.image][:3], root, SETTINGS, 3, progress=False)
    finally:
        hook.remove()
    assert any(shape[0] == 3 and shape[1] == 1 for shape, _ in seen)  # the batched prefill's last positions
    assert all(contiguous for _, contiguous in seen)


def test_base_answers_equal_the_model_loaded_without_adapter(world, tuned, mixed):
    model, processor = tuned
    records, root = mixed
    with_adapter, _ = answers.predict(model, processor, records, root, SETTINGS, 4, ("base",), progress=False)
    plain_model, plain_processor = load_model(world.model, device="cpu")
    plain, _ = answers.predict(plain_model, plain_processor, records, root, SETTINGS, 4, ("base",), progress=False)
    assert [p.answers["base"] for p in with_adapter] == [p.answers["base"] for p in plain]
    tuned_answers, _ = answers.predict(model, processor, records, root, SETTINGS, 4, ("finetuned",), progress=False)
    assert [p.answers["finetuned"] for p in tuned_answers] != [p.answers["base"] for p in plain]  # the switch works


# ------------------------------------------------------------------------------------------ bad input


def test_broken_image_is_skipped_and_listed(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world.data / "images_dl", data / "images_dl")
    records = json.loads((world.data / "test.json").read_text())[:3]
    (data / "images_dl" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records.insert(1, {"id": "broken", "image": "broken.png", "conversations": records[0]["conversations"]})
    records.append({"id": "no_answer", "image": "broken.png", "conversations": records[0]["conversations"][:1]})
    (data / "chat.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    assert run_cli("--model", world.model, "--adapter", world.run, "--data", data, "--out", out,
                   "--max-new-tokens", 3) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 3
    skipped = {s["id"]: s for s in summary["skipped"]}
    assert skipped["broken"]["reason"] == "not_an_image" and skipped["broken"]["when"] == "image"
    assert skipped["no_answer"]["reason"] == "no_assistant_answer" and skipped["no_answer"]["when"] == "loading"
    assert "broken" in (out / "report.md").read_text()
    ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert "broken" not in ids and len(ids) == 3


@pytest.mark.parametrize("extra, message", [
    (["--index", "40"], "--index 40 is out of range: "),
    (["--limit", "2", "--index", "1"], "give --limit or --index, not both"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--split", "nope"], "no nope.json or nope.jsonl"),
])
def test_bad_arguments_get_one_line_errors(world, capsys, extra, message):
    assert run_cli("--model", world.model, "--adapter", world.run, "--data", world.data, "--split", "test",
                   *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_adapter_for_another_base_is_refused(world, capsys, tmp_path):
    assert run_cli("--model", world.other_model, "--adapter", world.run, "--data", world.data, "--split", "test",
                   "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "was trained on" in err and str(world.model.resolve()) in err and "different base" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_folder_is_refused_unless_overwrite(world, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--model", world.model, "--data", world.data, "--split", "test", "--limit", 2, "--max-new-tokens", 2,
            "--out", out]
    assert run_cli(*args) == 2
    assert "exists and is not empty (pass --overwrite to replace it)" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli(*args, "--overwrite") == 2  # not a folder llava-lora wrote: kept
    assert "was not written by llava-lora" in capsys.readouterr().err and (out / "keep.txt").is_file()
    outdirs.mark(out)  # as an earlier eval would have
    assert run_cli(*args, "--overwrite") == 0  # replaced, as --overwrite means for every command
    assert sorted(p.name for p in out.iterdir()) == [".llava-lora", "eval.yaml", "predictions.jsonl", "report.md",
                                                     "summary.json"]
