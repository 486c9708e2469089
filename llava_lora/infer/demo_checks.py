"""What the demo page accepts: its generation settings, uploads (refused over a byte size or a pixel count before
they are decoded) and data-set samples. Each refusal is a ``RequestError``, whose message the page shows."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..chat.encode import preprocess_image
from ..data.images import as_store, open_image, open_ref
from ..data.records import BadRecord, Record
from .engine import GenerationSettings

if TYPE_CHECKING:
    from PIL import Image

# The settings panel's controls, in the order the page's handlers (and the endpoints' gradio_client callers)
# receive their values; each is a GenerationSettings field but ``greedy`` (temperature 0).
PANEL = ("max_new_tokens", "greedy", "temperature", "top_p", "top_k", "repetition_penalty")
# Slider ranges (low, high, step) of the sampling settings; the command's own values must lie in them.
SLIDERS = {"temperature": (0.05, 2.0, 0.05), "top_p": (0.05, 1.0, 0.05), "top_k": (0, 200, 1),
           "repetition_penalty": (0.5, 2.0, 0.05)}


class RequestError(ValueError):
    """A request the page refuses; the message is shown to the user."""


def ui_settings(max_new_tokens: float, greedy: bool, temperature: float, top_p: float, top_k: float,
                repetition_penalty: float, cap: int) -> GenerationSettings:
    """The page's settings (its controls' values, named as in ``PANEL``) as GenerationSettings, checked (API callers
    can send anything)."""
    try:
        n, k = int(max_new_tokens), int(top_k)
        temperature, top_p, penalty = float(temperature), float(top_p), float(repetition_penalty)
    except (TypeError, ValueError):
        raise RequestError("generation settings must be numbers") from None
    if not 1 <= n <= cap:
        raise RequestError(f"max new tokens must lie in 1..{cap}, got {n}")
    if not greedy and not 0 < temperature <= 5:
        raise RequestError(f"temperature must lie in (0, 5] when sampling, got {temperature}")
    if not 0 < top_p <= 1 or k < 0 or not 0 < penalty <= 5:
        raise RequestError("top-p must lie in (0, 1], top-k be 0 or more, repetition penalty in (0, 5]")
    return GenerationSettings(max_new_tokens=n, temperature=0.0 if greedy else temperature, top_p=top_p,
                              top_k=k, repetition_penalty=penalty)


def checked_upload(path: str | None, max_bytes: int, max_pixels: int) -> Image.Image | None:
    """The uploaded image as RGB, after its byte size and (from the header) pixel count pass the limits."""
    if path is None:
        return None
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise RequestError(f"cannot read the upload: {e.strerror or e}") from None
    if size > max_bytes:
        raise RequestError(f"the image is {size:,} bytes, over the limit of {max_bytes:,} bytes")
    try:
        return open_image(path, max_pixels=max_pixels)  # reads the header and refuses before decoding
    except BadRecord as e:
        if e.reason == "image_too_large":
            raise RequestError(f"the image is too large: {e.detail}") from None
        raise RequestError(f"cannot use this image ({e.reason}): {e.detail}") from None


MAX_UPLOAD_IMAGES = 8  # images of one question in tab 2 (each is the tower's feature count of tokens)


def upload_images(paths: list, question: str, max_bytes: int, max_pixels: int) -> list[Image.Image]:
    """The uploaded images (the first box's, then the others', empty ones left out), each through the limits; a
    question whose ``<image>`` placeholders do not match them in number is refused."""
    paths = [p if isinstance(p, (str, os.PathLike)) or p is None else getattr(p, "path", p) for p in paths]
    paths = [p for p in paths if p]
    if len(paths) > MAX_UPLOAD_IMAGES:
        raise RequestError(f"{len(paths)} images; the limit is {MAX_UPLOAD_IMAGES}")
    placeholders = question.count("<image>")
    if placeholders and placeholders != len(paths):
        raise RequestError(f"the question has {placeholders} <image> for {len(paths)} images: one per image, or "
                           "none (all images first)")
    return [checked_upload(p, max_bytes, max_pixels) for p in paths]


def check_pixels(processor, image: Image.Image | None) -> None:
    """Refuse, as a request error, an image that decoded but that the model's image processor cannot take."""
    if image is None:
        return
    _, refusal = preprocess_image(processor.image_processor, image)
    if refusal is not None:
        raise RequestError(f"cannot use this image (preprocess_failed): {refusal}")


@dataclass
class Samples:
    """The data set of tab 1 (records and where their images are)."""

    records: list[Record]
    image_root: Path
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: Any) -> Record:
        if isinstance(index, bool) or not isinstance(index, (int, float)) or index != int(index):
            raise RequestError(f"sample index must be a whole number, got {index!r}")
        if not 0 <= index < len(self.records):
            raise RequestError(f"sample index {index} is out of range 0..{len(self.records) - 1}")
        return self.records[int(index)]

    def images(self, record: Record) -> list[Image.Image] | None:
        """The record's images, in placeholder order (None: text-only), or a RequestError naming the one that fails."""
        if not record.images:
            return None
        try:
            store = as_store(self.image_root)
            return [open_ref(store, ref) for ref in record.images]
        except BadRecord as e:
            raise RequestError(f"sample {record.id}: {e.reason}: {e.detail}") from None

    def image(self, record: Record) -> Image.Image | None:
        """The record's first image, as tab 1 shows it (None: text-only)."""
        images = self.images(record)
        return images[0] if images else None


def page_settings(values: tuple, cap: int) -> GenerationSettings:
    """The settings a handler received (the panel's values, in ``PANEL`` order), checked."""
    if len(values) != len(PANEL):
        raise RequestError(f"expected {len(PANEL)} generation settings ({', '.join(PANEL)}), got {len(values)}")
    return ui_settings(**dict(zip(PANEL, values)), cap=cap)


def control_tokens(tokenizer) -> list[str]:
    """The strings the tokenizer turns into control tokens wherever they stand in a text (``<|im_end|>``,
    ``<image>``, ...): its special and added tokens, longest first."""
    found = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return sorted((t for t in found if t.strip()), key=len, reverse=True)


def checked_question(question: str | None, max_chars: int, tokens: list[str]) -> str:
    """The typed question, stripped; refused empty, over ``max_chars``, or holding a control token (``tokens``):
    typed, ``<|im_end|>`` would end the turn, ``<image>`` ask for an image that is not there. Text is text."""
    question = (question or "").strip()
    if not question:
        raise RequestError("type a question first")
    if len(question) > max_chars:
        raise RequestError(f"the question is {len(question):,} characters; the limit is {max_chars:,}")
    for token in tokens:
        if token in question:
            raise RequestError(f"the question holds {token}, one of the model's control tokens; write it "
                               "another way")
    return question


_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/[^\s:,;()'\"]+")


def visitor_text(message: str) -> str:
    """A message as a visitor of the page sees it: absolute paths cut to their last part (the log keeps them)."""
    return _ABSOLUTE_PATH.sub(lambda m: Path(m.group()).name or "/", message)
