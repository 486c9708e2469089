"""Blocked eager attention: transformers' eager attention, computed in causal query blocks so that most of the
masked upper triangle is never computed. What ``train`` runs in the language model on a CPU in bf16.

Why: SDPA's CPU flash kernel gains nothing from bf16 (it runs at a fifth of the bf16 matmul peak here) and, given a
padding mask, computes the whole square. Eager attention is three bf16 matmul-sized steps (scores, softmax,
weighted sum) that oneDNN runs near its peak; split at the middle of the queries, the first half never meets the
second half's keys (a quarter of the square); in three blocks, a third. The numbers are eager's: scores in the inputs' dtype plus the
additive mask, softmax accumulated in float32 and rounded to the inputs' dtype, the weighted sum (the scale is
applied to the queries instead of the scores: the same up to rounding).

    from llava_lora import attention
    attention.use_for_language_model(model)   # a loaded LlavaForConditionalGeneration
"""

from __future__ import annotations

import torch

NAME = "llava_lora_blocked_eager"
BLOCKS = 3  # query blocks: 3 skip a third of the square; more cost more in smaller matmuls than they save


def blocked_eager_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                            softcap: float | None = None, **kwargs):
    """``AttentionInterface`` signature: [B, H, S, d] query, [B, Hkv, T, d] key and value, an additive [B, 1, S, T]
    mask (or None) -> ([B, S, H, d] output, None)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    S, T = query.shape[2], key.shape[2]
    # causal self-attention over the whole sequence: query i sees keys <= i; otherwise (a KV cache) one block
    blocked = getattr(module, "is_causal", True) and S == T and S >= 2 * BLOCKS
    edges = [round(S * i / BLOCKS) for i in range(BLOCKS + 1)] if blocked else [0, S]
    query = query * scaling  # [S, d] rather than eager's [S, T] scores: one pass over a fifth of the elements
    B, H, _, d = query.shape
    out = query.new_empty(B, S, H, d)  # each block's output lands in place: no concatenation, no transposed copy
    for q0, q1 in zip(edges[:-1], edges[1:]):
        k1 = q1 if blocked else T
        scores = torch.matmul(query[:, :, q0:q1], key[:, :, :k1].transpose(2, 3))
        if softcap is not None:  # Gemma 2
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, q0:q1, :k1]
        # torch's CPU softmax accumulates a bf16 row in float32 and rounds the result: eager's float32 softmax
        # then cast, to within an ulp, at a fifth of the time
        weights = torch.softmax(scores, dim=-1)
        weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
        out[:, q0:q1] = torch.matmul(weights, value[:, :, :k1]).transpose(1, 2)
    return out, None


def register() -> None:
    """Make ``NAME`` an attention implementation transformers knows, with eager's additive mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, blocked_eager_attention)
    AttentionMaskInterface.register(NAME, eager_mask)


def use_for_language_model(model) -> None:
    """Run the language model of a loaded LLaVA with blocked eager attention (the vision tower keeps its own)."""
    register()
    model.set_attn_implementation({"text_config": NAME})
