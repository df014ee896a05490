"""``neuroscope labels``: generate (auto-interp), score, show, import-neuronpedia."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from neuroscope.cli import app
from neuroscope.cli.options import Model, Sae, SaeLayer, SaeLocalPath, SaePath, user_errors
from neuroscope.errors import ConfigError
from neuroscope.loading import DEFAULT_MODEL
from neuroscope.sae import DEFAULT_SAE_REPO

if TYPE_CHECKING:
    from neuroscope.labels.labeler import LabelerConfig, RetryPolicy, RunSummary

labels_app = typer.Typer(
    help="Feature labels: generate them (auto-interp), score them, show them, import Neuronpedia's.",
    no_args_is_help=True,
)
app.add_typer(labels_app, name="labels")

# ---- shared options ----------------------------------------------------------------------------------

Labeler = Annotated[
    str | None,
    typer.Option(
        "--labeler",
        help="Labeler model; labels are filed under its name (env LABELER_MODEL; default deepseek/deepseek-v3.2).",
    ),
]
LabelerBackend = Annotated[
    str | None,
    typer.Option(
        "--labeler-backend",
        help="auto, openrouter, anthropic, or the base URL of any OpenAI-compatible server (env LABELER_BACKEND; default auto).",
    ),
]
Concurrency = Annotated[
    int | None,
    typer.Option(
        "--concurrency",
        min=1,
        help="Requests in flight at once (default: 50 for OpenRouter/Anthropic, 2 for a server named by URL).",
    ),
]
MaxTokens = Annotated[
    int | None,
    typer.Option(
        "--max-tokens",
        min=1,
        help="Cap on each answer's tokens (default: 128 for a label, 256 for a detection answer; raise it for a model that thinks aloud).",
    ),
]
Timeout = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        min=1.0,
        help="Seconds to wait for one answer (default: 90 for OpenRouter/Anthropic, 300 for a server named by URL).",
    ),
]
Threshold = Annotated[
    float,
    typer.Option(
        "--threshold", min=0.0, max=1.0, help="Flag labels whose detection score is below this."
    ),
]


def sae_id_from_options(
    sae: str, sae_path: str | None, sae_local_path: str | None, layer: int
) -> str:
    """The SAE id feature records carry, from the CLI options, without loading anything.

    Must agree with ``neuroscope.session.load_saes``: a local SAE is named by its path.
    """
    from neuroscope.sae import resolve_sae_path, sae_id_for

    if sae_local_path:
        local = (
            sae_local_path.format(layer=layer) if "{layer}" in sae_local_path else sae_local_path
        )
        return str(Path(local).expanduser())
    return sae_id_for(sae, resolve_sae_path(sae_path, layer, sae))


def parse_features(text: str | None) -> list[int] | None:
    """'4521,3022,10-12' -> [4521, 3022, 10, 11, 12]."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out.extend(range(lo, hi + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise ConfigError(
                f"--features takes indices and ranges like 4521,3022,10-20; got {part!r}."
            ) from None
    if any(i < 0 for i in out):
        raise ConfigError("--features: feature indices are 0 or more.")
    return out


def _load_env() -> None:
    from neuroscope.labels.labeler import load_dotenv

    load_dotenv(Path.cwd() / ".env")


# ---- generate ----------------------------------------------------------------------------------------


