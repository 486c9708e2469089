"""The language model's RMSNorm and SwiGLU as fused kernels in training on a CPU: each compiled by torch.compile
(inductor's generated C++) into one pass over the activations forward and about one backward.

Why: eager RMSNorm is a chain of float32 round trips (cast up, square, mean, scale, cast down, weight) and autograd
walks it back op by op: at ``proportional``'s shape a norm takes ~8 ms forward and backward, the compiled one ~2 ms,
and a decoder layer has two. SwiGLU (``silu(gate) * up``) saves a third of its time the same way. The matmuls stay
oneDNN's; only these element-wise chains are compiled, so the first step compiles in seconds, not minutes.

Which modules: those whose ``forward`` is transformers' Llama RMSNorm or MLP, code object for code object
(transformers copies them into Qwen2, Qwen3, Mistral, Phi-3, ...), the MLP with SiLU. Others (Gemma's ``1 + w``
norm, Phi-3's fused gate_up projection) keep their own forward. The fused forward runs only where gradients are
recorded; generation (no_grad) keeps eager, so it never compiles for a decoding shape.

    from llava_lora import fused
    fused.fuse(model.model.language_model)   # a loaded LLaVA's -> {"RMSNorm": 17, "SwiGLU": 8}
"""

from __future__ import annotations

import functools
import types
import warnings

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm: normalised in float32, rounded to the input's dtype, then scaled."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@functools.cache
def _compiled():
    """(rms_norm, swiglu), compiled once per process for any sequence length (dynamic: every batch pads to its
    own), shared by every module and model."""
    return torch.compile(_rms_norm, dynamic=True), torch.compile(_swiglu, dynamic=True)


_failed: list[str] = []  # why torch.compile could not build the kernels, once it has failed: eager from then on


def _fused_or_eager(kind: int, eager, *args):
    """The compiled kernel ``kind`` (0: RMSNorm, 1: SwiGLU), or ``eager`` where compiling it failed: a run loses
    the speed-up, not its work."""
    if not _failed:
        try:
            return _compiled()[kind](*args)
        except torch._dynamo.exc.TorchDynamoException as e:  # inductor's errors arrive as BackendCompilerFailed
            _failed.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            warnings.warn(f"fused kernels: torch.compile failed ({_failed[0]}); RMSNorm and SwiGLU run eager from "
                          "here on (--fused-kernels off skips the attempt)", RuntimeWarning, stacklevel=2)
    return eager(*args)


def _norm_forward(self, hidden_states):
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    return _fused_or_eager(0, _rms_norm, hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    return self.down_proj(_fused_or_eager(1, _swiglu, self.gate_proj(x), self.up_proj(x)))


def _same_code(f, g) -> bool:
    """Whether two functions have the same code (the same source, wherever it sits)."""
    a, b = f.__code__, g.__code__
    return (a.co_code, a.co_consts, a.co_names, a.co_varnames) == (b.co_code, b.co_consts, b.co_names, b.co_varnames)


def fuse(language_model) -> dict[str, int]:
    """Give a language model's Llama-style RMSNorms and SiLU MLPs the fused forward, in place (parameter names
    and checkpoints are unchanged). Returns how many modules of each kind were fused."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    silu = (SiLUActivation, torch.nn.SiLU)  # hidden_act "silu" and "swish"
    fused = {"RMSNorm": 0, "SwiGLU": 0}
    for module in language_model.modules():
        forward = getattr(type(module), "forward", None)
        if forward is None or not hasattr(forward, "__code__"):
            continue
        if _same_code(forward, LlamaRMSNorm.forward):
            module.forward, fused["RMSNorm"] = types.MethodType(_norm_forward, module), fused["RMSNorm"] + 1
        elif _same_code(forward, LlamaMLP.forward) and isinstance(getattr(module, "act_fn", None), silu):
            module.forward, fused["SwiGLU"] = types.MethodType(_mlp_forward, module), fused["SwiGLU"] + 1
    return fused
