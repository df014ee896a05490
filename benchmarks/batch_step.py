"""CPU time of one batched decode step (torch), per batch size: robust on a machine shared with
other work, where wall-clock load figures (benchmarks/load.py) swing with everyone else's jobs.

One torch thread, the process's CPU time per step (so no waiting counts), greedy, with a random
SAE of ``--width`` features at ``--layer``; tokens per CPU second = batch / step time:

    python -m benchmarks.batch_step --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --layer 15
    python -m benchmarks.batch_step --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --backend mlx
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from typing import Annotated

import typer


def main(
    model: Annotated[str, typer.Option(help="Model folder or .gguf file.")],
    layer: Annotated[int, typer.Option(help="Block whose output the SAE reads.")] = 15,
    width: Annotated[int, typer.Option(help="Features of the random SAE.")] = 16384,
    batches: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,2,4,8",
    steps: Annotated[int, typer.Option(help="Decode steps timed per batch size.")] = 16,
    prompt_tokens: Annotated[int, typer.Option(help="Tokens of each (random) prompt.")] = 32,
    backend_name: Annotated[
        str, typer.Option("--backend", help="torch (one thread) or mlx.")
    ] = "torch",
    load_format: Annotated[
        str, typer.Option(help="auto, or dummy (random weights: a preset name or a folder).")
    ] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    clock: Annotated[
        str, typer.Option(help="cpu (process time, for a shared CPU) or wall (on a GPU).")
    ] = "cpu",
) -> None:
    """Print one JSON line per batch size: median CPU ms per step, tokens per CPU second."""
    import numpy as np

    from neuroscope import Session
    from neuroscope.backend import SamplingParams
    from neuroscope.loading import resolve_model
    from neuroscope.synthetic import build_random_sae

    if backend_name == "torch":
        import torch

        torch.set_num_threads(1)
    greedy = SamplingParams(temperature=0.0)
    # decode_batch returns host features: the wall clock includes the device's work
    now = time.process_time if clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        path = resolve_model(model, load_format).path  # type: ignore[arg-type]
        hidden = json.loads((path / "config.json").read_text())["hidden_size"]
        sae = build_random_sae(tmp, d_model=hidden, width=width)
        with Session(
            model=model, sae_local_path=str(sae["npz"]), layer=layer, backend=backend_name,
            dtype=dtype, load_format=load_format,  # type: ignore[arg-type]
        ) as s:  # fmt: skip
            backend = s.backend
            vocab = backend.info.vocab_size
            rng = np.random.default_rng(0)
            base = None
            for size in [int(n) for n in batches.split(",")]:
                seqs = []
                for _ in range(size):
                    seq = backend.start(rng.integers(10, vocab, prompt_tokens).tolist(), greedy)  # type: ignore[attr-defined]
                    while backend.prefill_chunk(seq, prompt_tokens) is None:  # type: ignore[attr-defined]
                        pass
                    seqs.append(seq)
                times = []
                for _ in range(steps + 2):
                    tokens = [backend.sample_sequence(q) for q in seqs]  # type: ignore[attr-defined]
                    start = now()
                    backend.decode_batch(seqs, tokens)  # type: ignore[attr-defined]
                    times.append(now() - start)
                step = statistics.median(times[2:])
                rate = size / step
                base = base or rate
                print(json.dumps({
                    "batch": size, "clock": clock, "cpu_ms_per_step": round(step * 1000, 2),
                    "tok_per_cpu_s": round(rate, 1), "vs_batch_1": round(rate / base, 2),
                }))  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
