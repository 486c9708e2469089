"""The one rule for an output folder (llava_lora/outdirs.py), and every command that writes one: inputs checked
before anything is deleted, an OUT that is, sits inside or holds an input refused, ``--overwrite`` replacing only a
folder llava-lora wrote (its marker), the swap atomic.

    .venv/bin/pytest tests/test_outdirs.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_lora import cli, outdirs
from llava_lora.errors import UsageError


def _foreign(folder: Path) -> Path:
    """A folder llava-lora did not write: a user's files."""
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("a year of work")
    (folder / "figures").mkdir()
    return folder


def _written(folder: Path, text: str = "old") -> Path:
    with outdirs.new_folder(folder, overwrite=True) as tmp:
        (tmp / "result.txt").write_text(text)
    return folder


def test_new_folder_marks_what_it_writes_and_overwrite_replaces_it(tmp_path: Path):
    out = _written(tmp_path / "out")
    assert outdirs.is_marked(out)
    with pytest.raises(UsageError, match="pass --overwrite"):
        outdirs.check_out(out, overwrite=False)
    _written(out, "new")
    assert (out / "result.txt").read_text() == "new" and outdirs.is_marked(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_overwrite_refuses_a_folder_it_did_not_write_naming_what_it_holds(tmp_path: Path):
    out = _foreign(tmp_path / "mine")
    with pytest.raises(UsageError) as e:
        outdirs.check_out(out, overwrite=True)
    assert "was not written by llava-lora" in str(e.value) and "figures/, thesis.tex" in str(e.value)
    with pytest.raises(UsageError):
        _written(out)
    assert (out / "thesis.tex").read_text() == "a year of work"


def test_a_failed_block_leaves_out_as_it_was(tmp_path: Path):
    out = _written(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with outdirs.new_folder(out, overwrite=True) as tmp:
            (tmp / "result.txt").write_text("half")
            raise RuntimeError("died")
    assert (out / "result.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where, says", [("model", "is --model"), ("model/sub", "is inside --model"),
                                         (".", "holds --model")])
def test_out_that_is_inside_or_holds_an_input_is_refused(tmp_path: Path, where: str, says: str):
    model = _written(tmp_path / "model")
    with pytest.raises(UsageError, match=says):
        outdirs.check_out(tmp_path / where, overwrite=True, inputs={"--model": str(model)})
    assert (model / "result.txt").is_file()
    # a hub id (no such folder here) is no folder of this machine; a home may hold OUT (eval's RUN_DIR/eval-test)
    outdirs.check_out(tmp_path / "other", overwrite=True, inputs={"--model": "Qwen/Qwen1.5-4B-Chat"})
    outdirs.check_out(model / "eval-test", overwrite=True, homes={"--adapter": str(model)})


def test_train_with_a_typo_deletes_nothing(tmp_path: Path, capsys):
    run = _written(tmp_path / "runs" / "a")  # a week of training
    assert cli.main(["train", "--model", "/typo", "--data", "/typo", "--out", str(run), "--overwrite"]) == 2
    assert "/typo" in capsys.readouterr().err
    assert (run / "result.txt").read_text() == "old"


def test_train_refuses_to_overwrite_its_data(tmp_path: Path, capsys):
    data = _written(tmp_path / "data")  # even one llava-lora wrote (data synth)
    (data / "chat.json").write_text("[]")
    assert cli.main(["train", "--model", str(tmp_path / "m"), "--data", str(data), "--out", str(data),
                     "--overwrite"]) == 2
    assert f"--out {data} is --data" in capsys.readouterr().err
    assert (data / "chat.json").is_file()


def test_export_refuses_an_out_holding_its_adapter(tmp_path: Path, capsys):
    runs = _written(tmp_path / "runs")
    adapter = _written(runs / "a")
    assert cli.main(["export", "--model", str(tmp_path / "m"), "--adapter", str(adapter), "--out", str(runs),
                     "--overwrite"]) == 2
    assert f"holds --adapter {adapter}" in capsys.readouterr().err
    assert (adapter / "result.txt").is_file()


def test_quickstart_will_not_empty_a_folder_it_did_not_write(tmp_path: Path, capsys, monkeypatch):
    here = _foreign(tmp_path / "home")
    monkeypatch.chdir(here)
    assert cli.main(["quickstart", "--out", ".", "--overwrite"]) == 2
    assert "was not written by llava-lora" in capsys.readouterr().err
    assert (here / "thesis.tex").is_file()
