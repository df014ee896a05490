"""The model's name in the chat API (``/v1/models``), shared by both ports' routes."""

from __future__ import annotations

from pathlib import Path


def default_served_name(model: str) -> str:
    """What ``/v1/models`` calls a model by default: a model file's stem (a ``.gguf`` path would
    put a file path in every client's config, and change when the file moves), else the name given
    (a Hub repo id, or a folder)."""
    path = Path(model).expanduser()
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # not something a path can be
        is_file = False
    return path.stem if is_file else model
