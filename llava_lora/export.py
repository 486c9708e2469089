"""Fold a trained adapter (LoRA + projector) into a plain checkpoint in the base model's dtype.

    llava-lora export --model MODEL_DIR --adapter RUN_DIR --out MERGED_DIR [--data DATA --split test]

MERGED_DIR is what ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` load
with no code of ours. The merge runs in float32 and the result is cast to the dtype MODEL_DIR was saved in
(``--dtype`` picks another). The export checks itself before it is moved into place: greedy answers of the
written folder, loaded with plain transformers, must equal those of MODEL_DIR + adapter on a few samples
(``--data``'s first ones, else synthetic shape images), both run in float32. In half precision the merged
weights are rounded once more than base + adapter are, so an answer may differ by a token: that is reported,
not fatal; in float32 any difference is an error. The processor files are copied from MODEL_DIR unchanged.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import __version__, gguf_export, layout, prompts
from . import config as cfglib
from .adapters import adapter_dir, fingerprint, wrapped_modules
from .config import field
from .data.records import BadRecord, Record, Turn
from .errors import UsageError
from .fsutil import OVERWRITE_HELP, check_out, make_readable, move_into_place
from .inference import GenerationSettings, answer

EXPORT_FILE = "export.json"
HALF = ("bfloat16", "float16")
NOT_COPIED = ("build_report.json",)  # MODEL_DIR's own report; MERGED_DIR gets export.json


@dataclass
class ExportConfig:
    model: str = field(help="MODEL_DIR the adapter was trained on")
    adapter: str = field(help="RUN_DIR (or a checkpoint folder) holding the adapter")
    out: str = field(help="MERGED_DIR to write")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", help="dtype of MERGED_DIR (auto: MODEL_DIR's, as saved in its config.json)")
    data: str | None = field(None, help="samples for the self-check; none: synthetic shape images")
    split: str | None = field(None, help="split file in a DATA folder, e.g. test")
    image_dir: str | None = field(None, help="image root of DATA")
    check_samples: int = field(4, help="samples in the self-check (0: no check)")
    check_tokens: int = field(16, help="greedy tokens per answer in the self-check")
    overwrite: bool = field(False, help=OVERWRITE_HELP)
    format: Literal["safetensors", "gguf"] = field(
        "safetensors", help="gguf: also write llama.cpp/Ollama files (LM, mmproj, Modelfile) into MERGED_DIR")
    gguf_type: Literal["f16", "bf16", "q8_0"] = field("q8_0", help="weight type of the GGUF language model")
    device: str | None = field(None, help="cpu or cuda; none: cuda when available")

    def __post_init__(self) -> None:
        if self.check_samples < 0 or self.check_tokens < 1:
            raise UsageError(f"--check-samples must be >= 0 and --check-tokens >= 1, got {self.check_samples} "
                             f"and {self.check_tokens}")


def saved_dtype(model_dir: str | Path) -> str:
    """The dtype MODEL_DIR's weights were saved in (transformers 5 writes ``dtype``, 4.x ``torch_dtype``)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype") or "float32"
    return str(name).removeprefix("torch.")


def check_inputs(cfg: ExportConfig) -> tuple[list[Record], list[Any]]:
    """(records, images) for the self-check: DATA's first readable samples, or synthetic shape images."""
    if cfg.data is None:
        from .data import synth

        rng = random.Random(0)
        kinds = list(synth.QUESTIONS)
        records, images = [], []
        for i in range(cfg.check_samples):
            scene = synth.random_scene(rng)
            kind = kinds[i % len(kinds)]
            turns = (Turn("user", synth.QUESTIONS[kind]), Turn("assistant", scene.answer(kind)))
            records.append(Record(f"synthetic_{i}", "synthetic.png", turns, image_first=True))
            images.append(synth.draw(scene, 64))
        return records, images

    from .data.records import load_records, resolve_data
    from .evaluate import load_image

    data_file, root = resolve_data(cfg.data, cfg.split, cfg.image_dir)
    records, images = [], []
    for rec in load_records(data_file)[0]:
        if len(records) == cfg.check_samples:
            break
        try:
            images.append(load_image(rec, root))
            records.append(rec)
        except BadRecord:
            continue  # the check needs readable samples; `data check` reports the others
    if not records:
        raise UsageError(f"--data {cfg.data}: no readable sample for the self-check")
    return records, images


