"""Blocked eager attention: transformers' eager attention, computed in causal query blocks so that most of the
masked upper triangle is never computed. What ``train`` runs on a CPU in bf16.

Why: SDPA's CPU flash kernel gains nothing from bf16 (it runs at a fifth of the bf16 matmul peak here) and, given a
padding mask, computes the whole square. Eager attention is three bf16 matmul-sized steps (scores, softmax,
weighted sum) that oneDNN runs near its peak; split at the middle of the queries, the first half never meets the
second half's keys (a quarter of the square); in three blocks, a third. The numbers are eager's: scores in the
inputs' dtype plus the additive mask, softmax accumulated in float32 and rounded to the inputs' dtype, the weighted
sum (the scale is applied to the queries instead of the scores: the same up to rounding).

The backward is written out (``_BlockedAttention``): each block's key and value gradients are added in place into
one buffer, where autograd would give every block a zero-filled full-length gradient and sum them.

    from llava_lora import attention
    attention.use_blocked(model)   # a loaded LlavaForConditionalGeneration: its language model and vision tower
"""

from __future__ import annotations

import torch

NAME = "llava_lora_blocked_eager"
BLOCKS = 3  # query blocks: 3 skip a third of the square; more cost more in smaller matmuls than they save


def _edges(S: int, T: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first query, end query, end key) of each block: causal self-attention over the whole sequence is cut into
    ``BLOCKS`` query blocks (query i sees keys <= i); anything else (a KV cache, a vision tower) is one block."""
    if not (causal and S == T and S >= 2 * BLOCKS):
        return [(0, S, T)]
    cuts = [round(S * i / BLOCKS) for i in range(BLOCKS + 1)]
    return [(q0, q1, q1) for q0, q1 in zip(cuts[:-1], cuts[1:])]


class _BlockedAttention(torch.autograd.Function):
    """[B, H, S, d] query, [B, H, T, d] key and value, an additive [B, 1, S, T] mask or None -> [B, S, H, d].
    Matmuls on [B*H, ...] views of contiguous copies (one copy each, not one per block); softmax in place."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scaling: float, blocks):
        B, H, S, d = query.shape
        q = torch.empty((B, H, S, d), dtype=query.dtype, device=query.device)
        torch.mul(query, scaling, out=q)  # the scale and the contiguous copy in one pass
        q3, k3, v3 = q.view(B * H, S, d), key.contiguous().view(B * H, -1, d), value.contiguous().view(B * H, -1, d)
        out = query.new_empty(B, S, H, d)  # each block's output lands in place, in the layout o_proj reads
        keep = any(ctx.needs_input_grad[:3])
        probs = []
        for q0, q1, k1 in blocks:
            scores = torch.bmm(q3[:, q0:q1], k3[:, :k1].transpose(1, 2))
            if mask is not None:
                scores.view(B, H, q1 - q0, k1).add_(mask[:, :, q0:q1, :k1])
            # torch's CPU softmax accumulates a bf16 row in float32 and rounds the result: eager's float32 softmax
            # then cast, to within an ulp, at a fifth of the time
            p = torch.softmax(scores, dim=-1)
            out[:, q0:q1] = torch.bmm(p, v3[:, :k1]).view(B, H, q1 - q0, d).transpose(1, 2)
            if keep:
                probs.append(p)
        if keep:
            ctx.save_for_backward(q3, k3, v3, *probs)
            ctx.scaling, ctx.blocks, ctx.shape = scaling, blocks, (B, H, S, d)
        return out

    @staticmethod
    def backward(ctx, dout):
        q3, k3, v3, *probs = ctx.saved_tensors
        B, H, S, d = ctx.shape
        do3 = dout.transpose(1, 2).contiguous().view(B * H, S, d)
        dq, dk3, dv3 = [], None, None
        # The last block reaches every key: it allocates the key and value gradients, the others add into them.
        # No baddbmm_ into a slice: a non-contiguous output makes torch fall back to one addmm_ per batch row
        # (B*H of them), 15-20% of a small model's step; a bmm then an add is one kernel each.
        for (q0, q1, k1), p in reversed(list(zip(ctx.blocks, probs))):
            do = do3[:, q0:q1]
            ds = torch.ops.aten._softmax_backward_data(torch.bmm(do, v3[:, :k1].transpose(1, 2)), p, -1, p.dtype)
            dq.append(torch.bmm(ds, k3[:, :k1]))
            if dv3 is None:
                dv3, dk3 = torch.bmm(p.transpose(1, 2), do), torch.bmm(ds.transpose(1, 2), q3[:, q0:q1])
            else:
                dv3[:, :k1] += torch.bmm(p.transpose(1, 2), do)
                dk3[:, :k1] += torch.bmm(ds.transpose(1, 2), q3[:, q0:q1])
        dq3 = (dq[0] if len(dq) == 1 else torch.cat(dq[::-1], dim=1)).mul_(ctx.scaling)
        T = k3.shape[1]
        return dq3.view(B, H, S, d), dk3.view(B, H, T, d), dv3.view(B, H, T, d), None, None, None


def _autograd_blocks(module, query, key, value, attention_mask, blocks, softcap, dropout):
    """The same blocks through autograd, for what ``_BlockedAttention`` leaves out: Gemma 2's soft-capped scores
    and attention dropout."""
    B, H, S, d = query.shape
    out = query.new_empty(B, S, H, d)
    for q0, q1, k1 in blocks:
        scores = torch.matmul(query[:, :, q0:q1], key[:, :, :k1].transpose(2, 3))
        if softcap is not None:  # Gemma 2
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, q0:q1, :k1]
        weights = torch.nn.functional.dropout(torch.softmax(scores, dim=-1), p=dropout, training=module.training)
        out[:, q0:q1] = torch.matmul(weights, value[:, :, :k1]).transpose(1, 2)
    return out


def blocked_eager_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                            softcap: float | None = None, **kwargs):
    """``AttentionInterface`` signature: [B, H, S, d] query, [B, Hkv, T, d] key and value, an additive [B, 1, S, T]
    mask (or None) -> ([B, S, H, d] output, None)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)  # a vision tower's attention has no GQA
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    blocks = _edges(query.shape[2], key.shape[2], getattr(module, "is_causal", True))
    if softcap is None and not (dropout and module.training):
        return _BlockedAttention.apply(query, key, value, attention_mask, scaling, blocks), None
    return _autograd_blocks(module, query * scaling, key, value, attention_mask, blocks, softcap, dropout), None


def register() -> None:
    """Make ``NAME`` an attention implementation transformers knows, with eager's additive mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, blocked_eager_attention)
    AttentionMaskInterface.register(NAME, eager_mask)


def use_blocked(model) -> None:
    """Run a loaded LLaVA's language model and vision tower with blocked eager attention (the vision tower's
    attention is not causal: one block, eager attention with a bf16 softmax)."""
    register()
    model.set_attn_implementation({"text_config": NAME, "vision_config": NAME})