@labels_app.command()
def generate(
    model: Model = DEFAULT_MODEL,
    sae: Sae = DEFAULT_SAE_REPO,
    sae_path: SaePath = None,
    sae_local_path: SaeLocalPath = None,
    sae_layer: SaeLayer = 20,
    corpus_path: Annotated[
        Path | None,
        typer.Option(
            "--corpus-path",
            help="Corpus folder (`neuroscope corpus build`) or text files; default: the default corpus, built if needed.",
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="Corpus samples to run through the model.")
    ] = 5000,
    examples_per_feature: Annotated[
        int,
        typer.Option(
            "--examples-per-feature",
            min=1,
            help="Top activating excerpts kept per feature (every 4th is held out for scoring).",
        ),
    ] = 20,
    labeler: Labeler = None,
    labeler_backend: LabelerBackend = None,
    concurrency: Concurrency = None,
    max_tokens: MaxTokens = None,
    timeout: Timeout = None,
    score: Annotated[
        bool,
        typer.Option(
            "--score/--no-score", help="Score each new label (detection) after labelling."
        ),
    ] = False,
    threshold: Threshold = 0.6,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", help="Also write the labels as a JSON object {index: label} to this file."
        ),
    ] = None,
    features: Annotated[
        str | None,
        typer.Option(
            "--features",
            help="Only these features, e.g. 0-99,4521 (default: every feature that fired).",
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option("--backend", help="Backend for the corpus pass: auto, torch or mlx.")
    ] = "auto",
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Corpus samples per forward pass.")
    ] = 8,
    max_length: Annotated[
        int,
        typer.Option("--max-length", min=2, help="Tokens per corpus sample (longer ones are cut)."),
    ] = 128,
    negatives: Annotated[
        int,
        typer.Option(
            "--negatives",
            min=0,
            help="Corpus excerpts run alone to give scoring its non-activating examples.",
        ),
    ] = 100,
    recollect: Annotated[
        bool,
        typer.Option("--recollect", help="Run the corpus pass again even if its examples exist."),
    ] = False,
) -> None:
    """Label features with an LLM: a corpus pass finds each feature's top excerpts (checkpointed, resumable),
    then one request per feature names it. Reruns skip what is done."""
    from neuroscope.labels import autointerp, corpus_pass, store
    from neuroscope.labels import examples as ex

    with user_errors():
        _load_env()
        # No key, no server, no model: fail now, before the corpus pass.
        config = _labeler(labeler_backend, labeler, max_tokens)
        policy = _policy(config, timeout)
        wanted = parse_features(features)
        sae_id = sae_id_from_options(sae, sae_path, sae_local_path, sae_layer)
        folder = ex.examples_dir(model, sae_id)
        settings = corpus_pass.PassSettings(samples=samples, examples_per_feature=examples_per_feature,
                                            max_length=max_length, batch_size=batch_size, negatives=negatives)  # fmt: skip
        if recollect or not corpus_pass.is_enough(ex.read_meta(folder), settings):
            from neuroscope.corpus import ensure_corpus
            from neuroscope.session import Session

            corpus = ensure_corpus(corpus_path, samples)
            typer.echo(
                f"Corpus pass: {corpus.samples} samples of {corpus.describe()} through {model}, layer {sae_layer}.",
                err=True,
            )
            session = Session(model=model, sae=sae, sae_path=sae_path, sae_local_path=sae_local_path,
                              layer=sae_layer, backend=backend, top_k=1)  # fmt: skip
            try:
                meta = corpus_pass.run_corpus_pass(
                    session, sae_layer, corpus, folder, settings, model=model
                )
            finally:
                session.close()
            typer.echo(
                f"Examples of {meta['samples']} samples ({meta['tokens']} tokens) in {folder}.",
                err=True,
            )
        labels_folder = store.autointerp_dir(config.model, model, sae_id)
        typer.echo(f"Labeler: {config.model} at {config.base_url}.", err=True)
        result = autointerp.generate_labels(
            folder, labels_folder, config, features=wanted, concurrency=concurrency, policy=policy
        )
        s = result.summary
        typer.echo(
            f"Labelled {s.done} features, {s.failed} failed"
            + (f" ({s.describe_failures()})" if s.failed else "")
            + f", {s.retries} retries, in {s.seconds:.0f} s ({_speed(s)}; {s.format} output); "
            f"{result.skipped_done} already done; {result.labelled_total} labels in {labels_folder}.",
            err=True,
        )
        if result.without_examples:
            typer.echo(
                f"{result.without_examples} of the requested features never fired in the corpus: not labelled.",
                err=True,
            )
        if s.failed:
            typer.echo(
                "Each failure and its reason is in labels.jsonl; run the same command again to "
                "retry the failed ones.",
                err=True,
            )
        labels = store.ok_labels(store.Journal(labels_folder / store.LABELS_FILE).load())
        if score:
            _score(labels, folder, labels_folder / store.SCORES_FILE, config, threshold,
                   concurrency, policy)  # fmt: skip
        if output is not None:
            from neuroscope.cache import write_json_atomic

            write_json_atomic(output, {str(i): t for i, t in sorted(labels.items())})
            typer.echo(f"Wrote {len(labels)} labels to {output}.", err=True)


def _labeler(backend: str | None, model: str | None, max_tokens: int | None) -> LabelerConfig:
    """The labeler's config, its model asked of the server when a URL was given without --labeler."""
    from dataclasses import replace

    from neuroscope.labels.labeler import discover_model, resolve_labeler

    config = discover_model(resolve_labeler(backend, model))
    return replace(config, max_tokens=max_tokens) if max_tokens else config


def _policy(config: LabelerConfig, timeout: float | None) -> RetryPolicy:
    from dataclasses import replace

    policy = config.default_policy()
    return replace(policy, timeout=timeout) if timeout else policy


def _speed(s: RunSummary) -> str:
    """'4.2 s per answer, 38 tok/s' -- the endpoint's speed as this run saw it."""
    from neuroscope.labels.labeler import rate

    text = f"{s.seconds_per_answer:.1f} s per answer" if s.done else "no answer"
    return text + (f", {rate(s.tokens, s.request_seconds)} tok/s" if s.tokens else "")


