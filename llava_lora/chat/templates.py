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

import json
import os
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

# ChatML (Qwen1.5, Qwen2, Qwen2.5). SYSTEM_PROMPT: the LLM's own default, rendered from its template (none for
# templates that add none). THINK: Qwen3's empty reasoning block, written as its template writes it in
# non-thinking mode: before each answer that follows the last user turn, and after the generation prompt.
CHATML = _FLATTEN + (
    "{%- set ns_q = namespace(last=-1) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set ns_q.last = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' and 'SYSTEM_PROMPT' -%}"
    "{{ '<|im_start|>system\\nSYSTEM_PROMPT<|im_end|>\\n' }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{%- if loop.index0 > ns_q.last -%}{{ 'THINK' }}{%- endif -%}"
    "{% generation %}{{ llava_text(message['content']) + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' + llava_text(message['content']) + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\nTHINK' }}{%- endif -%}"
)
QWEN3_THINK = "<think>\\n\\n</think>\\n\\n"

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
# inside {% generation %}. TAIL is what the template writes only at the very end of a conversation (Phi-3's
# eos_token): it is cut from every rendering of a prefix, and written once at the end.
_BY_PREFIX = (
    "{%- macro llm_render(messages, add_generation_prompt) -%}LLM_TEMPLATE{%- endmacro -%}"
    "{%- macro stable(text) -%}{{ text[:(text | length) - (TAIL | length)] if TAIL and text.endswith(TAIL) "
    "else text }}{%- endmacro -%}"
    "{%- set ns_out = namespace(done='') -%}"
    "{%- for i in range(messages | length) -%}"
    "{%- set upto = stable(llm_render(messages[:i + 1], false) | string) | string -%}"
    "{%- if messages[i]['role'] == 'assistant' -%}"
    "{%- set asked = llm_render(messages[:i], true) | string -%}"
    "{%- set answer = upto[asked | length:] -%}{%- set body = answer.rstrip() -%}"
    "{{ asked[ns_out.done | length:] }}{% generation %}{{ body }}{% endgeneration %}{{ answer[body | length:] }}"
    "{%- else -%}{{ upto[ns_out.done | length:] }}{%- endif -%}"
    "{%- set ns_out.done = upto -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ (llm_render(messages, true) | string)[ns_out.done | length:] }}"
    "{%- else -%}{{ (llm_render(messages, false) | string)[ns_out.done | length:] }}{%- endif -%}"
)


# The same chat formats as Ollama's Go templates (what `export --format gguf` writes into the Modelfile), one per
# family() that has a fixed format: kept here beside CHATML and LLAMA3, so that the two spellings change together.
OLLAMA_TEMPLATES = {
    "chatml": ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
               '{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n',
               ["<|im_end|>"]),
    "llama3": ('<|begin_of_text|>{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}'
               '<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}'
               '<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n', ["<|eot_id|>"]),
}


def family(template: str) -> str:
    """'chatml', 'llama3', 'marked' (has its own {% generation %}) or 'generic', from what the template writes."""
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if has_generation_markers(template):
        return "marked"
    return "generic"


def _render(tokenizer, template: str, messages: list[dict], gen: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)


def _chatml_system_prompt(tokenizer, template: str) -> str:
    """The system prompt the LLM's ChatML template adds to a conversation without one (Qwen1.5: 'You are a
    helpful assistant.'; Qwen3: none), read off its rendering of one user turn."""
    marker = "<|im_start|>system\n"
    text = _render(tokenizer, template, [{"role": "user", "content": "Hi"}])
    start = text.find(marker)
    return "" if start < 0 else text[start + len(marker):text.find("<|im_end|>", start)]


