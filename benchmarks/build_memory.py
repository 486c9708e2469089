"""Peak memory of `llava-lora build` against the bytes it writes, on a composed model of about 0.5B parameters.

    .venv/bin/python benchmarks/build_memory.py [--workdir DIR]

Writes random source checkpoints of real architectures (a Qwen2 LM with Qwen's 151,936-row vocabulary, bf16 on
disk, and a 12-layer CLIP-L/14-336 vision tower, fp32 on disk), then runs the build in a fresh process and prints its
peak RSS divided by the bytes of the written weights. The target is at most 1.5: the composed model is built on
the meta device and filled with the loaded source tensors, so it never holds two copies.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SOURCES = r'''
import sys, torch
from pathlib import Path
from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM
from llava_lora import tiny
out = Path(sys.argv[1])
tok = tiny.qwen2_tokenizer()
cfg = Qwen2Config(vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, dtype="bfloat16")
with torch.device("meta"):
    lm = Qwen2ForCausalLM(cfg)
lm = lm.to_empty(device="cpu").to(torch.bfloat16)
for p in lm.parameters():
    torch.nn.init.normal_(p, std=0.02)
lm.save_pretrained(out / "llm"); tok.save_pretrained(out / "llm")
vcfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16,
                        image_size=336, patch_size=14)
CLIPVisionModel(vcfg).save_pretrained(out / "clip")
from transformers import CLIPImageProcessorPil
CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(out / "clip")
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="where the sources and the build go (default: a temp dir)")
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="build-memory-"))
    if not (root / "clip" / "config.json").is_file():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", SOURCES, str(root)], check=True)
        print(f"wrote random sources to {root} in {time.perf_counter() - t:.0f} s")
    out = root / "model"
    t = time.perf_counter()
    argv = ["build", "--llm", str(root / "llm"), "--vision", str(root / "clip"), "--out", str(out), "--overwrite"]
    # The build runs in a process of its own, which reports its own peak (ru_maxrss, KiB on Linux) when done.
    probe = ("import resource, sys; from llava_lora.cli import main; rc = main(sys.argv[1:]); "
             "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", probe, *argv], check=True, capture_output=True, text=True)
    peak = int(done.stdout.rsplit("PEAK", 1)[1]) * 1024
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    from safetensors import safe_open

    params = 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            params += sum(torch.Size(s.get_slice(k).get_shape()).numel() for k in s.keys())
    print(f"composed model: {params / 1e9:.3f} B parameters, {weights / 2**30:.2f} GiB of weights written "
          f"({time.perf_counter() - t:.0f} s)")
    print(f"build peak RSS: {peak / 2**30:.2f} GiB")
    print(f"peak RSS / weight bytes: {peak / weights:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
