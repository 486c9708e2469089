"""Answer prompts about images with a loaded model: batched, left-padded, KV-cached generation."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .config import field


@dataclass
class GenerationSettings:
    max_new_tokens: int = field(64, help="most tokens to generate per answer")
    temperature: float = field(0.0, help="sampling temperature; 0 means greedy decoding")
    top_p: float = field(1.0, help="nucleus sampling: keep the smallest token set with this probability mass")
    top_k: int = field(0, help="sample among the k most likely tokens (0: no limit)")
    num_beams: int = field(1, help="beam search width (1: no beam search)")
    repetition_penalty: float = field(1.0, help="penalty > 1 discourages repeating tokens")

    def generate_kwargs(self) -> dict:
        sample = self.temperature > 0
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": sample, "num_beams": self.num_beams,
              "repetition_penalty": self.repetition_penalty}
        if sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:  # greedy: neutralise sampling defaults a checkpoint's generation_config may carry
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw


def settings_from(cfg) -> GenerationSettings:
    """The generation settings held by a stage config that has the same field names."""
    return GenerationSettings(**{k: getattr(cfg, k) for k in GenerationSettings.__dataclass_fields__})


def adapter_switch(model, enabled: bool):
    """Context in which a peft model answers with (``enabled``) or without its adapter."""
    if enabled or not hasattr(model, "disable_adapter"):
        return contextlib.nullcontext()
    return model.disable_adapter()


def _llava(model):
    """The LlavaForConditionalGeneration inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def vision_once(model) -> Iterator[None]:
    """Within this context the vision tower runs once per ``pixel_values`` tensor: a second call with the same
    tensor (the fine-tuned answer after the base one, for the same images) reuses the first call's output.

    The tower is frozen and carries no LoRA, so base and fine-tuned see the same features; only the projector
    after it differs (it is trained), and it still runs for each. The cache holds one batch and ends with the
    context.
    """
    tower = _llava(model).model.vision_tower
    run = tower.forward
    cache: dict[tuple, object] = {}

    def forward(pixel_values, *args, **kwargs):
        # keyed on the tensor object itself (and kept alive by the cache): a new batch is a new tensor
        key = (id(pixel_values), args, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in cache:
            cache.clear()
            cache[key] = (pixel_values, run(pixel_values, *args, **kwargs))
        return copy.copy(cache[key][1])  # callers set fields on the output (pooler_output): not on the cached one

    tower.forward = forward
    try:
        yield
    finally:
        del tower.forward  # back to the class's forward
        cache.clear()


def prepare_inputs(model, processor, prompts: list[str], images: list[Image.Image | None]):
    """Left-padded model inputs for templated prompts and their images (None: text-only), on the model's
    device, pixels in the model's dtype: the one way eval, generate and the demo feed the model."""
    processor.tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    with_images = [im for im in images if im is not None]
    inputs = processor(text=prompts, images=with_images or None, padding=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


@torch.inference_mode()
def generate(model, processor, inputs, settings: GenerationSettings, adapter: bool = True) -> list[str]:
    """One answer per row of prepared ``inputs`` (``prepare_inputs``), with the adapter on or off."""
    tokenizer = processor.tokenizer
    with adapter_switch(model, adapter):
        out = model.generate(**inputs, **settings.generate_kwargs(), pad_token_id=tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def answer(model, processor, prompts: list[str], images: list[Image.Image | None],
           settings: GenerationSettings, adapter: bool = True) -> list[str]:
    """One answer per (templated prompt, image or None), generated as one left-padded batch."""
    return generate(model, processor, prepare_inputs(model, processor, prompts, images), settings, adapter)


def answer_each(model, processor, prompts: list[str], images: list[Image.Image | None],
                settings: GenerationSettings, adapters: Sequence[bool]) -> list[list[str]]:
    """The answers with the adapter off and/or on (one list per entry of ``adapters``), from one set of inputs:
    the images are preprocessed once and the frozen vision tower runs once for all of them."""
    inputs = prepare_inputs(model, processor, prompts, images)
    with vision_once(model):
        return [generate(model, processor, inputs, settings, adapter=a) for a in adapters]
