"""What benchmarks/serve_vllm.py and benchmarks/serve_llamacpp.py share: a small trained and exported model,
sample images with their prompts, and transformers' greedy tokens on them (the reference an engine must match).

The model: a tiny Qwen2 (hidden 128, 4 heads: vLLM needs a head dim >= 32) + a tiny CLIP (32 px, patch 8: 16
image tokens), composed by `llava-lora build`, trained for a few steps on synthetic shape questions by
`llava-lora train` (so the projector and the LoRA are the trained ones), merged by `llava-lora export`.
"""

from __future__ import annotations

import contextlib
import io
import random
import time
from dataclasses import dataclass
from pathlib import Path

from llava_lora import cli
from llava_lora.chat import prompts
from llava_lora.tiny import checkpoints as tiny
from llava_lora.data import synth
from llava_lora.data.records import load_records, resolve_data


@dataclass(frozen=True)
class Work:
    model: Path  # MODEL_DIR
    data: Path  # synthetic data set (chat.json, test.json, images_dl/)
    run: Path  # RUN_DIR
    merged: Path  # MERGED_DIR in float32, with the GGUF files of --format gguf --gguf-type f16
    merged_bf16: Path  # MERGED_DIR in bfloat16


def _cli(*args) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = cli.main([str(a) for a in args])
    if rc != 0:
        raise SystemExit(f"llava-lora {' '.join(map(str, args))} failed ({rc}):\n{out.getvalue()[-3000:]}")


def prepare(root: Path, steps: int = 40) -> Work:
    """Build, train and export under ``root``; each stage is skipped when its folder is already there."""
    w = Work(root / "model", root / "data", root / "run", root / "merged", root / "merged-bf16")
    src = root / "src"
    if not w.model.exists():
        qwen = tiny.tiny_qwen2(src / "qwen2", hidden_size=128)
        clip = tiny.tiny_clip(src / "clip")
        _cli("build", "--llm", qwen, "--vision", clip, "--out", w.model)
    if not w.data.exists():
        _cli("data", "synth", "--out", w.data, "--n", 120, "--n-test", 40, "--image-size", 32)
    if not w.run.exists():
        _cli("train", "--model", w.model, "--data", w.data, "--out", w.run, "--max-steps", steps, "--batch-size", 6,
             "--learning-rate", "1e-2", "--no-gradient-checkpointing", "--num-workers", 0, "--no-tensorboard")
    if not w.merged.exists():
        _cli("export", "--model", w.model, "--adapter", w.run, "--out", w.merged, "--dtype", "float32",
             "--format", "gguf", "--gguf-type", "f16", "--check-samples", 2, "--device", "cpu")
    if not w.merged_bf16.exists():
        _cli("export", "--model", w.model, "--adapter", w.run, "--out", w.merged_bf16, "--dtype", "bfloat16",
             "--check-samples", 0, "--device", "cpu")
    return w


@dataclass
class Sample:
    id: str
    prompt: str  # the templated prompt, with the processor's single image placeholder
    image: Path


def samples(w: Work, n: int, out: Path, shape: str = "square") -> list[Sample]:
    """The first ``n`` test questions of the data set with images of ``shape``: the data set's own (square),
    or wide: a new scene drawn 64 px and cut to 64 x 40 (so a processor that resizes + centre-crops and one
    that pads to a square see different pixels)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(w.merged)
    file, root = resolve_data(w.data, "test")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    result = []
    for rec in load_records(file)[0][:n]:
        msgs = prompts.prompt_and_reference(rec)[0]
        text = prompts.generation_prompt(processor.tokenizer, msgs)
        if shape == "square":
            image = root / rec.image
        else:
            image = out / f"{rec.id}-wide.png"
            synth.draw(synth.random_scene(rng), 64).crop((0, 12, 64, 52)).save(image)
        result.append(Sample(rec.id, text, image))
    return result


def reference(model_dir: Path, batch: list[Sample], tokens: int, dtype: str = "float32") -> tuple[list[list[int]], float]:
    """transformers' greedy token ids (``tokens`` each, end-of-turn ignored, as the engines are run) and the
    tokens/s of generating them one sample at a time."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # run all ``tokens``: the engines are asked for as many

    def run(s: Sample) -> list[int]:
        inputs = processor(text=s.prompt, images=Image.open(s.image).convert("RGB"), return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
        return ids[0, inputs["input_ids"].shape[1]:].tolist()

    run(batch[0])  # warm-up: the first call of a shape is slower
    t0 = time.perf_counter()
    out = [run(s) for s in batch]
    return out, len(batch) * tokens / (time.perf_counter() - t0)


def agreement(want: list[list[int]], got: list[list[int]]) -> str:
    """'answers a/b equal, tokens c/d' where tokens count matching positions before the first difference."""
    equal = sum(a == b for a, b in zip(want, got))
    prefix = 0
    for a, b in zip(want, got):
        for x, y in zip(a, b):
            if x != y:
                break
            prefix += 1
    return f"answers {equal}/{len(want)} equal, tokens {prefix}/{sum(map(len, want))} before the first difference"
