"""Shared fixtures: a tiny random Gemma 2 and a matching random SAE, built once per test run."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from neuroscope.synthetic import build_random_sae, build_tiny_gemma2

TINY_LAYER = 2  # a sliding-window layer of the 4-block tiny model
LONG_PROMPT = (
    "The capital of France is Paris. Paris is a city on the Seine, known for art and food. "
    "The capital of Germany is Berlin; Rome is the capital of Italy."
)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never touch the user's caches; never reach the Hub."""
    os.environ["NEUROSCOPE_CACHE"] = str(tmp_path_factory.mktemp("neuroscope-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma2(tmp_path_factory.mktemp("tiny-gemma2"))


@pytest.fixture(scope="session")
def tiny_sae(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{'npz': Gemma Scope params.npz, 'saelens': SAELens folder}, same parameters."""
    return build_random_sae(tmp_path_factory.mktemp("tiny-sae"), d_model=64, width=128)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


requires_torch = pytest.mark.skipif(not has_module("torch"), reason="needs neuroscope[torch]")
requires_mlx = pytest.mark.skipif(not has_module("mlx"), reason="needs neuroscope[mlx]")
