"""Output folders: one rule for an occupied OUT, whole-folder swaps, and ordinary file modes.

Every command that writes a folder (build, data synth, train, eval, export, quickstart) follows one rule
(``check_out``), applied before anything is deleted:

- an OUT that is, sits inside, or holds one of the command's inputs (MODEL_DIR, RUN_DIR, DATA, ...) is refused;
- an OUT that exists and is not empty is refused unless ``--overwrite`` is given;
- ``--overwrite`` replaces only a folder this tool wrote (it carries the ``MARKER`` file); any other folder is
  refused, naming what it holds.

A folder is written aside and moved into place whole (``new_folder``), so OUT is never half old, half new.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from .errors import UsageError

OVERWRITE_HELP = ("replace OUT if it exists and is not empty: only a folder llava-lora wrote (its .llava-lora "
                  "marker), its old contents deleted")
MARKER = ".llava-lora"  # in every folder this tool writes: what --overwrite may replace


def mark(folder: Path) -> None:
    """Mark ``folder`` as written by this tool (so a later ``--overwrite`` may replace it)."""
    from . import __version__

    (folder / MARKER).write_text(json.dumps({"written_by": f"llava-lora {__version__}"}) + "\n")


def is_marked(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_inputs(out: Path, inputs: Mapping[str, object], homes: Mapping[str, object], flag: str) -> None:
    """Refuse an OUT that is, sits inside, or holds an input (``{flag: path}``; a path that does not exist, such
    as a hub id, is no folder of this machine). ``homes``: inputs OUT may sit inside (eval's RUN_DIR/eval-*)."""
    where = out.resolve()
    for name, value in {**inputs, **homes}.items():
        for p in value if isinstance(value, (list, tuple)) else [value]:
            if p is None or not str(p) or not Path(str(p)).exists():
                continue
            src = Path(str(p)).resolve()
            if where == src:
                raise UsageError(f"{flag} {out} is {name} {p}, an input of this command: choose another folder")
            if _within(src, where):
                raise UsageError(f"{flag} {out} holds {name} {p}, an input of this command (--overwrite would "
                                 "delete it): choose another folder")
            if _within(where, src) and name not in homes:
                raise UsageError(f"{flag} {out} is inside {name} {p}, an input of this command: choose a folder "
                                 "outside it")


def _contents(folder: Path, n: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_out(out: Path, overwrite: bool, flag: str = "--out", inputs: Mapping[str, object] | None = None,
              homes: Mapping[str, object] | None = None) -> None:
    """The one rule for OUT (see the module's docstring); raises ``UsageError``, deletes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} exists and is not a folder")
    check_inputs(out, inputs or {}, homes or {}, flag)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"{flag} {out} exists and is not empty (pass --overwrite to replace it)")
    if not is_marked(out):
        raise UsageError(f"{flag} {out} was not written by llava-lora (no {MARKER} file), so --overwrite will not "
                         f"delete it; it holds {_contents(out)}. Choose another folder, or remove it yourself")


@contextlib.contextmanager
def new_folder(out: Path, overwrite: bool, label: str = "tmp", into: bool = False, owned: bool = False
               ) -> Iterator[Path]:
    """Write OUT whole: yields a temporary folder beside it (``.OUT.<label>-*``), which replaces OUT when the block
    completes, every file fsynced first and the folder marked (``MARKER``); if the block fails, it is removed and
    OUT is untouched. The one way every command writes a folder (build, data synth, eval, export, train's
    checkpoints and adapter files).

    ``into``: OUT is a folder that holds other things too (RUN_DIR): the temporary folder sits inside it, and each
    file written there replaces its namesake in OUT by one atomic rename (a reader never sees half a file).
    ``owned``: OUT's place belongs to the caller (a checkpoint-N/ in RUN_DIR), replaced whatever it holds."""
    if into:
        out.mkdir(parents=True, exist_ok=True)
    else:
        if not owned:
            check_out(out, overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{label}-", dir=out if into else out.parent))
    try:
        yield tmp
        mark(out if into else tmp)
        make_readable(tmp)
        fsync_tree(tmp)
        if into:
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
        else:
            move_into_place(tmp, out)
        _fsync_dir(out.parent if not into else out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    """Every file under ``folder`` on the disk, and the folders that name them (a rename after a crash must not
    point at data still in the page cache)."""
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems (and Windows) cannot open a folder to sync it
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_readable(folder: Path) -> None:
    """Give the folder and what it holds the modes of ordinary new files and folders: mkdtemp makes folders
    owner-only and safetensors writes its files owner-only, which would hide a shared model from its other users."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        if f.is_dir():
            make_readable(f)
        else:
            f.chmod(0o666 & ~mask)


def move_into_place(tmp: Path, out: Path) -> None:
    """Swap ``tmp`` in for ``out``; an old ``out`` is removed only once the new one is in place."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
