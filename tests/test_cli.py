"""The command line as a user meets it: every help page, flags that mean what they say, HF spellings.

    .venv/bin/pytest tests/test_cli.py -q
"""

from __future__ import annotations

import pytest

from llava_lora import cli
from llava_lora.train.config import TrainConfig

REQUIRED = ["--model", "m", "--data", "d", "--out", "o"]


def _groups() -> list[str]:
    return sorted({name.split()[0] for name in cli.COMMANDS if " " in name})


@pytest.mark.parametrize("argv", [[], *([g] for g in _groups()), *(name.split() for name in cli.COMMANDS)],
                         ids=lambda a: " ".join(a) or "llava-lora")
def test_every_help_renders(argv: list[str], capsys):
    """Walks the command table: a new command is covered without editing this test."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llava-lora")
    if argv and " ".join(argv) in cli.COMMANDS:
        assert cli.COMMANDS[" ".join(argv)][3] in out.replace("\n", " ").replace("  ", " ")


def _error(argv: list[str], capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no usage block
    return err


def test_no_prefix_abbreviations(capsys):
    err = _error(["train", *REQUIRED, "--lr", "2e-2"], capsys)
    assert "unknown flag --lr" in err and "--learning-rate" in err


@pytest.mark.parametrize("flag, closest", [("--max-stpes", "--max-steps"), ("--learning-rat", "--learning-rate"),
                                           ("--batchsize", "--batch-size")])
def test_unknown_flag_names_closest(flag: str, closest: str, capsys):
    err = _error(["train", *REQUIRED, flag, "3"], capsys)
    assert f"unknown flag {flag}" in err and closest in err


def test_unknown_flag_of_data_check(capsys):
    err = _error(["data", "check", "x", "--modl", "m"], capsys)
    assert "llava-lora data check" in err and "--model" in err


HF_FLAGS = ["--learning_rate", "2e-2", "--save_steps", "5", "--per_device_train_batch_size", "3", "--logging_steps",
            "2", "--lr_scheduler_type", "linear", "--warmup_ratio", "0.1", "--num_train_epochs", "2", "--bf16",
            "--gradient_checkpointing", "--max_grad_norm", "0.5", "--gradient_accumulation_steps", "2"]
OURS = {"learning_rate": 2e-2, "save_every": 5, "batch_size": 3, "log_every": 2, "lr_scheduler": "linear",
        "warmup_ratio": 0.1, "num_epochs": 2.0, "precision": "bf16", "gradient_checkpointing": True,
        "max_grad_norm": 0.5, "gradient_accumulation_steps": 2}


def test_hf_spellings_as_flags():
    command, cfg = cli.parse(["train", *REQUIRED, *HF_FLAGS])
    assert command == "train" and isinstance(cfg, TrainConfig)
    assert {k: getattr(cfg, k) for k in OURS} == OURS
    assert cfg.max_steps is None  # sized from the epochs at run time


def test_hf_spellings_in_yaml_mean_ours(tmp_path):
    """A config written with the seed's (HF) names resolves to the same config as one written with ours."""
    hf = tmp_path / "hf.yaml"
    hf.write_text("model_name_or_path: m\ndata: d\noutput_dir: o\nlearning_rate: 0.001\nmax_steps: 800\n"
                  "per_device_train_batch_size: 6\nsave_steps: 200\nlr_scheduler_type: cosine\nwarmup_ratio: 0.03\n"
                  "max_grad_norm: 0.3\ngradient_checkpointing: true\nbf16: true\nfp16: false\nlora_r: 4\n"
                  "lora_alpha: 8\nlora_dropout: 0.05\ntarget_modules: [q_proj, v_proj]\n")
    ours = tmp_path / "ours.yaml"
    ours.write_text("model: m\ndata: d\nout: o\nlearning_rate: 0.001\nmax_steps: 800\nbatch_size: 6\n"
                    "save_every: 200\nlr_scheduler: cosine\nwarmup_ratio: 0.03\nmax_grad_norm: 0.3\n"
                    "gradient_checkpointing: true\nprecision: bf16\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.05\n"
                    "lora_target: [q_proj, v_proj]\n")
    assert cli.parse(["train", "--config", str(hf)])[1] == cli.parse(["train", "--config", str(ours)])[1]


@pytest.mark.parametrize("argv, both", [
    (["--save-every", "3", "--save_steps", "4"], "--save-steps and --save-every"),
    (["--precision", "fp32", "--bf16"], "--precision and --bf16"),
    (["--bf16", "--fp16"], "--bf16 and --fp16"),
])
def test_two_spellings_of_one_setting_refused(argv: list[str], both: str, capsys):
    err = _error(["train", *REQUIRED, *argv], capsys)
    assert "set the same thing" in err
    assert all(flag in err for flag in both.split(" and "))


def test_two_spellings_in_yaml_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 2\nper_device_train_batch_size: 4\n")
    err = _error(["train", *REQUIRED, "--config", str(path)], capsys)
    assert "'batch_size' and 'per_device_train_batch_size' set the same thing" in err


def test_a_switched_off_precision_yields():
    """HF configs carry `bf16: true` beside `fp16: false`; `--no-bf16` alone means fp32, as in HF."""
    assert cli.parse(["train", *REQUIRED, "--no-fp16", "--bf16"])[1].precision == "bf16"
    assert cli.parse(["train", *REQUIRED, "--no-bf16"])[1].precision == "fp32"
    assert cli.parse(["train", *REQUIRED, "--no-bf16", "--no-fp16"])[1].precision == "fp32"


