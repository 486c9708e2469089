"""Chat templates of the composed model: the LLM's own conversation format, made image-aware.

A message's ``content`` may be a string or a list of parts (``{"type": "image"}``, ``{"type": "text",
"text": ...}``); parts are joined with a newline, so ``[image, text]`` renders as LLaVA's ``<image>\\nQ``.
Known families (ChatML, Llama 3) get a full template whose assistant turns are wrapped in
``{% generation %}`` so that ``return_assistant_tokens_mask`` marks exactly the answer and its end-of-turn
token. Other templates keep their body, behind a prelude that flattens list contents to strings.
"""

from __future__ import annotations

_FLATTEN = (
    "{%- macro llava_text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- set ns = namespace(parts=[]) -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.parts = ns.parts + ['IMAGE_TOKEN'] -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.parts = ns.parts + [part['text']] -%}{%- endif -%}"
    "{%- endfor -%}{{ ns.parts | join('\\n') }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

CHATML = _FLATTEN + (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nSYSTEM_PROMPT<|im_end|>\\n' }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ llava_text(message['content']) + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' + llava_text(message['content']) + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

LLAMA3 = _FLATTEN + (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ llava_text(message['content']) | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else -%}{{ llava_text(message['content']) | trim + '<|eot_id|>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

# A generic prelude: rebinds `messages` with flattened string contents, then runs the LLM's own template.
_GENERIC_PRELUDE = _FLATTEN + (
    "{%- set ns_msgs = namespace(items=[]) -%}"
    "{%- for m in messages -%}"
    "{%- set ns_msgs.items = ns_msgs.items + [{'role': m['role'], 'content': llava_text(m['content']) | string}] -%}"
    "{%- endfor -%}"
    "{%- set messages = ns_msgs.items -%}"
)


def family(template: str) -> str:
    """'chatml', 'llama3' or 'generic', from the markers the LLM's template writes."""
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    return "generic"


def _chatml_system_prompt(template: str) -> str:
    """The default system prompt the LLM's ChatML template inserts (Qwen1.5: 'You are a helpful assistant.')."""
    marker = "<|im_start|>system\\n"
    for text in (template, template.replace("\n", "\\n")):
        start = text.find(marker)
        if start >= 0:
            end = text.find("<|im_end|>", start)
            return text[start + len(marker):end]
    return "You are a helpful assistant."


def llava_template(template: str, image_token: str = "<image>") -> str:
    """The composed model's template for an LLM whose own template is ``template``."""
    kind = family(template)
    if kind == "chatml":
        return CHATML.replace("IMAGE_TOKEN", image_token).replace("SYSTEM_PROMPT", _chatml_system_prompt(template))
    if kind == "llama3":
        return LLAMA3.replace("IMAGE_TOKEN", image_token)
    return _GENERIC_PRELUDE.replace("IMAGE_TOKEN", image_token) + template


def has_generation_markers(template: str) -> bool:
    return "{% generation %}" in template or "{%- generation %}" in template
