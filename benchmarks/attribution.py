"""The cost of one exact attribution (``Session.attribute``) next to a plain forward pass, in CPU
time of one torch thread (robust on a shared machine):

    python -m benchmarks.attribution --model google/gemma-2-2b-it --load-format dummy --layer 20
    python -m benchmarks.attribution --tiny           # the tiny random Gemma 2 of the tests

An attribution is one uncached eager forward pass over blocks 0..layer with hooks, plus small
projections per block (float64). The SAE is random (its cost is one column of W_enc).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

TEXT = (
    "The capital of France is Paris. Paris is a city on the Seine, known for art and food. "
    "The capital of Germany is Berlin; Rome is the capital of Italy. "
)


def main(
    model: Annotated[str, typer.Option(help="Model id/folder/.gguf (with --load-format).")] = "",
    load_format: Annotated[str, typer.Option(help="auto, or dummy (real shapes).")] = "auto",
    layer: Annotated[int, typer.Option(help="The SAE's block.")] = 2,
    tokens: Annotated[int, typer.Option(help="Length of the text in tokens (about).")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed runs of each.")] = 5,
    tiny: Annotated[bool, typer.Option(help="Use the tests' tiny random Gemma 2.")] = False,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
) -> None:
    """Print the median CPU ms of a forward pass and of an attribution."""
    import torch

    from neuroscope import Session
    from neuroscope.loading import resolve_model
    from neuroscope.synthetic import build_random_sae, build_tiny_gemma2

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        if tiny:
            model = str(build_tiny_gemma2(Path(tmp) / "tiny"))
        resolved = resolve_model(model, load_format)  # type: ignore[arg-type]
        import json

        hidden = json.loads((Path(resolved.path) / "config.json").read_text())
        hidden = hidden.get("text_config", hidden)["hidden_size"]
        sae = build_random_sae(Path(tmp) / "sae", d_model=hidden, width=1024)
        with Session(
            model=model, sae_local_path=str(sae["npz"]), layer=layer, backend="torch",
            dtype="float32", load_format=load_format,  # type: ignore[arg-type]
        ) as s:  # fmt: skip
            ids = s.tokenizer.encode_text(TEXT * 40)[:tokens]
            text = s.tokenizer.tokenizer.decode(ids, skip_special_tokens=True)
            ids = s.tokenizer.encode_text(text)
            position = len(ids) - 1

            def timed(fn: object) -> list[float]:
                out = []
                for _ in range(repeats + 1):
                    start = time.process_time()
                    fn()  # type: ignore[operator]
                    out.append(time.process_time() - start)
                return out[1:]  # the first warms up

            forward = timed(lambda: s.backend.forward_reference(ids, [layer]))
            attribute = timed(lambda: s.attribute(text, layer, 3, position))
    name = "tiny Gemma 2" if tiny else f"{model} ({load_format})"
    typer.echo(f"{name}, layer {layer}, {len(ids)} tokens, {threads} thread(s):")
    typer.echo(f"  plain forward pass        {statistics.median(forward) * 1000:9.1f} ms CPU")
    typer.echo(f"  attribution (eager pass)  {statistics.median(attribute) * 1000:9.1f} ms CPU")


if __name__ == "__main__":
    typer.run(main)
