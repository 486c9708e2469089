"""Fast on every CPU: what ``auto`` picks where bf16 is native and where it is not (oneDNN switched off takes the
kernel an AVX2-only CPU takes), and bf16-stored frozen weights computed in fp32 (weight_only.py).

    .venv/bin/pytest tests/test_precision.py -q
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import pytest
import torch

from fixtures.models import FAST, Models
from fixtures.data import write_good_dataset
from llava_lora import cli
from llava_lora.kernels import weight_only
from llava_lora.model import parts
from llava_lora.model import precision as modeling
from llava_lora.train import loop as train
from llava_lora.model.adapters import apply_lora
from llava_lora.data.records import load_records, resolve_data
from llava_lora.model.loss import LlavaLoss
from llava_lora.model.load import load_model
from llava_lora.model.precision import WEIGHT_ONLY

IMAGE_TOKENS = (32 // 8) ** 2


@contextlib.contextmanager
def onednn_off():
    """The bf16 matmul kernel of an AVX2-only CPU, on this one (torch warns about TF32 on Intel GPUs here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=False):
            yield


# ----------------------------------------------------------------------------------------------------------
# the policy
# ----------------------------------------------------------------------------------------------------------

def test_onednn_off_is_no_native_bf16_whatever_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(modeling, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    with onednn_off():
        native, why = modeling.cpu_half_fast()
    assert not native and "oneDNN is off" in why and "reference kernel" in why


def test_torch_that_sends_no_bf16_to_onednn_is_no_native_bf16(monkeypatch):
    monkeypatch.setattr(modeling, "cpu_bf16_flags", lambda: ["avx512_bf16"])  # the flag alone does not decide
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with torch.backends.mkldnn.flags(enabled=True):  # as on an AVX2 host, whichever kind runs the test
        native, why = modeling.cpu_half_fast()
    assert not native and "AVX-512" in why


def test_auto_on_a_cpu_without_native_bf16_is_fp32_where_the_model_fits(world: Models):
    with onednn_off():
        precision, why = modeling.train_precision("auto", "cpu", world.qwen_model)
        dtype, upcast, load_why = modeling.inference_dtype("auto", world.qwen_model, "cpu")
    assert precision == "fp32" and "fits in 50% of the" in why
    assert (dtype, upcast) == (torch.float32, False) and load_why == why


def test_auto_on_a_cpu_without_native_bf16_stores_bf16_where_fp32_does_not_fit(world: Models, monkeypatch):
    need = 4 * modeling.checkpoint_params(world.qwen_model)
    monkeypatch.setattr(modeling, "memory_available", lambda: need)  # fp32 would take all of it
    with onednn_off():
        precision, why = modeling.train_precision("auto", "cpu", world.qwen_model)
        dtype, upcast, _ = modeling.inference_dtype("auto", world.qwen_model, "cpu")
    assert precision == WEIGHT_ONLY and "does not fit" in why and "computed in fp32" in why
    assert (dtype, upcast) == (torch.bfloat16, True)


def test_auto_on_a_cpu_with_native_bf16_is_bf16(world: Models, monkeypatch):
    monkeypatch.setattr(modeling, "cpu_half_fast", lambda half=torch.bfloat16: (True, "natively (test)"))
    assert modeling.train_precision("auto", "cpu", world.qwen_model) == ("bf16", "auto: natively (test)")
    assert modeling.inference_dtype("auto", world.qwen_model, "cpu")[:2] == (torch.bfloat16, False)


def test_avx512_bf16_slower_than_fp32_here_is_fp32(world: Models, monkeypatch):
    """An AVX512-BF16 Xeon without AMX ran oneDNN's bf16 matmuls at 0.57x fp32's: the flag alone does not make bf16
    the fast path; the measured matmuls decide, and the start line gives the figures."""
    monkeypatch.setattr(modeling, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(modeling, "matmul_gflops", lambda half=torch.bfloat16: (141.0, 80.0))
    with torch.backends.mkldnn.flags(enabled=True):
        fast, why = modeling.cpu_half_fast()
        precision, train_why = modeling.train_precision("auto", "cpu", world.qwen_model)
        dtype, upcast, _ = modeling.inference_dtype("auto", world.qwen_model, "cpu")
    assert not fast and "avx512_bf16" in why and "slower than fp32" in why and "80 against 141 GFLOP/s" in why
    assert precision == "fp32" and "fits in 50% of the" in train_why and (dtype, upcast) == (torch.float32, False)
    monkeypatch.setattr(modeling, "matmul_gflops", lambda half=torch.bfloat16: (141.0, 300.0))
    with torch.backends.mkldnn.flags(enabled=True):
        fast, why = modeling.cpu_half_fast()
    assert fast and why.startswith("this CPU computes bf16 natively (avx512_bf16; bf16 matmuls at 2.13x fp32's")


def test_matmul_probe_measures_both_dtypes():
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("bf16 matmuls take the reference kernel here: auto never times them (the test above)")
    threads = torch.get_num_threads()
    fp32, bf16 = modeling.matmul_gflops.__wrapped__(torch.bfloat16)
    assert fp32 > 1 and bf16 > 1 and torch.get_num_threads() == threads  # the one-thread probe restores threads


def test_asked_for_precisions_are_kept(world: Models):
    with onednn_off():
        for asked in ("fp32", "bf16", WEIGHT_ONLY):
            assert modeling.train_precision(asked, "cpu", world.qwen_model) == (asked, "asked for")
        assert modeling.inference_dtype("bfloat16", world.qwen_model, "cpu") == (torch.bfloat16, False, "asked for")
        assert modeling.inference_dtype(WEIGHT_ONLY, world.qwen_model, "cpu") == (torch.bfloat16, True, "asked for")


def test_checkpoint_params_are_read_from_the_headers(world: Models):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(world.qwen_model)
    assert modeling.checkpoint_params(world.qwen_model) == sum(p.numel() for p in model.state_dict().values())


def test_eval_and_generate_load_in_fp32_without_native_bf16(world: Models):
    printed = io.StringIO()
    with onednn_off(), contextlib.redirect_stdout(printed):
        model, _ = load_model(world.qwen_model, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert printed.getvalue().startswith("precision float32 on cpu (auto: oneDNN is off")


# ----------------------------------------------------------------------------------------------------------
# bf16 storage, fp32 compute
# ----------------------------------------------------------------------------------------------------------

def _lora_model(model_dir: Path, dtype: torch.dtype):
    """A LLaVA with LoRA in ``dtype``, trained parts fp32 (as train does), LoRA's B made non-zero."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    peft_model = apply_lora(LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype), 4, 8, 0.0,
                            ["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float().normal_(0, 0.1) if "lora_B" in n else p.data.float()
    return peft_model


def _batch(model_dir: Path, data: Path) -> dict:
    from transformers import AutoProcessor

    from llava_lora.chat.batches import Collator, TrainDataset

    processor = AutoProcessor.from_pretrained(model_dir)
    data_file, root = resolve_data(str(data), None, None)
    records, _ = load_records(data_file)
    ds = TrainDataset(records, root, processor, processor.tokenizer.convert_tokens_to_ids("<image>"), IMAGE_TOKENS,
                      2048)
    return Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(4)])


def _loss_and_grads(peft_model, batch: dict):
    peft_model.zero_grad()
    loss_sum, count = LlavaLoss(peft_model)(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                            batch["pixel_values"])
    (loss_sum / count).backward()
    return float(loss_sum.detach() / count), [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]


@pytest.mark.parametrize("chunk", [None, 1 << 10])
def test_weight_only_equals_fp32_on_the_same_weights(world: Models, data: Path, monkeypatch, chunk):
    """bf16 weights computed in fp32 give the loss and gradients of the same (bf16-rounded) weights held in fp32,
    whole or with every weight upcast in chunks of rows; frozen Linear and Embedding weights stay bf16."""
    if chunk:
        monkeypatch.setattr(weight_only, "CHUNK_ELEMENTS", chunk)
    batch = _batch(world.qwen_model, data)
    stored = _lora_model(world.qwen_model, torch.bfloat16)
    kept = weight_only.apply(stored)
    reference = _lora_model(world.qwen_model, torch.bfloat16)
    reference.to(torch.float32)  # the same weights, every one held in fp32
    want_loss, want_grads = _loss_and_grads(reference, batch)
    got_loss, got_grads = _loss_and_grads(stored, batch)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for g, w in zip(got_grads, want_grads):
        # chunks change how MKL blocks the sums: fp32 rounding, relative to the gradient's own scale
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))
    frozen = {p.dtype for n, p in stored.named_parameters() if not p.requires_grad and p.dim() == 2}
    assert frozen == {torch.bfloat16} and kept["Linear"] > 0 and kept["Embedding"] >= 1
    assert {p.dtype for p in stored.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for n, p in stored.named_parameters() if "norm" in n} == {torch.float32}


def test_weight_only_saves_no_fp32_copy_of_a_weight(world: Models, data: Path):
    """The backward upcasts each weight again: no fp32 tensor the shape of a frozen weight is kept for it."""
    batch = _batch(world.qwen_model, data)
    model = _lora_model(world.qwen_model, torch.bfloat16)
    weight_only.apply(model)
    trained = {tuple(p.shape) for p in model.parameters() if p.requires_grad}  # their fp32 weights are saved, rightly
    shapes = {tuple(p.shape) for p in model.parameters() if p.dtype == torch.bfloat16 and p.dim() == 2} - trained
    assert shapes
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        loss_sum, count = LlavaLoss(model)(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                           batch["pixel_values"])
    assert any(dtype == torch.bfloat16 and shape in shapes for dtype, shape in saved)  # the bf16 weights, by reference
    assert not any(dtype == torch.float32 and shape in shapes for dtype, shape in saved)
    weight_only.restore(model, torch.bfloat16)
    assert not weight_only.applied(model) and {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_weight_only_generation_keeps_its_kv_cache_in_bf16(world: Models):
    """On bf16-weights, generate's KV cache stores bf16 (the bf16 path's size), attention reads it in fp32, and the
    greedy answers are those of the same weights held in fp32 with an fp32 cache."""
    from llava_lora.infer import engine
    from llava_lora.model.load import generation_cache

    model, processor = load_model(world.qwen_model, device="cpu", dtype=WEIGHT_ONLY)
    cache = generation_cache(model)["cache"]
    assert isinstance(cache, weight_only.StoredHalfCache)
    plain, _ = load_model(world.qwen_model, device="cpu", dtype="float32")
    assert generation_cache(plain) == {}
    prompt = engine.prompts.generation_prompt(processor.tokenizer, [{"role": "user", "content": "<image>\nWhat?"}])
    from PIL import Image

    images = [Image.new("RGB", (32, 32), (200, 30, 30))]
    inputs = engine.prepare_inputs(model, processor, [prompt], images)
    settings = engine.GenerationSettings(max_new_tokens=6)
    with torch.inference_mode():
        model.generate(**inputs, **settings.generate_kwargs(), cache=cache,
                       pad_token_id=processor.tokenizer.pad_token_id)
    assert {layer.keys.dtype for layer in cache.layers} == {torch.bfloat16}
    assert cache.get_seq_length() > inputs["input_ids"].shape[1]
    keys = torch.randn(1, 2, 3, 16)
    got, _ = weight_only.StoredHalfCacheLayer().update(keys, keys)
    assert got.dtype == torch.float32 and torch.equal(got, keys.bfloat16().float())
    assert engine.answer(model, processor, [prompt], images, settings) == \
        engine.answer(plain, processor, [prompt], images, settings)


@pytest.mark.slow
def test_train_with_onednn_off_computes_in_fp32_and_learns(world: Models, tmp_path: Path):
    """The default on a CPU without native bf16: the start line says fp32 and why, and the loss falls."""
    data = tmp_path / "data"
    write_good_dataset(data, n=24)
    printed = io.StringIO()
    args = ["train", "--model", str(world.qwen_model), "--data", str(data), "--out", str(tmp_path / "run"), *FAST,
            "--max-steps", "30", "--batch-size", "4", "--learning-rate", "5e-3", "--log-every", "5"]
    with onednn_off(), contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(args) == 0
    line = next(l for l in printed.getvalue().splitlines() if l.startswith("precision "))
    assert line.startswith("precision fp32 on cpu (auto: oneDNN is off") and "computed in float32" in line
    assert "LoRA r=4 on 4 modules (each update one addmm)" in printed.getvalue()  # kernels/lora.py in fp32
    import json

    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_train_weight_only_keeps_frozen_bf16_and_learns(world: Models, tmp_path: Path, monkeypatch):
    """--precision bf16-weights: frozen weights bf16, trained ones fp32, no autocast; the loss falls."""
    data = tmp_path / "data"
    write_good_dataset(data, n=24)
    seen = {}
    real = weight_only.apply

    def spy(model):
        kept = real(model)
        seen["dtypes"] = parts.dtypes_by_role(model)
        return kept

    monkeypatch.setattr(weight_only, "apply", spy)
    cfg = train.TrainConfig(model=str(world.qwen_model), data=str(data), out=str(tmp_path / "run"), max_steps=30,
                            batch_size=4, learning_rate=5e-3, log_every=5, num_workers=0, tensorboard=False,
                            gradient_checkpointing=True, precision=WEIGHT_ONLY)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert train.main(cfg) == 0
    assert seen["dtypes"]["LoRA"] == seen["dtypes"]["projector"] == {torch.float32}
    assert torch.bfloat16 in seen["dtypes"]["frozen"]
    assert "frozen weights in bfloat16, computed in float32" in printed.getvalue()
    import json

    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_the_quickstart_recipe_learns_in_fp32_without_native_bf16(tmp_path: Path, capsys):
    """The first thing people run, on the kernels of a CPU without native bf16: auto trains the tiny model in fp32,
    and a sixth of the recipe's steps already lifts held-out exact match from 0 to most of the way."""
    import json

    with onednn_off():
        assert cli.main(["quickstart", "--out", str(tmp_path / "qs"), "--max-steps", "300"]) == 0
    printed = capsys.readouterr().out
    assert "precision fp32 on cpu (auto: oneDNN is off" in printed
    metrics = json.loads((tmp_path / "qs" / "run" / "eval-test" / "summary.json").read_text())["metrics"]
    assert metrics["base"]["exact_match_normalised"] == 0.0
    assert metrics["finetuned"]["exact_match_normalised"] >= 0.6, metrics["finetuned"]
