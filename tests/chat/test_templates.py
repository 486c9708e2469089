"""The chat formats written twice, once for transformers (Jinja, CHATML / LLAMA3) and once for Ollama (Go,
OLLAMA_TEMPLATES, in the Modelfile `export --format gguf` writes): one prompt renders to the same text in both.

    .venv/bin/pytest tests/chat/test_templates.py -q
"""

from __future__ import annotations

import re

import jinja2
import pytest

from llava_lora.chat import templates


def _go(template: str, prompt: str, system: str = "") -> str:
    """Ollama's rendering of one user prompt, for the constructs these templates use (if/end, .System, .Prompt)."""
    out = re.sub(r"\{\{ if \.System \}\}(.*?)\{\{ end \}\}", r"\1" if system else "", template, flags=re.S)
    out = re.sub(r"\{\{ if \.Prompt \}\}(.*?)\{\{ end \}\}", r"\1", out, flags=re.S)
    return out.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt)


def _jinja(template: str, prompt: str, system: str = "") -> str:
    """transformers' rendering of the same prompt with the generation prompt, the composition's placeholders filled
    (no thinking prefix, the system prompt a ChatML LLM brings)."""
    text = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    text = text.replace("SYSTEM_PROMPT", system).replace("THINK", "").replace("IMAGE_TOKEN", "<image>")
    return jinja2.Environment().from_string(text).render(
        messages=[{"role": "user", "content": prompt}], add_generation_prompt=True, bos_token="<|begin_of_text|>")


@pytest.mark.parametrize("family, jinja_template, system", [
    ("chatml", templates.CHATML, ""), ("chatml", templates.CHATML, "You are a helpful assistant."),
    ("llama3", templates.LLAMA3, ""),
])
def test_ollama_templates_render_as_the_jinja_ones(family: str, jinja_template: str, system: str):
    go_template, stops = templates.OLLAMA_TEMPLATES[family]
    prompt = "What colour is the shape?"
    assert _go(go_template, prompt, system) == _jinja(jinja_template, prompt, system)
    assert all(stop in jinja_template for stop in stops)


def test_every_fixed_family_has_an_ollama_template():
    assert set(templates.OLLAMA_TEMPLATES) == {"chatml", "llama3"}
    assert templates.family(templates.CHATML) == "chatml" and templates.family(templates.LLAMA3) == "llama3"
