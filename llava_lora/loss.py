"""The training loss of a composed LLaVA: one module that ``train``, the held-out loss during training and
``eval``'s loss all run, so the number means the same everywhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .modeling import llava_of
from .prompts import IGNORE_INDEX



class LlavaLoss(torch.nn.Module):
    """``forward(batch) -> (summed token cross-entropy, supervised token count)`` of a peft-wrapped LLaVA.

    The same computation as ``LlavaForConditionalGeneration(labels=...)``, rearranged: the frozen vision
    tower runs under ``no_grad`` (with autograd where LoRA was put in it), and the lm_head and the loss see only the positions whose next token is
    supervised (with ``fused_loss``, Liger's kernel computes them chunk by chunk, never all the logits at once).
    One module, so DDP/FSDP wrap the whole step.
    """

    def __init__(self, peft_model, fused_loss: bool = False):
        super().__init__()
        self.peft_model = peft_model
        llava = llava_of(peft_model)
        layer = llava.config.vision_feature_layer
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self.drop_cls = llava.config.vision_feature_select_strategy == "default"
        # the tower runs without autograd unless something in it trains (LoRA asked for as vision_tower.NAME)
        self.tower_trains = any(p.requires_grad for p in llava.model.vision_tower.parameters())
        self.fused = None
        if fused_loss:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self.fused = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def forward(self, input_ids, attention_mask, labels, pixel_values=None):
        llava = llava_of(self.peft_model)
        embeds = llava.model.get_input_embeddings()(input_ids)  # [B, T, D]
        if pixel_values is not None:
            tower = llava.model.vision_tower
            with torch.set_grad_enabled(self.tower_trains and torch.is_grad_enabled()):
                # LlavaModel.get_image_features' selection: layers concatenated, CLS dropped
                hidden = tower(pixel_values.to(tower.dtype), output_hidden_states=True).hidden_states
                feats = torch.cat([hidden[k][:, 1:] if self.drop_cls else hidden[k] for k in self.feature_layers],
                                  dim=-1)  # [N, P, Dv * layers]
            feats = llava.model.multi_modal_projector(feats)  # [N, P, D]
            image_mask = (input_ids == llava.config.image_token_id).unsqueeze(-1)  # [B, T, 1]
            embeds = embeds.masked_scatter(image_mask, feats.to(embeds.dtype))
        hidden = llava.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                            use_cache=False).last_hidden_state  # [B, T, D]
        targets = labels[:, 1:]  # position t predicts token t + 1
        supervised = targets != IGNORE_INDEX  # [B, T-1]
        hidden = hidden[:, :-1][supervised]  # [N_sup, D]
        if self.fused is not None:
            loss = self.fused(llava.lm_head.weight, hidden, targets[supervised], llava.lm_head.bias)
            return (loss[0] if isinstance(loss, tuple) else loss), supervised.sum()
        logits = llava.lm_head(hidden).float()  # [N_sup, V]
        return F.cross_entropy(logits, targets[supervised], reduction="sum"), supervised.sum()
