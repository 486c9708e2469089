"""The inference engine: one loaded model (MODEL_DIR [+ adapter]) answering prompts about images, for eval,
generate, export's self-check, held-out samples in training and the demo. Batched, left-padded, KV-cached
generation with the adapter on or off (``answer``, ``answer_each``: the vision tower runs once for both), and the
demo's streamed, one-at-a-time generation (``SideBySideEngine``)."""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..chat import prompts
from ..config import field
from ..model.adapters import adapter_switch
from ..model.load import generation_cache
from ..model.parts import llava_of


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


@contextlib.contextmanager
def vision_once(model) -> Iterator[None]:
    """Within this context the vision tower runs once per ``pixel_values`` tensor: a second call with the same
    tensor (the fine-tuned answer after the base one, for the same images) reuses the first call's output.

    The tower is frozen and carries no LoRA, so base and fine-tuned see the same features; only the projector
    after it differs (it is trained), and it still runs for each. The cache holds one batch and ends with the
    context. Contexts nest: an inner one wraps the outer's forward and puts it back when it ends.
    """
    tower = llava_of(model).model.vision_tower
    outer = tower.__dict__.get("forward")  # an enclosing context's patch, if any
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
        if outer is None:
            del tower.forward  # back to the class's forward
        else:
            tower.forward = outer
        cache.clear()


def prepare_inputs(model, processor, prompts: list[str], images: list[Image.Image | None]):
    """Left-padded model inputs for templated prompts and their images (None: text-only), on the model's
    device, pixels in the model's dtype: the one way eval, generate and the demo feed the model."""
    processor.tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    # an entry is an image, a list of images (one per <image> of its prompt, in order), or None
    with_images = [im for entry in images if entry is not None
                   for im in (entry if isinstance(entry, (list, tuple)) else [entry])]
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
        out = model.generate(**inputs, **settings.generate_kwargs(), pad_token_id=tokenizer.pad_token_id,
                             **generation_cache(model))
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


@torch.inference_mode()
def answer_with_logits(model, processor, prompts: list[str], images: list[Image.Image | None],
                       settings: GenerationSettings) -> tuple[list[str], torch.Tensor]:
    """Greedy answers as ``answer`` gives them, with the first generated step's logits [N, V] in float32 (the
    prompt's forward, no extra one): what export's self-check compares before and after the merge."""
    inputs = prepare_inputs(model, processor, prompts, images)
    tokenizer = processor.tokenizer
    out = model.generate(**inputs, **settings.generate_kwargs(), pad_token_id=tokenizer.pad_token_id,
                         output_logits=True, return_dict_in_generate=True, **generation_cache(model))
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)], out.logits[0].float()


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


# ---------------------------------------------------------------------------------------------------------
# Streaming, serialised generation with the adapter on or off (the demo)
# ---------------------------------------------------------------------------------------------------------

class _StopOn:
    """A stopping criterion that ends generation when ``event`` is set (the request went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class SideBySideEngine:
    """One loaded model answering with its adapter on (fine-tuned) or off (base), streamed, one generation at a
    time: what the demo page shows. Prompts come from ``prompts.generation_prompt``, as in eval and generate."""

    def __init__(self, model, processor, has_adapter: bool):
        self.model = model
        self.processor = processor
        self.has_adapter = has_adapter
        # The adapter switch is model-wide: a second generate must not run while the first has it toggled.
        self.lock = threading.Lock()

    def prompt(self, msgs: list[dict]) -> str:
        return prompts.generation_prompt(self.processor.tokenizer, msgs)

    def _inputs(self, prompt: str, image: Image.Image | None):
        return prepare_inputs(self.model, self.processor, [prompt], [image])

    def stream(self, prompt: str, image: Image.Image | None, settings: GenerationSettings,
               adapter: bool, inputs=None) -> Iterator[str]:
        """The answer so far, after each new piece of text (``inputs``: already prepared for this prompt)."""
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        tokenizer = self.processor.tokenizer
        inputs = self._inputs(prompt, image) if inputs is None else inputs
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            # The lock and the adapter switch live in the generating thread: the adapter is off exactly
            # while this generate runs, whatever happens to the request that started it.
            try:
                with self.lock, torch.inference_mode(), adapter_switch(self.model, adapter):
                    self.model.generate(**inputs, **settings.generate_kwargs(), streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([_StopOn(stop)]),
                                        pad_token_id=tokenizer.pad_token_id,
                                        **generation_cache(self.model))
            except BaseException as e:  # handed to the request thread, which shows it
                failure.append(e)
                streamer.end()

        thread = threading.Thread(target=run, name="llava-lora-generate", daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                if piece:
                    text += piece
                    yield text.strip()
        finally:
            stop.set()  # a closed page stops its generation at the next token
            thread.join()
        if failure:
            raise failure[0]

    def compare(self, prompt: str, image: Image.Image | None,
                settings: GenerationSettings) -> Iterator[tuple[str, str, str]]:
        """(base answer, fine-tuned answer, status) as both stream in, base first."""
        t0 = time.perf_counter()
        base = tuned = ""
        yield base, tuned, "Generating the base answer…"
        # One preprocessing and one pass of the frozen vision tower serve both answers. Holding the tower's cache
        # across the two generations is safe: both generating events share one concurrency group of size 1.
        inputs = self._inputs(prompt, image)
        with vision_once(self.model):
            for base in self.stream(prompt, image, settings, adapter=False, inputs=inputs):
                yield base, tuned, "Generating the base answer…"
            if self.has_adapter:
                yield base, tuned, "Generating the fine-tuned answer…"
                for tuned in self.stream(prompt, image, settings, adapter=True, inputs=inputs):
                    yield base, tuned, "Generating the fine-tuned answer…"
        yield base, tuned, f"Done in {time.perf_counter() - t0:.1f} s."
