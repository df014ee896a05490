"""Where labels live on disk, and the append-only journal that keeps each one as soon as it exists.

A labelling run pays for every answer, so an answer must be on disk before anything else happens:
each record is one line appended to a JSONL journal with a single ``write()``. A run killed
mid-write leaves at most one torn last line, which readers skip and the next writer seals off. The
last record for a feature index wins, so a rerun (or a later, better answer) just appends.
:meth:`Journal.compact` rewrites the file atomically with one record per feature.

Layout under the cache (docs/design.md, "The cache")::

    autointerp_labels/<labeler>/<model>/<sae>/labels.jsonl   one record per feature (label or failure)
    autointerp_labels/<labeler>/<model>/<sae>/scores.jsonl   detection scores of those labels
    autointerp_labels/<labeler>/<model>/<sae>/meta.json      the real ids behind the slugs
    neuronpedia/<np-model>/<np-sae>/labels.jsonl             Neuronpedia explanations (import or live)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroscope.cache import cache_root, slug, write_json_atomic, write_text_atomic

AUTOINTERP_DIR = "autointerp_labels"
NEURONPEDIA_DIR = "neuronpedia"
LABELS_FILE = "labels.jsonl"
SCORES_FILE = "scores.jsonl"
META_FILE = "meta.json"


def autointerp_dir(labeler: str, model: str, sae: str) -> Path:
    """The folder of one labeler's labels for one model and SAE (not created here)."""
    return cache_root() / AUTOINTERP_DIR / slug(labeler) / slug(model) / slug(sae)


def write_meta(folder: Path, **ids: str) -> None:
    """Record the ids the slugged folder names stand for (for push/pull and for humans)."""
    path = folder / META_FILE
    existing = read_meta(folder)
    if existing != {**existing, **ids}:
        write_json_atomic(path, {**existing, **ids})


def read_meta(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class LabelSet:
    """One labeler's labels for one model and SAE, found on disk."""

    folder: Path
    labeler: str
    model: str
    sae: str


def find_label_sets(model: str | None = None, sae: str | None = None) -> list[LabelSet]:
    """Every auto-interp label folder in the cache (optionally only for ``model``/``sae``), newest first."""
    root = cache_root() / AUTOINTERP_DIR
    found = []
    for labels in root.glob(f"*/*/*/{LABELS_FILE}"):
        folder = labels.parent
        meta = read_meta(folder)
        entry = LabelSet(
            folder,
            labeler=meta.get("labeler", folder.parent.parent.name),
            model=meta.get("model", folder.parent.name),
            sae=meta.get("sae", folder.name),
        )
        if (model is None or slug(entry.model) == slug(model)) and (
            sae is None or slug(entry.sae) == slug(sae)
        ):
            found.append((labels.stat().st_mtime, entry))
    return [entry for _, entry in sorted(found, key=lambda pair: -pair[0])]


class Journal:
    """An append-only JSONL file of records keyed by ``"index"``; the last record per index wins."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._fd: int | None = None
        self.skipped_lines = 0

    # ---- reading ----------------------------------------------------------------------------------

    def records(self) -> Iterator[dict[str, Any]]:
        """Every well-formed record in file order; torn or foreign lines are counted and skipped."""
        self.skipped_lines = 0
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for raw in f:
                try:
                    record = json.loads(raw)
                except ValueError:  # a torn last line, or a hand edit gone wrong
                    self.skipped_lines += 1
                    continue
                if isinstance(record, dict) and isinstance(record.get("index"), int):
                    yield record
                else:
                    self.skipped_lines += 1

    def load(self) -> dict[int, dict[str, Any]]:
        """The latest record for each index."""
        return {record["index"]: record for record in self.records()}

    # ---- writing ----------------------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> None:
        """Append one record with one ``write()``: it is on disk (in the page cache) on return."""
        if self._fd is None:
            self._open()
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        os.write(self._fd, line)  # type: ignore[arg-type]

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.append(record)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # A run killed mid-write may have left a line without its newline: seal it off so the next
        # record starts on a line of its own (readers skip the torn one).
        size = os.fstat(fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(fd, b"\n")
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def compact(self) -> int:
        """Rewrite the file atomically with only the latest record per index, sorted; return the count."""
        self.close()
        latest = self.load()
        if not latest and not self.path.exists():
            return 0
        text = "".join(
            json.dumps(latest[i], ensure_ascii=False, separators=(",", ":")) + "\n"
            for i in sorted(latest)
        )
        write_text_atomic(self.path, text)
        return len(latest)


def ok_labels(records: dict[int, dict[str, Any]]) -> dict[int, str]:
    """index -> label text for records that hold a usable label."""
    return {
        i: r["label"]
        for i, r in records.items()
        if r.get("status", "ok") == "ok" and isinstance(r.get("label"), str) and r["label"].strip()
    }
