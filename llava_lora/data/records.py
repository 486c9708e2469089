"""Records: every data format read into one compact record (an id, image references, turns), images decoded lazily.

A LLaVA record on disk: ``{"id"?, "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``;
``formats.py`` reads it and the other tools' formats (ShareGPT ``messages`` + ``images``, content parts), each
detected from the record's keys; ``tables.py`` parquet and ``save_to_disk`` folders, ``shards.py`` webdataset tars.

    records, bad = load_records(resolve_data("data/cc3m")[0])   # bad: [Rejected(id, reason, detail), ...]
    loaded = load_data(file)                                      # .records, .bad, .formats {format: records}
    duplicate_ids(records)                                        # {id: count} of ids used more than once

Ids are optional: a record without one is named by its source and position (``mllm_demo.json#5``, 0-based), in
every report. A bad record's reason is one of ``errors.RECORD_REASONS`` (``invalid_json``: a garbled JSONL line,
named "line N"); its image's, one of ``errors.IMAGE_REASONS`` (see ``images.py``).

Duplicate ids are reported (``data check``, train's data report) and the records still used: LLaVA mixtures
repeat ids across their sources, and each record is a sample in its own right.

A leading "system" turn (or a ``"system"`` string field) is the record's ``system`` prompt, which the chat
template renders in place of its own default (``chat/prompts.py``); a system turn anywhere else is
``misplaced_system_turn``. Equal prompts are one string shared by every record that carries them.
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
from .formats import IMAGE_PLACEHOLDER, detect, parse, show
from .images import MAX_IMAGE_PIXELS, check_image, open_image, resolve_image  # noqa: F401



@dataclass(frozen=True, slots=True)
class Turn:
    role: str  # "user" | "assistant"
    text: str  # as written, with one "<image>" where each of the record's images stands (user turns only)


@dataclass(frozen=True, slots=True)
class Record:
    id: str  # the data's id, or the source and position (``chat.json#5``) of a record without one
    images: tuple[str, ...]  # image references in placeholder order (paths under the image root, members, rows)
    turns: tuple[Turn, ...]  # alternating, starting with "user", ending with "assistant"
    system: str | None = None  # the data's system prompt, None: the chat template's default

    @property
    def image(self) -> str | None:
        """The first image reference, or None for a text-only record."""
        return self.images[0] if self.images else None

    @property
    def image_first(self) -> bool:
        """True when the first user turn starts with its image (LLaVA's ``<image>\\nQ``)."""
        return self.turns[0].text.lstrip().startswith(IMAGE_PLACEHOLDER)


def text_pieces(text: str) -> list[str]:
    """A turn's text between its ``<image>`` placeholders, the whitespace next to each placeholder left out: what
    the chat template is given (``prompts.parts``), and what the sampler's length estimate counts."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    for k in range(1, len(pieces)):  # the whitespace around each placeholder
        pieces[k - 1], pieces[k] = pieces[k - 1].rstrip(), pieces[k].lstrip()
    return pieces


def plain_text(text: str) -> str:
    """A turn's text without its ``<image>`` placeholders (and the whitespace next to them), for display."""
    return " ".join(p for p in (x.strip() for x in text.split(IMAGE_PLACEHOLDER)) if p)


# ---------------------------------------------------------------------------------------------------------
# Where the data is
# ---------------------------------------------------------------------------------------------------------

DEFAULT_FILE = "chat.json"
# CC3M-595K unpacks into images_dl/ (or stays images.zip, read in place); many sets use images/
IMAGE_DIR_NAMES = ("images_dl", "images", "images.zip")
HUB_PREFIX = "hf://datasets/"
JSON_NAMES = (DEFAULT_FILE, "chat.jsonl", "train.json", "train.jsonl")


def data_kind(data: str | Path) -> str:
    """"json" (a .json/.jsonl file), "table" (parquet, ``save_to_disk``, ``hf://datasets/``) or "shards" (tars)."""
    s = str(data)
    p = Path(s)
    if s.startswith(HUB_PREFIX) or s.endswith(".parquet"):
        return "table"
    if s.endswith(".tar") or ("{" in s and ".tar" in s):
        return "shards"
    if p.is_dir() and not any((p / n).is_file() for n in JSON_NAMES):
        if any((p / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")) \
                or any(p.glob("*.parquet")) or any(p.glob("data/*.parquet")):
            return "table"
        if any(p.glob("*.tar")):
            return "shards"
    return "json"


def _table_or_shards(p: Path, split: str | None) -> Path | None:
    """A folder or a data path that ``tables.py`` or ``shards.py`` reads, else None."""
    if data_kind(p) == "json":
        return None
    if split not in (None, "", "train") and p.is_dir() and (p / split).is_dir():
        return p / split  # a DatasetDict's save_to_disk folder, or shards/{split}/
    return p


def resolve_data(data: str | Path, split: str | None = None, image_dir: str | Path | None = None
                 ) -> tuple[Path, Any]:
    """(records source, image root) for DATA: a .json/.jsonl file, a folder holding ``chat.json``, a parquet
    file or folder, a ``save_to_disk`` folder, ``hf://datasets/OWNER/NAME[@rev][:split]``, tar shards (a folder of
    ``*.tar`` or ``shards/{00000..00099}.tar``).

    With a folder, ``split`` other than "train" picks ``{split}.json`` (or ``.jsonl``) in it. The image root is
    ``image_dir`` if given (a folder or a ``.zip``), else the data folder's ``images_dl/``, else ``images/``, else
    ``images.zip``, else the folder itself; for tables and shards, a store of the images they carry, which reads
    images given by path under that root.
    """
    s = str(data)
    if s.startswith(HUB_PREFIX):
        from . import tables

        return s, tables.TableImages(s, _image_root(Path("."), image_dir))
    p = Path(data)
    inner = _table_or_shards(p, split)
    if inner is not None:
        from . import shards, tables

        folder = p if p.is_dir() else p.parent
        while "{" in folder.name:
            folder = folder.parent
        store = tables.TableImages if data_kind(inner) == "table" else shards.ShardImages
        return inner, store(str(inner), _image_root(folder, image_dir))
    if p.is_dir():
        folder = p
        if split in (None, "", "train"):
            names = list(JSON_NAMES)
        else:
            names = [f"{split}.json", f"{split}.jsonl"]
        found = [folder / n for n in names if (folder / n).is_file()]
        if not found:
            raise UsageError(f"{folder}: no {' or '.join(names[:2])} in this folder (nor parquet, a save_to_disk "
                             "folder or *.tar shards)")
        file = found[0]
    elif p.is_file():
        if split not in (None, "", "train"):
            raise UsageError(f"--split {split} needs DATA to be a folder holding {split}.json, got the file {p}")
        file, folder = p, p.parent
    else:
        raise UsageError(f"data not found: {p}")
    return file, _image_root(folder, image_dir)


def _image_root(folder: Path, image_dir: str | Path | None) -> Path:
    if image_dir is not None:
        root = Path(image_dir)
        if not (root.is_dir() or (root.suffix == ".zip" and root.is_file())):
            raise UsageError(f"image folder not found: {root}")
        return root
    return next((folder / n for n in IMAGE_DIR_NAMES if (folder / n).exists()), folder)


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

def record_id(raw: Any, index: int, source: str = "") -> str:
    """The record's id as a string, or ``source#index`` when it has none (for reports)."""
    if isinstance(raw, dict):
        rid = raw.get("id")
        if isinstance(rid, str) and rid:
            return rid
        if isinstance(rid, int) and not isinstance(rid, bool):
            return str(rid)
    return f"{source}#{index}"


def parse_record(raw: Any, index: int, _turn_cache: dict | None = None, source: str = "",
                 fmt: str | None = None, embedded: bool = False) -> Record:
    """One raw record (any format of ``formats.py``) -> Record, or ``BadRecord(reason, detail)`` (a reason of
    ``errors.RECORD_REASONS``). A record without an id is named ``source#index``; an id given but unusable (an
    empty string, a list) is ``missing_id``.

    ``_turn_cache`` shares equal user Turns, and equal system prompts, between records: CC3M asks the same ~11
    questions 595K times, and a set with a system prompt has one or a few.
    """
    if not isinstance(raw, dict):
        raise BadRecord("not_an_object", f"got {show(raw)}")
    rid = record_id(raw, index, source)
    if raw.get("id") is not None and rid == f"{source}#{index}":
        raise BadRecord("missing_id", f"id is {show(raw.get('id'))}")
    images, system, turns = parse(raw, fmt, embedded)
    if system is not None and _turn_cache is not None:
        system = _turn_cache.setdefault(("system", system), system)  # a tuple key: no user text collides
    out = []
    for role, text in turns:
        if _turn_cache is not None and role == "user":
            turn = _turn_cache.get(text)
            if turn is None:
                turn = _turn_cache[text] = Turn(role, text)
            out.append(turn)
        else:
            out.append(Turn(role, text))
    return Record(rid, images, tuple(out), system)


@dataclass
class Loaded:
    """What reading a data source gave: usable records, a ``Rejected`` for each bad one, records per format."""

    records: list[Record]
    bad: list[Rejected]
    formats: Counter


class RecordReader:
    """Turns raw records into Records one by one, counting formats; shared by JSON, tables and shards."""

    def __init__(self, source: str, embedded: bool = False):
        # embedded: the reader of a table or shards puts references into its rows in the records' images
        self.source, self.cache, self.embedded = source, {}, embedded
        self.loaded = Loaded([], [], Counter())

    def add(self, raw: Any, index: int, fmt: str | None = None) -> None:
        try:
            fmt = fmt or (detect(raw) if isinstance(raw, dict) else None)
            self.loaded.records.append(parse_record(raw, index, self.cache, self.source, fmt, self.embedded))
            self.loaded.formats[fmt] += 1
        except BadRecord as e:
            self.loaded.bad.append(e.rejected(record_id(raw, index, self.source)))


def load_data(path: str | Path) -> Loaded:
    """Every record of a data source: a JSON or JSONL file, a parquet file or folder, a ``save_to_disk`` folder,
    ``hf://datasets/...``, webdataset shards (see ``resolve_data``).

    A garbled JSONL line is the bad record ``line N`` (reason ``invalid_json``); a file in which no line parses
    is not JSONL at all: UsageError.
    """
    kind = data_kind(path)
    if kind != "json":
        from . import shards, tables  # pyarrow/datasets only when such data is read

        return (tables.load if kind == "table" else shards.load)(path, RecordReader)
    path = Path(path)
    reader = RecordReader(path.name)
    first_bad_line: BadLine | None = None
    parsed = 0
    # No cycles are made here; without the collector re-scanning the growing list, 595K records load ~10% faster.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for index, raw in enumerate(iter_raw(path, lenient=True)):
            if isinstance(raw, BadLine):
                first_bad_line = first_bad_line or raw
                reader.loaded.bad.append(Rejected(f"line {raw.line}", "invalid_json", raw.message))
                continue
            parsed += 1
            reader.add(raw, index)
    finally:
        if was_enabled:
            gc.enable()
    if first_bad_line is not None and not parsed:
        raise UsageError(first_bad_line.message)
    return reader.loaded


def load_records(path: str | Path) -> tuple[list[Record], list[Rejected]]:
    """(good records, a ``Rejected`` for each bad one) of a data source (``load_data``)."""
    loaded = load_data(path)
    return loaded.records, loaded.bad


def duplicate_ids(records: list[Record]) -> dict[str, int]:
    """{id: number of records} for each id that more than one record carries, most repeated first."""
    return {rid: n for rid, n in Counter(r.id for r in records).most_common() if n > 1}
