"""Tiny, randomly initialised checkpoints of the real architectures, built offline.

    python -m llava_lora.tiny.checkpoints OUT_DIR      # writes OUT_DIR/{qwen2,llama,clip}

They stand in for hub models in tests and the quickstart: a Qwen2 chat LM laid out like Qwen1.5 (byte-level
BPE trained here, ChatML specials after the BPE vocab, embedding rows padded beyond the tokenizer, bf16 on
disk), a Llama-family chat LM with a Llama-3 style template, and a full ``CLIPModel`` folder with its
``CLIPImageProcessor``, as openai's checkpoints are saved.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Qwen2's own pre-tokenizer split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_WORDS = (
    "the a an is are was of in on at to and or with what which where how many colour color shape size "
    "red green blue yellow purple orange black white grey circle square triangle star large small big tiny "
    "top bottom left right centre center middle corner image picture photo shows there one two three this "
    "that it describe provide brief description given question answer yes no you helpful assistant user "
    "system object background light dark near far above below beside inside outside person dog cat car tree "
    "house sky water road city people street table food man woman day night sun view old new bright"
).split()


def _corpus(n_lines: int = 4000) -> list[str]:
    """Deterministic training text for the BPE: sentences over a small English vocabulary, and each word alone
    on a line, lower-case and capitalised. A chat template puts words at the start of a line ("user\n",
    "assistant\nlarge"), where the pre-tokeniser gives them no leading space; a real tokenizer has seen them there."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(_WORDS), (n_lines, 12), generator=g).tolist()
    lines = []
    for i, row in enumerate(idx):
        s = " ".join(_WORDS[j] for j in row)
        lines.append(s.capitalize() + ("?" if i % 3 == 0 else ".") + (" 0123456789" if i % 50 == 0 else ""))
    return lines + _WORDS + [w.capitalize() for w in _WORDS]


# Merges until every corpus word is one token (762 with the specials): the 4 synthetic questions and a ChatML turn
# take 83 tokens, not 109 at 512, as a real tokenizer's whole-word vocabulary would have them.
QWEN_BPE_SIZE = 768


