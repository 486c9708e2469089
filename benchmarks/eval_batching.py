"""Eval throughput: greedy answers generated in left-padded batches of 8 against one sample at a time.

    .venv/bin/python benchmarks/eval_batching.py          # ~1.5 min on 2 idle CPU cores; --samples 8 for a quick look

Model: the ``proportional`` shape (benchmarks/shapes/proportional.yaml), random weights built here (no
download): a Qwen2 LM of hidden 512, 8 layers, intermediate 1376, vocab 8192 (rows padded beyond the tiny BPE
tokenizer, as Qwen pads its own), and a CLIP tower of image 336 / patch 14 (576 image tokens), hidden 256,
4 layers, composed by ``llava-lora build``. Samples: synthetic shape questions, one image each, so every prompt
is ~620 tokens and prefill dominates on a CPU. Both runs go through ``answers.predict``, the code path of
``llava-lora eval``, on the same samples, after an untimed warm-up of both (the first call of a shape builds its
kernels). The machine may be shared: the two runs alternate ``--rounds`` times and the fastest time of each
counts. Prints samples/s for both, their ratio (target >= 1.5x) and whether the greedy answers are identical.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

from llava_lora.infer import answers
from llava_lora.data import synth
from llava_lora.data.records import load_records, resolve_data
from llava_lora.infer.engine import GenerationSettings
from llava_lora.model.load import load_model
from workloads import make_model


def timed(model, processor, records, root, settings, batch_size: int) -> tuple[list[str], float]:
    start = time.perf_counter()
    preds, skipped = answers.predict(model, processor, records, root, settings, batch_size, ("base",),
                                      progress=False)
    seconds = time.perf_counter() - start
    assert not skipped
    return [p.answers["base"] for p in preds], seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="samples answered by each run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="a CC3M caption's length")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed runs of each; the fastest counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="eval_batching-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        model_dir = make_model(root, "proportional")
        with contextlib.redirect_stdout(io.StringIO()):
            synth.main(synth.SynthConfig(out=str(root / "data"), n=1, n_test=args.samples + args.batch_size))
        file, image_root = resolve_data(root / "data", "test")
        records = load_records(file)[0]
        warmup, records = records[:args.batch_size], records[args.batch_size:]
        model, processor = load_model(model_dir, device="cpu")
        print(f"built the proportional model in {time.perf_counter() - t0:.1f} s; {model.config.image_seq_length} "
              f"image tokens; torch {torch.__version__}, {torch.get_num_threads()} threads, {model.dtype}, "
              f"attention: {model.config.text_config._attn_implementation}")
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens)  # greedy
        timed(model, processor, warmup, image_root, settings, args.batch_size)
        timed(model, processor, warmup[:2], image_root, settings, 1)

        t_batched = t_single = float("inf")
        for _ in range(args.rounds):
            batched, seconds = timed(model, processor, records, image_root, settings, args.batch_size)
            t_batched = min(t_batched, seconds)
            single, seconds = timed(model, processor, records, image_root, settings, 1)
            t_single = min(t_single, seconds)
        n = len(records)
        print(f"{n} samples, greedy, max_new_tokens {args.max_new_tokens}, fastest of {args.rounds} rounds")
        print(f"batched ({args.batch_size}): {n / t_batched:6.2f} samples/s  ({t_batched:.1f} s)")
        print(f"one by one:    {n / t_single:6.2f} samples/s  ({t_single:.1f} s)")
        ratio = t_single / t_batched
        print(f"ratio: {ratio:.2f}x (target >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'})")
        same = sum(a == b for a, b in zip(batched, single))
        print(f"identical greedy answers: {same} of {n}" + ("" if same == n else "  <- DIFFER"))
        for i, (a, b) in enumerate(zip(batched, single)):
            if a != b:
                print(f"  {records[i].id}: batched {a!r} vs one by one {b!r}")
    return 0 if same == n else 1


if __name__ == "__main__":
    sys.exit(main())