def _end_tail(tokenizer, template: str) -> str:
    """What the template writes after a conversation's last turn only (Phi-3 ends with its eos_token when no
    generation prompt follows): the part of an answered rendering that the next turn's rendering does not keep."""
    flat = _flat(probe_messages(), "<image>")
    answered, continued = _render(tokenizer, template, flat[:2]), _render(tokenizer, template, flat[:3])
    cut = len(os.path.commonprefix([answered, continued]))
    # characters can agree inside a token ('<|endoftext|>' vs '<|user|>'): the tail starts where its token does
    for start, end in tokenizer(answered, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]:
        if start < cut < end:
            cut = start
    return answered[cut:]


def _jinja_string(text: str) -> str:
    return json.dumps(text)  # a double-quoted literal with backslash escapes, which Jinja reads as written


def llava_template(template: str, image_token: str, tokenizer) -> str:
    """The composed model's template for an LLM whose own template is ``template`` (``tokenizer`` renders it
    where the composition needs to read what it writes)."""
    kind = family(template)
    if kind == "chatml":
        system = _chatml_system_prompt(tokenizer, template)
        think = QWEN3_THINK if "<think>" in template else ""
        return (CHATML.replace("IMAGE_TOKEN", image_token).replace("SYSTEM_PROMPT", system.replace("'", "\\'"))
                .replace("THINK", think))
    if kind == "llama3":
        return LLAMA3.replace("IMAGE_TOKEN", image_token)
    if kind == "marked":
        return _GENERIC_PRELUDE.replace("IMAGE_TOKEN", image_token) + template
    tail = _end_tail(tokenizer, template)
    return (_GENERIC_PRELUDE.replace("IMAGE_TOKEN", image_token)
            + _BY_PREFIX.replace("LLM_TEMPLATE", template).replace("TAIL", _jinja_string(tail)))


def has_generation_markers(template: str) -> bool:
    return re.search(r"{%-?\s*generation\s*-?%}", template) is not None


# A probe conversation: two exchanges, the image in the first question; its texts are easy to find in tokens.
PROBE_TEXTS = ("Which colour is the square?", "The square is red.", "And the circle?", "The circle is blue.")


def _flat(msgs: list[dict], image_token: str) -> list[dict]:
    """Messages with string contents, as an LLM's own template expects them."""
    return [{"role": m["role"], "content": "\n".join(image_token if p["type"] == "image" else p["text"]
                                                     for p in m["content"])} for m in msgs]


def probe_messages() -> list[dict]:
    q1, a1, q2, a2 = PROBE_TEXTS
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]},
            {"role": "assistant", "content": [{"type": "text", "text": a1}]},
            {"role": "user", "content": [{"type": "text", "text": q2}]},
            {"role": "assistant", "content": [{"type": "text", "text": a2}]}]


def check(tokenizer, llm_template: str, composed: str, image_token: str) -> None:
    """Prove on the probe conversation that ``composed`` renders as the LLM's own template does (when it wraps
    it) and marks exactly the answers: each marked span is one answer's tokens and one end-of-turn token, the
    same after every answer; and asking for the next turn renders a prefix of the conversation that answers it.
    Raises ``ValueError`` saying what failed."""
    msgs = probe_messages()
    flat = _flat(msgs, image_token)
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
    runs, run = [], []  # the marked token runs, in order
    for token, marked in zip(ids, mask):
        if marked:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    answers = [PROBE_TEXTS[1], PROBE_TEXTS[3]]
    if len(runs) != len(answers):
        raise ValueError(f"it marks {len(runs)} spans of the 2 answers" if runs else
                         "its assistant turns come out unmarked")
    # each span: the answer's tokens, then one end-of-turn token, the same for every answer
    if len({r[-1] for r in runs}) != 1 or any(tokenizer.decode(r[:-1]).strip() != a for r, a in zip(runs, answers)):
        shown = " | ".join(repr(tokenizer.decode(r)) for r in runs)
        raise ValueError(f"its assistant mask is not each answer and its end-of-turn token: {shown}")
    asked = tokenizer.apply_chat_template(msgs[:3], chat_template=composed, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(msgs, chat_template=composed, tokenize=False)
    if not whole.startswith(asked):
        raise ValueError("the prompt that asks for an answer is not how the answered conversation begins")
