"""The core never imports a tensor framework at module level (docs/design.md, "Layout")."""

from __future__ import annotations

import subprocess
import sys


def test_core_and_servers_import_without_torch_or_mlx():
    code = (
        "import pkgutil, importlib, sys, neuroscope\n"
        "for m in pkgutil.walk_packages(neuroscope.__path__, 'neuroscope.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(n for n in ('torch', 'mlx') if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
