"""Tiny models, synthetic data and a short training run, built once per test session (~15 s on 2 CPU cores).

    paths = eval_world(tmp_path_factory)   # .model .other_model .data .run  (see World)

Shared by tests/test_eval.py and tests/test_export.py through a module-level cache rather than fixtures, so that
importing it into two test modules does not build twice (these move to tests/conftest.py later).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

from llava_lora import build, tiny, train
from llava_lora.data import synth

# Strong enough for the fine-tuned model to beat the (random) base on held-out questions in ~200 steps:
# LoRA on every linear layer of the LM, a fast projector, no dropout.
TRAIN = dict(max_steps=200, batch_size=6, learning_rate=1e-2, projector_learning_rate=2e-2, lora_r=16,
             lora_alpha=32, lora_dropout=0.0, max_grad_norm=1.0, gradient_checkpointing=False, save_every=1000,
             log_every=50, num_workers=0, tensorboard=False,
             lora_target=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass(frozen=True)
class World:
    model: Path  # MODEL_DIR: tiny Qwen2 + tiny CLIP, bf16 on disk
    other_model: Path  # MODEL_DIR of another base: tiny Llama + tiny CLIP
    data: Path  # synth: chat.json (120 train records), test.json (40 held out), images_dl/
    run: Path  # RUN_DIR of a short training of ``model`` on ``data``


_CACHE: dict[str, World] = {}


def _quiet(fn, *args) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        fn(*args)


def eval_world(tmp_path_factory) -> World:
    if "world" not in _CACHE:
        root = tmp_path_factory.mktemp("eval_world")
        qwen, llama, clip = tiny.tiny_qwen2(root / "qwen2"), tiny.tiny_llama(root / "llama"), tiny.tiny_clip(root / "clip")
        world = World(root / "model", root / "other_model", root / "data", root / "run")
        _quiet(build.main, build.BuildConfig(llm=str(qwen), vision=str(clip), out=str(world.model)))
        _quiet(build.main, build.BuildConfig(llm=str(llama), vision=str(clip), out=str(world.other_model)))
        _quiet(synth.main, synth.SynthConfig(out=str(world.data), n=120, n_test=40, image_size=32))
        _quiet(train.main, train.TrainConfig(model=str(world.model), data=str(world.data), out=str(world.run), **TRAIN))
        _CACHE["world"] = world
    return _CACHE["world"]
