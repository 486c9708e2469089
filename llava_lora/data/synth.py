"""``llava-lora data synth OUT``: a small synthetic LLaVA data set a tiny model can learn in minutes.

    llava-lora data synth data/shapes --n 600 --n-test 100      # ~1 s; then: llava-lora data check data/shapes

Each image is one shape (circle, square, triangle) in one of five colours, small or large, in one quadrant,
on a light background. Each question has a one- or two-word answer:

    "What colour is the shape?" -> "red"        "What shape is this?" -> "circle"
    "Where is the shape?" -> "top left"         "Is the shape large or small?" -> "large"

Each train record asks all four questions about its image, in a random order (multi-turn: every image teaches
four answers for the price of one image encoding); one in eight asks a single question, as CC3M's records do.
Each held-out record asks one question, the four in turn.

Layout (as CC3M-595K): ``OUT/chat.json`` (train), ``OUT/test.json`` (held out), ``OUT/images_dl/*.png``,
and ``OUT/synth.yaml`` (the config that wrote it). The same seed writes byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config as cfglib
from ..config import field
from ..errors import UsageError
from ..outdirs import OVERWRITE_HELP, new_folder
from .records import IMAGE_PLACEHOLDER

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 70, 215),
    "yellow": (240, 200, 20),
    "purple": (135, 50, 175),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Side of a shape's bounding box, as a fraction of its quadrant, by size. A small shape is at least two patches wide
# at the quickstart's 64 px and 8 px patches (16-19 px): at 11-16 px every shape error of the tiny models was a small
# circle or square taken for another (large ones were 100% right on every seed), since a patch-and-a-half outline is
# more than a random frozen tower resolves. Large ones end 1 px inside their quadrant.
SIDES = {"small": (0.5, 0.6), "large": (0.8, 0.92)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
QUESTIONS: dict[str, str] = {
    "colour": "What colour is the shape?",
    "shape": "What shape is this?",
    "position": "Where is the shape?",
    "size": "Is the shape large or small?",
}
SINGLE_TURN_EVERY = 8  # one train record in 8 asks one question; the others ask all four
IMAGE_DIR = "images_dl"


@dataclass
class SynthConfig:
    out: str = field(help="output folder (must be empty or new unless --overwrite)")
    n: int = field(600, help="train records (OUT/chat.json)")
    n_test: int = field(100, help="held-out records (OUT/test.json), on images not in train")
    image_size: int = field(64, help="image side in pixels")
    seed: int = field(0, help="random seed; the same seed writes byte-identical files")
    overwrite: bool = field(False, help=OVERWRITE_HELP)

    def __post_init__(self) -> None:
        if self.n < 1 or self.n_test < 0:
            raise UsageError(f"--n must be >= 1 and --n-test >= 0, got {self.n} and {self.n_test}")
        if self.image_size < 16:
            raise UsageError(f"--image-size must be >= 16, got {self.image_size}")


@dataclass(frozen=True)
class Scene:
    """One image's content: the labels, and the jitter that makes images with the same labels differ."""

    shape: str
    colour: str
    size: str
    position: str
    dx: float  # centre offset inside the quadrant, in [-1, 1] of the free margin
    dy: float
    scale: float  # shape size inside its size band, in [0, 1]
    bg: tuple[int, int, int]

    def answer(self, kind: str) -> str:
        return {"colour": self.colour, "shape": self.shape, "position": self.position, "size": self.size}[kind]


def random_scene(rng: random.Random) -> Scene:
    shade = rng.randint(228, 250)
    bg = (shade + rng.randint(-4, 4), shade + rng.randint(-4, 4), shade + rng.randint(-4, 4))
    return Scene(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), rng.choice(POSITIONS),
                 round(rng.uniform(-1, 1), 3), round(rng.uniform(-1, 1), 3), round(rng.random(), 3), bg)


