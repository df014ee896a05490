"""The cost of steering per decode step, in CPU time: robust on a machine shared with other work.

``neuroscope bench --steering`` measures wall-clock time, which other processes inflate at random on a
busy machine. This measures the process's CPU time of each decode step (one torch thread, so no
thread waits count), alternating unsteered and steered sequences on one loaded model:

    python -m benchmarks.steering_step --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --layer 15

The steered sequences carry ``neuroscope.bench.default_steering`` (a feature add, an ablation and a
monitor at the SAE's layer). The SAE is random (``--width`` features); the cost does not depend on
what it learned.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Annotated

import typer

from neuroscope.backend import SamplingParams
from neuroscope.bench import DEFAULT_PROMPT, default_steering


def main(
    model: Annotated[str, typer.Option(help="Model folder or .gguf file.")],
    layer: Annotated[
        int, typer.Option(help="Block whose output the SAE reads and steering edits.")
    ],
    width: Annotated[int, typer.Option(help="Features of the random SAE.")] = 4096,
    steps: Annotated[int, typer.Option(help="Decode steps per sequence.")] = 16,
    rounds: Annotated[int, typer.Option(help="Unsteered + steered sequence pairs.")] = 4,
) -> None:
    """Print the median and fastest CPU time per decode step, unsteered and steered."""
    import torch

    from neuroscope import Session
    from neuroscope.loading import resolve_model
    from neuroscope.synthetic import build_random_sae

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        hidden = _hidden_size(resolve_model(model).path)
        sae = build_random_sae(tmp, d_model=hidden, width=width)
        with Session(
            model=model, sae_local_path=str(sae["npz"]), layer=layer, backend="torch",
            dtype="float32",
        ) as s:  # fmt: skip
            ids = s.encode(DEFAULT_PROMPT)
            compiled = default_steering(s).compile({layer: s.saes[layer].W_dec}, len(ids))
            greedy = SamplingParams(temperature=0.0)

            def sequence(steering: object, n: int) -> list[float]:
                s.backend.prefill(ids, greedy, steering)  # type: ignore[arg-type]
                token = s.backend.sample()
                times = []
                for _ in range(n):
                    start = time.process_time()
                    s.backend.decode(token)
                    token = s.backend.sample()
                    times.append(time.process_time() - start)
                return times

            sequence(None, 4), sequence(compiled, 4)  # warm-up
            plain: list[float] = []
            steered: list[float] = []
            for _ in range(rounds):
                plain += sequence(None, steps)
                steered += sequence(compiled, steps)
    for name, times in (("instrumented", plain), ("instrumented + steering", steered)):
        typer.echo(
            f"{name:<26} median {statistics.median(times) * 1000:7.2f} ms CPU/step, "
            f"fastest {min(times) * 1000:7.2f} ms ({len(times)} steps)"
        )
    extra = statistics.median(steered) - statistics.median(plain)
    typer.echo(
        f"steering adds {extra * 1000:+.2f} ms per step "
        f"({extra / statistics.median(plain) * 100:+.1f}%, medians)"
    )


def _hidden_size(model_dir: object) -> int:
    import json
    from pathlib import Path

    config = json.loads((Path(str(model_dir)) / "config.json").read_text())
    return int(config.get("text_config", config)["hidden_size"])


if __name__ == "__main__":
    typer.run(main)
