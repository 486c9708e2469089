"""Score a trained model with lmms-eval on a local LLaVA-format file, next to ``llava-lora eval`` on the same records.

    scripts/make_lmms_venv.sh                                          # lmms-eval's own venv, .venvs/lmms
    .venv/bin/python benchmarks/lmms_eval_local.py --data DATA --split test --model MERGED_DIR --limit 50
    .venv/bin/python benchmarks/lmms_eval_local.py --data DATA --split test --task-only --out lmms-task

lmms-eval tasks are a YAML file plus a ``utils.py``, and usually load a dataset from the Hugging Face hub. The
task written here loads a JSONL file instead (``dataset_path: json`` with ``dataset_kwargs: data_files:``), so it
runs offline. Each row is one usable record of DATA (read by llava-lora's own reader, in its order, image paths
made absolute); ``utils.py`` asks it as ``llava-lora eval`` does (the chat messages of ``llava_lora.chat.prompts``:
history included, the image before or after the question as the record has it) and scores exact match, strict
and normalised, as ``llava_lora.infer.metrics`` does.

Then lmms-eval runs in its own venv (``--model llava_hf --include_path TASK_DIR --limit N --device cpu``,
HF_HUB_OFFLINE=1; ``llava_hf`` is its chat class, which takes ``doc_to_messages``, unless ``--force-simple``),
``llava-lora eval`` runs on the same MERGED_DIR, records and dtype, and both exact matches are printed with the
number of records on which the two answers are identical. llava_hf takes no adapter argument: score
MODEL_DIR + RUN_DIR by ``llava-lora export``-ing it to MERGED_DIR first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO / ".venvs" / "lmms"
TASK_NAME = "llava_lora_local"

# The generated utils.py runs inside lmms-eval's venv, where llava_lora is not installed: it is self-contained.
UTILS_PY = '''\
"""lmms-eval task functions for records written by llava-lora's benchmarks/lmms_eval_local.py.

