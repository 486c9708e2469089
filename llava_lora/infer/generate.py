"""Answer one prompt about one image, several, or none.

    llava-lora generate --model MODEL_DIR [--adapter RUN_DIR] --image IMG --prompt "What is in the image?"
    llava-lora generate --model MODEL_DIR --image A.jpg --image B.jpg --prompt "<image> <image> Which is brighter?"

The images stand where ``<image>`` stands in the prompt (as many placeholders as images), else all before the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..chat import prompts
from ..chat.encode import preprocess_image
from ..config import device_field, field, model_field
from ..data.images import open_image
from ..errors import BadRecord, UsageError
from ..model.load import load_model
from ..model.precision import load_dtype_field
from .engine import GenerationSettings, answer, settings_from

if TYPE_CHECKING:
    from PIL import Image


@dataclass(kw_only=True)
class GenerateConfig(GenerationSettings):
    model: str = model_field()
    prompt: str = field(help="the question")
    image: list[str] | None = field(None, help="image file, repeated for several (each where an <image> stands in the "
                                               "prompt, else all before it); omit for a text-only prompt")
    adapter: str | None = field(None, help="RUN_DIR (or a checkpoint folder) holding a trained adapter")
    device: str | None = device_field()
    dtype: str = load_dtype_field()
    seed: int = field(0, help="seed for sampling")


def main(cfg: GenerateConfig) -> int:
    import torch

    paths = [cfg.image] if isinstance(cfg.image, str) else list(cfg.image or [])
    placeholders = cfg.prompt.count(prompts.IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(paths):
        raise UsageError(f"--prompt has {placeholders} <image> placeholder{'s' * (placeholders != 1)} for "
                         f"{len(paths)} --image: give one --image per <image>, or no <image> (all images first)")
    images = [user_image(p) for p in paths]  # before the model loads: fail in a second
    model, processor = load_model(cfg.model, cfg.adapter, cfg.dtype, cfg.device)
    for path, image in zip(paths, images):
        _, refusal = preprocess_image(processor.image_processor, image)  # said about the file, before generating
        if refusal is not None:
            raise UsageError(f"--image {path}: preprocess_failed: {refusal}")
    msgs = prompts.user_messages(cfg.prompt, len(images))
    torch.manual_seed(cfg.seed)
    (text,) = answer(model, processor, [prompts.generation_prompt(processor.tokenizer, msgs)], [images or None],
                     settings_from(cfg))
    print(text)
    return 0


def user_image(path: str) -> Image.Image:
    """The image at ``path`` as the model sees it (RGB, upright); UsageError naming the file and the reason."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"--image {p}: not_a_file: a folder, expected an image file")
    if not p.exists():
        raise UsageError(f"--image {p}: missing_image: file not found")
    try:
        return open_image(p)
    except BadRecord as e:
        raise UsageError(f"--image {p}: {e}") from None
