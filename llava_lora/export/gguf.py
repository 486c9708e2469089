"""Write a LLaVA folder (MODEL_DIR or MERGED_DIR) as GGUF files for llama.cpp and Ollama.

    llava-lora export --model MODEL_DIR --adapter RUN_DIR --out MERGED_DIR --format gguf [--gguf-type q8_0]

writes, beside MERGED_DIR's safetensors:
    model-<type>.gguf   the language model (f16, bf16 or q8_0; norms and biases stay f32)
    mmproj-f16.gguf     the CLIP tower up to the feature layer + the projector, as llama.cpp's mtmd reads them
    Modelfile           for `ollama create NAME -f Modelfile`

Both are written here with the ``gguf`` package, not llama.cpp's converters: its ``convert_hf_to_gguf.py`` is
not on PyPI and rejects a ``clip_vision_model`` for the mmproj. Names and keys are those of llama.cpp's
``src/llama-arch.cpp`` and ``tools/mtmd/clip-impl.h`` (``projector_type mlp``: LLaVA-1.5's projector).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import RunFailed, UsageError

LM_TYPES = ("f16", "bf16", "q8_0")
MMPROJ_FILE = "mmproj-f16.gguf"
MODELFILE = "Modelfile"

# llama.cpp architecture per transformers model_type; Llama's q/k rows are permuted for llama.cpp's RoPE
# layout (its "normal" rope pairs adjacent dims, HF's rotate_half pairs halves), Qwen2's use NEOX rope as HF does
ARCHS = {"qwen2": ("qwen2", False), "llama": ("llama", True)}

# llama.cpp fingerprints a BPE pre-tokenizer by the tokens of a test string; we know it by its split regex
PRE_TOKENIZERS = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "qwen2",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "llama-bpe",
}

GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")

LM_NAMES = {  # HF name under language_model.model. (N: layer) -> GGUF name
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "layers.N.input_layernorm.weight": "blk.N.attn_norm.weight",
    "layers.N.post_attention_layernorm.weight": "blk.N.ffn_norm.weight",
    "layers.N.self_attn.q_proj.weight": "blk.N.attn_q.weight",
    "layers.N.self_attn.q_proj.bias": "blk.N.attn_q.bias",
    "layers.N.self_attn.k_proj.weight": "blk.N.attn_k.weight",
    "layers.N.self_attn.k_proj.bias": "blk.N.attn_k.bias",
    "layers.N.self_attn.v_proj.weight": "blk.N.attn_v.weight",
    "layers.N.self_attn.v_proj.bias": "blk.N.attn_v.bias",
    "layers.N.self_attn.o_proj.weight": "blk.N.attn_output.weight",
    "layers.N.mlp.gate_proj.weight": "blk.N.ffn_gate.weight",
    "layers.N.mlp.up_proj.weight": "blk.N.ffn_up.weight",
    "layers.N.mlp.down_proj.weight": "blk.N.ffn_down.weight",
}
VISION_NAMES = {  # HF name under vision_tower.[vision_model.] -> GGUF name; post_layernorm is never used
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
    **{f"encoder.layers.N.{hf}.{p}": f"v.blk.N.{gg}.{p}" for hf, gg in (
        ("layer_norm1", "ln1"), ("layer_norm2", "ln2"), ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"), ("self_attn.out_proj", "attn_out"),
        ("mlp.fc1", "ffn_up"), ("mlp.fc2", "ffn_down")) for p in ("weight", "bias")},
}
PROJECTOR_NAMES = {"linear_1.weight": "mm.0.weight", "linear_1.bias": "mm.0.bias",
                   "linear_2.weight": "mm.2.weight", "linear_2.bias": "mm.2.bias"}

def lm_file(lm_type: str) -> str:
    return f"model-{lm_type}.gguf"


def _rename(name: str, table: dict[str, str]) -> str | None:
    """HF -> GGUF name through ``table``, whose N stands for a layer number."""
    m = re.match(r"^(.*?)\.(\d+)\.(.*)$", name)
    if m and f"{m[1]}.N.{m[3]}" in table:
        return table[f"{m[1]}.N.{m[3]}"].replace(".N.", f".{m[2]}.")
    return table.get(name)


def read_tensors(folder: Path) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(key, loader of its float32 array) for every tensor in the folder's safetensors files, one at a time."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{folder}: no *.safetensors weights to convert")
    for f in files:
        with safe_open(str(f), "pt") as s:
            for key in s.keys():
                yield key, (lambda s=s, key=key: s.get_tensor(key).float().numpy())


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(data: np.ndarray, lm_type: str):
    """(array, ggml type) a tensor is stored as: 1-D tensors in f32, matrices in ``lm_type`` (q8_0 falls back
    to f16 for rows not a multiple of its 32-value blocks, as llama.cpp's converter does)."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if data.ndim <= 1:
        return data.astype(np.float32), T.F32
    if lm_type == "q8_0" and data.shape[-1] % 32 == 0:
        return quants.quantize(data, T.Q8_0), T.Q8_0
    if lm_type == "bf16":
        return quants.quantize(data, T.BF16), T.BF16
    return data.astype(np.float16), T.F16


def pre_tokenizer(folder: Path) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenizer, from the split regex in tokenizer.json."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    pre = tok.get("pre_tokenizer") or {}
    for p in [pre, *pre.get("pretokenizers", [])]:
        regex = (p.get("pattern") or {}).get("Regex") if p.get("type") == "Split" else None
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
    raise UsageError(f"{folder / 'tokenizer.json'}: its pre-tokenizer is not one this exporter knows "
                     f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); convert the language model with "
                     "llama.cpp's convert_hf_to_gguf.py instead")


