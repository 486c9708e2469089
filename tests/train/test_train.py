"""`llava-lora train`: label masks, LoRA placement, the loss, what a run changes and writes, bad records,
refusals, resume after a kill, and a 2-process gloo run."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fixtures.models import FAST, Models, quiet
from fixtures.trained import killed_after_first_checkpoint
from fixtures.data import write_bad_dataset, write_good_dataset
from llava_lora import cli
from llava_lora.chat import encode, prompts
from llava_lora.train import checkpoints
from llava_lora.train import loop as train
from llava_lora.model.adapters import apply_lora, wrapped_modules
from llava_lora.data.records import BadRecord, Record, Turn, load_records
from llava_lora.model.loss import LlavaLoss
from llava_lora.model.parts import dtypes_by_role

IMAGE_TOKENS = (32 // 8) ** 2
VENV_BIN = Path(sys.executable).parent


def _train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), *FAST, *extra]


# ----------------------------------------------------------------------------------------------------------
# label masks
# ----------------------------------------------------------------------------------------------------------

def _tokenizer(model_dir: Path):
    from transformers import AutoConfig, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoConfig.from_pretrained(model_dir).image_token_id


def _expected(tok, record: Record, image_token_id: int) -> tuple[list[int], list[int]]:
    """Ids and labels built independently: the rendered ChatML text cut into prompt pieces and
    'answer<|im_end|>' pieces, each tokenised alone; only the latter are supervised."""
    text = tok.apply_chat_template(prompts.messages(record), tokenize=False)
    ids, labels, pos = [], [], 0
    for turn in record.turns:
        if turn.role != "assistant":
            continue
        answer = f"<|im_start|>assistant\n{turn.text}<|im_end|>"
        at = text.index(answer, pos) + len("<|im_start|>assistant\n")
        prompt_ids = tok.encode(text[pos:at], add_special_tokens=False)
        answer_ids = tok.encode(text[at:at + len(turn.text) + len("<|im_end|>")], add_special_tokens=False)
        ids += prompt_ids + answer_ids
        labels += [-100] * len(prompt_ids) + answer_ids
        pos = at + len(turn.text) + len("<|im_end|>")
    tail = tok.encode(text[pos:], add_special_tokens=False)
    ids, labels = ids + tail, labels + [-100] * len(tail)
    wide_ids, wide_labels = [], []
    for i, lab in zip(ids, labels):
        n = IMAGE_TOKENS if i == image_token_id else 1
        wide_ids += [i] * n
        wide_labels += [lab] * n
    return wide_ids, wide_labels


@pytest.mark.parametrize("turns", [1, 2])
def test_label_mask_chatml(world: Models, turns: int):
    tok, image_id = _tokenizer(world.qwen_model)
    qa = [Turn("user", "<image>\nWhat colour is the square?"), Turn("assistant", "red"),
          Turn("user", "And its shape?"), Turn("assistant", "a small square")]
    record = Record("r", ("x.png",), tuple(qa[:2 * turns]))
    enc = encode.encode(tok, record, image_id, IMAGE_TOKENS, max_length=None)
    ids, labels = _expected(tok, record, image_id)
    assert enc.input_ids.tolist() == ids
    assert enc.labels.tolist() == labels
    # Read back: supervised tokens are exactly each answer and its <|im_end|>.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    sup = enc.labels != -100
    assert tok.decode(enc.input_ids[sup]) == "".join(f"{t.text}<|im_end|>" for t in record.turns[1::2])
    assert (enc.labels[enc.input_ids == image_id] == -100).all() and (enc.input_ids == image_id).sum() == IMAGE_TOKENS
    ends = np.flatnonzero((enc.input_ids == im_end) & sup)
    assert len(ends) == turns
    for e in ends:  # the newline after each supervised <|im_end|> is not supervised
        assert e + 1 < len(enc.labels) and enc.labels[e + 1] == -100
    assert (enc.labels[sup] == enc.input_ids[sup]).all()


def test_too_long_never_cuts_image_tokens(world: Models):
    tok, image_id = _tokenizer(world.qwen_model)
    record = Record("r", ("x.png",), (Turn("user", "<image>\nWhat colour is the square?"), Turn("assistant", "red")))
    full = encode.encode(tok, record, image_id, IMAGE_TOKENS, max_length=None)
    image_end = int(np.flatnonzero(full.input_ids == image_id)[-1]) + 1
    with pytest.raises(BadRecord) as e:
        encode.encode(tok, record, image_id, IMAGE_TOKENS, max_length=image_end - 1)
    assert e.value.reason == "too_long"
    # Cutting only the trailing text keeps every image token and the answer's start.
    cut = encode.encode(tok, record, image_id, IMAGE_TOKENS, max_length=len(full.input_ids) - 1)
    assert len(cut.input_ids) == len(full.input_ids) - 1
    assert (cut.input_ids == image_id).sum() == IMAGE_TOKENS
    assert (cut.labels != -100).any()


# ----------------------------------------------------------------------------------------------------------
# LoRA placement and the loss
# ----------------------------------------------------------------------------------------------------------

def _fp32_model(model_dir: Path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)


def test_lora_only_on_language_model_q_v(world: Models):
    model = _fp32_model(world.qwen_model)
    names = [n for n, _ in model.named_modules()]
    assert any(n.startswith("model.vision_tower.") and n.endswith("q_proj") for n in names)  # CLIP has them too
    expected = sorted(n for n in names if n.startswith("model.language_model.") and n.endswith(("q_proj", "v_proj")))
    assert len(expected) == 2 * 2
    peft_model = apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    assert sorted(wrapped_modules(peft_model)) == expected
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)


# ----------------------------------------------------------------------------------------------------------
# one short run, shared by the tests below
# ----------------------------------------------------------------------------------------------------------

class _Run:
    dir: Path
    model_dir: Path
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    trainable: set[str]


@pytest.fixture(scope="module")
def run(world: Models, data: Path, tmp_path_factory) -> _Run:
    """40 steps at lr 5e-3, checkpoints every 20, TensorBoard on; the in-memory model is captured."""
    out = _Run()
    out.dir, out.model_dir = tmp_path_factory.mktemp("run") / "run", world.qwen_model
    real_apply = train.apply_lora

    def capture(*args, **kwargs):
        peft_model = real_apply(*args, **kwargs)
        out.before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
        out.trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        out.peft_model = peft_model
        return peft_model

    cfg = train.TrainConfig(model=str(world.qwen_model), data=str(data), out=str(out.dir), max_steps=40,
                            batch_size=4, learning_rate=5e-3, save_every=20, log_every=5, num_workers=0,
                            gradient_checkpointing=False, tensorboard=True, lora_dropout=0.0)
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed), \
            contextlib.redirect_stderr(io.StringIO()):
        mp.setattr(train, "apply_lora", capture)
        assert train.main(cfg) == 0
    out.printed = printed.getvalue()
    out.after = {n: p.detach().clone() for n, p in out.peft_model.named_parameters()}
    out.dtypes = dtypes_by_role(out.peft_model)  # as the run trained it
    del out.peft_model
    return out


@pytest.mark.slow
def test_run_changes_trainable_only(run: _Run):
    assert run.trainable and all("lora_" in n or "multi_modal_projector" in n for n in run.trainable)
    for n, before in run.before.items():
        after = run.after[n]
        if n in run.trainable:
            assert not torch.equal(before.float(), after.float()), f"{n} did not change"
        else:
            assert after.dtype == before.dtype and torch.equal(before, after), f"frozen {n} changed"
    frozen = set(run.before) - run.trainable
    assert any("vision_tower" in n for n in frozen) and any("lm_head" in n for n in frozen)
    assert any("language_model" in n and "base_layer" in n for n in frozen)


@pytest.mark.slow
def test_run_keeps_frozen_weights_in_bf16_and_trains_fp32_masters(run: _Run):
    """precision auto on a CPU that computes bf16 natively and faster than fp32 is bf16: the frozen weights stay in the checkpoint's bf16
    (no fp32 copy of the model), and what is trained (LoRA, the projector) has fp32 masters. On a CPU without native
    bf16 the tiny model fits in fp32, and auto trains it in fp32 throughout (tests/model/test_precision.py)."""
    from llava_lora.model import precision as modeling

    native = modeling.cpu_bf16_fast()
    frozen = torch.bfloat16 if native else torch.float32
    assert run.dtypes == {"frozen": {frozen}, "LoRA": {torch.float32}, "projector": {torch.float32}}
    line = next(l for l in run.printed.splitlines() if l.startswith("precision "))
    if native:
        assert line.startswith("precision bf16 on cpu (auto: this CPU computes bf16 natively")
        assert "frozen weights in bfloat16, computed in bfloat16; trained ones (LoRA, projector) in float32" in line
    else:
        assert line.startswith("precision fp32 on cpu (auto: ") and any(
            why in line for why in ("no native bf16", "oneDNN", "slower than fp32"))


def test_precision_auto_says_which_and_why(monkeypatch):
    from llava_lora.model import precision as modeling

    monkeypatch.setattr(modeling, "cpu_half_fast", lambda half=torch.bfloat16: (True, "natively (avx512_bf16)"))
    assert modeling.train_precision("auto", "cpu") == ("bf16", "auto: natively (avx512_bf16)")
    monkeypatch.setattr(modeling, "cpu_half_fast", lambda half=torch.bfloat16: (False, "no native bf16 (test)"))
    precision, why = modeling.train_precision("auto", "cpu")  # no MODEL_DIR: its size is unknown, fp32
    assert precision == "fp32" and why.startswith("auto: no native bf16 (test)")
    assert modeling.train_precision("fp32", "cpu") == ("fp32", "asked for")


def test_bf16_loss_within_one_percent_of_fp32(world: Models, data: Path):
    """The bf16 path (bf16 frozen weights, fp32 LoRA and projector, CPU autocast) against fp32 throughout, on the
    same batch and the same initial LoRA weights."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_lora.chat.batches import Collator, TrainDataset
    from llava_lora.data.records import resolve_data

    processor = AutoProcessor.from_pretrained(world.qwen_model)
    data_file, root = resolve_data(str(data), None, None)
    records, _ = load_records(data_file)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration.from_pretrained(world.qwen_model, dtype=dtype)
        peft_model = apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # as train.main: fp32 masters
                if "lora_B" in n:
                    p.normal_(0, 0.1)  # make the LoRA path matter (B starts at zero)
        ds = TrainDataset(records, root, processor, model.config.image_token_id, IMAGE_TOKENS, 2048)
        batch = Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(4)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss_sum, count = LlavaLoss(peft_model)(batch["input_ids"], batch["attention_mask"],
                                                          batch["labels"], batch["pixel_values"])
        loss = loss_sum / count
        loss.backward()  # the bf16 path trains: gradients reach the fp32 masters
        assert all(p.grad is not None and p.grad.dtype == torch.float32
                   for p in peft_model.parameters() if p.requires_grad)
        losses[dtype] = float(loss.detach())
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) <= 0.01 * losses[torch.float32], losses


