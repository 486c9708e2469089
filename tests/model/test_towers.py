"""Vision towers: SigLIP beside CLIP, and the training loss under every vision-feature setting LLaVA has.

    .venv/bin/pytest tests/model/test_towers.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures.models import FAST, Models, quiet
from llava_lora.model import build
from llava_lora import cli
from llava_lora.tiny import checkpoints as tiny
from llava_lora.model.adapters import apply_lora
from llava_lora.model.loss import LlavaLoss


@pytest.fixture(scope="module")
def siglip(world: Models, tmp_path_factory) -> dict[str, Path]:
    """SigLIP towers (full checkpoint, vision-only) and the Qwen LLaVAs composed from them."""
    root = tmp_path_factory.mktemp("siglip")
    out = {}
    for name, vision_only in (("full", False), ("vision", True)):
        src = tiny.tiny_siglip(root / f"siglip-{name}", vision_only=vision_only)
        out[name] = root / f"model-{name}"
        quiet(build.main, build.BuildConfig(llm=str(world.qwen2), vision=str(src), out=str(out[name])))
    return out


@pytest.mark.parametrize("which", ["full", "vision"])
def test_siglip_composes_with_every_patch(siglip: dict[str, Path], which: str):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(siglip[which])
    processor = AutoProcessor.from_pretrained(siglip[which])
    assert model.config.vision_config.model_type == "siglip_vision_model"
    assert model.config.vision_feature_select_strategy == "full" and model.config.image_seq_length == 16
    report = json.loads((siglip[which] / "build_report.json").read_text())
    assert report["vision_family"] == "siglip" and report["checks"]["image_features"] == 16
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(text=prompt, images=Image.new("RGB", (50, 20), "red"), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_siglip2_naflex_refused(world: Models, tmp_path: Path, capsys):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_patches=16, patch_size=8)).save_pretrained(
        tmp_path / "siglip2")
    rc = cli.main(["build", "--llm", str(world.qwen2), "--vision", str(tmp_path / "siglip2"), "--out",
                   str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "SigLIP2 NaFlex" in err and "model_type 'siglip'" in err
    assert not (tmp_path / "out").exists()


def _batch(model_dir: Path, data: Path):
    from transformers import AutoProcessor

    from llava_lora.chat.batches import Collator, TrainDataset
    from llava_lora.data.records import load_records, resolve_data

    processor = AutoProcessor.from_pretrained(model_dir)
    data_file, root = resolve_data(str(data), None, None)
    records, _ = load_records(data_file)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    ds = TrainDataset(records, root, processor, config.image_token_id, config.image_seq_length, 2048)
    return Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(4)])  # record 3 is text-only


@pytest.mark.parametrize("tower, layer, strategy", [
    ("clip", -2, "default"), ("clip", -1, "full"), ("clip", [-2, -1], "default"), ("clip", [0, -1], "full"),
    ("siglip", -2, "full"), ("siglip", [-3, -1], "full"),
])
def test_loss_equals_transformers_loss_for_every_feature_setting(world: Models, siglip: dict[str, Path],
                                                                 data: Path, tower: str, layer, strategy: str):
    """Our loss (tower under no_grad, lm_head on supervised positions only) equals transformers' own ``labels=``
    loss with the same vision feature layer(s) and strategy (CLIP at -2 with "default": what `build` composes). A CLIP with the 'full' strategy keeps its CLS: one
    more image token than patches."""
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model_dir = world.qwen_model if tower == "clip" else siglip["full"]
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.config.vision_feature_layer, model.config.vision_feature_select_strategy = layer, strategy
    torch.manual_seed(0)
    model.model.multi_modal_projector = LlavaMultiModalProjector(model.config)  # input width follows the layers
    batch = _batch(model_dir, data)
    assert batch["pixel_values"].shape[0] == 3 and (batch["attention_mask"] == 0).any()  # a text-only record, padded
    if tower == "clip" and strategy == "full":  # one more feature per image: widen each image's token run by one
        ids, labels, mask = [], [], []
        for row in range(batch["input_ids"].shape[0]):
            at = (batch["input_ids"][row] == model.config.image_token_id).nonzero()
            cut = int(at[0]) if len(at) else batch["input_ids"].shape[1]
            extra = torch.tensor([model.config.image_token_id] if len(at) else [0])
            ids.append(torch.cat([batch["input_ids"][row, :cut], extra, batch["input_ids"][row, cut:]]))
            labels.append(torch.cat([batch["labels"][row, :cut], torch.tensor([-100]), batch["labels"][row, cut:]]))
            mask.append(torch.cat([batch["attention_mask"][row, :cut], torch.tensor([int(len(at) > 0)]),
                                   batch["attention_mask"][row, cut:]]))
        batch = {**batch, "input_ids": torch.stack(ids), "labels": torch.stack(labels),
                 "attention_mask": torch.stack(mask)}
    peft_model = apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():  # make the LoRA path matter (B starts at zero)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft_model.eval()
    with torch.no_grad():
        loss_sum, count = LlavaLoss(peft_model)(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                      batch["pixel_values"])
        ref = peft_model.get_base_model()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(float(loss_sum / count) - float(ref)) < 1e-5


@pytest.mark.slow
def test_siglip_end_to_end(siglip: dict[str, Path], data: Path, tmp_path: Path, capsys):
    """data check -> train -> eval -> generate -> export on a SigLIP LLaVA."""
    model = siglip["vision"]
    assert cli.main(["data", "check", str(data), "--model", str(model)]) == 0
    run = tmp_path / "run"
    assert cli.main(["train", "--model", str(model), "--data", str(data), "--out", str(run), *FAST, "--max-steps",
                     "3", "--batch-size", "4", "--save-every", "3"]) == 0
    assert cli.main(["eval", "--model", str(model), "--adapter", str(run), "--data", str(data), "--limit", "2",
                     "--max-new-tokens", "2", "--out", str(tmp_path / "eval")]) == 0
    image = next((data / "images_dl").iterdir())
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(model), "--adapter", str(run), "--image", str(image), "--prompt",
                     "What colour is it?", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["export", "--model", str(model), "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
