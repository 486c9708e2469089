"""webdataset / img2dataset tar shards, read in place: ``key.jpg`` + ``key.json`` / ``key.txt`` per sample.

    llava-lora data check shards/                       # a folder of *.tar
    llava-lora data check "shards/{00000..00099}.tar"   # a brace pattern (quoted, so the shell leaves it)

Opening walks each shard's tar headers once (``tarindex.py``: seeking past the data) and keeps, per sample, where
its image members' bytes lie (an index of offsets, cached per shard while the shard is unchanged): the sampler
draws records in any order, ``--resume`` stays exact, and an image is one seek and one read when it is decoded.
Only the small ``.json``/``.txt`` members are read at opening.

A sample whose ``.json`` carries a conversation (``conversations`` or ``messages``, any format of ``formats.py``)
is used as it is, its images the sample's image members (in the order of their extensions, ``0.jpg``,
``1.jpg``, ...). One that carries a caption only (``.txt``, or img2dataset's ``.json`` ``caption``) becomes a
caption conversation with one of LLaVA's own pretraining instructions, as LLaVA built the 595K set: chosen, and
the image put before or after it, by a hash of the sample's key (the same on every run). A sample is named
``00003.tar:key`` where it carries no id.
"""

from __future__ import annotations

import itertools
import json
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any

