"""Training and eval on every data format: a two-image record's loss is transformers' own ``labels=`` loss on the
same inputs, a mixture of every format trains with no record skipped and evaluates, and resume after kill -9 is
exact on parquet and shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import formats as F
from fixtures.models import FAST, Models, quiet
from fixtures.trained import killed_after_first_checkpoint
from safetensors.torch import load_file

from llava_lora import cli
from llava_lora.chat.batches import Collator, TrainDataset
from llava_lora.chat.encode import image_tokens_per_image
from llava_lora.data.records import load_records, resolve_data
from llava_lora.model.loss import LlavaLoss


def _plain_model(model_dir: Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def test_two_image_record_loss_is_transformers_labels_loss(world: Models, tmp_path: Path):
    """Both images' features reach the loss: the sum over tokens equals LlavaForConditionalGeneration(labels=)."""
    items = F.sample_items(10)
    file, store = resolve_data(str(F.write_parquet(tmp_path / "pq", items)))
    records = [r for r in load_records(file)[0] if len(r.images) == 2]
    model, processor = _plain_model(world.qwen_model)
    dataset = TrainDataset(records, store, processor, model.config.image_token_id,
                           image_tokens_per_image(model.config), None)
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape[0] == 4 and not batch["skipped"]  # two records, two images each
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
    with torch.no_grad():
        total, tokens = LlavaLoss(model)(**inputs)
        theirs = model(**inputs).loss
        swapped = dict(inputs, pixel_values=inputs["pixel_values"][[0, 0, 2, 2]])  # second images replaced
        other, _ = LlavaLoss(model)(**swapped)
    assert torch.allclose(total / tokens, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other, total)  # the second image's features are in the loss


def _sources(tmp_path: Path, items) -> dict[str, str]:
    return {
        "sharegpt": str(F.write_sharegpt(tmp_path / "sg", items)),
        "parts": str(F.write_parts(tmp_path / "parts", items)),
        "zip": str(F.write_zip(tmp_path / "zip", items)),
        "parquet": str(F.write_parquet(tmp_path / "pq", items, files=2)),
        "save_to_disk": str(F.write_save_to_disk(tmp_path / "disk", items)),
        "shards": str(F.write_shards(tmp_path / "sh", items)),
        "captions": str(F.write_shards(tmp_path / "cap", items, captions=True)),
    }


@pytest.mark.slow
def test_every_format_trains_with_no_record_skipped_and_evaluates(world: Models, tmp_path: Path):
    items = F.sample_items(8)
    sources = _sources(tmp_path, items)
    for path in sources.values():
        assert quiet(cli.main, ["data", "check", path, "--workers", "1"]) == 0, path
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"data": [{"path": p} for p in sources.values()]}))
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--model", str(world.qwen_model), "--out", str(run), *FAST,
            "--max-steps", "8", "--batch-size", "4", "--learning-rate", "3e-3", "--num-workers", "2",  # in workers
            "--eval-data", str(F.write_save_to_disk(tmp_path / "held", items)), "--eval-every", "4"]  # 2 two-image
    assert quiet(cli.main, argv) == 0
    report = json.loads((run / "data_report.json").read_text())
    captions = sum(len(it.images) == 1 for it in items)  # the caption shards hold the one-image records
    assert report["skipped"] == 0 and report["records"] == 7 * len(items) + captions, report["samples"][:3]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(l == l for l in losses)  # finite
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8] and all(r["eval_loss"] > 0 for r in rows
                                                                          if "eval_loss" in r)
    assert (run / "samples" / "step-4.jsonl").read_text().strip()  # held-out answers, images and all
    for family in ("sharegpt", "parquet", "shards"):  # JSON-like, tables, tars
        out = tmp_path / f"eval-{family}"
        assert quiet(cli.main, ["eval", "--model", str(world.qwen_model), "--adapter", str(run), "--data",
                                sources[family], "--limit", "8", "--max-new-tokens", "4", "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["samples"] == 8 and summary["skipped"] == [], family


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.slow
def test_resume_after_kill_is_exact_on_parquet_and_shards(world: Models, tmp_path: Path):
    items = F.sample_items(12)
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"data": [{"path": str(F.write_parquet(tmp_path / "pq", items))},
                                               {"path": str(F.write_shards(tmp_path / "sh", items)), "weight": 0.5}]}))
    flags = ["--config", str(config), "--model", str(world.qwen_model), *FAST, "--max-steps", "9",
             "--save-every", "3", "--batch-size", "4", "--log-every", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert quiet(cli.main, ["train", *flags, "--out", str(a)]) == 0
    done = killed_after_first_checkpoint(["train", *flags, "--out", str(b)], b)
    assert done and done[-1] < 9 and not (b / "adapter_model.safetensors").exists()
    assert quiet(cli.main, ["train", *flags, "--out", str(b), "--resume"]) == 0
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-4, rtol=0), k


SYSTEM = "You are a careful annotator of coloured shapes."


def _with_system_turns(path: Path) -> Path:
    """Every other record of a ShareGPT file given a leading system turn (the TRL / LLaMA-Factory layout)."""
    records = json.loads(path.read_text())
    for k, record in enumerate(records):
        if k % 2 == 0:
            record["messages"].insert(0, {"role": "system", "content": SYSTEM})
    path.write_text(json.dumps(records))
    return path


