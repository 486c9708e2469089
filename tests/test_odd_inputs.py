"""Odd inputs through every command: each is used correctly or refused with its reason, none crashes.

    .venv/bin/pytest tests/test_odd_inputs.py -q -m "not slow"    # per-file checks, a few seconds
    .venv/bin/pytest tests/test_odd_inputs.py -q                   # + train/eval/generate and the demo on the corpus

The corpus (``fixtures/odd_inputs.py``) is written with PIL at test time.
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fixtures.demo import demo_assets, engine_for, free_port, running_demo  # noqa: F401
from fixtures.models import FAST, model_world
from fixtures.data import png_header_only
from llava_lora.infer import answers, demo, demo_checks, generate
from llava_lora import cli
from llava_lora.data import images
from llava_lora.chat.batches import TrainDataset
from llava_lora.train.sampler import DropFailed, ResumableBatchSampler
from llava_lora.data.images import check_image, locate_records, open_image, resolve_image
from llava_lora.data.records import duplicate_ids, load_records
from llava_lora.errors import BadRecord, Rejected
from fixtures.odd_inputs import UPRIGHT_SIZE, Corpus, upright_picture, write_odd_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return write_odd_corpus(tmp_path_factory.mktemp("odd"))


def _verdict(fn, *args) -> str:
    try:
        fn(*args)
        return "used"
    except BadRecord as e:
        return e.reason


# ---------------------------------------------------------------------------------------------- images, fast


def test_each_odd_image_opens_or_is_refused_with_its_reason(corpus):
    for odd in corpus.images:
        want = odd.reason or "used"
        for fn in (open_image, check_image):
            assert _verdict(lambda: fn(resolve_image(corpus.root, odd.file))) == want, (odd.id, fn.__name__)


def test_opened_images_are_rgb_and_the_gif_is_its_first_frame(corpus):
    for odd in corpus.images:
        if odd.reason is None:
            assert open_image(resolve_image(corpus.root, odd.file)).mode == "RGB", odd.id
    gif = open_image(corpus.root / "animated.gif")
    assert gif.getpixel((8, 8)) == (200, 0, 0)  # frame 0 is red; frames 1 and 2 blue and green
    assert open_image(corpus.root / "palette_transparent.png").getpixel((0, 0)) == (255, 255, 255)
    assert open_image(corpus.root / "grey16.png").getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256, not clipped


def test_a_few_pixel_jpeg_is_checked_without_zero_division(tmp_path):
    for size in ((1, 1), (3, 2), (7, 7), (9, 8)):  # 1/8 of a side is 0 below 8 px
        path = tmp_path / f"{size[0]}x{size[1]}.jpg"
        Image.new("RGB", size, (10, 200, 10)).save(path)
        assert check_image(path) == size and open_image(path).size == size


def _model_sees_upright(image: Image.Image, stored: Path) -> None:
    """``image`` holds exactly the stored JPEG's pixels turned upright, and looks like the upright picture."""
    with Image.open(stored) as raw:
        assert raw.size == UPRIGHT_SIZE[::-1]  # stored sideways
        turned = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert image.size == UPRIGHT_SIZE
    assert np.array_equal(np.asarray(image), np.asarray(turned))
    diff = np.abs(np.asarray(image, dtype=int) - np.asarray(upright_picture(), dtype=int))
    assert diff.max() < 40  # JPEG noise at the quadrant edges; a turned or mirrored copy differs by ~200


def test_exif_rotated_jpeg_reaches_every_command_upright(corpus):
    stored = corpus.root / "exif_rotated.jpg"
    _model_sees_upright(open_image(stored), stored)
    assert check_image(stored) == UPRIGHT_SIZE
    # each command's own way of opening an image
    record = next(r for r in load_records(corpus.data)[0] if r.id == "exif_rotated")
    (image,) = answers.load_image(record, corpus.root)  # a record's images, in placeholder order
    _model_sees_upright(image, stored)
    _model_sees_upright(generate.user_image(str(stored)), stored)
    _model_sees_upright(demo_checks.checked_upload(str(stored), 10**7, 10**7), stored)
    samples = demo_checks.Samples([record], corpus.root, str(corpus.data))
    _model_sees_upright(samples.image(record), stored)


def test_exif_rotated_jpeg_training_pixels_are_those_of_the_upright_image(corpus):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    ds = TrainDataset([], corpus.root, type("P", (), {"tokenizer": None, "image_processor": processor})(), 0, 0, None)
    stored = corpus.root / "exif_rotated.jpg"
    with Image.open(stored) as raw:
        upright = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    want = processor(images=upright, return_tensors="pt")["pixel_values"][0]
    assert np.array_equal(ds._pixels(ds.image_root, "exif_rotated.jpg").numpy(), want.numpy())


