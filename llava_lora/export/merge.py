"""Fold a trained adapter (LoRA + projector) into a plain checkpoint in the base model's dtype.

    llava-lora export --model MODEL_DIR --adapter RUN_DIR --out MERGED_DIR [--data DATA --split test]

MERGED_DIR is what ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` load
with no code of ours. One copy of the model is loaded, in the dtype MODEL_DIR was saved in (``--dtype`` picks
another), and the adapter is merged into it in place: each LoRA layer's W + scale·B·A is summed in float32 (peft's
merge) and rounded once to that dtype; the trained projector replaces the base's.

The export checks itself on that same model before it writes anything. Always, at the cost of a few rows: for
every LoRA layer, ``CHECK_ROWS`` rows of the merged weight must equal W + scale·B·A computed apart, in float32
and rounded as MERGED_DIR stores it (to within one unit of its last place), and the projector must be the
trained one, exactly; else nothing is written. With ``--check-samples N`` (off by default: at the 4 B size each
sample costs a ~600-token forward before and after the merge), also end to end: on N samples (``--data``'s first
ones, else synthetic shape images) it records the next-token logits of the prompt and a short greedy answer of
base + adapter, merges, and asks again. In float32 that must be exact: logits within 1e-4 of their scale and the
same answers. In half precision the merged weights are rounded once more than base + adapter are, so the logits
move by about that rounding and an answer may differ by a token: both are reported, not fatal, unless the
logits move by more than 5% of their scale. The processor files are copied from MODEL_DIR unchanged.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .. import __version__
from .. import config as cfglib
from ..chat import prompts
from ..config import device_field, field, image_dir_field, split_field
from ..data.records import BadRecord, Record, Turn
from ..errors import RunFailed, UsageError
from ..infer.engine import GenerationSettings, answer_with_logits
from ..kernels import weight_only
from ..model import layout
from ..model.adapters import adapter_dir, fingerprint, weights_fingerprint, wrapped_modules
from ..model.load import load_model
from ..model.parts import llava_of
from ..model.precision import (DTYPES, HALF, WEIGHT_ONLY, DtypeName, checkpoint_dtype, default_device, dtype_name,
                               is_half)
from ..outdirs import OVERWRITE_HELP, check_out, new_folder
from . import gguf

EXPORT_FILE = "export.json"
# Largest next-token logit change the merge may cause, relative to the largest |logit|: float32 must be exact;
# in half precision the merged weights are rounded once more, which moves logits ~1% (bf16 keeps 8 bits).
LOGIT_TOLERANCE = {"float32": 1e-4, "half": 0.05}
CHECK_ROWS = 8  # rows of each LoRA layer's merged weight checked against W + scale·B·A
NOT_COPIED = ("build_report.json",)  # MODEL_DIR's own report; MERGED_DIR gets export.json


@dataclass
class ExportConfig:
    model: str = field(help="MODEL_DIR the adapter was trained on")
    adapter: str = field(help="RUN_DIR (or a checkpoint folder) holding the adapter")
    out: str = field(help="MERGED_DIR to write")
    dtype: DtypeName = field("auto", help=f"dtype of MERGED_DIR (auto: MODEL_DIR's, as saved in its config.json; "
                                          f"{WEIGHT_ONLY}: bfloat16, computed in float32 for the self-check)")
    data: str | None = field(None, help="samples for the self-check; none: synthetic shape images")
    split: str | None = split_field()
    image_dir: str | None = image_dir_field()
    # none by default: at the 4 B size each costs a ~600-token forward before and after the merge (on a CPU without
    # native bf16, ~1 min each); the merge itself is always checked, row by row (CHECK_ROWS)
    check_samples: int = field(0, help="samples of the end-to-end self-check: logits and greedy answers before and "
                                       "after the merge (0: the row-by-row merge check alone)")
    check_tokens: int = field(8, help="greedy tokens per answer in the self-check")
    overwrite: bool = field(False, help=OVERWRITE_HELP)
    format: Literal["safetensors", "gguf"] = field(
        "safetensors", help="gguf: also write llama.cpp/Ollama files (LM, mmproj, Modelfile) into MERGED_DIR")
    gguf_type: Literal[gguf.LM_TYPES] = field("q8_0", help="weight type of the GGUF language model")
    device: str | None = device_field()

    def __post_init__(self) -> None:
        if self.check_samples < 0 or self.check_tokens < 1:
            raise UsageError(f"--check-samples must be >= 0 and --check-tokens >= 1, got {self.check_samples} "
                             f"and {self.check_tokens}")


def self_check_samples(cfg: ExportConfig) -> tuple[list[Record], list[Any]]:
    """(records, images) for the self-check: DATA's first readable samples, or synthetic shape images."""
    if cfg.data is None:
        from ..data import synth

        rng = random.Random(0)
        kinds = list(synth.QUESTIONS)
        records, images = [], []
        for i in range(cfg.check_samples):
            scene = synth.random_scene(rng)
            kind = kinds[i % len(kinds)]
            turns = (Turn("user", "<image>\n" + synth.QUESTIONS[kind]), Turn("assistant", scene.answer(kind)))
            records.append(Record(f"synthetic_{i}", ("synthetic.png",), turns))
            images.append(synth.draw(scene, 64))
        return records, images

    from ..data.records import load_records, resolve_data
    from ..infer.answers import load_image

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


