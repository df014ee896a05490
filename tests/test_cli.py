"""The ``neuroscope`` command itself: --version, ``python -m neuroscope``, and a --help that loads
nothing heavy (no torch, no mlx, no POSIX-only ``resource``), so it answers at once on any platform."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

import neuroscope
from neuroscope.cli import app

# Modules --help must not import: the tensor frameworks, and `resource`, which Windows lacks.
HEAVY = ("torch", "mlx", "mlx_lm", "resource", "transformers", "safetensors", "datasets")

_PROBE = """
import json, sys
from neuroscope.cli import app
try:
    app(sys.argv[1:], prog_name="neuroscope")
except SystemExit:
    pass
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def _modules_after(*args: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_imports_nothing_heavy() -> None:
    loaded = _modules_after("--help")
    assert "neuroscope" in loaded  # the probe did run the command
    assert not loaded & set(HEAVY), f"--help imported {sorted(loaded & set(HEAVY))}"


def test_help_of_every_command_imports_nothing_heavy() -> None:
    for command in ("serve", "bench", "calibrate", "clean", "labels", "models", "corpus"):
        loaded = _modules_after(command, "--help")
        assert not loaded & set(HEAVY), f"{command} --help imported {sorted(loaded & set(HEAVY))}"


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"neuroscope {neuroscope.__version__}"


def test_python_dash_m_runs_the_same_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "neuroscope", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"neuroscope {neuroscope.__version__}"
    listing = subprocess.run(
        [sys.executable, "-m", "neuroscope", "--help"], capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0 and "calibrate" in listing.stdout