Each row: {"id", "image": absolute path or null, "image_first": bool, "turns": [{"role", "text"}, ...]}, the
last turn being the reference answer. Messages mirror llava_lora.chat.prompts.messages; scores mirror
llava_lora.infer.metrics (exact_match: equal after trimming; exact_match_normalised: after SQuAD normalisation).
"""

import re
import string

from PIL import Image

IMAGE_TOKEN = "<image>"
_ARTICLES = re.compile(r"\\b(a|an|the)\\b")
_PUNCTUATION = set(string.punctuation)


def _image(doc):
    return Image.open(doc["image"]).convert("RGB") if doc["image"] else None


def doc_to_visual(doc):
    image = _image(doc)
    return [image] if image is not None else []


def _content(text, image, image_first):
    parts = [{"type": "text", "text": text}] if text else []
    if image is not None:
        parts.insert(0 if image_first else len(parts), {"type": "image", "url": image})
    return parts


def doc_to_messages(doc):
    """The conversation up to the answer, as lmms-eval chat models take it; the image joins the first turn."""
    image = _image(doc)
    return [{"role": t["role"], "content": _content(t["text"], image if i == 0 else None, doc["image_first"])}
            for i, t in enumerate(doc["turns"][:-1])]


def doc_to_text(doc):
    """The last question, with <image> where the record had it (llava_hf's simple model keeps it there)."""
    text = doc["turns"][-2]["text"]
    if not doc["image"] or len(doc["turns"]) > 2:
        return text
    return f"{IMAGE_TOKEN}\\n{text}" if doc["image_first"] else f"{text}\\n{IMAGE_TOKEN}"


def doc_to_target(doc):
    return doc["turns"][-1]["text"]


def normalise(text):
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def process_results(doc, results):
    prediction, reference = results[0].strip(), doc_to_target(doc).strip()
    return {"exact_match": float(prediction == reference),
            "exact_match_normalised": float(normalise(prediction) == normalise(reference))}
'''


def task_yaml(name: str, data_file: Path, max_new_tokens: int) -> str:
    """The task's YAML; strings are written as JSON, which YAML reads as they are."""
    q = json.dumps
    return f"""\
# Written by llava-lora's benchmarks/lmms_eval_local.py: a local LLaVA-format file as an lmms-eval task.
task: {q(name)}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {q(str(data_file))}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_messages: !function utils.doc_to_messages
doc_to_target: !function utils.doc_to_target
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  num_beams: 1
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: exact_match_normalised
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def task_rows(data: str, split: str | None, image_dir: str | None) -> tuple[list[dict], list[str]]:
    """(rows of the usable records, ids left out and why), in the order ``llava-lora eval`` takes them."""
    from llava_lora.data.records import BadRecord, load_records, plain_text, resolve_data, resolve_image

    file, image_root = resolve_data(data, split, image_dir)
    records, bad = load_records(file)
    rows, left_out = [], [f"{r.id}: {r.reason}" for r in bad]
    for rec in records:
        if len(rec.images) > 1:  # the task's rows carry one image (lmms-eval's local JSON task)
            left_out.append(f"{rec.id}: {len(rec.images)} images; this task takes one")
            continue
        try:
            image = str(resolve_image(image_root, rec.image)) if rec.image is not None else None
        except BadRecord as e:
            left_out.append(f"{rec.id}: {e.reason}")
            continue
        rows.append({"id": rec.id, "image": image, "image_first": rec.image_first,
                     "turns": [{"role": t.role, "text": plain_text(t.text)} for t in rec.turns]})
    return rows, left_out


def write_task(rows: list[dict], out: Path, name: str = TASK_NAME, max_new_tokens: int = 64) -> Path:
    """Write ``name``.yaml, utils.py and ``name``.jsonl into ``out`` (the folder for ``--include_path``)."""
    out.mkdir(parents=True, exist_ok=True)
    data_file = (out / f"{name}.jsonl").resolve()
    data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (out / "utils.py").write_text(UTILS_PY, encoding="utf-8")
    (out / f"{name}.yaml").write_text(task_yaml(name, data_file, max_new_tokens), encoding="utf-8")
    return out


def offline_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # lmms-eval's venv must not pick up the project's modules or packages
    return env


def run_lmms(venv: Path, task_dir: Path, name: str, model: str, limit: int, out: Path, dtype: str,
             force_simple: bool = False) -> Path:
    """Run lmms-eval's CLI in its venv; returns the folder it wrote its results and samples to."""
    # device_map: llava_hf's default "" is refused by transformers 5 ("the value needs to be a device name").
    cmd = [str(venv / "bin" / "python"), "-m", "lmms_eval", "--model", "llava_hf",
           "--model_args", f"pretrained={Path(model).resolve()},device_map=cpu,dtype={dtype}", "--tasks", name,
           "--include_path", str(task_dir), "--limit", str(limit), "--batch_size", "1", "--device", "cpu",
           "--output_path", str(out), "--log_samples"] + (["--force_simple"] if force_simple else [])
    print("$", " ".join(cmd), flush=True)
    # lmms-eval 0.7.3 logs an error and exits 0 when a task or the model fails: its results file is the proof,
    # so none may be left from an earlier run.
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(cmd, check=True, env=offline_env())
    return out


def run_ours(model: str, data: str, split: str | None, image_dir: str | None, limit: int,
             max_new_tokens: int, dtype: str, out: Path) -> Path:
    """``llava-lora eval`` on the same model and records, one sample at a time as llava_hf answers them."""
    cmd = [sys.executable, "-m", "llava_lora", "eval", "--model", model, "--data", data, "--limit", str(limit),
           "--max-new-tokens", str(max_new_tokens), "--batch-size", "1", "--device", "cpu", "--dtype", dtype,
           "--out", str(out), "--overwrite"]
    cmd += ["--split", split] if split else []
    cmd += ["--image-dir", image_dir] if image_dir else []
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def newest(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"lmms-eval wrote no {pattern} under {folder}: its error is in the output above")
    return found[-1]


def lmms_answers(out: Path, name: str, rows: list[dict]) -> tuple[dict[str, float], dict[str, str]]:
    """(lmms-eval's task metrics, {record id: answer}) read from its results and samples files."""
    results = json.loads(newest(out, "*_results.json").read_text())["results"][name]
    scores = {m: results[f"{m},none"] for m in ("exact_match", "exact_match_normalised")}
    answers = {}
    for line in newest(out, f"*_samples_{name}.jsonl").read_text().splitlines():
        sample = json.loads(line)
        resp = sample["filtered_resps"]  # a string in 0.7.3; a one-answer list in older releases
        answers[rows[sample["doc_id"]]["id"]] = resp[0] if isinstance(resp, list) else resp
    return scores, answers


def our_answers(out: Path) -> tuple[dict[str, float], dict[str, str]]:
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return summary["metrics"]["base"], {r["id"]: r["base"] for r in rows}


def compare(lmms: tuple[dict, dict], ours: tuple[dict, dict], shown: int = 5) -> str:
    """Both exact matches side by side, how many answers are identical, and the first records that differ."""
    (l_scores, l_ans), (o_scores, o_ans) = lmms, ours
    differ = [i for i, a in o_ans.items() if l_ans.get(i, "").strip() != a]
    lines = [f"{'':24}{'lmms-eval':>10}{'llava-lora':>12}"]
    for m in ("exact_match", "exact_match_normalised"):
        lines.append(f"{m:24}{l_scores[m]:>10.4f}{o_scores[m]:>12.4f}")
    lines.append(f"records: lmms-eval {len(l_ans)}, llava-lora {len(o_ans)}; "
                 f"identical answers {len(o_ans) - len(differ)}/{len(o_ans)}")
    lines += [f"  {i}: lmms-eval {l_ans.get(i)!r}, llava-lora {o_ans[i]!r}" for i in differ[:shown]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="LLaVA-format file, or a folder holding chat.json / SPLIT.json")
    p.add_argument("--split", help="split file in a DATA folder, e.g. test")
    p.add_argument("--image-dir", help="image root; none: DATA's images_dl/, else images/, else DATA")
    p.add_argument("--model", help="MERGED_DIR (`llava-lora export`) or any MODEL_DIR; needed unless --task-only")
    p.add_argument("--out", default="lmms-out", help="folder for the task, lmms-eval's and llava-lora's outputs")
    p.add_argument("--name", default=TASK_NAME, help="lmms-eval task name")
    p.add_argument("--limit", type=int, default=20, help="first N records scored by both")
    p.add_argument("--max-new-tokens", type=int, default=64)
    # One dtype for both: llava_hf's "auto" keeps a bf16 checkpoint in bf16 on a CPU, eval's "auto" computes in
    # float32 there; close logits then pick different tokens on a few records.
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="both runs compute in it")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="lmms-eval's venv (scripts/make_lmms_venv.sh)")
    p.add_argument("--task-only", action="store_true", help="write the task folder and stop")
    p.add_argument("--force-simple", action="store_true",
                   help="lmms-eval's older llava_hf (doc_to_text + the image, string prompts) instead of its chat one")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    rows, left_out = task_rows(args.data, args.split, args.image_dir)
    task_dir = write_task(rows, out / "task", args.name, args.max_new_tokens)
    print(f"task {args.name}: {len(rows)} records in {task_dir}" + (f"; left out: {left_out}" if left_out else ""))
    if args.task_only:
        return 0
    if not args.model:
        p.error("--model is needed unless --task-only")
    if not (args.venv / "bin" / "python").exists():
        p.error(f"no lmms-eval venv at {args.venv}: run scripts/make_lmms_venv.sh")
    lmms_out = run_lmms(args.venv, task_dir, args.name, args.model, args.limit, out / "lmms-eval", args.dtype,
                        args.force_simple)
    lmms = lmms_answers(lmms_out, args.name, rows)
    ours = our_answers(run_ours(args.model, args.data, args.split, args.image_dir, args.limit,
                                args.max_new_tokens, args.dtype, out / "llava-lora"))
    print(compare(lmms, ours))
    return 0


if __name__ == "__main__":
    sys.exit(main())
