"""Errors a user can fix: the CLI prints them as one line and exits with code 2; and a record that cannot be
used: raised as ``BadRecord``, reported as ``Rejected`` (a line of a report, never a stop), with one of the
declared reason codes."""

from __future__ import annotations

from dataclasses import dataclass, replace


# The reason codes of a rejected record, declared once: they are what data_report.json and `data check --json`
# carry, so they stay stable; BadRecord and Rejected refuse any other.
RECORD_REASONS = (  # the record's JSON (data/records.py, formats.py); missing_id: an id given but empty or not a
    # string/number (a record without one is named by its source and position); image_count_mismatch: its images
    # and its <image> placeholders (or image parts) differ in number; misplaced_system_turn: a system turn that is
    # not the first, or a second one
    "invalid_json", "not_an_object", "missing_id", "bad_image_field", "image_count_mismatch", "no_conversations",
    "bad_turn", "unknown_speaker", "non_string_text", "turns_out_of_order", "no_assistant_answer",
    "image_token_mismatch", "misplaced_system_turn",
)
IMAGE_REASONS = (  # its image (data/images.py); preprocess_failed: the image processor refused decoded pixels
    "image_path_escapes_root", "missing_image", "not_a_file", "empty_image", "unreadable_image", "not_an_image",
    "truncated_image", "undecodable_image", "image_too_large", "extreme_aspect_ratio", "unsupported_image_mode",
    "preprocess_failed", "unsupported_image_format",
)
WORKER_REASONS = (  # the data worker loading it died (train/workers.py): a decoder's crash, the OOM killer
    "worker_died",
)
TOKEN_REASONS = (  # its tokens under a model's chat template (prompts.py; encode_failed: data check --model)
    "empty_supervision", "too_long", "encode_failed",
)
REASONS = RECORD_REASONS + IMAGE_REASONS + WORKER_REASONS + TOKEN_REASONS


def _declared(reason: str) -> str:
    if reason not in REASONS:
        raise ValueError(f"reason code {reason!r} is not declared in llava_lora/errors.py REASONS")
    return reason


class UsageError(Exception):
    """Bad input from the user (a path, a flag, a file's contents). The message names the cause."""


class RunFailed(Exception):
    """A stage ran but could not do its job (e.g. training that met no supervised token): exit code 1."""


@dataclass(frozen=True)
class Rejected:
    """A record left out, and why: one entry of every report (``data check``, train's ``data_report.json``,
    eval's skipped samples). ``reason`` is one of ``REASONS``, ``detail`` says what was found."""

    id: str
    reason: str
    detail: str = ""
    index: int = -1  # position in the records a dataset draws from (ids need not be unique); -1: before that

    def __post_init__(self) -> None:
        _declared(self.reason)

    def as_dict(self) -> dict[str, str]:
        """The entry as every report writes it: ``{"id", "reason", "detail"}``."""
        return {"id": self.id, "reason": self.reason, "detail": self.detail}

    def with_source(self, name: str) -> Rejected:
        """The same entry, its detail naming the data source it came from (a mixture's reports)."""
        return replace(self, detail=f"{self.detail} (source {name})")


class BadRecord(Exception):
    """A record that cannot be used; ``reason`` is one of ``REASONS``, ``detail`` says what was found (for an
    image: the file). Raised for the record's text (``data/records.py``) and its image (``data/images.py``);
    caught where the record's id is known, and turned into a ``Rejected`` there by ``rejected``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = _declared(reason)
        self.detail = detail

    def __reduce__(self):
        # pickled by its fields (it crosses process pools): Exception's default would pass the message only
        return type(self), (self.reason, self.detail)

    def rejected(self, record_id: str, index: int = -1) -> Rejected:
        """The report entry of the record ``record_id`` (at ``index``) that raised this."""
        return Rejected(record_id, self.reason, self.detail, index)
