"""What the benchmarks run on: model shapes (``benchmarks/shapes/*.yaml``) built with random weights, and a
synthetic CC3M-like data set. Nothing is downloaded.

    from workloads import make_model, cc3m_like          # from a script in benchmarks/
    model_dir = make_model(root, "proportional")         # root/{qwen2,clip,model}; ~5 s ("real-vocab": ~15 s)
    data_dir = cc3m_like(root / "data", n=60, tokenizer=AutoTokenizer.from_pretrained(model_dir))

A shape names a Qwen2 LM (hidden size, layers, MLP width, vocabulary, heads) and a CLIP vision tower (image
size, patch, hidden size, layers); ``llava-lora build`` composes the two, as a user would compose real ones.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import torch
import yaml

from llava_lora import build, tiny

SHAPES_DIR = Path(__file__).with_name("shapes")
# The LLaVA-CC3M-Pretrain-595K instructions (a few of its 11): one turn, a brief description asked.
INSTRUCTIONS = ("Describe the image concisely.", "Provide a brief description of the given image.",
                "Summarize the visual content of the image.", "Share a concise interpretation of the image provided.",
                "Render a clear and concise summary of the photo.")
CAPTION_TOKENS = (10, 30)  # CC3M captions: 10 to 30 tokens


def shapes() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.yaml"))


def load_shape(name: str) -> dict:
    """``{"llm": {...}, "vision": {...}}`` of ``benchmarks/shapes/NAME.yaml``."""
    path = SHAPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(shapes())}")
    return yaml.safe_load(path.read_text())


def proportional_qwen2(out: Path, hidden_size: int, num_layers: int, intermediate_size: int, vocab_size: int,
                       heads: int, kv_heads: int, seed: int = 0) -> Path:
    """A randomly initialised Qwen2 chat LM of the given shape, with llava_lora.tiny's ChatML tokenizer (fp32)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = tiny.qwen2_tokenizer()
    assert vocab_size > len(tok)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.02,
                      bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    ends = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config = GenerationConfig(eos_token_id=ends, pad_token_id=ends[1], bos_token_id=None)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_model(root: Path, shape: str = "proportional") -> Path:
    """MODEL_DIR ``root/model`` of the named shape (sources in ``root/qwen2`` and ``root/clip``)."""
    spec = load_shape(shape)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        llm = proportional_qwen2(root / "qwen2", **spec["llm"])
        vision = tiny.tiny_clip(root / "clip", **spec["vision"])
        build.main(build.BuildConfig(llm=str(llm), vision=str(vision), out=str(root / "model")))
    return root / "model"


def _photo(rng: random.Random, path: Path) -> None:
    """A photo-like JPEG of a CC3M-like size (300-500 x 240-400): gradient, a shape, blurred colour noise."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = rng.randint(300, 500), rng.randint(240, 400)
    base = Image.linear_gradient("L").resize((w, h)).rotate(rng.randint(0, 359))
    img = Image.merge("RGB", [base.point(lambda v, s=rng.random(): int(v * s + 60)) for _ in range(3)])
    x0, y0 = rng.randint(0, w // 2), rng.randint(0, h // 2)
    box = (x0, y0, x0 + rng.randint(40, w // 2), y0 + rng.randint(40, h // 2))
    ImageDraw.Draw(img).ellipse(box, fill=tuple(rng.randint(0, 255) for _ in range(3)))
    noise = Image.merge("RGB", [Image.effect_noise((w, h), 40) for _ in range(3)])
    Image.blend(img, noise.filter(ImageFilter.GaussianBlur(0.6)), 0.25).save(path, quality=85)


def _caption(rng: random.Random, tokenizer, n_tokens: int) -> str:
    """Words of the tiny tokenizer's corpus until the caption is ``n_tokens`` tokens long."""
    words: list[str] = []
    while True:
        words.append(rng.choice(tiny._WORDS))
        text = " ".join(words)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= n_tokens:
            return text


def cc3m_like(out: Path, n: int, tokenizer, seed: int = 0) -> Path:
    """``out/chat.json`` (LLaVA format, CC3M layout) + ``out/images_dl/*.jpg``: one turn per record,
    ``<image>`` and a brief-description instruction, answered by a caption of 10-30 tokens."""
    rng = random.Random(f"cc3m-like-{seed}")
    images = out / "images_dl"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rid = f"GCC_train_{i:09d}"
        _photo(rng, images / f"{rid}.jpg")
        question = rng.choice(INSTRUCTIONS)
        human = f"{question}\n<image>" if rng.random() < 0.5 else f"<image>\n{question}"
        caption = _caption(rng, tokenizer, rng.randint(*CAPTION_TOKENS))
        records.append({"id": rid, "image": f"{rid}.jpg", "conversations": [
            {"from": "human", "value": human}, {"from": "gpt", "value": caption}]})
    (out / "chat.json").write_text(json.dumps(records, indent=1))
    return out
