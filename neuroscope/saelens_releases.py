"""SAELens release ids (``--sae-release gemma-scope-2-1b-it-res --sae-id layer_13_width_16k_l0_medium``)
resolved through SAELens' published release table, read as data: SAELens is never imported.

The table ships as ``neuroscope/data/saelens_releases.json.gz`` (gzip: 64 kB, not 850 kB), made from ``pretrained_saes.yaml`` of
the sae-lens package by ``python -m neuroscope.saelens_releases PATH/TO/pretrained_saes.yaml``.
It keeps, per release, the repo, the model, the file format ("conversion_func"), SAELens' config
overrides and per SAE its path, Neuronpedia id and ``norm_scaling_factor``. Releases in a format
Neuroscope cannot read are kept by name only, so that asking for one says why it is refused.
A release missing from the shipped table is looked up in an installed sae-lens, if there is one.
"""

from __future__ import annotations

import difflib
import gzip
import importlib.util
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from neuroscope.errors import SAEError
from neuroscope.sae import SAE, load_from_hub

TABLE = Path(__file__).parent / "data" / "saelens_releases.json.gz"
# SAELens "conversion_func" values Neuroscope reads: SAELens' own folders (None), Gemma Scope npz,
# Gemma Scope 2 params.safetensors. The path of the file inside a release's SAE folder:
FORMATS = {"saelens": "", "gemma_2": "/params.npz", "gemma_3": "/params.safetensors"}


@dataclass(frozen=True)
class ReleaseSAE:
    """One SAE of a release: where it lives and what SAELens knows about it beyond its files."""

    release: str
    sae_id: str
    repo: str
    path: str  # the SAE's folder (or file) inside the repo
    format: str
    model: str = ""
    neuronpedia: str | None = None
    norm_scaling_factor: float | None = None
    cfg_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def hub_path(self) -> str:
        """The path to pass to ``load_from_hub``."""
        suffix = FORMATS[self.format]
        return self.path if not suffix or self.path.endswith(suffix) else self.path + suffix

    @property
    def layer(self) -> int | None:
        """The layer the id or path names, when it names one (blocks.L.… or layer_L…)."""
        for text in (self.sae_id, self.path):
            m = re.search(r"(?:blocks\.|layer_)(\d+)", text)
            if m:
                return int(m.group(1))
        return None


def build_table(yaml_path: str | Path) -> dict[str, Any]:
    """The shipped table from SAELens' ``pretrained_saes.yaml`` (a slow YAML parse: run once)."""
    import yaml  # type: ignore[import-untyped]

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's is ~5x faster
    raw = yaml.load(Path(yaml_path).read_text(), Loader=loader)  # noqa: S506 - a safe loader
    releases: dict[str, Any] = {}
    for name, release in raw.items():
        fmt = release.get("conversion_func") or "saelens"
        entry: dict[str, Any] = {
            "repo": release["repo_id"],
            "model": release.get("model", ""),
            "format": fmt,
        }
        if fmt in FORMATS:
            if release.get("config_overrides"):
                entry["overrides"] = release["config_overrides"]
            saes: dict[str, list[Any]] = {}
            for sae in release["saes"]:
                path, sae_id = str(sae["path"]), str(sae["id"])
                # [path (omitted when it equals the id), neuronpedia id, norm scaling factor]
                row = [
                    None if path == sae_id else path,
                    sae.get("neuronpedia"),
                    sae.get("norm_scaling_factor"),
                ]
                while row and row[-1] is None:
                    row.pop()
                saes[sae_id] = row
            entry["saes"] = saes
        releases[name] = entry
    return {
        "source": f"sae-lens {_sae_lens_version(yaml_path)} pretrained_saes.yaml",
        "releases": releases,
    }


def _sae_lens_version(yaml_path: str | Path) -> str:
    version = Path(yaml_path).parent / "__init__.py"
    m = (
        re.search(r'__version__\s*=\s*"([^"]+)"', version.read_text())
        if version.is_file()
        else None
    )
    return m.group(1) if m else "?"


@cache
def _shipped() -> dict[str, Any]:
    return json.loads(gzip.decompress(TABLE.read_bytes()))["releases"]  # type: ignore[no-any-return]


