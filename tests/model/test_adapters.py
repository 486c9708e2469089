"""An adapter meets only its own base: run.json's fingerprints cover MODEL_DIR's config and a sample of its
weights, a MERGED_DIR is refused as the base of the adapter folded into it, and --init-from checks the same.

    .venv/bin/pytest tests/model/test_adapters.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from fixtures.models import Models
from llava_lora.errors import UsageError
from llava_lora.model import adapters


def _run_for(model_dir: Path, run: Path) -> Path:
    """A RUN_DIR's run.json as save_adapter writes it for ``model_dir``."""
    run.mkdir(parents=True)
    (run / adapters.RUN_FILE).write_text(json.dumps({
        "base_model": str(model_dir.resolve()), "base_fingerprint": adapters.fingerprint(model_dir),
        "base_weights": adapters.weights_fingerprint(model_dir), "lora_r": 4}))
    return run


def _retrained(model_dir: Path, dst: Path) -> Path:
    """The same architecture and config, other weights (another fine-tune of the same base)."""
    shutil.copytree(model_dir, dst)
    for f in dst.glob("*.safetensors"):
        state = load_file(str(f))
        save_file({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, str(f),
                  metadata={"format": "pt"})
    return dst


def test_fingerprint_covers_the_weights_not_only_the_config(world: Models, tmp_path: Path):
    other = _retrained(world.qwen_model, tmp_path / "other")
    assert adapters.fingerprint(other) == adapters.fingerprint(world.qwen_model)
    assert adapters.weights_fingerprint(other) != adapters.weights_fingerprint(world.qwen_model)
    run = _run_for(world.qwen_model, tmp_path / "run")
    adapters.check_base(run, world.qwen_model)
    with pytest.raises(UsageError, match=r"a different base model than .*other \(the same config, other weights\)"):
        adapters.check_base(run, other)


def test_a_merged_dir_is_refused_as_the_base_of_its_own_adapter(world: Models, tmp_path: Path):
    run = _run_for(world.qwen_model, tmp_path / "run")
    merged = tmp_path / "merged"
    shutil.copytree(world.qwen_model, merged)
    (merged / "export.json").write_text(json.dumps({"base_model": str(world.qwen_model.resolve()),
                                                    "adapter": str((run / "checkpoint-4").resolve())}))
    for given in (run, run / "checkpoint-4", run / "checkpoint-8"):  # the run, or any checkpoint of it
        with pytest.raises(UsageError, match="already folded into .* count the LoRA twice"):
            adapters.check_base(given, merged)
    adapters.check_base(_run_for(merged, tmp_path / "stacked"), merged)  # a run trained on the merged model: fine


def test_init_from_refuses_a_run_of_another_base(world: Models, tmp_path: Path):
    run = _run_for(world.llama_model, tmp_path / "run")
    (run / "adapter_config.json").write_text("{}")
    with pytest.raises(UsageError, match="--init-from .* a different base model"):
        adapters.init_from(None, run, world.qwen_model)  # refused before a tensor is read


def test_an_adapter_without_run_json_is_said_to_be_unchecked(world: Models, tmp_path: Path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    adapters.check_base(bare, world.qwen_model)
    assert "has no run.json: that it was trained on" in capsys.readouterr().err
