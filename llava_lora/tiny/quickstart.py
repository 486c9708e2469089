"""The whole pipeline offline, on tiny models and synthetic data, in a few minutes on a laptop CPU.

    llava-lora quickstart [--out quickstart-out]

Writes OUT/sources (tiny Qwen2 chat LM + CLIP, built here), OUT/model (``build``), OUT/data (``data synth``),
OUT/run (``train``, with the recipe in llava_lora/recipes/quickstart.yaml) and OUT/run/eval-test (``eval`` of base vs
fine-tuned on the held-out split), then prints the held-out exact match before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import config as cfglib
from ..config import field
from ..outdirs import OVERWRITE_HELP, check_out, mark

# The training recipe: a tiny random LM needs a higher learning rate and LoRA on every linear layer to learn
# the synthetic task in a couple of minutes (see the file's header).
RECIPE_FILE = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
TRAIN_IMAGES, TEST_IMAGES = 3000, 200  # the held-out figure is over 200 questions, 50 of each kind
# Hidden size of both tiny models. At 64, what a shape is was learned slowly and by seed (shape 80/62/92% held out
# at seeds 0/1/2 in 1,200 steps with a 128-wide LM and a 64-wide tower; 80% at 64/64, seed 0): a random frozen
# tower's features are random projections, and 128 of them keep more of each patch than 64 (92/82/90% at 128/128).
WIDTH = 128
# The tower's last layer (LLaVA's -2 is the second-to-last): of a 2-layer random tower, -2 keeps one layer's features.
# Shape held out at 1,250 steps, seeds 0/1/2: 100/96/96% native and 98/88/84% without native bf16 at -1, against
# 88/94/76% and 98/98/90% at -2 (docs/performance.md).
FEATURE_LAYER = -1


def recipe() -> dict:
    return cfglib.load_yaml(RECIPE_FILE)


@dataclass
class QuickstartConfig:
    out: str = field("quickstart-out", help="folder for everything the quickstart writes")
    max_steps: int | None = field(None, help="training steps (default: the recipe's)")
    seed: int = field(0, help="seed of everything random: the tiny models' weights, the synthetic data, the training "
                              "run's data order, LoRA init and dropout")
    overwrite: bool = field(False, help=OVERWRITE_HELP)


def tool_command() -> str:
    """How to call ``llava-lora`` from a fresh shell in this folder: the bare name only where PATH finds this
    very installation, else its path (e.g. ``.venv/bin/llava-lora`` after ``make quickstart``)."""
    here = Path(sys.executable).parent / "llava-lora"
    found = shutil.which("llava-lora")
    if found and here.exists() and Path(found).resolve() == here.resolve():
        return "llava-lora"
    try:
        return os.path.relpath(here) if not os.path.relpath(here).startswith("..") else str(here)
    except ValueError:  # another drive (Windows)
        return str(here)


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def _fresh(out: Path, overwrite: bool) -> None:
    """OUT empty and marked: with --overwrite, only a folder llava-lora wrote (a quickstart's) is emptied."""
    check_out(out, overwrite)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    mark(out)


def main(cfg: QuickstartConfig) -> int:
    from ..data import synth
    from ..infer import evaluate
    from ..model import build
    from ..train import loop as train
    from . import checkpoints as tiny

    out = Path(cfg.out)
    _fresh(out, cfg.overwrite)
    t0 = time.perf_counter()

    _step("1/5 tiny source checkpoints (random weights, tokenizer trained here)")
    sources = out / "sources"
    tiny.tiny_qwen2(sources / "qwen2", hidden_size=WIDTH, seed=cfg.seed)
    # 64 px / patch 8 (64 image tokens): at 32 px the shapes of the 64 px synthetic images blur away
    tiny.tiny_clip(sources / "clip", image_size=64, patch_size=8, hidden_size=WIDTH, seed=cfg.seed)
    print(f"wrote {sources}/qwen2 and {sources}/clip")

    _step("2/5 llava-lora build")
    build.main(build.BuildConfig(llm=str(sources / "qwen2"), vision=str(sources / "clip"), out=str(out / "model"),
                                 vision_feature_layer=FEATURE_LAYER))

    _step("3/5 llava-lora data synth")
    synth.main(synth.SynthConfig(out=str(out / "data"), n=TRAIN_IMAGES, n_test=TEST_IMAGES, seed=cfg.seed))

    _step("4/5 llava-lora train")
    steps = dict(recipe(), seed=cfg.seed)
    if cfg.max_steps is not None:
        steps.update(max_steps=cfg.max_steps, save_every=min(steps["save_every"], cfg.max_steps))
    train.main(train.TrainConfig(model=str(out / "model"), data=str(out / "data"), out=str(out / "run"), **steps))

    _step("5/5 llava-lora eval (held-out split, base vs fine-tuned)")
    eval_dir = out / "run" / "eval-test"
    evaluate.main(evaluate.EvalConfig(model=str(out / "model"), adapter=str(out / "run"), data=str(out / "data"),
                                      split="test", out=str(eval_dir), max_new_tokens=8))
    metrics = json.loads((eval_dir / "summary.json").read_text())["metrics"]
    before = metrics["base"]["exact_match_normalised"]
    after = metrics["finetuned"]["exact_match_normalised"]
    print(f"\nheld-out exact match: {100 * before:.1f}% before fine-tuning -> {100 * after:.1f}% after "
          f"({time.perf_counter() - t0:.0f} s in all)")
    print(f"\nmodel: {out / 'model'}\nadapter, checkpoints, logs, loss curve: {out / 'run'}\n"
          f"evaluation: {eval_dir}\n\nopen the demo:\n  {tool_command()} demo --model {out / 'model'} "
          f"--adapter {out / 'run'} --data {out / 'data'} --split test")
    return 0
