"""Random source checkpoints in the seed's real shapes, for ``benchmarks/real_size.py`` (run by it, in a process
of its own, so that their memory is returned before any stage is measured).

    .venv/bin/python benchmarks/real_size_sources.py OUT      # OUT/{llm,clip}; ~3-5 min, ~8 GB peak

- ``OUT/llm``: a Qwen2 causal LM in Qwen1.5-4B's shape (hidden 2560, 40 layers, 20 heads and 20 KV heads,
  intermediate 6912, vocab 151,936, untied lm_head, rope theta 5e6), bf16 on disk (7.9 GB), with
  ``llava_lora.tiny.checkpoints``'s ChatML tokenizer (its ids lie within Qwen's padded vocabulary).
- ``OUT/clip``: a full ``CLIPModel`` in openai/clip-vit-large-patch14-336's shape (vision: hidden 1024, 24 layers,
  16 heads, intermediate 4096, 336 px, patch 14; text: hidden 768, 12 layers), fp32 on disk as openai saves it,
  with its ``CLIPImageProcessor``.

Weights are normal(0, 0.02) (norms 1, biases 0): random, but every matmul is the real one. The LM is constructed
on the ``meta`` device and materialised once, in bf16, so making it holds one copy.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

QWEN15_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=6912, num_hidden_layers=40,
                 num_attention_heads=20, num_key_value_heads=20, max_position_embeddings=32768,
                 rope_theta=5_000_000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)
CLIP_L_336 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77, vocab_size=49408, projection_dim=768),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768),
    projection_dim=768)


def _fill(module: torch.nn.Module) -> None:
    """normal(0, 0.02) weights, unit norm weights, zero biases, in place."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)


def write_llm(out: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llava_lora.tiny import checkpoints as tiny

    tok = tiny.qwen2_tokenizer()
    cfg = Qwen2Config(**QWEN15_4B, bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                      dtype="bfloat16")
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    _fill(model)  # (non-persistent buffers such as rotary inv_freq are not saved; loading recomputes them)
    return tiny.save_qwen2_chat(model, tok, out)


def write_clip(out: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**CLIP_L_336)).save_pretrained(out)  # fp32, as openai's checkpoints are saved
    CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                          do_center_crop=True).save_pretrained(out)
    return out


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, write in (("clip", write_clip), ("llm", write_llm)):
        if (root / name / "config.json").is_file():
            print(f"{root / name}: cached")
            continue
        t = time.perf_counter()
        tmp = root / f".{name}.tmp"
        write(tmp)
        tmp.rename(root / name)  # complete or absent: a killed run is redone, never half-reused
        print(f"{root / name}: written in {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
