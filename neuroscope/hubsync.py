"""Moving Neuroscope's data to and from the Hugging Face Hub, and seeing what the HF cache holds.

``push``/``pull`` keep labels and calibration in a dataset repo, laid out like the cache, so a pull
puts everything where ``serve`` looks::

    README.md                                            a dataset card (written once, if absent)
    labels/<labeler>/<model>/<sae>/labels.jsonl          one record per feature, compacted
    labels/<labeler>/<model>/<sae>/scores.jsonl          detection scores, if any
    labels/<labeler>/<model>/<sae>/meta.json             the real labeler, model and SAE ids
    calibration/<model>/<sae>/layer_<L>.safetensors      calibration stats

Folder names are the ids made file-system safe (``neuroscope.cache.slug``: ``/`` becomes ``--``).
A pull merges label journals feature by feature (a usable local label is kept unless ``overwrite``)
and never silently replaces another file: with ``overwrite`` the local copy goes to the trash first.

Every call honours HF_TOKEN, HF_HOME and HF_ENDPOINT as huggingface_hub does; ``endpoint`` and
``token`` arguments override them (the tests point ``endpoint`` at a local stand-in for the Hub).
"""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroscope.cache import cache_root, write_text_atomic
from neuroscope.errors import ConfigError, NeuroscopeError
from neuroscope.labels.store import AUTOINTERP_DIR, LABELS_FILE, META_FILE, SCORES_FILE, Journal

REPO_ENV = "NEUROSCOPE_HUB_REPO"
DEFAULT_REPO_NAME = "neuroscope-labels"
REPO_TYPE = "dataset"
# Cache folder -> folder in the repo.
SYNCED = {AUTOINTERP_DIR: "labels", "calibration": "calibration"}
JOURNALS = (LABELS_FILE, SCORES_FILE)

CARD = """\
---
tags:
- neuroscope
- sparse-autoencoder
- interpretability
---
# Neuroscope feature labels

Feature labels and calibration statistics written by
[Neuroscope](https://github.com/) (`neuroscope push`). Get them with `neuroscope pull --repo {repo}`.

- `labels/<labeler>/<model>/<sae>/labels.jsonl`: one JSON object per SAE feature:
  `index`, `status` (`ok` or `failed`), `label`, `labeler`.
- `labels/<labeler>/<model>/<sae>/scores.jsonl`: detection scores (balanced accuracy) of those labels.
- `labels/<labeler>/<model>/<sae>/meta.json`: the labeler, model and SAE ids behind the folder names.
- `calibration/<model>/<sae>/layer_<L>.safetensors`: per-feature firing statistics.
"""


class HubSyncError(NeuroscopeError, RuntimeError):
    """The Hub refused or could not be reached."""


