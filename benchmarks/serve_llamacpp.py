"""llama.cpp parity: the GGUF files of `llava-lora export --format gguf` against transformers, token for token.

    scripts/make_llamacpp_venv.sh                     # once: llama.cpp's own venv, ~15 min on 2 cores
    .venv/bin/python benchmarks/serve_llamacpp.py     # ~3 min on 2 CPU cores (the first run trains a tiny model)
    .venv/bin/python benchmarks/serve_llamacpp.py --gguf-type q8_0     # the language model quantised

Builds, trains and exports a tiny model (benchmarks/serve_common.py; GGUF language model in f16, mmproj f16),
then for N square and N wide (64 x 40) images compares, with transformers run in float32 on MERGED_DIR:
  - the image features llama.cpp's mtmd computes (max |difference| over all values), and
  - greedy tokens (the prompt's text tokens too), through llama-cpp-python's bindings,
on two builds of the same llama.cpp (the sources llama-cpp-python 0.3.36 vendors): as released ("stock"), and
with tools/mtmd/models/llava.cpp concatenating CLIP's class embedding before the patches instead of after
("fixed"), the order clip.cpp and CLIP assume. Not in CI: it needs the venv.

The llama.cpp side runs in that venv (``--worker``, this same file), as it has no torch or transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MARKER = "<__media__>"  # mtmd's default media marker


def worker(job_file: str) -> None:
    """In llama.cpp's venv: features and greedy tokens for each sample of the job."""
    import ctypes

    import numpy as np
    import llama_cpp
    from llama_cpp import mtmd_cpp
    from llama_cpp.llama import Llama

    job = json.loads(Path(job_file).read_text())
    llm = Llama(job["model"], n_ctx=512, n_batch=512, n_threads=2, verbose=False, logits_all=False)
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = 2
    params.print_timings = False
    mctx = mtmd_cpp.mtmd_init_from_file(job["mmproj"].encode(), llm.model, params)
    assert mctx, f"cannot load {job['mmproj']}"
    n_vocab = llm.n_vocab()
    results = []
    for s in job["samples"]:
        data = Path(s["image"]).read_bytes()
        bitmap = mtmd_cpp.mtmd_helper_bitmap_init_from_buf(
            mctx, (ctypes.c_uint8 * len(data)).from_buffer(bytearray(data)), len(data), False)
        text = mtmd_cpp.mtmd_input_text()
        raw = s["prompt"].encode()
        text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), True, True
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        assert mtmd_cpp.mtmd_tokenize(mctx, chunks, ctypes.byref(text),
                                      (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        llm.reset()
        llm._ctx.kv_cache_clear()
        prompt_ids: list = []
        features = None
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                ids = [ptr[j] for j in range(n.value)]
                prompt_ids += ids
                llm.eval(ids)
            else:
                n_tok = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd_cpp.mtmd_encode_chunk(mctx, chunk) == 0
                embd = mtmd_cpp.mtmd_get_output_embd(mctx)
                features = np.ctypeslib.as_array(embd, shape=(n_tok * llm.n_embd(),)).reshape(n_tok, -1).copy()
                prompt_ids.append(f"<image x{n_tok}>")
                new_past = llama_cpp.llama_pos(0)
                assert mtmd_cpp.mtmd_helper_eval_chunk_single(
                    mctx, llm._ctx.ctx, chunk, llama_cpp.llama_pos(llm.n_tokens), llama_cpp.llama_seq_id(0),
                    llm.n_batch, False, ctypes.byref(new_past)) == 0
                llm.n_tokens = new_past.value
        generated = []
        for _ in range(job["tokens"]):  # greedy: argmax of the last position's logits, end-of-turn ignored
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            tok = int(np.argmax(logits))
            generated.append(tok)
            llm.eval([tok])
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
        results.append({"id": s["id"], "prompt_ids": prompt_ids, "generated": generated,
                        "features": features.tolist()})
    mtmd_cpp.mtmd_free(mctx)
    Path(job["out"]).write_text(json.dumps(results))


def run_engine(venv: Path, libs: Path, job: dict, tmp: Path, name: str) -> list[dict]:
    job = {**job, "out": str(tmp / f"{name}-out.json")}
    (tmp / f"{name}.json").write_text(json.dumps(job))
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(libs), "MTMD_CPP_LIB": str(libs), "LD_LIBRARY_PATH": str(libs)}
    done = subprocess.run([str(venv / "bin" / "python"), __file__, "--worker", str(tmp / f"{name}.json")], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp ({name}) failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(Path(job["out"]).read_text())


def hf_side(merged: Path, batch, tokens: int):
    """transformers' prompt ids (image run collapsed), image features and greedy tokens, in float32."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from serve_common import reference

    processor = AutoProcessor.from_pretrained(merged)
    model = LlavaForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
    image_id = model.config.image_token_id
    out = []
    for s in batch:
        inputs = processor(text=s.prompt, images=Image.open(s.image).convert("RGB"), return_tensors="pt")
        ids, collapsed = inputs["input_ids"][0].tolist(), []
        for t in ids:
            if t != image_id:
                collapsed.append(t)
            elif not collapsed or not str(collapsed[-1]).startswith("<image"):
                collapsed.append(f"<image x{ids.count(image_id)}>")
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        out.append({"prompt_ids": collapsed, "features": feats.numpy()})
    generated, _ = reference(merged, batch, tokens)
    for o, g in zip(out, generated):
        o["generated"] = g
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=Path(".venvs/llamacpp"), help="made by scripts/make_llamacpp_venv.sh")
    ap.add_argument("--work", type=Path, default=None, help="keep the model here (default: a temporary folder)")
    ap.add_argument("--samples", type=int, default=3, help="images of each shape")
    ap.add_argument("--tokens", type=int, default=8, help="greedy tokens per answer")
    ap.add_argument("--gguf-type", default="f16", choices=["f16", "bf16", "q8_0"], help="of the language model")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)

    import numpy as np

    from serve_common import agreement, prepare, samples

    venv = args.venv.resolve()
    for d in ("lib-stock", "lib-fixed"):
        if not (venv / d / "libmtmd.so").exists():
            raise SystemExit(f"{venv / d}: no llama.cpp build; run scripts/make_llamacpp_venv.sh first")
    with tempfile.TemporaryDirectory(prefix="serve-llamacpp-") as tmp_name:
        tmp = Path(tmp_name)
        work = prepare(args.work or tmp / "work")
        lm = work.merged / "model-f16.gguf"
        if args.gguf_type != "f16":  # the same MERGED_DIR, its language model written in another type
            from llava_lora.export import gguf as gguf_export

            lm = tmp / gguf_export.lm_file(args.gguf_type)
            gguf_export.write_lm(work.merged, lm, args.gguf_type)
        rows = []
        for shape in ("square", "wide"):
            batch = samples(work, args.samples, tmp / "images", shape)
            want = hf_side(work.merged, batch, args.tokens)
            job = {"model": str(lm), "mmproj": str(work.merged / "mmproj-f16.gguf"),
                   "tokens": args.tokens, "samples": [{"id": s.id, "prompt": s.prompt.replace("<image>", MARKER),
                                                       "image": str(s.image)} for s in batch]}
            for variant in ("stock", "fixed"):
                got = run_engine(venv, venv / f"lib-{variant}", job, tmp, f"{shape}-{variant}")
                prompt_equal = sum(w["prompt_ids"] == g["prompt_ids"] for w, g in zip(want, got))
                diff = max(float(np.abs(np.asarray(g["features"]) - w["features"]).max()) for w, g in zip(want, got))
                rows.append((variant, shape, prompt_equal, diff,
                             agreement([w["generated"] for w in want], [g["generated"] for g in got])))
        print(f"llama.cpp (llama-cpp-python 0.3.36 sources) vs transformers float32: {args.samples} images per "
              f"shape, {args.tokens} greedy tokens, GGUF {args.gguf_type} language model + f16 mmproj")
        for variant, shape, prompt_equal, diff, agree in rows:
            print(f"  {variant:5s} {shape:6s}  prompt tokens equal {prompt_equal}/{args.samples}  "
                  f"image features max|diff| {diff:.2e}  {agree}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
