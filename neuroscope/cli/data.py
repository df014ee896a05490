"""Data management commands: ``push``, ``pull``, ``clean``, ``models``, ``sae``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from neuroscope.cli import app
from neuroscope.cli.options import user_errors
from neuroscope.sae import DEFAULT_SAE_PATH, DEFAULT_SAE_REPO

Repo = Annotated[
    str | None,
    typer.Option(
        "--repo",
        help="Hugging Face dataset repo OWNER/NAME (env NEUROSCOPE_HUB_REPO; default <your user>/neuroscope-labels).",
    ),
]


def _human(n: float) -> str:
    from neuroscope.trash import human_bytes

    return human_bytes(n)


# ---- push / pull -------------------------------------------------------------------------------------


@app.command()
def push(
    repo: Repo = None,
    message: Annotated[
        str, typer.Option("--message", "-m", help="Commit message.")
    ] = "Update Neuroscope labels",
    private: Annotated[
        bool, typer.Option("--private", help="Create the repo private if it does not exist.")
    ] = False,
) -> None:
    """Upload labels (and their scores) and calibration stats to a Hugging Face dataset repo."""
    from neuroscope.hubsync import default_repo
    from neuroscope.hubsync import push as push_to_hub

    with user_errors():
        repo = repo or default_repo()
        result = push_to_hub(repo, message, private=private)
        typer.echo(f"Pushed {len(result.files)} files to {result.repo}: {result.commit_url}")


@app.command()
def pull(
    repo: Repo = None,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch, tag or commit to pull.")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Let the repo's files replace differing local ones (yours go to the trash).",
        ),
    ] = False,
) -> None:
    """Download labels and calibration from a dataset repo into the cache, where serve finds them."""
    from neuroscope.hubsync import default_repo
    from neuroscope.hubsync import pull as pull_from_hub

    with user_errors():
        repo = repo or default_repo()
        r = pull_from_hub(repo, revision=revision, overwrite=overwrite)
        typer.echo(
            f"Pulled {repo}: {len(r.added)} new files, {sum(r.merged.values())} labels/scores merged into "
            f"{len(r.merged)} files, {r.unchanged} unchanged, {len(r.replaced)} replaced."
        )
        if r.kept_local:
            typer.echo(
                f"{len(r.kept_local)} local files differ from the repo and were kept (use --overwrite to take the repo's):"
            )
            for rel in r.kept_local[:10]:
                typer.echo(f"  {rel}")


# ---- clean -------------------------------------------------------------------------------------------

clean_app = typer.Typer(
    help="Move cached data to the trash (undo-able), show what the cache and trash hold, undo, empty.",
    no_args_is_help=True,
)
app.add_typer(clean_app, name="clean")

_TARGET_HELP = {
    "corpus": "stored corpora and the labelling corpus pass's examples",
    "checkpoints": "checkpoints of unfinished runs",
    "labels": "auto-interp labels, their scores and cached Neuronpedia labels",
    "calibration": "calibration stats",
    "models": "converted GGUF models and dummy-weight folders (remade on the next load)",
    "all": "corpus, checkpoints, labels, calibration and converted models",
}


def _make_clean_command(target: str) -> None:
    def command() -> None:
        from neuroscope import trash

        with user_errors():
            entry = trash.move_to_trash([target])
            if entry is None:
                typer.echo(f"Nothing to clean: no {target} data in the cache.")
                return
            typer.echo(
                f"Moved {', '.join(entry.paths)} ({_human(entry.bytes)}) to the trash. `neuroscope clean undo` brings it back."
            )

    command.__doc__ = f"Move {_TARGET_HELP[target]} to the trash."
    clean_app.command(target)(command)


for _target in _TARGET_HELP:
    _make_clean_command(_target)


@clean_app.command("show")
def clean_show() -> None:
    """What each kind of cached data takes, and what is in the trash."""
    from neuroscope import trash
    from neuroscope.cache import cache_root

    typer.echo(f"Cache: {cache_root()}")
    for name, size in trash.usage().items():
        typer.echo(f"  {name:<12} {_human(size):>10}")
    found = trash.entries()
    typer.echo(
        f"Trash: {len(found)} entries"
        + (" (most recent first; `clean undo` restores the first)" if found else "")
    )
    for entry in found:
        typer.echo(
            f"  {entry.created}  {', '.join(entry.targets):<30} {_human(entry.bytes):>10}  {entry.path.name}"
        )


@clean_app.command("undo")
def clean_undo() -> None:
    """Restore the most recently trashed data."""
    from neuroscope import trash

    with user_errors():
        try:
            result = trash.undo()
        except trash.NothingToUndo as e:
            typer.echo(str(e))
            return
        typer.echo(
            f"Restored {result.restored} files ({', '.join(result.entry.targets)}, trashed {result.entry.created})."
        )
        if result.conflicts:
            typer.echo(
                f"{len(result.conflicts)} files were written again since and were kept; the trashed copies stay in {result.entry.path}:"
            )
            for rel in result.conflicts[:10]:
                typer.echo(f"  {rel}")


@clean_app.command("empty")
def clean_empty(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete the trash for good."""
    from neuroscope import trash

    found = trash.entries()
    if not found:
        typer.echo("The trash is already empty.")
        return
    size = sum(e.bytes for e in found)
    if not yes and not typer.confirm(
        f"Delete {len(found)} trash entries ({_human(size)}) for good?", default=False
    ):
        typer.echo("Kept the trash.")
        raise typer.Exit(1)
    count, freed = trash.empty()
    typer.echo(f"Deleted {count} trash entries, {_human(freed)} freed.")


