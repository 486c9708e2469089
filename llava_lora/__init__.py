"""llava-lora: compose a chat LLM + CLIP into a LLaVA model, LoRA-tune, evaluate and demo it."""

__version__ = "0.1.0"
