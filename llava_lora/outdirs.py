"""Output folders: one rule for an occupied OUT, whole-folder swaps, and ordinary file modes.

Every command that writes a folder (build, data synth, eval, export, quickstart) refuses an OUT that exists and is
not empty unless ``--overwrite`` is given, and ``--overwrite`` always means one thing: OUT is replaced, its old
contents deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError

OVERWRITE_HELP = "replace OUT if it exists and is not empty (its old contents are deleted)"


def check_out(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an OUT that is a file, or a non-empty folder without ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{flag} {out} exists and is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def new_folder(out: Path, overwrite: bool, label: str = "tmp", into: bool = False) -> Iterator[Path]:
    """Write OUT whole: yields a temporary folder beside it (``.OUT.<label>-*``), which replaces OUT when the block
    completes; if the block fails, it is removed and OUT is untouched. The one way every command writes a folder
    (build, data synth, eval, export, train's checkpoints and adapter files).

    ``into``: OUT is a folder that holds other things too (RUN_DIR): the temporary folder sits inside it, and each
    file written there replaces its namesake in OUT by one atomic rename (a reader never sees half a file)."""
    if into:
        out.mkdir(parents=True, exist_ok=True)
    else:
        check_out(out, overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{label}-", dir=out if into else out.parent))
    try:
        yield tmp
        make_readable(tmp)
        if into:
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
        else:
            move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
