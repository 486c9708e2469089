"""The fused LoRA forward (``llava_lora/kernels/lora.py``) computes peft's: the same outputs and gradients in float32
to rounding, peft's own path wherever the fused one does not apply, and the same saved adapter.

    .venv/bin/pytest tests/kernels/test_lora.py -q
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from llava_lora.kernels import lora


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(24, 16, bias=True)
        self.up_proj = torch.nn.Linear(24, 40, bias=False)

    def forward(self, x):
        return self.q_proj(x).sum(-1) + self.up_proj(x).square().mean(-1)


def _pair(**config):
    """Two identical peft models with B non-zero (at init B is zero, which would hide a wrong update)."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = get_peft_model(_Block(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                    **config))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        models.append(model)
    return models


def _step(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


def test_fused_equals_peft_in_float32():
    peft_model, fused_model = _pair()
    assert lora.apply(fused_model) == 2
    x = torch.randn(3, 7, 24)
    (out, dx, grads), (f_out, f_dx, f_grads) = _step(peft_model, x), _step(fused_model, x)
    torch.testing.assert_close(f_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_dx, dx, rtol=1e-5, atol=1e-5)
    assert f_grads.keys() == grads.keys() and len(grads) == 4  # A and B of both layers
    for name in grads:
        torch.testing.assert_close(f_grads[name], grads[name], rtol=1e-5, atol=1e-5)
    saved, f_saved = get_peft_model_state_dict(peft_model), get_peft_model_state_dict(fused_model)
    assert saved.keys() == f_saved.keys()


def test_fused_path_is_the_one_taken(monkeypatch):
    """The plain case goes through addmm (a fused path that silently fell back would still pass the test above)."""
    _, model = _pair()
    lora.apply(model)
    calls = []
    real = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(k.get("alpha")) or real(*a, **k))
    model(torch.randn(2, 24))
    assert calls == [2.0, 2.0]  # lora_alpha / r, once per LoRA layer


@pytest.mark.parametrize("case", ["dropout", "disabled", "merged", "bf16 input"])
def test_peft_forward_where_fusing_does_not_apply(case, monkeypatch):
    peft_model, fused_model = _pair(lora_dropout=0.1 if case == "dropout" else 0.0)
    lora.apply(fused_model)
    x = torch.randn(2, 24)
    for model in (peft_model, fused_model):
        model.eval()  # dropout off, so both sides compute the same where both run peft's forward
        if case == "merged":
            model.merge_adapter()
        if case == "bf16 input":  # the native-bf16 path: frozen weights bf16, LoRA float32
            model.to(torch.bfloat16)
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = p.data.float()
    if case == "bf16 input":
        x = x.bfloat16()
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: pytest.fail("the fused path ran"))
    with (fused_model.disable_adapter() if case == "disabled" else torch.no_grad()):
        fused = fused_model(x)
    with (peft_model.disable_adapter() if case == "disabled" else torch.no_grad()):
        expected = peft_model(x)
    assert torch.equal(fused, expected)