def test_decompression_bomb_is_refused_before_decoding(corpus, tmp_path, monkeypatch):
    def no_decoding(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(BadRecord) as err:
        open_image(corpus.root / "bomb.png")
    assert err.value.reason == "image_too_large" and "decompression bomb" in err.value.detail
    (tmp_path / "big.png").write_bytes(png_header_only(8000, 8000))  # under PIL's limit, over ours
    with pytest.raises(BadRecord, match="refused before decoding") as err:
        check_image(tmp_path / "big.png")
    assert err.value.reason == "image_too_large"


def test_a_file_the_os_will_not_let_us_read_is_unreadable_image(corpus, monkeypatch):
    # chmod 000 does not stop root (these tests' user): the OS's refusal is stubbed at the open call instead
    def denied(path, *args, **kwargs):
        if str(path).endswith("one_px.png"):
            raise PermissionError(13, "Permission denied")
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(images, "open", denied, raising=False)
    with pytest.raises(BadRecord, match="one_px.png: Permission denied") as err:
        open_image(corpus.root / "one_px.png")
    assert err.value.reason == "unreadable_image"


def test_any_decoder_exception_is_the_records_reason(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)

    def boom(self):
        raise RuntimeError("a decoder bug")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    with pytest.raises(BadRecord, match="a.png: RuntimeError: a decoder bug") as err:
        open_image(path)
    assert err.value.reason == "undecodable_image"


def test_locate_records_finds_missing_escaping_and_folders_by_stat(corpus, monkeypatch):
    monkeypatch.setattr(images, "_decode", lambda *a: pytest.fail("locate_records decoded an image"))
    records, _ = load_records(corpus.data)
    kept, bad = locate_records(records, corpus.root)
    assert {r.id: r.reason for r in bad} == {
        "folder": "not_a_file", "escape_link": "image_path_escapes_root", "missing": "missing_image"}
    assert len(kept) + len(bad) == len(records)


# ---------------------------------------------------------------------------------------------- data files, fast


def test_jsonl_with_a_blank_and_a_garbled_line_and_a_bom_json(corpus):
    records, bad = load_records(corpus.data)
    assert [(r.id, r.reason) for r in bad] == [(f"line {corpus.garbled_line}", "invalid_json")]
    assert f"line {corpus.garbled_line} column" in bad[0].detail and "chat.jsonl" in bad[0].detail
    assert [r.id for r in records].count("dup") == 2 and len(records) == len(corpus.images) + 3
    assert duplicate_ids(records) == {"dup": 2}
    bom, bom_bad = load_records(corpus.bom)
    assert [r.id for r in bom] == ["one_px", "tall_1x4000", "text_only"] and not bom_bad


def test_data_check_on_the_corpus(corpus, tmp_path, capsys):
    report = tmp_path / "report.json"
    assert cli.main(["data", "check", str(corpus.data), "--json", str(report)]) == 1
    out = capsys.readouterr().out
    got = json.loads(report.read_text())
    assert {b["id"]: b["reason"] for b in got["bad"]} == corpus.expected_bad()
    assert got["duplicate_ids"] == {"dup": 2} and "duplicate ids, records still used" in out and "dup (2x)" in out
    assert got["usable"] == len(corpus.used_ids()) + 1  # dup counts twice
    for b in got["bad"]:  # the file is named
        odd = next((o for o in corpus.images if o.id == b["id"]), None)
        assert odd is None or Path(odd.file).name in b["detail"], b
    assert cli.main(["data", "check", str(corpus.bom), "--image-dir", str(corpus.root)]) == 1  # tall_1x4000
    assert "3 records, 2 usable" in capsys.readouterr().out


def test_generate_refuses_each_bad_image_in_one_line_before_loading_the_model(corpus, tmp_path, capsys):
    not_a_model = tmp_path / "no-model"  # never reached: the image is refused first
    for odd in corpus.images:
        if odd.reason is None or odd.reason == "image_path_escapes_root":  # no image root for a user's file
            continue
        path = corpus.root / odd.file
        rc = cli.main(["generate", "--model", str(not_a_model), "--image", str(path), "--prompt", "What?"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, (odd.id, err)
        assert err.startswith("llava-lora generate: error: --image") and odd.reason in err and odd.file in err, err


def test_demo_upload_handler_uses_or_refuses_each_image(corpus):
    for odd in corpus.images:
        path = corpus.root / odd.file
        if odd.reason in (None, "image_path_escapes_root"):  # an upload has no root: the link's target is used
            assert demo_checks.checked_upload(str(path), 10**7, 16_000_000).mode == "RGB", odd.id
        else:
            with pytest.raises(demo_checks.RequestError) as err:
                demo_checks.checked_upload(str(path), 10**7, 16_000_000)
            assert odd.reason in str(err.value) or "too large" in str(err.value) or "cannot read" in str(err.value)


# ---------------------------------------------------------------------------------------------- sampler, fast


def test_drop_failed_keeps_failed_records_out_of_later_batches():
    inner = ResumableBatchSampler(8, 2, seed=0)
    failed: set[int] = set()
    batches = iter(DropFailed(inner, failed))
    first_epoch = [next(batches) for _ in range(4)]
    assert sorted(i for b in first_epoch for i in b) == list(range(8))
    failed.update({3, 5})
    later = [next(batches) for _ in range(8)]
    assert all(len(b) <= 2 for b in later) and not {3, 5} & {i for b in later for i in b}
    assert sum(len(b) for b in later) == 12  # two epochs of the other six


# ---------------------------------------------------------------------------------------------- commands, slow


@pytest.mark.slow
def test_train_eval_generate_over_the_corpus(corpus, tmp_path_factory, tmp_path, capsys):
    model = model_world(tmp_path_factory).qwen_model
    run = tmp_path / "run"
    rc = cli.main(["train", "--model", str(model), "--data", str(corpus.data), "--out", str(run), *FAST,
                   "--batch-size", "2", "--max-steps", "24", "--no-group-by-length", "--save-every", "100"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((run / "data_report.json").read_text())
    assert {s["id"]: s["reason"] for s in report["samples"]} == corpus.expected_bad()
    assert report["duplicate_ids"] == {"dup": 2} and report["records"] == len(corpus.images) + 4
    by_stat = {"not_a_file", "image_path_escapes_root", "missing_image", "invalid_json"}
    for s in report["samples"]:
        assert (s["when"] == "loading") == (s["reason"] in by_stat), s
    drawn = [json.loads(x) for x in (run / "skipped.rank0.jsonl").read_text().splitlines()]
    assert sorted(d["id"] for d in drawn) == sorted(k for k, v in corpus.expected_bad().items() if v not in by_stat)

    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", str(model), "--adapter", str(run), "--data", str(corpus.data),
                     "--out", str(out), "--max-new-tokens", "4", "--batch-size", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {s["id"]: s["reason"] for s in summary["skipped"]} == corpus.expected_bad()
    predicted = [json.loads(x)["id"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(predicted) == sorted([*corpus.used_ids(), "dup"])

    capsys.readouterr()
    for odd in corpus.images:  # a user's image has no root: the link's target is answered like any file
        if odd.reason in (None, "image_path_escapes_root"):
            rc = cli.main(["generate", "--model", str(model), "--adapter", str(run), "--image",
                           str(corpus.root / odd.file), "--prompt", "What colour is it?", "--max-new-tokens", "4"])
            assert rc == 0, (odd.id, capsys.readouterr().err)


@pytest.mark.slow
def test_demo_over_the_corpus_through_gradio_client(corpus, demo_assets, monkeypatch):  # noqa: F811
    """Each odd image uploaded to a launched page (127.0.0.1), and each corpus record shown in tab 1."""
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    engine = engine_for(demo_assets, adapter=True)
    seen: list = []
    real_compare = engine.compare

    def compare(prompt, image, settings):  # the image the model is given, kept for the assertions
        seen.append(image)
        yield from real_compare(prompt, image, settings)

    monkeypatch.setattr(engine, "compare", compare)
    cfg = demo.DemoConfig(model=str(demo_assets.model), adapter=str(demo_assets.adapter), data=str(corpus.data),
                          image_dir=str(corpus.root), port=free_port(), max_new_tokens=4)
    greedy = (4, True, 0.7, 1.0, 0, 1.0)
    outcome = {}
    with running_demo(cfg, engine) as url:
        client = Client(url, verbose=False)
        for odd in corpus.images:
            path = corpus.root / odd.file
            if not path.is_file():  # a folder or a missing file cannot be uploaded: the client refuses it
                with pytest.raises((ValueError, OSError)):
                    client.predict(handle_file(str(path)), "What?", *greedy, api_name="/compare_upload")
                outcome[odd.id] = "client refuses"
                continue
            seen.clear()
            try:
                *_, status = client.predict(handle_file(str(path)), "What?", *greedy, api_name="/compare_upload")
                assert status.startswith("Done"), odd.id
                assert len(seen) == 1 and seen[0].mode == "RGB", odd.id
                outcome[odd.id] = "used"
                if odd.id == "exif_rotated":
                    _model_sees_upright(seen[0], path)
            except AppError as e:
                outcome[odd.id] = f"refused: {e}"
        # tab 1: every parsed record is shown; one whose image cannot load says why in the page
        records, _ = load_records(corpus.data)
        for i, rec in enumerate(records):
            image, _, _, info = client.predict(i, api_name="/show_sample")
            odd = next((o for o in corpus.images if o.id == rec.id), None)
            if odd is not None and odd.reason is not None:
                assert image is None and odd.reason in info, (rec.id, info)
            else:
                assert (image is not None) == (rec.image is not None) and rec.id in info, rec.id
        bad_index = next(i for i, r in enumerate(records) if r.id == "garbage")
        with pytest.raises(AppError, match="truncated_image"):
            client.predict(bad_index, *greedy, api_name="/compare_sample")
    print(json.dumps(outcome, indent=1, ensure_ascii=False))  # the closing note's demo column (pytest -s)
    for odd in corpus.images:
        want = "used" if odd.reason in (None, "image_path_escapes_root") else "refused"
        if odd.reason in ("not_a_file", "missing_image"):
            want = "client refuses"
        assert outcome[odd.id].startswith(want), (odd.id, outcome[odd.id])
        if want == "refused" and odd.reason not in ("image_too_large", "truncated_image"):
            # Gradio opens the header itself first: a bomb or garbage is refused in its words, the rest in ours
            assert odd.reason in outcome[odd.id], outcome[odd.id]


# ---------------------------------------------------------------------------------------------- processor refusals


class _RefusingProcessor:
    """An image processor that refuses 1x1 images, as a processor with its own limits would."""

    def __call__(self, images, return_tensors=None):
        import torch

        if any(im.size == (1, 1) for im in (images if isinstance(images, list) else [images])):
            raise ValueError("cannot infer the channel dimension of a 1x1 image")
        return {"pixel_values": torch.zeros(1, 3, 4, 4)}


def test_a_processor_refusal_is_the_records_skip_in_training(corpus):
    records, _ = load_records(corpus.data)
    proc = type("P", (), {"tokenizer": None, "image_processor": _RefusingProcessor()})()
    ds = TrainDataset(records, corpus.root, proc, 0, 0, None)
    with pytest.raises(BadRecord, match="one_px.png: ValueError: cannot infer") as err:
        ds._pixels(ds.image_root, "one_px.png")
    assert err.value.reason == "preprocess_failed"
    assert ds._pixels(ds.image_root, "cmyk.jpg").shape == (3, 4, 4)
    assert err.value.rejected("one_px", 3) == Rejected("one_px", "preprocess_failed", err.value.detail, 3)


def test_a_batch_that_fails_in_eval_is_asked_sample_by_sample(corpus, monkeypatch):
    records = [r for r in load_records(corpus.data)[0] if r.id in ("one_px", "cmyk", "webp", "text_only")]

    def fake_answer_each(model, processor, texts, imgs, settings, adapters):
        if any(im is not None and im[0].size == (1, 1) for im in imgs):  # each sample: its list of images
            raise ValueError("cannot infer the channel dimension of a 1x1 image")
        return [["red"] * len(texts) for _ in adapters]

    monkeypatch.setattr(answers, "answer_each", fake_answer_each)
    monkeypatch.setattr(answers.prompts, "generation_prompt", lambda tok, msgs: str(msgs))
    proc = type("P", (), {"tokenizer": None, "image_processor": _RefusingProcessor()})()
    predictions, skipped = answers.predict(None, proc, records, corpus.root, None, batch_size=4, progress=False)
    assert sorted(p.id for p in predictions) == ["cmyk", "text_only", "webp"]
    assert [(s["id"], s["reason"]) for s in skipped] == [("one_px", "preprocess_failed")]
    assert "one_px.png: ValueError: cannot infer" in skipped[0]["detail"]
    # a failure of the model itself is not a record's fault: raised, not skipped
    proc.image_processor = lambda **kw: {}
    with pytest.raises(ValueError, match="cannot infer"):
        answers.predict(None, proc, records, corpus.root, None, batch_size=4, progress=False)


def test_generate_and_demo_refuse_what_the_processor_refuses_in_one_line(corpus, monkeypatch, capsys):
    proc = type("P", (), {"tokenizer": None, "image_processor": _RefusingProcessor()})()
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: (None, proc))
    path = corpus.root / "one_px.png"
    assert cli.main(["generate", "--model", "m", "--image", str(path), "--prompt", "What?"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one_px.png: preprocess_failed: ValueError" in err
    with pytest.raises(demo_checks.RequestError, match="preprocess_failed"):
        demo_checks.check_pixels(proc, open_image(path))


def test_data_check_reports_a_record_the_tokenizer_cannot_encode(corpus):
    from llava_lora.data import check

    records, _ = load_records(corpus.data)

    def length(rec):
        if rec.id == "cmyk":
            raise BadRecord("empty_supervision", "no assistant token is supervised")
        if rec.id == "webp":
            raise RuntimeError("tokenizer bug")
        return 10

    report = check.check_records(records, corpus.root, length_fn=length, max_length=100, progress=False)
    got = {r.id: r.reason for r in report.bad}
    assert got["cmyk"] == "empty_supervision" and got["webp"] == "encode_failed"
