"""Errors a user can fix: the CLI prints them as one line and exits with code 2; and the one type for a
record that cannot be used (it becomes a line of a report, never a stop)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class UsageError(Exception):
    """Bad input from the user (a path, a flag, a file's contents). The message names the cause."""


class RunFailed(Exception):
    """A stage ran but could not do its job (e.g. training that met no supervised token): exit code 1."""


@dataclass(frozen=True)
class Rejected:
    """A record left out, and why: one entry of every report (``data check``, train's ``data_report.json``,
    eval's skipped samples). ``reason`` is a short stable code, ``detail`` says what was found."""

    id: str
    reason: str
    detail: str = ""
    index: int = -1  # position in the records a dataset draws from (ids need not be unique); -1: before that

    def as_dict(self) -> dict[str, str]:
        """The entry as every report writes it: ``{"id", "reason", "detail"}``."""
        return {"id": self.id, "reason": self.reason, "detail": self.detail}

    def with_source(self, name: str) -> Rejected:
        """The same entry, its detail naming the data source it came from (a mixture's reports)."""
        return dataclasses.replace(self, detail=f"{self.detail} (source {name})")

    def __iter__(self):
        # evaluate.main still unpacks load_records' rejects as (id, reason, detail); the lead moves it to
        # as_dict() and removes this
        return iter((self.id, self.reason, self.detail))


class BadRecord(Exception):
    """A record that cannot be used; ``reason`` is a short stable code, ``detail`` says what was found (for an
    image: the file). Raised for the record's text (``data/records.py``) and its image (``data/images.py``);
    caught where the record's id is known, and turned into a ``Rejected`` there by ``rejected``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # pickled by its fields (it crosses process pools): Exception's default would pass the message only
        return type(self), (self.reason, self.detail)

    def rejected(self, record_id: str, index: int = -1) -> Rejected:
        """The report entry of the record ``record_id`` (at ``index``) that raised this."""
        return Rejected(record_id, self.reason, self.detail, index)