from ..errors import BadRecord, UsageError
from . import tarindex
from .images import as_store

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TEXTS = ("json", "txt")  # the members read at opening: a conversation or a caption
EMBEDDED = "\0"  # a reference into a shard starts with a NUL, which no path may hold
# LLaVA's brief-description instructions (llava/instruct: the CC3M-595K and LCS-558K pretraining sets ask these)
BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand(pattern: str) -> list[str]:
    """``a/{00000..00002}.tar`` -> ``a/00000.tar``, ``a/00001.tar``, ``a/00002.tar`` (``{x,y}`` lists too)."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    if ".." in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()):
            raise UsageError(f"{pattern}: a range must be {{N..M}} of digits, got {{{body}}}")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return list(itertools.chain.from_iterable(
        expand(pattern[:m.start()] + o + pattern[m.end():]) for o in options))


def shard_files(spec: str) -> list[Path]:
    """The shards a spec names: a brace pattern, one .tar, or a folder of them (sorted)."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(p.glob("*.tar"))
    else:
        files = [Path(f) for f in expand(spec)]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise UsageError(f"{spec}: shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                         if len(missing) > 1 else ""))
    if not files:
        raise UsageError(f"{spec}: no *.tar shards")
    return files


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's key and extension: the base name up to its first dot, the rest (``a/b.0.jpg`` -> a/b, 0.jpg)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _samples(path: Path) -> dict[str, dict[str, Any]]:
    """{key: {extension: (offset, size) for images, text for .json/.txt}} of one shard, in member order (from
    the cache of ``tarindex.cached`` while the shard is unchanged)."""
    index = tarindex.cached(path, lambda: _index(path))
    return {key: {ext: tuple(v) if isinstance(v, list) else v for ext, v in slot.items()}
            for key, slot in index.items()}


def _index(path: Path) -> dict[str, dict[str, Any]]:
    """``_samples`` as JSON values (offsets as [offset, size]), walked from the shard's headers."""
    samples: dict[str, dict[str, Any]] = {}
    try:
        found = tarindex.members(path, read=lambda name: _split_name(name)[1].rsplit(".", 1)[-1] in TEXTS)
    except (tarfile.TarError, OSError) as e:
        raise UsageError(f"{path}: not a readable (uncompressed) tar shard: {e}") from None
    for name, offset, size, data in found:
        key, ext = _split_name(name)
        last = ext.rsplit(".", 1)[-1]
        if last in IMAGE_EXTENSIONS:
            samples.setdefault(key, {})[ext] = [offset, size]
        elif data is not None:
            samples.setdefault(key, {})[ext] = data.decode("utf-8", errors="replace")
        else:
            samples.setdefault(key, {})
    return samples


def caption_turns(key: str, caption: str) -> list[dict]:
    """LLaVA's caption conversation: an instruction (and the image before or after it) chosen by the key's hash."""
    h = zlib.crc32(key.encode())
    instruction = BRIEF_INSTRUCTIONS[h % len(BRIEF_INSTRUCTIONS)]
    question = f"<image>\n{instruction}" if (h >> 8) % 2 else f"{instruction}\n<image>"
    return [{"from": "human", "value": question}, {"from": "gpt", "value": caption.strip()}]


def _raw(shard: int, name: str, key: str, slot: dict[str, Any]) -> tuple[dict, str | None]:
    """(the sample as a raw record of ``formats.py``, "caption" or None: detect it): its conversation or caption,
    its image members as images."""
    images = [f"{EMBEDDED}{shard}:{off}:{size}:{key}.{ext}"
              for ext, (off, size) in sorted((e, v) for e, v in slot.items() if isinstance(v, tuple))]
    meta: dict = {}
    if "json" in slot:
        try:
            meta = json.loads(slot["json"])
        except json.JSONDecodeError as e:
            raise BadRecord("invalid_json", f"{key}.json: {e.msg}") from None
        if not isinstance(meta, dict):
            raise BadRecord("not_an_object", f"{key}.json holds {type(meta).__name__}")
    rid = meta.get("id") or f"{name}:{key}"
    if "conversations" in meta or "messages" in meta:
        return {**meta, "id": rid, "image": None, "images": images}, None
    caption = slot.get("txt", meta.get("caption"))
    if not isinstance(caption, str) or not caption.strip():
        raise BadRecord("no_conversations", f"{key}: no conversation, and no caption (.txt or json 'caption')")
    return {"id": rid, "images": images, "conversations": caption_turns(key, caption)}, "caption"


def load(spec: str | Path, reader_class) -> Any:
    """Every sample of the shards as a record (``records.RecordReader``); images as offsets, read later."""
    files = shard_files(str(spec))
    reader = reader_class(Path(str(spec)).name, embedded=True)
    for k, path in enumerate(files):
        reader.source = path.name
        for index, (key, slot) in enumerate(_samples(path).items()):
            try:
                raw, fmt = _raw(k, path.name, key, slot)
            except BadRecord as e:
                reader.loaded.bad.append(e.rejected(f"{path.name}:{key}"))
                continue
            reader.add(raw, index, fmt)
    return reader.loaded


class ShardImages:
    """The images of tar shards (offsets into them, ``EMBEDDED``), and paths under ``base``."""

    def __init__(self, spec: str, base: Any):
        self.spec, self.base, self._files = spec, as_store(base), None

    def __str__(self) -> str:
        return "in its tar members, read in place"

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "base": self.base, "_files": None}

    def locate(self, ref: str) -> BadRecord | None:
        return None if ref.startswith(EMBEDDED) else self.base.locate(ref)

    def _where(self, ref: str) -> tuple[Path, int, int, str]:
        """(shard, offset, size, member) of a reference; BadRecord for a string that is none."""
        if self._files is None:
            self._files = shard_files(self.spec)
        try:
            shard, offset, size, member = ref[1:].split(":", 3)
            return self._files[int(shard)], int(offset), int(size), member
        except (ValueError, IndexError):
            raise BadRecord("bad_image_field", f"{ref[1:]!r} is no member of {self.spec}") from None

    def name(self, ref: str) -> str:
        if not ref.startswith(EMBEDDED):
            return self.base.name(ref)
        path, _, _, member = self._where(ref)
        return f"{path.name}:{member}"

    def open(self, ref: str) -> tuple[str, Any]:
        if not ref.startswith(EMBEDDED):
            return self.base.open(ref)
        path, offset, size, member = self._where(ref)
        name = f"{path.name}:{member}"
        if size == 0:
            raise BadRecord("empty_image", f"{name} is 0 bytes")
        import io

        with open(path, "rb") as f:  # one seek and one read; no handle kept across forks
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise BadRecord("truncated_image", f"{path.name}:{member}: {len(data)} of {size} bytes")
        return name, io.BytesIO(data)
