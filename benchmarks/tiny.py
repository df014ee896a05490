"""Build the tiny test model and its SAE in a folder, for benchmarking without any download.

    python -m benchmarks.tiny /tmp/neuroscope-tiny
    # -> /tmp/neuroscope-tiny/model (Hugging Face layout), /tmp/neuroscope-tiny/sae/gemma_scope/params.npz

The same random Gemma 2 (4 blocks, d=64, sliding window 8) and JumpReLU SAE (width 128) the tests use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroscope.synthetic import build_random_sae, build_tiny_gemma2


def main(folder: Annotated[Path, typer.Argument(help="Where to write model/ and sae/.")]) -> None:
    """Write the tiny model and its SAE; print their paths."""
    model = build_tiny_gemma2(folder / "model")
    sae = build_random_sae(folder / "sae", d_model=64, width=128)
    typer.echo(f"model {model}\nsae   {sae['npz']}")


if __name__ == "__main__":
    typer.run(main)
