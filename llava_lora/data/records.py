"""LLaVA-format records: parsed once, compact in memory, images decoded lazily.

A record on disk: ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``
("role" is accepted for "from", "user"/"assistant" for the speakers, "content" for "value"). ``<image>``
stands at the start or the end of the first human turn.

    records, bad = load_records(resolve_data("data/cc3m")[0])   # bad: [Rejected(id, reason, detail), ...]
    duplicate_ids(records)                                        # {id: count} of ids used more than once

A bad record's reason is one of ``errors.RECORD_REASONS`` (``invalid_json``: a garbled JSONL line, named
"line N"); its image's, one of ``errors.IMAGE_REASONS`` (see ``images.py``).

Duplicate ids are reported (``data check``, train's data report) and the records still used: LLaVA mixtures
repeat ids across their sources, and each record is a sample in its own right.

"system" turns are reported as ``unknown_speaker``: a Record has no slot for a system prompt, and dropping
one silently would train on a different conversation than the data describes (LLaVA data has none).
"""

from __future__ import annotations

import gc
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadRecord, Rejected, UsageError
# Images live in images.py; these names stay importable from here.
from .images import MAX_IMAGE_PIXELS, check_image, open_image, resolve_image  # noqa: F401

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True, slots=True)
class Turn:
    role: str  # "user" | "assistant"
    text: str  # with the <image> placeholder removed (and the whitespace next to it)


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    image: str | None  # image path relative to the image root, as written in the data; None: text-only
    turns: tuple[Turn, ...]  # alternating, starting with "user", ending with "assistant"
    image_first: bool = True  # True: <image> stood before the first user text; False: after it


# ---------------------------------------------------------------------------------------------------------
# Where the data is
# ---------------------------------------------------------------------------------------------------------

DEFAULT_FILE = "chat.json"
IMAGE_DIR_NAMES = ("images_dl", "images")  # CC3M-595K unpacks into images_dl/; many sets use images/


def resolve_data(data: str | Path, split: str | None = None, image_dir: str | Path | None = None
                 ) -> tuple[Path, Path]:
    """(records file, image root) for DATA: a .json/.jsonl file, or a folder holding ``chat.json``.

    With a folder, ``split`` other than "train" picks ``{split}.json`` (or ``.jsonl``) in it. The image root is
    ``image_dir`` if given, else the data folder's ``images_dl/``, else ``images/``, else the folder itself.
    """
    p = Path(data)
    if p.is_dir():
        folder = p
        if split in (None, "", "train"):
            names = [DEFAULT_FILE, "chat.jsonl", "train.json", "train.jsonl"]
        else:
            names = [f"{split}.json", f"{split}.jsonl"]
        found = [folder / n for n in names if (folder / n).is_file()]
        if not found:
            raise UsageError(f"{folder}: no {' or '.join(names[:2])} in this folder")
        file = found[0]
    elif p.is_file():
        if split not in (None, "", "train"):
            raise UsageError(f"--split {split} needs DATA to be a folder holding {split}.json, got the file {p}")
        file, folder = p, p.parent
    else:
        raise UsageError(f"data not found: {p}")

    if image_dir is not None:
        root = Path(image_dir)
        if not root.is_dir():
            raise UsageError(f"image folder not found: {root}")
    else:
        root = next((folder / n for n in IMAGE_DIR_NAMES if (folder / n).is_dir()), folder)
    return file, root


# ---------------------------------------------------------------------------------------------------------
# Reading JSON / JSONL
# ---------------------------------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")


def _json_error(path: Path, e: json.JSONDecodeError, line: int | None = None) -> UsageError:
    # a JSONL line is decoded on its own: its column is the offset into that line
    where = f"line {line} column {e.pos + 1}" if line is not None else f"line {e.lineno} column {e.colno}"
    return UsageError(f"{path}: not valid JSON at {where}: {e.msg}")