# ---- models / sae ------------------------------------------------------------------------------------

models_app = typer.Typer(
    help="Models in the Hugging Face cache; download one ahead of time.", no_args_is_help=True
)
sae_app = typer.Typer(
    help="SAEs in the Hugging Face cache; download one ahead of time.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(sae_app, name="sae")


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M") if timestamp else "?"


@models_app.command("list")
def models_list() -> None:
    """Models in the Hugging Face cache, and GGUF files converted into Neuroscope's cache."""
    from neuroscope.gguf import conversions_dir, list_conversions
    from neuroscope.hubsync import scan_hf_cache

    repos = [r for r in scan_hf_cache() if r.kind == "model"]
    if not repos:
        typer.echo(
            "No models in the Hugging Face cache. Download one with `neuroscope models pull ID`."
        )
    for r in repos:
        typer.echo(
            f"{r.repo_id:<50} {_human(r.bytes):>10} {r.files:>5} files  {_when(r.last_modified)}"
        )
    conversions = list_conversions()
    if not conversions:
        return
    total = sum(c.bytes for c in conversions)
    typer.echo(
        f"\nGGUF conversions in {conversions_dir()} ({_human(total)}; "
        "`neuroscope clean models` moves them to the trash):"
    )
    for c in conversions:
        state = "" if c.complete else "  (unfinished or outdated: not used)"
        if c.complete and not c.source_exists:
            state = "  (its GGUF file is gone)"
        typer.echo(f"{c.folder.name:<50} {_human(c.bytes):>10} {c.dtype:>9}  {c.source}{state}")


@models_app.command("pull")
def models_pull(
    model_id: Annotated[str, typer.Argument(help="Hub repo id, e.g. google/gemma-2-2b-it.")],
) -> None:
    """Download a model's weights, config and tokenizer into the Hugging Face cache."""
    from neuroscope.loading import resolve_model

    with user_errors():
        resolved = resolve_model(model_id)
        typer.echo(f"{model_id} is in {resolved.path}")


@sae_app.command("list")
def sae_list() -> None:
    """SAEs in the Hugging Face cache, with the paths of those downloaded."""
    from neuroscope.hubsync import scan_hf_cache

    repos = [r for r in scan_hf_cache() if r.kind == "sae"]
    if not repos:
        typer.echo("No SAEs in the Hugging Face cache. Download one with `neuroscope sae pull`.")
    for r in repos:
        typer.echo(f"{r.repo_id:<50} {_human(r.bytes):>10}  {_when(r.last_modified)}")
        for path in r.saes:
            typer.echo(f"  {path}")


@sae_app.command("pull")
def sae_pull(
    sae_id: Annotated[
        str, typer.Argument(help="OWNER/REPO or OWNER/REPO/PATH (the id in feature records).")
    ] = DEFAULT_SAE_REPO,
    path: Annotated[
        str | None,
        typer.Option(
            "--path",
            help="Path inside the repo: a .npz file or an SAE folder. Default: the default SAE's, for the default repo.",
        ),
    ] = None,
) -> None:
    """Download one SAE into the Hugging Face cache (without loading it)."""
    from neuroscope.errors import ConfigError
    from neuroscope.hubsync import download_sae, split_sae_id

    with user_errors():
        repo, inner = split_sae_id(sae_id, path)
        if not inner:
            if repo != DEFAULT_SAE_REPO:
                raise ConfigError(
                    f"Which SAE in {repo}? Give --path (e.g. layer_20/width_16k/average_l0_71)."
                )
            inner = DEFAULT_SAE_PATH
        local = download_sae(repo, inner)
        typer.echo(f"{repo}/{inner} is in {Path(local)}")


@sae_app.command("releases")
def sae_releases(
    release: Annotated[
        str | None,
        typer.Argument(help="A release, to list its SAE ids; none: list the releases."),
    ] = None,
) -> None:
    """SAELens' releases (its release table, shipped with Neuroscope), for --sae-release/--sae-id."""
    from neuroscope.errors import SAEError
    from neuroscope.saelens_releases import FORMATS, releases, resolve_release

    table = releases()
    with user_errors():
        if release is None:
            for name, entry in sorted(table.items()):
                readable = entry["format"] in FORMATS
                count = (
                    f"{len(entry['saes']):>6} SAEs"
                    if readable
                    else f"({entry['format']}: not readable)"
                )
                typer.echo(f"{name:<48} {entry['repo']:<56} {count}")
            return
        if release not in table:
            resolve_release(release, "")  # raises with close matches
        entry = table[release]
        if entry["format"] not in FORMATS:
            raise SAEError(
                f"{release} is stored in the {entry['format']!r} format, which Neuroscope cannot read."
            )
        for sae_id in entry["saes"]:
            found = resolve_release(release, sae_id)
            extra = f"  neuronpedia {found.neuronpedia}" if found.neuronpedia else ""
            typer.echo(f"{sae_id:<48} {found.path}{extra}")
