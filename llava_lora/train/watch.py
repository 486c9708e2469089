"""The guard of a run that learns nothing: it stops with what to do, instead of training on zero tokens."""

from __future__ import annotations

from collections import Counter

from ..errors import RunFailed

NOTHING_LEARNED_AFTER = 64  # records drawn without one supervised token before a run is stopped as hopeless


# What to do about the reasons a run can meet only skips for
_REMEDIES = {
    "empty_supervision": "the model's chat template marks no assistant turn: rebuild MODEL_DIR with `llava-lora "
                         "build ... --chat-template FILE`, a template whose assistant turns sit in {% generation %}"
                         " ... {% endgeneration %}",
    "too_long": "records do not fit --max-length: raise it",
    "missing_image": "images are not where the data says: pass --image-dir (the folder the `image` paths are "
                     "relative to)",
}


class SupervisionWatch:
    """Stops a run that learns nothing: once ``patience`` records were drawn (or at the end) without one
    supervised token, it raises ``RunFailed`` with the skip counts by reason and what to do about them."""

    def __init__(self, patience: int):
        self.patience, self.drawn, self.supervised = patience, 0, 0
        self.reasons: Counter[str] = Counter()

    def update(self, supervised: int, drawn: int, skipped: list) -> None:
        self.supervised += supervised
        self.drawn += drawn
        self.reasons.update(s.reason for s in skipped)
        if not self.supervised and self.drawn >= self.patience:
            self.fail(f"the first {self.drawn} records drawn")

    def fail(self, what: str) -> None:
        counts = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common()) or "none skipped"
        todo = [f"- {_REMEDIES[r]}" for r in self.reasons if r in _REMEDIES]
        todo.append("- `llava-lora data check DATA --model MODEL_DIR` gives every record's reason")
        raise RunFailed(f"nothing to learn: {what} carry no supervised token (skipped: {counts}); no adapter "
                        "was written. What to do:\n" + "\n".join(todo))
