"""``llava-lora export --format gguf``: the GGUF files read back with gguf.GGUFReader hold the model's tensors
under llama.cpp's names, shapes, types and metadata.

    .venv/bin/pytest tests/export/test_gguf.py -q

Whether llama.cpp then answers as transformers does is benchmarks/serve_llamacpp.py's job (it needs a build of
llama.cpp, not in CI).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants

from fixtures.trained import World, eval_world
from fixtures.models import Models, model_world
from llava_lora import cli
from llava_lora.export import gguf as gguf_export
from llava_lora.errors import UsageError

LM_LAYER = {"attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias",
            "attn_v.weight", "attn_v.bias", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight",
            "ffn_down.weight"}
V_LAYER = {f"{t}.{p}" for t in ("ln1", "ln2", "attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_down")
           for p in ("weight", "bias")}


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return eval_world(tmp_path_factory)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    return model_world(tmp_path_factory)


@pytest.fixture(scope="session")
def exported(world: World, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "merged"
    assert cli.main(["export", "--model", str(world.model), "--adapter", str(world.run), "--out", str(out),
                     "--dtype", "float32", "--check-samples", "1", "--format", "gguf"]) == 0
    return out


def hf_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}


def tensors(reader: GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def values(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (PyTorch) order."""
    return quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(list(reversed(t.shape.tolist())))


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.slow  # trains and exports a run (the eval world): `make test` runs it
def test_export_writes_the_gguf_files_and_modelfile(exported: Path):
    meta = json.loads((exported / "export.json").read_text())
    assert meta["gguf"] == ["model-q8_0.gguf", "mmproj-f16.gguf", "Modelfile"]
    assert meta["self_check"]["equal"] == 1  # the safetensors folder is still written and checked
    modelfile = (exported / "Modelfile").read_text().splitlines()
    assert modelfile[:2] == ["FROM ./model-q8_0.gguf", "FROM ./mmproj-f16.gguf"]
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and any("<|im_start|>assistant" in line for line in modelfile)


