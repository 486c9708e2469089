"""A record's image: where it is (a stat), and its pixels (decoded, upright, RGB), with one verdict for every
command: data check, train, eval, generate and the demo all open images here.

    path = resolve_image(root, rec.image)            # BadRecord if it escapes root, is missing or not a file
    kept, bad = locate_records(records, root)        # the same verdict for a data set, by stat: bad is [Rejected]
    img = open_image(path)                           # RGB, EXIF orientation applied, fully decoded, or BadRecord
    check_image(path)                                # open_image's verdict, faster (data check)
    store = as_store(root)                           # where a data set's images live: FolderImages, ZipImages,
    img = open_ref(store, ref)                       #   tables.TableImages, shards.ShardImages; the same decoding

A store answers ``locate(ref)`` (None, or the BadRecord: a stat or a look-up, no decoding), ``open(ref)`` (a name
for reports and an open binary file) and ``name(ref)``; it pickles without its open handles (process pools, data
workers), each process opening its own.

Reasons (``BadRecord.reason``): ``errors.IMAGE_REASONS``; of them, ``preprocess_failed`` is given by the
callers whose image processor refuses pixels that decoded.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BadRecord, Rejected

# Decoded-pixel limit: a 50 MP image is ~150 MB as RGB; anything larger is a mistake or a decompression bomb.
MAX_IMAGE_PIXELS = 50_000_000
# Longest side over shortest side. CLIP's processor scales the shortest side to 336 before cropping: a
# 1x4000 image becomes 336x1,344,000 pixels (1.35 GB, 24 s on one core) to keep a 336x336 crop of its middle.
MAX_ASPECT_RATIO = 20
ORIENTATION = 0x0112  # the EXIF tag
# The formats an image may have: only their Pillow plugins ever parse a file (an EPS renamed .jpg would otherwise
# reach Ghostscript, a PSD or an ICNS parsers few files of a data set need).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


# ---------------------------------------------------------------------------------------------------------
# Where the file is
# ---------------------------------------------------------------------------------------------------------


def resolve_image(root: str | Path, rel: str) -> Path:
    """The image file ``rel`` under ``root``; BadRecord if it escapes the root (symlinks resolved), is missing
    or is not a regular file (a folder named like an image)."""
    if os.path.isabs(rel):
        raise BadRecord("image_path_escapes_root", f"{rel} is an absolute path")
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, rel))
    if not (path.startswith(real_root + os.sep) or path == real_root):
        raise BadRecord("image_path_escapes_root", f"{rel} resolves outside {root}")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise BadRecord("missing_image", f"{rel} not found under {root}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise BadRecord("not_a_file", f"{rel} is {kind} under {root}")
    return Path(path)


def _locate(real_root: str, root: Path, rel: str) -> BadRecord | None:
    """resolve_image's verdict; a plain name in the root (CC3M's layout) costs one lstat instead of a realpath."""
    if os.sep not in rel and rel not in (".", ".."):
        try:
            st = os.lstat(os.path.join(real_root, rel))
        except OSError:
            return BadRecord("missing_image", f"{rel} not found under {root}")
        if stat.S_ISREG(st.st_mode):  # a regular file, not a symlink: it cannot lead outside
            return None
    try:
        resolve_image(root, rel)
    except BadRecord as e:
        return e
    return None


def locate_records(records: Sequence[Any], root: Any) -> tuple[list[Any], list[Rejected]]:
    """(records each of whose images is in ``root`` (a folder, or any store of ``as_store``), a ``Rejected`` for
    each other).

    A stat (a look-up, for a zip or shards) per distinct image, no decoding: training drops these before step 1,
    so that the sampler never draws a record that cannot load. Files that exist but do not decode are found
    later, when a worker opens them.
    """
    store = as_store(root)
    verdicts: dict[str, BadRecord | None] = {}
    kept, bad = [], []
    for rec in records:
        why = None
        for ref in rec.images:
            if ref not in verdicts:
                verdicts[ref] = store.locate(ref)
            why = verdicts[ref]
            if why is not None:
                break
        if why is None:
            kept.append(rec)
        else:
            bad.append(why.rejected(rec.id))
    return kept, bad


# ---------------------------------------------------------------------------------------------------------
# Where images live: a folder, a zip (tables.py and shards.py add rows of a table and members of tar shards)
# ---------------------------------------------------------------------------------------------------------


class FolderImages:
    """Images as files under a folder: a ref is a path relative to it, which may not lead outside it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._real = os.path.realpath(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def locate(self, ref: str) -> BadRecord | None:
        return _locate(self._real, self.root, ref)

    def name(self, ref: str) -> str:
        return ref

    def open(self, ref: str) -> tuple[str, Any]:
        path = resolve_image(self.root, ref)
        return path.name, _open_file(path)


_OPEN_ZIPS: dict = {}  # {(path, pid): (ZipFile, prefix)}


class ZipImages:
    """Images as members of a zip, read in place (nothing extracted); a ref is a member name, or a name under the
    zip's single top-level folder (``images.zip`` holding ``images/x.jpg`` answers ``x.jpg``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._zip = None
        self._prefix = None

    def __str__(self) -> str:
        return str(self.path)

    def __getstate__(self) -> dict:  # an open zip does not cross processes: each opens its own
        return {"path": self.path, "_zip": None, "_prefix": None}

    def _open_zip(self):
        if self._zip is None:  # one directory read per process and zip (a pool's tasks each get a fresh copy)
            key = (self.path, os.getpid())  # a forked worker opens its own: a shared descriptor shares its offset
            if key not in _OPEN_ZIPS:
                import zipfile

                try:
                    z = zipfile.ZipFile(self.path)
                except (OSError, zipfile.BadZipFile) as e:
                    from ..errors import UsageError

                    raise UsageError(f"{self.path}: not a readable zip: {e}") from None
                tops = {n.split("/", 1)[0] for n in z.namelist() if "/" in n}
                _OPEN_ZIPS[key] = z, (next(iter(tops)) + "/" if len(tops) == 1 else "")
            self._zip, self._prefix = _OPEN_ZIPS[key]
        return self._zip

    def _member(self, ref: str):
        z = self._open_zip()
        norm = posixpath.normpath(ref.replace("\\", "/"))
        if ref.startswith("/") or norm.startswith("../") or norm == "..":
            raise BadRecord("image_path_escapes_root", f"{ref} leads outside {self.path}")
        for name in (norm, self._prefix + norm):
            try:
                return z.getinfo(name)
            except KeyError:
                continue
        raise BadRecord("missing_image", f"{ref} not found in {self.path}")

    def name(self, ref: str) -> str:
        return f"{self.path.name}:{ref}"

    def locate(self, ref: str) -> BadRecord | None:
        try:
            info = self._member(ref)
        except BadRecord as e:
            return e
        return BadRecord("not_a_file", f"{ref} is a folder in {self.path}") if info.is_dir() else None

    def open(self, ref: str) -> tuple[str, Any]:
        if self._zip is not None and _OPEN_ZIPS.get((self.path, os.getpid()), (None,))[0] is not self._zip:
            self._zip = None  # forked since it was opened
        info = self._member(ref)
        if info.file_size == 0:
            raise BadRecord("empty_image", f"{ref} is 0 bytes")
        try:
            return posixpath.basename(ref), self._zip.open(info)
        except Exception as e:  # an unsupported compression or a damaged header: this image's reason
            raise BadRecord("unreadable_image", f"{ref} in {self.path}: {type(e).__name__}: {e}") from None


def as_store(root: Any) -> Any:
    """The image store of ``root``: a store as it is, a ``.zip`` path as ``ZipImages``, a folder as ``FolderImages``."""
    if hasattr(root, "locate"):
        return root
    return ZipImages(root) if str(root).endswith(".zip") else FolderImages(root)


# ---------------------------------------------------------------------------------------------------------
# The pixels
# ---------------------------------------------------------------------------------------------------------


def _to_rgb(img: Any) -> Any:
    """Any PIL mode -> RGB: alpha composited on white, 16-bit scaled down, palette transparency honoured."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        # convert("RGB") clips 16-bit values at 255 (a white image); scale 0..65535 down to 0..255 instead.
        img = img.convert("I")
        _, hi = img.getextrema()
        if mode.startswith("I;16") or hi > 255:
            img = img.point(lambda v: v * (1 / 256))
        return img.convert("L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """Open, fully decode, turn upright (EXIF orientation) and convert to RGB; BadRecord with an image reason
    if that is not possible, whatever the cause."""
    path = Path(path)
    return _decode(path.name, _open_file(path), max_pixels, reduced=False)[0]


def check_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Raise what ``open_image`` would raise for this file, faster; returns its upright (width, height).

    JPEGs decode at 1/8 scale (libjpeg's DCT scaling): every byte of the entropy-coded data is still read, so
    truncated and corrupt files fail the same way, at about two thirds of the cost of a full decode.
    """
    path = Path(path)
    return _decode(path.name, _open_file(path), max_pixels, reduced=True)[1]


def open_ref(store: Any, ref: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """``open_image`` of the image ``ref`` of a store (``stores.as_store``): a folder, a zip, rows, shards."""
    name, f = store.open(ref)
    return _decode(name, f, max_pixels, reduced=False)[0]


def check_ref(store: Any, ref: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``check_image`` of the image ``ref`` of a store."""
    name, f = store.open(ref)
    return _decode(name, f, max_pixels, reduced=True)[1]


def _check_header(name: str, size: tuple[int, int], max_pixels: int) -> None:
    """Refuse, from the header alone, what must not be decoded or cannot be preprocessed sensibly."""
    w, h = size
    if w < 1 or h < 1:
        raise BadRecord("undecodable_image", f"{name}: {w}x{h} pixels")
    if w * h > max_pixels:
        raise BadRecord("image_too_large", f"{name}: {w}x{h} is over {max_pixels:,} pixels; refused before decoding")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise BadRecord("extreme_aspect_ratio", f"{name}: {w}x{h}, one side over {MAX_ASPECT_RATIO}x the other")


def _open_file(path: Path):
    try:
        if path.stat().st_size == 0:
            raise BadRecord("empty_image", f"{path.name} is 0 bytes")
        return open(path, "rb")
    except FileNotFoundError:
        raise BadRecord("missing_image", f"{path} not found") from None
    except IsADirectoryError:
        raise BadRecord("not_a_file", f"{path.name} is a folder") from None
    except OSError as e:
        raise BadRecord("unreadable_image", f"{path.name}: {e.strerror or e}") from None


def _sniffed_format(f: Any) -> str | None:
    """The format another Pillow plugin would take the open file ``f`` for, by its first bytes alone (each plugin's
    prefix test: no decoder runs), to name it in the refusal."""
    from PIL import Image

    Image.init()
    with contextlib.suppress(Exception):
        f.seek(0)
    prefix = f.read(16)
    for name, (_, accept) in Image.OPEN.items():
        if name not in IMAGE_FORMATS and accept is not None:
            with contextlib.suppress(Exception):
                if accept(prefix):
                    return name
    return None


def _unidentified(name: str, f: Any) -> BadRecord:
    """Why PIL did not open ``f`` with the allowed plugins: another format's (never decoded), or none."""
    found = _sniffed_format(f)
    if found:
        return BadRecord("unsupported_image_format", f"{name}: not one of {', '.join(IMAGE_FORMATS)} (its first "
                         f"bytes look like {found}); refused before any decoder ran")
    return BadRecord("not_an_image", f"{name}: not a format PIL can read")


def _decode(name: str, f: Any, max_pixels: int, reduced: bool) -> tuple[Any, tuple[int, int]]:
    """(upright RGB image, its upright full (width, height)) of the open binary file ``f`` (closed here);
    ``reduced``: JPEGs decode at 1/8 scale."""
    from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

    # Truncated files must fail here, not turn into half-grey training images, whatever the caller set.
    old_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        # (catch_warnings is process-wide: image checks run in processes, not threads, for this reason too)
        with f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(f, formats=IMAGE_FORMATS)  # the header only; PIL refuses a decompression bomb here
            except UnidentifiedImageError:
                raise _unidentified(name, f) from None  # while f is open: its first bytes name what it is
            _check_header(name, img.size, max_pixels)
            orientation = img.getexif().get(ORIENTATION, 1)
            # the full-scale size, upright (EXIF orientations 5-8 turn the picture by 90 degrees)
            size = img.size[::-1] if orientation in (5, 6, 7, 8) else img.size
            if reduced and img.format == "JPEG":
                img.draft(None, (max(1, img.width // 8), max(1, img.height // 8)))  # 0 would divide by zero
            img.load()  # an animated GIF/WebP/PNG: its first frame
            if orientation != 1:  # upright, as a viewer shows it: phones store pixels sideways with this tag
                ImageOps.exif_transpose(img, in_place=True)
        try:
            return _to_rgb(img), size
        except ValueError as e:
            raise BadRecord("unsupported_image_mode", f"{name}: {img.mode}: {e}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadRecord("image_too_large", f"{name}: {str(e).rstrip('.')}; refused before decoding") from None
    except BadRecord:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        # PIL raises these for damaged files (SyntaxError: broken PNG chunks; OSError: truncated data).
        raise BadRecord("truncated_image", f"{name}: {type(e).__name__}: {e}") from None
    except Exception as e:  # anything else PIL meets in a hostile file is this record's reason, never a crash
        raise BadRecord("undecodable_image", f"{name}: {type(e).__name__}: {e}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old_truncated