def _hub_error(e: Exception, repo: str, action: str) -> HubSyncError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return HubSyncError(f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN.")
    if isinstance(e, RepositoryNotFoundError):
        return HubSyncError(
            f"No dataset repo {repo} on the Hub (private ones need HF_TOKEN with access)."
        )
    if isinstance(e, LocalEntryNotFoundError):
        return HubSyncError(
            f"Cannot {action} {repo}: the Hub cannot be reached (or HF_HUB_OFFLINE is set)."
        )
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return HubSyncError(
                f"The Hub refused to {action} {repo} ({status}): set HF_TOKEN to a token with write access."
            )
        return HubSyncError(f"Could not {action} {repo}: {str(e).splitlines()[0]}")
    return HubSyncError(f"Could not {action} {repo}: {type(e).__name__}: {e}")


def default_repo(endpoint: str | None = None, token: str | None = None) -> str:
    """--repo, else NEUROSCOPE_HUB_REPO, else ``<your user>/neuroscope-labels`` (needs HF_TOKEN)."""
    if os.environ.get(REPO_ENV):
        return os.environ[REPO_ENV]
    from huggingface_hub import HfApi

    try:
        name = HfApi(endpoint=endpoint, token=token).whoami()["name"]
    except Exception:
        raise ConfigError(
            f"Which repo? Pass --repo OWNER/NAME or set {REPO_ENV}; or set HF_TOKEN to default to "
            f"<your user>/{DEFAULT_REPO_NAME}."
        ) from None
    return f"{name}/{DEFAULT_REPO_NAME}"


# ---- push --------------------------------------------------------------------------------------------


def _stage(staging: Path) -> list[str]:
    """Copy what is pushed into ``staging`` in the repo layout (journals compacted); return repo paths."""
    root = cache_root()
    paths = []
    for cache_folder, repo_folder in SYNCED.items():
        base = root / cache_folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if not path.is_file() or path.name.startswith(".") or path.suffix == ".tmp":
                continue
            rel = Path(repo_folder) / path.relative_to(base)
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.name in JOURNALS:
                latest = Journal(path).load()
                if not latest:
                    continue
                dest.write_text("".join(_line(latest[i]) for i in sorted(latest)), encoding="utf-8")
            else:
                shutil.copyfile(path, dest)
            paths.append(rel.as_posix())
    return paths


def _line(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


@dataclass(frozen=True)
class PushResult:
    repo: str
    files: list[str]
    commit_url: str


def push(repo: str, message: str = "Update Neuroscope labels", *, endpoint: str | None = None,
         token: str | None = None, private: bool = False) -> PushResult:  # fmt: skip
    """Upload labels and calibration to the dataset repo ``repo`` (created if missing) in one commit."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="neuroscope-push-") as tmp:
        staging = Path(tmp)
        files = _stage(staging)
        if not files:
            raise ConfigError(
                f"Nothing to push: no labels or calibration in {cache_root()}. Run `neuroscope labels "
                "generate` or `neuroscope calibrate run` first."
            )
        try:
            api.create_repo(repo, repo_type=REPO_TYPE, exist_ok=True, private=private)
            if not api.file_exists(repo, "README.md", repo_type=REPO_TYPE):
                (staging / "README.md").write_text(CARD.format(repo=repo), encoding="utf-8")
            info = api.upload_folder(
                repo_id=repo, folder_path=staging, repo_type=REPO_TYPE, commit_message=message
            )
        except Exception as e:
            raise _hub_error(e, repo, "push to") from None
    return PushResult(repo, files, str(getattr(info, "commit_url", info)))


# ---- pull --------------------------------------------------------------------------------------------


@dataclass
class PullResult:
    repo: str
    added: list[str] = field(default_factory=list)  # cache-relative paths new here
    merged: dict[str, int] = field(default_factory=dict)  # journal -> features taken from the repo
    unchanged: int = 0
    kept_local: list[str] = field(default_factory=list)  # differed; yours kept (no --overwrite)
    replaced: list[str] = field(default_factory=list)  # differed; yours moved to the trash


def _merge_journal(local: Path, remote: Path, overwrite: bool) -> int:
    """Fold the repo's records into the local journal; return how many features changed."""
    mine, theirs = Journal(local).load(), Journal(remote).load()
    changed = 0
    for index, record in theirs.items():
        current = mine.get(index)
        usable = record.get("status", "ok") == "ok"
        wanted = current is None or (usable and (overwrite or current.get("status", "ok") != "ok"))
        if wanted and current != record:
            mine[index] = record
            changed += 1
    if changed:
        write_text_atomic(local, "".join(_line(mine[i]) for i in sorted(mine)))
    return changed


def pull(repo: str, *, endpoint: str | None = None, token: str | None = None, revision: str | None = None,
         overwrite: bool = False) -> PullResult:  # fmt: skip
    """Download labels and calibration from ``repo`` into the cache, where serve and show find them."""
    from huggingface_hub import snapshot_download

    from neuroscope import trash

    try:
        snapshot = Path(snapshot_download(
            repo, repo_type=REPO_TYPE, revision=revision, endpoint=endpoint, token=token,
            allow_patterns=[f"{folder}/*" for folder in SYNCED.values()],
        ))  # fmt: skip
    except Exception as e:
        raise _hub_error(e, repo, "pull from") from None
    root = cache_root()
    result = PullResult(repo)
    to_trash: list[tuple[Path, Path]] = []
    for cache_folder, repo_folder in SYNCED.items():
        base = snapshot / repo_folder
        if not base.is_dir():
            continue
        for remote in sorted(p for p in base.rglob("*") if p.is_file()):
            rel = Path(cache_folder) / remote.relative_to(base)
            local = root / rel
            if not local.exists():
                local.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(
                    dir=local.parent, delete=False, prefix=".pull-"
                ) as tmp:
                    shutil.copyfile(remote, tmp.name)
                os.replace(tmp.name, local)
                result.added.append(rel.as_posix())
            elif remote.name in JOURNALS:
                changed = _merge_journal(local, remote, overwrite)
                if changed:
                    result.merged[rel.as_posix()] = changed
                else:
                    result.unchanged += 1
            elif filecmp.cmp(local, remote, shallow=False):
                result.unchanged += 1
            elif remote.name == META_FILE:
                result.unchanged += 1  # ids of a folder whose name already says them: keep ours
            elif overwrite:
                to_trash.append((rel, remote))
            else:
                result.kept_local.append(rel.as_posix())
    if to_trash:
        trash.move_paths_to_trash([rel for rel, _ in to_trash], "pull")
        for rel, remote in to_trash:
            shutil.copyfile(remote, root / rel)
            result.replaced.append(rel.as_posix())
    return result


# ---- the HF cache: what is there, and pre-downloading ------------------------------------------------

SAE_FILES = ("params.npz", "sae_weights.safetensors")


@dataclass(frozen=True)
class CachedRepo:
    repo_id: str
    bytes: int
    files: int
    last_modified: float
    kind: str  # "model", "sae" or "other"
    saes: list[str]  # SAE paths inside the repo (folders holding params.npz / a SAELens export)


def scan_hf_cache(cache_dir: str | Path | None = None) -> list[CachedRepo]:
    """Model repos in the Hugging Face cache, each classed as a model, an SAE repo or other."""
    from huggingface_hub import constants, scan_cache_dir

    try:
        # read the cache folder now, as hf_hub_download does (scan_cache_dir's default is the one
        # seen when huggingface_hub was imported)
        info = scan_cache_dir(cache_dir or constants.HF_HUB_CACHE)
    except Exception:  # no cache folder yet (CacheNotFound) and the like
        return []
    repos = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        names: set[str] = set()
        saes: set[str] = set()
        for revision in repo.revisions:
            for f in revision.files:
                rel = f.file_path.relative_to(revision.snapshot_path).as_posix()
                names.add(rel)
                if f.file_name in SAE_FILES:
                    saes.add(rel.rsplit("/", 1)[0] if "/" in rel else ".")
        kind = "sae" if saes else "model" if "config.json" in names else "other"
        repos.append(
            CachedRepo(
                repo.repo_id,
                repo.size_on_disk,
                repo.nb_files,
                repo.last_modified,
                kind,
                sorted(saes),
            )
        )
    return sorted(repos, key=lambda r: r.repo_id)


def split_sae_id(sae: str, path: str | None = None) -> tuple[str, str]:
    """``owner/repo/some/path`` (an SAE id as in records) or ``owner/repo`` + ``path`` -> (repo, path)."""
    parts = sae.strip("/").split("/")
    if len(parts) < 2:
        raise ConfigError(
            f"An SAE is OWNER/REPO[/PATH], e.g. google/gemma-scope-2b-pt-res; got {sae!r}."
        )
    repo, inner = "/".join(parts[:2]), "/".join(parts[2:])
    if path and inner:
        raise ConfigError(f"{sae!r} already names a path inside the repo; leave out --path.")
    return repo, (path or inner).strip("/")


def download_sae(
    repo: str, path: str, *, endpoint: str | None = None, token: str | None = None
) -> Path:
    """Fetch one SAE into the HF cache without loading it: ``path`` is a ``.npz`` file, a folder with a
    ``params.npz`` (Gemma Scope), or a SAELens folder. Returns the local file or folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def get(name: str) -> Path:
        return Path(hf_hub_download(repo, name, endpoint=endpoint, token=token))

    folder = path.strip("/")
    try:
        if folder.endswith(".npz"):
            return get(folder)
        prefix = f"{folder}/" if folder else ""
        try:
            return get(f"{prefix}params.npz")
        except EntryNotFoundError:
            pass
        try:
            get(f"{prefix}sae_weights.safetensors")
            return get(f"{prefix}cfg.json").parent
        except EntryNotFoundError:
            raise ConfigError(
                f"{repo} has no SAE at {folder or 'its root'}: expected params.npz, or cfg.json with "
                "sae_weights.safetensors. Check the path (e.g. layer_20/width_16k/average_l0_71)."
            ) from None
    except ConfigError:
        raise
    except Exception as e:
        raise _hub_error(e, f"{repo}/{folder}", "download") from None
