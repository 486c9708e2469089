"""LLaVA's recipes: LoRA placement presets, projector-only training (stage 1), --init-from (stage 2), packaged
recipes.

    .venv/bin/pytest tests/train/test_recipes.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.models import FAST, Models
from llava_lora import cli
from llava_lora.model.adapters import PROJECTOR, apply_lora, init_from, resolve_targets, wrapped_modules
from llava_lora.config import recipe_names
from llava_lora.errors import UsageError


def _model(model_dir: Path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# placement
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets, leaves", [
    (["attention"], {"q_proj", "k_proj", "v_proj", "o_proj"}),
    (["all-linear"], {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
])
def test_presets_wrap_the_language_model_only(world: Models, targets: list[str], leaves: set[str]):
    peft_model = apply_lora(_model(world.qwen_model), 4, 8, 0.0, targets)
    wrapped = wrapped_modules(peft_model)
    assert wrapped and all(n.startswith("model.language_model.layers.") for n in wrapped)
    assert {n.rsplit(".", 1)[1] for n in wrapped} == leaves
    assert len(wrapped) == 2 * len(leaves)  # every layer of the 2-layer LM


def test_vision_tower_lora_only_by_name(world: Models):
    wrapped = wrapped_modules(apply_lora(_model(world.qwen_model), 4, 8, 0.0, ["q_proj", "vision_tower.q_proj"]))
    assert {n.split(".")[1] for n in wrapped} == {"language_model", "vision_tower"}
    assert sum(n.startswith("model.vision_tower.") for n in wrapped) == 2  # one per tower layer


def test_vision_tower_lora_gets_gradients(world: Models, data: Path):
    """LoRA asked for in the vision tower trains: the tower runs with autograd then (without, it stays at zero)."""
    from transformers import AutoProcessor

    from llava_lora.chat.batches import Collator, TrainDataset
    from llava_lora.data.records import load_records, resolve_data
    from llava_lora.model.loss import LlavaLoss

    peft_model = apply_lora(_model(world.qwen_model), 4, 8, 0.0, ["q_proj", "vision_tower.q_proj"])
    processor = AutoProcessor.from_pretrained(world.qwen_model)
    data_file, root = resolve_data(str(data), None, None)
    records = [r for r in load_records(data_file)[0] if r.image][:2]
    batch = Collator(processor.tokenizer.pad_token_id)(
        [TrainDataset(records, root, processor, peft_model.config.image_token_id, 16, 2048)[i] for i in range(2)])
    loss_sum, _ = LlavaLoss(peft_model)(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                        batch["pixel_values"])
    loss_sum.backward()
    # the first tower layer's: LLaVA reads the second-to-last layer, which the last one does not reach
    first = [p for n, p in peft_model.named_parameters() if "vision_tower" in n and ".layers.0." in n and "lora_B" in n]
    assert first and all(p.grad is not None and p.grad.abs().sum() > 0 for p in first)


@pytest.mark.parametrize("target, says", [("qkv", "has no linear layer 'qkv'; its linear layers are down_proj, "
                                                  "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
                                          ("vision_tower.gate_proj", "the vision tower has no linear layer")])
def test_target_that_matches_nothing_is_refused(world: Models, target: str, says: str):
    with pytest.raises(UsageError, match=says.replace("(", r"\(")):
        resolve_targets(_model(world.qwen_model), [target])


# ----------------------------------------------------------------------------------------------------------
# two stages
# ----------------------------------------------------------------------------------------------------------

def _train(world: Models, data: Path, out: Path, *extra: str) -> int:
    return cli.main(["train", "--model", str(world.qwen_model), "--data", str(data), "--out", str(out), *FAST,
                     "--batch-size", "4", "--max-steps", "3", "--save-every", "3", "--learning-rate", "0.01", *extra])


@pytest.fixture(scope="module")
def stage1(world: Models, data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage1") / "run"
    assert _train(world, data, out, "--lora-r", "0") == 0
    return out


@pytest.mark.slow
def test_projector_only_run_changes_no_weight_of_the_lm(world: Models, stage1: Path):
    """Loaded with plain peft and merged, stage 1's model equals the base everywhere but in the projector."""
    from peft import PeftModel

    base = _model(world.qwen_model).state_dict()
    merged = PeftModel.from_pretrained(_model(world.qwen_model), stage1).merge_and_unload().state_dict()
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(PROJECTOR in k for k in changed)
    assert json.loads((stage1 / "run.json").read_text())["lora_r"] == 0