@pytest.mark.slow  # trains and exports a run (the eval world): `make test` runs it
def test_language_model_gguf_names_shapes_types_metadata(exported: Path):
    from transformers import AutoTokenizer

    cfg = json.loads((exported / "config.json").read_text())["text_config"]
    reader = GGUFReader(exported / "model-q8_0.gguf")
    got = tensors(reader)
    want = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}" for i in range(cfg["num_hidden_layers"]) for n in LM_LAYER}
    assert set(got) == want
    state = hf_state(exported)
    for name, t in got.items():
        assert t.tensor_type == (T.F32 if len(t.shape) == 1 else T.Q8_0), name
    hf = {"token_embd.weight": "language_model.model.embed_tokens.weight", "output.weight": "language_model.lm_head.weight",
          "blk.1.attn_q.weight": "language_model.model.layers.1.self_attn.q_proj.weight",
          "blk.0.ffn_down.weight": "language_model.model.layers.0.mlp.down_proj.weight",
          "blk.0.attn_k.bias": "language_model.model.layers.0.self_attn.k_proj.bias",
          "output_norm.weight": "language_model.model.norm.weight"}
    for name, key in hf.items():
        w = state[key].numpy()
        assert values(got[name]).shape == w.shape, name
        # q8_0: one scale per 32 values, each value within half a step of max|block| / 127
        tol = 0 if w.ndim == 1 else np.abs(w).max() / 127
        assert np.abs(values(got[name]) - w).max() <= tol + 1e-6, name

    assert field(reader, "general.architecture") == "qwen2"
    assert field(reader, "qwen2.block_count") == cfg["num_hidden_layers"]
    assert field(reader, "qwen2.embedding_length") == cfg["hidden_size"]
    assert field(reader, "qwen2.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert field(reader, "general.file_type") == 7  # MOSTLY_Q8_0
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "qwen2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    tok = AutoTokenizer.from_pretrained(exported)
    assert len(tokens) == cfg["vocab_size"] > len(tok)  # padded to the embedding rows
    assert tokens[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert tokens[len(tok)] == f"[PAD{len(tok)}]"
    image_id = tok.convert_tokens_to_ids("<image>")
    assert field(reader, "tokenizer.ggml.token_type")[image_id] == 3  # CONTROL: a special token
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    assert len(field(reader, "tokenizer.ggml.merges")) > 0
    template = field(reader, "tokenizer.chat_template")  # the chat format, less transformers' training tags
    assert "<|im_start|>assistant" in template and "{% generation %}" not in template
    assert template == (exported / "chat_template.jinja").read_text().replace(
        "{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.mark.slow  # trains and exports a run (the eval world): `make test` runs it
def test_mmproj_holds_the_tower_up_to_the_feature_layer_and_the_trained_projector(exported: Path):
    cfg = json.loads((exported / "config.json").read_text())
    vc = cfg["vision_config"]
    reader = GGUFReader(exported / "mmproj-f16.gguf")
    got = tensors(reader)
    keep = vc["num_hidden_layers"] - 1  # vision_feature_layer -2: the output of the last layer but one
    want = {"v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight", "v.pre_ln.bias",
            "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"} | {
        f"v.blk.{i}.{n}" for i in range(keep) for n in V_LAYER}
    assert set(got) == want  # no post_ln and no layer past the feature layer
    state = hf_state(exported)
    pairs = {"mm.0.weight": "multi_modal_projector.linear_1.weight", "mm.2.bias": "multi_modal_projector.linear_2.bias",
             "v.patch_embd.weight": "vision_tower.vision_model.embeddings.patch_embedding.weight",
             "v.class_embd": "vision_tower.vision_model.embeddings.class_embedding",
             "v.blk.0.attn_out.weight": "vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.weight"}
    for name, key in pairs.items():
        w = state[key].numpy()
        t = got[name]
        assert t.tensor_type == (T.F32 if w.ndim == 1 else T.F16), name
        expect = w if w.ndim == 1 else w.astype(np.float16).astype(np.float32)
        assert np.array_equal(values(t), expect), name

    assert field(reader, "general.architecture") == "clip"
    assert field(reader, "clip.projector_type") == "mlp"
    assert field(reader, "clip.has_vision_encoder") is True
    assert field(reader, "clip.use_gelu") is False  # CLIP's quick_gelu
    assert field(reader, "clip.vision.block_count") == keep
    assert field(reader, "clip.vision.feature_layer") == [keep]
    assert field(reader, "clip.vision.image_size") == vc["image_size"]
    assert field(reader, "clip.vision.patch_size") == vc["patch_size"]
    assert field(reader, "clip.vision.projection_dim") == cfg["text_config"]["hidden_size"]
    processor = json.loads((exported / "processor_config.json").read_text())["image_processor"]
    assert field(reader, "clip.vision.image_mean") == pytest.approx(processor["image_mean"])
    assert field(reader, "clip.vision.image_std") == pytest.approx(processor["image_std"])


@pytest.mark.parametrize("lm_type,qtype,file_type", [("f16", T.F16, 1), ("bf16", T.BF16, 32)])
def test_llama_gguf_is_tied_and_permuted_for_llama_cpp_rope(models: Models, tmp_path: Path, lm_type, qtype,
                                                             file_type):
    paths = gguf_export.write(models.llama_model, tmp_path, lm_type)
    reader = GGUFReader(paths[0])
    got = tensors(reader)
    assert "output.weight" not in got  # tied: llama.cpp reuses token_embd
    assert field(reader, "general.architecture") == "llama" and field(reader, "general.file_type") == file_type
    assert got["blk.0.attn_q.weight"].tensor_type == qtype
    cfg = json.loads((models.llama_model / "config.json").read_text())["text_config"]
    state = hf_state(models.llama_model)
    q = state["language_model.model.layers.0.self_attn.q_proj.weight"].numpy()
    k = state["language_model.model.layers.0.self_attn.k_proj.weight"].numpy()
    tol = 1e-2 * max(np.abs(q).max(), np.abs(k).max())  # bf16 keeps 8 bits of mantissa
    assert np.abs(values(got["blk.0.attn_q.weight"]) - gguf_export.llama_permute(q, cfg["num_attention_heads"])).max() < tol
    assert np.abs(values(got["blk.0.attn_k.weight"]) - gguf_export.llama_permute(k, cfg["num_key_value_heads"])).max() < tol
    # the permutation moves rows: without it the comparison would fail
    assert np.abs(values(got["blk.0.attn_q.weight"]) - q).max() > 10 * tol
    assert (tmp_path / "Modelfile").read_text().count('PARAMETER stop "<|eot_id|>"') == 1


def test_unknown_pre_tokenizer_is_refused_naming_the_file(models: Models, tmp_path: Path):
    folder = tmp_path / "model"
    shutil.copytree(models.qwen_model, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+"
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UsageError, match=r"tokenizer\.json: its pre-tokenizer is not one this exporter knows"):
        gguf_export.write(folder, tmp_path / "out", "f16")


def test_feature_layer_is_counted_as_llama_cpp_does():
    assert gguf_export.feature_layer(24, -2) == 23 and gguf_export.feature_layer(24, -1) == 24
    assert gguf_export.feature_layer(24, 5) == 5
    with pytest.raises(UsageError, match="outside a 24-layer vision tower"):
        gguf_export.feature_layer(24, -26)


def test_export_refuses_a_gguf_it_cannot_write_before_the_merge(models: Models, tmp_path: Path, monkeypatch,
                                                                 capsys):
    from llava_lora import cli
    from llava_lora.export import merge

    folder = tmp_path / "model"
    shutil.copytree(models.qwen_model, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+"
    (folder / "tokenizer.json").write_text(json.dumps(tok))

    def merged(*args, **kwargs):
        raise AssertionError("the merge ran before the GGUF check")

    monkeypatch.setattr(merge, "merge_checked", merged)
    assert cli.main(["export", "--model", str(folder), "--adapter", str(tmp_path / "run"), "--out",
                     str(tmp_path / "merged"), "--format", "gguf"]) == 2
    assert "tokenizer.json: its pre-tokenizer is not one this exporter knows" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_each_gguf_file_is_read_back_and_checked(models: Models, tmp_path: Path, monkeypatch):
    from llava_lora.errors import RunFailed

    real = gguf_export._encode

    def one_row_short(data, lm_type):  # a writer that loses a row of every matrix
        return real(data[:-1] if data.ndim == 2 else data, lm_type)

    monkeypatch.setattr(gguf_export, "_encode", one_row_short)
    with pytest.raises(RunFailed, match=r"model-f16\.gguf reads back .* tensors .*MERGED_DIR was not written"):
        gguf_export.write(models.qwen_model, tmp_path / "out", "f16")
    monkeypatch.setattr(gguf_export, "_encode", real)
    paths = gguf_export.write(models.qwen_model, tmp_path / "good", "f16")  # read back, every tensor and token
    with pytest.raises(RunFailed, match="does not read back"):
        paths[1].write_bytes(paths[1].read_bytes()[:100])
        gguf_export.read_back(paths[1], {})
