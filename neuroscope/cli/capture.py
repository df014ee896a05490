"""``neuroscope capture``: every layer of one text (residuals, norms, logit lens, attention, SAE
features) written to a folder in open formats, with pictures if asked (docs/fmri.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from neuroscope.cli import app, options
from neuroscope.cli.options import say, user_errors
from neuroscope.errors import ConfigError
from neuroscope.loading import DEFAULT_MODEL
from neuroscope.sae import DEFAULT_SAE_REPO


def _layers(value: str) -> str | list[int]:
    if value.strip() == "all":
        return "all"
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--layers takes 'all' or numbers like 0,6,12, not {value!r}.") from None


@app.command("capture")
def capture(
    output: Annotated[
        Path, typer.Option("--output", help="Folder to write the capture into (created).")
    ],
    text: Annotated[
        str | None,
        typer.Option("--text", help="Raw text to capture, as it stands (no chat template)."),
    ] = None,
    messages: Annotated[
        Path | None,
        typer.Option(
            "--messages",
            help="A JSON file of OpenAI-style messages instead of --text (the chat template applies).",
        ),
    ] = None,
    layers: Annotated[
        str, typer.Option("--layers", help="Layers to capture: 'all' or a list such as 0,6,12.")
    ] = "all",
    attention: Annotated[
        bool,
        typer.Option(
            "--attention/--no-attention", help="Keep attention patterns [heads, T, T] per layer."
        ),
    ] = False,
    residual: Annotated[
        bool,
        typer.Option(
            "--residual/--no-residual", help="Keep the residuals [T, d] (norms are kept anyway)."
        ),
    ] = True,
    features: Annotated[
        bool,
        typer.Option("--features/--no-features", help="Keep the SAE records of the hooked layers."),
    ] = True,
    generate: Annotated[
        int, typer.Option("--generate", help="Greedy tokens to generate first and capture too.")
    ] = 0,
    lens_top: Annotated[
        int,
        typer.Option(
            "--lens-top",
            help="Logit-lens guesses per layer and token; 0: no lens (the costly part on a large "
            "vocabulary).",
        ),
    ] = 5,
    images: Annotated[
        bool,
        typer.Option(
            "--images", help="Also draw the views into OUTPUT/images (needs the [fmri] extra)."
        ),
    ] = False,
    image_layer: Annotated[
        int | None,
        typer.Option(
            "--image-layer",
            help="Layer of the attention, projection and feature pictures. Default: the SAE's.",
        ),
    ] = None,
    image_token: Annotated[
        int | None,
        typer.Option(
            "--image-token", help="Position whose attention heads are drawn. Default: the last."
        ),
    ] = None,
    projection: Annotated[
        str,
        typer.Option("--projection", help="umap (umap-learn; PCA if it is missing) or pca."),
    ] = "umap",
    clusters: Annotated[
        int, typer.Option("--clusters", help="k-means clusters that colour the projection.")
    ] = 4,
    demo: Annotated[
        bool,
        typer.Option(
            "--demo",
            help="Use the offline demo model and SAE (Session.demo()) instead of --model/--sae.",
        ),
    ] = False,
    model: options.Model = DEFAULT_MODEL,
    sae: options.Sae = DEFAULT_SAE_REPO,
    sae_path: options.SaePath = None,
    sae_local_path: options.SaeLocalPath = None,
    sae_release: options.SaeRelease = None,
    sae_id: options.SaeId = None,
    sae_layer: Annotated[
        int | None,
        typer.Option(
            "--sae-layer", help="Decoder block whose output the SAE reads. Default: the model's."
        ),
    ] = None,
    backend: options.Backend = "auto",
    dtype: options.DType = None,
    load_format: options.LoadFormat = "auto",
) -> None:
    """Capture one text through every layer and write it to OUTPUT: capture.safetensors (tensors),
    tokens/layers/lens/features.parquet (long-form tables), meta.json; see docs/fmri.md."""
    from neuroscope.session import Session

    with user_errors():
        if (text is None) == (messages is None):
            raise ConfigError("Give exactly one of --text and --messages.")
        if projection not in ("umap", "pca"):
            raise ConfigError(f"--projection is umap or pca, not {projection!r}.")
        chosen = _layers(layers)
        prompt: str | list = text if text is not None else _read_messages(messages)
        if demo:
            session = Session.demo(backend=backend, dtype=dtype)
        else:
            session = Session(
                model=model, sae=sae, sae_path=sae_path, sae_local_path=sae_local_path,
                sae_release=sae_release, sae_id=sae_id, layer=sae_layer, backend=backend,
                dtype=dtype, load_format=load_format,  # type: ignore[arg-type]
            )  # fmt: skip
        with session:
            say(f"Capturing {session.model_name} ({session.backend.info.num_layers} layers)...")
            result = session.capture(
                prompt, chosen, residual=residual, attention=attention, features=features,
                generate=generate, lens_top=lens_top,
            )  # fmt: skip
            folder = result.save(output)
            typer.echo(f"Wrote {folder} ({len(result)} tokens x {len(result.layers)} layers)")
            if images:
                layer = image_layer if image_layer is not None else session.layers[0]
                for path in _draw(
                    result, folder / "images", layer, image_token, projection, clusters
                ):
                    typer.echo(f"Wrote {path}")


def _read_messages(path: Path | None) -> list:
    assert path is not None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--messages {path}: not a readable JSON file ({e}).") from None
    if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
        raise ConfigError(f"--messages {path}: expected a JSON list of {{role, content}} objects.")
    return data


def _draw(
    result: object, folder: Path, layer: int, token: int | None, projection: str, clusters: int
) -> list[Path]:
    from neuroscope import capture_views as views
    from neuroscope.capture import Capture

    assert isinstance(result, Capture)
    folder.mkdir(parents=True, exist_ok=True)
    out = [views.norm_heatmap(result, folder / "norms.png")]
    if any(r.layer == layer for r in result.features):
        out.append(views.feature_heatmap(result, layer, folder / f"features_L{layer}.png"))
    if result.attention:
        at = token if token is not None else len(result) - 1
        out.append(
            views.attention_heads(result, layer, at, folder / f"attention_L{layer}_t{at}.png")
        )
    if result.residual:
        out.append(
            views.projection(
                result,
                layer,
                folder / f"projection_L{layer}.png",
                method="pca" if projection == "pca" else "umap",
                clusters=clusters,
            )
        )
    return out
