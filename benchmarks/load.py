"""Load through the real server: concurrent streaming chats at several concurrency levels.

Starts Neuroscope's server in this process (``BackgroundServer``: the same engine and HTTP servers
as ``neuroscope serve``) with a random SAE of ``--width`` features at ``--layer``, once per
``--max-batch`` value, and for each concurrency level sends that many streaming chats at once
with the official ``openai`` client (greedy, ``--max-tokens`` each). Per level:

- aggregate tok/s: all completion tokens / the level's wall time (first request sent to last done);
  with ``--rounds N`` each of the level's clients sends N requests in turn, so replies that end
  early are followed by others instead of leaving the batch to shrink (a steady load);
- per-request tok/s: a request's completion tokens / its whole wall time (median);
- time to first token (TTFT): median and worst, from sending to the first content chunk;
- the CPU time this process spent on the level (server and clients, when the server runs here)
  and tokens per CPU second: steadier than wall-clock figures on a machine shared with other work.

    python -m benchmarks.load --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --layer 15 \\
        --max-batch 1 --max-batch 8 --levels 1,2,4,8 --output load.json

(``--backend mlx`` for the MLX backend.) ``--repeat N`` runs every level N times, the levels in
turn, and prints each level's median aggregate and its ratio to the lowest level.

``--url`` measures a server that is already running instead (``--max-batch`` is then whatever it
was started with; the CPU figures then count only the clients). Figures are wall-clock: on a shared
machine other work inflates them. ``--threads 1`` keeps torch to one thread: where other jobs take
cores, a second OpenMP thread that is descheduled stalls every parallel operation.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

# Each asks for more than the default --max-tokens (SmolLM2-135M-Instruct, greedy: all 8 run to
# 128 tokens), so every reply of a level runs to the end and the batch does not shrink as short
# replies finish: the levels then compare the server, not the prompts' answer lengths. (Two of an
# earlier set ended at 37 and 44 tokens: 849 of 1,024 tokens at 8, the ratio ~15 % lower.)
PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "Tell me the history of Paris, the capital of France.",
    "List ten uses of a paperclip and explain each one.",
    "Describe a cat to someone who has never seen one.",
    "How do airplanes stay in the air?",
    "Give me a recipe for pancakes.",
    "What is a neural network?",
]


def run_level(
    base_url: str, model: str, level: int, max_tokens: int, rounds: int = 1
) -> dict[str, Any]:
    """``level`` clients at once, each sending ``rounds`` streaming chats one after another (so
    ``level`` requests are in flight until the first client is done); their timings."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="-", max_retries=0, timeout=600)
    barrier = threading.Barrier(level)
    results: list[list[dict[str, float]]] = [[] for _ in range(level)]

    def chat(i: int) -> None:
        barrier.wait()
        for r in range(rounds):
            sent = time.perf_counter()
            first = None
            prompt = PROMPTS[(i + r * level) % len(PROMPTS)]
            stream = client.chat.completions.create(
                model=model, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=0,
            )  # fmt: skip
            tokens = 0
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            done = time.perf_counter()
            results[i].append(
                {"sent": sent, "first": first or done, "done": done, "tokens": tokens}
            )

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(level)]
    cpu = time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = time.process_time() - cpu  # this process's: the server's, when it runs here, + clients'
    requests = [r for mine in results for r in mine]
    wall = max(r["done"] for r in requests) - min(r["sent"] for r in requests)
    ttft = [r["first"] - r["sent"] for r in requests]
    per_request = [r["tokens"] / (r["done"] - r["sent"]) for r in requests]
    total = sum(int(r["tokens"]) for r in requests)
    return {
        "concurrency": level,
        "rounds": rounds,
        "requests": len(requests),
        "completion_tokens": total,
        "wall_s": round(wall, 3),
        "aggregate_tok_s": round(total / wall, 2),
        "per_request_tok_s_median": round(statistics.median(per_request), 2),
        "ttft_s_median": round(statistics.median(ttft), 3),
        "ttft_s_worst": round(max(ttft), 3),
        "process_cpu_s": round(cpu, 3),
        "tok_per_process_cpu_s": round(total / cpu, 2) if cpu > 0 else None,
    }


