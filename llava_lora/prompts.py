"""The one converter from a LLaVA record to model inputs, shared by training, evaluation and the demo, so a
sample is asked exactly as it was taught.

Training tokenises the whole conversation with a single ``<image>`` placeholder and the chat template's
assistant mask, then widens the placeholder to the tower's feature count; generation renders the same
messages up to the answer with the generation prompt and lets the processor widen it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data.records import BadRecord, Record, Turn

IGNORE_INDEX = -100
DEFAULT_MAX_LENGTH = 2048  # train's --max-length default; data check's too_long limit by default


def _content(text: str, image: bool, image_first: bool) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": text}] if text else []
    if image:
        parts.insert(0 if image_first else len(parts), {"type": "image"})
    return parts


def messages(record: Record, turns: tuple[Turn, ...] | None = None) -> list[dict]:
    """Chat messages of ``record`` (or of its first ``turns``); the image joins the first user turn."""
    out = []
    for i, turn in enumerate(record.turns if turns is None else turns):
        out.append({"role": turn.role,
                    "content": _content(turn.text, image=i == 0 and record.image is not None,
                                        image_first=record.image_first)})
    return out


def prompt_and_reference(record: Record) -> tuple[list[dict], str]:
    """Messages up to the last answer (the history included) and that answer, for evaluation."""
    return messages(record, record.turns[:-1]), record.turns[-1].text


def question(record: Record) -> str:
    """The last user turn's text, for display."""
    return record.turns[-2].text if len(record.turns) >= 2 else ""


@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # [T] int64, image placeholder widened to the tower's feature count
    labels: np.ndarray  # [T] int64, IGNORE_INDEX outside assistant answers (each answer's end-of-turn kept)


def encode(tokenizer, record: Record, image_token_id: int, image_tokens: int, max_length: int | None) -> Encoded:
    """Token ids and labels of a whole conversation.

    Raises ``BadRecord`` with ``empty_supervision`` when no answer token survives, and ``too_long`` when the
    record cannot fit ``max_length`` without cutting its image tokens or every answer.
    """
    out = tokenizer.apply_chat_template(messages(record), tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    ids = np.asarray(out["input_ids"], dtype=np.int64)
    mask = np.asarray(out["assistant_masks"], dtype=bool)
    image_at = np.flatnonzero(ids == image_token_id)
    if len(image_at) != (1 if record.image is not None else 0):
        raise BadRecord("image_token_mismatch", f"{len(image_at)} image placeholders after templating")
    if len(image_at):
        repeat = np.ones(len(ids), dtype=np.int64)
        repeat[image_at[0]] = image_tokens
        ids, mask = np.repeat(ids, repeat), np.repeat(mask, repeat)
    if not mask.any():
        raise BadRecord("empty_supervision", "no assistant token is supervised after tokenisation")
    if max_length is not None and len(ids) > max_length:
        image_end = image_at[0] + image_tokens if len(image_at) else 0
        if image_end > max_length or not mask[:max_length].any():
            raise BadRecord("too_long", f"{len(ids)} tokens; max_length {max_length} would cut "
                            + ("the image tokens" if image_end > max_length else "every answer"))
        ids, mask = ids[:max_length], mask[:max_length]
    labels = np.where(mask, ids, IGNORE_INDEX)
    return Encoded(ids, labels)


def generation_prompt(tokenizer, msgs: list[dict]) -> str:
    """The templated text that asks for the next assistant turn."""
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


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
