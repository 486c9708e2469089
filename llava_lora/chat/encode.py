"""A record as token ids and labels, and an image as pixels: what training and the loss of eval read.

Training tokenises the whole conversation (``prompts.messages``) with one ``<image>`` placeholder per image and the
chat template's assistant mask, then widens each placeholder to the tower's feature count; labels are the ids where the
mask is on, ``IGNORE_INDEX`` elsewhere. Generation renders the same messages up to the answer
(``prompts.generation_prompt``) and lets the processor widen the placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.records import BadRecord, Record
from .prompts import messages

IGNORE_INDEX = -100


DEFAULT_MAX_LENGTH = 2048  # train's --max-length default; data check's too_long limit by default


@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # [T] int64, each image placeholder widened to the tower's feature count
    labels: np.ndarray  # [T] int64, IGNORE_INDEX outside assistant answers (each answer's end-of-turn kept)


def encode(tokenizer, record: Record, image_token_id: int, image_tokens: int, max_length: int | None) -> Encoded:
    """Token ids and labels of a whole conversation.

    Raises ``BadRecord`` with ``empty_supervision`` when no answer token survives, ``too_long`` when the
    record cannot fit ``max_length`` without cutting its image tokens or every answer, and ``encode_failed`` when
    the chat template itself refuses the conversation (Gemma's refuses a system turn).
    """
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template(messages(record), tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
    except TemplateError as e:  # the template's own raise_exception(): this record's reason, not the run's end
        raise BadRecord("encode_failed", f"the chat template refused it: {e}") from None
    ids = np.asarray(out["input_ids"], dtype=np.int64)
    mask = np.asarray(out["assistant_masks"], dtype=bool)
    image_at = np.flatnonzero(ids == image_token_id)
    if len(image_at) != len(record.images):
        raise BadRecord("image_token_mismatch", f"{len(image_at)} image placeholders after templating for "
                        f"{len(record.images)} images")
    if len(image_at):  # every placeholder widened to the tower's feature count
        repeat = np.ones(len(ids), dtype=np.int64)
        repeat[image_at] = image_tokens
        ids, mask = np.repeat(ids, repeat), np.repeat(mask, repeat)
    if not mask.any():
        raise BadRecord("empty_supervision", "no assistant token is supervised after tokenisation")
    if max_length is not None and len(ids) > max_length:
        # the last image's end, in the widened ids: each earlier placeholder added image_tokens - 1
        image_end = image_at[-1] + len(image_at) * (image_tokens - 1) + 1 if len(image_at) else 0
        if image_end > max_length or not mask[:max_length].any():
            raise BadRecord("too_long", f"{len(ids)} tokens; max_length {max_length} would cut "
                            + ("the image tokens" if image_end > max_length else "every answer"))
        ids, mask = ids[:max_length], mask[:max_length]
    labels = np.where(mask, ids, IGNORE_INDEX)
    return Encoded(ids, labels)


def image_tokens_per_image(model_config) -> int:
    return int(model_config.image_seq_length)


def model_context_length(model_dir: str) -> int | None:
    """The language model's context length (``max_position_embeddings``), if its config states one."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model_dir).get_text_config(), "max_position_embeddings", None)


def record_length_fn(model_dir: str):
    """``record -> token count`` (image tokens included) for ``data check --model``."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n = image_tokens_per_image(config)

    def length(record: Record) -> int:
        return len(encode(tokenizer, record, config.image_token_id, n, None).input_ids)

    return length


def preprocess_image(image_processor, image) -> tuple[Any, str | None]:
    """(pixels [1, 3, H, W], None) of a decoded ``image``, or (None, why: "Type: message") where the image processor
    refuses it (its own limits, not a decoding error). The one such check: training skips the record
    (``preprocess_failed``), eval the sample, generate and the demo refuse the image."""
    try:
        out = image_processor(images=image, return_tensors="pt")
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    return out.get("pixel_values"), None
