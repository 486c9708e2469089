"""Tiny source checkpoints and composed models, built once per test session (a few seconds on 2 CPU cores).

    w = model_world(tmp_path_factory)   # .qwen2 .llama .clip (sources)  .qwen_model .llama_model (MODEL_DIRs)
    d = good_data(tmp_path_factory)     # a small learnable data set (chat.json + images_dl/)

Shared by tests/test_build.py and tests/test_train.py through a module-level cache (as tests/_eval_fixtures.py),
so importing it into two test modules does not build twice.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

from llava_lora import build, tiny

from data_fixtures import write_good_dataset

# Train flags that keep a tiny run fast on CPU.
FAST = ["--no-gradient-checkpointing", "--num-workers", "0", "--no-tensorboard"]


@dataclass(frozen=True)
class Models:
    qwen2: Path  # source: Qwen1.5-like, untied, bf16, embedding rows padded (no resize)
    llama: Path  # source: Llama-3-like, tied, fp32, rows == tokenizer (resize needed)
    clip: Path  # source: full CLIPModel + image processor
    qwen_model: Path  # MODEL_DIR: qwen2 + clip
    llama_model: Path  # MODEL_DIR: llama + clip


_CACHE: dict[str, object] = {}


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


def model_world(tmp_path_factory) -> Models:
    if "models" not in _CACHE:
        root = tmp_path_factory.mktemp("model_world")
        qwen, llama, clip = tiny.tiny_qwen2(root / "qwen2"), tiny.tiny_llama(root / "llama"), tiny.tiny_clip(root / "clip")
        world = Models(qwen, llama, clip, root / "qwen_model", root / "llama_model")
        quiet(build.main, build.BuildConfig(llm=str(qwen), vision=str(clip), out=str(world.qwen_model)))
        quiet(build.main, build.BuildConfig(llm=str(llama), vision=str(clip), out=str(world.llama_model)))
        _CACHE["models"] = world
    return _CACHE["models"]  # type: ignore[return-value]


def good_data(tmp_path_factory, n: int = 24) -> Path:
    key = f"good_data_{n}"
    if key not in _CACHE:
        root = tmp_path_factory.mktemp(key)
        write_good_dataset(root, n=n)
        _CACHE[key] = root
    return _CACHE[key]  # type: ignore[return-value]


def auto_cpu_dtype():
    """The dtype ``--dtype auto`` loads a tiny bf16 MODEL_DIR in on this CPU: bf16 where it computes bf16
    natively, else fp32 (the tiny model fits; tests/test_precision.py pins both)."""
    import torch

    from llava_lora.modeling import cpu_has_native_bf16

    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
