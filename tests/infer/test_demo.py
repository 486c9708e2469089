"""``llava-lora demo`` through its HTTP API (gradio_client), on a tiny model with a 3-step adapter.

    .venv/bin/pytest tests/infer/test_demo.py -q
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
from gradio_client import Client, handle_file  # noqa: E402  (after the importorskip)
from gradio_client.exceptions import AppError  # noqa: E402
from PIL import Image  # noqa: E402

from fixtures.demo import demo_assets, demo_config, engine_for, running_demo  # noqa: E402, F401, F811
from fixtures.data import png_header_only  # noqa: E402
from llava_lora import cli
from llava_lora.chat import prompts  # noqa: E402
from fixtures.models import auto_cpu_dtype  # noqa: E402
from llava_lora.data.records import load_records, open_image, resolve_data, resolve_image  # noqa: E402
from llava_lora.infer.demo import API_COMPARE_SAMPLE, API_COMPARE_UPLOAD, API_SHOW_SAMPLE, DemoConfig, build_app, match_badge
from llava_lora.infer.demo_checks import RequestError, Samples, checked_upload, ui_settings
from llava_lora.errors import UsageError  # noqa: E402
from llava_lora.infer.engine import GenerationSettings, answer  # noqa: E402
from llava_lora.model.parts import dtypes_by_role  # noqa: E402

pytestmark = pytest.mark.slow  # every test here trains or serves a model: `make test` runs them

# max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty
GREEDY = (12, True, 0.7, 1.0, 0, 1.0)
SETTINGS = GenerationSettings(max_new_tokens=12)
QUESTION = "What colour is the shape?"


def expected(engine, msgs: list[dict], image) -> tuple[str, str]:
    """(base, fine-tuned) greedy answers of the batch path that eval uses."""
    prompt = prompts.generation_prompt(engine.processor.tokenizer, msgs)
    base = answer(engine.model, engine.processor, [prompt], [image], SETTINGS, adapter=False)[0]
    tuned = answer(engine.model, engine.processor, [prompt], [image], SETTINGS, adapter=True)[0]
    return base, tuned


def upload_msgs(question: str, image: bool = True) -> list[dict]:
    return [{"role": "user", "content": prompts.content(question, image, True)}]


@pytest.fixture(scope="module")
def test_split(demo_assets):
    file, root = resolve_data(demo_assets.data, "test")
    records, _ = load_records(file)
    return records, root


@pytest.fixture(scope="module")
def demo(demo_assets):
    """(client, engine) of a page with adapter and data, shared by the tests of this module."""
    engine = engine_for(demo_assets, adapter=True)
    with running_demo(demo_config(demo_assets, max_upload_pixels=1_000_000, max_upload_mb=0.05), engine) as url:
        yield Client(url, verbose=False), engine


def image_file(tmp_path: Path, size: int = 48, name: str = "shape.png") -> Path:
    path = tmp_path / name
    Image.new("RGB", (size, size), (215, 35, 35)).save(path)
    return path


# --------------------------------------------------------------------------------------------------------
# The endpoints
# --------------------------------------------------------------------------------------------------------


def test_endpoints_have_stable_names(demo):
    client, _ = demo
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert names == {f"/{API_SHOW_SAMPLE}", f"/{API_COMPARE_SAMPLE}", f"/{API_COMPARE_UPLOAD}"}


def test_show_sample(demo, test_split):
    client, _ = demo
    records, root = test_split
    image, question, reference, info = client.predict(2, api_name=f"/{API_SHOW_SAMPLE}")
    assert question == prompts.question(records[2]) and reference == records[2].turns[-1].text
    assert records[2].id in info
    assert Image.open(image).size == open_image(resolve_image(root, records[2].image)).size


def test_compare_sample_streams_both_answers(demo, test_split):
    client, engine = demo
    records, root = test_split
    record = records[1]
    job = client.submit(1, *GREEDY, api_name=f"/{API_COMPARE_SAMPLE}")
    base, base_match, tuned, tuned_match, status = job.result(timeout=60)
    msgs, reference = prompts.prompt_and_reference(record)
    assert (base, tuned) == expected(engine, msgs, open_image(resolve_image(root, record.image)))
    assert base_match == match_badge(base, reference) and tuned_match == match_badge(tuned, reference)
    assert status.startswith("Done")
    # token by token: the page saw the base answer grow before it was complete
    partial = [out[0] for out in job.outputs() if 0 < len(out[0]) < len(base)]
    assert partial and all(base.startswith(p) for p in partial)


def test_engine_holds_one_bf16_copy_and_runs_the_tower_once_per_comparison(demo, test_split):
    _, engine = demo
    dtype = auto_cpu_dtype()
    assert dtypes_by_role(engine.model) == {"frozen": {dtype}, "LoRA": {torch.float32}, "projector": {dtype}}
    records, root = test_split
    image = open_image(resolve_image(root, records[0].image))
    prompt = engine.prompt(prompts.prompt_and_reference(records[0])[0])
    tower = engine.model.get_base_model().model.vision_tower.embeddings  # runs once per pass of the tower
    calls = []
    hook = tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        *_, (base, tuned, status) = engine.compare(prompt, image, SETTINGS)
    finally:
        hook.remove()
    assert len(calls) == 1 and status.startswith("Done")
    assert (base, tuned) == expected(engine, prompts.prompt_and_reference(records[0])[0], image)


def test_compare_upload(demo, tmp_path):
    client, engine = demo
    path = image_file(tmp_path)
    base, tuned, status = client.predict(handle_file(str(path)), QUESTION, *GREEDY,
                                         api_name=f"/{API_COMPARE_UPLOAD}")
    assert (base, tuned) == expected(engine, upload_msgs(QUESTION), open_image(path))
    assert status.startswith("Done")


def test_compare_upload_with_several_images(demo, tmp_path):
    """The first box and the further images, each where an <image> stands (else all first), as generate does."""
    client, engine = demo
    red = image_file(tmp_path)
    blue = tmp_path / "blue.png"
    Image.new("RGB", (40, 40), (30, 40, 220)).save(blue)
    for question in ("<image> and <image>: which is brighter?", "Which is brighter?"):
        base, tuned, status = client.predict(handle_file(str(red)), question, *GREEDY, [handle_file(str(blue))],
                                             api_name=f"/{API_COMPARE_UPLOAD}")
        msgs = prompts.user_messages(question, 2)
        assert (base, tuned) == expected(engine, msgs, [open_image(red), open_image(blue)]) and status.startswith("Done")
    with pytest.raises(Exception, match="1 <image> for 2 images"):
        client.predict(handle_file(str(red)), "<image> which?", *GREEDY, [handle_file(str(blue))],
                       api_name=f"/{API_COMPARE_UPLOAD}")


def test_compare_upload_without_image_is_text_only(demo):
    client, engine = demo
    base, tuned, _ = client.predict(None, "Say the word red.", *GREEDY, api_name=f"/{API_COMPARE_UPLOAD}")
    assert (base, tuned) == expected(engine, upload_msgs("Say the word red.", image=False), None)


# --------------------------------------------------------------------------------------------------------
# Refusals and failures: a message in the page, and the server keeps serving
# --------------------------------------------------------------------------------------------------------


def test_upload_over_the_pixel_limit_is_refused_undecoded(demo, tmp_path):
    client, _ = demo
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(2000, 2000))  # 4 MP claimed in ~100 bytes; limit 1 MP
    with pytest.raises(AppError, match=r"too large: .*2000x2000 is over 1,000,000 pixels"):
        client.predict(handle_file(str(bomb)), QUESTION, *GREEDY, api_name=f"/{API_COMPARE_UPLOAD}")


def test_decompression_bomb_is_refused(demo, tmp_path):
    client, _ = demo
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(30_000, 30_000))  # 900 MP: Gradio's own check stops it at the header
    with pytest.raises(AppError) as e:  # Gradio's own error, its text (with the server's paths) not shown
        client.predict(handle_file(str(bomb)), QUESTION, *GREEDY, api_name=f"/{API_COMPARE_UPLOAD}")
    assert "/tmp" not in str(e.value) and "has not enabled verbose error reporting" in str(e.value)


def test_upload_over_the_byte_limit_is_refused(demo, tmp_path):
    client, _ = demo
    big = tmp_path / "noise.png"
    Image.effect_noise((300, 300), 80).convert("RGB").save(big)  # ~230 KB, limit 0.05 MB
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # gradio_client checks first
        client.predict(handle_file(str(big)), QUESTION, *GREEDY, api_name=f"/{API_COMPARE_UPLOAD}")
    # a client that does not check is turned away by the server before the file reaches the model
    with open(big, "rb") as f:
        response = httpx.post(f"{client.src.rstrip('/')}/gradio_api/upload", files={"files": f})
    assert response.status_code == 413
    # and the handler checks the size itself too (a page launched without max_file_size)
    with pytest.raises(RequestError, match=r"bytes, over the limit of 1,000 bytes"):
        checked_upload(str(big), max_bytes=1000, max_pixels=10**6)


def test_not_an_image_is_refused(demo, tmp_path):
    client, _ = demo
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not an image at all")
    with pytest.raises(AppError):
        client.predict(handle_file(str(fake)), QUESTION, *GREEDY, api_name=f"/{API_COMPARE_UPLOAD}")


@pytest.mark.parametrize("settings, message", [  # Gradio's sliders check their range before ui_settings does
    ((10_000, True, 0.7, 1.0, 0, 1.0), "greater than maximum value 256"),
    ((12, False, 0.0, 1.0, 0, 1.0), "less than minimum value 0.05"),
    ((12, True, 0.7, 1.0, -1, 1.0), "less than minimum value 0"),
])
def test_bad_settings_are_refused(demo, settings, message):
    client, _ = demo
    with pytest.raises(AppError, match=message):
        client.predict(None, QUESTION, *settings, api_name=f"/{API_COMPARE_UPLOAD}")


def test_sample_index_out_of_range(demo, test_split):
    client, _ = demo
    with pytest.raises(AppError, match="greater than maximum value 7"):  # the index box's own range check
        client.predict(99, *GREEDY, api_name=f"/{API_COMPARE_SAMPLE}")
    samples = Samples(*test_split, source="test.json")
    for bad in (8, -1, 1.5, "x"):
        with pytest.raises(RequestError, match="out of range 0..7|whole number"):
            samples.get(bad)


def test_broken_sample_shows_a_message_and_the_server_keeps_serving(demo_assets, tmp_path):
    """A sample whose image is gone fails with its reason; the next request is answered."""
    records = [{"id": "gone", "image": "gone.png", "conversations": [
                   {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "red"}]},
               {"id": "fine", "image": "fine.png", "conversations": [
                   {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "chat.json").write_text(json.dumps(records))
    image_file(tmp_path, name="fine.png")
    cfg = demo_config(demo_assets)
    cfg.data, cfg.split = str(tmp_path), None
    with running_demo(cfg, engine_for(demo_assets, adapter=True)) as url:
        client = Client(url, verbose=False)
        *_, info = client.predict(0, api_name=f"/{API_SHOW_SAMPLE}")
        assert "missing_image" in info
        with pytest.raises(AppError, match="sample gone: missing_image"):
            client.predict(0, *GREEDY, api_name=f"/{API_COMPARE_SAMPLE}")
        *_, status = client.predict(1, *GREEDY, api_name=f"/{API_COMPARE_SAMPLE}")
        assert status.startswith("Done")


def test_generation_failure_shows_a_message_and_the_server_keeps_serving(demo, monkeypatch, caplog):
    client, engine = demo
    real = engine.model.generate
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", fail_once)
    with pytest.raises(AppError) as e:
        client.predict(None, QUESTION, *GREEDY, api_name=f"/{API_COMPARE_UPLOAD}")
    # the visitor reads a short message; the log keeps what happened
    assert "generation failed; the server's log has the details" in str(e.value) and "memory" not in str(e.value)
    assert "out of memory (simulated)" in caplog.text
    *_, status = client.predict(None, QUESTION, *GREEDY, api_name=f"/{API_COMPARE_UPLOAD}")
    assert status.startswith("Done")


# --------------------------------------------------------------------------------------------------------
# Two users at once
# --------------------------------------------------------------------------------------------------------


def test_two_concurrent_requests_are_both_answered_one_generate_at_a_time(demo, test_split, tmp_path,
                                                                         monkeypatch):
    client, engine = demo
    records, root = test_split
    msgs, _ = prompts.prompt_and_reference(records[0])
    sample_expected = expected(engine, msgs, open_image(resolve_image(root, records[0].image)))
    real = engine.model.generate
    active, most = [0], [0]
    guard = threading.Lock()

    def counting(*args, **kwargs):
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return real(*args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(engine.model, "generate", counting)
    path = image_file(tmp_path)
    first, second = Client(client.src, verbose=False), Client(client.src, verbose=False)  # two sessions
    jobs = [first.submit(handle_file(str(path)), QUESTION, *GREEDY, api_name=f"/{API_COMPARE_UPLOAD}"),
            second.submit(0, *GREEDY, api_name=f"/{API_COMPARE_SAMPLE}")]
    upload_result, sample_result = (job.result(timeout=120) for job in jobs)
    assert upload_result[:2] == expected(engine, upload_msgs(QUESTION), open_image(path))
    assert (sample_result[0], sample_result[2]) == sample_expected
    assert most[0] == 1  # the adapter switch is model-wide: never two generates at once


# --------------------------------------------------------------------------------------------------------
# Without an adapter, without data
# --------------------------------------------------------------------------------------------------------


def _component_values(app) -> list:
    return [c.get("props", {}).get("value") for c in app.config["components"]]


def test_without_adapter_and_data_the_page_shows_the_base_alone(demo_assets, tmp_path):
    engine = engine_for(demo_assets, adapter=False)
    cfg = demo_config(demo_assets, adapter=False, data=False)
    app = build_app(cfg, engine, None)
    texts = " ".join(str(v) for v in _component_values(app))
    assert "--data DATA" in texts and "Adapter** none" in texts
    with running_demo(cfg, engine) as url:
        client = Client(url, verbose=False)
        names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
        assert names == {f"/{API_COMPARE_UPLOAD}"}
        path = image_file(tmp_path)
        base, tuned, status = client.predict(handle_file(str(path)), QUESTION, *GREEDY,
                                             api_name=f"/{API_COMPARE_UPLOAD}")
        prompt = prompts.generation_prompt(engine.processor.tokenizer, upload_msgs(QUESTION))
        assert base == answer(engine.model, engine.processor, [prompt], [open_image(path)], SETTINGS)[0]
        assert tuned == "" and status.startswith("Done")


def test_header_shows_model_adapter_and_parameter_stats(demo_assets):
    engine = engine_for(demo_assets, adapter=True)
    cfg = demo_config(demo_assets)
    app = build_app(cfg, engine, Samples([], Path("."), "none"))
    texts = " ".join(str(v) for v in _component_values(app))
    assert str(demo_assets.model) in texts and str(demo_assets.adapter) in texts
    assert "LoRA" in texts and "vision tower" in texts and "% trainable" in texts


# --------------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, reference, same", [
    ("Red.", "red", True), ("the  Top left", "top left", True), ("a circle", "circle", True),
    ("reddish", "red", False), ("top", "top left", False),
])
def test_match_badge_uses_the_normalised_exact_match(prediction, reference, same):
    assert ("no exact match" not in match_badge(prediction, reference)) is same


def test_ui_settings():
    assert ui_settings(20, True, 0.7, 0.9, 5, 1.1, cap=64) == GenerationSettings(
        max_new_tokens=20, temperature=0.0, top_p=0.9, top_k=5, repetition_penalty=1.1)
    assert ui_settings(20, False, 0.7, 0.9, 5, 1.1, cap=64).temperature == 0.7
    with pytest.raises(RequestError, match="1..64"):
        ui_settings(65, True, 0.7, 1.0, 0, 1.0, cap=64)


def test_config_defaults_are_local_and_checked():
    cfg = DemoConfig(model="m")
    assert cfg.host == "127.0.0.1" and cfg.share is False
    with pytest.raises(UsageError, match="max-new-tokens"):
        DemoConfig(model="m", max_new_tokens=500, max_new_tokens_cap=256)


def test_cli_reports_a_missing_model_in_one_line(tmp_path, capsys):
    assert cli.main(["demo", "--model", str(tmp_path / "nope")]) == 2
    assert "is not a model folder" in capsys.readouterr().err


def test_cli_reports_missing_data_before_loading_the_model(tmp_path, capsys):
    assert cli.main(["demo", "--model", str(tmp_path), "--data", str(tmp_path / "nope")]) == 2
    assert "data not found" in capsys.readouterr().err
