"""LLM families: each composed template keeps its family's format and supervises exactly each answer's tokens and
its end-of-turn token, checked token by token against character offsets.

    .venv/bin/pytest tests/model/test_families.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.models import FAST, good_data, model_world, quiet
from llava_lora.model import build
from llava_lora import cli
from llava_lora.chat import prompts, templates
from llava_lora.data.records import Record, Turn
from llava_lora.tiny.families import FAMILIES, tiny_family


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> dict[str, Path]:
    world = model_world(tmp_path_factory)
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in FAMILIES:
        out[name] = root / f"model-{name}"
        quiet(build.main, build.BuildConfig(llm=str(tiny_family(name, root / name)), vision=str(world.clip),
                                            out=str(out[name])))
    return out


def _tokenizer(model_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir).tokenizer


RECORDS = [
    Record("one", ("a.png",), (Turn("user", "<image>\nWhat colour is the star?"), Turn("assistant", "yellow"))),
    Record("two", ("b.png",), tuple(Turn(r, t) for r, t in [("user", "<image>\n" + templates.PROBE_TEXTS[0]),
                                                         ("assistant", templates.PROBE_TEXTS[1]),
                                                         ("user", templates.PROBE_TEXTS[2]),
                                                         ("assistant", templates.PROBE_TEXTS[3])])),
    Record("text", (), (Turn("user", "Say the word blue."), Turn("assistant", "blue"))),
]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.id)
def test_mask_is_each_answer_and_its_end_token(composed: dict[str, Path], family: str, record: Record):
    tok = _tokenizer(composed[family])
    text = tok.apply_chat_template(prompts.messages(record), tokenize=False)
    out = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    end_marker = FAMILIES[family].end_of_turn
    for turn in record.turns:
        start = text.index(turn.text, pos)
        pos = start + len(turn.text)
        if turn.role == "assistant":  # the answer's characters through its end-of-turn marker
            pos = text.index(end_marker, pos) + len(end_marker)
            spans.append((start, pos))
    expected = [any(s <= a and b <= e for s, e in spans) and b > a for a, b in out["offset_mapping"]]
    got = tok.apply_chat_template(prompts.messages(record), tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert got["input_ids"] == out["input_ids"]
    assert [bool(m) for m in got["assistant_masks"]] == expected
    marked = tok.decode([t for t, m in zip(got["input_ids"], got["assistant_masks"]) if m])
    assert marked == "".join(t.text + end_marker for t in record.turns if t.role == "assistant")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_format_kept_and_prompt_is_a_prefix_of_training_text(composed: dict[str, Path], family: str):
    """The composed template writes what the family's own writes (Qwen3: its empty reasoning block before the last
    answer, and after the generation prompt as `enable_thinking=False` does); every record's generation prompt is
    how its training text begins."""
    tok = _tokenizer(composed[family])
    own = FAMILIES[family].template
    for record in RECORDS:
        msgs = prompts.messages(record)
        flat = templates._flat(msgs, "<image>")
        assert tok.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(
            flat, chat_template=own, tokenize=False)
        asked, _ = prompts.prompt_and_reference(record)
        prompt = prompts.generation_prompt(tok, asked)
        assert prompt == tok.apply_chat_template(flat[:-1], chat_template=own, tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=False)
        assert tok.apply_chat_template(msgs, tokenize=False).startswith(prompt)


SYSTEM = Record("system", ("a.png",), RECORDS[0].turns, system="Answer as a pirate would, in one word.")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_system_prompt_is_written_by_the_family_and_never_supervised(composed: dict[str, Path], family: str):
    """A record's system prompt goes to the family's own template (in place of its default: Qwen2.5's "You are
    Qwen"), its tokens are not supervised; a template that refuses a system role refuses the record by name."""
    from llava_lora.chat.encode import encode
    from llava_lora.errors import BadRecord

    tok = _tokenizer(composed[family])
    image_id = tok.convert_tokens_to_ids("<image>")
    if family == "mistral":  # Mistral v0.2's template raises on any role but user and assistant
        with pytest.raises(BadRecord, match="chat template refused") as err:
            encode(tok, SYSTEM, image_id, 4, None)
        assert err.value.reason == "encode_failed"
        return
    msgs = prompts.messages(SYSTEM)
    text = tok.apply_chat_template(msgs, tokenize=False)
    own = tok.apply_chat_template(templates._flat(msgs, "<image>"), chat_template=FAMILIES[family].template,
                                  tokenize=False)
    plain = tok.apply_chat_template(prompts.messages(RECORDS[0]), tokenize=False)
    assert text == own and SYSTEM.system in text and SYSTEM.system not in plain
    assert ("You are Qwen" in plain) == (family == "qwen2.5") and "You are Qwen" not in text
    enc = encode(tok, SYSTEM, image_id, 4, None)
    supervised = tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != -100])
    assert supervised == "yellow" + FAMILIES[family].end_of_turn
    asked, _ = prompts.prompt_and_reference(SYSTEM)  # eval and the held-out answers ask with it too
    assert SYSTEM.system in prompts.generation_prompt(tok, asked) and text.startswith(
        prompts.generation_prompt(tok, asked))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains(composed: dict[str, Path], family: str, tmp_path: Path, tmp_path_factory, capsys):
    data = good_data(tmp_path_factory)
    rc = cli.main(["train", "--model", str(composed[family]), "--data", str(data), "--out", str(tmp_path / "run"),
                   *FAST, "--max-steps", "2", "--batch-size", "4", "--lora-target", "attention"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
