"""An uncompressed tar's index of member offsets, read fast and cached: what ``shards.py`` opens a shard with.

    for name, offset, size, data in members(path, read=lambda name: name.endswith(".txt")): ...
    index = cached(path, lambda: build(path))    # build's JSON value, kept per (path, size, mtime)

``members`` reads the 512-byte headers itself (a seek and a read each; name, size, type, ustar prefix, checksum,
pax ``path``/``size`` records, GNU long names): 2-3x less CPU than ``tarfile``, which parses every field of every
header. Either walk reads the whole shard from disk (its headers lie between the images); the cache reads none. A header it does not read (a global pax header, GNU sparse files, base-256 numbers, a bad checksum,
a truncated shard) hands the whole shard to ``tarfile``, so the result is always tarfile's.

``cached`` keeps a shard's index in ``$LLAVA_LORA_CACHE`` (default ``$XDG_CACHE_HOME/llava-lora``, else
``~/.cache/llava-lora``; ``off`` disables it), never beside the shards (the data folder may be read-only or
shared). An entry is used only while the shard's resolved path, size and mtime are those it was built from; one
that cannot be written (a read-only home) is skipped, the index built each time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

BLOCK = 512
ZEROS = bytes(BLOCK)
CACHE_VERSION = 1  # bump when what ``cached`` stores changes meaning
_PAX_KEYS = (b"path", b"size")  # what an extended header may change that the index uses


class _Unusual(Exception):
    """A header the fast walk leaves to tarfile."""


def members(path: Path, read: Callable[[str], bool]) -> list[tuple[str, int, int, bytes | None]]:
    """(name, offset of its bytes, size, its bytes where ``read(name)``, else None) of each regular member, in
    order; tarfile's errors (``tarfile.TarError``, ``OSError``) for a file that is no tar."""
    try:
        return _walk(path, read)
    except _Unusual:
        return tarfile_members(path, read)


def tarfile_members(path: Path, read: Callable[[str], bool]) -> list[tuple[str, int, int, bytes | None]]:
    """``members`` through ``tarfile``: the reference the fast walk agrees with."""
    out = []
    with tarfile.open(path, "r:") as tar:  # uncompressed: the bytes lie at fixed offsets, read in place
        for m in tar:
            if m.isfile():
                out.append((m.name, m.offset_data, m.size, tar.extractfile(m).read() if read(m.name) else None))
    return out


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 (members over 8 GiB)
        raise _Unusual
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _Unusual from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[bytes, bytes]:
    """The ``path``/``size`` records of a pax extended header (``"%d %s=%s\\n"`` each)."""
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise _Unusual from None
        if space < 0 or length <= space - pos:
            raise _Unusual
        key, eq, value = data[space + 1:pos + length - 1].partition(b"=")
        if not eq or data[pos + length - 1:pos + length] != b"\n" or key == b"hdrcharset" \
                or key.startswith(b"GNU.sparse") or (key in _PAX_KEYS and not value):
            raise _Unusual
        if key in _PAX_KEYS:
            out[key] = value
        pos += length
    return out


def _name(header: bytes, long_name: str | None, pax: dict[bytes, bytes]) -> str:
    """A member's name as tarfile makes it: the ustar prefix joined, replaced by a GNU long name or pax path."""
    name, prefix = _text(header[:100]), _text(header[345:500])
    if prefix:
        name = f"{prefix}/{name}"
    if long_name is not None:
        name = long_name
    if b"path" in pax:
        name = pax[b"path"].decode("utf-8", "surrogateescape").rstrip("/")
    return name


def _walk(path: Path, read: Callable[[str], bool]) -> list[tuple[str, int, int, bytes | None]]:
    out = []
    long_name, pax = None, {}  # from a GNU long-name or a pax header, for the member after it
    with open(path, "rb") as f:
        offset = 0
        while True:
            f.seek(offset)
            header = f.read(BLOCK)
            if not header and offset:  # the end, with no zero blocks after the last member
                break
            if header == ZEROS and (long_name, pax) == (None, {}):
                break
            if len(header) < BLOCK or _number(header[148:156]) != sum(header) - sum(header[148:156]) + 8 * 32:
                raise _Unusual  # truncated or corrupt: tarfile says what it makes of it
            kind, size = header[156:157], _number(header[124:136])
            data_at = offset + BLOCK
            if kind in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                if long_name is not None or pax:
                    raise _Unusual  # extended headers stacked
                data, offset = f.read(size), data_at + -(-size // BLOCK) * BLOCK
                if kind == tarfile.GNUTYPE_LONGNAME:
                    long_name = _text(data)
                elif kind != tarfile.GNUTYPE_LONGLINK:
                    pax = _pax(data)
                continue
            if kind in (tarfile.XGLTYPE, tarfile.GNUTYPE_SPARSE):
                raise _Unusual
            if kind == tarfile.AREGTYPE and header[:100].split(b"\0", 1)[0].endswith(b"/"):
                kind = tarfile.DIRTYPE  # old tars' folders
            name = _name(header, long_name, pax)
            if b"size" in pax:
                if not pax[b"size"].isdigit():
                    raise _Unusual
                size = int(pax[b"size"])  # decimal, unlike the header's octal
            # as tarfile: the data of a link or a folder (its size field aside) is not skipped
            offset = data_at + (-(-size // BLOCK) * BLOCK if kind in tarfile.REGULAR_TYPES
                                or kind not in tarfile.SUPPORTED_TYPES else 0)
            long_name, pax = None, {}
            if kind in tarfile.REGULAR_TYPES:
                out.append((name, data_at, size, f.read(size) if read(name) else None))
    return out


# ---------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------

def cache_dir() -> Path | None:
    """Where shard indexes are kept: ``$LLAVA_LORA_CACHE`` (``off`` or empty: nowhere), else the user's cache."""
    env = os.environ.get("LLAVA_LORA_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-lora"


def _stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"version": CACHE_VERSION, "path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached(path: Path, build: Callable[[], Any]) -> Any:
    """``build()`` (a JSON value) for the shard ``path``, from the cache while the shard is unchanged."""
    folder = cache_dir()
    try:
        stamp = _stamp(path)
    except OSError:
        folder = None  # build() says what is wrong with the shard
    if folder is None:
        return build()
    entry = folder / "shard-index" / f"{hashlib.sha256(stamp['path'].encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(entry.read_text())
        if saved.get("stamp") == stamp:
            return saved["index"]
    except (OSError, ValueError, AttributeError, KeyError):
        pass  # none yet, or unreadable: build it
    index = build()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        part = entry.with_name(f"{entry.name}.{os.getpid()}.part")  # ranks opening the same shard each write theirs
        part.write_text(json.dumps({"stamp": stamp, "index": index}, ensure_ascii=False))
        os.replace(part, entry)
    except OSError:
        pass  # a read-only cache: the index is built again next time
    return index
