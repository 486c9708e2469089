"""Frozen weights stored in bf16, computed in float32: bf16's memory at fp32's speed on a CPU without native bf16.

    from llava_lora import weight_only
    weight_only.apply(model)      # a loaded (peft-wrapped) model with bf16 weights -> {"Linear": 290, ...}

Why: torch sends a bf16 matmul to oneDNN only on AVX-512 CPUs; elsewhere (most laptops, many cloud VMs, AVX2) it
takes ATen's reference kernel, 100-300x slower than fp32. Loading the 4 B model in fp32 instead needs 17 GB, which
a 16 GB machine does not have. So each frozen ``nn.Linear`` keeps its bf16 weight and upcasts it for its own
matmul, forward and backward, dropping the fp32 copy right after (one layer's weight at a time, never the model);
embeddings look up bf16 rows and hand on float32; every other parameter and buffer (norms, biases, convolutions,
position tables: <1% of a 4 B model) is held in float32. Trained weights (LoRA, the projector's trained copy) are
float32 already and untouched.

Parameter names, ``state_dict`` keys and dtypes on disk stay those of the bf16 model: a checkpoint, an adapter or a
merge (peft's, in place) is the same as on the bf16 path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

STORED = (torch.bfloat16, torch.float16)


# Elements of a weight upcast at once (whole rows). A 151,936-row lm_head in fp32 would be 1.6 GB for one matmul,
# and even a 2560 x 6912 MLP weight upcast whole is a fresh 70 MB buffer each call (page faults, then DRAM traffic):
# at 8 tokens (a decoding step) that took 54 ms of CPU time against 7.6 ms in chunks of 2^20 (4 MB in fp32, reused
# by the allocator and cache-resident) and 10.9 ms for the same matmul on fp32 weights; at 600 tokens the chunk
# size no longer matters (272-304 ms, fp32 258 ms). One thread, AVX512-BF16 EPYC, benchmarks/weight_only_chunks.py.
CHUNK_ELEMENTS = 1 << 20


def _row_chunks(weight: torch.Tensor) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[1]))
    return [slice(i, i + rows) for i in range(0, weight.shape[0], rows)]


class _UpcastLinear(torch.autograd.Function):
    """``x @ W.T + b`` with a frozen half-precision ``W`` upcast to x's dtype for the matmul, in chunks of rows; the
    backward upcasts it again instead of saving the fp32 copy (which would hold every layer's fp32 weight until the
    backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        chunks = _row_chunks(weight)
        if len(chunks) == 1:
            return F.linear(x, weight.to(x.dtype), bias)
        out = x.new_empty(*x.shape[:-1], weight.shape[0])  # [..., out]
        for rows in chunks:
            out[..., rows] = F.linear(x, weight[rows].to(x.dtype), None if bias is None else bias[rows])
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = None
        for rows in _row_chunks(weight):  # [..., out] @ [out, in]: the input's gradient alone (W is frozen)
            part = grad[..., rows] @ weight[rows].to(grad.dtype)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None


class StoredHalfLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose frozen weight stays in half precision and is computed in its input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return super().forward(x)
        if self.weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("a half-precision weight stored for fp32 compute gets no gradient: train it in fp32")
        return _UpcastLinear.apply(x, self.weight, self.bias)


class StoredHalfEmbedding(torch.nn.Embedding):
    """An ``nn.Embedding`` whose half-precision table hands on float32 rows (the lookup itself needs no matmul)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


class StoredHalfCacheLayer(DynamicLayer):
    """A KV-cache layer that stores keys and values in bf16 and hands them to attention in the compute dtype: the
    cache of the bf16 path's size (an fp32 cache of 4 prompts of ~660 tokens is 2.2 GB at the 4 B model's shapes, and
    made eval's peak 1.53x the bf16 weights), the upcast one layer at a time."""

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states.to(torch.bfloat16), value_states.to(torch.bfloat16), *args,
                                      **kwargs)
        return keys.to(key_states.dtype), values.to(value_states.dtype)


class StoredHalfCache(DynamicCache):
    """``DynamicCache`` of ``StoredHalfCacheLayer``: pass as ``generate(cache=StoredHalfCache())``."""

    def __init__(self):
        super(DynamicCache, self).__init__(layer_class_to_replicate=StoredHalfCacheLayer)


def _convert(module: torch.nn.Module) -> str | None:
    """Give ``module`` its stored-half class in place where it has a half weight; its kind, or None. (What trains is
    float32 by then, so every half weight is a frozen one.)"""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dtype not in STORED:
        return None
    if type(module) is torch.nn.Linear:
        module.__class__ = StoredHalfLinear
        return "Linear"
    if type(module) is torch.nn.Embedding:
        module.__class__ = StoredHalfEmbedding
        return "Embedding"
    return None


def apply(model: torch.nn.Module) -> dict[str, int]:
    """Frozen Linear and Embedding weights stay half precision (computed in float32); every other half-precision
    parameter and buffer becomes float32. In place; returns how many modules of each kind keep half weights."""
    kept = {"Linear": 0, "Embedding": 0}
    held: set[int] = set()
    for module in model.modules():
        kind = _convert(module)
        if kind:
            kept[kind] += 1
            held.add(id(module.weight))
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.dtype in STORED and id(p) not in held:
                p.data = p.data.float()
        for name, b in module.named_buffers(recurse=False):
            if b.dtype in STORED:
                module._buffers[name] = b.float()
    return kept


def applied(model: torch.nn.Module) -> bool:
    """Whether ``apply`` left any half weight computed in float32 in ``model``."""
    return any(isinstance(m, (StoredHalfLinear, StoredHalfEmbedding)) for m in model.modules())


def restore(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Undo ``apply`` before saving: plain classes again, every floating tensor in ``dtype`` (the checkpoint's)."""
    for module in model.modules():
        if type(module) is StoredHalfLinear:
            module.__class__ = torch.nn.Linear
        elif type(module) is StoredHalfEmbedding:
            module.__class__ = torch.nn.Embedding
    model.to(dtype)
