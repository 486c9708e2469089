"""The demo's settings: the command line's generation flags are where the page's controls start, and the values a
handler receives are read in the one order the panel declares (``demo_checks.PANEL``). No model, no server.

    .venv/bin/pytest tests/infer/test_demo_checks.py -q
"""

from __future__ import annotations

import pytest

from llava_lora.infer import demo
from llava_lora.infer.demo_checks import PANEL, RequestError, page_settings
from llava_lora.infer.engine import GenerationSettings


def _panel(cfg) -> dict:
    gr = pytest.importorskip("gradio")
    with gr.Blocks():
        return dict(zip(PANEL, (c.value for c in demo._settings_panel(gr, cfg))))


def test_the_panel_starts_at_the_flags():
    cfg = demo.DemoConfig(model="m", max_new_tokens=32, temperature=0.2, top_p=0.9, top_k=5, repetition_penalty=1.1)
    assert _panel(cfg) == {"max_new_tokens": 32, "greedy": False, "temperature": 0.2, "top_p": 0.9, "top_k": 5,
                           "repetition_penalty": 1.1}
    greedy = _panel(demo.DemoConfig(model="m"))
    assert greedy["greedy"] is True and greedy["temperature"] == demo.SAMPLING_TEMPERATURE


def test_page_settings_reads_the_panel_order():
    assert page_settings((20, False, 0.5, 0.9, 5, 1.1), cap=64) == GenerationSettings(
        max_new_tokens=20, temperature=0.5, top_p=0.9, top_k=5, repetition_penalty=1.1)
    with pytest.raises(RequestError, match="expected 6 generation settings"):
        page_settings((20, False), cap=64)
