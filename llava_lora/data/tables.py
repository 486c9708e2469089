"""Tables of records: parquet files (one, or a folder of them), ``datasets.save_to_disk`` folders and
``hf://datasets/OWNER/NAME[@rev][:split]``, read with pyarrow and datasets, lazily.

    llava-lora data check data/mllm.parquet           # or a folder of *.parquet, or a save_to_disk folder
    loaded = load("data/mllm.parquet", RecordReader)  # the text columns, a row group at a time; no image bytes

A row is a record of any format of ``formats.py`` (``messages`` + ``images``, ``conversations`` + ``image``,
content parts). Its images are ``datasets.Image`` structs (``{"bytes", "path"}``, or lists of them) or path
strings. Opening reads the text columns and only the ``path`` field of the image columns; an image's bytes are
read when it is decoded (``TableImages.open``): one row group of that column from parquet (``datasets`` writes
image sets in groups of 100 rows), a slice of the memory-mapped Arrow file of a ``save_to_disk`` folder. Nothing
holds all rows or all images in memory. A struct without bytes is read by its path under the image root.

The hub (``hf://datasets/...``) lists the set's parquet files with ``huggingface_hub`` and reads them through the
same ``ParquetPart`` as a local file: only the opening differs. It was not run here (no network).
"""

from __future__ import annotations

import bisect
import io
import json
from pathlib import Path
from typing import Any

from ..errors import BadRecord, UsageError
from .images import as_store

BATCH_ROWS = 1024  # rows of text converted to records at a time
EMBEDDED = "\0"  # an image reference into a table starts with a NUL, which no path may hold


def _image_columns(schema) -> dict[str, bool]:
    """{column: is a list} for the columns holding ``datasets.Image`` structs (a ``bytes`` and a ``path`` field)."""
    import pyarrow as pa

    def is_image(t) -> bool:
        return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"bytes", "path"}

    out = {}
    for f in schema:
        if is_image(f.type):
            out[f.name] = False
        elif (pa.types.is_list(f.type) or pa.types.is_large_list(f.type)) and is_image(f.type.value_type):
            out[f.name] = True
    return out


class ParquetPart:
    """One parquet file: its text read a batch at a time, an image cell by its row group."""

    def __init__(self, name: str, opener: Any):
        self.name, self._opener, self._file, self._cached = name, opener, None, (None, None)

    def __getstate__(self) -> dict:  # open files do not cross processes
        return {"name": self.name, "_opener": self._opener, "_file": None, "_cached": (None, None)}

    @property
    def file(self):
        if self._file is None:
            import pyarrow.parquet as pq

            try:
                self._file = pq.ParquetFile(self._opener() if callable(self._opener) else self._opener)
            except Exception as e:
                raise UsageError(f"{self.name}: not a readable parquet file: {e}") from None
            meta = self._file.metadata
            self._starts = [0]
            for g in range(meta.num_row_groups):
                self._starts.append(self._starts[-1] + meta.row_group(g).num_rows)
        return self._file

    @property
    def schema(self):
        return self.file.schema_arrow

    @property
    def num_rows(self) -> int:
        return self.file.metadata.num_rows

    def batches(self, columns: list[str]):
        return self.file.iter_batches(batch_size=BATCH_ROWS, columns=columns)

    def cell(self, row: int, column: str) -> Any:
        file = self.file  # opened first: it sets the row groups' starts
        group = bisect.bisect_right(self._starts, row) - 1
        if self._cached[0] != (group, column):  # the last group read stays: neighbours are often read together
            self._cached = ((group, column), file.read_row_group(group, columns=[column]).column(0))
        return self._cached[1][row - self._starts[group]].as_py()


class ArrowPart:
    """A ``save_to_disk`` folder: its Arrow files memory-mapped by ``datasets.load_from_disk``."""

    def __init__(self, folder: str):
        self.name, self._table = Path(folder).name, None
        self.folder = folder

    def __getstate__(self) -> dict:
        return {"name": self.name, "folder": self.folder, "_table": None}

    @property
    def table(self):
        if self._table is None:
            import datasets

            self._table = datasets.load_from_disk(self.folder).data.table  # memory-mapped, not read
        return self._table

    @property
    def schema(self):
        return self.table.schema

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def batches(self, columns: list[str]):
        return self.table.select(columns).to_batches(max_chunksize=BATCH_ROWS)

    def cell(self, row: int, column: str) -> Any:
        return self.table.column(column)[row].as_py()


def _hub_parts(spec: str) -> list[ParquetPart]:
    """The parquet files of ``hf://datasets/OWNER/NAME[@rev][:split]`` (default split: train), opened lazily."""
    from huggingface_hub import HfFileSystem

    rest = spec.removeprefix("hf://datasets/")
    rest, _, split = rest.partition(":")
    repo, _, rev = rest.partition("@")
    fs = HfFileSystem()
    root = f"datasets/{repo}" + (f"@{rev}" if rev else "")
    files = sorted(p for p in fs.glob(f"{root}/**/*.parquet") if _in_split(p, split or "train"))
    if not files:
        raise UsageError(f"{spec}: no parquet files of split {split or 'train'!r} on the hub (a set kept as JSON + "
                         f"images, like LLaVA-CC3M-Pretrain-595K: `hf download {repo} --repo-type dataset --local-dir "
                         f"DIR`, then --data DIR; or its parquet branch: @refs%2Fconvert%2Fparquet)")
    return [ParquetPart(f"{repo}/{Path(p).name}", (lambda p=p: fs.open(p, "rb"))) for p in files]


