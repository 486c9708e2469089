"""Data mixtures: several sources, each with its own image root and weight, in `data check` and `train`.

    .venv/bin/pytest tests/data/test_mixtures.py -q
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from fixtures.models import FAST, Models, model_world
from fixtures.data import write_good_dataset
from llava_lora import cli
from llava_lora.data.sources import Source, load_mixture, parse_sources
from llava_lora.errors import UsageError


@pytest.fixture
def two_sources(tmp_path: Path) -> tuple[Path, Path]:
    """A folder source (chat.json + images_dl/) and a JSONL source whose images live in another folder, one of
    them missing."""
    a = tmp_path / "a"
    write_good_dataset(a, n=8)
    b = tmp_path / "b"
    ids = write_good_dataset(b, n=6, seed=1, jsonl=True)
    shutil.move(b / "images_dl", tmp_path / "b-images")
    (tmp_path / "b-images" / f"{ids[0]}.png").unlink()  # record 0 of b has an image: it is now missing
    return a, b / "chat.jsonl"


def test_sources_parsed_and_refused():
    assert parse_sources("d", "val", "imgs") == [Source("d", "imgs", 1.0, "val")]
    assert parse_sources(["x", {"path": "y", "weight": 2, "image_dir": "i"}]) == [Source("x"),
                                                                                Source("y", "i", 2.0)]
    for bad, says in [([], "names no source"), ([{"image_dir": "i"}], "with 'path'"),
                      ([{"path": "p", "wieght": 2}], "unknown key 'wieght'"),
                      ([{"path": "p", "weight": 0}], "weight must be a number > 0")]:
        with pytest.raises(UsageError, match=says):
            parse_sources(bad)


def test_weights_roots_and_sources(two_sources: tuple[Path, Path], tmp_path: Path):
    a, b = two_sources
    sources = [Source(str(a), weight=2), Source(str(b), str(tmp_path / "b-images"), 0.5)]
    mix = load_mixture(sources, seed=0)
    by_source = Counter(mix.names)
    assert by_source[str(a / "chat.json")] == 2 * 8
    assert by_source[str(b)] == 3  # half of the 5 locatable records in b, rounded half up
    assert all(root == (a / "images_dl" if name.startswith(str(a)) else tmp_path / "b-images")
               for root, name in zip(mix.roots, mix.names))
    rejected, = mix.rejected
    assert rejected.reason == "missing_image" and f"(source {b})" in rejected.detail
    again = load_mixture(sources, seed=0)
    assert [r.id for r in again.records] == [r.id for r in mix.records]  # the seed fixes the half


def test_jsonl_source_is_streamed(two_sources: tuple[Path, Path], tmp_path: Path, monkeypatch):
    """Read line by line: a whole-file read of the JSONL source would fail here."""
    _, b = two_sources

    def no_whole_reads(self, *a, **k):
        raise AssertionError(f"{self} read whole")

    monkeypatch.setattr(Path, "read_text", no_whole_reads)
    monkeypatch.setattr(Path, "read_bytes", no_whole_reads)
    mix = load_mixture([Source(str(b), str(tmp_path / "b-images"))], seed=0)
    assert len(mix.records) == 5


def test_data_check_covers_every_source(two_sources: tuple[Path, Path], tmp_path: Path, capsys):
    a, b = two_sources
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"data": [{"path": str(a)}, {"path": str(b),
                                                                  "image_dir": str(tmp_path / "b-images")}]}))
    report = tmp_path / "report.json"
    assert cli.main(["data", "check", "--config", str(config), "--workers", "1", "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert f"{a / 'chat.json'}: 8 records, 8 usable" in out and f"{b}: 6 records, 5 usable" in out
    sources = json.loads(report.read_text())["sources"]
    assert [s["bad_count"] for s in sources] == [0, 1] and sources[1]["bad"][0]["reason"] == "missing_image"


@pytest.mark.slow
def test_train_on_a_mixture(two_sources: tuple[Path, Path], tmp_path: Path, tmp_path_factory, capsys):
    world: Models = model_world(tmp_path_factory)
    a, b = two_sources
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"data": [{"path": str(a), "weight": 1},
                                               {"path": str(b), "image_dir": str(tmp_path / "b-images"),
                                                "weight": 2}]}))
    run = tmp_path / "run"
    rc = cli.main(["train", "--config", str(config), "--model", str(world.qwen_model), "--out", str(run), *FAST,
                   "--max-steps", "3", "--batch-size", "4"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert f"{a / 'chat.json'} (8 records) + {b} (5 records)" in printed.out
    report = json.loads((run / "data_report.json").read_text())
    assert report["records"] == 8 + 6  # records read, not their weighted copies
    (skip,) = report["samples"]
    assert skip["reason"] == "missing_image" and f"(source {b})" in skip["detail"] and skip["when"] == "loading"
    assert (run / "adapter_model.safetensors").is_file()
