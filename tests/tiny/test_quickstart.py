"""`llava-lora quickstart` end to end (few steps): every stage's folder and the before/after line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_lora import cli
from llava_lora.tiny import quickstart

pytestmark = pytest.mark.slow  # the whole pipeline: `make test` runs it


def test_quickstart_writes_every_stage(tmp_path: Path, capsys):
    out = tmp_path / "qs"
    assert cli.main(["quickstart", "--out", str(out), "--max-steps", "20"]) == 0
    printed = capsys.readouterr().out
    assert "held-out exact match: " in printed and "% after" in printed
    assert f"llava-lora demo --model {out / 'model'}" in printed
    assert (out / "model" / "build_report.json").is_file()
    assert (out / "data" / "chat.json").is_file() and (out / "data" / "test.json").is_file()
    assert (out / "run" / "adapter_model.safetensors").is_file() and (out / "run" / "checkpoint-20").is_dir()
    summary = json.loads((out / "run" / "eval-test" / "summary.json").read_text())
    assert summary["samples"] == quickstart.TEST_IMAGES and set(summary["metrics"]) == {"base", "finetuned"}
    # a second run refuses to overwrite without --overwrite
    assert cli.main(["quickstart", "--out", str(out), "--max-steps", "20"]) == 2
