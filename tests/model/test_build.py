"""`llava-lora build`: composed checkpoints reload with plain transformers, equal to their sources, and each
bad input is refused with one line naming its cause, leaving nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from fixtures.models import Models
from llava_lora import cli
from llava_lora.tiny import checkpoints as tiny


def _load_composed(model_dir: Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype="auto")
    return model, AutoProcessor.from_pretrained(model_dir)


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_tensors_equal_sources(world: Models, which: str):
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    src_llm, model_dir = (world.qwen2, world.qwen_model) if which == "qwen" else (world.llama, world.llama_model)
    model, processor = _load_composed(model_dir)
    llm = AutoModelForCausalLM.from_pretrained(src_llm, dtype="auto")
    report = json.loads((model_dir / "build_report.json").read_text())
    state = model.state_dict()
    # The composed model takes the LLM's dtype (bf16 for Qwen); the fp32 CLIP tower is cast to it.
    vision = CLIPVisionModel.from_pretrained(world.clip, dtype=model.dtype)

    tied = which == "llama"
    assert report["tie_word_embeddings"] is tied
    assert report["embeddings_resized"] is (which == "llama")  # Qwen's rows are padded past the tokenizer
    assert model.dtype == (torch.bfloat16 if which == "qwen" else torch.float32)
    src_rows = llm.get_input_embeddings().weight.shape[0]
    n_rows = model.get_input_embeddings().weight.shape[0]
    if which == "qwen":
        assert n_rows == src_rows
        assert "<image>" in processor.tokenizer.get_vocab() and len(processor.tokenizer) <= src_rows
    else:
        assert n_rows >= len(processor.tokenizer) > src_rows

    checked = set()
    for k, t in llm.model.state_dict().items():
        got = state[f"model.language_model.{k}"]
        if k == "embed_tokens.weight":
            got = got[:src_rows]
        assert got.dtype == t.dtype and torch.equal(got, t), k
        checked.add(f"model.language_model.{k}")
    for k, t in vision.state_dict().items():
        got = state[f"model.vision_tower.{k}"]
        assert got.dtype == t.dtype and torch.equal(got, t), k
        checked.add(f"model.vision_tower.{k}")
    # Every language-model and vision tensor of the composed model had a source.
    composed = {k for k in state if k.startswith(("model.language_model.", "model.vision_tower."))}
    assert composed == checked
    if tied:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    else:
        assert not model.config.tie_word_embeddings
        assert torch.equal(state["lm_head.weight"][:src_rows], llm.lm_head.weight)
        assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_image_tokens_match_features_and_stop_tokens(world: Models, which: str):
    model_dir = world.qwen_model if which == "qwen" else world.llama_model
    model, processor = _load_composed(model_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    size = processor.image_processor.crop_size
    inputs = processor(text=prompt, images=Image.new("RGB", (size["width"], size["height"]), "red"),
                       return_tensors="pt")
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        out = model.get_image_features(pixel_values=inputs["pixel_values"].to(model.dtype))
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        n_features = sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[0] * feats.shape[1]
        model(**inputs)  # the forward accepts the prompt (no "image features and image tokens do not match")
    assert n_tokens == n_features == (32 // 8) ** 2

    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(model_dir)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    end_of_turn = "<|im_end|>" if which == "qwen" else "<|eot_id|>"
    assert processor.tokenizer.convert_tokens_to_ids(end_of_turn) in eos


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_chat_template_marks_assistant_tokens(world: Models, which: str):
    _, processor = _load_composed(world.qwen_model if which == "qwen" else world.llama_model)
    tok = processor.tokenizer
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
            {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    end = "<|im_end|>" if which == "qwen" else "<|eot_id|>"
    marked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert marked == f"a red square{end}red{end}"
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1


def test_generate_cli_end_to_end(world: Models, tmp_path: Path, capsys):
    img = tmp_path / "img.png"
    Image.new("RGB", (40, 40), "blue").save(img)
    rc = cli.main(["generate", "--model", str(world.qwen_model), "--image", str(img), "--prompt", "hi",
                   "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.strip()


# ----------------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------------

def _build(llm, vision, out, *extra) -> int:
    return cli.main(["build", "--llm", str(llm), "--vision", str(vision), "--out", str(out), *extra])


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".building-" in p.name]


def _copy_without_template(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case", ["llm_is_clip", "vision_is_llm", "image_token_taken", "feature_layer_0",
                                  "feature_layer_outside"])
def test_bad_input_refused(world: Models, tmp_path: Path, capsys, case: str):
    out = tmp_path / "out"
    if case == "llm_is_clip":
        rc, cause = _build(world.clip, world.clip, out), "not a causal language model"
    elif case == "vision_is_llm":
        rc, cause = _build(world.qwen2, world.qwen2, out), "not CLIP"
    elif case == "feature_layer_0":  # the tiny tower has 2 layers: hidden states -3..2, the embeddings first
        rc, cause = _build(world.qwen2, world.clip, out, "--vision-feature-layer", "0"), "give the same layer as -3"
    elif case == "feature_layer_outside":
        rc, cause = _build(world.qwen2, world.clip, out, "--vision-feature-layer", "-4"), "indexed -3..2"
    else:
        from transformers import AutoTokenizer

        llm = shutil.copytree(world.qwen2, tmp_path / "qwen_with_image")
        tok = AutoTokenizer.from_pretrained(llm)
        tok.add_tokens(["<image>"], special_tokens=True)
        tok.save_pretrained(llm)
        rc, cause = _build(llm, world.clip, out), "already has '<image>'"
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and cause in err, err
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_llm_without_chat_template(world: Models, tmp_path: Path, capsys):
    llm = _copy_without_template(world.qwen2, tmp_path / "qwen_no_template")
    out = tmp_path / "out"
    assert _build(llm, world.clip, out) == 2
    err = capsys.readouterr().err
    assert "no chat template" in err and "--chat-template" in err
    assert not out.exists() and _leftovers(tmp_path) == []

    template = tmp_path / "chatml.jinja"
    template.write_text(tiny.QWEN_CHAT_TEMPLATE)
    assert _build(llm, world.clip, out, "--chat-template", str(template)) == 0
    assert _leftovers(tmp_path) == []
    _, processor = _load_composed(out)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "<image>" in prompt


def test_non_empty_out_needs_overwrite(world: Models, tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _build(world.qwen2, world.clip, out) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# chat templates of other families: marked by difference, or refused
# ----------------------------------------------------------------------------------------------------------

ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
LLAMA2 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
          "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + "
          "' ' + eos_token }}{% endif %}{% endfor %}")
# The system text moves into the last user turn: a conversation is no extension of its prefix's rendering.
SYSTEM_LAST = ("{% for message in messages %}{% if message['role'] == 'user' %}{% if loop.last %}[INST] Be brief. "
               "{{ message['content'] }}[/INST]{% else %}[INST] {{ message['content'] }}[/INST]{% endif %}"
               "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("name, template", [("zephyr", ZEPHYR), ("llama2", LLAMA2)])
def test_other_templates_marked_by_difference(world: Models, tmp_path: Path, name: str, template: str, capsys):
    """A Zephyr- or Llama-2-style LLM composes into a model that trains: its own format kept, exactly the answers
    and their end-of-turn token marked, and the generation prompt a prefix of the answered conversation."""
    from llava_lora.chat import templates

    path = tmp_path / f"{name}.jinja"
    path.write_text(template)
    out = tmp_path / "model"
    assert _build(world.llama, world.clip, out, "--chat-template", str(path)) == 0, capsys.readouterr().err
    assert json.loads((out / "build_report.json").read_text())["chat_template_family"] == "generic"
    _, processor = _load_composed(out)
    tok = processor.tokenizer
    msgs = templates.probe_messages()
    flat = [{"role": m["role"], "content": "\n".join("<image>" if p["type"] == "image" else p["text"]
                                                     for p in m["content"])} for m in msgs]
    assert tok.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(flat, chat_template=template,
                                                                                    tokenize=False)
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = tok.decode([i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    _, a1, _, a2 = templates.PROBE_TEXTS
    assert marked.replace(" ", "") == f"{a1}{tok.eos_token}{a2}{tok.eos_token}".replace(" ", "")
    asked = tok.apply_chat_template(msgs[:3], tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(msgs, tokenize=False).startswith(asked)


def test_template_that_cannot_be_marked_is_refused(world: Models, tmp_path: Path, capsys):
    path = tmp_path / "system_last.jinja"
    path.write_text(SYSTEM_LAST)
    out = tmp_path / "model"
    assert _build(world.llama, world.clip, out, "--chat-template", str(path)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "cannot be trained on" in err and "generic family" in err and "--chat-template FILE" in err
    assert not out.exists() and _leftovers(tmp_path) == []
