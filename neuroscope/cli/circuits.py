"""``neuroscope circuits``: why features fire. ``map``: the virtual weights between two layers' SAEs
(weight space, no model loaded; docs/why.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroscope.cli import app, options
from neuroscope.cli.options import say, user_errors
from neuroscope.errors import ConfigError
from neuroscope.sae import DEFAULT_SAE_REPO

circuits_app = typer.Typer(
    help="Why features fire: the causal map between layers' SAEs.", no_args_is_help=True
)
app.add_typer(circuits_app, name="circuits")


@circuits_app.command("map")
def map_command(
    from_layer: Annotated[
        int, typer.Option("--from-layer", help="The earlier layer (its SAE's decoder).")
    ],
    to_layer: Annotated[
        int, typer.Option("--to-layer", help="The later layer (its SAE's encoder).")
    ],
    feature: Annotated[
        int | None,
        typer.Option(
            "--feature",
            help="A feature of --from-layer (--direction out) or of --to-layer (--direction in). "
            "Default: the strongest pairs overall.",
        ),
    ] = None,
    direction: Annotated[
        str,
        typer.Option(
            "--direction",
            help="out: what --feature drives in --to-layer; in: what drives it from --from-layer.",
        ),
    ] = "out",
    top: Annotated[int, typer.Option("--top", help="How many weights to list.")] = 20,
    output_format: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    output: Annotated[
        Path | None,
        typer.Option("--output", help="Write the csv/json to this file instead of stdout."),
    ] = None,
    sae: options.Sae = DEFAULT_SAE_REPO,
    sae_path: options.SaePath = None,
    sae_local_path: options.SaeLocalPath = None,
    sae_norm_scaling_factor: options.SaeNormScalingFactor = None,
) -> None:
    """The virtual weights W_dec(from) @ W_enc(to): how much one unit of a feature written into
    the residual stream at --from-layer moves each --to-layer feature's pre-activation (sign kept:
    excite > 0, inhibit < 0). Give the SAEs with '{layer}' in --sae-path or --sae-local-path."""
    from neuroscope.attribution import feature_map
    from neuroscope.session import load_saes

    with user_errors():
        if output_format not in ("table", "csv", "json"):
            raise ConfigError(f"--format is table, csv or json, not {output_format!r}.")
        if direction not in ("out", "in"):
            raise ConfigError(f"--direction is out or in, not {direction!r}.")
        say(f"Loading the SAEs of layers {from_layer} and {to_layer}...")
        saes = load_saes(
            [from_layer, to_layer], sae=sae, sae_path=sae_path, sae_local_path=sae_local_path,
            norm_scaling_factor=sae_norm_scaling_factor,
        )  # fmt: skip
        result = feature_map(
            saes[from_layer], saes[to_layer], from_layer, to_layer, feature=feature, top=top,
            direction=direction,  # type: ignore[arg-type]
        )  # fmt: skip
        if output_format == "table":
            for e in result.entries:
                typer.echo(
                    f"L{e.from_layer}/{e.source:<6} -> L{e.to_layer}/{e.target:<6} "
                    f"{e.weight:+.6f}  {e.effect}"
                )
            return
        text = result.to_csv() if output_format == "csv" else result.to_json() + "\n"
        if output is None:
            typer.echo(text, nl=False)
        else:
            output.write_text(text)
            say(f"Wrote {output} ({len(result.entries)} weights)")