def measure(
    base_url: str,
    model: str,
    levels: list[int],
    max_tokens: int,
    rounds: int = 1,
    repeat: int = 1,
) -> list[dict[str, Any]]:
    """Every level ``repeat`` times, the levels taken in turn (1, 8, 1, 8, ...) so that a slow
    spell of a shared machine falls on all of them; one row per run."""
    run_level(base_url, model, 1, 4)  # warm-up: first-call costs out of the figures
    rows = []
    for _ in range(repeat):
        for level in levels:
            row = run_level(base_url, model, level, max_tokens, rounds)
            typer.echo(json.dumps(row))
            rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per level: the median of its runs' aggregate tok/s, and that over the lowest level's."""
    by_level: dict[int, list[float]] = {}
    for row in rows:
        by_level.setdefault(row["concurrency"], []).append(row["aggregate_tok_s"])
    medians = {level: statistics.median(rates) for level, rates in by_level.items()}
    base = medians[min(medians)]
    return [
        {
            "concurrency": level,
            "runs": len(by_level[level]),
            "aggregate_tok_s_median": round(rate, 2),
            "vs_lowest_level": round(rate / base, 2),
        }
        for level, rate in sorted(medians.items())
    ]


def _echo(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for line in summary:
        typer.echo(json.dumps({"summary": line}))
    return summary


def main(
    model: Annotated[
        str, typer.Option(help="Model folder or .gguf file (or its served name with --url).")
    ],
    layer: Annotated[int, typer.Option(help="Block whose output the random SAE reads.")] = 15,
    width: Annotated[int, typer.Option(help="Features of the random SAE.")] = 16384,
    max_batch: Annotated[
        list[int] | None, typer.Option(help="--max-batch of the server; repeat to compare.")
    ] = None,
    levels: Annotated[str, typer.Option(help="Concurrency levels, comma-separated.")] = "1,2,4,8",
    max_tokens: Annotated[int, typer.Option(help="Completion tokens asked per request.")] = 128,
    rounds: Annotated[
        int,
        typer.Option(
            help="Requests each client sends one after another (1: one burst of --levels "
            "requests; more: the server stays loaded while early replies end)."
        ),
    ] = 1,
    repeat: Annotated[
        int,
        typer.Option(
            help="Runs of every level, taken in turn; the summary gives each level's median."
        ),
    ] = 1,
    url: Annotated[str | None, typer.Option(help="Measure this running server instead.")] = None,
    output: Annotated[Path | None, typer.Option(help="Write the figures here as JSON.")] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="torch threads of the server (default: torch's, one per core)."),
    ] = None,
    backend_name: Annotated[
        str, typer.Option("--backend", help="Backend of the server: torch or mlx.")
    ] = "torch",
) -> None:
    """Print one JSON line per level; write them all to --output."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    wanted = [int(n) for n in levels.split(",") if n.strip()]
    report: dict[str, Any] = {
        "model": model,
        "levels": wanted,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "repeat": repeat,
        "threads": threads,
        "backend": backend_name,
        "runs": [],
    }
    if url is not None:
        rows = measure(url, model, wanted, max_tokens, rounds, repeat)
        report["runs"].append({"url": url, "rows": rows, "summary": _echo(summarize(rows))})
    else:
        from neuroscope import Session
        from neuroscope.loading import resolve_model
        from neuroscope.server.run import BackgroundServer, ServeConfig
        from neuroscope.synthetic import build_random_sae

        with tempfile.TemporaryDirectory() as tmp:
            hidden = json.loads((resolve_model(model).path / "config.json").read_text())[
                "hidden_size"
            ]
            sae = build_random_sae(tmp, d_model=hidden, width=width)
            for batch in max_batch or [1]:

                def load() -> Session:
                    return Session(
                        model=model, sae_local_path=str(sae["npz"]), layer=layer,
                        backend=backend_name, dtype="float32",
                    )  # fmt: skip

                config = ServeConfig(port=0, features_port=0, max_batch=batch)
                server = BackgroundServer(load, config).start(timeout=600)
                try:
                    assert server.listening is not None
                    typer.echo(f"--max-batch {batch}")
                    served = server.engine.info.model_name if server.engine else model
                    rows = measure(
                        server.listening.chat_url, served, wanted, max_tokens, rounds, repeat
                    )
                finally:
                    server.stop()
                report["runs"].append(
                    {"max_batch": batch, "width": width, "rows": rows,
                     "summary": _echo(summarize(rows))}
                )  # fmt: skip
    if output is not None:
        output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    typer.run(main)
