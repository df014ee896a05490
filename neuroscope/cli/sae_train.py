"""``neuroscope sae train``: train an SAE on a model's residual stream; the output loads with
``--sae-local-path``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroscope.cli.data import sae_app
from neuroscope.cli.options import say, user_errors
from neuroscope.sae_train import TrainOptions


@sae_app.command("train")
def sae_train(
    model: Annotated[str, typer.Option("--model", help="Hub repo id, model folder or .gguf file.")],
    layer: Annotated[
        int, typer.Option("--layer", help="Decoder block whose output the SAE reads (0-based).")
    ],
    corpus: Annotated[
        Path,
        typer.Option(
            "--corpus",
            help="Training text: a folder from `neuroscope corpus build`, or local .txt/.jsonl/.parquet files.",
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder to write the SAELens SAE into.")
    ],
    eval_corpus: Annotated[
        Path | None,
        typer.Option(
            "--eval-corpus",
            help="Held-out text for the final evaluation. Default: --eval-fraction of --corpus's documents, kept out of training.",
        ),
    ] = None,
    architecture: Annotated[
        str, typer.Option("--architecture", help="topk (sparsify) or jumprelu.")
    ] = "topk",
    width: Annotated[int, typer.Option("--width", help="Number of latents.")] = 4096,
    k: Annotated[
        int,
        typer.Option("--k", help="TopK: latents kept per token. JumpReLU: the target mean L0."),
    ] = 32,
    context: Annotated[
        int, typer.Option("--context", help="Tokens per context (BOS included, never trained on).")
    ] = 256,
    epochs: Annotated[
        float, typer.Option("--epochs", help="Passes over the stored training activations.")
    ] = 4.0,
    batch_tokens: Annotated[
        int, typer.Option("--batch-tokens", help="Activations per optimiser step.")
    ] = 4096,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr", help="Learning rate. Default: sparsify's, 5e-3 / sqrt(width / 16384)."
        ),
    ] = None,
    eval_fraction: Annotated[
        float,
        typer.Option("--eval-fraction", help="Share of documents held out when no --eval-corpus."),
    ] = 0.1,
    max_train_tokens: Annotated[
        int | None, typer.Option("--max-train-tokens", help="Train on at most this many tokens.")
    ] = None,
    max_eval_tokens: Annotated[
        int | None,
        typer.Option("--max-eval-tokens", help="Evaluate on at most this many held-out tokens."),
    ] = None,
    loss_contexts: Annotated[
        int,
        typer.Option(
            "--loss-contexts",
            help="Held-out contexts on which the next-token loss is measured with the SAE spliced in.",
        ),
    ] = 64,
    weights_dtype: Annotated[
        str, typer.Option("--weights-dtype", help="float16 or float32 for the saved weights.")
    ] = "float16",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split, shuffle and init.")] = 0,
    log_every: Annotated[
        int, typer.Option("--log-every", help="Steps between progress lines.")
    ] = 50,
    save_every: Annotated[
        int, typer.Option("--save-every", help="Steps between checkpoints.")
    ] = 200,
    harvest_only: Annotated[
        bool,
        typer.Option(
            "--harvest-only",
            help="Only store the activations, then stop. Run the same command with it in other "
            "terminals to share the model passes with the training run (one CPU thread each works best).",
        ),
    ] = False,
) -> None:
    """Train an SAE on the residual stream after block --layer, from a corpus; evaluate it on
    held-out text (FVU, mean L0, dead latents, next-token loss with the SAE spliced in) and write a
    SAELens folder. Activations and checkpoints are kept in the cache: run the same command again
    after a stop and it goes on where it was."""
    with user_errors():
        options = TrainOptions(
            model=model, layer=layer, output=str(output), corpus=str(corpus),
            eval_corpus=str(eval_corpus) if eval_corpus else None,
            architecture=architecture,  # type: ignore[arg-type]
            width=width, k=k, context=context, epochs=epochs, batch_tokens=batch_tokens, lr=lr,
            eval_fraction=eval_fraction, max_train_tokens=max_train_tokens,
            max_eval_tokens=max_eval_tokens, loss_contexts=loss_contexts,
            weights_dtype=weights_dtype,  # type: ignore[arg-type]
            seed=seed, log_every=log_every, save_every=save_every, harvest_only=harvest_only,
        )  # fmt: skip
        from neuroscope.sae_train import train_sae

        result = train_sae(options, progress=say)
        if result is not None:
            typer.echo(result.report.describe())
            typer.echo(f"SAE: {result.output}")
