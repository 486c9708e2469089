"""Every data format the tool reads, written by the real libraries with each tool's own conventions, reads as the
same records as LLaVA's JSON (same messages, same pixels); ids optional; bad records named; reading is lazy."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from fixtures import formats as F

from llava_lora import cli
from llava_lora.chat import prompts
from llava_lora.data import check, shards, tables
from llava_lora.data.images import as_store, open_ref
from llava_lora.data.records import load_data, resolve_data
from llava_lora.errors import UsageError

WRITERS = {
    "sharegpt": F.write_sharegpt,
    "parts_trl": F.write_parts,
    "parts_llamafactory_v1": lambda d, items: F.write_parts(d, items, v1=True),
    "zip": F.write_zip,
    "parquet": F.write_parquet,
    "parquet_folder": lambda d, items: F.write_parquet(d, items, files=2),
    "save_to_disk": F.write_save_to_disk,
    "shards": F.write_shards,
}
FORMAT_OF = {"sharegpt": "sharegpt", "parts_trl": "parts", "parts_llamafactory_v1": "parts", "zip": "llava",
             "parquet": "sharegpt", "parquet_folder": "sharegpt", "save_to_disk": "sharegpt", "shards": "llava"}


def _read(path: Path, **kw):
    file, store = resolve_data(str(path), **kw)
    loaded = load_data(file)
    return loaded, as_store(store)


def _seen(loaded, store) -> list[tuple[list[dict], list[bytes]]]:
    """What the model is given of each record: its messages and each image's pixels."""
    return [(prompts.messages(r), [open_ref(store, ref).tobytes() for ref in r.images]) for r in loaded.records]


@pytest.fixture(scope="module")
def items():
    return F.sample_items(10)


