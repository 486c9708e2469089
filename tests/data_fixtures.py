"""Small LLaVA data sets on disk for tests: one with a bad record per reason, and a clean one.

    bad = write_bad_dataset(tmp_path)        # {record id: expected reason}; good ids: BAD_DATASET_GOOD_IDS
    ids = write_good_dataset(tmp_path, n=8)  # chat.json + images_dl/*.png, learnable synth images

Both write ``DIR/chat.json`` and ``DIR/images_dl/``; ``resolve_data(DIR)`` finds them.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from pathlib import Path
from typing import Any

from PIL import Image

from llava_lora.data import synth

# Records of write_bad_dataset that are usable (they cover the formats and image modes that must convert).
BAD_DATASET_GOOD_IDS = (
    "good_png_start", "good_jpeg_end", "good_text_only", "good_multi_turn", "good_role_user_assistant",
    "good_rgba", "good_palette_transparent", "good_grey", "good_grey_alpha", "good_cmyk", "good_16bit",
    "good_shared_image",
)


def _human(text: str) -> dict[str, str]:
    return {"from": "human", "value": text}


def _gpt(text: str) -> dict[str, str]:
    return {"from": "gpt", "value": text}


def _qa(question: str = "<image>\nWhat is it?", answer: str = "a square") -> list[dict[str, str]]:
    return [_human(question), _gpt(answer)]


def _noise_bytes(fmt: str, size: int = 96) -> bytes:
    """An incompressible image, so that cutting the file in half cuts pixel data, not padding."""
    buf = io.BytesIO()
    Image.effect_noise((size, size), 80).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few bytes (a decompression-bomb stand-in)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _write_images(images: Path) -> None:
    images.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(images / "rgb.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(images / "photo.jpg", quality=90)
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(images / "rgba.png")  # fully transparent -> white
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    pal.save(images / "palette.png", transparency=0)
    Image.new("L", (32, 32), 128).save(images / "grey.png")
    Image.new("LA", (32, 32), (128, 255)).save(images / "grey_alpha.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(images / "cmyk.jpg")
    Image.new("I;16", (32, 32), 40000).save(images / "grey16.png")
    (images / "empty.png").write_bytes(b"")
    (images / "not_an_image.jpg").write_text("this is text, not a JPEG\n")
    png, jpeg = _noise_bytes("PNG"), _noise_bytes("JPEG")
    (images / "truncated.png").write_bytes(png[: len(png) // 2])
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (images / "too_large.png").write_bytes(png_header_only(8000, 8000))  # 64 MP: over MAX_IMAGE_PIXELS
    (images / "bomb.png").write_bytes(png_header_only(20000, 20000))  # 400 MP: PIL's own bomb error
    Image.new("RGB", (8, 8)).save(images.parent / "outside.png")  # exists, but outside the image root


def _bad_raw_records(root: Path) -> list[tuple[Any, str | None]]:
    """[(raw record, expected reason or None for a good one)] in file order."""
    outside_abs = str((root.parent / "outside.png").resolve())
    return [
        ({"id": "good_png_start", "image": "rgb.png", "conversations": _qa()}, None),
        ({"id": "good_jpeg_end", "image": "photo.jpg", "conversations": _qa("What is it?\n<image>")}, None),
        ({"id": "good_text_only", "conversations": _qa("What is two plus two?", "four")}, None),
        ({"id": "good_multi_turn", "image": "rgb.png",
          "conversations": _qa() + _qa("And its colour?", "red")}, None),
        ({"id": "good_role_user_assistant", "image": "rgb.png",
          "conversations": [{"role": "user", "value": "<image>\nWhat is it?"},
                            {"role": "assistant", "value": "a square"}]}, None),
        ({"id": "good_rgba", "image": "rgba.png", "conversations": _qa()}, None),
        ({"id": "good_palette_transparent", "image": "palette.png", "conversations": _qa()}, None),
        ({"id": "good_grey", "image": "grey.png", "conversations": _qa()}, None),
        ({"id": "good_grey_alpha", "image": "grey_alpha.png", "conversations": _qa()}, None),
        ({"id": "good_cmyk", "image": "cmyk.jpg", "conversations": _qa()}, None),
        ({"id": "good_16bit", "image": "grey16.png", "conversations": _qa()}, None),
        ({"id": "good_shared_image", "image": "rgb.png", "conversations": _qa("<image>\nDescribe it.", "red")}, None),
        # record-level problems
        ("just a string", "not_an_object"),
        ({"image": "rgb.png", "conversations": _qa()}, "missing_id"),
        ({"id": "bad_image_field", "image": 5, "conversations": _qa()}, "bad_image_field"),
        ({"id": "multiple_images", "image": ["rgb.png", "photo.jpg"], "conversations": _qa()}, "multiple_images"),
        ({"id": "no_conversations", "image": "rgb.png", "conversations": []}, "no_conversations"),
        ({"id": "bad_turn", "image": "rgb.png", "conversations": ["<image>\nhi", "hello"]}, "bad_turn"),
        ({"id": "unknown_speaker", "image": "rgb.png",
          "conversations": [{"from": "system", "value": "be nice"}] + _qa()}, "unknown_speaker"),
        ({"id": "non_string_text", "image": "rgb.png",
          "conversations": [_human("<image>\nWhat?"), {"from": "gpt", "value": ["a", "list"]}]}, "non_string_text"),
        ({"id": "turns_out_of_order", "image": "rgb.png",
          "conversations": [_gpt("hello"), _human("<image>\nWhat?")]}, "turns_out_of_order"),
        ({"id": "no_assistant_answer", "image": "rgb.png",
          "conversations": [_human("<image>\nWhat?")]}, "no_assistant_answer"),
        ({"id": "empty_answer", "image": "rgb.png", "conversations": _qa(answer="  ")}, "no_assistant_answer"),
        ({"id": "token_missing", "image": "rgb.png", "conversations": _qa("What is it?")}, "image_token_mismatch"),
        ({"id": "token_twice", "image": "rgb.png",
          "conversations": _qa("<image>\nWhat is it?\n<image>")}, "image_token_mismatch"),
        ({"id": "token_in_middle", "image": "rgb.png",
          "conversations": _qa("What is <image> this?")}, "image_token_mismatch"),
        ({"id": "token_without_image", "conversations": _qa()}, "image_token_mismatch"),
        ({"id": "token_in_answer", "image": "rgb.png",
          "conversations": _qa("What is it?", "<image> a square")}, "image_token_mismatch"),
        # image-level problems
        ({"id": "missing_image", "image": "nowhere.png", "conversations": _qa()}, "missing_image"),
        ({"id": "empty_image", "image": "empty.png", "conversations": _qa()}, "empty_image"),
        ({"id": "not_an_image", "image": "not_an_image.jpg", "conversations": _qa()}, "not_an_image"),
        ({"id": "truncated_png", "image": "truncated.png", "conversations": _qa()}, "truncated_image"),
        ({"id": "truncated_jpeg", "image": "truncated.jpg", "conversations": _qa()}, "truncated_image"),
        ({"id": "escapes_root", "image": "../outside.png", "conversations": _qa()}, "image_path_escapes_root"),
        ({"id": "absolute_path", "image": outside_abs, "conversations": _qa()}, "image_path_escapes_root"),
        ({"id": "too_large", "image": "too_large.png", "conversations": _qa()}, "image_too_large"),
        ({"id": "bomb", "image": "bomb.png", "conversations": _qa()}, "image_too_large"),
    ]


def write_bad_dataset(dir: Path) -> dict[str, str]:
    """Write ``dir/chat.json`` + ``dir/images_dl/``: good records (BAD_DATASET_GOOD_IDS) and one bad record per
    reason (a few reasons twice, in different forms). Returns {record id: expected reason} for the bad ones;
    records without an id are reported as ``#index``."""
    dir = Path(dir)
    root = dir / "images_dl"
    _write_images(root)
    entries = _bad_raw_records(root)
    expected = {}
    for index, (raw, reason) in enumerate(entries):
        if reason is not None:
            rid = raw.get("id") if isinstance(raw, dict) and "id" in raw else f"#{index}"
            expected[rid] = reason
    (dir / "chat.json").write_text(json.dumps([raw for raw, _ in entries], indent=1))
    return expected


def write_good_dataset(dir: Path, n: int = 8, size: int = 32, seed: int = 0, jsonl: bool = False) -> list[str]:
    """Write ``n`` usable records (synth shapes, questions with one-word answers) to ``dir/chat.json`` (or
    ``chat.jsonl``) + ``dir/images_dl/``; every fourth is text-only. Returns the ids in file order."""
    dir = Path(dir)
    images = dir / "images_dl"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        scene = synth.random_scene(rng)
        kind = list(synth.QUESTIONS)[i % len(synth.QUESTIONS)]
        rid = f"good_{i:04d}"
        if i % 4 == 3:
            records.append({"id": rid, "conversations": _qa(f"Say the word {scene.colour}.", scene.colour)})
            continue
        synth.draw(scene, size).save(images / f"{rid}.png")
        records.append(synth.make_record(rid, f"{rid}.png", scene, [kind], image_first=i % 2 == 0))
    if jsonl:
        (dir / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        (dir / "chat.json").write_text(json.dumps(records, indent=1))
    return [r["id"] for r in records]
