"""The distribution's metadata as setuptools builds it from pyproject.toml: a name free on PyPI
(``neuroscope`` there is another project), an SPDX licence expression with its file, no
deprecation warnings (setuptools stops building ``license = {text = ...}`` in 2027)."""

from __future__ import annotations

import json
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = """
import json, sys, warnings
warnings.simplefilter("always")
from setuptools import build_meta
with warnings.catch_warnings(record=True) as caught:
    name = build_meta.prepare_metadata_for_build_wheel(sys.argv[1])
print(json.dumps({"dist_info": name, "warnings": [str(w.message) for w in caught]}))
"""


def test_metadata_names_neuroscope_sae_with_an_spdx_licence(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    done = subprocess.run(
        [sys.executable, "-c", BUILD, str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    meta = Parser().parsestr((tmp_path / result["dist_info"] / "METADATA").read_text())
    assert meta["Name"] == "neuroscope-sae"
    assert meta["License-Expression"] == "Apache-2.0" and meta["License"] is None
    assert meta["License-File"] == "LICENSE"
    import neuroscope

    assert meta["Version"] == neuroscope.__version__
    deprecations = [w for w in result["warnings"] if "deprecat" in w.lower()]
    assert not deprecations, deprecations
    entry_points = (tmp_path / result["dist_info"] / "entry_points.txt").read_text()
    assert "neuroscope = neuroscope.cli:app" in entry_points  # the command keeps its name
