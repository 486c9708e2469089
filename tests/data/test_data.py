"""Data layer: record parsing and its reason codes, image decoding, data-set resolution, synth, ``data check``.

    .venv/bin/pytest tests/data/test_data.py -q
"""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from fixtures.data import BAD_DATASET_GOOD_IDS, write_bad_dataset, write_good_dataset
import llava_lora
from llava_lora import cli, outdirs
from llava_lora.data import check, synth
from llava_lora.chat import prompts
from llava_lora.data.records import BadRecord, Record, Turn, plain_text, check_image, load_records, open_image, parse_record, read_raw, resolve_data, resolve_image
from llava_lora.errors import REASONS, Rejected, UsageError
from llava_lora.train.watch import _REMEDIES

VENV_BIN = Path(sys.executable).parent


def qa(q: str = "<image>\nWhat?", a: str = "red") -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


# ---------------------------------------------------------------------------------------------- records


@pytest.mark.parametrize("raw, reason", [
    (["a list"], "not_an_object"),
    ({"id": "", "image": "a.png", "conversations": qa()}, "missing_id"),
    ({"id": ["x"], "image": "a.png", "conversations": qa()}, "missing_id"),
    ({"id": "x", "image": 3, "conversations": qa()}, "bad_image_field"),
    ({"id": "x", "image": "  ", "conversations": qa()}, "bad_image_field"),
    ({"id": "x", "image": ["a.png", "b.png"], "conversations": qa()}, "image_count_mismatch"),
    ({"id": "x", "images": ["a.png", "b.png"], "conversations": qa("<image>\n<image>\n<image> Three?")},
     "image_count_mismatch"),
    ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "hi"}],
      "images": ["a.png"]}, "image_count_mismatch"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}]},
                   {"role": "assistant", "content": "a"}], "images": ["a.png"]}, "image_count_mismatch"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]},
                   {"role": "assistant", "content": "a"}], "images": ["b.png"]}, "image_count_mismatch"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "value": "https://x/a.jpg"}]},
                   {"role": "assistant", "content": "a"}]}, "bad_image_field"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "a"}]},
     "bad_turn"),
    ({"title": "no turns"}, "no_conversations"),
    ({"id": "x", "image": "a.png"}, "no_conversations"),
    ({"id": "x", "image": "a.png", "conversations": {"from": "human"}}, "no_conversations"),
    ({"id": "x", "image": "a.png", "conversations": [1, 2]}, "bad_turn"),
    ({"id": "x", "conversations": [{"from": "bot", "value": "hi"}, {"from": "gpt", "value": "hi"}]},
     "unknown_speaker"),
    # a system prompt: the first turn only, once, and no image in it
    ({"id": "x", "conversations": qa("Hi?", "hi") + [{"from": "system", "value": "be brief"}] + qa("Hi?", "hi")},
     "misplaced_system_turn"),
    ({"id": "x", "conversations": [{"from": "system", "value": "a"}, {"from": "system", "value": "b"}] + qa("Hi?")},
     "misplaced_system_turn"),
    ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "system", "content": "be brief"},
                   {"role": "assistant", "content": "hi"}]}, "misplaced_system_turn"),
    ({"messages": [{"role": "system", "content": [{"type": "text", "text": "a"}]},
                   {"role": "user", "content": [{"type": "text", "text": "Q"}]},
                   {"role": "system", "content": [{"type": "text", "text": "b"}]},
                   {"role": "assistant", "content": "a"}]}, "misplaced_system_turn"),
    ({"id": "x", "system": "b", "conversations": [{"from": "system", "value": "a"}] + qa("Hi?")},
     "misplaced_system_turn"),
    ({"id": "x", "system": 3, "conversations": qa("Hi?")}, "non_string_text"),
    ({"id": "x", "image": "a.png", "conversations": [{"from": "system", "value": "<image> a"}] + qa("Q?")},
     "image_token_mismatch"),
    ({"id": "x", "conversations": [{"from": "system", "value": "be brief"}]}, "no_assistant_answer"),
    ({"id": "x", "conversations": [{"value": "hi"}, {"from": "gpt", "value": "hi"}]}, "unknown_speaker"),
    ({"id": "x", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "hi"}]},
     "non_string_text"),
    ({"id": "x", "conversations": [{"from": "human"}, {"from": "gpt", "value": "hi"}]}, "non_string_text"),
    ({"id": "x", "conversations": qa("Hi?", "hi")[::-1]}, "turns_out_of_order"),
    ({"id": "x", "conversations": qa("Hi?", "hi") + qa("Hi?", "hi")[::-1]}, "turns_out_of_order"),
    ({"id": "x", "conversations": qa("Hi?", "hi")[:1]}, "no_assistant_answer"),
    ({"id": "x", "conversations": qa("Hi?", "hi") + qa("More?")[:1]}, "no_assistant_answer"),
    ({"id": "x", "conversations": qa("Hi?", "\n ")}, "no_assistant_answer"),
    ({"id": "x", "image": "a.png", "conversations": qa("What?")}, "image_count_mismatch"),
    ({"id": "x", "image": "a.png", "conversations": qa("<image><image>\nWhat?")}, "image_count_mismatch"),
    ({"id": "x", "image": "a.png", "conversations": qa("What?", "<image>")}, "image_token_mismatch"),
    ({"id": "x", "image": "a.png", "conversations": qa() + qa("<image>\nAgain?")}, "image_count_mismatch"),
    ({"id": "x", "conversations": qa("<image>\nWhat?")}, "image_count_mismatch"),
])
def test_parse_record_reasons(raw, reason):
    with pytest.raises(BadRecord) as err:
        parse_record(raw, 7)
    assert err.value.reason == reason
    assert err.value.detail  # says what was found


