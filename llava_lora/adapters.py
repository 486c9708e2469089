"""LoRA on the language model, the projector trained in full, and the adapter files of RUN_DIR.

The adapter is a plain peft folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
``PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(MODEL_DIR), RUN_DIR)`` loads; it
carries the LoRA matrices and the whole projector (peft's ``modules_to_save``). ``run.json`` beside it
names the base model and a fingerprint of its config, so an adapter is never attached to another base.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .errors import UsageError
from .fsutil import make_readable

# The language model's layers only: CLIP's attention also has q_proj/v_proj, which must stay untouched.
LANGUAGE_MODEL_SCOPE = r"model\.language_model\..*"
PROJECTOR = "multi_modal_projector"
RUN_FILE = "run.json"


def lora_target_regex(names: list[str]) -> str:
    """A peft ``target_modules`` regex matching ``names`` inside the language model alone."""
    alternatives = "|".join(sorted(set(names)))
    return rf"{LANGUAGE_MODEL_SCOPE}\.({alternatives})"


def apply_lora(model, r: int, alpha: int, dropout: float, targets: list[str], train_projector: bool = True):
    """Wrap ``model`` (LlavaForConditionalGeneration) in a peft LoRA model; everything else is frozen."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_regex(targets),
                      modules_to_save=[PROJECTOR] if train_projector else None, bias="none")
    peft_model = get_peft_model(model, lora)
    wrapped = wrapped_modules(peft_model)
    if not wrapped:
        raise UsageError(f"--lora-target {targets}: no module of the language model matches")
    return peft_model


def wrapped_modules(peft_model) -> list[str]:
    """Names of the modules that carry LoRA matrices."""
    from peft.tuners.lora import LoraLayer

    return [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


def fingerprint(model_dir: str | Path) -> str:
    """A hash of MODEL_DIR's config: the same architecture, vocabulary and image settings."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg.pop("transformers_version", None)
    cfg.pop("_name_or_path", None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def save_adapter(peft_model, out: Path, model_dir: str | Path, extra: dict | None = None) -> None:
    """Write the adapter files into ``out``, each replaced atomically (a reader never sees half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out))
    try:
        peft_model.save_pretrained(tmp)
        meta = {"llava_lora_version": __version__, "base_model": str(Path(model_dir).resolve()),
                "base_fingerprint": fingerprint(model_dir), **(extra or {})}
        (tmp / RUN_FILE).write_text(json.dumps(meta, indent=2))
        make_readable(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def adapter_dir(path: str | Path) -> Path:
    """The folder holding the adapter: RUN_DIR itself, or its newest checkpoint while a run is unfinished."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return p
    ckpts = sorted((c for c in p.glob("checkpoint-*") if (c / "adapter_config.json").is_file()),
                   key=lambda c: int(c.name.rsplit("-", 1)[1]) if c.name.rsplit("-", 1)[1].isdigit() else -1)
    if ckpts:
        return ckpts[-1]
    raise UsageError(f"--adapter {p}: no adapter found (no adapter_config.json here or in a checkpoint-N/)")


def attach_adapter(model, adapter: str | Path, model_dir: str | Path):
    """``PeftModel`` over ``model`` with the adapter of ``adapter``; refuses one made for another base."""
    from peft import PeftModel

    src = adapter_dir(adapter)
    meta_path = src / RUN_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("base_fingerprint") not in (None, fingerprint(model_dir)):
            raise UsageError(f"--adapter {adapter} was trained on {meta.get('base_model')}, a different base "
                             f"model than {model_dir} (their configs differ)")
    try:
        return PeftModel.from_pretrained(model, src)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f"--adapter {adapter} does not fit {model_dir}: {str(e).splitlines()[0]}") from None