def _is_array(path: Path) -> bool:
    """True for a JSON array file, False for JSON lines (decided by the first non-blank character)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if not head:
        raise UsageError(f"{path}: empty file, expected a JSON array of records or JSON lines")
    if head[:1] == b"[":
        return True
    if head[:1] == b"{":
        return False
    raise UsageError(f"{path}: expected a JSON array of records or one JSON object per line, "
                     f"found {head[:1].decode('latin-1')!r} at the start")


def _iter_array(path: Path) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one.

    Decoding element by element (instead of ``json.load``) lets the caller turn each into a compact Record
    and drop the dicts at once: a 595K-record chat.json never exists as one list of dicts in memory.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UsageError(f"{path}: not UTF-8 text at line {line} (byte offset {e.start})") from None
    del data  # the text alone is ~the file's size; the records parsed from it are smaller
    decoder = json.JSONDecoder()
    try:
        i = _WS.match(text).end() + 1  # past "["
        i = _WS.match(text, i).end()
        if text.startswith("]", i):
            i += 1
        else:
            while True:
                obj, i = decoder.raw_decode(text, i)
                yield obj
                i = _WS.match(text, i).end()
                if text.startswith(",", i):
                    i = _WS.match(text, i + 1).end()
                elif text.startswith("]", i):
                    i += 1
                    break
                else:
                    raise json.JSONDecodeError("Expecting ',' delimiter or ']'", text, i)
        i = _WS.match(text, i).end()
        if i != len(text):
            raise json.JSONDecodeError("Extra data after the array", text, i)
    except json.JSONDecodeError as e:
        raise _json_error(path, e) from None


@dataclass(frozen=True, slots=True)
class BadLine:
    """A JSONL line that is not JSON (or not UTF-8): one bad record, named by its line number."""

    line: int
    message: str


def _iter_lines(path: Path, lenient: bool = False) -> Iterator[Any]:
    """The objects of a JSONL file; a bad line raises UsageError, or with ``lenient`` comes as a BadLine."""
    with open(path, "rb") as f:  # bytes, so that a bad UTF-8 byte is reported on its own line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                err = UsageError(f"{path}: not UTF-8 text at line {n} (byte {e.start + 1} of the line)")
                if not lenient:
                    raise err from None
                yield BadLine(n, str(err))
                continue
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                err = _json_error(path, e, line=n)
                if n == 1 and path.suffix != ".jsonl":
                    err = UsageError(f"{err} (expected a JSON array of records, or one object per line)")
                if not lenient:
                    raise err from None
                yield BadLine(n, str(err))


def iter_raw(path: str | Path, lenient: bool = False) -> Iterator[Any]:
    """The raw records of a JSON array file or a JSONL file, one at a time; malformed JSON -> UsageError.

    With ``lenient``, a JSONL line that does not parse comes as a ``BadLine`` and the other lines are read (a
    JSON array cannot be resynchronised after an error: it stays a UsageError).
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"data file not found: {p}")
    return _iter_array(p) if _is_array(p) else _iter_lines(p, lenient)


def read_raw(path: str | Path) -> list:
    """All raw records of a JSON array file or a JSONL file (see ``iter_raw``)."""
    return list(iter_raw(path))


# ---------------------------------------------------------------------------------------------------------
# One record
# ---------------------------------------------------------------------------------------------------------

_SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _show(value: Any, limit: int = 40) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def record_id(raw: Any, index: int) -> str:
    """The record's id as a string, or ``#index`` when it has none (for reports)."""
    if isinstance(raw, dict):
        rid = raw.get("id")
        if isinstance(rid, str) and rid:
            return rid
        if isinstance(rid, int) and not isinstance(rid, bool):
            return str(rid)
    return f"#{index}"


def _image_field(raw: dict) -> str | None:
    image = raw.get("image")
    if image is None:
        return None
    if isinstance(image, list):
        if len(image) > 1:
            raise BadRecord("multiple_images", f"{len(image)} images; one per record is supported")
        if not image:
            raise BadRecord("bad_image_field", "empty list")
        image = image[0]
    if not isinstance(image, str) or not image.strip() or "\0" in image:
        raise BadRecord("bad_image_field", f"expected a path string, got {_show(image)}")
    return image


def _turns(raw: dict) -> list[tuple[str, str]]:
    """[(role, text)], checked: objects with a known speaker and string text, alternating user/assistant
    from user, ending with a non-empty assistant answer."""
    conv = raw.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadRecord("no_conversations", "missing" if conv is None else f"got {_show(conv)}")
    turns = []
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise BadRecord("bad_turn", f"turn {k} is {_show(turn)}, expected an object")
        speaker = turn.get("from")
        if speaker is None:
            speaker = turn.get("role")
        role = _SPEAKERS.get(speaker) or _SPEAKERS.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise BadRecord("unknown_speaker", f"turn {k}: {_show(speaker)}")
        text = turn.get("value")
        if text is None:
            text = turn.get("content")
        if not isinstance(text, str):
            raise BadRecord("non_string_text", f"turn {k}: {'missing' if text is None else _show(text)}")
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise BadRecord("turns_out_of_order", f"turn {k} is {role}, expected {'assistant' if k % 2 else 'user'}")
        if role == "assistant" and not text.strip():
            raise BadRecord("no_assistant_answer", f"turn {k} is empty")
        turns.append((role, text))
    if len(turns) % 2:
        detail = "no assistant turn" if len(turns) == 1 else f"the last user turn ({len(turns) - 1}) has no answer"
        raise BadRecord("no_assistant_answer", detail)
    return turns


