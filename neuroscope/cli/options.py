"""What the commands share: the model and SAE options, and how errors reach the user."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from neuroscope.errors import NeuroscopeError

Model = Annotated[str, typer.Option("--model", help="Hub repo id, model folder or .gguf file.")]
Sae = Annotated[str, typer.Option("--sae", help="Hugging Face repo of the SAE.")]
SaePath = Annotated[
    str | None,
    typer.Option(
        "--sae-path",
        help="Path of the SAE inside --sae ('{layer}' is filled in). Default for the default repo "
        "at layer 20: layer_20/width_16k/average_l0_71/params.npz.",
    ),
]
SaeLocalPath = Annotated[
    str | None,
    typer.Option(
        "--sae-local-path",
        help="A local SAE instead: a Gemma Scope params.npz or a SAELens folder.",
    ),
]
SaeRelease = Annotated[
    str | None,
    typer.Option(
        "--sae-release",
        help="A SAELens release (e.g. gemma-scope-2-1b-it-res), resolved through SAELens' release "
        "table shipped with Neuroscope; replaces --sae/--sae-path. Needs --sae-id.",
    ),
]
SaeId = Annotated[
    str | None,
    typer.Option(
        "--sae-id",
        help="The SAE's id in --sae-release (e.g. layer_13_width_16k_l0_medium; '{layer}' is filled "
        "in). Without --sae-layer, the layer it names is hooked.",
    ),
]
SaeNormScalingFactor = Annotated[
    float | None,
    typer.Option(
        "--sae-norm-scaling-factor",
        help="The scaling factor of a SAELens SAE trained with normalize_activations="
        "expected_average_only_in (SAELens' release table has it; --sae-release finds it itself).",
    ),
]
SaeLayer = Annotated[
    int,
    typer.Option(
        "--sae-layer", "--layer", help="Decoder block whose output the SAE reads (0-based)."
    ),
]
Backend = Annotated[str, typer.Option("--backend", help="auto, torch or mlx.")]
DType = Annotated[
    str | None,
    typer.Option("--dtype", help="Model dtype (float32, bfloat16, ...). Default: the backend's."),
]
LoadFormat = Annotated[
    str,
    typer.Option(
        "--load-format",
        help="auto, or dummy: random weights at the model's real shapes (and a random SAE).",
    ),
]
CorpusPath = Annotated[
    Path | None,
    typer.Option(
        "--corpus-path",
        help="Corpus folder or local text files. Default: the cache's wikitext corpus (built if missing).",
    ),
]


def say(message: str) -> None:
    """Progress and status go to stderr, so that stdout stays for results (tables, JSON)."""
    typer.echo(message, err=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Errors a user can act on print as one message, no traceback; Ctrl-C says what was kept."""
    try:
        yield
    except NeuroscopeError as e:
        typer.secho(f"Error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.secho(
            "Interrupted. Everything finished so far is saved; run the same command to go on.",
            err=True,
        )
        raise typer.Exit(130) from None