@pytest.mark.slow
def test_stage2_starts_from_stage1_projector_bit_for_bit(world: Models, data: Path, stage1: Path, tmp_path: Path):
    peft_model = apply_lora(_model(world.qwen_model), 4, 8, 0.0, ["q_proj", "v_proj"])
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    assert init_from(peft_model, stage1, world.qwen_model) == {"projector": 4, "lora": 0}
    saved = load_file(stage1 / "adapter_model.safetensors")
    mine = {n: p for n, p in peft_model.named_parameters() if PROJECTOR in n and p.requires_grad}
    assert len(mine) == 4
    for name, p in mine.items():
        key = name.replace(".modules_to_save.default", "")
        assert torch.equal(p.detach(), saved[key]), name

    out = tmp_path / "stage2"
    assert _train(world, data, out, "--init-from", str(stage1)) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["init_from"] == str(stage1.resolve()) and meta["lora_r"] == 4
    assert (tmp_path / "stage2" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_stage1_output_exports_and_evaluates(world: Models, data: Path, stage1: Path, tmp_path: Path):
    assert cli.main(["export", "--model", str(world.qwen_model), "--adapter", str(stage1), "--out",
                     str(tmp_path / "merged")]) == 0
    assert cli.main(["eval", "--model", str(world.qwen_model), "--adapter", str(stage1), "--data", str(data),
                     "--limit", "2", "--max-new-tokens", "2", "--out", str(tmp_path / "eval")]) == 0


def test_init_from_refuses_misplaced_lora(world: Models, tmp_path: Path):
    src = apply_lora(_model(world.qwen_model), 4, 8, 0.0, ["q_proj"])
    src.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "run.json").write_text(json.dumps({"lora_r": 4}))
    dst = apply_lora(_model(world.qwen_model), 8, 16, 0.0, ["q_proj"])
    with pytest.raises(UsageError, match="do not fit this run's model"):
        init_from(dst, tmp_path / "src", world.qwen_model)


def test_recipes_packaged_and_resolvable():
    assert {"seed", "llava15-stage1", "llava15-stage2", "quickstart"} <= set(recipe_names())
    _, seed = cli.parse(["train", "--config", "seed", "--model", "m", "--data", "d", "--out", "o"])
    assert (seed.lora_r, seed.lora_alpha, seed.lora_dropout, seed.lora_target) == (4, 8, 0.05, ["q_proj", "v_proj"])
    assert (seed.learning_rate, seed.max_steps, seed.batch_size, seed.max_grad_norm, seed.save_every) == \
        (1e-3, 800, 6, 0.3, 200)
    assert seed.gradient_checkpointing and seed.lr_scheduler == "cosine"
    _, stage1 = cli.parse(["train", "--config", "llava15-stage1", "--model", "m", "--data", "d", "--out", "o"])
    assert stage1.lora_r == 0 and stage1.num_epochs == 1
    _, stage2 = cli.parse(["train", "--config", "llava15-stage2", "--init-from", "r", "--model", "m", "--data", "d",
                           "--out", "o"])
    assert stage2.init_from == "r" and stage2.lora_target == ["all-linear"]


def test_the_seed_recipe_is_the_defaults():
    """recipes/seed.yaml writes the seed's settings out for a reader (and `--config seed`); they are TrainConfig's
    defaults, key by key, so the LoRA defaults live in one place and the file cannot drift from them."""
    from llava_lora.config import load_yaml
    from llava_lora.train.config import TrainConfig

    seed = load_yaml("seed")
    defaults = TrainConfig(model="m", data="d", out="o")
    assert {"lora_r", "lora_alpha", "lora_dropout", "lora_target"} <= set(seed)
    assert {k: getattr(defaults, k) for k in seed} == seed
