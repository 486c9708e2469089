"""Several processes: the shipped accelerate configs, a launch that differs from what was asked refused, FSDP2 on
a CPU (gloo, 2 processes) equal to one process, its adapter a plain peft one, its resume after kill -9 exact, and two
"nodes" on 127.0.0.1 equal to one node. Multi-process runs are subprocesses with a timeout: a hang fails the test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.data import write_good_dataset
from fixtures.models import FAST, Models, quiet
from llava_lora import cli
from llava_lora.chat.encode import image_tokens_per_image
from llava_lora.data.records import load_records
from llava_lora.errors import UsageError
from llava_lora.train import checkpoints, distributed
from llava_lora.train.sampler import estimated_lengths as _estimated_lengths
from llava_lora.train.sampler import ResumableBatchSampler

VENV_BIN = Path(sys.executable).parent
STEPS, BATCH = 8, 2  # per process; one process takes 2 x BATCH, the same global batch
TRAIN = ["--max-steps", str(STEPS), "--save-every", "2", "--log-every", "1", "--precision", "fp32",
         "--lora-dropout", "0", "--save-best", "--save-total-limit", "1", "--eval-samples", "2",
         "--eval-max-new-tokens", "3"]
TIMEOUT = 420  # seconds for a 2-process run of 4 tiny steps; far above what it takes, short of a hung suite


# ------------------------------------------------------------------------------------------ fast: configs, checks
@pytest.mark.parametrize("name, kind, detail", [
    ("ddp", "MULTI_GPU", None), ("fsdp2", "FSDP", ("fsdp_config", "fsdp_version", 2)),
    ("zero2", "DEEPSPEED", ("deepspeed_config", "zero_stage", 2)),
    ("zero3", "DEEPSPEED", ("deepspeed_config", "zero_stage", 3))])
def test_shipped_configs_load_in_accelerate(name, kind, detail, capsys):
    """Each config is read by accelerate's own loader (what accelerate launch --config_file does) and says what
    its name says; none sets use_cpu (accelerate launch --cpu runs one process)."""
    from accelerate.commands.config.config_args import load_config_from_file

    assert cli.main(["config-path", name]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.is_file() and path == distributed.config_path(name)
    config = load_config_from_file(str(path))
    assert str(config.distributed_type).endswith(kind) and not config.use_cpu
    if detail:
        assert getattr(config, detail[0])[detail[1]] == detail[2]


def test_config_path_unknown_name(capsys):
    assert cli.main(["config-path", "zero4"]) == 2
    assert "ddp, fsdp2, zero2, zero3" in capsys.readouterr().err


def test_asked_from_launcher_env():
    assert distributed.Asked.from_env({}) == distributed.Asked(1, "none")
    assert distributed.Asked.from_env({"WORLD_SIZE": "2"}) == distributed.Asked(2, "ddp")
    assert distributed.Asked.from_env({"WORLD_SIZE": "4", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == \
        distributed.Asked(4, "fsdp2")
    assert distributed.Asked.from_env({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true",
                                       "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) == distributed.Asked(2, "zero3")


def test_deepspeed_on_a_cpu_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(UsageError, match="ZeRO-3 was asked on a CPU"):
        distributed.make_accelerator("cpu", "no")


def test_fsdp_config_run_as_one_plain_process_refused(monkeypatch):
    """FSDP asked, one process without sharding set up: an error naming both, not a silent plain run."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UsageError, match="asked for 1 process.* with fsdp2, but accelerate set up 1 with none"):
        distributed.make_accelerator("cpu", "no")


# ------------------------------------------------------------------------------------------ slow: real launches
def _port() -> int:
    with socket.socket() as sock:  # a free port (torchrun's static rendezvous does not take 0)
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(config: str, args: list[str], *launcher: str, **popen) -> subprocess.Popen:
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(distributed.config_path(config)),
           *launcher, "-m", "llava_lora", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_all(proc)
        proc.communicate()
        raise AssertionError("the run hung (no end within the timeout)") from None
    assert proc.returncode == 0, out[-3000:]
    return out


