"""Where Neuroscope keeps its own data, and how it writes it (atomically, always).

Model and SAE weights stay in the Hugging Face cache; everything Neuroscope derives lives under
``$NEUROSCOPE_CACHE`` or ``~/.cache/neuroscope``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SUBDIRS = (
    "corpus",
    "calibration",
    "autointerp_labels",
    "neuronpedia",
    "checkpoints",
    "trash",
    "models",
)


def cache_root() -> Path:
    root = os.environ.get("NEUROSCOPE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "neuroscope"


def cache_dir(name: str) -> Path:
    """A subfolder of the cache (created on demand)."""
    path = cache_root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def slug(text: str) -> str:
    """A file-system-safe name for a model id, SAE id or labeler ('google/gemma-2-2b' -> 'google--gemma-2-2b')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("/", "--")).strip("-") or "default"


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o644)  # mkstemp's 0600 would make reports and caches private
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