def greedy(model, processor, records: list[Record], images: list[Any], tokens: int) -> list[str]:
    texts = [prompts.generation_prompt(processor.tokenizer, prompts.prompt_and_reference(r)[0]) for r in records]
    return answer(model, processor, texts, images, GenerationSettings(max_new_tokens=tokens))


def load_plain(folder: Path, device: str, compute_dtype):
    """MERGED_DIR as any user loads it: plain transformers, no code of ours."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from .modeling import quiet_transformers

    with quiet_transformers():  # cast while loading: no second copy of the weights
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=compute_dtype)
    return model.to(device).eval(), AutoProcessor.from_pretrained(folder)


def self_check(expected: list[str], got: list[str], records: list[Record], dtype: str) -> dict[str, Any]:
    """Compare answers; print the differing ones. Raises in float32, where the merge must be exact."""
    pairs = [{"id": r.id, "base+adapter": e, "merged": g} for r, e, g in zip(records, expected, got)]
    equal = sum(e == g for e, g in zip(expected, got))
    result = {"samples": len(pairs), "equal": equal, "answers": pairs}
    print(f"self-check: {equal} of {len(pairs)} greedy answers of the merged model equal base + adapter")
    for p in pairs:
        if p["base+adapter"] != p["merged"]:
            print(f"  {p['id']}: base+adapter {p['base+adapter']!r} vs merged {p['merged']!r}")
    if equal < len(pairs):
        if dtype not in HALF:
            raise RuntimeError("the merged model answers differently from base + adapter in float32; "
                               "MERGED_DIR was not written")
        print(f"  (the merged weights are rounded to {dtype}; export with --dtype float32 to compare exactly)")
    return result


def copy_processor(model_dir: Path, folder: Path) -> None:
    """Copy MODEL_DIR's processor files (tokenizer, image processor, chat template) byte for byte: a reloaded
    and re-saved processor is not identical (transformers 5 renames the tokenizer class, for one)."""
    for f in sorted(model_dir.iterdir()):
        weights = f.suffix in (".safetensors", ".bin", ".pt", ".pth") or f.name.endswith(".index.json")
        if f.is_file() and not weights and f.name not in NOT_COPIED and not (folder / f.name).exists():
            shutil.copy2(f, folder / f.name)


def main(cfg: ExportConfig) -> int:
    import torch

    from .modeling import default_device, load_model

    out = Path(cfg.out)
    check_out(out, cfg.overwrite)
    src = adapter_dir(cfg.adapter)
    dtype_name = saved_dtype(cfg.model) if cfg.dtype == "auto" else cfg.dtype
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"{cfg.model}/config.json names dtype {dtype_name!r}, which torch does not have")
    device = cfg.device or default_device()
    records, images = check_inputs(cfg) if cfg.check_samples else ([], [])

    # float32 for the merge: W + BA summed at full precision, rounded once to the saved dtype
    model, processor = load_model(cfg.model, cfg.adapter, dtype="float32", device=device)
    expected = greedy(model, processor, records, images, cfg.check_tokens) if records else []
    layers = len(wrapped_modules(model))
    merged = model.merge_and_unload()  # LoRA folded into its layers; the trained projector replaces the base's
    print(f"merged {layers} LoRA layers and the projector of {src}")
    merged.to(dtype)
    for sub in (merged.config.text_config, merged.config.vision_config):
        sub.dtype = dtype  # loaded in float32 for the merge; the saved config must name what is on disk

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        layout.save_model(merged, tmp)
        copy_processor(Path(cfg.model), tmp)
        del model, merged, processor
        meta: dict[str, Any] = {"llava_lora_version": __version__, "base_model": str(Path(cfg.model).resolve()),
                                "base_fingerprint": fingerprint(cfg.model), "adapter": str(src.resolve()),
                                "dtype": dtype_name}
        if records:
            plain, plain_processor = load_plain(tmp, device, torch.float32)
            got = greedy(plain, plain_processor, records, images, cfg.check_tokens)
            meta["self_check"] = self_check(expected, got, records, dtype_name)
        if cfg.format == "gguf":  # from the checked folder, so the GGUF files hold what the self-check ran
            meta["gguf"] = [p.name for p in gguf_export.write(tmp, tmp, cfg.gguf_type)]
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        cfglib.save(cfg, tmp / "export.yaml")
        make_readable(tmp)
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out} ({dtype_name}); load it with LlavaForConditionalGeneration.from_pretrained({str(out)!r})")
    return 0