@dataclass
class Probe:
    """What the self-check records of a model: each sample's next-token logits after its prompt, and its answer."""
    logits: Any  # [N, V] float32
    answers: list[str]


def probe(model, processor, records: list[Record], images: list[Any], tokens: int) -> Probe:
    """Greedy answers of ``records`` in one batch, with the first generated step's logits."""
    texts = [prompts.generation_prompt(processor.tokenizer, prompts.prompt_and_reference(r)[0]) for r in records]
    answers, logits = answer_with_logits(model, processor, texts, images, GenerationSettings(max_new_tokens=tokens))
    return Probe(logits, answers)


def self_check(expected: Probe | list[str], got: Probe | list[str], records: list[Record],
               dtype: str) -> dict[str, Any]:
    """Compare base + adapter (``expected``) with the merged model (``got``): next-token logits and greedy answers.
    Prints the differing answers. Raises where the merge cannot be right: in float32 any difference; in half
    precision logits that moved by more than rounding explains."""
    exp_answers = expected.answers if isinstance(expected, Probe) else expected
    got_answers = got.answers if isinstance(got, Probe) else got
    pairs = [{"id": r.id, "base+adapter": e, "merged": g} for r, e, g in zip(records, exp_answers, got_answers)]
    equal = sum(e == g for e, g in zip(exp_answers, got_answers))
    result: dict[str, Any] = {"samples": len(pairs), "equal": equal, "answers": pairs}
    half = is_half(dtype)
    drift = None
    if isinstance(expected, Probe) and isinstance(got, Probe):
        scale = float(expected.logits.abs().max()) or 1.0
        drift = float((expected.logits - got.logits).abs().max()) / scale
        result["logit_drift"] = drift
        print(f"self-check: next-token logits of the merged model differ from base + adapter by at most "
              f"{100 * drift:.3g}% of their largest magnitude")
    print(f"self-check: {equal} of {len(pairs)} greedy answers of the merged model equal base + adapter")
    for p in pairs:
        if p["base+adapter"] != p["merged"]:
            print(f"  {p['id']}: base+adapter {p['base+adapter']!r} vs merged {p['merged']!r}")
    tolerance = LOGIT_TOLERANCE["half" if half else "float32"]
    if drift is not None and not drift <= tolerance:  # a NaN drift too
        raise RuntimeError(f"the merged model's logits moved by {100 * drift:.3g}% (more than {100 * tolerance:g}%) "
                           f"from base + adapter in {dtype}; MERGED_DIR was not written")
    if equal < len(pairs):
        if not half:
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


