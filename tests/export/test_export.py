"""``llava-lora export``: the merged folder loads with plain transformers and answers as base + adapter.

    .venv/bin/pytest tests/export/test_export.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fixtures.trained import World, eval_world
from llava_lora.infer import answers
from llava_lora import cli, outdirs
from llava_lora.export import merge as export
from llava_lora.data.records import Record, Turn, load_records, resolve_data
from llava_lora.infer.engine import GenerationSettings
from llava_lora.model.load import load_model

pytestmark = pytest.mark.slow  # every test here trains or serves a model: `make test` runs them

SETTINGS = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return eval_world(tmp_path_factory)


def run_cli(*args) -> int:
    return cli.main(["export", *map(str, args)])


def plain(folder):
    """MERGED_DIR loaded the way a user without our package would."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def test_float32_export_answers_exactly_as_base_plus_adapter(world, tmp_path, capsys):
    out = tmp_path / "merged"
    assert run_cli("--model", world.model, "--adapter", world.run, "--out", out, "--dtype", "float32",
                   "--data", world.data, "--split", "test", "--check-samples", 4) == 0
    printed = capsys.readouterr().out
    assert "self-check: 4 of 4 greedy answers" in printed and "precision float32 on cpu (asked for)" in printed
    meta = json.loads((out / "export.json").read_text())
    assert meta["self_check"]["equal"] == meta["self_check"]["samples"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    merged, processor = plain(out)
    assert merged.dtype == torch.float32
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    file, root = resolve_data(world.data, "test")
    records = load_records(file)[0][8:20]  # other samples than the self-check's
    got, _ = answers.predict(merged, processor, records, root, SETTINGS, 4, ("base",), progress=False)
    tuned, tuned_processor = load_model(world.model, world.run, dtype="float32", device="cpu")
    want, _ = answers.predict(tuned, tuned_processor, records, root, SETTINGS, 4, ("finetuned",), progress=False)
    assert [p.answers["base"] for p in got] == [p.answers["finetuned"] for p in want]

    # parts the adapter does not touch are the base's tensors; the projector is the trained one
    base = load_file(world.model / "model.safetensors")
    written = load_file(out / "model.safetensors")
    adapter = load_file(world.run / "adapter_model.safetensors")
    assert sorted(written) == sorted(base)  # the same key layout as MODEL_DIR
    tower = [k for k in base if "vision_tower." in k]
    assert tower and all(torch.equal(base[k].float(), written[k]) for k in tower)
    def projector_of(state: dict) -> dict:
        return {k.split("multi_modal_projector.")[-1]: v for k, v in state.items() if "multi_modal_projector." in k}

    trained, projector = projector_of(adapter), projector_of(written)
    assert projector.keys() == trained.keys() and all(torch.equal(projector[k], trained[k].float()) for k in trained)


def test_default_export_keeps_the_base_dtype(world, tmp_path, capsys):
    out = tmp_path / "merged"
    assert run_cli("--model", world.model, "--adapter", world.run, "--out", out) == 0  # the row-by-row merge check
    printed = capsys.readouterr().out
    assert "merge check: 8 rows of each of 14 LoRA layers equal W + scale·B·A" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == config["vision_config"]["dtype"] == "bfloat16"
    merged, processor = plain(out)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert processor.tokenizer.chat_template and "<image>" in processor.tokenizer.get_vocab()
    assert (out / "generation_config.json").is_file() and (out / "export.yaml").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (world.model / name).read_bytes()  # the processor, byte for byte
    assert not (out / "build_report.json").exists()


def test_self_check_tolerates_rounding_only_in_half_precision(capsys):
    records = [Record(f"r{i}", (), (Turn("user", "q"), Turn("assistant", "a"))) for i in range(2)]
    result = export.self_check(["red", "top left"], ["red", "top right"], records, "bfloat16")
    assert (result["samples"], result["equal"]) == (2, 1)
    printed = capsys.readouterr().out
    assert "1 of 2" in printed and "r1: base+adapter 'top left' vs merged 'top right'" in printed
    assert "--dtype float32" in printed
    with pytest.raises(RuntimeError, match="MERGED_DIR was not written"):
        export.self_check(["red"], ["blue"], records[:1], "float32")


def test_existing_output_folder_is_refused_unless_overwrite(world, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ["--model", world.model, "--adapter", world.run, "--out", out, "--check-samples", 1, "--check-tokens", 2]
    assert run_cli(*args) == 2
    assert "exists and is not empty (pass --overwrite to replace it)" in capsys.readouterr().err
    assert run_cli(*args, "--overwrite") == 2  # not a folder llava-lora wrote: kept
    assert "was not written by llava-lora" in capsys.readouterr().err and (out / "old.txt").is_file()
    outdirs.mark(out)  # as an earlier export would have
    assert run_cli(*args, "--overwrite") == 0
    assert (out / "model.safetensors").is_file() and not (out / "old.txt").exists()


def test_adapter_for_another_base_is_refused(world, tmp_path, capsys):
    assert run_cli("--model", world.other_model, "--adapter", world.run, "--out", tmp_path / "merged") == 2
    err = capsys.readouterr().err
    assert "different base" in err and str(world.model.resolve()) in err
    assert list(tmp_path.iterdir()) == []


def test_missing_adapter_is_refused(world, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert run_cli("--model", world.model, "--adapter", tmp_path / "run", "--out", tmp_path / "merged") == 2
    assert "no adapter found" in capsys.readouterr().err


def test_export_loads_one_copy_in_the_base_dtype_and_merges_it_exactly(world, tmp_path, monkeypatch, capsys):
    """The bf16 base is loaded once in bf16 (the LoRA matrices in float32, as saved), merged in place, and each
    merged weight is bf16(W + scale * B @ A) summed in float32: base + adapter to bf16 precision."""
    seen = {}
    real_merge = export.merge_in_place

    def spy(model, dtype):
        seen["params"] = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
        seen["tensors"] = {id(p) for p in model.get_base_model().parameters()}
        merged = real_merge(model, dtype)
        seen["same_tensors"] = {id(p) for p in merged.parameters()} <= seen["tensors"]
        return merged

    monkeypatch.setattr(export, "merge_in_place", spy)
    out = tmp_path / "merged"
    assert run_cli("--model", world.model, "--adapter", world.run, "--out", out, "--check-samples", 1,
                   "--dtype", "bfloat16") == 0  # as auto on a CPU that computes bf16 natively
    printed = capsys.readouterr().out
    assert "precision bfloat16 on cpu (asked for)" in printed
    assert "next-token logits of the merged model differ from base + adapter by at most" in printed
    params = seen["params"]
    lora = {n: d for n, (d, _) in params.items() if "lora_" in n}
    projector = {n: d for n, (d, _) in params.items() if "modules_to_save" in n}
    frozen = {n: d for n, (d, _) in params.items() if n not in lora and n not in projector}
    assert lora and projector and frozen
    assert set(frozen.values()) == {torch.bfloat16}, "frozen weights must stay in the checkpoint's bf16"
    # peft loads LoRA matrices in float32 (as saved) and the trained projector into a copy of the base's, in bf16
    assert set(lora.values()) == {torch.float32} and set(projector.values()) == {torch.bfloat16}
    assert not any(trainable for _, trainable in params.values())  # loaded for inference
    assert seen["same_tensors"], "the merge must fold into the loaded tensors, not a copy"

    base = load_file(world.model / "model.safetensors")
    adapter = load_file(world.run / "adapter_model.safetensors")
    written = load_file(out / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    cfg = json.loads((world.run / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    merged_layers = 0
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        module = key.split("base_model.model.model.language_model.")[1].split(".lora_A.")[0]
        wkey = next(k for k in base if k.endswith(f"{module}.weight") and "language_model" in k)
        want = (base[wkey].float() + scale * (b.float() @ a.float())).to(torch.bfloat16)
        assert torch.equal(written[wkey], want), wkey
        assert not torch.equal(written[wkey], base[wkey]), f"{wkey}: the adapter changed nothing"
        merged_layers += 1
    assert merged_layers == 7 * 2  # every linear layer of both decoder layers (the fixture's targets)


def test_self_check_refuses_logits_that_moved_more_than_rounding(capsys):
    records = [Record("r0", (), (Turn("user", "q"), Turn("assistant", "a")))]
    logits = torch.tensor([[10.0, -3.0, 2.0]])
    near = export.Probe(logits + torch.tensor([[0.05, 0.0, 0.0]]), ["red"])  # 0.5% of the scale: bf16 rounding
    result = export.self_check(export.Probe(logits, ["red"]), near, records, "bfloat16")
    assert abs(result["logit_drift"] - 0.005) < 1e-6
    with pytest.raises(RuntimeError, match="logits moved"):
        export.self_check(export.Probe(logits, ["red"]), export.Probe(logits * 1.2, ["red"]), records, "bfloat16")
    with pytest.raises(RuntimeError, match="logits moved"):
        export.self_check(export.Probe(logits, ["red"]), near, records, "float32")


def test_a_wrong_merge_is_refused_before_anything_is_written(world, tmp_path, monkeypatch, capsys):
    """The row-by-row merge check (always on, no sample needed) catches a merge scaled wrong: exit 1, no folder."""
    from peft.tuners.lora.layer import Linear

    real = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, adapter: 2 * real(self, adapter))
    out = tmp_path / "merged"
    assert run_cli("--model", world.model, "--adapter", world.run, "--out", out) == 1
    err = capsys.readouterr().err
    assert "merge check: model.language_model.layers." in err and "MERGED_DIR was not written" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_merge_check_alone_by_default_and_in_weight_only_precision(world, tmp_path, capsys):
    """No sample by default: the merge is checked row by row (exactly, in bf16's last place); bf16-weights loads the
    bf16 weights for fp32 compute and writes them in bf16."""
    out = tmp_path / "merged"
    assert run_cli("--model", world.model, "--adapter", world.run, "--out", out, "--dtype", "bf16-weights") == 0
    printed = capsys.readouterr().out
    assert "precision bfloat16 weights, float32 compute on cpu (asked for)" in printed
    assert "merge check: 8 rows of each of 14 LoRA layers equal W + scale·B·A" in printed
    assert "greedy answers" not in printed  # no end-to-end sample by default
    meta = json.loads((out / "export.json").read_text())
    assert meta["self_check"]["merge"]["lora_layers"] == 14 and meta["self_check"]["merge"]["max_ulp"] <= 1
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_a_non_finite_adapter_is_refused_and_a_nan_drift_fails_the_check(world, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    run = tmp_path / "diverged"
    shutil.copytree(world.run, run)
    weights = load_file(str(run / "adapter_model.safetensors"))
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = torch.full_like(weights[key], float("nan"))  # what a run that diverged would have written
    save_file(weights, str(run / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert run_cli("--model", world.model, "--adapter", run, "--out", tmp_path / "merged") == 1
    assert "trained tensors hold NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    # the end-to-end check compares NaN-safely: a NaN drift is no pass
    record = Record("a", None, (Turn("user", "q"), Turn("assistant", "a")))
    nan, one = export.Probe(torch.tensor([[float("nan")]]), ["a"]), export.Probe(torch.tensor([[1.0]]), ["a"])
    with pytest.raises(RuntimeError, match="MERGED_DIR was not written"):
        export.self_check(one, nan, [record], "float32")
