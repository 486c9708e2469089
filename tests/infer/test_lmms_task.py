"""benchmarks/lmms_eval_local.py writes a valid lmms-eval task: the YAML parses and names functions utils.py has,
the data file holds the usable records in eval's order, and utils.py asks and scores each record as
``llava-lora eval`` does. lmms-eval itself is not needed: the generated utils.py is imported directly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from llava_lora.infer import metrics
from llava_lora.chat import prompts
from llava_lora.data.records import load_records

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lmms_eval_local.py"

RECORDS = [
    {"id": "first", "image": "a.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]},
    {"id": "last", "image": "b.png",
     "conversations": [{"from": "human", "value": "Where is it?\n<image>"}, {"from": "gpt", "value": "top left"}]},
    {"id": "text", "conversations": [{"from": "human", "value": "Say blue."}, {"from": "gpt", "value": "blue"}]},
    {"id": "multi", "image": "a.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a square"},
                       {"from": "human", "value": "How big?"}, {"from": "gpt", "value": "small"}]},
    {"id": "no_file", "image": "missing.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
    {"id": "no_answer", "conversations": [{"from": "human", "value": "Hello?"}]},
]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _TaskLoader(yaml.SafeLoader):
    """Reads lmms-eval's ``!function module.name`` tag as the string it names."""


_TaskLoader.add_constructor("!function", lambda loader, node: ("!function", loader.construct_scalar(node)))


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lmms")
    data = root / "data"
    (data / "images_dl").mkdir(parents=True)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(data / "images_dl" / "a.png")
    Image.new("RGB", (5, 7), (0, 0, 255)).save(data / "images_dl" / "b.png")
    (data / "test.json").write_text(json.dumps(RECORDS))
    script = _load("lmms_eval_local", SCRIPT)
    assert script.main(["--data", str(data), "--split", "test", "--task-only", "--out", str(root / "out"),
                        "--max-new-tokens", "12"]) == 0
    folder = root / "out" / "task"
    return {"folder": folder, "data": data, "utils": _load("lmms_task_utils", folder / "utils.py"),
            "config": yaml.load((folder / "llava_lora_local.yaml").read_text(), Loader=_TaskLoader),
            "rows": [json.loads(line) for line in (folder / "llava_lora_local.jsonl").read_text().splitlines()]}


def test_yaml_loads_the_local_file_and_names_functions_utils_defines(task):
    cfg = task["config"]
    assert cfg["task"] == "llava_lora_local"
    assert cfg["dataset_path"] == "json" and cfg["test_split"] == "test"
    data_file = Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert data_file.is_absolute() and data_file == (task["folder"] / "llava_lora_local.jsonl").resolve()
    assert cfg["output_type"] == "generate_until"
    assert cfg["generation_kwargs"] == {"max_new_tokens": 12, "temperature": 0, "num_beams": 1, "do_sample": False}
    for key in ("doc_to_visual", "doc_to_text", "doc_to_messages", "doc_to_target", "process_results"):
        tag, ref = cfg[key]
        module, name = ref.split(".")
        assert tag == "!function" and module == "utils" and callable(getattr(task["utils"], name))
    assert [m["metric"] for m in cfg["metric_list"]] == ["exact_match", "exact_match_normalised"]
    assert all(m["aggregation"] == "mean" for m in cfg["metric_list"])


def test_data_file_holds_the_usable_records_in_eval_order(task):
    rows = task["rows"]
    # "no_file" (image missing) and "no_answer" (no gpt turn) are left out; eval cannot answer them either.
    assert [r["id"] for r in rows] == ["first", "last", "text", "multi"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["first"]["image"] == str((task["data"] / "images_dl" / "a.png").resolve())
    assert by_id["text"]["image"] is None
    assert (by_id["first"]["image_first"], by_id["last"]["image_first"]) == (True, False)
    assert by_id["multi"]["turns"][-1] == {"role": "assistant", "text": "small"}


def test_prompts_and_targets_are_evals(task):
    u = task["utils"]
    records = {r.id: r for r in load_records(task["data"] / "test.json")[0]}
    for row in task["rows"]:
        msgs, reference = prompts.prompt_and_reference(records[row["id"]])
        asked = u.doc_to_messages(row)
        images = [p.pop("url") for m in asked for p in m["content"] if p["type"] == "image"]
        assert asked == msgs, row["id"]  # the same messages llava-lora eval templates, image part placed alike
        assert u.doc_to_target(row) == reference
        assert len(images) == (0 if row["image"] is None else 1)
    assert u.doc_to_messages(task["rows"][3])[-1] == {"role": "user", "content": [{"type": "text", "text": "How big?"}]}


def test_doc_to_text_keeps_the_image_token_where_the_record_has_it(task):
    u, rows = task["utils"], {r["id"]: r for r in task["rows"]}
    assert u.doc_to_text(rows["first"]) == "<image>\nWhat colour is it?"
    assert u.doc_to_text(rows["last"]) == "Where is it?\n<image>"
    assert u.doc_to_text(rows["text"]) == "Say blue."


def test_doc_to_visual_opens_the_records_image(task):
    u, rows = task["utils"], {r["id"]: r for r in task["rows"]}
    (image,) = u.doc_to_visual(rows["last"])
    assert image.mode == "RGB" and image.size == (5, 7) and image.getpixel((0, 0)) == (0, 0, 255)
    assert u.doc_to_visual(rows["text"]) == []


@pytest.mark.parametrize("prediction", ["top left", " top left\n", "Top left.", "The top left", "top", ""])
def test_process_results_scores_as_llava_lora_metrics(task, prediction):
    row = {r["id"]: r for r in task["rows"]}["last"]
    got = task["utils"].process_results(row, [prediction])
    assert got == {"exact_match": metrics.exact_match(prediction.strip(), "top left"),
                   "exact_match_normalised": metrics.exact_match_normalised(prediction, "top left")}


def test_lmms_answers_are_read_back_by_record_id_and_compared(tmp_path):
    """lmms-eval 0.7.3's files (samples keyed by doc_id, results keyed 'metric,filter') map onto record ids."""
    script = _load("lmms_eval_local", SCRIPT)
    rows = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    run = tmp_path / "model"
    run.mkdir()
    (run / "20260101_000000_results.json").write_text(json.dumps({"results": {"t": {
        "exact_match,none": 2 / 3, "exact_match_normalised,none": 1.0, "exact_match_stderr,none": 0.3}}}))
    (run / "20260101_000000_samples_t.jsonl").write_text("".join(json.dumps(s) + "\n" for s in [
        {"doc_id": 2, "filtered_resps": "blue"}, {"doc_id": 0, "filtered_resps": ["red"]},
        {"doc_id": 1, "filtered_resps": "Green."}]))
    lmms = script.lmms_answers(tmp_path, "t", rows)
    assert lmms == ({"exact_match": 2 / 3, "exact_match_normalised": 1.0}, {"a": "red", "b": "Green.", "c": "blue"})
    ours = ({"exact_match": 1.0, "exact_match_normalised": 1.0}, {"a": "red", "b": "green", "c": "blue"})
    report = script.compare(lmms, ours)
    assert "identical answers 2/3" in report and "b: lmms-eval 'Green.', llava-lora 'green'" in report
    assert "exact_match                 0.6667      1.0000" in report
