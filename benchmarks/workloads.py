"""What the benchmarks run on: model shapes (``benchmarks/shapes/*.yaml``) built with random weights, and a
synthetic CC3M-like data set. Nothing is downloaded.

    from workloads import make_model, cc3m_like          # from a script in benchmarks/
    model_dir = make_model(root, "proportional")         # root/{qwen2,clip,model}; ~5 s ("real-vocab": ~15 s)
    data_dir = cc3m_like(root / "data", n=60, tokenizer=AutoTokenizer.from_pretrained(model_dir))

A shape names a Qwen2 LM (hidden size, layers, MLP width, vocabulary, heads) and a CLIP vision tower (image
size, patch, hidden size, layers); ``llava-lora build`` composes the two, as a user would compose real ones.
``step_flops`` counts the matmul FLOPs of one training step of any such model (both training benchmarks use it).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import torch
import yaml

from llava_lora.model import build
from llava_lora.tiny import checkpoints as tiny

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
    """A randomly initialised Qwen2 chat LM of the given shape, with llava_lora.tiny.checkpoints's ChatML tokenizer (fp32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tiny.qwen2_tokenizer()
    assert vocab_size > len(tok)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.02,
                      bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    torch.manual_seed(seed)
    return tiny.save_qwen2_chat(Qwen2ForCausalLM(cfg), tok, out)


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


def step_flops(config, lengths: list[int], supervised: int, images: int, r: int, vision_layers: int | None = None,
               recompute: bool = False) -> dict[str, int]:
    """FLOPs of one training step of LlavaLoss (forward + backward), matmuls only, term by term.

    A matmul [m, k] x [k, n] costs 2·m·n·k FLOPs (one multiply and one add per product). Norms, rotary, softmax,
    activations, the loss and the optimizer are not matmuls and are left out (a few % at most).

    - vision tower: forward only (frozen, under no_grad). Per image: the patch embedding, a conv that is a matmul
      [P, 3·p·p] x [3·p·p, Dv]; per layer and token q/k/v/o (4·Dv²) and fc1/fc2 (2·Dv·Iv) weight products, and
      attention over S = P + 1 tokens (CLS included, no mask): QKᵀ and A·V, 2·S²·Dv each.
    - projector: forward [P, Dv] x [Dv, D] and [P, D] x [D, D] per image. Backward: both weight gradients (same
      cost as their forward) and the input gradient of linear_2 only; linear_1's input comes out of no_grad.
    - language model, per token and layer: q (D·H·d), k and v (D·Hkv·d each), o (H·d·D), gate/up/down (3·D·I).
      Attention is causal: position t sees t + 1 keys, so QKᵀ and A·V cost 2·H·d·S(S+1)/2 each per layer for a
      sequence of S tokens (a kernel that skips nothing above the diagonal does more; not counted).
      Backward: the weights are frozen, but the gradient must reach the projector under the first layer, so every
      matmul needs its input gradient (= its forward again) and no weight gradient; attention's backward has 4
      matmuls (dA, dV, dQ, dK), twice its forward.
    - LoRA on q and v: x·A [D -> r] and ·B [r -> out], forward; backward = input gradients + the gradients of A
      and B, twice the forward.
    - lm_head: LlavaLoss applies it to the ``supervised`` positions only: [N_sup, D] x [D, V] forward, and the
      input gradient in backward (frozen weight).
    - ``recompute`` (gradient checkpointing, hardware FLOPs only): backward replays each decoder layer's forward.
      Non-reentrant checkpointing stops the replay as soon as the last tensor backward needs is rebuilt (torch's
      default early stop): here the inputs of act(gate)·up, so down_proj, frozen and saving nothing, is not
      replayed. (The counts agree exactly with ``torch.utils.flop_counter`` on the tiny shape, see the test.)

    ``config`` is the model's LlavaConfig (Qwen2/Llama-style text config, CLIP vision config). ``lengths`` are the
    token counts per sample (real tokens for model FLOPs, the padded width for hardware); ``vision_layers`` the
    tower layers counted (default: those the features need, hidden_states[k] being the output of layer k; for
    hardware FLOPs, all that run).
    """
    t, v = config.text_config, config.vision_config
    D, L, H, Hkv = t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads
    d, I, V = getattr(t, "head_dim", None) or D // H, t.intermediate_size, t.vocab_size
    Dv, Iv, p = v.hidden_size, v.intermediate_size, v.patch_size
    P = (v.image_size // p) ** 2  # image tokens per image ('default' strategy drops CLS)
    if vision_layers is None:
        vision_layers = config.vision_feature_layer % (v.num_hidden_layers + 1)
    Sv = P + 1
    tokens = sum(lengths)

    vision = images * (2 * P * (3 * p * p) * Dv  # patch embedding
                       + vision_layers * (2 * Sv * (4 * Dv * Dv + 2 * Dv * Iv)  # q, k, v, o, fc1, fc2
                                          + 2 * (2 * Sv * Sv * Dv)))  # QKᵀ and A·V, all heads
    proj_fwd = images * 2 * P * (Dv * D + D * D)
    proj_bwd = images * (2 * P * (Dv * D + D * D) + 2 * P * D * D)  # weight grads of both + input grad of linear_2
    lm_linear = 2 * tokens * L * (D * H * d + 2 * D * Hkv * d + H * d * D + 3 * D * I)
    down_proj = 2 * tokens * L * I * D  # part of lm_linear
    lm_attention = L * sum(2 * (2 * H * d * (n * (n + 1) // 2)) for n in lengths)
    lora_fwd = 2 * tokens * L * (r * (D + H * d) + r * (D + Hkv * d))  # q_proj: D -> H·d, v_proj: D -> Hkv·d
    head = 2 * supervised * D * V
    terms = {
        "vision_forward": vision,
        "projector_forward": proj_fwd,
        "projector_backward": proj_bwd,
        "lm_linear_forward": lm_linear,
        "lm_attention_forward": lm_attention,
        "lm_linear_backward": lm_linear,  # input gradients only
        "lm_attention_backward": 2 * lm_attention,
        "lora_forward": lora_fwd,
        "lora_backward": 2 * lora_fwd,
        "lm_head_forward": head,
        "lm_head_backward": head,  # input gradient only
        "gc_recompute_forward": (lm_linear - down_proj + lm_attention + lora_fwd) if recompute else 0,
    }
    terms["total"] = sum(terms.values())
    return terms