def _reason_codes_in_the_package() -> tuple[set[str], set[str]]:
    """(codes given to BadRecord/Rejected or written as a report's "reason", codes a ``.reason`` is compared to)
    anywhere in llava_lora/, read from the source."""
    given, compared = set(), set()
    for path in Path(llava_lora.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            called = getattr(node, "func", None)
            called = getattr(called, "id", getattr(called, "attr", None))
            if isinstance(node, ast.Call) and called in ("BadRecord", "Rejected"):
                pos = 0 if called == "BadRecord" else 1  # BadRecord(reason, ...), Rejected(id, reason, ...)
                args = node.args[pos:pos + 1] + [k.value for k in node.keywords if k.arg == "reason"]
                given |= {a.value for a in args if isinstance(a, ast.Constant)}
            elif isinstance(node, ast.Dict):
                given |= {v.value for k, v in zip(node.keys, node.values)
                          if isinstance(k, ast.Constant) and k.value == "reason" and isinstance(v, ast.Constant)}
            elif isinstance(node, ast.Compare) and getattr(node.left, "attr", None) == "reason":
                compared |= {c.value for c in node.comparators if isinstance(c, ast.Constant)}
    return given, compared


def test_every_reason_code_is_declared_once_and_given_somewhere():
    given, compared = _reason_codes_in_the_package()
    assert len(REASONS) == len(set(REASONS))
    assert given == set(REASONS)  # nothing undeclared is given, and nothing declared is dead
    assert compared <= set(REASONS) and set(_REMEDIES) <= set(REASONS)


def test_an_undeclared_reason_is_refused():
    with pytest.raises(ValueError, match="not declared"):
        BadRecord("bad_vibes", "x")
    with pytest.raises(ValueError, match="not declared"):
        Rejected("a", "bad_vibes")
    assert BadRecord("missing_image", "a.png").rejected("a", 3) == Rejected("a", "missing_image", "a.png", 3)


def test_placeholder_at_start_and_end_becomes_an_image_part_its_whitespace_dropped():
    start = parse_record({"id": "a", "image": "a.png", "conversations": qa("  <image>\n\nWhat colour?", "red")}, 0)
    end = parse_record({"id": "b", "image": "b.png", "conversations": qa("What colour?\n<image>\n", "red")}, 1)
    only = parse_record({"id": "c", "image": "c.png", "conversations": qa("<image>", "red")}, 2)
    middle = parse_record({"id": "d", "image": "d.png", "conversations": qa("What is <image> this?", "red")}, 3)
    image, text = {"type": "image"}, lambda t: {"type": "text", "text": t}
    assert (prompts.messages(start)[0]["content"], start.image_first) == ([image, text("What colour?")], True)
    assert (prompts.messages(end)[0]["content"], end.image_first) == ([text("What colour?"), image], False)
    assert (prompts.messages(only)[0]["content"], only.image_first) == ([image], True)
    assert prompts.messages(middle)[0]["content"] == [text("What is"), image, text("this?")]
    assert plain_text(start.turns[0].text) == "What colour?" == prompts.question(end)
    assert start.turns[1] == Turn("assistant", "red")


def test_role_user_assistant_content_and_int_id_and_single_image_list():
    raw = {"id": 12, "image": ["a.png"], "conversations": [
        {"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "red"}]}
    rec = parse_record(raw, 0)
    assert rec == Record("12", ("a.png",), (Turn("user", "<image>\nWhat?"), Turn("assistant", "red")))
    assert parse_record({"id": "u", "conversations": [{"from": "Human", "value": "a"},
                                                      {"from": "GPT", "value": "b"}]}, 0).turns[1].role == "assistant"


def test_multi_turn_and_text_only():
    rec = parse_record({"id": "m", "image": "a.png", "conversations": qa("<image>\nColour?", "red")
                        + qa("Shape?", "circle")}, 0)
    assert [(t.role, plain_text(t.text)) for t in rec.turns] == [
        ("user", "Colour?"), ("assistant", "red"), ("user", "Shape?"), ("assistant", "circle")]
    text = parse_record({"id": "t", "conversations": qa("Two plus two?", "four")}, 0)
    assert text.image is None and text.turns[0].text == "Two plus two?"


def test_load_records_reports_bad_ones_by_id_or_index(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "ok", "conversations": qa("Hi?", "hi")}, 5,
                                {"conversations": qa("Hi?", "hi")}, {"id": "bad", "conversations": []}]))
    good, bad = load_records(path)
    assert [r.id for r in good] == ["ok", "d.json#2"]  # ids are optional: named by source and position
    assert [(r.id, r.reason) for r in bad] == [("d.json#1", "not_an_object"), ("bad", "no_conversations")]


# ---------------------------------------------------------------------------------------------- reading JSON


def test_json_and_jsonl_read_the_same_records(tmp_path):
    ids = write_good_dataset(tmp_path / "a", n=6)
    write_good_dataset(tmp_path / "b", n=6, jsonl=True)
    a, _ = load_records(tmp_path / "a" / "chat.json")
    b, _ = load_records(tmp_path / "b" / "chat.jsonl")
    assert a == b and [r.id for r in a] == ids
    assert read_raw(tmp_path / "b" / "chat.jsonl") == json.loads((tmp_path / "a" / "chat.json").read_text())


def test_read_raw_empty_array_and_blank_lines(tmp_path):
    (tmp_path / "e.json").write_text(" [ ] \n")
    (tmp_path / "l.jsonl").write_text('{"id": 1}\n\n{"id": 2}\n')
    assert read_raw(tmp_path / "e.json") == []
    assert read_raw(tmp_path / "l.jsonl") == [{"id": 1}, {"id": 2}]


@pytest.mark.parametrize("name, text, where", [
    ("a.json", '[\n {"id": "a"},\n {"id": "b",}\n]', "line 3 column 13"),
    ("b.json", '[\n {"id": "a"}\n {"id": "b"}\n]', "line 3 column 2"),
    ("c.json", '[{"id": "a"}] trailing', "line 1 column 15"),
    ("d.json", '[{"id": "a"}', "line 1 column 13"),
    ("e.jsonl", '{"id": \n{"id": "a"\n', "line 1 column 8"),  # no line parses: not JSONL at all
])
def test_malformed_json_names_file_and_position(tmp_path, name, text, where):
    (tmp_path / name).write_text(text)
    with pytest.raises(UsageError) as err:
        load_records(tmp_path / name)
    assert name in str(err.value) and where in str(err.value)
    with pytest.raises(UsageError) as err:
        read_raw(tmp_path / name)  # strict reading
    assert name in str(err.value)


def test_bad_utf8_names_the_line(tmp_path):
    (tmp_path / "a.json").write_bytes(b'[\n{"id": "a"},\n{"id": "\xff"}]')
    (tmp_path / "b.jsonl").write_bytes(b'{"id": "a"}\n{"id": "\xff"}\n')
    for name in ("a.json", "b.jsonl"):
        with pytest.raises(UsageError, match=rf"{name}: not UTF-8 text at line \d"):
            read_raw(tmp_path / name)
    with pytest.raises(UsageError, match="line 3"):
        read_raw(tmp_path / "a.json")
    with pytest.raises(UsageError, match="line 2"):
        read_raw(tmp_path / "b.jsonl")


def test_not_a_record_list_is_a_usage_error(tmp_path):
    (tmp_path / "x.json").write_text('"just a string"')
    (tmp_path / "empty.json").write_text("")
    for name in ("x.json", "empty.json", "missing.json"):
        with pytest.raises(UsageError, match=name):
            read_raw(tmp_path / name)


# ---------------------------------------------------------------------------------------------- resolve_data


def test_resolve_data_rules(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    (d / "chat.json").write_text("[]")
    (d / "test.jsonl").write_text("")
    assert resolve_data(str(d)) == (d / "chat.json", d)  # no image folder: the data folder itself
    (d / "images").mkdir()
    assert resolve_data(str(d), split="train") == (d / "chat.json", d / "images")
    (d / "images_dl").mkdir()
    assert resolve_data(str(d)) == (d / "chat.json", d / "images_dl")  # images_dl/ wins over images/
    assert resolve_data(str(d), split="test") == (d / "test.jsonl", d / "images_dl")
    assert resolve_data(str(d / "chat.json"), image_dir=str(d / "images")) == (d / "chat.json", d / "images")
    for args, named in [((str(tmp_path / "nope"),), "nope"), ((str(d), "val"), "val.json"),
                        ((str(d), None, str(tmp_path / "imgs")), "imgs")]:
        with pytest.raises(UsageError, match=named):
            resolve_data(*args)


# ---------------------------------------------------------------------------------------------- images


def test_resolve_image_escapes_and_missing(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "sub" / "ok.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    assert resolve_image(root, "sub/../sub/ok.png") == (root / "sub" / "ok.png").resolve()
    for rel in ("../secret.png", str(tmp_path / "secret.png"), "link.png", "sub/../../secret.png"):
        with pytest.raises(BadRecord) as err:
            resolve_image(root, rel)
        assert err.value.reason == "image_path_escapes_root", rel
    with pytest.raises(BadRecord) as err:
        resolve_image(root, "sub/none.png")
    assert err.value.reason == "missing_image"


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_open_image_converts_modes_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # transparent pixel -> white
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([9, 9, 9, 0, 200, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)  # palette index 0 is transparent -> white
    cases = {
        "rgba.png": (rgba, {}, [(255, 255, 255), (255, 0, 0)]),
        "p.png": (pal, {"transparency": 0}, [(255, 255, 255), (0, 200, 0)]),
        "l.png": (Image.new("L", (4, 4), 77), {}, [(77, 77, 77)] * 2),
        "la.png": (Image.new("LA", (4, 4), (77, 0)), {}, [(255, 255, 255)] * 2),
        "i16.png": (Image.new("I;16", (4, 4), 256 * 100), {}, [(100, 100, 100)] * 2),
        "cmyk.tiff": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), {}, [(255, 255, 255)] * 2),
        "one.png": (Image.new("1", (4, 4), 1), {}, [(255, 255, 255)] * 2),
    }
    for name, (img, kw, (corner, other)) in cases.items():
        out = open_image(_save(img, tmp_path / name, **kw))
        assert out.mode == "RGB" and out.size == (4, 4), name
        assert out.getpixel((0, 0)) == corner and out.getpixel((3, 3)) == other, name


def test_open_image_reasons_even_if_truncated_loading_was_enabled(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some training scripts set it
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 80).convert("RGB").save(buf, format="JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "e.png").write_bytes(b"")
    (tmp_path / "n.png").write_bytes(b"GIF89a-ish but not really an image")
    for name, reason in [("t.jpg", "truncated_image"), ("e.png", "empty_image"), ("n.png", "not_an_image")]:
        with pytest.raises(BadRecord) as err:
            open_image(tmp_path / name)
        assert err.value.reason == reason, name
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_check_image_agrees_with_open_image(tmp_path):
    write_bad_dataset(tmp_path)
    outcomes = []
    for path in sorted((tmp_path / "images_dl").iterdir()):
        got = []
        for fn in (open_image, check_image):
            try:
                fn(path)
                got.append("ok")
            except BadRecord as e:
                got.append(e.reason)
        outcomes.append(got[0])
        assert got[0] == got[1], path.name
    assert {"ok", "truncated_image", "not_an_image", "empty_image", "image_too_large"} <= set(outcomes)


def test_open_image_pixel_limit(tmp_path):
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "a.png")
    assert open_image(path, max_pixels=10_000).size == (100, 100)
    with pytest.raises(BadRecord) as err:
        open_image(path, max_pixels=9_999)
    assert err.value.reason == "image_too_large"


# ---------------------------------------------------------------------------------------------- check


def _bad_report(tmp_path: Path, **kw) -> tuple[dict[str, str], check.CheckReport]:
    expected = write_bad_dataset(tmp_path)
    file, root = resolve_data(str(tmp_path))
    return expected, check.check_file(file, root, progress=False, **kw)


def test_check_finds_every_reason(tmp_path):
    expected, report = _bad_report(tmp_path, workers=1)
    assert {r.id: r.reason for r in report.bad} == expected
    assert [r.id for r in report.usable] == list(BAD_DATASET_GOOD_IDS)
    assert report.total == len(expected) + len(BAD_DATASET_GOOD_IDS)
    assert sum(report.counts.values()) == len(expected)


def test_check_in_a_process_pool_matches_in_process(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "MIN_POOL", 0)
    monkeypatch.setattr(check, "CHUNK", 3)
    expected, report = _bad_report(tmp_path, workers=2)
    assert {r.id: r.reason for r in report.bad} == expected
    assert [r.id for r in report.usable] == list(BAD_DATASET_GOOD_IDS)


def test_check_too_long_with_a_length_fn(tmp_path):
    write_good_dataset(tmp_path, n=8)
    good, _ = load_records(tmp_path / "chat.json")
    lengths = {r.id: 10 + 100 * (r.image is not None) for r in good}
    report = check.check_records(good, tmp_path / "images_dl", workers=1, progress=False,
                                 length_fn=lambda r: lengths[r.id], max_length=50)
    assert sorted(r.id for r in report.bad if r.reason == "too_long") == sorted(i for i, n in lengths.items() if n > 50)
    assert [r.image for r in report.usable] == [None, None]


def test_print_report_caps_the_list(tmp_path):
    _, report = _bad_report(tmp_path, workers=1)
    out = io.StringIO()
    check.print_report(report, Path("chat.json"), Path("images_dl"), out=out, limit=3)
    text = out.getvalue()
    assert f"and {len(report.bad) - 3} more (see --json)" in text
    assert "  image_count_mismatch" in text and f"{len(BAD_DATASET_GOOD_IDS)} usable" in text
    assert "format llava (" in text  # the format read, and its mapping


def test_cli_check_exit_codes_and_json(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    write_good_dataset(good, n=6)
    expected = write_bad_dataset(bad)
    assert cli.main(["data", "check", str(good)]) == 0
    assert cli.main(["data", "check", str(bad), "--json", str(tmp_path / "r.json"), "--workers", "1"]) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert {b["id"]: b["reason"] for b in report["bad"]} == expected
    assert report["usable"] == len(BAD_DATASET_GOOD_IDS) and report["total"] == report["usable"] + len(expected)
    assert report["counts"]["image_count_mismatch"] == 4 and report["counts"]["image_token_mismatch"] == 1
    assert set(report["formats"]) == {"llava"} and report["image_root"] == str(bad / "images_dl")
    assert "truncated_png  truncated_image" in capsys.readouterr().out
    assert cli.main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert cli.main(["data", "check", str(good), "--max-length", "10"]) == 2  # needs --model to count tokens


def test_cli_check_model_counts_tokens(tmp_path, tmp_path_factory, capsys):
    """`--model` alone checks lengths against train's default limit (or the model's context, if shorter)."""
    from fixtures.models import model_world

    from llava_lora.chat.encode import DEFAULT_MAX_LENGTH, model_context_length

    model = model_world(tmp_path_factory).qwen_model
    write_good_dataset(tmp_path, n=4)
    assert cli.main(["data", "check", str(tmp_path), "--model", str(model)]) == 0
    limit = min(DEFAULT_MAX_LENGTH, model_context_length(str(model)))
    assert f"too_long check: max_length {limit}" in capsys.readouterr().out
    assert cli.main(["data", "check", str(tmp_path), "--model", str(model), "--max-length", "10"]) == 1
    assert capsys.readouterr().out.count("too_long") == 4 + 1  # the summary line and each record
    assert cli.main(["data", "check", str(tmp_path), "--model", str(tmp_path / "nowhere")]) == 2


def test_cli_check_subprocess_exit_code(tmp_path):
    write_bad_dataset(tmp_path)
    res = subprocess.run([str(VENV_BIN / "llava-lora"), "data", "check", str(tmp_path), "--workers", "1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "missing_image" in res.stdout


# ---------------------------------------------------------------------------------------------- synth


def _synth(out: Path, **kw) -> int:
    return synth.main(synth.SynthConfig(out=str(out), **{"n": 40, "n_test": 12, "image_size": 32, **kw}))


def test_synth_is_deterministic_and_held_out_images_differ(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _synth(a) == 0 and _synth(b) == 0
    for name in ("chat.json", "test.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    pngs = sorted(p.name for p in (a / "images_dl").iterdir())
    assert len(pngs) == 52 and all((a / "images_dl" / p).read_bytes() == (b / "images_dl" / p).read_bytes()
                                   for p in pngs)
    train, bad_train = load_records(a / "chat.json")
    test, bad_test = load_records(resolve_data(str(a), split="test")[0])
    assert not bad_train and not bad_test and (len(train), len(test)) == (40, 12)
    pixels = {r.image: Image.open(a / "images_dl" / r.image).tobytes() for r in train + test}
    assert not {pixels[r.image] for r in test} & {pixels[r.image] for r in train}
    assert {r.image for r in test}.isdisjoint(r.image for r in train)
    assert _synth(tmp_path / "c", seed=1) == 0
    assert (tmp_path / "c" / "chat.json").read_bytes() != (a / "chat.json").read_bytes()


def test_synth_records_are_learnable_questions(tmp_path):
    _synth(tmp_path, n=80)
    train, _ = load_records(tmp_path / "chat.json")
    answers = {k: set() for k in synth.QUESTIONS.values()}
    for rec in train:
        for q, a in zip(rec.turns[::2], rec.turns[1::2]):
            answers[plain_text(q.text)].add(a.text)
    assert answers[synth.QUESTIONS["colour"]] <= set(synth.COLOURS)
    assert answers[synth.QUESTIONS["shape"]] <= set(synth.SHAPES)
    assert answers[synth.QUESTIONS["position"]] <= set(synth.POSITIONS)
    assert answers[synth.QUESTIONS["size"]] <= set(synth.SIZES)
    assert {r.image_first for r in train} == {True, False}
    assert {len(r.turns) for r in train} == {2, 2 * len(synth.QUESTIONS)}
    file, root = resolve_data(str(tmp_path))
    assert root == tmp_path / "images_dl" and check.check_file(file, root, workers=1, progress=False).bad == []


def test_synth_draws_the_labelled_quadrant_and_colour():
    scene = synth.Scene("square", "blue", "large", "bottom right", 0.0, 0.0, 0.5, (240, 240, 240))
    img = synth.draw(scene, 64)
    assert img.getpixel((48, 48)) == synth.COLOURS["blue"]
    assert img.getpixel((16, 16)) == img.getpixel((48, 16)) == img.getpixel((16, 48)) == (240, 240, 240)


def test_synth_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="--overwrite"):
        _synth(tmp_path)
    with pytest.raises(UsageError, match="was not written by llava-lora"):  # not ours: --overwrite keeps it too
        _synth(tmp_path, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    outdirs.mark(tmp_path)  # as an earlier synth would have
    assert _synth(tmp_path, overwrite=True) == 0 and _synth(tmp_path, overwrite=True, n=10) == 0
    # --overwrite means what it means everywhere: OUT replaced, its old contents (the earlier images too) gone
    assert sorted(p.name for p in tmp_path.iterdir()) == [".llava-lora", "chat.json", "images_dl", "synth.yaml",
                                                          "test.json"]
    assert len(list((tmp_path / "images_dl").iterdir())) == 22
