"""MODEL_DIR and MERGED_DIR are written in llava-hf's key layout; folders in the older layout still work.

    .venv/bin/pytest tests/model/test_layout.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fixtures.trained import World, eval_world
from fixtures.models import Models, model_world
from llava_lora import cli
from llava_lora.infer import demo
from llava_lora.export import merge as export
from llava_lora.model import layout
from llava_lora.data.records import load_records, resolve_data
from llava_lora.infer.engine import GenerationSettings
from llava_lora.model.load import load_model

LLAVA_HF_PREFIXES = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                     "multi_modal_projector.")


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    return model_world(tmp_path_factory)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return eval_world(tmp_path_factory)


def keys_on_disk(folder: Path) -> list[str]:
    keys = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            keys += list(s.keys())
    return keys


def assert_llava_hf_layout(folder: Path) -> None:
    keys = keys_on_disk(folder)
    assert keys and [k for k in keys if not k.startswith(LLAVA_HF_PREFIXES)] == []
    for prefix in ("language_model.model.layers.", "vision_tower.vision_model.encoder.layers.",
                   "vision_tower.vision_model.embeddings.", "multi_modal_projector.linear_1."):
        assert any(k.startswith(prefix) for k in keys), prefix


def load_plain(folder: Path, dtype=None):
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not (sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]))] == []


def write_old_layout(model_dir: Path, out: Path) -> Path:
    """MODEL_DIR as `build` wrote it before the llava-hf layout (transformers' default save_pretrained of a
    composed model): the CLIP tower's keys flat under ``vision_tower.``. Written here by renaming, because a
    model loaded from the new layout is saved back in it."""
    shutil.copytree(model_dir, out)
    for f in out.glob("*.safetensors"):
        state = load_file(f)
        save_file({k.replace("vision_tower.vision_model.", "vision_tower.", 1): v for k, v in state.items()}, f,
                  metadata={"format": "pt"})
    keys = keys_on_disk(out)
    assert any(k.startswith("vision_tower.embeddings.") for k in keys)  # really the old layout
    assert not any(k.startswith("vision_tower.vision_model.") for k in keys)
    return out


@pytest.mark.parametrize("which", ["qwen_model", "llama_model"])  # untied and tied embeddings
def test_build_writes_the_llava_hf_layout_and_reloads_equal(models: Models, which: str, tmp_path: Path):
    folder = getattr(models, which)
    assert_llava_hf_layout(folder)
    model = load_plain(folder)
    if which == "llama_model":  # tied: one tensor on disk, shared again after loading
        assert "language_model.lm_head.weight" not in keys_on_disk(folder)
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    layout.save_model(model, tmp_path / "again")
    assert_llava_hf_layout(tmp_path / "again")
    assert_same_tensors(model, load_plain(tmp_path / "again"))


@pytest.mark.slow  # trains and exports a run (the eval world): `make test` runs it
def test_export_writes_the_llava_hf_layout_and_reloads_equal(world: World, tmp_path: Path):
    out = tmp_path / "merged"
    assert cli.main(["export", "--model", str(world.model), "--adapter", str(world.run), "--out", str(out),
                     "--dtype", "float32", "--check-samples", "0"]) == 0
    assert_llava_hf_layout(out)
    model, _ = load_model(world.model, world.run, dtype="float32", device="cpu")
    assert_same_tensors(model.merge_and_unload(), load_plain(out))


@pytest.mark.slow
def test_model_dir_in_the_old_layout_works_with_every_command(world: World, tmp_path: Path, capsys):
    old = write_old_layout(world.model, tmp_path / "old_model")
    assert_same_tensors(load_plain(world.model), load_plain(old))
    image = next((world.data / "images_dl").rglob("*.png"))
    file, root = resolve_data(world.data, "test")

    def answers(model_dir: Path) -> list[str]:
        capsys.readouterr()
        assert cli.main(["generate", "--model", str(model_dir), "--adapter", str(world.run), "--image", str(image),
                         "--prompt", "What colour is the shape?", "--device", "cpu"]) == 0
        start, generated = capsys.readouterr().out.split("\n", 1)
        assert start.startswith("precision ")  # not compared: it says the memory available, which moves
        engine, _ = demo.load(demo.DemoConfig(model=str(model_dir), adapter=str(world.run), device="cpu"))
        *_, (base, tuned, _) = engine.compare(engine.prompt([{"role": "user", "content": "Hi"}]), None,
                                              GenerationSettings(max_new_tokens=4))
        return [generated, base, tuned]

    assert answers(old) == answers(world.model)

    assert cli.main(["train", "--model", str(old), "--data", str(world.data), "--out", str(tmp_path / "run"),
                     "--max-steps", "2", "--batch-size", "2", "--no-gradient-checkpointing", "--num-workers", "0",
                     "--no-tensorboard"]) == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()

    assert cli.main(["eval", "--model", str(old), "--adapter", str(world.run), "--data", str(world.data),
                     "--split", "test", "--limit", "4", "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and predictions[0]["id"] == load_records(file)[0][0].id

    merged = tmp_path / "merged"
    assert cli.main(["export", "--model", str(old), "--adapter", str(world.run), "--out", str(merged),
                     "--dtype", "float32", "--data", str(world.data), "--split", "test", "--check-samples", "2"]) == 0
    assert json.loads((merged / export.EXPORT_FILE).read_text())["self_check"]["equal"] == 2
    assert_llava_hf_layout(merged)
