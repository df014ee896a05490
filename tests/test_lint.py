"""ruff and mypy are part of the test suite, so the one test command CI runs holds the code to them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def test_ruff_finds_nothing() -> None:
    if shutil.which("ruff") is None and _run("ruff", "--version").returncode != 0:
        pytest.skip("ruff is not installed: pip install -e '.[dev]'")
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_finds_nothing() -> None:
    if _run("mypy", "--version").returncode != 0:
        pytest.skip("mypy is not installed: pip install -e '.[dev]'")
    # no incremental cache: a stale one has reported errors that a fresh run does not
    result = _run("mypy", "--no-incremental", "neuroscope", "backends")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
