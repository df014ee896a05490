"""What a capture costs (docs/fmri.md): time and memory of Session.capture over every layer.

    python benchmarks/bench_capture.py --model google/gemma-2-2b --load-format dummy \
        --dtype float32 --tokens 128 --tokens 512

For each length: one capture of residuals (no lens, no attention), one with attention, and the
logit lens alone (timed as the difference of a capture with it); the sizes of what is kept, and the
process's peak resident memory. Prints one line per figure; nothing is asserted.
"""

from __future__ import annotations

import resource
import time
from typing import Annotated

import numpy as np
import typer

from neuroscope.capture import layer_cosines, layer_norms


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def main(
    model: Annotated[
        str, typer.Option(help="Model (repo id, folder, preset).")
    ] = "google/gemma-2-2b",
    load_format: Annotated[str, typer.Option(help="auto or dummy.")] = "dummy",
    dtype: Annotated[str, typer.Option(help="Model dtype.")] = "float32",
    backend: Annotated[str, typer.Option(help="torch or mlx.")] = "torch",
    tokens: Annotated[list[int] | None, typer.Option(help="Sequence lengths (repeatable).")] = None,
    lens_top: Annotated[int, typer.Option(help="Logit-lens tokens per layer.")] = 5,
) -> None:
    from neuroscope.session import Session

    lengths = tokens or [128]
    start = time.perf_counter()
    session = Session(
        model=model,
        load_format=load_format,
        dtype=dtype,
        backend=backend,  # type: ignore[arg-type]
    )
    info = session.backend.info
    print(f"load {time.perf_counter() - start:.1f} s; {info.num_layers} layers, d {info.hidden_size}, "
          f"vocab {info.vocab_size}; peak RSS {_rss_gib():.2f} GiB")  # fmt: skip
    rng = np.random.default_rng(0)
    for T in lengths:
        ids = [2, *rng.integers(10, info.vocab_size, T - 1).tolist()]
        for attention, lens in ((False, 0), (True, 0), (False, lens_top)):
            t0 = time.perf_counter()
            forward = session.backend.capture(
                ids, list(range(info.num_layers)), attention=attention, lens_top=lens
            )
            seconds = time.perf_counter() - t0
            kept = sum(a.nbytes for a in forward.residuals.values())
            kept_attn = sum(a.nbytes for a in forward.attention.values())
            print(
                f"T {T}: attention {attention!s:5} lens {lens}: {seconds:.1f} s; residuals "
                f"{kept / 2**20:.0f} MiB, attention {kept_attn / 2**20:.0f} MiB; "
                f"peak RSS {_rss_gib():.2f} GiB"
            )
            del forward
        residuals = [np.zeros((T, info.hidden_size), np.float32)] * info.num_layers
        t0 = time.perf_counter()
        layer_norms(residuals), layer_cosines(residuals)
        print(f"T {T}: norms and cosines on the host {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    typer.run(main)