@cache
def _installed() -> dict[str, Any]:
    """The release table of an installed sae-lens (found without importing it), or {}."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained_saes.yaml"
    return build_table(path)["releases"] if path.is_file() else {}


def releases() -> dict[str, Any]:
    """Every release Neuroscope knows, by name (the shipped table)."""
    return _shipped()


def resolve_release(release: str, sae_id: str) -> ReleaseSAE:
    """The SAE ``sae_id`` of SAELens release ``release``; errors name close matches."""
    table = _shipped()
    entry = table.get(release)
    if entry is None:
        entry = _installed().get(release)
    if entry is None:
        close = difflib.get_close_matches(release, table, n=5, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise SAEError(
            f"No SAELens release {release!r}.{hint} `neuroscope sae releases` lists "
            "SAELens' releases (its pretrained_saes.yaml, shipped with Neuroscope)."
        )
    fmt = entry["format"]
    if fmt not in FORMATS:
        raise SAEError(
            f"SAELens release {release!r} ({entry['repo']}) is stored in the {fmt!r} format, which "
            f"Neuroscope cannot read (it reads SAELens folders, Gemma Scope and Gemma Scope 2)."
        )
    row = entry["saes"].get(sae_id)
    if row is None:
        close = difflib.get_close_matches(sae_id, entry["saes"], n=5, cutoff=0.6)
        hint = f" Close: {', '.join(close)}." if close else ""
        raise SAEError(
            f"Release {release!r} has no SAE {sae_id!r} ({len(entry['saes'])} SAEs).{hint}"
        )
    row = list(row) + [None] * (3 - len(row))
    return ReleaseSAE(
        release=release,
        sae_id=sae_id,
        repo=entry["repo"],
        path=row[0] or sae_id,
        format=fmt,
        model=entry.get("model", ""),
        neuronpedia=row[1],
        norm_scaling_factor=row[2],
        cfg_overrides=dict(entry.get("overrides") or {}),
    )


def resolve_for_layers(
    release: str, sae_id: str | Sequence[str] | None, layer: int | Sequence[int] | None
) -> tuple[list[int], list[ReleaseSAE]]:
    """(layers, one release SAE per layer) for Session: ``sae_id`` is one id (``{layer}`` is filled
    in), or one per layer. Without ``layer``, the layers are those the ids name."""
    if not sae_id:
        raise SAEError(
            f"--sae-release {release} needs --sae-id (an id of that release, e.g. SAELens' "
            "layer_13_width_16k_l0_medium); `neuroscope sae releases RELEASE` lists them."
        )
    layers = None if layer is None else [layer] if isinstance(layer, int) else list(layer)
    if isinstance(sae_id, str):
        if layers is None:
            entries = [resolve_release(release, sae_id)]
        else:
            entries = [resolve_release(release, sae_id.replace("{layer}", str(L))) for L in layers]
    else:
        if layers is not None and len(layers) != len(sae_id):
            raise SAEError(f"--sae-id lists {len(sae_id)} ids for {len(layers)} layers {layers}.")
        entries = [resolve_release(release, i) for i in sae_id]
    if layers is None:
        named = [e.layer for e in entries]
        if None in named:
            raise SAEError(
                f"SAE {entries[named.index(None)].sae_id} of {release} names no layer: pass --layer."
            )
        layers = [int(L) for L in named]  # type: ignore[arg-type]
    return layers, entries


def load_release(entry: ReleaseSAE, revision: str | None = None) -> SAE:
    """Load a release's SAE from the Hub (or the HF cache) with what SAELens' table adds to it."""
    sae = load_from_hub(
        entry.repo,
        entry.hub_path,
        revision,
        norm_scaling_factor=entry.norm_scaling_factor,
        cfg_overrides=entry.cfg_overrides or None,
    )
    return replace(sae, neuronpedia_id=entry.neuronpedia or sae.neuronpedia_id)


if __name__ == "__main__":  # regenerate the shipped table from an installed sae-lens
    source = sys.argv[1] if len(sys.argv) > 1 else None
    if source is None:
        spec = importlib.util.find_spec("sae_lens")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                "usage: python -m neuroscope.saelens_releases PATH/TO/pretrained_saes.yaml"
            )
        source = str(Path(next(iter(spec.submodule_search_locations))) / "pretrained_saes.yaml")
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(build_table(source), separators=(",", ":")).encode()
    TABLE.write_bytes(gzip.compress(data, mtime=0))  # mtime 0: the same table, the same bytes
    print(f"wrote {TABLE} ({TABLE.stat().st_size:,} bytes) from {source}")
