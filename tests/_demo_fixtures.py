"""Tiny assets and a running demo for the demo tests (gradio_client and browser).

    assets = build_assets(root)      # root/{model, data, run}: tiny LLaVA-Qwen2, synth data, a 3-step adapter
    with running_demo(cfg, engine, samples) as url: ...    # the page on a free port of 127.0.0.1

The assets are built once per test process (both test modules import the fixtures; the cache below keeps
pytest from building them twice) in about 15 s on two CPU cores.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llava_lora import build, tiny, train
from llava_lora.data import synth
from llava_lora.demo import DemoConfig, Samples, build_app, load_samples, serve
from llava_lora.inference import SideBySideEngine
from llava_lora.modeling import load_model


@dataclass(frozen=True)
class DemoAssets:
    model: Path
    data: Path  # synth folder: chat.json, test.json, images_dl/
    adapter: Path


_BUILT: dict[str, DemoAssets] = {}
_ENGINES: dict[tuple[Path, bool], SideBySideEngine] = {}


def build_assets(root: Path) -> DemoAssets:
    """A tiny model, a small synth data set and an adapter trained for a few steps, under ``root``."""
    src = root / "src"
    tiny.tiny_qwen2(src / "qwen2")
    tiny.tiny_clip(src / "clip")
    model = root / "model"
    build.main(build.BuildConfig(llm=str(src / "qwen2"), vision=str(src / "clip"), out=str(model)))
    data = root / "data"
    synth.main(synth.SynthConfig(out=str(data), n=24, n_test=8))
    run = root / "run"
    train.main(train.TrainConfig(model=str(model), data=str(data), out=str(run), max_steps=3, batch_size=2,
                                 save_every=3, gradient_checkpointing=False, num_workers=0, tensorboard=False))
    return DemoAssets(model, data, run)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    if "assets" not in _BUILT:
        _BUILT["assets"] = build_assets(tmp_path_factory.mktemp("demo-assets"))
    return _BUILT["assets"]


def engine_for(assets: DemoAssets, adapter: bool) -> SideBySideEngine:
    """One loaded model per variant for the whole session (as the demo keeps one in memory)."""
    key = (assets.model, adapter)
    if key not in _ENGINES:
        model, processor = load_model(assets.model, assets.adapter if adapter else None, device="cpu")
        _ENGINES[key] = SideBySideEngine(model, processor, has_adapter=adapter)
    return _ENGINES[key]


def demo_config(assets: DemoAssets, adapter: bool = True, data: bool = True, **kw) -> DemoConfig:
    return DemoConfig(model=str(assets.model), adapter=str(assets.adapter) if adapter else None,
                      data=str(assets.data) if data else None, split="test" if data else None,
                      port=free_port(), max_new_tokens=12, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_demo(cfg: DemoConfig, engine: SideBySideEngine, samples: Samples | None = None) -> Iterator[str]:
    """The page served in this process (Gradio's server thread) at the URL yielded; closed afterwards."""
    if samples is None and cfg.data is not None:
        samples = load_samples(cfg)
    app = build_app(cfg, engine, samples)
    url = serve(app, cfg, block=False)
    try:
        yield url
    finally:
        app.close()
