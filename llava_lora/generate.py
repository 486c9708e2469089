"""Answer one prompt about one image.

    llava-lora generate --model MODEL_DIR [--adapter RUN_DIR] --image IMG --prompt "What is in the image?"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import prompts
from .config import field
from .data.records import BadRecord, open_image
from .errors import UsageError
from .inference import GenerationSettings, answer, settings_from
from .modeling import load_model


@dataclass(kw_only=True)
class GenerateConfig(GenerationSettings):
    model: str = field(help="MODEL_DIR written by `llava-lora build`")
    prompt: str = field(help="the question")
    image: str | None = field(None, help="image file (omit for a text-only prompt)")
    adapter: str | None = field(None, help="RUN_DIR (or a checkpoint folder) holding a trained adapter")
    device: str | None = field(None, help="cpu or cuda (default: cuda when available)")
    dtype: str = field("auto", help="auto (the checkpoint's own dtype, never upcast), float32, bfloat16, float16")
    seed: int = field(0, help="seed for sampling")


def main(cfg: GenerateConfig) -> int:
    import torch

    image = None
    if cfg.image is not None:
        path = Path(cfg.image)
        if not path.is_file():
            raise UsageError(f"--image {path}: file not found")
        try:
            image = open_image(path)
        except BadRecord as e:
            raise UsageError(f"--image {path}: {e}") from None
    model, processor = load_model(cfg.model, cfg.adapter, cfg.dtype, cfg.device)
    msgs = [{"role": "user", "content": prompts._content(cfg.prompt, image is not None, True)}]
    torch.manual_seed(cfg.seed)
    (text,) = answer(model, processor, [prompts.generation_prompt(processor.tokenizer, msgs)], [image],
                     settings_from(cfg))
    print(text)
    return 0
