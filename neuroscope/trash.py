"""``neuroscope clean``: cached data goes to a trash folder first, so a wrong clean can be undone.

Each clean makes one entry ``trash/<time>-<what>/`` holding the moved folders under their cache names
and a ``manifest.json``. ``undo`` moves the most recent entry back, file by file: a file written since
at the same place is never overwritten (it is reported and the trashed copy stays in the entry).
``empty`` deletes the trash for good.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from neuroscope.cache import cache_root, write_json_atomic
from neuroscope.errors import ConfigError, NeuroscopeError

TRASH = "trash"
MANIFEST = "manifest.json"
# What each clean target moves: folders of the cache (docs/design.md, "Cache layout").
TARGETS: dict[str, tuple[str, ...]] = {
    "corpus": ("corpus",),
    "checkpoints": ("checkpoints",),
    "labels": ("autointerp_labels", "neuronpedia"),
    "calibration": ("calibration",),
    # GGUF files converted to Hugging Face folders (models/gguf) and dummy-weight folders
    # (models/dummy): large, and remade on the next load.
    "models": ("models",),
}
TARGETS["all"] = tuple(folder for name in list(TARGETS) for folder in TARGETS[name])


class NothingToUndo(NeuroscopeError):
    """The trash is empty."""


@dataclass(frozen=True)
class TrashEntry:
    path: Path
    created: str
    targets: list[str]
    paths: list[str]  # cache-relative folders or files, as they were before the move

    @property
    def bytes(self) -> int:
        return folder_size(self.path)


def folder_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).lstat().st_size
    return total


def _has_files(path: Path) -> bool:
    return path.is_dir() and any(p.is_file() for p in path.rglob("*"))


def trash_dir() -> Path:
    return cache_root() / TRASH


def usage() -> dict[str, int]:
    """Bytes held by each clean target (and the trash)."""
    root = cache_root()
    sizes = {
        name: sum(folder_size(root / f) for f in folders)
        for name, folders in TARGETS.items()
        if name != "all"
    }
    sizes["trash"] = folder_size(trash_dir())
    return sizes


def move_to_trash(targets: Sequence[str]) -> TrashEntry | None:
    """Move the folders of ``targets`` into a new trash entry; None when there was nothing to move."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ConfigError(
            f"Clean what? One or more of: {', '.join(TARGETS)} (got {', '.join(unknown) or 'nothing'})."
        )
    root = cache_root()
    folders = list(dict.fromkeys(f for t in targets for f in TARGETS[t]))
    present = [Path(f) for f in folders if _has_files(root / f)]
    if not present:
        return None
    return move_paths_to_trash(
        present, "-".join(dict.fromkeys(targets)), list(dict.fromkeys(targets))
    )


def move_paths_to_trash(
    paths: Sequence[Path], reason: str, targets: Sequence[str] = ()
) -> TrashEntry:
    """Move cache-relative ``paths`` (folders or files) into a new trash entry named for ``reason``."""
    root = cache_root()
    now = datetime.now(timezone.utc)
    entry = trash_dir() / f"{now:%Y%m%d-%H%M%S-%f}-{reason}"
    entry.mkdir(parents=True)
    rels = [Path(p).as_posix() for p in paths]
    created, names = now.isoformat(timespec="seconds"), list(targets) or [reason]
    write_json_atomic(entry / MANIFEST, {"created": created, "targets": names, "paths": rels})
    for rel in rels:
        (entry / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(root / rel, entry / rel)  # same file system: a rename, instant and atomic
    return TrashEntry(entry, created, names, rels)


def entries() -> list[TrashEntry]:
    """Trash entries, most recent first."""
    found = []
    for path in sorted(trash_dir().glob("*"), reverse=True):
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found.append(
            TrashEntry(
                path,
                manifest.get("created", ""),
                manifest.get("targets", []),
                manifest.get("paths", []),
            )
        )
    return found


@dataclass(frozen=True)
class UndoResult:
    entry: TrashEntry
    restored: int  # files
    conflicts: list[str]  # cache-relative paths that exist again and were left in the trash


def undo() -> UndoResult:
    """Restore the most recent trash entry; files written since at the same paths are kept as they are."""
    found = entries()
    if not found:
        raise NothingToUndo("The trash is empty: there is nothing to undo.")
    entry = found[0]
    root = cache_root()
    restored, conflicts = 0, []
    for rel in entry.paths:
        source = entry.path / rel
        if not source.exists():
            continue
        target = root / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            restored += sum(1 for p in target.rglob("*") if p.is_file()) if target.is_dir() else 1
            continue
        files = (
            [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        )
        for path in files:
            inner = path.relative_to(entry.path)
            dest = root / inner
            if dest.exists():
                conflicts.append(inner.as_posix())
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
            restored += 1
    if not conflicts:
        shutil.rmtree(entry.path)
    return UndoResult(entry, restored, conflicts)


def empty() -> tuple[int, int]:
    """Delete every trash entry for good; return (entries, bytes) removed."""
    found = [p for p in trash_dir().glob("*")]
    freed = sum(folder_size(p) if p.is_dir() else p.lstat().st_size for p in found)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return len(found), freed


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