def _in_split(path: str, split: str) -> bool:
    parts = Path(path).parts
    return split in parts[:-1] or Path(path).name.startswith(f"{split}-") or Path(path).name.startswith(f"{split}.")


def open_parts(spec: str) -> list:
    """The parts of a table data source, in order."""
    if spec.startswith("hf://datasets/"):
        return _hub_parts(spec)
    p = Path(spec)
    if p.is_file():
        return [ParquetPart(p.name, str(p))]
    if not p.is_dir():
        raise UsageError(f"data not found: {p}")
    if (p / "dataset_dict.json").is_file():  # a DatasetDict: its train split
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise UsageError(f"{p}: a DatasetDict without a train split (give --split, one of {splits})")
        p = p / "train"
    if (p / "state.json").is_file():
        return [ArrowPart(str(p))]
    files = sorted(p.glob("*.parquet")) or sorted(p.glob("data/*.parquet"))
    in_train = [f for f in files if _in_split(str(f.relative_to(p)), "train")]
    return [ParquetPart(f.name, str(f)) for f in (in_train or files)]


def _image_refs(column, is_list: bool, part: int, start: int, name: str) -> list[list[str]]:
    """Per row, the references of its images into the table (``EMBEDDED``); a null cell holds none. Only the
    column's validity and list lengths are read, never its bytes."""
    import pyarrow.compute as pc

    counts = (pc.fill_null(pc.list_value_length(column), 0) if is_list else column.is_valid()).to_pylist()
    return [[f"{EMBEDDED}{part}:{start + r}:{name}:{k}" for k in range(int(n))] for r, n in enumerate(counts)]


def load(spec: str | Path, reader_class) -> Any:
    """Every row of the table as a record (``records.RecordReader``); images as references, read later."""
    parts = open_parts(str(spec))
    reader = reader_class(Path(str(spec)).name, embedded=True)
    for k, part in enumerate(parts):
        images = _image_columns(part.schema)
        text = [f.name for f in part.schema if f.name not in images]
        if isinstance(part, ArrowPart):
            projected = list(images)  # memory-mapped: selecting a column copies nothing
        else:  # parquet: the path field only, so that no image's bytes are read
            projected = [f"{c}.list.element.path" if is_list else f"{c}.path" for c, is_list in images.items()]
        reader.source, start = part.name, 0
        for batch in part.batches(text + projected):
            rows = batch.select(text).to_pylist() if text else [{} for _ in range(batch.num_rows)]
            for c, is_list in images.items():
                column = batch.column(batch.schema.get_field_index(c))
                for row, refs in zip(rows, _image_refs(column, is_list, k, start, c)):
                    row[c] = refs
            for r, row in enumerate(rows):
                reader.add(row, start + r)
            start += batch.num_rows
    return reader.loaded


class TableImages:
    """The images of a table source: references into its rows (``EMBEDDED``), and paths under ``base``."""

    def __init__(self, spec: str, base: Any):
        self.spec, self.base, self._parts = spec, as_store(base), None

    def __str__(self) -> str:
        return f"in its rows (a path: under {self.base})"

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "base": self.base, "_parts": None}

    @property
    def parts(self) -> list:
        if self._parts is None:
            self._parts = open_parts(self.spec)
        return self._parts

    def locate(self, ref: str) -> BadRecord | None:
        return None if ref.startswith(EMBEDDED) else self.base.locate(ref)

    def _where(self, ref: str) -> tuple[Any, int, str, int]:
        """(part, row, column, index in the cell) of a reference; BadRecord for a string that is none."""
        try:
            part, row, column, k = ref[1:].split(":")
            return self.parts[int(part)], int(row), column, int(k)
        except (ValueError, IndexError):
            raise BadRecord("bad_image_field", f"{ref[1:]!r} is no image of {self.spec}") from None

    def name(self, ref: str) -> str:
        if not ref.startswith(EMBEDDED):
            return self.base.name(ref)
        part, row, column, k = self._where(ref)
        return f"{part.name} row {row} {column}[{k}]"

    def open(self, ref: str) -> tuple[str, Any]:
        if not ref.startswith(EMBEDDED):
            return self.base.open(ref)
        part, row, column, k = self._where(ref)
        if row >= part.num_rows:
            raise BadRecord("bad_image_field", f"{self.name(ref)}: no such row")
        cell = part.cell(row, column)
        if isinstance(cell, list):
            cell = cell[k] if k < len(cell) else None
        if not cell or (cell.get("bytes") is None and not cell.get("path")):
            raise BadRecord("missing_image", f"{self.name(ref)}: neither bytes nor a path")
        if cell.get("bytes") is None:  # a struct with only a path: a file under the image root
            return self.base.open(cell["path"])
        if not cell["bytes"]:
            raise BadRecord("empty_image", f"{self.name(ref)} is 0 bytes")
        return self.name(ref), io.BytesIO(cell["bytes"])
