"""What a training run writes beside its adapter: metrics as JSON lines, TensorBoard events, a loss-curve
PNG, and the data report (every skipped record with its reason); ``Throughput``: the figures of one log row."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from ..errors import Rejected

METRICS = "metrics.jsonl"
DATA_REPORT = "data_report.json"
LOSS_CURVE = "loss_curve.png"


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines log; a line a crash tore (half written) is left out, not a reason to fail."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line (no newline: the run died mid-write) so the next row starts a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


class RunLog:
    """Appends metrics (main process only) and skipped records (every process, one file each)."""

    def __init__(self, run_dir: Path, rank: int, main: bool, tensorboard: bool = True):
        self.run_dir, self.main = run_dir, main
        self.skips_path = run_dir / f"skipped.rank{rank}.jsonl"
        drop_torn_tail(self.skips_path)
        if main:
            drop_torn_tail(run_dir / METRICS)
        self._tb = None
        if main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def metrics(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):  # eval_loss -> eval/loss, beside train/loss
                    tag = f"eval/{k.removeprefix('eval_')}" if k.startswith("eval_") else f"train/{k}"
                    self._tb.add_scalar(tag, v, row["step"])
            self._tb.flush()

    def skipped(self, skips: list[Rejected], step: int) -> None:
        if not skips:
            return
        with open(self.skips_path, "a") as f:
            for s in skips:
                f.write(json.dumps({**s.as_dict(), "index": s.index, "step": step}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def write_data_report(run_dir: Path, total: int, parse_errors: list[Rejected],
                      duplicates: dict[str, int] | None = None) -> dict:
    """Merge load-time rejects and every process's training-time skips (once per record) into one report;
    ``duplicates`` ({id: count}, records that were used all the same) is listed apart."""
    entries = {}
    for k, r in enumerate(parse_errors):
        entries[("loading", k)] = {**r.as_dict(), "when": "loading"}
    for path in sorted(run_dir.glob("skipped.rank*.jsonl")):
        for row in read_jsonl(path):
            r = Rejected(row["id"], row["reason"], row["detail"], row.get("index", -1))
            # by position, not id: two records may share an id; under DDP each process reports its own draws
            entries.setdefault((r.id, r.index), {**r.as_dict(), "when": f"step {row['step']}"})
    report = {"records": total, "skipped": len(entries),
              "by_reason": dict(Counter(e["reason"] for e in entries.values()).most_common()),
              "samples": list(entries.values()), "duplicate_ids": duplicates or {}}
    (run_dir / DATA_REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def plot_loss(run_dir: Path) -> Path | None:
    """loss_curve.png from metrics.jsonl (loss and learning rate against the step)."""
    path = run_dir / METRICS
    if not path.is_file():
        return None
    rows = read_jsonl(path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    held = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=100)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss", color="tab:blue")
    if held:
        ax.plot([r["step"] for r in held], [r["eval_loss"] for r in held], "o-", label="held-out loss",
                color="tab:green")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange", alpha=0.6,
               label="learning rate")
    lr_ax.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    # below the axes: inside, it covered the curves or the learning-rate axis's top label
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out = run_dir / LOSS_CURVE
    fig.savefig(out)
    plt.close(fig)
    return out


class Throughput:
    """Training figures averaged over the steps since the last log row."""

    def __init__(self):
        self.loss, self.tokens, self.samples, self.steps, self.start = 0.0, 0, 0, 0, time.perf_counter()

    def row(self, step: int, world: int) -> dict:
        elapsed = time.perf_counter() - self.start
        return {"step": step, "loss": self.loss / self.steps, "samples_per_s": self.samples * world / elapsed,
                "tokens_per_s": self.tokens * world / elapsed, "step_time": elapsed / self.steps}
