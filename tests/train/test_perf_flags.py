"""`llava-lora train`'s fast-path options: each resolves against the device and the installed packages at start,
and one that cannot apply is refused with a one-line error, never ignored. The dropped attention mask of a
right-padded batch changes no loss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures.models import Models, quiet
from llava_lora import cli
from llava_lora.train import loop as train
from llava_lora.train import runtime
from llava_lora.errors import UsageError
from llava_lora.model.loss import LlavaLoss


def _packages(monkeypatch, *installed: str) -> None:
    """Pretend exactly ``installed`` of the optional packages are importable."""
    monkeypatch.setattr(runtime, "_installed", lambda name: name in installed)


def test_quantize_4bit_on_cpu_is_one_line_usage_error(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--out", str(out),
                   "--quantize", "4bit", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("llava-lora train: error: --quantize 4bit needs a CUDA device")
    assert not out.exists()  # refused before RUN_DIR is touched


def test_quantize_4bit_needs_bitsandbytes(monkeypatch):
    _packages(monkeypatch)
    with pytest.raises(UsageError, match="bitsandbytes"):
        runtime.check_quantize("4bit", "cuda")
    _packages(monkeypatch, "bitsandbytes")
    runtime.check_quantize("4bit", "cuda")
    runtime.check_quantize("none", "cpu")


@pytest.mark.parametrize("choice, device, precision, installed, expected", [
    ("auto", "cpu", "fp32", ("flash_attn",), "sdpa"),  # flash-attn kernels are CUDA's
    ("auto", "cpu", "bf16", (), "blocked_eager"),  # SDPA's CPU kernel gains nothing from bf16
    ("auto", "cuda", "bf16", ("flash_attn",), "flash_attention_2"),
    ("auto", "cuda", "bf16", (), "sdpa"),
    ("sdpa", "cpu", "bf16", (), "sdpa"),
    ("sdpa", "cuda", "fp32", ("flash_attn",), "sdpa"),
    ("eager", "cpu", "fp32", (), "eager"),
    ("blocked_eager", "cpu", "fp32", (), "blocked_eager"),
    ("flash_attention_2", "cuda", "bf16", ("flash_attn",), "flash_attention_2"),
])
def test_attn_implementation_resolution(monkeypatch, choice, device, precision, installed, expected):
    _packages(monkeypatch, *installed)
    assert runtime.resolve_attn_implementation(choice, device, precision=precision) == expected


@pytest.mark.parametrize("device, installed", [("cpu", ("flash_attn",)), ("cuda", ())])
def test_flash_attention_where_it_cannot_run_is_refused(monkeypatch, device, installed):
    _packages(monkeypatch, *installed)
    with pytest.raises(UsageError, match="flash_attention_2 needs a CUDA device and the flash-attn package"):
        runtime.resolve_attn_implementation("flash_attention_2", device)


@pytest.mark.parametrize("choice, device, installed, expected", [
    ("auto", "cpu", ("liger_kernel",), False),  # Triton kernels: CUDA only
    ("auto", "cuda", ("liger_kernel",), True),
    ("auto", "cuda", (), False),
    ("off", "cuda", ("liger_kernel",), False),
    ("on", "cuda", ("liger_kernel",), True),
])
def test_fused_loss_resolution(monkeypatch, choice, device, installed, expected):
    _packages(monkeypatch, *installed)
    assert runtime.resolve_fused_loss(choice, device) is expected


@pytest.mark.parametrize("device, installed", [("cpu", ("liger_kernel",)), ("cuda", ())])
def test_fused_loss_on_without_liger_is_refused(monkeypatch, device, installed):
    _packages(monkeypatch, *installed)
    with pytest.raises(UsageError, match="--fused-loss on needs a CUDA device and the liger-kernel package"):
        runtime.resolve_fused_loss("on", device)


def test_fused_loss_on_cpu_from_the_command_line(tmp_path, capsys):
    rc = cli.main(["train", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"),
                   "--fused-loss", "on", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--fused-loss on needs" in err


def test_compile_on_cpu_without_a_cxx_compiler_is_refused(tmp_path, capsys):
    from torch._inductor import config as inductor_config

    out = tmp_path / "run"
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        rc = cli.main(["train", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d"), "--out", str(out),
                       "--compile", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "--compile on a CPU needs a C++ compiler" in err
    assert not out.exists()  # refused before RUN_DIR is touched
    runtime.check_compile(True, "cuda")  # a GPU compiles with Triton: not this check's business
    runtime.check_compile(False, "cpu")


_FAULTS_PER_STEP = """
import resource, torch
from llava_lora.train import runtime
def faults_per_step():  # a 40 MB activation made, written and freed, as each training step does
    for _ in range(2):
        torch.ones(10 << 20).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(10 << 20).sum()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10
