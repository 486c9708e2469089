"""Images open only in the allowed formats (data/images.py IMAGE_FORMATS): anything else is refused, with its own
reason, before any other Pillow plugin parses it (an EPS renamed .jpg never reaches Ghostscript).

    .venv/bin/pytest tests/data/test_image_formats.py -q
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import EpsImagePlugin, Image

from llava_lora.data.images import IMAGE_FORMATS, check_image, open_image
from llava_lora.errors import BadRecord


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_every_allowed_format_opens(tmp_path: Path, fmt: str):
    path = tmp_path / f"a.{fmt.lower()}"
    Image.new("RGB", (8, 6), (200, 10, 10)).save(path, fmt)
    img = open_image(path)
    assert img.mode == "RGB" and img.size == (8, 6) and check_image(path) == (8, 6)


def test_an_eps_renamed_jpg_is_refused_before_its_plugin_runs(tmp_path: Path, monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "EPS")
    path = tmp_path / "cat.jpg"
    path.write_bytes(buf.getvalue())

    def ghostscript_reached(self, *args, **kwargs):
        raise AssertionError("the EPS plugin parsed the file")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", ghostscript_reached)
    for opener in (open_image, check_image):
        with pytest.raises(BadRecord) as e:
            opener(path)
        assert e.value.reason == "unsupported_image_format"
        assert "cat.jpg" in e.value.detail and "EPS" in e.value.detail and "JPEG" in e.value.detail


def test_other_formats_pillow_reads_are_refused_too(tmp_path: Path):
    for fmt, ext in (("ICO", "ico"), ("PCX", "pcx"), ("PPM", "ppm")):
        path = tmp_path / f"a.{ext}"
        Image.new("RGB", (16, 16)).save(path, fmt)
        with pytest.raises(BadRecord) as e:
            open_image(path)
        assert e.value.reason == "unsupported_image_format", fmt
    text = tmp_path / "t.jpg"
    text.write_text("this is text, not a picture\n")
    with pytest.raises(BadRecord, match="not_an_image"):
        open_image(text)
