"""Records answered by the inference engine: each record asked as it was taught (``prompts.prompt_and_reference``),
by the base (adapter off) and/or the fine-tuned model (adapter on), in batches that share one pass of the vision
tower. What ``llava-lora eval`` scores and training's held-out samples show.

A sample whose image cannot be read, or whose pixels the image processor refuses, is skipped with its reason
(``{**Rejected.as_dict(), "when": ...}``); one image never ends an evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..chat import prompts
from ..chat.encode import preprocess_image
from ..data.images import as_store, open_ref
from ..data.records import Record
from ..errors import BadRecord, Rejected
from .engine import GenerationSettings, answer_each

SYSTEMS = ("base", "finetuned")


@dataclass
class Prediction:
    id: str
    question: str
    reference: str
    answers: dict[str, str]  # system ("base" / "finetuned") -> answer

    def row(self) -> dict[str, str]:
        return {"id": self.id, "question": self.question, "reference": self.reference, **self.answers}


def load_image(record: Record, image_root: Path):
    """The record's images (RGB, in placeholder order) or None for a text-only record; BadRecord when one cannot
    be read. ``image_root``: a folder, a zip, or a table's or shards' store."""
    if not record.images:
        return None
    store = as_store(image_root)
    return [open_ref(store, ref) for ref in record.images]


def predict(model, processor, records: Sequence[Record], image_root: Path, settings: GenerationSettings,
            batch_size: int, systems: Sequence[str] = SYSTEMS, progress: bool = True
            ) -> tuple[list[Prediction], list[dict[str, str]]]:
    """(predictions in ``records`` order, skipped samples) answered by each of ``systems``.

    Each batch's images are decoded and preprocessed once, and go through the frozen vision tower once, for the
    base (adapter off) and the fine-tuned model (adapter on) alike. Records are batched by prompt length, so that
    short prompts do not wait on padding.
    """
    from tqdm.auto import tqdm

    asked = []  # [(templated prompt, reference)], by position: ids need not be unique in user data
    for rec in records:
        msgs, reference = prompts.prompt_and_reference(rec)
        asked.append((prompts.generation_prompt(processor.tokenizer, msgs), reference))
    order = sorted(range(len(records)), key=lambda i: len(asked[i][0]))
    done: dict[int, Prediction] = {}
    skipped: list[dict[str, str]] = []
    with tqdm(total=len(records), desc="eval", unit="sample", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            kept, images = [], []
            for i in order[start:start + batch_size]:
                try:
                    images.append(load_image(records[i], image_root))
                    kept.append(i)
                except BadRecord as e:
                    skipped.append({**e.rejected(records[i].id).as_dict(), "when": "image"})
            for i, outs in _answer_batch(model, processor, kept, images, asked, settings, systems, records, skipped):
                done[i] = Prediction(records[i].id, prompts.question(records[i]), asked[i][1], outs)
            bar.update(len(order[start:start + batch_size]))
    return [done[i] for i in sorted(done)], skipped


def _answer_batch(model, processor, kept: list[int], images: list, asked: list[tuple[str, str]],
                  settings: GenerationSettings, systems: Sequence[str], records: Sequence[Record],
                  skipped: list[dict[str, str]]) -> list[tuple[int, dict[str, str]]]:
    """[(record position, {system: answer})] for one batch. If the batch fails, each sample is asked alone; one
    whose image the processor refuses is skipped with that reason (one image never ends an evaluation), while a
    failure of the model itself is raised."""
    if not kept:
        return []
    texts = [asked[i][0] for i in kept]
    try:
        # one preprocessing and one vision-tower pass for the base and the fine-tuned answers
        outs = dict(zip(systems, answer_each(model, processor, texts, images, settings,
                                             [s == "finetuned" for s in systems])))
    except Exception:
        if len(kept) > 1:
            return [row for k, i in enumerate(kept)
                    for row in _answer_batch(model, processor, [i], [images[k]], asked, settings, systems, records,
                                             skipped)]
        refusals = [(k, preprocess_image(processor.image_processor, im)[1]) for k, im in enumerate(images[0] or [])]
        refusal = next(((k, r) for k, r in refusals if r is not None), None)
        if refusal is None:
            raise
        rec = records[kept[0]]
        name = rec.images[refusal[0]].replace("\0", "")  # NUL: a reference into a table or shards
        rejected = Rejected(rec.id, "preprocess_failed", f"{name}: {refusal[1]}")
        skipped.append({**rejected.as_dict(), "when": "generation"})
        return []
    return [(i, {s: outs[s][k] for s in systems}) for k, i in enumerate(kept)]
