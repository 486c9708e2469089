"""A corpus of odd inputs, written with PIL at test time (nothing binary is committed).

    corpus = write_odd_corpus(tmp_path)   # DIR/chat.jsonl, DIR/bom.json, DIR/images_dl/, DIR/outside.png
    corpus.images                         # [OddImage(id, file, reason or None)], one record each in chat.jsonl

``chat.jsonl`` holds one record per odd image, two records that share an id, a text-only record, a blank line
and a garbled line (the bad record ``line N``). ``bom.json`` is a JSON array written with a UTF-8 BOM.

"Unreadable": the tests run as root, whom ``chmod 000`` does not stop, so the corpus has both a chmod-000 file
(refused as ``unreadable_image`` for other users, read by root) and a file of random bytes behind a JPEG marker,
which nobody can decode (``truncated_image``); open_image's own ``PermissionError`` path is tested with a stub.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from data_fixtures import png_header_only

UPRIGHT_SIZE = (24, 16)  # the EXIF-rotated JPEG as a viewer shows it
EXIF_ORIENTATION_90 = 6  # "rotate 90 degrees clockwise to view"
IS_ROOT = os.geteuid() == 0


@dataclass(frozen=True)
class OddImage:
    id: str
    file: str  # under images_dl/
    reason: str | None  # None: used; else the reason every command gives
    what: str  # for the closing table


def upright_picture() -> Image.Image:
    """Four solid quadrants, so that a turned or mirrored copy differs everywhere (JPEG keeps solid blocks)."""
    w, h = UPRIGHT_SIZE
    img = Image.new("RGB", (w, h), (220, 20, 20))
    img.paste((20, 200, 20), (w // 2, 0, w, h // 2))
    img.paste((20, 20, 220), (0, h // 2, w // 2, h))
    img.paste((240, 240, 20), (w // 2, h // 2, w, h))
    return img


def _exif_rotated_jpeg(path: Path) -> None:
    """The upright picture stored turned 90 degrees counter-clockwise with Orientation 6, as a phone writes it."""
    stored = upright_picture().transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = EXIF_ORIENTATION_90
    stored.save(path, quality=98, subsampling=0, exif=exif.tobytes())


def _animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((200, 0, 0), (0, 0, 200), (0, 200, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _palette_transparent(path: Path) -> None:
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 10, 180, 10] + [0] * (254 * 3))
    pal.putpixel((0, 0), 0)
    pal.save(path, transparency=0)


def _write_images(root: Path, outside: Path) -> list[OddImage]:
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    Image.new("RGB", (1, 1), (250, 10, 10)).save(root / "one_px.png")
    Image.new("RGB", (1, 4000), (10, 10, 250)).save(root / "tall_1x4000.png")
    Image.new("RGB", (4000, 1), (10, 10, 250)).save(root / "wide_4000x1.jpg")
    Image.new("RGB", (3, 2), (10, 250, 10)).save(root / "tiny_3x2.jpg")  # 1/8 of it is 0 px: the old ZeroDivision
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.effect_noise((32, 32), 60).convert("RGB").save(root / "progressive.jpg", progressive=True, quality=90)
    Image.new("I;16", (16, 16), 40000).save(root / "grey16.png")
    _palette_transparent(root / "palette_transparent.png")
    _animated_gif(root / "animated.gif")
    Image.new("RGB", (16, 16), (30, 140, 200)).save(root / "photo.webp")
    _exif_rotated_jpeg(root / "exif_rotated.jpg")
    (root / "bomb.png").write_bytes(png_header_only(20_000, 20_000))  # 400 MP: past PIL's own bomb limit
    (root / "folder.jpg").mkdir()
    (root / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.randbytes(2000))
    Image.new("RGB", (16, 16), (90, 90, 90)).save(root / "locked.png")
    os.chmod(root / "locked.png", 0)
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, root / "escape_link.png")
    Image.new("RGB", (16, 16), (200, 120, 0)).save(root / "café_日本語 ü.png")
    Image.new("RGB", (16, 16), (0, 120, 200)).save(root / "dup_a.png")
    Image.new("RGB", (16, 16), (120, 0, 200)).save(root / "dup_b.png")
    return [
        OddImage("one_px", "one_px.png", None, "1x1 px PNG"),
        OddImage("tall_1x4000", "tall_1x4000.png", "extreme_aspect_ratio", "1x4000 px PNG"),
        OddImage("wide_4000x1", "wide_4000x1.jpg", "extreme_aspect_ratio", "4000x1 px JPEG"),
        OddImage("tiny_jpeg", "tiny_3x2.jpg", None, "3x2 px JPEG (the ZeroDivisionError)"),
        OddImage("cmyk", "cmyk.jpg", None, "CMYK JPEG"),
        OddImage("progressive", "progressive.jpg", None, "progressive JPEG"),
        OddImage("grey16", "grey16.png", None, "16-bit PNG"),
        OddImage("palette_transparent", "palette_transparent.png", None, "palette PNG with transparency"),
        OddImage("animated", "animated.gif", None, "animated GIF (first frame)"),
        OddImage("webp", "photo.webp", None, "WebP"),
        OddImage("exif_rotated", "exif_rotated.jpg", None, "EXIF-rotated JPEG (orientation 6)"),
        OddImage("bomb", "bomb.png", "image_too_large", "20000x20000 PNG header (decompression bomb)"),
        OddImage("folder", "folder.jpg", "not_a_file", "a folder named folder.jpg"),
        OddImage("garbage", "garbage.jpg", "truncated_image", "JPEG marker + 2000 random bytes"),
        OddImage("locked", "locked.png", None if IS_ROOT else "unreadable_image", "chmod 000 PNG"),
        OddImage("escape_link", "escape_link.png", "image_path_escapes_root", "symlink to a file outside the root"),
        OddImage("non_ascii", "café_日本語 ü.png", None, "non-ASCII file name"),
        OddImage("missing", "nowhere.png", "missing_image", "a file that does not exist"),
    ]


def _qa(image: bool, answer: str = "red") -> list[dict[str, str]]:
    return [{"from": "human", "value": ("<image>\n" if image else "") + "What colour is it?"},
            {"from": "gpt", "value": answer}]


@dataclass(frozen=True)
class Corpus:
    dir: Path
    data: Path  # chat.jsonl
    bom: Path  # bom.json
    images: list[OddImage]
    garbled_line: int
    duplicate_id: str = "dup"
    duplicate_files: tuple[str, str] = ("dup_a.png", "dup_b.png")

    @property
    def root(self) -> Path:
        return self.dir / "images_dl"

    def expected_bad(self) -> dict[str, str]:
        """{record id: reason} of every record that is not used."""
        bad = {o.id: o.reason for o in self.images if o.reason is not None}
        bad[f"line {self.garbled_line}"] = "invalid_json"
        return bad

    def used_ids(self) -> set[str]:
        return {o.id for o in self.images if o.reason is None} | {self.duplicate_id, "text_only"}


def write_odd_corpus(dir: Path) -> Corpus:
    dir = Path(dir)
    images = _write_images(dir / "images_dl", dir / "outside.png")
    records = [{"id": o.id, "image": o.file, "conversations": _qa(True)} for o in images]
    records += [{"id": "dup", "image": "dup_a.png", "conversations": _qa(True, "purple")},
                {"id": "dup", "image": "dup_b.png", "conversations": _qa(True, "violet")},
                {"id": "text_only", "conversations": _qa(False)}]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines.insert(3, "")  # a blank line: ignored
    garbled = 6
    lines.insert(garbled - 1, '{"id": "garbled", "image": "one_px.png", "conversations": [')
    (dir / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    bom = dir / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(records[:2] + records[-1:], ensure_ascii=False).encode())
    return Corpus(dir, dir / "chat.jsonl", bom, images, garbled)
