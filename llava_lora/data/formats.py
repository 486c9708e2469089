"""The record formats of the tools people come from, each read into the one internal record (``records.Record``).

Detected per record, from its keys (``detect``); ``data check`` prints the format and the mapping it used:

    llava     {"id"?, "image"|"images": PATH | [PATH, ...], "conversations": [{"from"|"role", "value"|"content"}]}
    sharegpt  {"messages": [{"role", "content": str}], "images": [PATH, ...]}      (LLaMA-Factory's sharegpt layout)
    parts     {"messages": [{"role", "content": [{"type": "image"}, {"type": "text", "text": ...}]}], "images"?}
              (TRL / OpenAI; LLaMA-Factory v1: {"type": "image_url", "value": PATH}, {"type": "text", "value": ...})

In every format the images stand where an ``<image>`` placeholder (or an image part) stands; the record keeps
those placeholders in its turns' text, one per image, in order. Images and placeholders that disagree in number
are ``image_count_mismatch``; a placeholder in an answer or in the system prompt, ``image_token_mismatch``.

A system prompt is a first turn whose speaker is ``system`` (or, as LLaMA-Factory's ``system`` column, a string
``"system"`` key): the record carries it apart from its turns, and the chat template renders it in place of its
own default. A system turn anywhere else, or a second one, is ``misplaced_system_turn``.

    images, system, turns = parse(raw)   # ((ref, ...), str | None, [(role, text with <image>)]), or BadRecord
"""

from __future__ import annotations

from typing import Any

from ..errors import BadRecord

IMAGE_PLACEHOLDER = "<image>"

MAPPINGS = {
    "llava": "conversations[from|role -> speaker, value|content -> text]; image|images -> images; "
             "<image> placeholders in the text",
    "sharegpt": "messages[role -> speaker, content -> text]; images -> images; <image> placeholders in the text",
    "parts": "messages[role -> speaker, content parts: text|value -> text, image / image_url -> an image where it "
             "stands (inline path, else the next of images)]",
    "caption": "a caption -> one of LLaVA's pretraining instructions (seeded by the key) and the caption as answer",
}

_SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_IMAGE_TYPES = ("image", "image_url")


def show(value: Any, limit: int = 40) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def detect(raw: dict) -> str:
    """The format of one raw record, from its keys; BadRecord ``no_conversations`` when none fits."""
    if "conversations" in raw:
        return "llava"
    msgs = raw.get("messages")
    if msgs is None:
        raise BadRecord("no_conversations", "neither 'conversations' nor 'messages'")
    if isinstance(msgs, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in msgs):
        return "parts"
    return "sharegpt"


def _image_list(raw: dict, embedded: bool = False) -> list[str]:
    """The paths of ``image`` or ``images``: a string, or a list of strings (empty: none). ``embedded``: a reader
    of tables or shards put references into its rows there (a NUL first, which no path in the data may hold)."""
    key = "images" if raw.get("images") is not None else "image"
    value = raw.get(key)
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, str) or not item.strip() or "\0" in (item[1:] if embedded else item):
            raise BadRecord("bad_image_field", f"{key}: expected a path string or a list of them, got {show(item)}")
    return list(items)


def _role(turn: Any, k: int, keys: tuple[str, ...]) -> str:
    if not isinstance(turn, dict):
        raise BadRecord("bad_turn", f"turn {k} is {show(turn)}, expected an object")
    speaker = first(turn, keys)
    role = (_SPEAKERS.get(speaker) or _SPEAKERS.get(speaker.lower())) if isinstance(speaker, str) else None
    if role is None:
        raise BadRecord("unknown_speaker", f"turn {k}: {show(speaker)}")
    return role


def _plain_turns(conv: Any, speaker_keys: tuple[str, ...], text_keys: tuple[str, ...]) -> list[tuple[str, str]]:
    if not isinstance(conv, list) or not conv:
        raise BadRecord("no_conversations", "missing" if conv is None else f"got {show(conv)}")
    out = []
    for k, turn in enumerate(conv):
        role = _role(turn, k, speaker_keys)
        text = first(turn, text_keys)
        if not isinstance(text, str):
            raise BadRecord("non_string_text", f"turn {k}: {'missing' if text is None else show(text)}")
        out.append((role, text))
    return out


def first(d: dict, keys: tuple[str, ...]) -> Any:
    """The first of ``keys`` that ``d`` holds and is not None (parquet rows carry every key, most None)."""
    return next((d[key] for key in keys if d.get(key) is not None), None)


