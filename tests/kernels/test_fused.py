"""The fused RMSNorm and SwiGLU kernels (``llava_lora/kernels/fused.py``) compute what the modules they replace compute:
the same outputs and gradients, in float32 to rounding, for every family whose modules are Llama's; other
families keep their own; generation never runs them; train turns them on where they can run and says so.

    .venv/bin/pytest tests/kernels/test_fused.py -q
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from llava_lora.kernels import fused
from llava_lora.train import runtime
from llava_lora.errors import UsageError
from llava_lora.tiny.families import tiny_family

from test_attention import _batch, _run

# (RMSNorm, SwiGLU) fused in a tiny model of 2 layers: two norms a layer and the final one; an MLP a layer
EXPECTED = {"qwen2.5": (5, 2), "mistral": (5, 2), "phi3": (5, 0), "gemma2": (0, 0)}


@pytest.fixture
def traced_only(monkeypatch):
    """The kernels traced as train traces them (dynamo, dynamic shapes, AOT autograd's forward and backward graphs)
    but run by ``aot_eager``, not inductor: inductor's C++ compilation takes 20-30 s on an empty cache (a fresh
    machine), which the fast suite cannot afford; test_inductor_kernels_equal_the_modules runs it."""
    def compiled():
        return tuple(torch.compile(f, dynamic=True, backend="aot_eager") for f in (fused._rms_norm, fused._swiglu))

    monkeypatch.setattr(fused, "_compiled", functools.cache(compiled))


@pytest.mark.parametrize("family", EXPECTED)
def test_fused_equals_the_modules_in_float32(family, tmp_path, traced_only):
    """Phi-3's MLP (one gate_up projection) and Gemma 2's norm (1 + w) and MLP (GELU) are not Llama's: left
    alone, the model still computes the same."""
    _assert_fused_equals_the_modules(family, tmp_path)


@pytest.mark.slow  # inductor's C++ compilation: 20-30 s on an empty cache, ~3 s on a warm one
def test_inductor_kernels_equal_the_modules(tmp_path):
    """The kernels as train runs them on a CPU: inductor's generated C++."""
    _assert_fused_equals_the_modules("qwen2.5", tmp_path)


def _assert_fused_equals_the_modules(family: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_family(family, tmp_path / family), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # norm weights start at 1 (0 for Gemma): make them matter
    ids, mask = _batch(model.config.vocab_size)
    want_logits, want_grad = _run(model, ids, mask)
    counts = fused.fuse(model.model)
    assert (counts["RMSNorm"], counts["SwiGLU"]) == EXPECTED[family]
    got_logits, got_grad = _run(model, ids, mask)
    assert not fused._failed  # the compiled kernels ran, not the eager fallback
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_generation_keeps_the_eager_modules(tmp_path, monkeypatch):
    """The fused forward runs where gradients are recorded, never in no_grad generation (which would compile
    again for every decoding shape)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_family("qwen2.5", tmp_path / "q"), dtype=torch.float32)
    ids, mask = _batch(model.config.vocab_size)
    want = model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False)
    fused.fuse(model.model)
    calls = []
    monkeypatch.setattr(fused, "_compiled", lambda: calls.append(1) or (fused._rms_norm, fused._swiglu))
    got = model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want) and not calls
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert len(calls) == 5 + 2  # with gradients: every fused norm and MLP


@pytest.mark.parametrize("choice, device, compiler, expected", [
    ("auto", "cpu", True, True), ("auto", "cpu", False, False), ("auto", "cuda", True, False),
    ("on", "cpu", True, True), ("off", "cpu", True, False), ("off", "cuda", False, False),
])
def test_fused_kernels_resolution(monkeypatch, choice, device, compiler, expected):
    monkeypatch.setattr(runtime, "_has_cpp_compiler", lambda: compiler)
    assert runtime.resolve_fused_kernels(choice, device) is expected


def test_compile_leaves_the_fusing_to_the_whole_graph(monkeypatch):
    monkeypatch.setattr(runtime, "_has_cpp_compiler", lambda: True)
    assert runtime.resolve_fused_kernels("auto", "cpu", compile_all=True) is False


@pytest.mark.parametrize("device, compiler, compile_all, says", [
    ("cpu", False, False, "needs a C++ compiler"), ("cuda", True, False, "is for a CPU"),
    ("cpu", True, True, "with --compile: the compiled language model fuses"),
])
def test_fused_kernels_on_where_they_cannot_run_is_refused(monkeypatch, device, compiler, compile_all, says):
    monkeypatch.setattr(runtime, "_has_cpp_compiler", lambda: compiler)
    with pytest.raises(UsageError, match=re.escape(says)):
        runtime.resolve_fused_kernels("on", device, compile_all)


def test_a_failed_compilation_falls_back_to_eager_once(tmp_path, monkeypatch):
    """Where torch.compile cannot build the kernels (a broken toolchain), training goes on with the eager modules
    and says so once: the run loses the speed-up, not its work."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_family("qwen2.5", tmp_path / "q"), dtype=torch.float32)
    ids, mask = _batch(model.config.vocab_size)
    want_logits, want_grad = _run(model, ids, mask)
    fused.fuse(model.model)
    attempts = []

    def broken(*args):
        attempts.append(1)
        raise torch._dynamo.exc.InternalTorchDynamoError("the C++ compiler crashed")

    monkeypatch.setattr(fused, "_compiled", lambda: (broken, broken))
    monkeypatch.setattr(fused, "_failed", [])
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(InternalTorchDynamoError: the C\+\+ compiler"):
        got_logits, got_grad = _run(model, ids, mask)
    assert len(attempts) == 1  # tried once, not once per module and step
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)
