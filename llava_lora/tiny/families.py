"""Tiny chat LMs of more LLM families, each with a chat template written here after its family's own.

    python -m llava_lora.tiny.families OUT_DIR      # writes OUT_DIR/{qwen2.5,qwen3,gemma2,gemma3,mistral,phi3}

Random weights of the real architectures (Qwen2 for Qwen2.5, Qwen3, Gemma 2, Gemma 3's text model, Mistral,
Phi-3) and a byte-level BPE trained here with the family's special tokens, so that ``build`` composes them and the
tests can check, token by token, which tokens each family's composed template supervises.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import _fast_tokenizer, _pad64

# Qwen2.5: a tools branch first (whose text holds the system marker), its own default system prompt.
QWEN25 = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.' }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
    "'<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen3: no default system prompt; the answer after the last user turn carries its (here empty) reasoning block;
# `enable_thinking=false` writes the empty block after the generation prompt.
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Gemma 2 and 3: no system role (Gemma 3 folds a system message into the first user turn), "model" speaks.
GEMMA = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
# Mistral-7B-Instruct-v0.2: [INST] ... [/INST], answers end with </s>, user and assistant roles only.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Phi-3: <|user|> / <|assistant|> turns ended by <|end|>; the eos token only ends a conversation not left open.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    end_of_turn: str  # the token that ends an answer, supervised with it
    arch: str  # transformers config class prefix


FAMILIES = {
    "qwen2.5": Family(QWEN25, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|im_end|>",
                      "Qwen2"),
    "qwen3": Family(QWEN3, ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"), None,
                    "<|im_end|>", "<|im_end|>", "Qwen3"),
    "gemma2": Family(GEMMA, ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), "<bos>",
                     "<end_of_turn>", "<end_of_turn>", "Gemma2"),
    "gemma3": Family(GEMMA, ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), "<bos>",
                     "<end_of_turn>", "<end_of_turn>", "Gemma3Text"),
    "mistral": Family(MISTRAL, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", "</s>", "Mistral"),
    "phi3": Family(PHI3, ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"), None,
                   "<|endoftext|>", "<|end|>", "Phi3"),
}


def tiny_family(name: str, out: Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """A tiny chat LM of family ``name`` (a key of FAMILIES) with its tokenizer and chat template."""
    import transformers

    fam = FAMILIES[name]
    tok = _fast_tokenizer(list(fam.specials), 448, bos_token=fam.bos, eos_token=fam.eos,
                          pad_token=fam.specials[0])
    tok.chat_template = fam.template
    arch = fam.arch
    config_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch.removesuffix('Text')}ForCausalLM")
    kwargs = dict(vocab_size=_pad64(len(tok)), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, initializer_range=0.1, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.convert_tokens_to_ids(fam.end_of_turn),
                  bos_token_id=tok.bos_token_id)
    if arch.startswith("Gemma"):
        kwargs["head_dim"] = hidden_size // 4
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids(fam.end_of_turn)], pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-families")
    for family_name in FAMILIES:
        print(tiny_family(family_name, root / family_name))
