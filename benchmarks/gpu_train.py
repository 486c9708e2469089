"""Training throughput of the real-size LLaVA (Qwen1.5-4B + CLIP-L/14-336) on one GPU: samples/s, MFU, peak memory.

    .venv/bin/python benchmarks/gpu_train.py                     # ~1-2 min on one H200: GC on, then GC off
    .venv/bin/python benchmarks/gpu_train.py --gc on --json out.json
    .venv/bin/python benchmarks/gpu_train.py --plan              # no GPU needed: parameter and FLOP counts only
    .venv/bin/python benchmarks/gpu_train.py --shape tiny --device cpu --steps 2 --warmup 1   # the code path, on CPU

Model: the architecture of Qwen1.5-4B (hidden 2560, 40 layers, 20 heads and 20 KV heads, intermediate 6912, vocab
151,936, untied lm_head, rope theta 5e6) composed with CLIP-L/14-336 (hidden 1024, 24 layers, 16 heads,
intermediate 4096, 576 patches + CLS) and the LLaVA projector (1024 -> 2560, gelu, 2560 -> 2560), as
``llava-lora build`` composes them: feature layer -2, 'default' strategy, ``<image>`` = id 151646. Random weights:
the model is constructed on the ``meta`` device in bf16 (no memory, no download), materialised on the GPU with
``to_empty`` and initialised by transformers' own ``init_weights`` (normal(0, 0.02) linears and embeddings, unit
norms, zero biases; it also refills the non-persistent buffers ``to_empty`` leaves as garbage: rotary ``inv_freq``
and CLIP's ``position_ids``).

Training step: the one of ``llava-lora train`` on a GPU. bf16 frozen weights, LoRA r=4 / alpha 8 / dropout 0.05 on
the language model's q_proj/v_proj (``llava_lora.model.adapters.apply_lora``), the projector trained in full, fp32
master copies of what is trained, AdamW with train's two parameter groups, bf16 autocast, ``llava_lora.model.loss.
LlavaLoss`` (vision tower under no_grad, lm_head on supervised positions only), gradient clipping at 0.3, and
gradient checkpointing of the language model enabled the way train enables it, and train's fast-path helpers:
``train._model_inputs`` (a right-padded batch goes without its attention mask, so the kernels take their causal
path) and ``train/runtime.resolve_fused_loss`` (Liger's fused lm_head + loss, ``--fused-loss``, auto: where liger-kernel
is installed on a GPU); the report says whether the fused loss was in play. One process,
so no DDP wrapper; autocast is ``torch.autocast`` directly, which is what accelerate's bf16 mode amounts to on one
GPU. The model is built afresh for each GC setting, so each peak is its own.

Batch: ``--batch-size`` (6) synthetic CC3M-like samples, fixed across steps (the data pipeline is not measured):
5 prompt tokens, 576 image tokens, 10 more prompt tokens, a caption of 10-30 tokens plus its end-of-turn token
(supervised), one trailing token; right-padded as train's Collator pads; random pixels [B, 3, 336, 336].

Numbers: ``--warmup`` untimed steps, then ``--steps`` timed ones between two ``torch.cuda.synchronize()``;
samples/s and tokens/s (real tokens); peak memory = ``torch.cuda.max_memory_allocated`` over the steps (weights,
optimizer state and activations; the reserved peak is printed beside it, the CUDA context is in neither), in GiB.
MFU = model FLOPs per step / step time / the bf16 matmul FLOP/s measured here on an 8192^3 matmul (measured, not
the spec sheet's number). Model FLOPs are what the step needs (``workloads.step_flops``); hardware FLOPs add what the
code also executes: padded positions, the vision tower's last layer (its output is never used), and with gradient
checkpointing the recomputed forward of the language model. MFU is reported on model FLOPs, HFU on hardware FLOPs.

Targets (real shape on a GPU; PASS/MISS): MFU >= 50% without gradient checkpointing; with it, peak allocated
memory <= 16 GiB at batch 6 (the 4B LLaVA trains on a 16 GB card). Missing a target does not change the exit
status: this is a measurement.

Exit status: 0 when it measured (PASS or MISS), and 0 also when the real run has no CUDA GPU: it then prints one
line saying so, measures nothing and writes no JSON (an honest skip, so a CPU-only CI job running every benchmark
stays green without pretending to have numbers). 1 when a training loss came out non-finite. 2 on a usage error
(bad flags, ``--shape real --device cpu``, flash_attention_2 without the flash_attn package, ``--fused-loss on``
where it cannot run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llava_lora.chat.encode import IGNORE_INDEX
from workloads import step_flops

NO_GPU = ("gpu_train: no CUDA GPU present (torch.cuda.is_available() is False); this benchmark needs one. "
          "Nothing measured.")
GIB = 2 ** 30
MFU_TARGET = 0.50  # without gradient checkpointing
MEMORY_TARGET_GIB = 16.0  # with gradient checkpointing, batch 6

# A CC3M-595K sample after templating: "<|im_start|>user\n" .. <image>x576 .. "\nProvide a brief description of the
# given image.<|im_end|>\n<|im_start|>assistant\n" | caption <|im_end|> | "\n"
PROMPT_BEFORE_IMAGE = 5
PROMPT_AFTER_IMAGE = 10
CAPTION_TOKENS = (10, 30)  # inclusive range; each caption is followed by its supervised end-of-turn token
TRAILING_TOKENS = 1  # the "\n" after <|im_end|>, not supervised


@dataclass(frozen=True)
class Shape:
    """Language model (Qwen2 architecture) + CLIP vision tower + the token ids the synthetic batch uses."""
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int
    v_image: int
    v_patch: int
    v_hidden: int
    v_layers: int
    v_heads: int
    v_intermediate: int
    v_projection: int
    image_token_id: int  # <image>: the first id after the tokenizer's own (Qwen pads its vocab beyond them)
    pad_id: int  # <|endoftext|>, what `llava-lora build` pads with
    end_id: int  # <|im_end|>
    text_ids: int  # ordinary tokens are drawn from [0, text_ids)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def patches(self) -> int:
        return (self.v_image // self.v_patch) ** 2  # image tokens per image ('default' strategy drops CLS)


REAL = Shape("real", vocab=151936, hidden=2560, layers=40, heads=20, kv_heads=20, intermediate=6912,
             max_positions=32768, v_image=336, v_patch=14, v_hidden=1024, v_layers=24, v_heads=16,
             v_intermediate=4096, v_projection=768, image_token_id=151646, pad_id=151643, end_id=151645,
             text_ids=151643)
TINY = Shape("tiny", vocab=1024, hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, max_positions=2048,
             v_image=32, v_patch=8, v_hidden=32, v_layers=2, v_heads=2, v_intermediate=64, v_projection=16,
             image_token_id=1000, pad_id=1001, end_id=1002, text_ids=1000)
SHAPES = {"real": REAL, "tiny": TINY}
VISION_FEATURE_LAYER = -2  # llava-lora build's default
LORA = dict(r=4, alpha=8, dropout=0.05, targets=["q_proj", "v_proj"], train_projector=True)  # train's defaults
LEARNING_RATE = 1e-3
MAX_GRAD_NORM = 0.3


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------

def llava_config(s: Shape, attn: str):
    """The LlavaConfig `llava-lora build` would write for these two models."""
    from transformers import CLIPVisionConfig, LlavaConfig, Qwen2Config

    text = Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                       num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate,
                       max_position_embeddings=s.max_positions, rope_theta=5e6, rms_norm_eps=1e-6,
                       hidden_act="silu", tie_word_embeddings=False, initializer_range=0.02,
                       bos_token_id=s.pad_id, eos_token_id=s.end_id)
    vision = CLIPVisionConfig(hidden_size=s.v_hidden, intermediate_size=s.v_intermediate,
                              num_hidden_layers=s.v_layers, num_attention_heads=s.v_heads, image_size=s.v_image,
                              patch_size=s.v_patch, projection_dim=s.v_projection, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=s.image_token_id,
                       image_seq_length=s.patches, vision_feature_layer=VISION_FEATURE_LAYER,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=False, attn_implementation=attn)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def meta_model(config, dtype: torch.dtype):
    """LlavaForConditionalGeneration on the meta device: shapes and dtypes, no memory. Buffers that are computed
    in float32 on purpose (rotary inv_freq) keep it, as from_pretrained(dtype=...) would leave them."""
    from transformers import LlavaForConditionalGeneration

    with default_dtype(dtype), torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def materialise(model, device: str, seed: int):
    """Allocate the meta model on ``device`` and initialise it deterministically with transformers' own init,
    which also recomputes the non-persistent buffers (rotary inv_freq, CLIP position_ids)."""
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()  # outside the meta context, so it really initialises
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on meta after materialising: {left[:3]}")
    rotary = model.model.language_model.rotary_emb
    expected, _ = rotary.compute_default_rope_parameters(model.config.text_config)
    if not torch.allclose(rotary.inv_freq.float().cpu(), expected):
        raise RuntimeError("rotary inv_freq was not re-initialised after to_empty")
    ids = model.model.vision_tower.embeddings.position_ids
    if not torch.equal(ids.cpu(), torch.arange(ids.shape[-1]).expand(1, -1)):
        raise RuntimeError("CLIP position_ids were not re-initialised after to_empty")
    return model


def train_config(gc_on: bool):
    """The seed's LoRA settings as train's own config (its wrap_for_training and make_optimizer take it)."""
    from llava_lora.train.config import TrainConfig

    return TrainConfig(model="(built in memory)", data="(synthetic)", out="(none)", lora_r=LORA["r"],
                       lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], lora_target=LORA["targets"],
                       train_projector=LORA["train_projector"], learning_rate=LEARNING_RATE,
                       gradient_checkpointing=gc_on)


def wrap_for_training(model, gc_on: bool):
    """train's own wrapping (gradient checkpointing, LoRA + projector, fp32 masters) with the seed's settings."""
    from llava_lora.train import loop as train

    return train.wrap_for_training(model, train_config(gc_on))


def param_counts(peft_model) -> dict:
    """Parameters per part of the base model (peft's wrappers and trained copies not double counted) and the
    names of the trainable ones."""
    base = peft_model.get_base_model()

    def count(module) -> int:
        return sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n and "modules_to_save" not in n)

    parts = {"language_model": count(base.model.language_model), "lm_head": count(base.lm_head),
             "vision_tower": count(base.model.vision_tower), "projector": count(base.model.multi_modal_projector)}
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    return {**parts, "total": sum(parts.values()),
            "trainable": sum(p.numel() for _, p in trainable),
            "trainable_lora": sum(p.numel() for n, p in trainable if "lora_" in n),
            "trainable_names": [n for n, _ in trainable]}


# --------------------------------------------------------------------------------------------------------
# The batch and its FLOPs
# --------------------------------------------------------------------------------------------------------

def synthetic_batch(s: Shape, batch_size: int, seed: int) -> dict:
    """A right-padded batch of CC3M-like samples, as train's Collator makes it (CPU tensors)::

        input_ids      [B, T] int64   5 prompt ids, 576 x <image>, 10 prompt ids, caption, <|im_end|>, 1 id, pads
        attention_mask [B, T] int64   1 on real tokens
        labels         [B, T] int64   caption + <|im_end|>; -100 elsewhere
        pixel_values   [B, 3, 336, 336] float32
    """
    g = torch.Generator().manual_seed(seed)
    captions = torch.randint(CAPTION_TOKENS[0], CAPTION_TOKENS[1] + 1, (batch_size,), generator=g).tolist()
    rows, label_rows = [], []
    for c in captions:
        def text(n: int) -> list[int]:
            return torch.randint(0, s.text_ids, (n,), generator=g).tolist()
        prompt = text(PROMPT_BEFORE_IMAGE) + [s.image_token_id] * s.patches + text(PROMPT_AFTER_IMAGE)
        answer = text(c) + [s.end_id]
        ids = prompt + answer + text(TRAILING_TOKENS)
        rows.append(ids)
        label_rows.append([IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * TRAILING_TOKENS)
    width = max(len(r) for r in rows)
    input_ids = torch.full((batch_size, width), s.pad_id, dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, label_rows)):
        input_ids[i, :len(ids)], labels[i, :len(ids)], mask[i, :len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
    pixels = torch.randn(batch_size, 3, s.v_image, s.v_image, generator=g)
    supervised = int((labels[:, 1:] != IGNORE_INDEX).sum())  # positions whose next token is supervised
    return {"tensors": {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels},
            "lengths": [len(r) for r in rows], "padded_length": width, "supervised_tokens": supervised,
            "images": batch_size, "image_tokens": s.patches}


def flops_for(s: Shape, batch: dict, gc_on: bool) -> dict[str, dict[str, int]]:
    """Model FLOPs (what the step needs) and hardware FLOPs (what the code runs) of one step on ``batch``."""
    config = llava_config(s, "sdpa")
    model = step_flops(config, batch["lengths"], batch["supervised_tokens"], batch["images"], LORA["r"])
    hardware = step_flops(config, [batch["padded_length"]] * len(batch["lengths"]), batch["supervised_tokens"],
                          batch["images"], LORA["r"], vision_layers=s.v_layers, recompute=gc_on)
    return {"model": model, "hardware": hardware}


# --------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------

def fast_path(fused_choice: str, device: str) -> dict:
    """train's fast-path helpers: whether the fused loss runs, and how train moves a batch to the device.
    Raises llava_lora.errors.UsageError for ``--fused-loss on`` where it cannot run."""
    from llava_lora.train import loop as train

    return {"fused_loss": train.resolve_fused_loss(fused_choice, device), "model_inputs": train._model_inputs}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, size: int, reps: int = 50, trials: int = 3) -> float:
    """FLOP/s of a square matmul, the best of ``trials`` runs of ``reps`` after a warm-up."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    c = torch.empty_like(a)
    for _ in range(min(reps, 10)):
        torch.matmul(a, b, out=c)
    sync(device)
    best = math.inf
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del a, b, c
    return 2 * size ** 3 * reps / best


def run_setting(s: Shape, config, batch: dict, gc_on: bool, device: str, steps: int, warmup: int,
                seed: int, fast: dict) -> tuple[dict, dict]:
    """Build, wrap and train for warmup + steps; return the measurements and the parameter counts."""
    from llava_lora.model.loss import LlavaLoss
    from llava_lora.train.optim import make_optimizer

    # as model/load.load_for_training on cuda; the --device cpu run is an fp32 check of the code path (train itself runs bf16
    # on a CPU since issue 11)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        start_bytes = torch.cuda.memory_allocated()  # left by an earlier setting: should be ~0
        if start_bytes > 2 ** 28:
            print(f"gpu_train: warning: {start_bytes / GIB:.2f} GiB still allocated from before this setting; its "
                  "peak memory includes it")
    t0 = time.perf_counter()
    model = materialise(meta_model(config, dtype), device, seed)
    peft_model = wrap_for_training(model, gc_on)
    params = param_counts(peft_model)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(peft_model, train_config(gc_on))  # train's two AdamW groups
    loss_module = LlavaLoss(peft_model, fast["fused_loss"]).train()
    inputs = fast["model_inputs"](batch["tensors"], device)  # as train moves a batch: no mask when right-padded
    n_supervised = batch["supervised_tokens"]

    def autocast():  # bf16 autocast on cuda (accelerate's bf16 mode); the cpu check runs fp32 without autocast
        return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    sync(device)
    build_s = time.perf_counter() - t0
    if device == "cuda":
        weights_bytes = torch.cuda.memory_allocated() - start_bytes  # + the batch's 8 MB of pixels
        torch.cuda.reset_peak_memory_stats()

    def step() -> torch.Tensor:
        with autocast():
            loss_sum, _ = loss_module(**inputs)
            loss = loss_sum / n_supervised  # token mean, as train's loss over the global batch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses = [step() for _ in range(warmup)]
    sync(device)
    t0 = time.perf_counter()
    losses += [step() for _ in range(steps)]
    sync(device)
    elapsed = time.perf_counter() - t0
    out = {"gc": gc_on, "fused_loss": fast["fused_loss"], "attention_mask": inputs["attention_mask"] is not None,
           "build_s": build_s, "step_s": elapsed / steps,
           "samples_per_s": batch["images"] * steps / elapsed,
           "tokens_per_s": sum(batch["lengths"]) * steps / elapsed,
           "losses": [float(x) for x in losses]}
    if device == "cuda":
        out.update(start_bytes=start_bytes, weights_bytes=weights_bytes,
                   peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved())
    return out, params  # the model goes with this frame; the next setting collects and empties the cache first


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------

def _si(x: float, unit: str = "") -> str:
    """FLOPs and FLOP/s of any size: 50.46 TFLOP, 2.16 GFLOP/s."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:,.2f} {prefix}{unit}"
    return f"{x:,.0f} {unit}".rstrip()


def _count(n: int) -> str:
    """Parameter counts: 3.950B, 9.18M, 6.3k."""
    for factor, suffix, digits in ((1e9, "B", 3), (1e6, "M", 2), (1e3, "k", 1)):
        if n >= factor:
            return f"{n / factor:.{digits}f}{suffix}"
    return str(n)


def print_plan(s: Shape, params: dict, batch: dict, flops: dict[bool, dict]) -> None:
    lm = params["language_model"] + params["lm_head"]
    print(f"shape {s.name}: language model {_count(params['language_model'])} + lm_head {_count(params['lm_head'])} "
          f"= {_count(lm)} parameters, vision tower {_count(params['vision_tower'])}, projector "
          f"{_count(params['projector'])}; total {_count(params['total'])}; trainable {_count(params['trainable'])} "
          f"(LoRA {_count(params['trainable_lora'])} in {sum('lora_A' in n for n in params['trainable_names'])} "
          "modules + the projector)")
    print(f"batch of {batch['images']}: {sum(batch['lengths'])} tokens (lengths {min(batch['lengths'])}-"
          f"{max(batch['lengths'])}, padded to {batch['padded_length']}; {batch['image_tokens']} image tokens each), "
          f"{batch['supervised_tokens']} supervised")
    model = flops[next(iter(flops))]["model"]
    terms = ", ".join(f"{k} {_si(v)}" for k, v in model.items() if k != "total" and v)
    print(f"model FLOPs per step {_si(model['total'], 'FLOP')}: {terms}")
    for gc_on, f in flops.items():
        print(f"hardware FLOPs per step, GC {'on' if gc_on else 'off'}: {_si(f['hardware']['total'], 'FLOP')}"
              + (f" (recomputed forward {_si(f['hardware']['gc_recompute_forward'])})" if gc_on else ""))


def print_runs(runs: list[dict]) -> None:
    from llava_lora.tables import format_table

    rows = []
    for r in runs:
        row = {"GC": "on" if r["gc"] else "off", "samples/s": round(r["samples_per_s"], 2),
               "tokens/s": round(r["tokens_per_s"]), "ms/step": round(r["step_s"] * 1e3, 1),
               "MFU": f"{r['mfu']:.1%}", "HFU": f"{r['hfu']:.1%}",
               "peak alloc GiB": f"{r['peak_allocated_bytes'] / GIB:.2f}" if "peak_allocated_bytes" in r else "-",
               "peak reserved GiB": f"{r['peak_reserved_bytes'] / GIB:.2f}" if "peak_reserved_bytes" in r else "-",
               "weights GiB": f"{r['weights_bytes'] / GIB:.2f}" if "weights_bytes" in r else "-",
               "loss first -> last": f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}",
               "build s": f"{r['build_s']:.1f}"}
        rows.append(row)
    print(format_table(rows, list(rows[0])))
    print("MFU on model FLOPs, HFU on hardware FLOPs (padding, the unused last vision layer and the GC recompute "
          "added), both against the measured matmul peak.")


def judge(s: Shape, device: str, runs: list[dict]) -> list[dict]:
    judged = s.name == "real" and device == "cuda"
    by_gc = {r["gc"]: r for r in runs}

    def status(ok: bool | None) -> str:
        return "n/a" if not judged else ("not run" if ok is None else ("PASS" if ok else "MISS"))

    off, on = by_gc.get(False), by_gc.get(True)
    mfu_ok = None if off is None else off["mfu"] >= MFU_TARGET
    mem = on.get("peak_allocated_bytes") if on else None
    mem_ok = None if mem is None else mem / GIB <= MEMORY_TARGET_GIB
    return [{"target": f"MFU >= {MFU_TARGET:.0%} without gradient checkpointing",
             "value": off["mfu"] if off else None, "status": status(mfu_ok)},
            {"target": f"peak allocated memory <= {MEMORY_TARGET_GIB:g} GiB with gradient checkpointing",
             "value": mem / GIB if mem is not None else None, "status": status(mem_ok)}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per setting")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernels, allocator, optimizer state)")
    ap.add_argument("--batch-size", type=int, default=6)
    ap.add_argument("--gc", choices=["both", "on", "off"], default="both", help="gradient checkpointing settings")
    ap.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")
    ap.add_argument("--fused-loss", choices=["auto", "on", "off"], default="auto",
                    help="train's fused lm_head + loss (Liger), where this checkout's train has it")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="real", help="tiny: the same architecture, tiny")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: only with --shape tiny")
    ap.add_argument("--matmul-size", type=int, default=None, help="side of the peak matmul (8192 cuda, 256 cpu)")
    ap.add_argument("--plan", action="store_true", help="only the parameter and FLOP counts (meta device, no GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        ap.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    s = SHAPES[args.shape]
    if not args.plan:
        if args.device == "cpu" and s is REAL:
            ap.error("--shape real --device cpu: the 4B model would take ~17 GB of RAM and minutes per step; "
                     "use --plan for its counts, or --shape tiny to exercise the code path on CPU")
        if args.device == "cuda" and not torch.cuda.is_available():
            print(NO_GPU)
            return 0
        if args.device == "cuda" and not torch.cuda.is_bf16_supported():
            print(f"gpu_train: {torch.cuda.get_device_name()} has no bf16 support; this benchmark measures the bf16 "
                  "training path. Nothing measured.")
            return 0
        if args.attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            ap.error("--attn flash_attention_2 needs the flash_attn package (pip install flash-attn)")

    from llava_lora.errors import UsageError
    try:
        fast = fast_path(args.fused_loss, args.device)
    except UsageError as e:
        ap.error(str(e))

    import transformers
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
    transformers.logging.set_verbosity_error()

    # GC on first: its peak memory is the one judged, so it gets the GPU before anything else was built on it
    settings = {"both": [True, False], "off": [False], "on": [True]}[args.gc]
    config = llava_config(s, args.attn)
    batch = synthetic_batch(s, args.batch_size, args.seed)
    flops = {gc_on: flops_for(s, batch, gc_on) for gc_on in settings}
    result = {"benchmark": "gpu_train", "shape": asdict(s), "attn": args.attn, "fused_loss": fast["fused_loss"],
              "attention_mask_dropped_when_right_padded": True,
              "batch_size": args.batch_size,
              "steps": args.steps, "warmup": args.warmup,
              "lora": {k: v for k, v in LORA.items()}, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "batch": {k: v for k, v in batch.items() if k != "tensors"},
              "flops": {("gc_on" if k else "gc_off"): v for k, v in flops.items()}}

    planned = param_counts(wrap_for_training(meta_model(config, torch.bfloat16), gc_on=False))
    if args.plan:
        result.update(params=planned, measured=False)
        print_plan(s, planned, batch, flops)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")
    size = args.matmul_size or (8192 if device == "cuda" else 256)
    peak = matmul_peak(device, dtype, size, **({} if device == "cuda" else {"reps": 5, "trials": 2}))
    if device == "cuda":
        torch.cuda.empty_cache()  # the matmul's operands leave the cache before any peak is measured
    print(f"gpu_train: shape {s.name} on {device_name} ({device}), {str(dtype).removeprefix('torch.')}, attention "
          f"{args.attn} (no mask: train drops it for right-padded batches), "
          f"fused loss {'on' if fast['fused_loss'] else 'off'}, batch {args.batch_size}, {args.warmup} warm-up + "
          f"{args.steps} timed steps per setting; "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"measured {str(dtype).removeprefix('torch.')} matmul peak ({size}^3): {_si(peak, 'FLOP/s')}")
    print_plan(s, planned, batch, flops)
    result.update(device=device, device_name=device_name, matmul_size=size, matmul_peak_flops=peak, measured=True)

    runs, params = [], None
    for gc_on in settings:
        run, params = run_setting(s, config, batch, gc_on, device, args.steps, args.warmup, args.seed, fast)
        f = flops[gc_on]
        run.update(model_flops=f["model"]["total"], hardware_flops=f["hardware"]["total"],
                   mfu=f["model"]["total"] / run["step_s"] / peak, hfu=f["hardware"]["total"] / run["step_s"] / peak)
        runs.append(run)
        print(f"GC {'on' if gc_on else 'off'}: {run['samples_per_s']:.2f} samples/s, MFU {run['mfu']:.1%}", flush=True)
        if params["trainable_names"] != planned["trainable_names"]:
            raise RuntimeError("the trained model's trainable parameters differ from the planned ones")
    print_runs(runs)
    targets = judge(s, device, runs)
    for t in targets:
        value = "" if t["value"] is None else (f" ({t['value']:.1%})" if "MFU" in t["target"]
                                               else f" ({t['value']:.2f} GiB)")
        print(f"target {t['target']}: {t['status']}{value}")
    finite = all(math.isfinite(x) for r in runs for x in r["losses"])
    if not finite:
        print("gpu_train: a training loss is not finite")
    result.update(params=params, runs=runs, targets=targets, losses_finite=finite)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
