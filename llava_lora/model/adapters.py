"""LoRA on the language model, the projector trained in full, and the adapter files of RUN_DIR.

The adapter is a plain peft folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
``PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(MODEL_DIR), RUN_DIR)`` loads; it
carries the LoRA matrices and the whole projector (peft's ``modules_to_save``). ``run.json`` beside it
names the base model with fingerprints of its config and of a sample of its weights, so an adapter is never
attached to another base (``check_base``), nor to the MERGED_DIR it was folded into.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

from .. import __version__
from ..errors import UsageError
from ..outdirs import new_folder

# The language model's layers only: CLIP's attention also has q_proj/v_proj, which must stay untouched.
LANGUAGE_MODEL_SCOPE = r"model\.language_model\..*"
VISION_SCOPE = r"model\.vision_tower\..*"
VISION_PREFIX = "vision_tower."  # a --lora-target entry that asks for LoRA in the vision tower, by name
PROJECTOR = "multi_modal_projector"
RUN_FILE = "run.json"
PRESETS = ("attention", "all-linear")


def lora_target_regex(names: list[str], vision_names: list[str] = ()) -> str:
    """A peft ``target_modules`` regex matching ``names`` inside the language model alone (and ``vision_names``
    inside the vision tower, when asked for)."""
    scoped = [rf"{LANGUAGE_MODEL_SCOPE}\.({'|'.join(sorted(set(names)))})"] if names else []
    if vision_names:
        scoped.append(rf"{VISION_SCOPE}\.({'|'.join(sorted(set(vision_names)))})")
    return scoped[0] if len(scoped) == 1 else "(" + "|".join(scoped) + ")"


def linear_names(module) -> dict[str, bool]:
    """Leaf names of the ``nn.Linear`` layers inside ``module`` -> whether they sit in an attention block."""
    import torch

    out: dict[str, bool] = {}
    for path, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            leaf = path.rsplit(".", 1)[-1]
            out[leaf] = out.get(leaf, False) or any("attn" in part or "attention" in part
                                                   for part in path.split(".")[:-1])
    return out


def resolve_targets(model, targets: list[str]) -> tuple[list[str], list[str]]:
    """(language-model names, vision-tower names) that ``--lora-target`` asks for: explicit names, or the presets
    ``attention`` (the LM's attention projections) and ``all-linear`` (every linear layer of the LM, as QLoRA
    recipes use). The vision tower only by name (``vision_tower.q_proj``). A name that matches nothing is refused,
    naming the layers there are."""
    lm = linear_names(model.model.language_model)
    vision = linear_names(model.model.vision_tower)
    lm_names, vision_names = [], []
    for t in targets:
        if t == "attention":
            lm_names += [n for n, in_attn in lm.items() if in_attn]
        elif t == "all-linear":
            lm_names += list(lm)
        elif t.startswith(VISION_PREFIX):
            name = t.removeprefix(VISION_PREFIX)
            if name not in vision:
                raise UsageError(f"--lora-target {t}: the vision tower has no linear layer '{name}'; its linear "
                                 f"layers are {', '.join(sorted(vision))}")
            vision_names.append(name)
        elif t in lm:
            lm_names.append(t)
        else:
            raise UsageError(f"--lora-target {t}: the language model has no linear layer '{t}'; its linear layers "
                             f"are {', '.join(sorted(lm))} (or a preset: {', '.join(PRESETS)}; the vision tower's "
                             f"as {VISION_PREFIX}NAME)")
    return sorted(set(lm_names)), sorted(set(vision_names))


def apply_lora(model, r: int, alpha: int, dropout: float, targets: list[str], train_projector: bool = True):
    """Wrap ``model`` (LlavaForConditionalGeneration) in a peft LoRA model; everything else is frozen.

    ``r == 0`` trains the projector alone (LLaVA's stage 1). peft needs one LoRA target, so a frozen rank-1 LoRA
    on the first attention projection of the LM stands in: its B matrix starts at zero and never trains, which
    makes it an exact no-op, and the folder still loads with plain peft.
    """
    from peft import LoraConfig, get_peft_model

    if r == 0:
        if not train_projector:
            raise UsageError("--lora-r 0 with --no-train-projector would train nothing")
        first = next(iter(n for n, attn in linear_names(model.model.language_model).items() if attn))
        lora = LoraConfig(r=1, lora_alpha=1, target_modules=rf"model\.language_model\.layers\.0\..*\.{first}",
                          modules_to_save=[PROJECTOR], bias="none")
        peft_model = get_peft_model(model, lora)
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(False)
        peft_model.lora_stand_in = True  # param_stats counts its LoRA as not trained
        return peft_model
    lm_names, vision_names = resolve_targets(model, targets)
    if not lm_names and not vision_names:
        raise UsageError("--lora-target: no layer asked for")
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_regex(lm_names,
                                                                                                   vision_names),
                      modules_to_save=[PROJECTOR] if train_projector else None, bias="none")
    return get_peft_model(model, lora)


def lora_inputs_in_compute_dtype(peft_model) -> int:
    """Let LoRA layers take their input in the half-precision compute dtype, as it comes, when training runs under
    autocast. peft casts it to the fp32 masters' dtype first, and autocast casts it straight back for the LoRA
    matmul: the same numbers, for two passes over the activations in each direction (of every targeted layer).
    Returns the layers changed. Only for a model run under autocast (without it, fp32 weights meet bf16 inputs)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False  # peft's switch (peft.helpers.disable_input_dtype_casting)
    return len(layers)


def init_from(peft_model, run: str | Path, model_dir: str | Path) -> dict[str, int]:
    """Load another run's trained weights (RUN_DIR or a checkpoint of it) into a fresh peft model: the projector,
    and the LoRA matrices when both runs place LoRA alike. Returns the tensors loaded per kind."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    src = adapter_dir(run)
    check_base(src, model_dir, "--init-from")
    theirs = load_file(src / "adapter_model.safetensors")
    mine = get_peft_model_state_dict(peft_model)
    source_r = json.loads((src / RUN_FILE).read_text()).get("lora_r") if (src / RUN_FILE).is_file() else None
    projector = {k: v for k, v in theirs.items() if PROJECTOR in k}
    lora = {k: v for k, v in theirs.items() if PROJECTOR not in k} if source_r != 0 else {}  # r=0: a no-op stand-in
    misfit = [k for k, v in {**projector, **lora}.items() if k not in mine or mine[k].shape != v.shape]
    if misfit:
        raise UsageError(f"--init-from {run}: {len(misfit)} of its tensors do not fit this run's model (e.g. "
                         f"{misfit[0]}); LoRA is taken over only with the same --lora-r and --lora-target")
    if projector and not any(PROJECTOR in k for k in mine):
        raise UsageError(f"--init-from {run} holds a trained projector, which this run does not train "
                         "(--no-train-projector)")
    set_peft_model_state_dict(peft_model, {**projector, **lora})
    return {"projector": len(projector), "lora": len(lora)}


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


def weights_fingerprint(model_dir: str | Path) -> str | None:
    """A hash of a sample of MODEL_DIR's weights: the first row of every tensor, as stored, whatever its key (two
    bases of one architecture differ here where their configs are equal; MODEL_DIR's older key layout does not)."""
    import torch
    from safetensors import safe_open

    rows = []
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for key in s.keys():
                part = s.get_slice(key)
                row = part[0:1] if len(part.get_shape()) else part[:]
                rows.append(hashlib.sha256(row.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).digest())
    return hashlib.sha256(b"".join(sorted(rows))).hexdigest()[:16] if rows else None


def check_base(src: Path, model_dir: str | Path, flag: str = "--adapter") -> None:
    """Refuse the adapter in ``src`` for MODEL_DIR where it was made for another base (its run.json's config and
    weights fingerprints), or where MODEL_DIR is the MERGED_DIR this very run was folded into (export.json):
    the LoRA would count twice. Without a run.json there is nothing to check against: said, not refused."""
    merged = Path(model_dir) / "export.json"
    if merged.is_file():
        folded = json.loads(merged.read_text()).get("adapter")
        if folded and _run_root(Path(folded)) == _run_root(src):
            raise UsageError(f"--model {model_dir} is a MERGED_DIR that {flag} {src} is already folded into (its "
                             f"export.json); applying it again would count the LoRA twice. Give the base "
                             f"{json.loads(merged.read_text()).get('base_model')} instead")
    if not (src / RUN_FILE).is_file():
        print(f"note: {flag} {src} has no {RUN_FILE}: that it was trained on {model_dir} cannot be checked",
              file=sys.stderr)
        return
    meta = json.loads((src / RUN_FILE).read_text())
    if meta.get("base_fingerprint") not in (None, fingerprint(model_dir)):
        raise UsageError(f"{flag} {src} was trained on {meta.get('base_model')}, a different base model than "
                         f"{model_dir} (their configs differ)")
    if meta.get("base_weights") not in (None, weights_fingerprint(model_dir)):
        raise UsageError(f"{flag} {src} was trained on {meta.get('base_model')}, a different base model than "
                         f"{model_dir} (the same config, other weights)")


def _run_root(path: Path) -> Path:
    """RUN_DIR of a RUN_DIR or of one of its checkpoint-N/ folders."""
    path = path.resolve()
    return path.parent if path.name.startswith("checkpoint-") else path


def save_adapter(peft_model, out: Path, model_dir: str | Path, extra: dict | None = None,
                 state_dict: dict | None = None) -> None:
    """Write the adapter files into ``out``, each replaced atomically (a reader never sees half a file);
    ``state_dict``: the trained weights gathered whole, where the model holds only its shards (FSDP)."""
    with new_folder(out, overwrite=False, label="adapter", into=True) as tmp:
        peft_model.save_pretrained(tmp, state_dict=state_dict)
        meta = {"llava_lora_version": __version__, "base_model": str(Path(model_dir).resolve()),
                "base_fingerprint": fingerprint(model_dir), "base_weights": weights_fingerprint(model_dir),
                **(extra or {})}
        (tmp / RUN_FILE).write_text(json.dumps(meta, indent=2))


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
    check_base(src, model_dir)
    meta = json.loads((src / RUN_FILE).read_text()) if (src / RUN_FILE).is_file() else {}
    try:
        peft_model = PeftModel.from_pretrained(model, src)
        peft_model.lora_stand_in = meta.get("lora_r") == 0
        return peft_model
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f"--adapter {adapter} does not fit {model_dir}: {str(e).splitlines()[0]}") from None


def adapter_switch(model, enabled: bool):
    """Context in which a peft model answers with (``enabled``) or without its adapter."""
    if enabled or not hasattr(model, "disable_adapter"):
        return contextlib.nullcontext()
    return model.disable_adapter()