def _score(
    labels: dict[int, str],
    examples_folder: Path,
    scores_path: Path,
    config: LabelerConfig,
    threshold: float,
    concurrency: int | None,
    policy: RetryPolicy,
) -> None:
    from neuroscope.labels.scoring import score_labels

    result = score_labels(labels, examples_folder, scores_path, config, threshold=threshold,
                          concurrency=concurrency, policy=policy)  # fmt: skip
    s = result.summary
    typer.echo(
        f"Scored {s.done} labels, {s.failed} failed"
        + (f" ({s.describe_failures()})" if s.failed else "")
        + f" ({_speed(s)}); {result.skipped_done} already scored; "
        f"{result.insufficient} could not be scored (no held-out or non-activating excerpt).",
        err=True,
    )
    if result.scores:
        mean = sum(result.scores.values()) / len(result.scores)
        flagged = result.flagged
        typer.echo(
            f"Mean balanced accuracy {mean:.3f} over {len(result.scores)} labels; {len(flagged)} under {threshold}.",
            err=True,
        )
        if flagged:
            typer.echo(
                "Under the threshold: "
                + ", ".join(map(str, flagged[:30]))
                + (" ..." if len(flagged) > 30 else ""),
                err=True,
            )
    typer.echo(f"Scores in {scores_path}.", err=True)


# ---- score -------------------------------------------------------------------------------------------


def _labels_at(path: Path) -> tuple[dict[int, str], Path, Path | None]:
    """(labels, scores path beside them, examples folder named in their meta) from a labels path."""
    from neuroscope.labels import store

    path = path.expanduser()
    if path.is_dir():
        path = path / store.LABELS_FILE
    if not path.is_file():
        raise ConfigError(
            f"No labels at {path}. Give a labels.jsonl (or its folder) or a JSON {{index: label}} file."
        )
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            labels = {int(k): str(v) for k, v in data.items()}
        except (ValueError, AttributeError):
            raise ConfigError(f"{path} is not a JSON object of index -> label.") from None
        return labels, path.with_suffix(".scores.jsonl"), None
    labels = store.ok_labels(store.Journal(path).load())
    examples = store.read_meta(path.parent).get("examples")
    return labels, path.parent / store.SCORES_FILE, Path(examples) if examples else None


@labels_app.command("score")
def score_command(
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="labels.jsonl (or its folder) or a JSON {index: label} file; default: the newest labels of --model/--sae.",
        ),
    ] = None,
    labeler: Annotated[
        str | None,
        typer.Option(
            "--labeler",
            help="Model that does the detection test (env LABELER_MODEL; default deepseek/deepseek-v3.2).",
        ),
    ] = None,
    labeler_backend: LabelerBackend = None,
    threshold: Threshold = 0.6,
    concurrency: Concurrency = None,
    max_tokens: MaxTokens = None,
    timeout: Timeout = None,
    model: Model = DEFAULT_MODEL,
    sae: Sae = DEFAULT_SAE_REPO,
    sae_path: SaePath = None,
    sae_local_path: SaeLocalPath = None,
    sae_layer: SaeLayer = 20,
) -> None:
    """Detection scoring: show the labeler each label with a shuffled mix of activating and non-activating
    excerpts, ask which activate; store the balanced accuracy beside the label and flag low ones."""
    from neuroscope.labels import examples as ex
    from neuroscope.labels import store

    with user_errors():
        _load_env()
        config = _labeler(labeler_backend, labeler, max_tokens)
        sae_id = sae_id_from_options(sae, sae_path, sae_local_path, sae_layer)
        if labels is None:
            sets = store.find_label_sets(model, sae_id)
            if not sets:
                raise ConfigError(
                    f"No labels for {model} / {sae_id}. Run `neuroscope labels generate` first, or pass --labels."
                )
            labels = sets[0].folder
        found, scores_path, examples_folder = _labels_at(labels)
        if not found:
            raise ConfigError(f"{labels} holds no usable labels.")
        _score(
            found,
            examples_folder or ex.examples_dir(model, sae_id),
            scores_path,
            config,
            threshold,
            concurrency,
            _policy(config, timeout),
        )


# ---- show --------------------------------------------------------------------------------------------


