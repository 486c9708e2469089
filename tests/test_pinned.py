"""Behaviour pinned: the exact files each stage writes, the losses of a tiny fixed run, and `generate`'s answer.

    .venv/bin/pytest tests/test_pinned.py -q

When a change moves one of these on purpose, update the literal here in the same commit and say why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures.models import FAST, Models
from llava_lora import cli

pytestmark = pytest.mark.slow  # a training run, an eval and an export: `make test` runs them

# every folder llava-lora writes carries its marker (what --overwrite may replace); a checkpoint, its manifest
MODEL_FILES = [".llava-lora", "build_report.json", "chat_template.jinja", "config.json", "generation_config.json",
               "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json"]
RUN_FILES = [".llava-lora", "README.md", "adapter_config.json", "adapter_model.safetensors", "checkpoint-2", "checkpoint-3",
             "config.yaml", "data_report.json", "loss_curve.png", "metrics.jsonl", "run.json"]
CHECKPOINT_FILES = [".llava-lora", "README.md", "adapter_config.json", "adapter_model.safetensors", "manifest.json",
                    "run.json", "training_state.pt"]
EVAL_FILES = [".llava-lora", "eval.yaml", "predictions.jsonl", "report.md", "summary.json"]
EXPORT_FILES = [".llava-lora", "chat_template.jinja", "config.json", "export.json", "export.yaml", "generation_config.json",
                "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json"]
SYNTH_FILES = [".llava-lora", "chat.json", "images_dl", "synth.yaml", "test.json"]
# fp32, seed 42, no dropout, batch 4 over the 24-record good_data set: the first three steps' mean losses (moved
# when the tiny tokenizer learned whole words: other token ids, fewer tokens a record)
PINNED_LOSSES = [16.822669982910156, 16.185888290405273, 14.527536392211914]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def run(world: Models, data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pinned") / "run"
    assert cli.main(["train", "--model", str(world.qwen_model), "--data", str(data), "--out", str(out), *FAST,
                     "--max-steps", "3", "--batch-size", "4", "--log-every", "1", "--save-every", "2",
                     "--precision", "fp32", "--lora-dropout", "0"]) == 0
    return out


def test_losses_of_a_tiny_fixed_run(run: Path):
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    # relative 1e-4: other CPUs' kernels may sum in another order, nothing more
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-4)


def test_every_stage_writes_exactly_its_files(world: Models, data: Path, run: Path, tmp_path: Path):
    assert _names(world.qwen_model) == MODEL_FILES
    assert _names(run) == RUN_FILES
    assert _names(run / "checkpoint-2") == _names(run / "checkpoint-3") == CHECKPOINT_FILES
    assert cli.main(["eval", "--model", str(world.qwen_model), "--adapter", str(run), "--data", str(data),
                     "--limit", "2", "--max-new-tokens", "2", "--out", str(tmp_path / "eval")]) == 0
    assert _names(tmp_path / "eval") == EVAL_FILES
    assert cli.main(["export", "--model", str(world.qwen_model), "--adapter", str(run), "--out",
                     str(tmp_path / "merged")]) == 0
    assert _names(tmp_path / "merged") == EXPORT_FILES
    assert cli.main(["data", "synth", "--out", str(tmp_path / "synth"), "--n", "4", "--n-test", "2"]) == 0
    assert _names(tmp_path / "synth") == SYNTH_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "merged", "synth"]  # no temporary folder left


def test_generate_answers_as_the_engine_does(world: Models, data: Path, run: Path, capsys):
    """`generate` end to end: its printed answer is the fine-tuned model's greedy answer to the same prompt."""
    from PIL import Image

    from llava_lora.chat import prompts
    from llava_lora.infer.engine import GenerationSettings, answer
    from llava_lora.model.load import load_model

    image = next(p for p in sorted((data / "images_dl").iterdir()))
    question = "What colour is the shape?"
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(world.qwen_model), "--adapter", str(run), "--image", str(image),
                     "--prompt", question, "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    model, processor = load_model(str(world.qwen_model), str(run))
    msgs = prompts.user_messages(question, True)
    expected = answer(model, processor, [prompts.generation_prompt(processor.tokenizer, msgs)],
                      [Image.open(image).convert("RGB")], GenerationSettings(max_new_tokens=6))[0]
    assert printed == expected
