"""The key layout MODEL_DIR and MERGED_DIR are written in: llava-hf's, the one serving engines read.

    language_model.model.*   language_model.lm_head.*   vision_tower.vision_model.*   multi_modal_projector.*

transformers 5 writes the first, second and fourth of these itself, but writes a CLIP tower as flat
``vision_tower.embeddings.*`` / ``vision_tower.encoder.*``: vLLM rejects that ("There is no module or parameter
named 'vision_tower.embeddings'"), and llava-hf's checkpoints on the hub carry ``vision_model.``. transformers
reads both (its CLIPVisionModel drops the ``vision_model`` prefix on load), so folders written before this
layout still load everywhere they did.
"""

from __future__ import annotations

from pathlib import Path

VISION_TOWER = "model.vision_tower."  # in-memory prefix of the tower in LlavaForConditionalGeneration
VISION_MODEL = VISION_TOWER + "vision_model."


def llava_hf_state_dict(model) -> dict:
    """``model``'s state dict with the vision tower's keys under ``vision_model.`` (tensors shared, not copied);
    save_pretrained maps the ``model.*`` prefixes to llava-hf's names."""
    state = model.state_dict()
    return {(VISION_MODEL + k[len(VISION_TOWER):] if k.startswith(VISION_TOWER) and not k.startswith(VISION_MODEL)
             else k): v for k, v in state.items()}


def save_model(model, folder: str | Path) -> None:
    """Write a LlavaForConditionalGeneration's config and weights to ``folder`` in the llava-hf layout."""
    model.save_pretrained(folder, state_dict=llava_hf_state_dict(model))