def train_bpe(vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE with Qwen2's normaliser and pre-tokeniser, trained on a built-in corpus."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _fast_tokenizer(specials: list[str], bpe_size: int, **kwargs):
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(bpe_size)
    tok.add_special_tokens(specials)  # ids follow the BPE vocabulary, as in Qwen1.5 and Llama 3
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def qwen2_tokenizer(bpe_size: int = QWEN_BPE_SIZE):
    """A Qwen1.5-style tokenizer: BPE vocab, then <|endoftext|>, <|im_start|>, <|im_end|>; ChatML template."""
    from transformers import Qwen2Tokenizer

    bpe = json.loads(train_bpe(bpe_size).to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    # Qwen2Tokenizer adds <|endoftext|> first; the ChatML markers follow, as in Qwen1.5 (151643, 151644, 151645).
    tok = Qwen2Tokenizer(vocab=bpe["vocab"], merges=merges, unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"  # Qwen1.5-Chat's tokenizer_config ends a turn, not a document
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def llama_tokenizer(bpe_size: int = 448):
    tok = _fast_tokenizer(LLAMA_SPECIALS, bpe_size, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


# A trained LM's logits span tens of nats. Drawn at the 0.1 initialiser, a random untied lm_head row reaches a
# logit of at most ~0.1 * hidden (6 at hidden 64, the final norm fixing |h| = sqrt(hidden)) against ~hundreds of
# others near 0, so the frozen tiny model could never put more than ~40% on any token: its loss floors near 1
# nat per token and that floor's gradient drowns what the answers still have to learn. Rows drawn with std 0.5
# lift the ceiling well past certainty. (A tied head shares the embedding rows and keeps the initialiser's.)
LM_HEAD_STD = 0.5


def _pad64(n: int) -> int:
    return (n + 63) // 64 * 64


def tiny_qwen2(out: Path, tie_word_embeddings: bool = False, hidden_size: int = 64, num_layers: int = 2,
               dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A Qwen1.5-like chat LM: rows padded beyond the tokenizer, ChatML stop tokens, bf16 on disk."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = qwen2_tokenizer()
    cfg = Qwen2Config(
        vocab_size=_pad64(len(tok) + 1), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings, initializer_range=0.1,
        bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    if not tie_word_embeddings:
        torch.nn.init.normal_(model.lm_head.weight, std=LM_HEAD_STD)
    return save_qwen2_chat(model.to(dtype), tok, out)


def save_qwen2_chat(model, tok, out: Path) -> Path:
    """Save a Qwen2 LM and its ChatML tokenizer to ``out``, generation stopping where Qwen1.5-Chat's does."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_llama(out: Path, tie_word_embeddings: bool = True, hidden_size: int = 64, num_layers: int = 2,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A Llama-3-like chat LM whose embedding rows match the tokenizer exactly (so <image> forces a resize)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = llama_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings, initializer_range=0.1,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|end_of_text|>"),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# A trained CLIP tower knows where each patch is: its position embeddings vary smoothly in 2-D and are about as
# large as the patch features. Drawn at the 0.02 initialiser they are noise ~15x weaker than the patches, and a
# frozen tiny tower is all but blind to where things are (a model trained on it never learns left from right).
# They start instead as the fixed 2-D sin-cos embeddings of ViT/MAE, with this standard deviation.
POSITION_STD = 0.3


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] 2-D sin-cos position embeddings (MAE's): half the channels code the row, half the column."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def code(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.flatten()[:, None].float() * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([code(rows), code(cols)], dim=1)


def tiny_clip(out: Path, image_size: int = 32, patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2,
              seed: int = 0) -> Path:
    """A full CLIPModel (text + vision) with its CLIPImageProcessor, as openai's checkpoints are saved."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=512, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=num_layers, num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size),
        projection_dim=hidden_size,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    table = model.vision_model.embeddings.position_embedding.weight  # [1 + grid^2, hidden]: CLS first
    grid = image_size // patch_size
    with torch.no_grad():
        pos = sincos_2d(grid, hidden_size)
        table[0] = 0.0
        table[1:] = pos * (POSITION_STD / pos.std())
    model.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                          do_center_crop=True).save_pretrained(out)
    return out


def tiny_siglip(out: Path, image_size: int = 32, patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2,
                vision_only: bool = False, seed: int = 0) -> Path:
    """A SigLIP tower (a full SiglipModel, or a SiglipVisionModel alone) with its SiglipImageProcessor: no CLS
    token, so a LLaVA keeps every patch ("full" feature strategy)."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    vision = dict(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                  num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    if vision_only:
        model = SiglipVisionModel(SiglipVisionConfig(**vision))
    else:
        text = dict(vocab_size=512, hidden_size=hidden_size, intermediate_size=hidden_size * 2, pad_token_id=1,
                    bos_token_id=0, eos_token_id=1, num_hidden_layers=num_layers, num_attention_heads=4,
                    max_position_embeddings=64)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    table = next(m for n, m in model.named_modules()
                 if n.endswith("embeddings.position_embedding") and "text" not in n).weight
    grid = image_size // patch_size
    with torch.no_grad():  # as tiny_clip: a 2-D position code the size of the patch features (no CLS row)
        pos = sincos_2d(grid, hidden_size)
        table[:] = pos * (POSITION_STD / pos.std())
    model.save_pretrained(out)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return out


def write_all(root: Path) -> dict[str, Path]:
    """The three source checkpoints under ``root``: ``qwen2``, ``llama``, ``clip``."""
    root.mkdir(parents=True, exist_ok=True)
    return {"qwen2": tiny_qwen2(root / "qwen2"), "llama": tiny_llama(root / "llama"), "clip": tiny_clip(root / "clip")}


if __name__ == "__main__":
    for name, path in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-models")).items():
        print(f"{name}: {path}")
