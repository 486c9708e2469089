"""Fixtures shared by the test modules: the tiny composed models and a small learnable data set, built once per
session (``fixtures/models.py`` caches them). A module may define its own ``world`` (eval's and export's hold a
trained run as well): pytest then uses the module's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.models import Models, good_data, model_world


@pytest.fixture(scope="session", autouse=True)
def shard_index_cache(tmp_path_factory) -> Path:
    """The shard-index cache of this session (``data/tarindex.py``), never the user's own; inherited by the
    commands the tests start."""
    folder = tmp_path_factory.mktemp("llava-lora-cache")
    os.environ["LLAVA_LORA_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Models:
    """.qwen2 .llama .clip (sources) and .qwen_model .llama_model (MODEL_DIRs)."""
    return model_world(tmp_path_factory)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """24 usable records (chat.json + images_dl/), every fourth text-only."""
    return good_data(tmp_path_factory)