def _part_image(part: dict, k: int) -> str | None:
    """The inline path of an image part, or None when it takes the next of the ``images`` column."""
    value = first(part, ("image_url", "value", "image", "path"))
    if isinstance(value, dict):  # OpenAI: {"type": "image_url", "image_url": {"url": ...}}
        value = first(value, ("url", "path"))
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise BadRecord("bad_image_field", f"turn {k}: image part {show(value)}")
    if value.startswith(("http://", "https://", "data:")):
        raise BadRecord("bad_image_field", f"turn {k}: {show(value)}: a URL; download the images first")
    return value


def _parts_turns(raw: dict, embedded: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """Content parts -> (images in order, turns with an <image> where each image part stood)."""
    column = _image_list(raw, embedded)
    conv = raw.get("messages")
    if not isinstance(conv, list) or not conv:
        raise BadRecord("no_conversations", "missing" if conv is None else f"got {show(conv)}")
    images, turns, taken = [], [], 0
    for k, turn in enumerate(conv):
        role = _role(turn, k, ("role",))
        content = turn.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise BadRecord("non_string_text", f"turn {k}: {show(content)}")
        texts = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _IMAGE_TYPES:
                ref = _part_image(part, k)
                if ref is None:
                    if taken >= len(column):
                        raise BadRecord("image_count_mismatch", f"more image parts than the {len(column)} images")
                    ref, taken = column[taken], taken + 1
                images.append(ref)
                texts.append(IMAGE_PLACEHOLDER)
            elif kind == "text" and isinstance(first(part, ("text", "value")), str):
                texts.append(first(part, ("text", "value")))
            else:
                raise BadRecord("bad_turn", f"turn {k}: part {show(part)}")
        turns.append((role, "\n".join(texts)))
    if taken != len(column):
        raise BadRecord("image_count_mismatch", f"{len(column)} images, {taken} image parts without a path")
    return images, turns


def check_turns(turns: list[tuple[str, str]], start: int = 0) -> None:
    """Alternating user/assistant from user, ending with a non-empty answer; no <image> in an answer. ``start``:
    the first turn's number in the data (1 after a system turn), for the reports."""
    if not turns:
        raise BadRecord("no_assistant_answer", "no user or assistant turn")
    for k, (role, text) in enumerate(turns):
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise BadRecord("turns_out_of_order", f"turn {k + start} is {role}, expected "
                            f"{'assistant' if k % 2 else 'user'}")
        if role == "assistant" and not text.strip():
            raise BadRecord("no_assistant_answer", f"turn {k + start} is empty")
        if role == "assistant" and IMAGE_PLACEHOLDER in text:
            raise BadRecord("image_token_mismatch", f"an <image> in the answer of turn {k + start}")
    if len(turns) % 2:
        detail = ("no assistant turn" if len(turns) == 1 else
                  f"the last user turn ({len(turns) - 1 + start}) has no answer")
        raise BadRecord("no_assistant_answer", detail)


def split_system(raw: dict, turns: list[tuple[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """(the system prompt or None, the other turns): a leading system turn, else the record's ``"system"``
    string; ``misplaced_system_turn`` for a system turn after the first, or beside a ``"system"`` field."""
    system, field = None, raw.get("system")
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    later = next((k + (system is not None) for k, (role, _) in enumerate(turns) if role == "system"), None)
    if later is not None:
        raise BadRecord("misplaced_system_turn", f"turn {later} is a system turn: only the first turn may be one"
                        + (" (and it is one already)" if system is not None else ""))
    if field is not None:
        if not isinstance(field, str):
            raise BadRecord("non_string_text", f"system: {show(field)}")
        if system is not None:
            raise BadRecord("misplaced_system_turn", "a system turn and a 'system' field: which one is meant?")
        system = field
    if system is not None and IMAGE_PLACEHOLDER in system:
        raise BadRecord("image_token_mismatch", "an <image> in the system prompt")
    return system, turns


def parse(raw: dict, fmt: str | None = None, embedded: bool = False
          ) -> tuple[tuple[str, ...], str | None, list[tuple[str, str]]]:
    """(image refs, system prompt or None, [(role, text)]) of one raw record in ``fmt`` (detected when None),
    checked."""
    fmt = fmt or detect(raw)
    if fmt == "parts":
        images, turns = _parts_turns(raw, embedded)
    elif fmt == "sharegpt":
        images, turns = _image_list(raw, embedded), _plain_turns(raw.get("messages"), ("role", "from"), ("content", "value"))
    else:
        images = _image_list(raw, embedded)
        turns = _plain_turns(raw.get("conversations"), ("from", "role"), ("value", "content"))
    system, rest = split_system(raw, turns)
    check_turns(rest, start=len(turns) - len(rest))
    turns = rest
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if placeholders != len(images):
        raise BadRecord("image_count_mismatch", f"{len(images)} image{'s' * (len(images) != 1)}, "
                        f"{placeholders} <image> placeholder{'s' * (placeholders != 1)}")
    return tuple(images), system, turns
