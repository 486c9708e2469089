"""The training loss of a composed LLaVA: one module that ``train``, the held-out loss during training and
``eval``'s loss all run, so the number means the same everywhere.

    LlavaLoss(peft_model)(**batch) -> (summed token cross-entropy, supervised tokens)
    loss_sums(loss_module, dataset, indices, ...)   summed over records (held-out loss; DDP reduces the sums)
    model_loss(model, processor, records, ...)      the mean per token of a loaded model (eval), adapter on or off
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..chat.batches import Collator, TrainDataset
from ..chat.encode import DEFAULT_MAX_LENGTH, IGNORE_INDEX, image_tokens_per_image
from ..data.records import Record
from ..errors import Rejected
from .adapters import adapter_switch
from .parts import llava_of


class LlavaLoss(torch.nn.Module):
    """``forward(batch) -> (summed token cross-entropy, supervised token count)`` of a peft-wrapped LLaVA.

    The same computation as ``LlavaForConditionalGeneration(labels=...)``, rearranged: the frozen vision
    tower runs under ``no_grad`` (with autograd where LoRA was put in it), and the lm_head and the loss see only the
    positions whose next token is supervised (with ``fused_loss``, Liger's kernel computes them chunk by chunk, never all the logits at once).
    One module, so DDP/FSDP wrap the whole step. With ``vision_every_step`` (several processes), a batch without
    an image still runs the tower and projector, on one blank image whose features are added times zero: under
    FSDP2 / ZeRO-3 every process must gather the same shards in the same order, or the others wait forever
    (LLaMA-Factory and ms-swift do the same); the loss and gradients are unchanged.
    """

    def __init__(self, peft_model, fused_loss: bool = False, vision_every_step: bool = False):
        super().__init__()
        self.peft_model, self.vision_every_step = peft_model, vision_every_step
        llava = llava_of(peft_model)
        layer = llava.config.vision_feature_layer
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self.drop_cls = llava.config.vision_feature_select_strategy == "default"
        # the tower runs without autograd unless something in it trains (LoRA asked for as vision_tower.NAME)
        self.tower_trains = any(p.requires_grad for p in llava.model.vision_tower.parameters())
        # FSDP's shard groups (accelerate's transformer-based wrap reads them): one per LM decoder layer and per
        # tower encoder layer, whatever the family
        tower = llava.model.vision_tower
        tower_layers = getattr(getattr(tower, "vision_model", tower), "encoder").layers
        self._no_split_modules = sorted({type(llava.model.language_model.layers[0]).__name__,
                                         type(tower_layers[0]).__name__})
        self.fused = None
        if fused_loss:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self.fused = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def forward(self, input_ids, attention_mask, labels, pixel_values=None):
        llava = llava_of(self.peft_model)
        embeds = llava.model.get_input_embeddings()(input_ids)  # [B, T, D]
        if pixel_values is not None:
            feats = self._image_features(llava, pixel_values)  # [N, P, D]
            image_mask = (input_ids == llava.config.image_token_id).unsqueeze(-1)  # [B, T, 1]
            embeds = embeds.masked_scatter(image_mask, feats.to(embeds.dtype))
        elif self.vision_every_step:
            size = llava.config.vision_config.image_size
            blank = self._image_features(llava, embeds.new_zeros(1, 3, size, size)).sum() * 0.0
            # into the embeddings, where real images enter: the backward then reaches the projector's and tower's
            # shards in the same order on every process (FSDP reduces them in that order)
            embeds = embeds + blank.to(embeds.dtype)
        hidden = llava.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                            use_cache=False).last_hidden_state  # [B, T, D]
        targets = labels[:, 1:]  # position t predicts token t + 1
        supervised = targets != IGNORE_INDEX  # [B, T-1]
        hidden = hidden[:, :-1][supervised]  # [N_sup, D]
        if self.fused is not None:
            loss = self.fused(llava.lm_head.weight, hidden, targets[supervised], llava.lm_head.bias)
            loss = loss[0] if isinstance(loss, tuple) else loss
        else:
            logits = llava.lm_head(hidden).float()  # [N_sup, V]
            loss = F.cross_entropy(logits, targets[supervised], reduction="sum")
        return loss, supervised.sum()

    def _image_features(self, llava, pixel_values):
        """The projected features of ``pixel_values`` [N, 3, H, W]: LlavaModel.get_image_features' selection
        (layers concatenated, CLS dropped), the tower without autograd unless something in it trains."""
        tower = llava.model.vision_tower
        with torch.set_grad_enabled(self.tower_trains and torch.is_grad_enabled()):
            hidden = tower(pixel_values.to(tower.dtype), output_hidden_states=True).hidden_states
            feats = torch.cat([hidden[k][:, 1:] if self.drop_cls else hidden[k] for k in self.feature_layers],
                              dim=-1)  # [N, P, Dv * layers]
        return llava.model.multi_modal_projector(feats)  # [N, P, D]


@torch.no_grad()
def loss_sums(loss_module, dataset: TrainDataset, indices: list[int], batch_size: int, pad_token_id: int,
              device, autocast=None) -> tuple[float, int, list[Rejected]]:
    """(summed token cross-entropy, supervised tokens, skipped records) of ``dataset[indices]``."""
    collate = Collator(pad_token_id)
    total, tokens, skipped = 0.0, 0, []
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start:start + batch_size]])
        skipped += batch["skipped"]
        if batch["input_ids"] is None:
            continue
        inputs = {k: batch[k].to(device) if batch[k] is not None else None
                  for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
        with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
            loss, n = loss_module(**inputs)
        total += float(loss)
        tokens += int(n)
    return total, tokens, skipped


def model_loss(model, processor, records: list[Record], image_root: Path, batch_size: int,
               adapter: bool = True) -> tuple[float, int]:
    """(mean loss per supervised token, tokens) of a loaded model (peft or plain) on ``records``, as training
    computes it: what ``llava-lora eval`` reports beside its metrics."""
    dataset = TrainDataset(records, image_root, processor, model.config.image_token_id,
                           image_tokens_per_image(model.config), DEFAULT_MAX_LENGTH)
    module = LlavaLoss(model).eval()
    with adapter_switch(model, adapter):
        total, tokens, _ = loss_sums(module, dataset, list(range(len(dataset))), batch_size,
                                     processor.tokenizer.pad_token_id, model.device)
    return (total / tokens if tokens else float("nan")), tokens