def draw(scene: Scene, size: int) -> Any:
    """The scene as an RGB PIL image of ``size`` x ``size``."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), scene.bg)
    half = size / 2
    lo, hi = SIDES[scene.size]
    side = half * (lo + (hi - lo) * scene.scale)
    free = (half - side) / 2 - 1  # room to move without leaving the quadrant
    qx = half * (1.5 if scene.position.endswith("right") else 0.5)
    qy = half * (1.5 if scene.position.startswith("bottom") else 0.5)
    cx, cy = qx + scene.dx * free, qy + scene.dy * free
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    fill = COLOURS[scene.colour]
    pen = ImageDraw.Draw(img)
    if scene.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif scene.shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return img


def _human(question: str, image_first: bool | None) -> dict[str, str]:
    if image_first is None:
        return {"from": "human", "value": question}
    value = f"{IMAGE_PLACEHOLDER}\n{question}" if image_first else f"{question}\n{IMAGE_PLACEHOLDER}"
    return {"from": "human", "value": value}


def make_record(rid: str, image: str, scene: Scene, kinds: list[str], image_first: bool) -> dict[str, Any]:
    """A CC3M-layout record asking the ``kinds`` of question in turn about one image."""
    conv = []
    for k, kind in enumerate(kinds):
        conv.append(_human(QUESTIONS[kind], image_first if k == 0 else None))
        conv.append({"from": "gpt", "value": scene.answer(kind)})
    return {"id": rid, "image": image, "conversations": conv}


def _split(name: str, n: int, rng: random.Random, seen: set[bytes], image_dir: Path, size: int,
           multi_turn: bool) -> list[dict[str, Any]]:
    """``n`` records, each image drawn, saved, and different in pixels from every image in ``seen`` (which grows)."""
    out = []
    kinds = list(QUESTIONS)
    for i in range(n):
        for _ in range(1000):
            scene = random_scene(rng)
            img = draw(scene, size)
            digest = hashlib.blake2b(img.tobytes(), digest_size=16).digest()
            if digest not in seen:
                break
        else:
            raise UsageError(f"cannot draw {n} distinct images at --image-size {size}; use a larger size")
        seen.add(digest)
        rid = f"synth_{name}_{i:06d}"
        img.save(image_dir / f"{rid}.png", format="PNG")
        if not multi_turn:  # held out: the four questions in turn, so each is measured on equal numbers
            asked = [kinds[i % len(kinds)]]
        elif i % SINGLE_TURN_EVERY == SINGLE_TURN_EVERY - 1:
            asked = [rng.choice(kinds)]
        else:
            asked = rng.sample(kinds, len(kinds))
        out.append(make_record(rid, f"{rid}.png", scene, asked, image_first=rng.random() < 0.5))
    return out


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(records, indent=1, ensure_ascii=True) + "\n")


def main(cfg: SynthConfig) -> int:
    start = time.perf_counter()
    out = Path(cfg.out)
    seen: set[bytes] = set()
    with new_folder(out, cfg.overwrite) as tmp:
        image_dir, size = tmp / IMAGE_DIR, cfg.image_size
        image_dir.mkdir()
        # separate streams: the held-out draws do not depend on --n, only which images they must avoid
        train = _split("train", cfg.n, random.Random(f"synth-train-{cfg.seed}"), seen, image_dir, size,
                       multi_turn=True)
        test = _split("test", cfg.n_test, random.Random(f"synth-test-{cfg.seed}"), seen, image_dir, size,
                      multi_turn=False)
        _write(tmp / "chat.json", train)
        _write(tmp / "test.json", test)
        cfglib.save(cfg, tmp / "synth.yaml")
    took = time.perf_counter() - start
    print(f"wrote {cfg.n} train records to {out / 'chat.json'}, {cfg.n_test} held-out to {out / 'test.json'}, "
          f"{cfg.n + cfg.n_test} images ({cfg.image_size}x{cfg.image_size}) to {out / IMAGE_DIR}/ in {took:.1f} s")
    return 0