def _vocab(folder: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and their types, padded to the embedding rows, as convert_hf_to_gguf's get_vocab_base does."""
    from gguf import TokenType
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    return tokens, types


def _text_config(folder: Path):
    """(the language model's config, llama.cpp's arch, whether q/k rows are permuted, its rope parameters), checked
    to be something this exporter writes."""
    from transformers import AutoConfig

    tc = AutoConfig.from_pretrained(folder).text_config
    if tc.model_type not in ARCHS:
        raise UsageError(f"{folder}: a '{tc.model_type}' language model; GGUF export knows {', '.join(ARCHS)}")
    rope = getattr(tc, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UsageError(f"{folder}: rope scaling '{rope['rope_type']}' is not exported to GGUF")
    return (tc, *ARCHS[tc.model_type], rope)


def _add_lm_hyperparameters(w, tc, rope: dict, lm_type: str) -> None:
    import gguf

    w.add_context_length(tc.max_position_embeddings)
    w.add_embedding_length(tc.hidden_size)
    w.add_block_count(tc.num_hidden_layers)
    w.add_feed_forward_length(tc.intermediate_size)
    w.add_head_count(tc.num_attention_heads)
    w.add_head_count_kv(tc.num_key_value_heads)
    w.add_rope_dimension_count(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(tc.rms_norm_eps)
    w.add_vocab_size(tc.vocab_size)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[lm_type])


def _add_tokenizer(w, folder: Path, n_vocab: int) -> list[str]:
    """The vocabulary, merges, special tokens and chat template; returns the tokens."""
    import gguf

    tokens, types = _vocab(folder, n_vocab)
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre(pre_tokenizer(folder))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    if isinstance(special.chat_template, str):  # {% generation %} marks training targets; llama.cpp's Jinja lacks it
        special.chat_template = GENERATION_TAG.sub("", special.chat_template)
    special.add_to_gguf(w)
    return tokens


def _lm_tensors(folder: Path, tc, permute: bool) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of each language-model tensor, q/k rows in llama.cpp's order."""
    for key, load in read_tensors(folder):
        if key == "language_model.lm_head.weight":
            name = "output.weight"
        elif key.startswith("language_model.model."):
            name = _rename(key.removeprefix("language_model.model."), LM_NAMES)
            if name is None:
                raise UsageError(f"{folder}: no GGUF name for the language model tensor {key}")
        else:
            continue
        data = load()
        if permute and name.endswith(("attn_q.weight", "attn_q.bias")):
            data = llama_permute(data, tc.num_attention_heads)
        elif permute and name.endswith(("attn_k.weight", "attn_k.bias")):
            data = llama_permute(data, tc.num_key_value_heads)
        yield name, data


def write_lm(folder: Path, path: Path, lm_type: str) -> None:
    """The language model of a LLaVA folder as one GGUF file."""
    import gguf

    tc, arch, permute, rope = _text_config(folder)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(folder.name)
    _add_lm_hyperparameters(w, tc, rope, lm_type)
    tokens = _add_tokenizer(w, folder, tc.vocab_size)
    shapes = {}
    for name, data in _lm_tensors(folder, tc, permute):
        shapes[name] = data.shape
        data, qtype = _encode(data, lm_type)
        w.add_tensor(name, data, raw_dtype=qtype)
    _finish(w)
    read_back(path, shapes, tokens)


def feature_layer(n_layers: int, hf_layer: int) -> int:
    """HF's vision_feature_layer (an index into hidden_states, which start with the embeddings) as llama.cpp's
    non-negative ``clip.vision.feature_layer``: the number of encoder layers run before the features are taken."""
    k = hf_layer if hf_layer >= 0 else n_layers + 1 + hf_layer
    if not 0 < k <= n_layers:
        raise UsageError(f"vision_feature_layer {hf_layer} is outside a {n_layers}-layer vision tower")
    return k


def _mmproj_config(folder: Path):
    """The LLaVA config, checked to be a projector and tower that llama.cpp's mtmd runs."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    vc = cfg.vision_config
    if cfg.vision_feature_select_strategy != "default" or cfg.projector_hidden_act != "gelu" or \
            not isinstance(cfg.vision_feature_layer, int):
        raise UsageError(f"{folder}: llama.cpp's LLaVA projector needs vision_feature_select_strategy 'default', "
                         f"one int vision_feature_layer and projector_hidden_act 'gelu'; this model has "
                         f"{cfg.vision_feature_select_strategy!r}, {cfg.vision_feature_layer!r}, "
                         f"{cfg.projector_hidden_act!r}")
    if vc.hidden_act not in ("quick_gelu", "gelu"):
        raise UsageError(f"{folder}: vision activation {vc.hidden_act!r}; llama.cpp's CLIP runs quick_gelu or gelu")
    return cfg


def _add_mmproj_hyperparameters(w, cfg, keep: int, image_processor) -> None:
    import gguf

    vc = cfg.vision_config
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.use_gelu", vc.hidden_act == "gelu")  # false: quick_gelu, CLIP's own
    w.add_uint32("clip.vision.image_size", vc.image_size)
    w.add_uint32("clip.vision.patch_size", vc.patch_size)
    w.add_uint32("clip.vision.embedding_length", vc.hidden_size)
    w.add_uint32("clip.vision.feed_forward_length", vc.intermediate_size)
    w.add_uint32("clip.vision.block_count", keep)
    w.add_uint32("clip.vision.projection_dim", cfg.text_config.hidden_size)
    w.add_uint32("clip.vision.attention.head_count", vc.num_attention_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", vc.layer_norm_eps)
    w.add_array("clip.vision.feature_layer", [keep])
    w.add_array("clip.vision.image_mean", [float(x) for x in image_processor.image_mean])
    w.add_array("clip.vision.image_std", [float(x) for x in image_processor.image_std])


def _mmproj_tensors(folder: Path, keep: int) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of the projector's and the tower's tensors, up to layer ``keep``."""
    for key, load in read_tensors(folder):
        if key.startswith("multi_modal_projector."):
            name = PROJECTOR_NAMES.get(key.removeprefix("multi_modal_projector."))
        elif key.startswith("vision_tower."):
            sub = key.removeprefix("vision_tower.").removeprefix("vision_model.")  # both layouts
            if sub.startswith("post_layernorm."):
                continue
            name = _rename(sub, VISION_NAMES)
            m = re.match(r"v\.blk\.(\d+)\.", name or "")
            if m and int(m[1]) >= keep:
                continue  # past the feature layer: never run
        else:
            continue
        if name is None:
            raise UsageError(f"{folder}: no GGUF name for the tensor {key}")
        yield name, load()


def write_mmproj(folder: Path, path: Path) -> None:
    """The CLIP tower (only the layers up to the feature layer) and the projector as llama.cpp's mmproj."""
    import gguf
    from transformers import AutoImageProcessor

    cfg = _mmproj_config(folder)
    keep = feature_layer(cfg.vision_config.num_hidden_layers, cfg.vision_feature_layer)
    image_processor = AutoImageProcessor.from_pretrained(folder)
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name(f"{folder.name} mmproj")
    _add_mmproj_hyperparameters(w, cfg, keep, image_processor)
    shapes = {}
    for name, data in _mmproj_tensors(folder, keep):
        shapes[name] = data.shape
        # llama.cpp's conv and get_rows read f16 weights; 1-D tensors (norms, biases, CLS) stay f32
        data, qtype = _encode(data, "f16")
        w.add_tensor(name, data, raw_dtype=qtype)
    _finish(w)
    read_back(path, shapes)


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_back(path: Path, shapes: dict[str, tuple], tokens: list[str] | None = None) -> None:
    """``path`` read back with the gguf library: every tensor there (no other) in its source's shape, and the
    tokenizer's tokens; RunFailed otherwise (MERGED_DIR is then not written)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        got = {t.name: tuple(reversed(t.shape.tolist())) for t in reader.tensors}  # ggml order -> numpy's
        stored = reader.fields["tokenizer.ggml.tokens"].contents() if tokens is not None else None
    except Exception as e:  # a file the library cannot parse
        raise RunFailed(f"{path.name} does not read back: {type(e).__name__}: {e}; MERGED_DIR was not written") from None
    want = {name: tuple(shape) for name, shape in shapes.items()}
    if got != want:
        wrong = sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))
        raise RunFailed(f"{path.name} reads back {len(got)} tensors for {len(want)} written; {wrong[0]}: "
                        f"{got.get(wrong[0])} for {want.get(wrong[0])}; MERGED_DIR was not written")
    if tokens is not None and stored != tokens:
        raise RunFailed(f"{path.name} reads back {len(stored or [])} tokenizer tokens for the {len(tokens)} "
                        "written, or others; MERGED_DIR was not written")


def check_writable(folder: Path, lm_type: str) -> None:
    """Refuse, from MODEL_DIR's config and tokenizer alone, what ``write`` would: before minutes of merging."""
    if lm_type not in LM_TYPES:
        raise UsageError(f"--gguf-type {lm_type}: not one of {', '.join(LM_TYPES)}")
    _text_config(folder)
    pre_tokenizer(folder)
    cfg = _mmproj_config(folder)
    feature_layer(cfg.vision_config.num_hidden_layers, cfg.vision_feature_layer)


def modelfile(folder: Path, lm_type: str) -> str:
    """An Ollama Modelfile: the two GGUF files (Ollama takes the second FROM as the projector), the chat format."""
    from ..chat import templates

    template_file = folder / "chat_template.jinja"
    family = templates.family(template_file.read_text()) if template_file.is_file() else "generic"
    lines = [f"FROM ./{lm_file(lm_type)}", f"FROM ./{MMPROJ_FILE}"]
    if family in templates.OLLAMA_TEMPLATES:
        template, stops = templates.OLLAMA_TEMPLATES[family]
        lines.append(f'TEMPLATE """{template}"""')
        lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def write(folder: Path, out: Path, lm_type: str) -> list[Path]:
    """The GGUF files and Modelfile of the LLaVA ``folder``, written into ``out``, each read back and checked."""
    check_writable(folder, lm_type)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / lm_file(lm_type), out / MMPROJ_FILE, out / MODELFILE]
    write_lm(folder, paths[0], lm_type)
    write_mmproj(folder, paths[1])
    paths[2].write_text(modelfile(folder, lm_type))
    return paths
