"""The guards of a run that would go silently wrong: one that learns nothing (it stops with what to do, instead of
training on zero tokens), and one that diverges (a NaN/inf loss or gradient norm stops it at that step, before the
update, so no checkpoint or adapter holds a non-finite weight)."""

from __future__ import annotations

import math
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


class FiniteWatch:
    """Stops a run at the first step whose loss or gradient norm is not finite, before its update; with
    ``skip`` > 0 (``--skip-nonfinite``) up to that many such steps are skipped instead (no update), each reported."""

    def __init__(self, skip: int):
        self.skip, self.skipped = skip, []

    def allows_update(self, step: int, loss: float, grad_norm: float, last_good, say=print) -> bool:
        """Whether step ``step`` may update the weights; raises ``RunFailed`` once the skips are used up
        (``last_good()``: the checkpoint to name then)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return True
        what = f"step {step}: the loss is {loss} and the gradient norm {grad_norm}"
        if len(self.skipped) < self.skip:
            self.skipped.append(step)
            say(f"{what}: step skipped, the weights not updated ({len(self.skipped)} of --skip-nonfinite "
                f"{self.skip})")
            return False
        used = f" after skipping {len(self.skipped)} (steps {self.skipped})" if self.skipped else ""
        raise RunFailed(f"the run diverged: {what}{used}; stopped before the update, no adapter written. The last "
                        f"good checkpoint is {last_good()}. Lower --learning-rate or --max-grad-norm, check the "
                        "data at that step, or pass --skip-nonfinite N to skip such steps")