def _strip_placeholder(turns: list[tuple[str, str]], has_image: bool) -> tuple[str, bool]:
    """(first user text without <image>, image_first); checks the placeholder count and place."""
    first = turns[0][1]
    if not has_image:
        total = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
        if total:
            raise BadRecord("image_token_mismatch", f"{total} <image> in a record without an image")
        return first, True
    if first.count(IMAGE_PLACEHOLDER) != 1 or any(IMAGE_PLACEHOLDER in text for _, text in turns[1:]):
        counts = [text.count(IMAGE_PLACEHOLDER) for _, text in turns]
        total = sum(counts)
        where = "" if total != 1 else f" (in turn {counts.index(1)}, expected the first user turn)"
        raise BadRecord("image_token_mismatch", f"{total} <image> for 1 image{where}")
    stripped = first.lstrip()
    if stripped.startswith(IMAGE_PLACEHOLDER):
        return stripped[len(IMAGE_PLACEHOLDER):].lstrip(), True
    stripped = first.rstrip()
    if stripped.endswith(IMAGE_PLACEHOLDER):
        return stripped[: -len(IMAGE_PLACEHOLDER)].rstrip(), False
    raise BadRecord("image_token_mismatch", "<image> in the middle of the first user turn; expected start or end")


def parse_record(raw: Any, index: int, _turn_cache: dict | None = None) -> Record:
    """One raw record -> Record, or ``BadRecord(reason, detail)`` (a reason of ``errors.RECORD_REASONS``).

    ``_turn_cache`` shares equal user Turns between records: CC3M asks the same ~11 questions 595K times.
    """
    if not isinstance(raw, dict):
        raise BadRecord("not_an_object", f"got {_show(raw)}")
    rid = record_id(raw, index)
    if rid[0] == "#":
        raise BadRecord("missing_id", "no id" if raw.get("id") is None else f"id is {_show(raw.get('id'))}")
    image = _image_field(raw)
    turns = _turns(raw)
    first_text, image_first = _strip_placeholder(turns, image is not None)
    out = []
    for k, (role, text) in enumerate(turns):
        if k == 0:
            text = first_text
        if _turn_cache is not None and role == "user":
            turn = _turn_cache.get(text)
            if turn is None:
                turn = _turn_cache[text] = Turn(role, text)
            out.append(turn)
        else:
            out.append(Turn(role, text))
    return Record(rid, image, tuple(out), image_first)


def load_records(path: str | Path) -> tuple[list[Record], list[Rejected]]:
    """(good records, a ``Rejected`` for each bad one) of a JSON or JSONL file.

    A garbled JSONL line is the bad record ``line N`` (reason ``invalid_json``); a file in which no line parses
    is not JSONL at all: UsageError.
    """
    good: list[Record] = []
    bad: list[Rejected] = []
    cache: dict[str, Turn] = {}
    first_bad_line: BadLine | None = None
    parsed = 0
    # No cycles are made here; without the collector re-scanning the growing list, 595K records load ~10% faster.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for index, raw in enumerate(iter_raw(path, lenient=True)):
            if isinstance(raw, BadLine):
                first_bad_line = first_bad_line or raw
                bad.append(Rejected(f"line {raw.line}", "invalid_json", raw.message))
                continue
            parsed += 1
            try:
                good.append(parse_record(raw, index, cache))
            except BadRecord as e:
                bad.append(e.rejected(record_id(raw, index)))
    finally:
        if was_enabled:
            gc.enable()
    if first_bad_line is not None and not parsed:
        raise UsageError(first_bad_line.message)
    return good, bad


def duplicate_ids(records: list[Record]) -> dict[str, int]:
    """{id: number of records} for each id that more than one record carries, most repeated first."""
    return {rid: n for rid, n in Counter(r.id for r in records).most_common() if n > 1}
