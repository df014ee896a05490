"""``neuroscope calibrate``: measure every SAE feature over a corpus, and read the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroscope import calibration
from neuroscope.cli import app, options
from neuroscope.cli.options import say, user_errors
from neuroscope.loading import DEFAULT_MODEL
from neuroscope.sae import DEFAULT_SAE_REPO

calibrate_app = typer.Typer(
    name="calibrate",
    help="Per-feature activation statistics, for the noise filters (--feature-filter).",
    no_args_is_help=True,
)
app.add_typer(calibrate_app, name="calibrate")


@calibrate_app.command("run")
def run(
    model: options.Model = DEFAULT_MODEL,
    sae: options.Sae = DEFAULT_SAE_REPO,
    sae_path: options.SaePath = None,
    sae_local_path: options.SaeLocalPath = None,
    sae_layer: options.SaeLayer = 20,
    corpus_path: options.CorpusPath = None,
    samples: Annotated[
        int, typer.Option("--samples", help="Samples to measure.")
    ] = calibration.DEFAULT_SAMPLES,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Stats file to write (*.safetensors). Default: the cache, where serve finds it.",
        ),
    ] = None,
    backend: options.Backend = "auto",
    dtype: options.DType = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Sequences per forward pass.")
    ] = calibration.DEFAULT_BATCH_SIZE,
    max_length: Annotated[
        int, typer.Option("--max-length", help="Tokens per sample, BOS included.")
    ] = calibration.DEFAULT_MAX_LENGTH,
    checkpoint_every: Annotated[
        float, typer.Option("--checkpoint-every", help="Seconds between checkpoints.")
    ] = calibration.DEFAULT_CHECKPOINT_SECONDS,
    load_format: options.LoadFormat = "auto",
    restart: Annotated[
        bool,
        typer.Option(
            "--restart", help="Ignore an existing checkpoint and start from the first sample."
        ),
    ] = False,
) -> None:
    """Run the model over a corpus (prefill only) and write each feature's firing statistics.

    An interrupted run resumes from its last checkpoint when run again with the same arguments.
    """
    with user_errors():
        stats = calibration.run_calibration(
            model=model,
            layer=sae_layer,
            sae=sae,
            sae_path=sae_path,
            sae_local_path=sae_local_path,
            corpus_path=corpus_path,
            samples=samples,
            output=output,
            backend=backend,
            dtype=dtype,
            batch_size=batch_size,
            max_length=max_length,
            checkpoint_every=checkpoint_every,
            resume=not restart,
            load_format=load_format,
            log=say,
        )
        typer.echo(f"Wrote {stats.path}")
        _print_summary(stats)


def _print_summary(stats: calibration.CalibrationStats) -> None:
    h, s = stats.header, calibration.summarize(stats)
    typer.echo(f"model {h.model} · SAE {h.sae_id} (width {h.sae_width}) · layer {h.layer}")
    typer.echo(
        f"corpus {h.corpus.get('source', '?')} · {h.samples:,} samples · {h.tokens:,} tokens"
    )
    typer.echo(
        f"{s.never_fire:,} of {s.width:,} features never fire; {s.fire_over_half:,} fire on more "
        f"than half the tokens; median firing rate {s.median_rate:.4%}."
    )


@calibrate_app.command("show")
def show(
    stats: Annotated[
        Path, typer.Option("--stats", help="A stats file written by `calibrate run`.")
    ],
    top: Annotated[
        int, typer.Option("--top", help="How many of the most frequent features to list.")
    ] = 20,
) -> None:
    """The most frequent features of a stats file, and how many never or nearly always fire."""
    with user_errors():
        loaded = calibration.load_stats(stats)
        _print_summary(loaded)
        rows = calibration.most_frequent(loaded, top)
        if not rows:
            return
        typer.echo("")
        typer.echo(
            f"{'feature':>8} {'fires':>8} {'mean':>10} {'std':>10} {'max':>10} {'mean(all)':>10}"
        )
        for r in rows:
            typer.echo(
                f"{r['index']:>8} {r['firing_rate']:>8.2%} {r['act_mean']:>10.3f} {r['act_std']:>10.3f} "
                f"{r['act_max']:>10.3f} {r['mean_all']:>10.3f}"
            )
