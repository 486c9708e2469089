"""A record as chat messages: the one rendering that training (``encode.encode``), evaluation, generate and
the demo all start from, so a sample is asked exactly as it was taught.

    messages(record)                        every turn, an image part where each <image> stands (training);
                                            the record's system prompt first, when it has one
    prompt_and_reference(record)            the turns up to the last answer, and that answer (eval, held-out)
    user_messages("What is it?", images=2)  one question typed by a user (generate, the demo)
    generation_prompt(tokenizer, msgs)      the templated text that asks for the next answer
"""

from __future__ import annotations

from ..data.records import IMAGE_PLACEHOLDER, Record, Turn, plain_text, text_pieces


def parts(text: str) -> list[dict]:
    """A turn's content parts: an image part where each ``<image>`` stands, the text between (its whitespace next
    to a placeholder left out), so ``<image>\\nQ`` is ``[image, text Q]`` and ``Q <image> R`` three parts."""
    out: list[dict] = []
    for k, piece in enumerate(text_pieces(text)):
        if k:
            out.append({"type": "image"})
        if piece:
            out.append({"type": "text", "text": piece})
    return out


def content(text: str, image: bool, image_first: bool = True) -> list[dict]:
    """The content parts of one text and at most one image, before (``image_first``) or after it."""
    return parts(f"{IMAGE_PLACEHOLDER}{text}" if image and image_first else f"{text}{IMAGE_PLACEHOLDER}" if image
                 else text)


def messages(record: Record, turns: tuple[Turn, ...] | None = None) -> list[dict]:
    """Chat messages of ``record`` (or of its first ``turns``), after its system prompt when it has one: the
    chat template then writes that one instead of its own default."""
    system = [] if record.system is None else [{"role": "system", "content": parts(record.system)}]
    return system + [{"role": t.role, "content": parts(t.text)} for t in (record.turns if turns is None else turns)]


def user_messages(question: str, images: int) -> list[dict]:
    """The messages of one question a user types about ``images`` images: each where an ``<image>`` stands in it,
    else all before the text (as LLaVA's data puts one). The caller checks that the counts agree."""
    if IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER * int(images) + question
    return [{"role": "user", "content": parts(question)}]


def prompt_and_reference(record: Record) -> tuple[list[dict], str]:
    """Messages up to the last answer (the history included) and that answer, for evaluation."""
    return messages(record, record.turns[:-1]), record.turns[-1].text


def question(record: Record) -> str:
    """The last user turn's text, for display."""
    return plain_text(record.turns[-2].text) if len(record.turns) >= 2 else ""


def generation_prompt(tokenizer, msgs: list[dict]) -> str:
    """The templated text that asks for the next assistant turn."""
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
