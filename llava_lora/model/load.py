"""The loader of MODEL_DIR: one load (``_load``: the folder checked, the lm_head hook), two entry points.

    model, processor = load_model(MODEL_DIR, adapter=RUN_DIR)             # eval, generate, demo, export
    model, processor = load_for_training(cfg, device, precision, attn)    # train (frozen weights in the run's precision)

``load_model`` serves inference: the checkpoint's own dtype (``precision.inference_dtype``), the adapter attached,
on the device, in eval mode. ``load_for_training`` loads in the run's precision (``precision.train_precision``),
optionally 4-bit (QLoRA), with the attention the run resolved (blocked eager switched in after loading); the
accelerator places it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import UsageError
from ..kernels import attention, weight_only
from .parts import llava_of
from .precision import default_device, frozen_dtype, inference_dtype, precision_label


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load progress bars and load reports (ours say what matters)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _checked_dir(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"MODEL_DIR {model_dir} is not a model folder (no config.json); make one with "
                         "`llava-lora build`")
    return model_dir


def _load(model_dir: Path, dtype: torch.dtype, **kwargs):
    """The one load of MODEL_DIR both entry points share: (model, processor), the lm_head's input contiguous."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    with quiet_transformers():
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, **kwargs)
    contiguous_head_input(model)  # generation: eval, generate, demo, export's check, held-out answers
    return model, AutoProcessor.from_pretrained(model_dir)


def load_model(model_dir: str | Path, adapter: str | Path | None = None, dtype: str = "auto",
               device: str | None = None, quiet: bool = False):
    """(model, processor) for MODEL_DIR, with the adapter of RUN_DIR attached when given.

    One copy of the weights, in the checkpoint's own dtype (``dtype`` names another), serves base and
    fine-tuned answers: with an adapter, the base is the same model under ``model.disable_adapter()``. The
    adapter's matrices load as peft loads them (float32: the few MB it saved, exactly), and frozen weights are
    never cast on the fly, but where they are stored in half precision for fp32 compute (kernels/weight_only.py: a
    layer's weight upcast for its own matmul). Prints one line saying which precision runs and why, unless ``quiet``.
    """
    model_dir = _checked_dir(model_dir)
    device = device or default_device()
    torch_dtype, upcast, why = inference_dtype(dtype, model_dir, device)
    if not quiet:
        print(f"precision {precision_label(torch_dtype, upcast)} on {device} ({why})")
    model, processor = _load(model_dir, torch_dtype)
    if adapter is not None:
        from .adapters import attach_adapter

        model = attach_adapter(model, adapter, model_dir)
    if upcast:
        weight_only.apply(model)
    model.to(device).eval()
    return model, processor


def loaded_precision(model) -> str:
    """How a loaded model computes, for reports: 'bfloat16', or 'bfloat16 weights, float32 compute'."""
    return precision_label(llava_of(model).get_input_embeddings().weight.dtype, weight_only.applied(model))


def generation_cache(model) -> dict:
    """``generate`` keyword arguments for the KV cache: stored in bf16 where the frozen weights are (the
    bf16-weights path, whose compute is fp32), so the cache keeps the size of the bf16 path's; else the default."""
    return {"cache": weight_only.StoredHalfCache()} if weight_only.applied(model) else {}


def contiguous_head_input(model) -> None:
    """Hand the lm_head a contiguous input. Generation gives it the last position of each row, a strided slice of
    [B, T, D]; a bias-free Linear on a non-contiguous 3-D bf16 input on a CPU becomes a bmm that copies the weight
    once per row (pytorch/pytorch#151934): at Qwen1.5-4B's vocabulary, 3 GB and 10 s more per prefill of 4 rows."""
    def contiguous(module, args):
        return (args[0].contiguous(), *args[1:])

    llava_of(model).lm_head.register_forward_pre_hook(contiguous)


def lm_supports_sdpa(model_dir: str | None) -> bool:
    """Whether MODEL_DIR's language model has an SDPA path (Gemma 2's soft-capped attention has none)."""
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return True
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    text_config = AutoConfig.from_pretrained(model_dir).get_text_config()
    return getattr(MODEL_FOR_CAUSAL_LM_MAPPING.get(type(text_config), None), "_supports_sdpa", True)


def _quantization_config(dtype: torch.dtype):
    """QLoRA's recipe: NF4 with double quantisation for the language model; the vision tower, projector and
    lm_head keep their precision (the projector trains in full, the tower is small and sees no LoRA)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])


def load_for_training(cfg, device: str, precision: str, attn_implementation: str = "sdpa",
                      gpu_index: int = 0):
    """(model, processor) for a training run: ``cfg`` is its TrainConfig (``model``, ``quantize``)."""
    model_dir = _checked_dir(cfg.model)
    # Frozen weights in the run's precision on every device (bf16: 8.5 GB for the 4 B model, not 17), loaded
    # so once and never cast per forward; main() keeps fp32 masters of what is trained.
    dtype = frozen_dtype(precision)
    kwargs = {}
    if cfg.quantize == "4bit":  # quantised on loading, onto this process's GPU (a 4-bit model is not moved after)
        kwargs = {"quantization_config": _quantization_config(dtype), "device_map": {"": gpu_index}}
    blocked = attn_implementation == "blocked_eager"
    if blocked:  # loaded with a built-in implementation, switched after loading
        attn_implementation = "sdpa" if lm_supports_sdpa(str(model_dir)) else "eager"
    model, processor = _load(model_dir, dtype, attn_implementation=attn_implementation, **kwargs)
    if blocked:
        attention.use_blocked(model)
    return model, processor
