"""Chat templates of the composed model: the LLM's own conversation format, made image-aware.

A message's ``content`` may be a string or a list of parts (``{"type": "image"}``, ``{"type": "text",
"text": ...}``); parts are joined with a newline, so ``[image, text]`` renders as LLaVA's ``<image>\\nQ``.
Known families (ChatML, Llama 3) get a full template whose assistant turns are wrapped in
``{% generation %}`` so that ``return_assistant_tokens_mask`` marks exactly the answer and its end-of-turn
token. Any other template is kept whole, as a macro, and marked by difference: an assistant turn is what the
rendering of the conversation up to it adds to the rendering of the turns before it with the generation prompt.
That holds for every template that renders a conversation as an extension of the rendering of its prefix;
``check`` proves it on a probe conversation at build time, and a template that fails is refused.
"""

from __future__ import annotations

import re

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


# Any other template, marked by difference. The LLM's template becomes the macro `llm_render`; the output is
# the same text, with each assistant turn's part after the generation prompt (its trailing whitespace left out)
# inside {% generation %}.
_BY_PREFIX = (
    "{%- macro llm_render(messages, add_generation_prompt) -%}LLM_TEMPLATE{%- endmacro -%}"
    "{%- set ns_out = namespace(done='') -%}"
    "{%- for i in range(messages | length) -%}"
    "{%- set upto = llm_render(messages[:i + 1], false) | string -%}"
    "{%- if messages[i]['role'] == 'assistant' -%}"
    "{%- set asked = llm_render(messages[:i], true) | string -%}"
    "{%- set answer = upto[asked | length:] -%}{%- set body = answer.rstrip() -%}"
    "{{ asked[ns_out.done | length:] }}{% generation %}{{ body }}{% endgeneration %}{{ answer[body | length:] }}"
    "{%- else -%}{{ upto[ns_out.done | length:] }}{%- endif -%}"
    "{%- set ns_out.done = upto -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ (llm_render(messages, true) | string)[ns_out.done | length:] }}{%- endif -%}"
)


def family(template: str) -> str:
    """'chatml', 'llama3', 'marked' (has its own {% generation %}) or 'generic', from what the template writes."""
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if has_generation_markers(template):
        return "marked"
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
    if kind == "marked":
        return _GENERIC_PRELUDE.replace("IMAGE_TOKEN", image_token) + template
    return _GENERIC_PRELUDE.replace("IMAGE_TOKEN", image_token) + _BY_PREFIX.replace("LLM_TEMPLATE", template)


def has_generation_markers(template: str) -> bool:
    return re.search(r"{%-?\s*generation\s*-?%}", template) is not None


# A probe conversation: two exchanges, the image in the first question; its texts are easy to find in tokens.
PROBE_TEXTS = ("Which colour is the square?", "The square is red.", "And the circle?", "The circle is blue.")


def probe_messages() -> list[dict]:
    q1, a1, q2, a2 = PROBE_TEXTS
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]},
            {"role": "assistant", "content": [{"type": "text", "text": a1}]},
            {"role": "user", "content": [{"type": "text", "text": q2}]},
            {"role": "assistant", "content": [{"type": "text", "text": a2}]}]


def check(tokenizer, llm_template: str, composed: str, image_token: str) -> None:
    """Prove on the probe conversation that ``composed`` renders as the LLM's own template does and marks
    exactly the answers: each answer's text is inside the assistant mask, no question's text is, and asking
    for the next turn renders a prefix of the conversation that answers it. Raises ``ValueError`` saying what
    failed."""
    msgs = probe_messages()
    flat = [{"role": m["role"], "content": "\n".join(image_token if p["type"] == "image" else p["text"]
                                                     for p in m["content"])} for m in msgs]
    if family(llm_template) in ("generic", "marked"):
        for gen in (False, True):
            mine = tokenizer.apply_chat_template(msgs[:3] if gen else msgs, chat_template=composed, tokenize=False,
                                                 add_generation_prompt=gen)
            theirs = tokenizer.apply_chat_template(flat[:3] if gen else flat, chat_template=llm_template,
                                                   tokenize=False, add_generation_prompt=gen)
            if mine != theirs:
                raise ValueError("it renders a conversation differently from its own prefixes, so its answers "
                                 "cannot be found")
    out = tokenizer.apply_chat_template(msgs, chat_template=composed, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    marked = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    unmarked = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    q1, a1, q2, a2 = PROBE_TEXTS
    if not (a1 in marked and a2 in marked):
        raise ValueError("its assistant turns come out unmarked")
    if q1 in marked or q2 in marked or a1 in unmarked or a2 in unmarked:
        raise ValueError("its assistant mask covers text that is not an answer")
    asked = tokenizer.apply_chat_template(msgs[:3], chat_template=composed, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(msgs, chat_template=composed, tokenize=False)
    if not whole.startswith(asked):
        raise ValueError("the prompt that asks for an answer is not how the answered conversation begins")
