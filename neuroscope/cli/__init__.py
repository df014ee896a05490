"""The ``neuroscope`` command. Each command group lives in its own module and is registered here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="neuroscope",
    help="Watch which SAE features a language model activates, token by token.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# Command groups register themselves below (one import per module, alphabetical).
from neuroscope.cli import bench as _bench  # noqa: E402, F401
from neuroscope.cli import calibrate as _calibrate  # noqa: E402, F401
from neuroscope.cli import corpus as _corpus  # noqa: E402, F401
from neuroscope.cli import data as _data  # noqa: E402, F401
from neuroscope.cli import labels as _labels  # noqa: E402, F401
from neuroscope.cli import serve as _serve  # noqa: E402, F401
