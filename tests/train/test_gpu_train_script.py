"""benchmarks/gpu_train.py on CPU: the tiny shape runs the real training path and reports sane numbers, its FLOP
count matches a hand computation and torch's own FLOP counter, only LoRA (language model q/v) and the projector
train, and the real shape without a GPU says so in one line and measures nothing.

    .venv/bin/pytest -q tests/train/test_gpu_train_script.py      # ~20 s of CPU time
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here trains or serves a model: `make test` runs them

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_train.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")  # CPU even where a GPU is
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu_train")
    done = _run("--shape", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--json", "out.json", cwd=tmp)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((tmp / "out.json").read_text())


def test_tiny_run_measures_both_gc_settings(tiny_run):
    runs = {r["gc"]: r for r in tiny_run["runs"]}
    assert set(runs) == {False, True}
    for r in runs.values():
        assert math.isfinite(r["samples_per_s"]) and r["samples_per_s"] > 0
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert r["mfu"] > 0 and r["model_flops"] > 0
    # Same seed, same batch, same init: the first loss (before any update) does not depend on checkpointing.
    assert runs[False]["losses"][0] == pytest.approx(runs[True]["losses"][0], abs=1e-4)
    # A random 1024-token vocabulary starts near ln(1024).
    assert abs(runs[False]["losses"][0] - math.log(1024)) < 1.0
    assert all(t["status"] == "n/a" for t in tiny_run["targets"])  # targets are for the real shape on a GPU
    assert tiny_run["losses_finite"] is True


def test_trainable_set_is_lora_on_lm_q_v_plus_projector(tiny_run):
    names = tiny_run["params"]["trainable_names"]
    lora = re.compile(r"base_model\.model\.model\.language_model\.layers\.(\d+)\.self_attn\.(q_proj|v_proj)"
                      r"\.lora_(A|B)\.default\.weight")
    projector = re.compile(r"base_model\.model\.model\.multi_modal_projector\.modules_to_save\.default\."
                           r"linear_(1|2)\.(weight|bias)")
    assert not [n for n in names if "vision_tower" in n]
    assert all(lora.fullmatch(n) or projector.fullmatch(n) for n in names), names
    layers = tiny_run["shape"]["layers"]
    assert {lora.fullmatch(n).groups() for n in names if lora.fullmatch(n)} == {
        (str(i), m, ab) for i in range(layers) for m in ("q_proj", "v_proj") for ab in "AB"}
    assert sum(bool(projector.fullmatch(n)) for n in names) == 4


def test_flop_count_matches_a_hand_computation(tiny_run):
    """The tiny shape by hand: LM hidden 64, 2 layers, 4 heads of 16, intermediate 128, vocab 1024; CLIP image 32,
    patch 8 (16 patches + CLS), hidden 32, intermediate 64, 2 layers of which the features (layer -2) need 1."""
    b = tiny_run["batch"]
    lengths, n_sup, n_img, T = b["lengths"], b["supervised_tokens"], b["images"], b["padded_length"]
    assert n_img == 6 and b["image_tokens"] == 16
    # 5 + 16 + 10 prompt tokens and 1 trailing token are not supervised; the caption and its <|im_end|> are
    assert n_sup == sum(x - 32 for x in lengths) and all(42 <= x <= 62 for x in lengths)
    # per token and layer: q, k, v, o (64x64 each) + gate, up, down (64x128 each), 2 FLOPs per product
    lm_linear = lambda n_tokens: 2 * n_tokens * 2 * (4 * 64 * 64 + 3 * 64 * 128)
    # causal attention: QK^T and AV over n(n+1)/2 (query, key) pairs, 64 = 4 heads x 16 per pair
    lm_attn = lambda n: 2 * 2 * (2 * 64 * n * (n + 1) // 2)
    lora = lambda n_tokens: 2 * n_tokens * 2 * 2 * (4 * 64 + 4 * 64)  # r = 4; q and v: 64 -> 4 -> 64
    vision_layer = 2 * 17 * (4 * 32 * 32 + 2 * 32 * 64) + 2 * 2 * 17 * 17 * 32
    patch = 2 * 16 * (3 * 8 * 8) * 32
    proj_fwd = 2 * 16 * (32 * 64 + 64 * 64)
    proj_bwd = 2 * 16 * (32 * 64 + 64 * 64) + 2 * 16 * 64 * 64
    head = 2 * n_sup * 64 * 1024
    n = sum(lengths)
    model = (n_img * (patch + 1 * vision_layer + proj_fwd + proj_bwd) + 2 * lm_linear(n)
             + 3 * sum(lm_attn(x) for x in lengths) + 3 * lora(n) + 2 * head)
    f = tiny_run["flops"]
    assert f["gc_off"]["model"]["lm_head_forward"] == head
    assert f["gc_off"]["model"]["lm_linear_forward"] == lm_linear(n)
    assert f["gc_off"]["model"]["vision_forward"] == n_img * (patch + vision_layer)
    assert f["gc_off"]["model"]["total"] == model > 0
    assert f["gc_on"]["model"]["total"] == model  # MFU is on model FLOPs: the recompute is not in them
    hw_off = (n_img * (patch + 2 * vision_layer + proj_fwd + proj_bwd) + 2 * lm_linear(6 * T)
              + 3 * 6 * lm_attn(T) + 3 * lora(6 * T) + 2 * head)
    assert f["gc_off"]["hardware"]["total"] == hw_off
    # the checkpoint replay stops before down_proj (64x128 per token and layer), see workloads.step_flops
    down_proj = 2 * 6 * T * 2 * 128 * 64
    assert f["gc_on"]["hardware"]["total"] == hw_off + lm_linear(6 * T) - down_proj + 6 * lm_attn(T) + lora(6 * T)
    run = {r["gc"]: r for r in tiny_run["runs"]}[False]
    assert run["model_flops"] == model


def _script_module():
    if "gpu_train" not in sys.modules:  # registered first: its dataclasses look their module up while being built
        if str(SCRIPT.parent) not in sys.path:  # as when run as a script: benchmarks/workloads.py is importable
            sys.path.insert(0, str(SCRIPT.parent))
        spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
        sys.modules["gpu_train"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpu_train"]


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # train's call
@pytest.mark.parametrize("gc_on", [False, True], ids=["gc_off", "gc_on"])
def test_hardware_flops_agree_with_torch_flop_counter(gc_on):
    """One real training step of the tiny model under torch's FLOP counter: it counts every mm/bmm/conv that runs,
    forward, backward and the checkpoint replay. Eager attention, so the attention matmuls are visible to it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from llava_lora.model.loss import LlavaLoss

    g = _script_module()
    s = g.TINY
    batch = g.synthetic_batch(s, 6, seed=0)
    model = g.materialise(g.meta_model(g.llava_config(s, "eager"), torch.float32), "cpu", seed=0)
    loss_module = LlavaLoss(g.wrap_for_training(model, gc_on)).train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss_sum, n = loss_module(**batch["tensors"])
        (loss_sum / n).backward()
    hw = g.flops_for(s, batch, gc_on)["hardware"]
    # eager attention multiplies the whole [T, T] score matrix (the causal mask is added to it); the formula counts
    # the causal half. Forward, backward (2x) and, with GC, the replay.
    T, passes = batch["padded_length"], 3 + gc_on
    full_square = s.layers * 6 * 2 * (2 * s.hidden * T * T)
    assert counter.get_total_flops() == hw["total"] - passes * hw["lm_attention_forward"] + passes * full_square


def test_real_shape_without_a_gpu_says_so_and_measures_nothing(tmp_path, monkeypatch, capsys):
    import torch

    g = _script_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert g.main(["--steps", "1", "--json", "out.json"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["gpu_train: no CUDA GPU present (torch.cuda.is_available() is False); this benchmark "
                                "needs one. Nothing measured."]
    assert not (tmp_path / "out.json").exists()


def test_real_shape_on_cpu_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        _script_module().main(["--device", "cpu"])
    assert e.value.code == 2 and "--plan" in capsys.readouterr().err
