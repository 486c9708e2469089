"""Errors a user can fix: the CLI prints them as one line and exits with code 2; and the one type for a
record that cannot be used (it becomes a line of a report, never a stop)."""


class UsageError(Exception):
    """Bad input from the user (a path, a flag, a file's contents). The message names the cause."""


class RunFailed(Exception):
    """A stage ran but could not do its job (e.g. training that met no supervised token): exit code 1."""


class BadRecord(Exception):
    """A record that cannot be used; ``reason`` is a short stable code, ``detail`` says what was found (for an
    image: the file). Raised for the record's text (``data/records.py``) and its image (``data/images.py``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