default = faults_per_step()
print(default, runtime.keep_cpu_heap(), faults_per_step())
"""


def test_keep_cpu_heap_stops_refaulting_freed_activations():
    """glibc maps a freed 40 MB block again on every allocation (~10,000 page faults); once kept, it is reused.
    In a process of its own: the allocator's settings are the process's."""
    run = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP], capture_output=True, text=True, check=True)
    default, applied, kept = run.stdout.split()
    if applied == "False":
        pytest.skip("not glibc: keep_cpu_heap leaves the allocator as it is")
    assert int(default) > 5_000  # 10,240 pages of 4 KiB faulted in again each time
    assert int(kept) < int(default) / 20


def test_mask_dropped_only_for_right_padding():
    ids = torch.ones(2, 4, dtype=torch.long)
    right = {"input_ids": ids, "labels": ids, "pixel_values": None,
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    assert train._model_inputs(right, "cpu")["attention_mask"] is None
    left = dict(right, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
    assert torch.equal(train._model_inputs(left, "cpu")["attention_mask"], left["attention_mask"])


def test_loss_without_mask_equals_masked_loss(world: Models, data: Path):
    """A padded batch (one text-only record is shorter): the loss and every gradient come out the same."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_lora.model.adapters import apply_lora
    from llava_lora.chat.batches import Collator, TrainDataset
    from llava_lora.data.records import load_records, resolve_data

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(world.qwen_model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(world.qwen_model)
    peft_model = apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():  # make the LoRA path matter (B starts at zero)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    data_file, root = resolve_data(str(data), None, None)
    records, _ = load_records(data_file)
    ds = TrainDataset(records, root, processor, model.config.image_token_id, 16, 2048)
    batch = Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(4)])
    assert (batch["attention_mask"] == 0).any()
    loss_module = LlavaLoss(peft_model)
    results = []
    for mask in (batch["attention_mask"], None):
        peft_model.zero_grad()
        loss_sum, count = loss_module(batch["input_ids"], mask, batch["labels"], batch["pixel_values"])
        (loss_sum / count).backward()
        results.append((float(loss_sum.detach()), {n: p.grad.clone() for n, p in peft_model.named_parameters()
                                          if p.requires_grad}))
    (masked, g_masked), (unmasked, g_unmasked) = results
    assert abs(masked - unmasked) < 1e-4 * abs(masked)
    for n in g_masked:
        torch.testing.assert_close(g_unmasked[n], g_masked[n], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_metrics_rows_carry_step_time(world: Models, data: Path, tmp_path):
    out = tmp_path / "run"
    cfg = train.TrainConfig(model=str(world.qwen_model), data=str(data), out=str(out), max_steps=2, batch_size=4,
                            log_every=1, save_every=100, num_workers=0, gradient_checkpointing=False,
                            tensorboard=False, attn_implementation="sdpa", fused_loss="auto")
    assert quiet(train.main, cfg) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["step_time"] > 0 and r["samples_per_s"] > 0 for r in rows)


def test_fast_path_flags_on_the_command_line():
    from llava_lora import config as cfglib

    parser, leaves = cli._parser()
    cfglib.add_arguments(leaves["train"], train.TrainConfig)
    args = parser.parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--attn-implementation", "eager",
                              "--fused-loss", "off", "--compile", "--quantize", "none"])
    cfg = cfglib.resolve(train.TrainConfig, args)
    assert (cfg.attn_implementation, cfg.fused_loss, cfg.compile, cfg.quantize) == ("eager", "off", True, "none")


@pytest.mark.slow
def test_compiled_training_matches_eager(world: Models, data: Path, tmp_path):
    """`--compile` trains the same: every step's loss and the saved adapter agree with the eager run. Batches of
    other padded lengths reuse the first step's compiled code (dynamic shapes): three steps compile no more
    frames than one. (Image records only: a text-only batch, whose embeddings need no gradient, compiles once
    more, by design of torch.compile's guards.)"""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    records = [r for r in json.loads((data / "chat.json").read_text()) if "image" in r]
    image_only = tmp_path / "image-only.json"
    image_only.write_text(json.dumps(records))

    def run(compiled: bool, steps: int) -> tuple[list[float], dict, int]:
        torch._dynamo.reset()
        counters.clear()
        out = tmp_path / f"run-{compiled}-{steps}"
        cfg = train.TrainConfig(model=str(world.qwen_model), data=str(image_only),
                                image_dir=str(data / "images_dl"), out=str(out), max_steps=steps,
                                batch_size=2, log_every=1, save_every=100, num_workers=0, lora_dropout=0.0,
                                gradient_checkpointing=False, tensorboard=False, compile=compiled,
                                fused_kernels="off",  # the eager run compiles nothing
                                # fp32: compiled and eager code must compute the same, and only fp32 shows it
                                # to 1e-4 (in bf16 their fusions round differently, ~0.4% on these losses)
                                precision="fp32")
        assert quiet(train.main, cfg) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows], load_file(out / "adapter_model.safetensors"), counters["frames"]["total"]

    eager_losses, eager_adapter, eager_frames = run(False, 3)
    _, _, frames_one_step = run(True, 1)
    compiled_losses, compiled_adapter, frames_three_steps = run(True, 3)
    assert eager_frames == 0 and frames_one_step >= 1  # it did compile
    assert frames_three_steps == frames_one_step  # the other lengths did not make it compile again
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled_adapter.keys() == eager_adapter.keys()  # the same names: checkpoints load either way
    for name in eager_adapter:
        torch.testing.assert_close(compiled_adapter[name], eager_adapter[name], rtol=1e-3, atol=1e-5)
