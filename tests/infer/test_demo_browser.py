"""``llava-lora demo`` in a real headless browser: Playwright for Python driving Debian's Chromium.

    scripts/install_browser.sh .venv             # once: apt chromium + pip playwright (no browser download)
    LLAVA_LORA_DEMO_SCREENSHOT=docs/demo.png .venv/bin/pytest tests/infer/test_demo_browser.py -q

Skipped, with the reason, only where Playwright or Chromium is not installed. ``CHROMIUM`` names another
Chromium binary; ``LLAVA_LORA_DEMO_SCREENSHOT`` where the screenshot goes (default: the test's tmp folder);
``LLAVA_LORA_DEMO_ASSETS`` a folder holding ``model/``, ``run/`` and ``data/`` (a synth set, as the
quickstart writes them) to show instead of the 3-step tiny run, for a README picture of a trained adapter.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# As root in a container, without a display, on a closed network (see the machine notes of the project).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL = "run scripts/install_browser.sh"

pytestmark = [
    pytest.mark.slow,  # trains a 3-step adapter and serves the page to a browser: `make test` runs it
    pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                       reason="the demo extra is not installed: pip install -e '.[demo]'"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason=f"Playwright for Python is not installed ({INSTALL})"),
    pytest.mark.skipif(not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)),
                       reason=f"no Chromium at {CHROMIUM} ({INSTALL}, or set CHROMIUM)"),
]

from fixtures.demo import DemoAssets, demo_assets, demo_config, engine_for, running_demo  # noqa: E402, F401
from llava_lora.chat import prompts  # noqa: E402
from llava_lora.data.records import load_records, open_image, resolve_data, resolve_image  # noqa: E402
from llava_lora.infer.engine import GenerationSettings, answer  # noqa: E402

TIMEOUT_MS = 30_000
QUESTION = "What colour is the shape?"


def expected(engine, msgs: list[dict], image) -> tuple[str, str]:
    """(base, fine-tuned) greedy answers of the batch path that eval uses, 12 new tokens as the page asks."""
    prompt = prompts.generation_prompt(engine.processor.tokenizer, msgs)
    settings = GenerationSettings(max_new_tokens=12)
    return tuple(answer(engine.model, engine.processor, [prompt], [image], settings, adapter=on)[0]
                 for on in (False, True))


def wait_done(page, status_id: str) -> None:
    page.wait_for_function(f"document.querySelector('#{status_id}')?.innerText.startsWith('Done')",
                           timeout=TIMEOUT_MS)


def answers(page, prefix: str) -> tuple[str, str]:
    return (page.locator(f"#{prefix}-base textarea").input_value(),
            page.locator(f"#{prefix}-tuned textarea").input_value())


@pytest.fixture
def page_assets(request) -> DemoAssets:
    root = os.environ.get("LLAVA_LORA_DEMO_ASSETS")
    if root:
        return DemoAssets(Path(root) / "model", Path(root) / "data", Path(root) / "run")
    return request.getfixturevalue("demo_assets")


def test_compare_in_the_browser(page_assets, tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    engine = engine_for(page_assets, adapter=True)
    file, root = resolve_data(page_assets.data, "test")
    records, _ = load_records(file)
    record = records[3]
    msgs, reference = prompts.prompt_and_reference(record)
    want_sample = expected(engine, msgs, open_image(resolve_image(root, record.image)))
    upload = resolve_image(root, records[0].image)
    want_upload = expected(engine, [{"role": "user", "content": prompts.content(QUESTION, True, True)}],
                           open_image(upload))
    shot = Path(os.environ.get("LLAVA_LORA_DEMO_SCREENSHOT") or tmp_path / "demo.png").absolute()
    # the paths as a user types them (the header shows them), not the test's tmp folders
    monkeypatch.chdir(page_assets.model.parent)
    cfg = demo_config(page_assets)
    cfg.model, cfg.adapter, cfg.data = "model", "run", "data"

    with running_demo(cfg, engine) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url)

            # tab 1: step to sample 3, ask both models, read both answers and the match badges
            expect(page.locator("#sample-question textarea")).to_have_value(prompts.question(records[0]))
            index = page.locator("#sample-index input")
            index.fill("2")
            index.press("Enter")
            expect(page.locator("#sample-info")).to_contain_text(records[2].id)
            page.locator("#next").click()
            expect(page.locator("#sample-info")).to_contain_text(record.id)
            expect(page.locator("#sample-reference textarea")).to_have_value(reference)
            page.locator("#compare-sample").click()
            wait_done(page, "sample-status")
            assert answers(page, "sample") == want_sample
            expect(page.locator("#sample-base-match")).to_contain_text("exact match")
            expect(page.locator("#sample-tuned-match")).to_contain_text("exact match")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)

            # tab 2: upload an image, type a question, read both answers
            page.get_by_role("tab", name="Your own image").click()
            page.locator("#upload-image input[type=file]").set_input_files(str(upload))
            expect(page.locator("#upload-image img")).to_be_visible(timeout=TIMEOUT_MS)
            page.locator("#upload-question textarea").fill(QUESTION)
            page.locator("#compare-upload").click()
            wait_done(page, "upload-status")
            assert answers(page, "upload") == want_upload
            page.screenshot(path=str(tmp_path / "demo-upload.png"), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
