"""``neuroscope corpus``: build and inspect the text corpora that calibration and labelling read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroscope import corpus as corpora
from neuroscope.cli import app
from neuroscope.cli.options import user_errors

corpus_app = typer.Typer(
    name="corpus",
    help="Text corpora for calibration and labelling, kept in the cache.",
    no_args_is_help=True,
)
app.add_typer(corpus_app, name="corpus")


def print_summary(corpus: corpora.Corpus) -> None:
    info = corpora.summary(corpus)
    for key in ("path", "source", "samples", "characters", "median_characters", "created"):
        value = info[key]
        if isinstance(value, int):
            value = f"{value:,}"
        typer.echo(f"{key.replace('_', ' '):>18}: {value}")


@corpus_app.command("build")
def build(
    samples: Annotated[
        int, typer.Option("--samples", help="How many text samples to keep.")
    ] = corpora.DEFAULT_SAMPLES,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Folder to write. Default: a folder named for the source in the cache's corpus/.",
        ),
    ] = None,
    dataset: Annotated[
        str, typer.Option("--dataset", help="Hugging Face dataset id, or a local dataset folder.")
    ] = corpora.DEFAULT_DATASET,
    config: Annotated[
        str | None,
        typer.Option("--config", help="Dataset config. Default for wikitext: wikitext-103-raw-v1."),
    ] = None,
    split: Annotated[
        str, typer.Option("--split", help="Dataset split to read.")
    ] = corpora.DEFAULT_SPLIT,
    from_path: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Build from local files instead: a .txt (one sample per paragraph), .jsonl, .parquet, or a folder.",
        ),
    ] = None,
    text_column: Annotated[
        str | None,
        typer.Option(
            "--text-column", help="Field holding the text. Default: 'text', or the only text field."
        ),
    ] = None,
    min_chars: Annotated[
        int, typer.Option("--min-chars", help="Skip samples shorter than this (headings, debris).")
    ] = corpora.DEFAULT_MIN_CHARS,
    seed: Annotated[int, typer.Option("--seed", help="Shuffle seed for dataset streaming.")] = 0,
) -> None:
    """Collect text samples from a dataset (streamed with `datasets`) or local files into the cache."""
    with user_errors():
        if from_path is not None:
            corpus = corpora.from_local(from_path, samples, text_column, min_chars)
            name = f"local-{from_path.expanduser().resolve().stem}"
        else:
            corpus = corpora.from_dataset(
                dataset, config, split, samples, text_column, min_chars, seed
            )
            name = f"{dataset}-{corpus.source['config'] or 'default'}-{split}"
        folder = output or corpora.corpus_dir(name)
        corpus = corpora.save_corpus(corpus, folder)
        if corpus.samples < samples:
            typer.echo(
                f"Only {corpus.samples} samples were available (asked for {samples}).", err=True
            )
        print_summary(corpus)


@corpus_app.command("show")
def show(
    path: Annotated[
        Path | None,
        typer.Option(
            "--path",
            help="A corpus folder (or local text files). Default: every corpus in the cache.",
        ),
    ] = None,
) -> None:
    """Summarise a corpus: samples, characters, where the text came from."""
    with user_errors():
        if path is not None:
            print_summary(corpora.open_corpus(path))
            return
        folders = corpora.cached_corpora()
        if not folders:
            typer.echo("No corpus in the cache yet. Build one with `neuroscope corpus build`.")
            return
        for i, folder in enumerate(folders):
            if i:
                typer.echo("")
            try:
                print_summary(corpora.load_corpus(folder))
            except corpora.CorpusError as e:
                typer.secho(f"{folder}: {e}", err=True, fg=typer.colors.YELLOW)
