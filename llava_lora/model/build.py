"""Compose a chat LLM and a CLIP vision encoder into a plain transformers LLaVA checkpoint.

    llava-lora build --llm Qwen/Qwen1.5-4B-Chat --vision openai/clip-vit-large-patch14-336 --out MODEL_DIR

MODEL_DIR loads with ``LlavaForConditionalGeneration.from_pretrained`` + ``AutoProcessor.from_pretrained``
and no code of ours. The composed model is constructed on the ``meta`` device and its tensors are the
loaded source tensors themselves (``assign=True``), so peak memory stays near one copy of the weights. The
folder is written next to its destination and renamed into place only after it has been reloaded and
checked, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..chat import templates
from ..config import field
from ..errors import UsageError
from ..outdirs import OVERWRITE_HELP, check_out, new_folder
from ..tables import format_table
from . import layout
from .load import quiet_transformers
from .parts import format_param_stats, param_stats
from .precision import DtypeName, dtype_name, resolve_dtype


@dataclass
class BuildConfig:
    llm: str = field(help="chat causal LM: hub id or local folder")
    vision: str = field(help="CLIP or SigLIP checkpoint (full or vision-only): hub id or local folder")
    out: str = field(help="MODEL_DIR to write")
    dtype: DtypeName = field("auto", help="dtype of the composed model; auto: the LLM's own dtype")
    chat_template: str | None = field(None, help="Jinja chat template file, for an LLM that has none")
    image_token: str = field("<image>", help="the image placeholder token added to the tokenizer")
    vision_feature_layer: int = field(-2, help="vision tower layer whose features feed the projector")
    projector_hidden_act: str = field("gelu", help="activation between the projector's two linear layers")
    seed: int = field(0, help="seed of the projector's random initialisation")
    overwrite: bool = field(False, help=OVERWRITE_HELP)


def _load_config(src: str, flag: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {src}: cannot read a model config ({str(e).splitlines()[0]})") from None


def _llm_config(src: str):
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg = _load_config(src, "--llm")
    if type(cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UsageError(f"--llm {src} is a '{cfg.model_type}' checkpoint, not a causal language model")
    return cfg


# Vision families a LLaVA can hold: (tower class, feature strategy, extra tokens the tower adds per image).
# CLIP has a CLS token, which LLaVA's "default" strategy drops; SigLIP has none, so every patch is kept ("full").
VISION_FAMILIES = {
    "clip": ("CLIPVisionModel", "default", 1),
    "siglip": ("SiglipVisionModel", "full", 0),
}
# model_type -> family; a full (image + text) checkpoint's vision part is taken
_VISION_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}


def _vision_config(src: str):
    """(the vision tower's config, its family)."""
    cfg = _load_config(src, "--vision")
    if cfg.model_type in ("siglip2", "siglip2_vision_model"):
        raise UsageError(f"--vision {src} is a SigLIP2 NaFlex tower ('{cfg.model_type}'): it needs per-image patch "
                         "masks and shapes that LlavaForConditionalGeneration does not pass; a SigLIP2 checkpoint "
                         "saved as model_type 'siglip' (fixed resolution) composes like SigLIP")
    if cfg.model_type not in _VISION_TYPES:
        raise UsageError(f"--vision {src} is a '{cfg.model_type}' checkpoint, not CLIP or SigLIP (one of "
                         f"{', '.join(_VISION_TYPES)})")
    return getattr(cfg, "vision_config", cfg), _VISION_TYPES[cfg.model_type]


def _chat_template(tokenizer, src: str, template_file: str | None) -> str:
    if template_file:
        path = Path(template_file)
        if not path.is_file():
            raise UsageError(f"--chat-template {path}: file not found")
        return path.read_text()
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise UsageError(f"--llm {src} has no chat template; pass one with --chat-template FILE")
    return template


def _trainable_template(tokenizer, template: str, cfg: BuildConfig) -> str:
    """The composed model's template, proven (before any weight loads) to mark exactly the answers."""
    composed = templates.llava_template(template, cfg.image_token, tokenizer)
    try:
        templates.check(tokenizer, template, composed, cfg.image_token)
    except Exception as e:  # a template error (jinja, raise_exception) is the template's fault, like a wrong mask
        source = f"--chat-template {cfg.chat_template}" if cfg.chat_template else f"the chat template of --llm {cfg.llm}"
        raise UsageError(f"{source} ({templates.family(template)} family) cannot be trained on: {e}. Pass a template "
                         "whose assistant turns sit in {% generation %} ... {% endgeneration %} with --chat-template "
                         "FILE") from None
    return composed


def _digest(t: torch.Tensor) -> str:
    """A content hash of a tensor's bytes: compare checkpoints without holding two copies in memory."""
    flat = t.detach().contiguous().reshape(-1)
    return hashlib.blake2b(flat.view(torch.uint8).numpy().data, digest_size=16).hexdigest() + str(t.dtype)


def _source_digests(prefix: str, state: dict[str, torch.Tensor], rows: int | None = None,
                     embedding_keys: tuple[str, ...] = ()) -> dict[str, tuple[str, int | None]]:
    """Composed-key -> (digest, rows compared); resized embeddings are compared on their source rows."""
    out = {}
    for k, t in state.items():
        if k in embedding_keys and rows is not None:
            out[prefix + k] = (_digest(t[:rows]), rows)
        else:
            out[prefix + k] = (_digest(t), None)
    return out


def _adopt(target: torch.nn.Module, source: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make ``target`` (built on meta) use ``source``'s tensors, non-persistent buffers (rotary
    frequencies, position ids) included, without copying them."""
    target.load_state_dict(state, assign=True, strict=True)
    for name, buf in source.named_buffers():
        if name not in state:
            module_path, _, leaf = name.rpartition(".")
            target.get_submodule(module_path).register_buffer(leaf, buf, persistent=False)


def _end_of_turn_ids(tokenizer, llm_generation_config) -> list[int]:
    """The LLM's stop tokens plus the chat end-of-turn token, so generation ends at e.g. <|im_end|>."""
    ids: list[int] = []
    eos = getattr(llm_generation_config, "eos_token_id", None) if llm_generation_config is not None else None
    ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    for tok in (tokenizer.eos_token, "<|im_end|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok and tok in tokenizer.get_vocab() else None
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids


@dataclass
class _Sources:
    """What the two sources say, checked before any weight loads."""

    vision_config: Any
    vision_family: str  # a key of VISION_FAMILIES
    tokenizer: Any
    template: str  # the LLM's chat template
    llava_template: str  # the composed model's, proven to mark exactly the answers
    src_dtype: torch.dtype  # the LLM's, as saved
    dtype: torch.dtype  # the composed model's


def _read_sources(cfg: BuildConfig) -> _Sources:
    from transformers import AutoTokenizer

    llm_cfg = _llm_config(cfg.llm)
    vision_cfg, vision_family = _vision_config(cfg.vision)
    tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
    template = _chat_template(tokenizer, cfg.llm, cfg.chat_template)
    llava_template = _trainable_template(tokenizer, template, cfg)
    if cfg.image_token in tokenizer.get_vocab():
        raise UsageError(f"the tokenizer of {cfg.llm} already has '{cfg.image_token}' (id "
                         f"{tokenizer.convert_tokens_to_ids(cfg.image_token)}); pick another with --image-token")
    src_dtype = getattr(llm_cfg, "dtype", None) or torch.float32
    src_dtype = getattr(torch, src_dtype) if isinstance(src_dtype, str) else src_dtype
    dtype = src_dtype if cfg.dtype == "auto" else resolve_dtype(cfg.dtype)
    return _Sources(vision_cfg, vision_family, tokenizer, template, llava_template, src_dtype, dtype)


def _load_weights(cfg: BuildConfig, src: _Sources):
    """(the LLM, the vision tower, its image processor), in the composed model's dtype."""
    import transformers
    from transformers import AutoImageProcessor, AutoModelForCausalLM

    tower_class = VISION_FAMILIES[src.vision_family][0]
    with quiet_transformers():  # CLIPModel's text tower is skipped on purpose: no "UNEXPECTED keys" table
        llm = AutoModelForCausalLM.from_pretrained(cfg.llm, dtype=src.dtype)
        vision = getattr(transformers, tower_class).from_pretrained(cfg.vision, dtype=src.dtype)
    return llm, vision, AutoImageProcessor.from_pretrained(cfg.vision, backend="pil")


def _add_image_token(tokenizer, llm, image_token: str) -> tuple[int, int, bool]:
    """(the image token's id, the LLM's embedding rows before, whether they grew); a pad token is set too."""
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    src_rows = llm.get_input_embeddings().weight.shape[0]
    resized = len(tokenizer) > src_rows
    if resized:  # new rows from the mean and covariance of the old ones (transformers' mean_resizing)
        with quiet_transformers():
            llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=True)
    if tokenizer.pad_token is None:  # batched generation pads; labels come from assistant masks, not pad ids
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(image_token), src_rows, resized


def _check_feature_layer(layer: int, layers: int) -> None:
    """An index into the tower's hidden states (the embeddings first, then one per layer), as transformers reads it."""
    if not -(layers + 1) <= layer <= layers:
        raise UsageError(f"--vision-feature-layer {layer}: the vision tower has {layers} layers, so its hidden states "
                         f"are indexed {-(layers + 1)}..{layers} (-1: the last layer, -2: LLaVA's choice)")
    if layer == 0:  # transformers 5.24's LLaVA asks the tower for hidden states with this number: 0 reads as "none"
        raise UsageError(f"--vision-feature-layer 0 (the embeddings) fails in transformers' LLaVA, which reads 0 as "
                         f"'no hidden states': give the same layer as {-(layers + 1)}")


def _llava_config(cfg: BuildConfig, src: _Sources, llm, image_token_id: int, tied: bool):
    from transformers import LlavaConfig

    vision_cfg = src.vision_config
    _check_feature_layer(cfg.vision_feature_layer, vision_cfg.num_hidden_layers)
    config = LlavaConfig(
        vision_config=vision_cfg.to_dict(), text_config=llm.config.to_dict(), image_token_id=image_token_id,
        image_seq_length=(vision_cfg.image_size // vision_cfg.patch_size) ** 2,  # patches (CLIP's CLS dropped)
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=VISION_FAMILIES[src.vision_family][1],
        projector_hidden_act=cfg.projector_hidden_act, tie_word_embeddings=tied,
    )
    config.dtype = src.dtype
    return config


def _decoder(llm):
    return llm.get_decoder() if hasattr(llm, "get_decoder") else llm.base_model


def _expected_digests(llm, vision, rows: int | None, tied: bool) -> dict[str, tuple[str, int | None]]:
    """What ``verify`` compares after reloading: composed key -> digest of each source tensor (of its first
    ``rows`` rows for a resized embedding)."""
    expected = _source_digests("model.language_model.", _decoder(llm).state_dict(), rows, ("embed_tokens.weight",))
    expected.update(_source_digests("model.vision_tower.", vision.state_dict()))
    if not tied:
        lm_head = {"lm_head.weight": llm.get_output_embeddings().weight}
        expected.update(_source_digests("", lm_head, rows, ("lm_head.weight",)))
    return expected


def _assemble(config, llm, vision, tied: bool, seed: int):
    """The LLaVA model, built on meta and holding the sources' own tensors (no copy), with a fresh projector."""
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    base = _decoder(llm)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    _adopt(model.model.language_model, base, base.state_dict())
    _adopt(model.model.vision_tower, vision, vision.state_dict())
    torch.manual_seed(seed)
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(config.dtype)
    if tied:
        model.tie_weights()
    else:
        model.lm_head.load_state_dict({"weight": llm.get_output_embeddings().weight}, assign=True, strict=True)
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise RuntimeError(f"buffer {name} was not filled from the sources")  # a bug of ours, not bad input
    return model


def _generation_config(tokenizer, llm):
    from transformers import GenerationConfig

    source = getattr(llm, "generation_config", None)
    return GenerationConfig(eos_token_id=_end_of_turn_ids(tokenizer, source), pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=getattr(source, "bos_token_id", None))


def _save_processor(cfg: BuildConfig, src: _Sources, image_processor, workdir: Path) -> None:
    from transformers import LlavaProcessor

    _, strategy, extra_tokens = VISION_FAMILIES[src.vision_family]
    src.tokenizer.chat_template = src.llava_template
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=src.tokenizer, patch_size=src.vision_config.patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=extra_tokens,  # CLIP's CLS
        chat_template=src.llava_template, image_token=cfg.image_token,
    )
    processor.save_pretrained(workdir)


def compose(cfg: BuildConfig, workdir: Path) -> dict:
    """Write the composed checkpoint into ``workdir``; return what the report needs to check it."""
    src = _read_sources(cfg)
    llm, vision, image_processor = _load_weights(cfg, src)
    image_token_id, src_rows, resized = _add_image_token(src.tokenizer, llm, cfg.image_token)
    tied = bool(getattr(llm.config, "tie_word_embeddings", False))
    config = _llava_config(cfg, src, llm, image_token_id, tied)
    expected = _expected_digests(llm, vision, src_rows if resized else None, tied)
    model = _assemble(config, llm, vision, tied, cfg.seed)
    model.generation_config = _generation_config(src.tokenizer, llm)
    stats = param_stats(model)
    with quiet_transformers():
        layout.save_model(model, workdir)
    _save_processor(cfg, src, image_processor, workdir)
    del model, llm, vision  # before verify loads the checkpoint back: one copy of the weights at a time
    gc.collect()
    return {
        "expected": expected, "dtype": dtype_name(src.dtype), "src_dtype": dtype_name(src.src_dtype),
        "resized": resized, "src_rows": src_rows, "tied": tied, "params": stats,
        "image_tokens": config.image_seq_length, "template_family": templates.family(src.template),
        "vision_family": src.vision_family, "feature_strategy": config.vision_feature_select_strategy,
    }


def verify(workdir: Path, built: dict) -> dict:
    """Reload with plain transformers; every source tensor must come back bit for bit, and one templated
    prompt with one image must carry as many image tokens as the tower yields features."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    with quiet_transformers():
        model = LlavaForConditionalGeneration.from_pretrained(workdir, dtype="auto")
    state = model.state_dict()
    expected = built["expected"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise RuntimeError(f"reloaded model lacks {len(missing)} source tensors, e.g. {missing[:3]}")
    bad = [k for k, (digest, rows) in expected.items()
           if _digest(state[k] if rows is None else state[k][:rows]) != digest]
    if bad:
        raise RuntimeError(f"{len(bad)} tensors differ from their sources after reloading, e.g. {bad[:3]}")

    processor = AutoProcessor.from_pretrained(workdir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    size = getattr(processor.image_processor, "crop_size", None) or processor.image_processor.size  # SigLIP: no crop
    inputs = processor(text=prompt, images=Image.new("RGB", (size["width"], size["height"])), return_tensors="pt")
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=inputs["pixel_values"].to(model.dtype)).pooler_output
    n_features = sum(f.shape[0] for f in feats)
    if n_tokens != n_features or n_tokens != built["image_tokens"]:
        raise RuntimeError(f"image tokens in the prompt ({n_tokens}) != image features ({n_features})")
    del model, state
    gc.collect()
    return {"tensors_checked": len(expected), "image_tokens": n_tokens, "image_features": n_features}


def main(cfg: BuildConfig) -> int:
    out = Path(cfg.out)
    check_out(out, cfg.overwrite, inputs={"--llm": cfg.llm, "--vision": cfg.vision})
    t0 = time.time()
    with new_folder(out, cfg.overwrite, label="building") as work:  # renamed into place once reloaded and checked
        built = compose(cfg, work)
        checked = verify(work, built)
        report = {
            "llava_lora_version": __version__, "llm": cfg.llm, "vision": cfg.vision, "dtype": built["dtype"],
            "llm_dtype": built["src_dtype"], "tie_word_embeddings": built["tied"],
            "embeddings_resized": built["resized"], "llm_vocab_rows": built["src_rows"],
            "chat_template_family": built["template_family"], "image_tokens_per_image": built["image_tokens"],
            "vision_family": built["vision_family"], "vision_feature_select_strategy": built["feature_strategy"],
            "parameters": built["params"], "checks": checked, "seconds": round(time.time() - t0, 2),
            "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        }
        (work / "build_report.json").write_text(json.dumps(report, indent=2))
    print(format_build_report(report, out))
    return 0


def format_build_report(report: dict, out: Path) -> str:
    facts = [
        {"": "llm", "value": report["llm"]}, {"": "vision", "value": report["vision"]},
        {"": "dtype", "value": f"{report['dtype']} (llm on disk: {report['llm_dtype']})"},
        {"": "tied embeddings", "value": report["tie_word_embeddings"]},
        {"": "embeddings resized", "value": report["embeddings_resized"]},
        {"": "chat template", "value": report["chat_template_family"]},
        {"": "vision tower", "value": f"{report['vision_family']} (features: {report['vision_feature_select_strategy']})"},
        {"": "image tokens / image", "value": report["image_tokens_per_image"]},
        {"": "tensors checked", "value": f"{report['checks']['tensors_checked']} equal to their sources"},
    ]
    return (f"built {out} in {report['seconds']} s\n\n{format_table(facts, ['', 'value'])}\n\n"
            f"{format_param_stats(report['parameters'], trainable=False)}")