def _kill_all(proc: subprocess.Popen) -> None:
    """kill -9 of the launcher and every process under it (torchrun starts its workers in sessions of their own)."""
    import psutil

    launcher = psutil.Process(proc.pid)
    for p in [*launcher.children(recursive=True), launcher]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def _losses(run_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def _values(run_dir: Path, key: str = "loss") -> list[float]:
    return [v for _, v in _losses(run_dir, key)]


def _args(world: Models, data: Path, held: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return ["train", "--model", str(world.qwen_model), "--data", str(data), "--out", str(out), *FAST, *TRAIN,
            "--batch-size", str(batch), "--eval-data", str(held / "chat.json"), *extra]


@pytest.fixture(scope="module")
def held(tmp_path_factory) -> Path:
    held = tmp_path_factory.mktemp("held")
    write_good_dataset(held, n=7, seed=1)  # odd: the two shares differ in size
    return held


@pytest.fixture(scope="module")
def one(world: Models, data: Path, held: Path, tmp_path_factory) -> Path:
    """One process, the global batch of 2 x BATCH."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert quiet(cli.main, _args(world, data, held, out, 2 * BATCH)) == 0
    return out


@pytest.fixture(scope="module")
def fsdp2(world: Models, data: Path, held: Path, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    printed = _finish(_launch("fsdp2", _args(world, data, held, out, BATCH), "--num_processes", "2",
                              "--main_process_port", str(_port()), start_new_session=True))
    return out, printed


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one(world: Models, data: Path, one: Path, fsdp2):
    """Per-step losses and held-out losses (each process its share, reduced) equal one process's on the same
    global batches; a step where one rank's batch is text-only alone runs (the blank image) and does not hang."""
    out, printed = fsdp2
    assert "processes: FSDP2 over 2 processes on 1 node (gloo)" in printed
    assert len(_losses(out)) == STEPS
    for (s1, a), (s2, b) in zip(_losses(one), _losses(out)):
        assert s1 == s2 and b == pytest.approx(a, rel=1e-4, abs=1e-4), (s1, a, b)
    assert [s for s, _ in _losses(out, "eval_loss")] == [s for s, _ in _losses(one, "eval_loss")] == [2, 4, 6, 8]
    assert _values(out, "eval_loss") == pytest.approx(_values(one, "eval_loss"), rel=1e-4)
    # the case of issue 25's item 3 was trained: some rank's micro-batch held text-only records alone
    records, _ = load_records(data / "chat.json")
    from transformers import AutoConfig

    lengths = _estimated_lengths(records, image_tokens_per_image(AutoConfig.from_pretrained(world.qwen_model)))
    text_only_rank = False
    for rank in (0, 1):
        batches = iter(ResumableBatchSampler(len(records), BATCH, 0, rank=rank, world=2, lengths=lengths))
        text_only_rank |= any(all(records[i].image is None for i in next(batches)) for _ in range(STEPS))
    assert text_only_rank


@pytest.mark.slow
def test_fsdp2_adapter_is_plain_peft_and_bookkeeping_once(world: Models, one: Path, fsdp2):
    """The adapter saved from shards is the whole one (PeftModel.from_pretrained on one process loads it, equal to
    one process's); --save-best and --save-total-limit acted once, on rank 0: the same checkpoints remain."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    out, _ = fsdp2
    ours, ref = load_file(str(out / "adapter_model.safetensors")), load_file(str(one / "adapter_model.safetensors"))
    assert ours.keys() == ref.keys() and any("multi_modal_projector" in k for k in ours)
    for k in ours:
        assert ours[k].shape == ref[k].shape and torch.allclose(ours[k], ref[k], atol=1e-4, rtol=0), k
    base = LlavaForConditionalGeneration.from_pretrained(world.qwen_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    loaded = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert loaded and all(p.abs().sum() > 0 for p in loaded.values())
    assert [s for s, _ in checkpoints.checkpoints(out)] == [s for s, _ in checkpoints.checkpoints(one)]
    best = lambda d: json.loads((d / "run.json").read_text())["best_checkpoint"]  # noqa: E731
    assert best(out) == best(one)


@pytest.mark.slow
def test_fsdp2_resume_after_kill_is_exact(world: Models, data: Path, held: Path, fsdp2, tmp_path: Path):
    """kill -9 of the launch and all its processes once checkpoint-2 is written, then --resume: the adapter of the uninterrupted
    FSDP2 run."""
    out = tmp_path / "run"
    args = _args(world, data, held, out, BATCH)
    port = str(_port())
    proc = _launch("fsdp2", args, "--num_processes", "2", "--main_process_port", port, start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT
        while not (out.is_dir() and checkpoints.checkpoints(out)) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        _kill_all(proc)
    finally:
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "adapter_model.safetensors").exists()
    _finish(_launch("fsdp2", [*args, "--resume"], "--num_processes", "2", "--main_process_port", str(_port()),
                    start_new_session=True))
    ours, ref = load_file(str(out / "adapter_model.safetensors")), load_file(str(fsdp2[0] / "adapter_model.safetensors"))
    for k in ref:
        assert torch.allclose(ours[k], ref[k], atol=1e-5, rtol=0), k


@pytest.mark.slow
def test_two_nodes_on_localhost_equal_one_node(world: Models, data: Path, held: Path, fsdp2, tmp_path: Path):
    """Two launches of one process each, node ranks 0 and 1 of 2, meeting on 127.0.0.1: the losses of 2 processes
    on one node."""
    out, port = tmp_path / "run", str(_port())
    nodes = [_launch("fsdp2", _args(world, data, held, out, BATCH), "--num_processes", "2", "--num_machines", "2",
                     "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                     start_new_session=True) for rank in (0, 1)]
    printed = [_finish(p) for p in nodes]
    assert "FSDP2 over 2 processes on 2 nodes (gloo)" in printed[0]
    assert len(_values(out)) == STEPS and _values(out) == pytest.approx(_values(fsdp2[0]), rel=1e-5)
    assert _values(out, "eval_loss") == pytest.approx(_values(fsdp2[0], "eval_loss"), rel=1e-5)


@pytest.mark.slow
def test_accelerate_cpu_flag_refused(world: Models, data: Path, held: Path, tmp_path: Path):
    """accelerate launch --cpu starts one process whatever --num_processes says: the run stops, saying so."""
    proc = _launch("fsdp2", _args(world, data, held, tmp_path / "run", BATCH), "--num_processes", "2", "--cpu",
                   start_new_session=True)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0 and "returned non-zero exit status 2" in out  # ours, reported by accelerate
    assert "started one process where more were asked: with --cpu" in out and "Drop --cpu" in out
    assert not (tmp_path / "run").exists()


def test_blank_image_changes_no_number_and_runs_the_tower(world: Models, data: Path):
    """With vision_every_step, a text-only batch runs the tower and projector (on a blank image, features times
    zero): the loss and the LoRA gradients are those without it; the projector gets zero gradients, not none."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_lora.chat.batches import Collator, TrainDataset
    from llava_lora.model.adapters import apply_lora
    from llava_lora.model.loss import LlavaLoss

    records, _ = load_records(data / "chat.json")
    text_only = [r for r in records if r.image is None][:2]
    processor = AutoProcessor.from_pretrained(world.qwen_model)
    peft_model = apply_lora(LlavaForConditionalGeneration.from_pretrained(world.qwen_model, dtype=torch.float32),
                            4, 8, 0.0, ["q_proj", "v_proj"], True)
    config = peft_model.config
    dataset = TrainDataset(text_only, data / "images_dl", processor, config.image_token_id,
                           image_tokens_per_image(config), 256)
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(text_only))])
    assert batch["pixel_values"] is None
    tower_calls = []
    tower = peft_model.base_model.model.model.vision_tower
    hook = tower.register_forward_hook(lambda *_: tower_calls.append(1))
    results = []
    for blank in (False, True):
        peft_model.zero_grad(set_to_none=True)
        loss, n = LlavaLoss(peft_model, vision_every_step=blank)(batch["input_ids"], None, batch["labels"])
        loss.backward()
        results.append((float(loss.detach()), {k: p.grad for k, p in peft_model.named_parameters() if p.requires_grad}))
    hook.remove()
    assert len(tower_calls) == 1  # only with the blank image
    (plain, grads), (with_blank, blank_grads) = results
    assert with_blank == plain
    for k, g in grads.items():
        if "projector" in k:
            assert g is None and blank_grads[k] is not None and not blank_grads[k].any(), k
        else:
            assert torch.equal(g, blank_grads[k]), k


@pytest.mark.slow
def test_ddp_config_trains_as_fsdp2(world: Models, data: Path, held: Path, fsdp2, tmp_path: Path):
    """The shipped ddp config on a machine without a GPU: 2 processes over gloo, the losses of FSDP2's run."""
    out = tmp_path / "run"
    printed = _finish(_launch("ddp", _args(world, data, held, out, BATCH), "--num_processes", "2",
                              "--main_process_port", str(_port()), start_new_session=True))
    assert "processes: DDP over 2 processes on 1 node (gloo)" in printed
    assert _values(out) == pytest.approx(_values(fsdp2[0]), rel=1e-5)
    assert _values(out, "eval_loss") == pytest.approx(_values(fsdp2[0], "eval_loss"), rel=1e-5)
