"""Shared fixtures: tiny Stable Diffusion models built once per session, photo folders, offline settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _quiet_libraries() -> None:
    from tistudio.cli import quiet_third_party

    quiet_third_party()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder, so default paths (embeddings/, runs/, outputs/) stay there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tistudio.models.builtin import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-sd1") / "model", family="sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tistudio.models.builtin import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-sd2") / "model", family="sd2", seed=1)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tistudio.models.builtin import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model", seed=0)


@pytest.fixture(scope="session")
def sdxl_model(tiny_sdxl: Path, cache_dir: Path):
    """The tiny SDXL model, loaded once. Tests that change it must restore it."""
    from tistudio.config import ModelOptions
    from tistudio.models.loading import load_model

    return load_model(ModelOptions(model=str(tiny_sdxl)), cache_dir)


@pytest.fixture(scope="session")
def sd1_model(tiny_sd1: Path, cache_dir: Path):
    """The tiny SD1 model, loaded once. Tests that change it must restore it."""
    from tistudio.config import ModelOptions
    from tistudio.models.loading import load_model

    return load_model(ModelOptions(model=str(tiny_sd1)), cache_dir)


def make_photos(folder: Path, count: int = 6, seed: int = 0) -> Path:
    from corpus import make_photos as draw

    return draw(folder, count=count, seed=seed)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return make_photos(tmp_path / "photos")