def _lora_model_and_batch(world: Models, data: Path, dtype: torch.dtype):
    """The tiny LLaVA in ``dtype`` with LoRA on q/v (fp32 masters, B non-zero: at init it is zero, which would hide a
    wrong update), and a batch of 4 records."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_lora.chat.batches import Collator, TrainDataset
    from llava_lora.data.records import resolve_data

    processor = AutoProcessor.from_pretrained(world.qwen_model)
    data_file, root = resolve_data(str(data), None, None)
    records, _ = load_records(data_file)
    torch.manual_seed(0)
    peft_model = apply_lora(LlavaForConditionalGeneration.from_pretrained(world.qwen_model, dtype=dtype),
                            4, 8, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float().normal_(0, 0.1) if "lora_B" in n else p.data.float()
    ds = TrainDataset(records, root, processor, peft_model.config.image_token_id, IMAGE_TOKENS, 2048)
    return peft_model, Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(4)])


def _loss_and_grads(peft_model, batch, autocast: bool):
    peft_model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss_sum, count = LlavaLoss(peft_model)(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                batch["pixel_values"])
    (loss_sum / count).backward()
    return loss_sum.detach(), [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]


def test_lora_inputs_in_compute_dtype_change_no_number(world: Models, data: Path):
    """Under bf16 autocast, LoRA taking its input in bf16 (no cast to the fp32 masters' dtype and back) gives the
    same loss and the same gradients, bit for bit."""
    from llava_lora.model.adapters import lora_inputs_in_compute_dtype

    peft_model, batch = _lora_model_and_batch(world, data, torch.bfloat16)
    want_loss, want_grads = _loss_and_grads(peft_model, batch, autocast=True)
    assert lora_inputs_in_compute_dtype(peft_model) == 2 * peft_model.config.text_config.num_hidden_layers
    got_loss, got_grads = _loss_and_grads(peft_model, batch, autocast=True)
    assert torch.equal(got_loss, want_loss)
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))


def test_fused_lora_matches_peft_on_the_model(world: Models, data: Path):
    """In float32 (where train fuses LoRA), the model's loss and every trained gradient are peft's to rounding."""
    from llava_lora.kernels import lora

    peft_model, batch = _lora_model_and_batch(world, data, torch.float32)
    want_loss, want_grads = _loss_and_grads(peft_model, batch, autocast=False)
    assert lora.apply(peft_model) == 2 * peft_model.config.text_config.num_hidden_layers
    got_loss, got_grads = _loss_and_grads(peft_model, batch, autocast=False)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_run_loss_falls_and_files_written(run: _Run):
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "data_report.json", "adapter_model.safetensors",
                 "adapter_config.json"):
        assert (run.dir / name).is_file(), name
    assert any((run.dir / "tensorboard").iterdir())
    assert json.loads((run.dir / "data_report.json").read_text())["skipped"] == 0


@pytest.mark.slow
def test_projector_in_every_checkpoint(run: _Run):
    from safetensors.torch import load_file as load

    base = load(str(run.model_dir / "model.safetensors"))
    base_proj = {k: v for k, v in base.items() if "multi_modal_projector" in k}
    assert len(base_proj) == 4  # linear_1/linear_2 weight + bias
    steps = [s for s, _ in checkpoints.checkpoints(run.dir)]
    assert steps == [20, 40]
    for step, ckpt in checkpoints.checkpoints(run.dir):
        weights = load(str(ckpt / "adapter_model.safetensors"))
        proj = {k: v for k, v in weights.items() if "multi_modal_projector" in k}
        assert len(proj) == len(base_proj), (step, sorted(weights))
        assert any("lora_A" in k for k in weights) and any("lora_B" in k for k in weights)
        for k, v in proj.items():  # trained, not the base's copy
            name = next(b for b in base_proj if k.endswith(b.split("multi_modal_projector.", 1)[1]))
            assert not torch.equal(v.float(), base_proj[name].float()), (step, k)


@pytest.mark.slow
def test_final_adapter_loads_with_plain_peft(run: _Run):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(run.model_dir), run.dir)
    got = dict(model.named_parameters())
    for n, t in run.after.items():
        if n in run.trainable:
            # plain from_pretrained loads the bf16 MODEL_DIR in bf16, so the projector comes back in bf16
            assert n in got and torch.equal(got[n], t.to(got[n].dtype)), n


# ----------------------------------------------------------------------------------------------------------
# bad records, refusals
# ----------------------------------------------------------------------------------------------------------

IMAGE_REASONS = {"missing_image", "empty_image", "not_an_image", "truncated_image", "image_path_escapes_root",
                 "image_too_large"}


@pytest.mark.slow
def test_bad_records_trained_through(world: Models, tmp_path: Path, capsys):
    data = tmp_path / "data"
    expected = write_bad_dataset(data)
    records, _ = load_records(data / "chat.json")
    steps = math.ceil(len(records) / 4) + 2  # one full pass over every usable record, and a bit
    rc = cli.main(_train_args(world.qwen_model, data, tmp_path / "run", "--max-steps", str(steps),
                              "--batch-size", "4", "--save-every", "100"))
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    got = {s["id"]: s["reason"] for s in report["samples"]}
    assert got == expected
    # a stat finds these before step 1: they are never drawn; the others fail in a worker, once each
    found_by_stat = {"missing_image", "image_path_escapes_root", "not_a_file"}
    for s in report["samples"]:
        if s["reason"] in IMAGE_REASONS and s["reason"] not in found_by_stat:
            assert s["when"].startswith("step "), s
        else:
            assert s["when"] == "loading", s
    drawn = [json.loads(line) for line in (tmp_path / "run" / "skipped.rank0.jsonl").read_text().splitlines()]
    assert not [d for d in drawn if d["reason"] in found_by_stat]
    assert len({d["index"] for d in drawn}) == len(drawn)  # each failing record reported once, not drawn again
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_refuses_existing_run_dir(world: Models, data: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: x\n")
    assert cli.main(_train_args(world.qwen_model, data, out, "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["config.yaml"]


def test_unknown_yaml_key_names_closest(world: Models, data: Path, tmp_path: Path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump({"learning_rat": 0.01, "max_steps": 1}))
    assert cli.main(_train_args(world.qwen_model, data, tmp_path / "run", "--config", str(cfg))) == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and "'learning_rate'" in err
    assert not (tmp_path / "run").exists()


def _unmarked_copy(model_dir: Path, dst: Path) -> Path:
    """MODEL_DIR whose chat template has lost its {% generation %} markers (as a build before they existed)."""
    import shutil

    shutil.copytree(model_dir, dst)
    template = dst / "chat_template.jinja"
    text = template.read_text().replace("{% generation %}", "").replace("{% endgeneration %}", "")
    template.write_text(text)
    return dst


@pytest.mark.slow
def test_run_that_learns_nothing_fails_loudly(world: Models, data: Path, tmp_path: Path, capsys):
    """Every record supervises nothing: exit 1 with the skip counts and what to do; no adapter, no checkpoint."""
    model = _unmarked_copy(world.qwen_model, tmp_path / "model")
    out = tmp_path / "run"
    rc = cli.main(_train_args(model, data, out, "--max-steps", "50", "--batch-size", "2", "--save-every", "1"))
    err = capsys.readouterr().err
    assert rc == 1, err
    n = len(json.loads((data / "chat.json").read_text()))
    assert f"nothing to learn: the first {n} records drawn carry no supervised token" in err
    assert f"{n} empty_supervision" in err and "--chat-template" in err and "data check" in err
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))
    report = json.loads((out / "data_report.json").read_text())
    assert report["by_reason"] == {"empty_supervision": n}


@pytest.mark.slow
def test_short_run_that_learns_nothing_fails_at_its_end(world: Models, data: Path, tmp_path: Path, capsys):
    model = _unmarked_copy(world.qwen_model, tmp_path / "model")
    rc = cli.main(_train_args(model, data, tmp_path / "run", "--max-steps", "2", "--batch-size", "2"))
    err = capsys.readouterr().err
    assert rc == 1 and "all 4 records drawn in 2 steps carry no supervised token" in err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_num_epochs_sizes_the_run(world: Models, data: Path, tmp_path: Path, capsys):
    n = len(json.loads((data / "chat.json").read_text()))
    out = tmp_path / "run"
    rc = cli.main(_train_args(world.qwen_model, data, out, "--num_train_epochs", "2", "--per_device_train_batch_size",
                              "5", "--save-every", "100", "--log-every", "1"))
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    steps = 2 * math.ceil(n / 5)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert f"{steps} steps of 5 samples: 2.00 epochs" in printed.out


# ----------------------------------------------------------------------------------------------------------
# resume after a kill, DDP
# ----------------------------------------------------------------------------------------------------------

def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("dropout", [
    "0.0",
    "0.05",  # the default dropout: its masks must follow the restored RNG
])
@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(world: Models, data: Path, tmp_path: Path, dropout: str):
    flags = ["--max-steps", "12", "--save-every", "4", "--batch-size", "4", "--log-every", "1",
             "--lora-dropout", dropout]
    a, b = tmp_path / "a", tmp_path / "b"
    assert quiet(cli.main, _train_args(world.qwen_model, data, a, *flags)) == 0

    done = killed_after_first_checkpoint(_train_args(world.qwen_model, data, b, *flags), b)
    assert done and done[-1] < 12 and not (b / "adapter_model.safetensors").exists()

    assert quiet(cli.main, _train_args(world.qwen_model, data, b, *flags, "--resume")) == 0
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-4, rtol=0), k
    assert not any(torch.equal(wa[k], _adapter(a / "checkpoint-4")[k]) for k in wa if "lora_B" in k)


def _torchrun(model: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as sock:  # a free port (torchrun's static rendezvous does not take 0)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
                           "-m", "llava_lora", *_train_args(model, data, out, "--max-steps", "4",
                                                             "--batch-size", "2", "--save-every", "2", *extra)],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_ddp_two_processes_gloo(world: Models, data: Path, tmp_path: Path):
    """Text-only records are grouped by length into image-less micro-batches: the projector gets no gradient
    on that rank, which DDP must tolerate. Each process evaluates half the held-out records; the reduced loss
    equals one process's evaluation of the final adapter."""
    held = tmp_path / "held"
    write_good_dataset(held, n=7, seed=1)  # odd: the two shares differ in size
    out = tmp_path / "ddp"
    proc = _torchrun(world.qwen_model, data, out, "--eval-data", str(held / "chat.json"), "--eval-samples", "2",
                     "--eval-max-new-tokens", "3", "--precision", "fp32")  # fp32, as the eval it is compared with
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert [s for s, _ in checkpoints.checkpoints(out)] == [2, 4]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows and train_rows[-1]["step"] == 4 and all(math.isfinite(r["loss"]) for r in train_rows)
    held_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in held_rows] == [2, 4]
    assert len((out / "samples" / "step-4.jsonl").read_text().splitlines()) == 2
    assert cli.main(["eval", "--model", str(world.qwen_model), "--adapter", str(out), "--data", str(held),
                     "--out", str(tmp_path / "eval"), "--dtype", "float32", "--max-new-tokens", "2"]) == 0
    single = json.loads((tmp_path / "eval" / "summary.json").read_text())["loss"]["finetuned"]
    assert single["tokens"] == held_rows[-1]["eval_tokens"]
    assert single["loss"] == pytest.approx(held_rows[-1]["eval_loss"], rel=1e-4)