@pytest.fixture(scope="module")
def llava_seen(items, tmp_path_factory):
    loaded, store = _read(F.write_llava(tmp_path_factory.mktemp("llava"), items))
    return _seen(loaded, store)


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_format_reads_as_llava_does(kind, items, llava_seen, tmp_path, capsys):
    path = WRITERS[kind](tmp_path / kind, items)
    loaded, store = _read(path)
    assert not loaded.bad and dict(loaded.formats) == {FORMAT_OF[kind]: len(items)}
    assert _seen(loaded, store) == llava_seen  # the same conversations, the same pixels, images in order
    assert sum(len(r.images) == 2 for r in loaded.records) == 2
    assert cli.main(["data", "check", str(path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{len(items)} records, {len(items)} usable, 0 not" in out and f"format {FORMAT_OF[kind]} (" in out


def test_ids_are_optional_named_by_source_and_position(items, tmp_path):
    sharegpt, _ = _read(F.write_sharegpt(tmp_path / "sg", items))
    assert [r.id for r in sharegpt.records[:2]] == ["mllm_demo.json#0", "mllm_demo.json#1"]
    pq, _ = _read(F.write_parquet(tmp_path / "pq", items, files=2))
    assert pq.records[5].id == "train-00001-of-00002.parquet#0"  # position within its own file
    sh, _ = _read(F.write_shards(tmp_path / "sh", items))
    assert sh.records[4].id == "00001.tar:000010000"


def test_captions_become_llava_pretraining_conversations(items, tmp_path):
    pattern = F.write_shards(tmp_path / "cap", items, captions=True)
    loaded, store = _read(pattern)
    captions = [it.turns[1][1] for it in items if len(it.images) == 1]
    assert [r.turns[1].text for r in loaded.records] == captions and dict(loaded.formats) == {"caption": 6}
    asked = [prompts.question(r) for r in loaded.records]
    assert set(asked) <= set(shards.BRIEF_INSTRUCTIONS) and len(set(asked)) > 1
    assert {r.image_first for r in loaded.records} == {True, False}  # the image before or after, as in CC3M
    again, _ = _read(pattern)
    assert again.records == loaded.records  # chosen by the key, the same on every run


def test_brace_patterns_expand_with_their_padding():
    assert shards.expand("s/{00008..00010}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar"]
    assert shards.expand("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    with pytest.raises(UsageError, match="shard not found"):
        shards.shard_files("/nowhere/{0..1}.tar")


def test_parquet_opening_reads_no_image_bytes(items, tmp_path, monkeypatch):
    path = F.write_parquet(tmp_path / "pq", items)
    read = []
    monkeypatch.setattr(tables.ParquetPart, "cell", lambda self, row, col: read.append(row))
    loaded, store = _read(path)
    assert len(loaded.records) == len(items) and not read  # only the text and the images' path fields
    assert all(ref.startswith(tables.EMBEDDED) for r in loaded.records for ref in r.images)


@pytest.mark.slow  # spawns process pools
def test_stores_cross_processes(items, tmp_path, monkeypatch):
    """A spawned pool gets each store pickled; the zip, the table and the shards open again there."""
    monkeypatch.setattr(check, "MIN_POOL", 0)
    monkeypatch.setattr(check, "CHUNK", 2)
    for kind in ("zip", "parquet", "shards"):
        file, store = resolve_data(str(WRITERS[kind](tmp_path / kind, items)))
        pickle.loads(pickle.dumps(as_store(store)))
        report = check.check_file(file, store, workers=2, progress=False)
        assert not report.bad and len(report.usable) == len(items), kind


def _corrupt_png(items) -> bytes:
    data = F.png(items[0].images[0])
    return data[:len(data) // 2]


def test_bad_records_in_every_format_are_named(items, tmp_path):
    # ShareGPT: two images, one placeholder
    sg = F.write_sharegpt(tmp_path / "sg", items)
    rows = json.loads(sg.read_text())
    rows[0]["images"].append(rows[4]["images"][0])
    sg.write_text(json.dumps(rows))
    report = check.check_file(*resolve_data(str(sg)), workers=1, progress=False)
    assert [(r.id, r.reason) for r in report.bad] == [("mllm_demo.json#0", "image_count_mismatch")]
    # shards: a truncated image member, named by its shard and key
    pattern = F.write_shards(tmp_path / "sh", items[:2])
    with tarfile.open(tmp_path / "sh" / "00000.tar", "a") as tar:
        for name, data in (("bad.png", _corrupt_png(items)), ("bad.json", json.dumps(
                {"conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "a"}]}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = check.check_file(*resolve_data(str(pattern)), workers=1, progress=False)
    assert [(r.id, r.reason) for r in report.bad] == [("00000.tar:bad", "truncated_image")]
    assert "00000.tar:bad.png" in report.bad[0].detail
    # parquet: a row whose embedded bytes are cut, named by file and row
    import datasets

    ds = F._dataset(items[:3])
    cut = ds.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    cut = cut.map(lambda row, i: {"images": [{"bytes": im["bytes"][:len(im["bytes"]) // 2] if i == 1 else im["bytes"], "path": None}
                                             for im in row["images"]]}, with_indices=True)
    cut.to_parquet(str(tmp_path / "cut.parquet"))
    report = check.check_file(*resolve_data(str(tmp_path / "cut.parquet")), workers=1, progress=False)
    assert [(r.id, r.reason) for r in report.bad] == [("cut.parquet#1", "truncated_image")]
    assert "cut.parquet row 1 images[0]" in report.bad[0].detail


def test_image_dir_may_be_a_zip_and_paths_stay_inside_it(items, tmp_path):
    data = F.write_zip(tmp_path / "z", items)
    elsewhere = tmp_path / "elsewhere.json"
    rows = json.loads((data / "chat.json").read_text())
    rows[0]["image"] = "../outside.png"
    rows[1]["image"] = "nowhere.png"
    elsewhere.write_text(json.dumps(rows))
    report = check.check_file(*resolve_data(str(elsewhere), image_dir=str(data / "images.zip")), workers=1,
                              progress=False)
    assert [(r.id, r.reason) for r in report.bad] == [("r0000", "image_path_escapes_root"), ("r0001", "missing_image")]
    with zipfile.ZipFile(tmp_path / "nested.zip", "w") as z:  # images under one top-level folder
        z.write(data / "chat.json", "images/ignored.json")
        with zipfile.ZipFile(data / "images.zip") as src:
            for name in src.namelist():
                z.writestr(f"images/{name}", src.read(name))
    report = check.check_file(*resolve_data(str(data / "chat.json"), image_dir=str(tmp_path / "nested.zip")),
                              workers=1, progress=False)
    assert not report.bad


def test_a_mixture_of_formats_reports_per_source(items, tmp_path, capsys):
    sg = F.write_sharegpt(tmp_path / "sg", items)
    rows = json.loads(sg.read_text())
    rows[2]["messages"][0]["content"] += " <image>"
    sg.write_text(json.dumps(rows))
    sources = [str(sg), str(F.write_parquet(tmp_path / "pq", items)), str(F.write_shards(tmp_path / "sh", items))]
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"data": [{"path": p} for p in sources]}))
    assert cli.main(["data", "check", "--config", str(tmp_path / "mix.yaml"), "--workers", "1",
                     "--json", str(tmp_path / "r.json")]) == 1
    report = json.loads((tmp_path / "r.json").read_text())["sources"]
    assert [s["usable"] for s in report] == [len(items) - 1, len(items), len(items)]
    assert [b["id"] for b in report[0]["bad"]] == ["mllm_demo.json#2"]
    assert [s["formats"] for s in report] == [{"sharegpt": 9}, {"sharegpt": 10}, {"llava": 10}]


def test_user_messages_put_images_where_placeholders_stand():
    image, text = {"type": "image"}, {"type": "text", "text": "Which is brighter?"}
    assert prompts.user_messages("<image> <image> Which is brighter?", 2)[0]["content"] == [image, image, text]
    assert prompts.user_messages("Which is brighter?", 2)[0]["content"] == [image, image, text]
    assert prompts.user_messages("Which is brighter?", 0)[0]["content"] == [text]


def test_generate_refuses_images_and_placeholders_that_disagree(tmp_path, capsys):
    img = tmp_path / "a.png"
    F.sample_items(1)[0].images[0].save(img)
    argv = ["generate", "--model", str(tmp_path / "no_model"), "--image", str(img), "--image", str(img),
            "--prompt", "<image> Which?"]
    assert cli.main(argv) == 2
    assert "1 <image> placeholder for 2 --image" in capsys.readouterr().err


def test_hub_sets_are_read_as_local_parquet(items, tmp_path, monkeypatch):
    """hf://datasets/OWNER/NAME:split lists the set's parquet files and reads them through ParquetPart, as a local
    file: a stand-in file system (the hub's paths mapped to a local folder) proves the path; no network here."""
    import fsspec
    import huggingface_hub

    F.write_parquet(tmp_path / "owner" / "name", items, files=2)
    local = fsspec.filesystem("file")

    class StandIn:
        def _local(self, path: str) -> str:
            return str(tmp_path / path.removeprefix("datasets/"))

        def glob(self, pattern: str) -> list[str]:
            return [f"datasets/{Path(p).relative_to(tmp_path)}" for p in local.glob(self._local(pattern))]

        def open(self, path: str, mode: str = "rb"):
            return local.open(self._local(path), mode)

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", StandIn)
    loaded, store = _read("hf://datasets/owner/name:train")
    local_loaded, local_store = _read(tmp_path / "owner" / "name")
    assert _seen(loaded, store) == _seen(local_loaded, local_store) and len(loaded.records) == len(items)


def test_parquet_of_llava_rows_with_image_paths(items, tmp_path, llava_seen):
    """A parquet file of LLaVA rows whose ``image`` is a path (a list for two), images in images/ beside it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    llava = F.write_llava(tmp_path / "l", items)
    (llava / "images_dl").rename(tmp_path / "images")
    rows = json.loads((llava / "chat.json").read_text())
    for r in rows:  # one column type for all rows: a list of paths (empty for text-only)
        r["image"] = [] if "image" not in r else r["image"] if isinstance(r["image"], list) else [r["image"]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "llava.parquet")
    loaded, store = _read(tmp_path / "llava.parquet")
    assert not loaded.bad and dict(loaded.formats) == {"llava": len(items)}
    assert _seen(loaded, store) == llava_seen and loaded.records[0].id == "r0000"
