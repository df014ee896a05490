"""The ``neuroscope`` command. Each command group lives in its own module and is registered here.

Modules here import only what ``--help`` needs; torch, mlx and the like load inside commands."""

from __future__ import annotations

from typing import Annotated

import typer

from neuroscope import __version__

app = typer.Typer(
    name="neuroscope",
    help="Watch which SAE features a language model activates, token by token.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"neuroscope {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Commands import their heavy parts (torch, mlx, transformers) only when they run, so that
    --help and --version answer at once, on any platform."""


# Command groups register themselves below (one import per module, alphabetical).
from neuroscope.cli import bench as _bench  # noqa: E402, F401
from neuroscope.cli import calibrate as _calibrate  # noqa: E402, F401
from neuroscope.cli import capture as _capture  # noqa: E402, F401
from neuroscope.cli import circuits as _circuits  # noqa: E402, F401
from neuroscope.cli import corpus as _corpus  # noqa: E402, F401
from neuroscope.cli import data as _data  # noqa: E402, F401
from neuroscope.cli import labels as _labels  # noqa: E402, F401
from neuroscope.cli import sae_train as _sae_train  # noqa: E402, F401
from neuroscope.cli import serve as _serve  # noqa: E402, F401
