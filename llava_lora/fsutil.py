"""Writing output folders: whole-folder swaps and ordinary file modes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def make_readable(folder: Path) -> None:
    """Give the folder and its files the modes of ordinary new files: mkdtemp makes folders owner-only and
    safetensors writes its files owner-only, which would hide a shared model from its other users."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
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
