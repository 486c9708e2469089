"""A LLaVA record as chat messages: the one rendering that training (``encode.encode``), evaluation, generate and
the demo all start from, so a sample is asked exactly as it was taught.

    messages(record)                        every turn, the image in the first user turn (training)
    prompt_and_reference(record)            the turns up to the last answer, and that answer (eval, held-out)
    user_messages("What is it?", image=True) one question typed by a user (generate, the demo)
    generation_prompt(tokenizer, msgs)      the templated text that asks for the next answer
"""

from __future__ import annotations

from ..data.records import Record, Turn


def content(text: str, image: bool, image_first: bool) -> list[dict]:
    """A message's content parts: the text, and the image before (``image_first``) or after it."""
    parts: list[dict] = [{"type": "text", "text": text}] if text else []
    if image:
        parts.insert(0 if image_first else len(parts), {"type": "image"})
    return parts


def messages(record: Record, turns: tuple[Turn, ...] | None = None) -> list[dict]:
    """Chat messages of ``record`` (or of its first ``turns``); the image joins the first user turn."""
    out = []
    for i, turn in enumerate(record.turns if turns is None else turns):
        out.append({"role": turn.role,
                    "content": content(turn.text, image=i == 0 and record.image is not None,
                                       image_first=record.image_first)})
    return out


def user_messages(question: str, image: bool) -> list[dict]:
    """The messages of one question a user types, about an image (first, as LLaVA's data puts it) or none."""
    return [{"role": "user", "content": content(question, image, True)}]


def prompt_and_reference(record: Record) -> tuple[list[dict], str]:
    """Messages up to the last answer (the history included) and that answer, for evaluation."""
    return messages(record, record.turns[:-1]), record.turns[-1].text


def question(record: Record) -> str:
    """The last user turn's text, for display."""
    return record.turns[-2].text if len(record.turns) >= 2 else ""


def generation_prompt(tokenizer, msgs: list[dict]) -> str:
    """The templated text that asks for the next assistant turn."""
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
