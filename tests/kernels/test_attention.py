"""Blocked eager attention (``llava_lora/kernels/attention.py``) computes eager attention: the same outputs and gradients,
in float32 to rounding, for every family's attention (GQA, Gemma 2's soft-capping and sliding window), with
padding, and in the vision tower (not causal); and train runs it in both.

    .venv/bin/pytest tests/kernels/test_attention.py -q
"""

from __future__ import annotations

import pytest
import torch

from llava_lora.kernels import attention
from llava_lora.tiny.families import tiny_family


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 37 tokens, two right-padded: odd lengths, so the query blocks split unevenly."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab - 1, (3, 37), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0
    mask[2, 33:] = 0
    return ids, mask


def _run(model, ids, mask):
    """(logits at real tokens, gradient of the input embeddings) of a summed loss over real tokens."""
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits[mask.bool()].float().square().mean().backward()
    return logits[mask.bool()].detach(), model.get_input_embeddings().weight.grad.clone()


@pytest.mark.parametrize("family", ["qwen2.5", "gemma2", "mistral"])
def test_blocked_eager_equals_eager_in_float32(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_family(family, tmp_path / family), dtype=torch.float32,
                                                 attn_implementation="eager")
    ids, mask = _batch(model.config.vocab_size)
    want_logits, want_grad = _run(model, ids, mask)
    attention.register()
    model.set_attn_implementation(attention.NAME)
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: calls.append(1) if type(m).__name__.endswith("Attention") else None)
    try:
        got_logits, got_grad = _run(model, ids, mask)
    finally:
        hook.remove()
    assert model.config._attn_implementation == attention.NAME and calls
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_a_kv_cache_step_is_one_block_and_matches_eager(tmp_path):
    """Generation: a query shorter than the keys (the KV cache) is not causal-blocked; the answers equal eager's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_family("qwen2.5", tmp_path / "q"), dtype=torch.float32,
                                                 attn_implementation="eager")
    ids, mask = _batch(model.config.vocab_size)
    want = model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=6, do_sample=False)
    attention.register()
    model.set_attn_implementation(attention.NAME)
    got = model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_train_runs_it_in_the_language_model_and_the_vision_tower(world, monkeypatch):
    """--attn-implementation blocked_eager (auto on a CPU in bf16): both switch after loading."""
    from llava_lora.model.load import load_for_training
    from llava_lora.train import loop as train

    cfg = train.TrainConfig(model=str(world.qwen_model), data="unused", out="unused")
    model, _ = load_for_training(cfg, "cpu", "bf16", "blocked_eager")
    assert model.config.text_config._attn_implementation == attention.NAME
    assert model.config.vision_config._attn_implementation == attention.NAME


def test_the_vision_tower_is_one_unmasked_block_equal_to_sdpa(world, monkeypatch):
    """CLIP's attention is not causal: one block over every patch, SDPA's features in float32 to rounding."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(world.qwen_model, dtype=torch.float32,
                                                          attn_implementation="sdpa")
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.model.vision_tower(pixels).last_hidden_state
        attention.use_blocked(model)
        blocks = []
        edges = attention._edges
        monkeypatch.setattr(attention, "_edges", lambda *a: blocks.append(edges(*a)) or blocks[-1])
        got = model.model.vision_tower(pixels).last_hidden_state
    patches = (size // model.config.vision_config.patch_size) ** 2 + 1
    assert blocks == [[(0, patches, patches)]] * model.config.vision_config.num_hidden_layers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