@labels_app.command()
def show(
    features: Annotated[
        str, typer.Option("--features", help="Feature indices, e.g. 4521,3022,11612 or 100-110.")
    ],
    model: Model = DEFAULT_MODEL,
    sae: Sae = DEFAULT_SAE_REPO,
    sae_path: SaePath = None,
    sae_local_path: SaeLocalPath = None,
    sae_layer: SaeLayer = 20,
    labeler: Labeler = None,
    examples: Annotated[
        int, typer.Option("--examples", min=0, help="Top excerpts to show per feature.")
    ] = 3,
    neuronpedia_live: Annotated[
        bool | None,
        typer.Option(
            "--neuronpedia-live/--offline",
            help="Fetch missing labels from Neuronpedia now (and cache them) (env NEUROSCOPE_NEURONPEDIA_LIVE).",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per feature instead of text.")
    ] = False,
) -> None:
    """Label, source, score, firing rate and top excerpts of some features."""
    from neuroscope.labels import examples as ex
    from neuroscope.labels import store
    from neuroscope.labels.autointerp import one_line
    from neuroscope.labels.firing import firing_rates
    from neuroscope.labels.sources import LabelResolver, network_allowed_by_env

    with user_errors():
        indices = parse_features(features) or []
        sae_id = sae_id_from_options(sae, sae_path, sae_local_path, sae_layer)
        live = network_allowed_by_env() if neuronpedia_live is None else neuronpedia_live
        resolver = LabelResolver(model, {sae_layer: sae_id}, labeler=labeler, allow_network=live)
        for error in resolver.fetch_missing(sae_layer, indices):
            typer.secho(f"Neuronpedia: {error}", fg=typer.colors.YELLOW, err=True)
        rates = firing_rates(model, sae_id, sae_layer)
        found = ex.read_features(ex.examples_dir(model, sae_id), indices)
        label_set = resolver.label_set(sae_layer)
        scores = store.Journal(label_set.folder / store.SCORES_FILE).load() if label_set else {}
        for index in indices:
            label, source = resolver.label(sae_layer, index)
            score = scores.get(index) if source.startswith("autointerp") else None
            score = (
                score
                if score and score.get("status") == "ok" and score.get("label") == label
                else None
            )
            rate = rates.rate(index) if rates else None
            feature = found.get(index)
            if as_json:
                record = {"index": index, "label": label, "source": source,
                          "score": score["score"] if score else None, "firing_rate": rate,
                          "firing_rate_source": rates.source if rates else None,
                          "examples": [asdict(e) for e in feature.examples[:examples]] if feature else []}  # fmt: skip
                typer.echo(json.dumps(record, ensure_ascii=False))
                continue
            typer.secho(f"#{index}  {label}", bold=True)
            parts = [f"source: {source}"]
            if score:
                parts.append(
                    f"score: {score['score']:.2f}" + (" (low)" if score.get("flagged") else "")
                )
            parts.append(
                f"firing rate: {rate:.4%} ({rates.source})"
                if rate is not None and rates is not None
                else "firing rate: unknown (no calibration or corpus pass)"
            )
            typer.echo("  " + "   ".join(parts))
            for n, e in enumerate(feature.examples[:examples] if feature else [], start=1):
                typer.echo(f"  {n}. ({e.activation:.2f}) {one_line(e.marked())}")
        resolver.close()


# ---- import-neuronpedia ------------------------------------------------------------------------------


@labels_app.command("import-neuronpedia")
def import_neuronpedia(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Neuronpedia explanation exports (batch-*.jsonl.gz, or .jsonl)."),
    ] = None,
    download: Annotated[
        bool,
        typer.Option("--download", help="Download the SAE's whole export from Neuronpedia first."),
    ] = False,
    neuronpedia_id: Annotated[
        str | None,
        typer.Option(
            "--neuronpedia-id",
            help="Neuronpedia MODEL/SAE, e.g. gemma-2-2b/20-gemmascope-res-16k; default: mapped from the SAE options.",
        ),
    ] = None,
    sae: Sae = DEFAULT_SAE_REPO,
    sae_path: SaePath = None,
    sae_local_path: SaeLocalPath = None,
    sae_layer: SaeLayer = 20,
) -> None:
    """Load Neuronpedia's bulk explanation exports into the label cache (second in label priority)."""
    import tempfile

    from neuroscope.labels.neuronpedia import (
        NeuronpediaId,
        download_exports,
        import_exports,
        neuronpedia_id_for,
    )

    with user_errors():
        np_id = NeuronpediaId.parse(neuronpedia_id) if neuronpedia_id else None
        paths = list(files or [])
        if download and np_id is None:
            sae_id = sae_id_from_options(sae, sae_path, sae_local_path, sae_layer)
            np_id = neuronpedia_id_for(sae_id)
            if np_id is None:
                raise ConfigError(
                    f"No known Neuronpedia id for SAE {sae_id}; pass --neuronpedia-id MODEL/SAE."
                )
        with tempfile.TemporaryDirectory(prefix="neuronpedia-") as tmp:
            if download:
                assert np_id is not None
                typer.echo(f"Downloading Neuronpedia's explanations of {np_id} ...", err=True)
                downloaded = download_exports(np_id, Path(tmp))
                typer.echo(f"Downloaded {len(downloaded)} export batches.", err=True)
                paths += downloaded
            counts = import_exports(paths, np_id)
        for row_id, count in counts.items():
            typer.echo(f"Imported {count} Neuronpedia labels for {row_id}.")
        if not counts:
            typer.echo("No explanations found in those files.")