def planned_merge(model, rows: int = CHECK_ROWS) -> dict[str, tuple[Any, Any]]:
    """Before the merge, what it must give: {module name in the merged model: (row indices, those rows of
    W + scale·B·A in float32)} for every LoRA layer (rows drawn with a fixed seed), and the trained projector's
    tensors under ``multi_modal_projector.*``."""
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(0)
    out: dict[str, tuple[Any, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), torch.nn.Linear) and m.active_adapters:
            key = m.active_adapters[0]
            w = m.get_base_layer().weight
            idx = torch.randperm(w.shape[0], generator=g)[:rows]
            delta = m.lora_B[key].weight[idx].float() @ m.lora_A[key].weight.float() * m.scaling[key]
            out[name.removeprefix("base_model.model.")] = (idx, w[idx].float() + delta)
    for name, p in model.named_parameters():
        if ".multi_modal_projector.modules_to_save." in name:
            merged_name = "model.multi_modal_projector." + name.split(".modules_to_save.")[1].split(".", 1)[1]
            out[merged_name] = (None, p.detach().clone())
    return out


def check_merge(merged, planned: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """The merged model's weights against ``planned_merge``, in the dtype MERGED_DIR stores: each checked LoRA row
    within one unit in the last place of W + scale·B·A rounded to it, the projector equal to the trained one.
    Raises on anything else (a merge that is missing, scaled, transposed or misplaced); returns the summary."""
    state = dict(merged.named_parameters())
    worst, layers, rows = 0.0, 0, 0
    for name, (idx, want) in planned.items():
        got = state[name] if idx is None else merged.get_submodule(name).weight[idx]
        want = want.to(got.dtype)
        if idx is None:
            if not torch.equal(got, want):
                raise RunFailed(f"merge check: {name} is not the trained projector's; MERGED_DIR was not written")
            continue
        layers, rows = layers + 1, max(rows, len(idx))
        ulp = torch.finfo(got.dtype).eps * want.float().abs() + torch.finfo(got.dtype).tiny
        off = float(((got.float() - want.float()).abs() / ulp).max())
        if not off <= 1.0:  # also a NaN
            raise RunFailed(f"merge check: {name}'s merged weight is {off:.3g} units in the last place away from "
                            "W + scale·B·A; MERGED_DIR was not written")
        worst = max(worst, off)
    print(f"merge check: {rows} rows of each of {layers} LoRA layers equal W + scale·B·A (at most "
          f"{worst:.2g} units in the last place), the projector the trained one")
    return {"lora_layers": layers, "rows_each": rows, "max_ulp": worst}


def check_finite_adapter(model, src: Path) -> None:
    """Refuse an adapter holding NaN or inf (a run that diverged): the merge would spread it into MERGED_DIR."""
    bad = [n.removeprefix("base_model.model.") for n, p in model.named_parameters()
           if ("lora_" in n or ".modules_to_save." in n) and not bool(torch.isfinite(p).all())]
    if bad:
        raise RunFailed(f"--adapter {src}: {len(bad)} trained tensors hold NaN or inf (e.g. {bad[0]}): the run "
                        "diverged; MERGED_DIR was not written. Export an earlier checkpoint-N/")


def merge_in_place(model, dtype):
    """The plain LlavaForConditionalGeneration of a peft ``model`` with its adapter folded into the same tensors, in
    ``dtype``: LoRA layers get W + scale·B·A (summed in float32, rounded once to W's dtype), the trained projector
    replaces the base's. No second copy of the weights is made."""
    merged = model.merge_and_unload()
    weight_only.restore(merged, dtype)  # plain modules; a no-op cast unless some came in another dtype
    return merged


def _probe_as_computed(merged, fp32_compute: bool, dtype, *args) -> Probe:
    """The merged model probed in the precision base + adapter was computed in: half weights computed in fp32 where
    base + adapter were (weight_only.py), then plain again."""
    upcast = fp32_compute and dtype in HALF
    if upcast:
        weight_only.apply(merged)
    try:
        return probe(merged, *args)
    finally:
        if upcast:
            weight_only.restore(merged, dtype)


def merge_checked(cfg: ExportConfig, src: Path, dtype, device: str) -> tuple[Any, dict[str, Any]]:
    """(the merged model, its self-check): base + adapter loaded (and probed, with samples), the merge planned, the
    adapter folded in, the merge checked row by row (and the merged model probed on the same samples)."""
    records, images = self_check_samples(cfg) if cfg.check_samples else ([], [])
    model, processor = load_model(cfg.model, cfg.adapter, dtype=cfg.dtype, device=device)
    fp32_compute = weight_only.applied(model) or llava_of(model).get_input_embeddings().weight.dtype == torch.float32
    expected = probe(model, processor, records, images, cfg.check_tokens) if records else None
    check_finite_adapter(model, src)
    planned = planned_merge(model)
    layers = len(wrapped_modules(model))
    merged = merge_in_place(model, dtype)
    del model
    print(f"merged {layers} LoRA layers and the projector of {src} into the {dtype_name(dtype)} weights")
    check: dict[str, Any] = {"merge": check_merge(merged, planned)}
    if records:
        got = _probe_as_computed(merged, fp32_compute, dtype, processor, records, images, cfg.check_tokens)
        check.update(self_check(expected, got, records, dtype_name(dtype)))
    for sub in (merged.config, merged.config.text_config, merged.config.vision_config):
        sub.dtype = dtype  # the saved config must name what is on disk
    return merged, check


def write_folder(cfg: ExportConfig, merged, meta: dict[str, Any], out: Path) -> None:
    """MERGED_DIR: the weights, MODEL_DIR's processor files, export.json (``meta``), export.yaml and the GGUF
    files if asked, written beside ``out`` and moved into place whole."""
    with new_folder(out, cfg.overwrite) as tmp:
        layout.save_model(merged, tmp)
        copy_processor(Path(cfg.model), tmp)
        if cfg.format == "gguf":  # from the checked folder, so the GGUF files hold what the self-check ran
            meta["gguf"] = [p.name for p in gguf.write(tmp, tmp, cfg.gguf_type)]
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        cfglib.save(cfg, tmp / "export.yaml")


def main(cfg: ExportConfig) -> int:
    start = time.perf_counter()
    out = Path(cfg.out)
    check_out(out, cfg.overwrite, inputs={"--model": cfg.model, "--adapter": cfg.adapter, "--data": cfg.data,
                                          "--image-dir": cfg.image_dir})
    if cfg.format == "gguf":  # before the merge, not after it and the safetensors write
        gguf.check_writable(Path(cfg.model), cfg.gguf_type)
    src = adapter_dir(cfg.adapter)
    dtype = checkpoint_dtype(cfg.model) if cfg.dtype == "auto" else DTYPES.get(cfg.dtype, torch.bfloat16)
    merged, check = merge_checked(cfg, src, dtype, cfg.device or default_device())
    meta: dict[str, Any] = {"llava_lora_version": __version__, "base_model": str(Path(cfg.model).resolve()),
                            "base_fingerprint": fingerprint(cfg.model), "base_weights": weights_fingerprint(cfg.model),
                            "adapter": str(src.resolve()),
                            "dtype": dtype_name(dtype)}
    meta["self_check"] = check
    write_folder(cfg, merged, meta, out)
    print(f"wrote {out} ({dtype_name(dtype)}) in {time.perf_counter() - start:.0f} s; load it with "
          f"LlavaForConditionalGeneration.from_pretrained({str(out)!r})")
    return 0