def test_a_system_turn_trains_in_place_of_the_default_and_is_not_supervised(world: Models, tmp_path: Path):
    import re

    file, store = resolve_data(str(_with_system_turns(F.write_sharegpt(tmp_path / "sg", F.sample_items(4)))))
    records, bad = load_records(file)
    assert not bad and [r.system for r in records] == [SYSTEM, None, SYSTEM, None]
    model, processor = _plain_model(world.qwen_model)
    tok = processor.tokenizer
    dataset = TrainDataset(records, store, processor, model.config.image_token_id,
                           image_tokens_per_image(model.config), None)
    with_system, plain = tok.decode(dataset[0]["input_ids"]), tok.decode(dataset[1]["input_ids"])
    default = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", plain, re.S).group(1)
    assert default and default not in with_system and f"<|im_start|>system\n{SYSTEM}<|im_end|>" in with_system
    ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]
    assert tok.decode(ids[labels != -100]) == records[0].turns[1].text + "<|im_end|>"  # the answer only
    batch = Collator(tok.pad_token_id)([dataset[i] for i in range(len(dataset))])
    total, tokens = LlavaLoss(model)(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels",
                                                             "pixel_values")})
    total.backward()
    assert torch.isfinite(total) and tokens == int((batch["labels"] != -100).sum())
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_system_turns_go_through_data_check_train_and_eval(world: Models, tmp_path: Path, capsys):
    data = _with_system_turns(F.write_sharegpt(tmp_path / "sg", F.sample_items(8)))
    assert cli.main(["data", "check", str(data), "--workers", "1", "--model", str(world.qwen_model)]) == 0
    assert "system turns: 4 records carry a system prompt" in capsys.readouterr().out
    run = tmp_path / "run"
    assert quiet(cli.main, ["train", "--model", str(world.qwen_model), "--data", str(data), "--out", str(run), *FAST,
                            "--max-steps", "2", "--batch-size", "4", "--eval-data", str(data),
                            "--eval-every", "2"]) == 0
    assert json.loads((run / "data_report.json").read_text())["skipped"] == 0
    out = tmp_path / "eval"
    assert quiet(cli.main, ["eval", "--model", str(world.qwen_model), "--adapter", str(run), "--data", str(data),
                            "--limit", "4", "--max-new-tokens", "2", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["skipped"] == []


def test_max_length_counts_every_image_and_never_cuts_the_last(world: Models):
    from transformers import AutoConfig, AutoTokenizer

    from llava_lora.chat import encode
    from llava_lora.data.records import BadRecord, Record, Turn

    tok, config = AutoTokenizer.from_pretrained(world.qwen_model), AutoConfig.from_pretrained(world.qwen_model)
    n = image_tokens_per_image(config)
    record = Record("two", ("a.png", "b.png"), (Turn("user", "<image>\nFirst, and <image> second: which?"),
                                                 Turn("assistant", "the first")))
    full = encode.encode(tok, record, config.image_token_id, n, None)
    at = (full.input_ids == config.image_token_id).nonzero()[0]
    assert len(at) == 2 * n and at[n] > at[n - 1] + 1  # two runs of image tokens, text between them
    with pytest.raises(BadRecord, match="the image tokens") as e:
        encode.encode(tok, record, config.image_token_id, n, int(at[-1]))  # one short of the second image's end
    assert e.value.reason == "too_long"
    cut = encode.encode(tok, record, config.image_token_id, n, len(full.input_ids) - 1)  # the trailing text only
    assert (cut.input_ids == config.image_token_id).sum() == 2 * n and (cut.labels != -100).any()
    with pytest.raises(BadRecord) as e:
        encode.encode(tok, Record("x", ("a.png",), record.turns), config.image_token_id, n, None)
    assert e.value.reason == "image_token_mismatch"  # the encoder's own check: 2 placeholders for 1 image


def test_sample_cache_serves_equal_samples_within_its_budget(world: Models, tmp_path: Path):
    """--sample-cache-mb: a kept sample equals a remade one, and no more is kept than the budget holds."""
    file, store = resolve_data(str(F.write_parquet(tmp_path / "pq", F.sample_items(6))))
    records = load_records(file)[0]
    _, processor = _plain_model(world.qwen_model)
    args = (records, store, processor, processor.tokenizer.convert_tokens_to_ids("<image>"), 16, None)
    plain = TrainDataset(*args)
    first = plain[0]
    size = first["input_ids"].nbytes + first["labels"].nbytes + first["pixel_values"].nbytes
    cached = TrainDataset(*args, cache_bytes=size)  # room for one such sample
    kept = [cached[i] for i in range(len(records))]
    assert list(cached.cache) == [0] and cached[0] is kept[0]  # the second draw is the kept object
    for i, sample in enumerate(kept):
        fresh = plain[i]
        assert (sample["input_ids"] == fresh["input_ids"]).all() and (sample["labels"] == fresh["labels"]).all()
        pixels = sample["pixel_values"], fresh["pixel_values"]
        assert pixels == (None, None) if pixels[0] is None else torch.equal(*pixels)
    assert not TrainDataset(*args).cache_room  # off by default: nothing kept
