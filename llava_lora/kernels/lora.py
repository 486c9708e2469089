"""LoRA's update added by the matmul that makes it: ``addmm(base(x), A(x), B.T, alpha=scaling)``.

    from llava_lora.kernels import lora
    lora.apply(peft_model)        # -> how many peft LoRA Linear layers now take the fused path

peft computes ``base(x) + B(A(x)) * scaling``: after the rank-r matmul, a scale and an add, each a pass over the
[tokens, out] output, and the scale's backward another. ``addmm`` folds both into the matmul, and its backward
scales the rank-r gradients instead of the full-width one. On a small model those passes are a large share of a
step: the quickstart's 14 LoRA layers make 84 of its 117 matmul calls a step (benchmarks/lora_fused.py).

Only the plain case is taken (one active adapter, no dropout, no variant such as DoRA, no LoRA bias, not merged,
the base output in LoRA's dtype); anything else is peft's own forward, unchanged. The class swap keeps parameter
names, ``state_dict`` keys and saved adapters as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear


class FusedLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` whose plain forward adds the update with one ``addmm``."""

    def _plain_adapter(self, x: torch.Tensor) -> str | None:
        """The one active adapter when the fused path computes what peft would, else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant:
            return None
        if not isinstance(self.lora_dropout[name], torch.nn.Identity) or self.lora_B[name].bias is not None:
            return None
        return name if x.dtype == self.lora_A[name].weight.dtype else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if args or kwargs else self._plain_adapter(x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        down, up = self.lora_A[name].weight, self.lora_B[name].weight  # [r, in], [out, r]
        if result.dtype != x.dtype:  # a base layer computing in another dtype: peft's sum, then its dtype
            return (result + F.linear(F.linear(x, down), up) * self.scaling[name]).to(result.dtype)
        fused = torch.addmm(result.reshape(-1, up.shape[0]), F.linear(x, down).reshape(-1, down.shape[0]), up.t(),
                            alpha=self.scaling[name])
        return fused.view(result.shape)


def apply(model: torch.nn.Module) -> int:
    """Every peft LoRA ``Linear`` in ``model`` takes the fused forward (in place); returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            n += 1
    return n
