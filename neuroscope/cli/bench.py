"""``neuroscope bench``: what instrumentation costs on this machine, as a table and as JSON."""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from neuroscope import bench
from neuroscope.cache import write_json_atomic
from neuroscope.cli import app, options
from neuroscope.cli.options import say, user_errors
from neuroscope.loading import DEFAULT_MODEL
from neuroscope.sae import DEFAULT_SAE_REPO


def _command_line(ctx: typer.Context) -> list[str]:
    """The command that reproduces this run: every option that differs from its default."""
    args = ["neuroscope", ctx.info_name or "bench"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if param.param_type_name != "option" or value == param.default or value is None:
            continue
        flag = param.opts[0]
        if isinstance(value, bool):
            args.append(flag if value else (param.secondary_opts or [flag])[0])
        else:
            args += [flag, str(value)]
    return args


@app.command("bench")
def bench_command(
    ctx: typer.Context,
    model: options.Model = DEFAULT_MODEL,
    sae: options.Sae = DEFAULT_SAE_REPO,
    sae_path: options.SaePath = None,
    sae_local_path: options.SaeLocalPath = None,
    random_sae: Annotated[
        bool,
        typer.Option(
            "--random-sae",
            help="Use a random JumpReLU SAE of --random-sae-width features (for models without one).",
        ),
    ] = False,
    random_sae_width: Annotated[
        int, typer.Option("--random-sae-width", help="Features of the --random-sae SAE.")
    ] = 16384,
    sae_layer: options.SaeLayer = 20,
    top_k: Annotated[int, typer.Option("--top-k", help="Features reported per token.")] = 10,
    backend: options.Backend = "auto",
    dtype: options.DType = None,
    load_format: options.LoadFormat = "auto",
    prompt: Annotated[
        str, typer.Option("--prompt", help="The user turn (the chat template is applied).")
    ] = bench.DEFAULT_PROMPT,
    tokens: Annotated[
        int, typer.Option("--tokens", help="Tokens generated per run (greedy, stops ignored).")
    ] = 32,
    rounds: Annotated[
        int,
        typer.Option("--rounds", help="Rounds; each runs every mode once, in a rotating order."),
    ] = 5,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Untimed rounds first (8 tokens each).")
    ] = 1,
    subscribers: Annotated[
        int,
        typer.Option(
            "--subscribers", help="Hub subscribers for the fan-out mode (0 leaves the mode out)."
        ),
    ] = 4,
    steering: Annotated[
        bool,
        typer.Option(
            "--steering",
            help="Also time a steered mode: a feature add, an ablation and a monitor at the SAE "
            "layer (the per-step cost of steering).",
        ),
    ] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the full report here as JSON.")
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", help="Print only the table, not each round.")
    ] = False,
) -> None:
    """Measure what watching features costs on this machine.

    Decode and prefill speed with and without the SAE (and with the hub fanning out to
    subscribers), time to first token, SAE encode time and peak memory: every mode on one loaded
    model, alternately, so that the overhead is measured free of drift. See docs/benchmarks.md.
    """
    from neuroscope.session import Session

    log = bench._quiet if quiet else say
    with user_errors(), tempfile.TemporaryDirectory(prefix="neuroscope-bench-") as tmp:
        bench.check_arguments(tokens=tokens, rounds=rounds, subscribers=subscribers, warmup=warmup)
        if random_sae and (sae_local_path or sae_path):
            raise typer.BadParameter("--random-sae replaces --sae-path and --sae-local-path.")
        local = sae_local_path
        if random_sae:
            local = bench.write_random_sae(model, load_format, tmp, random_sae_width)
        log(f"Loading {model} ({backend} backend)…")
        with Session(
            model=model, sae=sae, sae_path=sae_path, sae_local_path=local, layer=sae_layer,
            backend=backend, top_k=top_k, dtype=dtype, load_format=load_format,  # type: ignore[arg-type]
        ) as session:  # fmt: skip
            report = bench.run_bench(
                session, prompt=prompt, tokens=tokens, rounds=rounds, subscribers=subscribers,
                warmup=warmup, log=log,
                steering=bench.default_steering(session) if steering else None,
            )  # fmt: skip
        report.command = _command_line(ctx)
        typer.echo(bench.format_table(report))
        typer.echo("command: " + shlex.join(report.command))
        if json_path is not None:
            write_json_atomic(json_path, report.to_dict())
            log(f"Wrote {json_path}")