def test_flags_win_over_yaml_in_any_spelling(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("save_steps: 50\n")
    assert cli.parse(["train", *REQUIRED, "--config", str(path), "--save-every", "7"])[1].save_every == 7


def test_unknown_yaml_key_names_closest(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 0.1\n")
    err = _error(["train", *REQUIRED, "--config", str(path)], capsys)
    assert "unknown key 'learning_rat'" in err and "'learning_rate'" in err


def test_max_steps_default_and_epochs():
    assert cli.parse(["train", *REQUIRED])[1].max_steps == 800
    cfg = cli.parse(["train", *REQUIRED, "--num-epochs", "1.5", "--max-steps", "10"])[1]
    assert (cfg.num_epochs, cfg.max_steps) == (1.5, 10)  # both given: max_steps wins, as in HF Trainer


def test_bad_values_refused(capsys):
    assert "num_epochs must be positive" in _error(["train", *REQUIRED, "--num-epochs", "0"], capsys)
    assert "--num-epochs: invalid float value: 'x'" in _error(["train", *REQUIRED, "--num-epochs", "x"], capsys)
    assert "--precision: invalid choice: 'bf17'" in _error(["train", *REQUIRED, "--precision", "bf17"], capsys)


def test_train_help_groups_every_flag_once(capsys):
    """`train --help` lists its flags under headings (TrainConfig.GROUPS); the flags keep their names."""
    import dataclasses

    named = [n for names in TrainConfig.GROUPS.values() for n in names]
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert len(named) == len(set(named)) and set(named) <= set(fields)
    assert set(fields) - set(named) == {"model", "data", "out", "image_dir", "split", "resume", "overwrite",
                                         "resume_changed"}
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for title, names in TrainConfig.GROUPS.items():
        section = out.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0]
        assert all(f"--{n.replace('_', '-')}" in section for n in names), title


def test_demo_takes_the_generation_flags():
    """The demo's settings are GenerationSettings: the page's sliders start at these values."""
    from llava_lora.infer.engine import GenerationSettings

    _, cfg = cli.parse(["demo", "--model", "m", "--temperature", "0.2", "--top-p", "0.9", "--top-k", "5",
                        "--repetition-penalty", "1.1", "--max-new-tokens", "32"])
    assert isinstance(cfg, GenerationSettings)
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty, cfg.max_new_tokens) == (0.2, 0.9, 5, 1.1, 32)
    with pytest.raises(cli.CommandLineError, match="beam search"):
        cli.parse(["demo", "--model", "m", "--num-beams", "2"])


def _readme_commands() -> list[list[str]]:
    """The commands of the README's bash blocks (continuation lines joined, comments dropped)."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_every_readme_command_is_run_or_parsed():
    """Each `make` target of the README exists (`make quickstart` runs the pipeline, tests/tiny/test_quickstart.py
    runs it too); each `llava-lora` command names valid flags and values (its paths are the reader's); each launcher
    line starts `train` with a shipped accelerate config."""
    import re
    from pathlib import Path

    from llava_lora.train.distributed import CONFIGS

    commands = _readme_commands()
    targets = set(re.findall(r"(?m)^([a-z-]+):", (Path(__file__).resolve().parent.parent / "Makefile").read_text()))
    assert {c[0] for c in commands} == {"make", "llava-lora", "torchrun", "accelerate"}
    for argv in commands:
        if argv[0] == "make":
            assert argv[1] in targets, argv
        elif argv[0] in ("torchrun", "accelerate"):  # a launcher of `train` (run by tests/train/test_distributed.py)
            assert argv[argv.index("-m") + 1:argv.index("-m") + 3] == ["llava_lora", "train"], argv
            if "config-path" in argv:
                assert argv[argv.index("config-path") + 1].rstrip(")") in CONFIGS, argv
        else:
            command, cfg = cli.parse(argv[1:])
            assert command in cli.COMMANDS and cfg is not None


@pytest.mark.slow
def test_every_readme_command_runs(world, tmp_path, monkeypatch):
    """The README's `llava-lora` commands, as written, in a folder laid out as they assume (data/cc3m/, cat.jpg): the
    hub ids stand for the tiny checkpoints of the same architectures, and `train` gets a few steps (flags given after
    win, as for a user). `demo` serves until stopped: parsed here, served by tests/infer/test_demo.py."""
    import shutil

    from fixtures.data import write_good_dataset

    write_good_dataset(tmp_path / "data" / "cc3m", n=60)
    shutil.copy(next((tmp_path / "data" / "cc3m" / "images_dl").iterdir()), tmp_path / "cat.jpg")
    hub = {"Qwen/Qwen1.5-4B-Chat": str(world.qwen2), "openai/clip-vit-large-patch14-336": str(world.clip)}
    short = ["--max-steps", "4", "--save-every", "2", "--eval-every", "2", "--num-workers", "0",
             "--no-gradient-checkpointing", "--no-tensorboard"]
    monkeypatch.chdir(tmp_path)
    ran = []
    for argv in (c[1:] for c in _readme_commands() if c[0] == "llava-lora"):
        argv = [hub.get(a, a) for a in argv]
        if argv[0] == "demo":
            assert cli.parse(argv)[0] == "demo"
            continue
        if "--resume" in argv:  # "after a crash": the crash came after checkpoint-2 (a finished run says so, exit 2)
            shutil.rmtree(tmp_path / "runs" / "cc3m" / "checkpoint-4")
        assert cli.main(argv + (short if argv[0] == "train" else [])) == 0, argv
        ran.append(argv[0] if argv[0] != "data" else " ".join(argv[:2]))
    assert ran == ["build", "data check", "train", "train", "eval", "eval", "generate", "export"]
    assert (tmp_path / "models" / "llava-qwen1.5-4b-cc3m" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "cc3m" / "adapter_model.safetensors").is_file()
