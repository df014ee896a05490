"""Neuroscope beside the usual ways of doing the same thing: one model, one prompt, one run.

    python -m benchmarks.peers --model gemma-2-2b --load-format dummy --backend torch --tokens 16

Every contender gets the same prompt token ids, the same weights and generates the same number of
tokens greedily (stop tokens ignored). Contenders run alternately, in a rotating order, for
``--rounds`` rounds; medians are reported, each as tokens/s and as a ratio to Neuroscope
(instrumented, same backend). See docs/benchmarks.md for what each contender is.
"""

from __future__ import annotations

import gc
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks.common import Contender, fmt, neuroscope_contenders, run_rounds
from neuroscope.bench import DEFAULT_PROMPT, machine_info, peak_rss_mib, write_random_sae
from neuroscope.cache import write_json_atomic

TORCH_PEERS = ("hf-generate", "hf-hidden-states", "hf-forward-loop", "tl-saelens")
MLX_PEERS = ("mlx-lm",)

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _session(model: str, load_format: str, backend: str, layer: int, sae_local_path: str | None,
             random_sae: bool, top_k: int, tmp: Path) -> Any:  # fmt: skip
    from neuroscope.session import Session

    if random_sae:
        sae_local_path = write_random_sae(model, load_format, tmp)
    return Session(
        model=model, sae_local_path=sae_local_path, layer=layer, backend=backend, top_k=top_k,
        load_format=load_format,  # type: ignore[arg-type]
    )  # fmt: skip


def _row(c: Contender, reference: Contender | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": c.name,
        "label": c.label,
        "rounds": len(c.runs),
        "e2e_tps": c.median("e2e_tps"),
        "decode_tps": c.decode_tps,  # inverse of the median step over all runs
        "decode_tps_best": c.decode_tps_best,  # inverse of the fastest step
        "ttft_s": c.median("ttft_s"),
        "feature_positions": c.runs[0].feature_positions,
        "runs": [r.to_dict() for r in c.runs],
    }
    if reference is not None and reference.runs:
        row |= _vs_neuroscope(c, reference)
        ours, theirs = reference.runs[0].tokens, c.runs[0].tokens
        agree = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours)
        )
        row["tokens_agree_with_neuroscope"] = agree  # leading tokens identical to Neuroscope's
    return row


def _vs_neuroscope(c: Contender, reference: Contender) -> dict[str, Any]:
    """Speed relative to Neuroscope (> 1: the contender is faster).

    Paired when both ran in the same rounds (the median over rounds of each round's ratio, so load
    that changes between rounds cancels); otherwise (the TransformerLens loop runs in a later phase)
    the ratio of the medians.
    """
    if c is reference or not c.paired_with(reference):
        return {
            "e2e_vs_neuroscope": c.median("e2e_tps") / reference.median("e2e_tps"),
            "decode_vs_neuroscope": c.decode_tps / reference.decode_tps,
            "decode_best_vs_neuroscope": c.decode_tps_best / reference.decode_tps_best,
            "paired": c is reference,
        }
    pairs = list(zip(c.runs, reference.runs, strict=True))
    return {
        "e2e_vs_neuroscope": statistics.median(a.e2e_tps / b.e2e_tps for a, b in pairs),
        "decode_vs_neuroscope": statistics.median(
            statistics.median(b.step_s) / statistics.median(a.step_s) for a, b in pairs
        ),
        "decode_best_vs_neuroscope": statistics.median(
            min(b.step_s) / min(a.step_s) for a, b in pairs
        ),
        "paired": True,
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table; ratios marked † are of medians from different phases."""
    lines = [
        "| contender | tok/s end to end | × Neuroscope | decode tok/s | × Neuroscope "
        "| best decode tok/s | × Neuroscope | TTFT ms | features for |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = "" if r.get("paired", True) else " †"
        lines.append(
            f"| {r['label']} | {fmt(r['e2e_tps'])} | {r.get('e2e_vs_neuroscope', 1.0):.2f}{mark} | "
            f"{fmt(r['decode_tps'])} | {r.get('decode_vs_neuroscope', 1.0):.2f}{mark} | "
            f"{fmt(r['decode_tps_best'])} | {r.get('decode_best_vs_neuroscope', 1.0):.2f}{mark} | "
            f"{fmt(r['ttft_s'] * 1000)} | {r['feature_positions']} positions |"
        )
    return "\n".join(lines)


@app.command()
def main(
    model: Annotated[str, typer.Option(help="Model folder, .gguf file or dummy preset.")],
    load_format: Annotated[
        str, typer.Option(help="'auto', or 'dummy' for random weights.")
    ] = "auto",
    backend: Annotated[str, typer.Option(help="torch or mlx.")] = "torch",
    sae_layer: Annotated[int, typer.Option(help="Decoder block whose output the SAE reads.")] = 20,
    sae_local_path: Annotated[
        str | None, typer.Option(help="A local params.npz or SAELens folder.")
    ] = None,
    random_sae: Annotated[
        bool, typer.Option(help="A random 16k-feature JumpReLU SAE (models without one).")
    ] = False,
    top_k: Annotated[int, typer.Option(help="Features kept per position.")] = 10,
    prompt: Annotated[
        str, typer.Option(help="The user turn (chat template applied).")
    ] = DEFAULT_PROMPT,
    tokens: Annotated[int, typer.Option(help="Tokens generated per run.")] = 16,
    rounds: Annotated[int, typer.Option(help="Rounds of every contender.")] = 3,
    tl_rounds: Annotated[int, typer.Option(help="Rounds of the TransformerLens loop.")] = 1,
    warmup_tokens: Annotated[int, typer.Option(help="Tokens of each warm-up run (0: none).")] = 2,
    peers: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated peers: torch {','.join(TORCH_PEERS)}; mlx {','.join(MLX_PEERS)}."
        ),
    ] = "",
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the results here.")
    ] = None,
) -> None:
    """Time Neuroscope and its peers side by side on one backend."""
    known = TORCH_PEERS if backend == "torch" else MLX_PEERS
    chosen = [p for p in peers.split(",") if p] or list(known)
    unknown = set(chosen) - set(known)
    if unknown:
        raise typer.BadParameter(f"Unknown peers for {backend}: {sorted(unknown)}; known: {known}.")
    result: dict[str, Any] = {
        "command": ["python", "-m", "benchmarks.peers", *sys.argv[1:]],
        "model": model,
        "backend": backend,
        "tokens": tokens,
        "rounds": rounds,
        "machine": machine_info(),
    }

    def save(contenders: list[Contender]) -> None:
        reference = next((c for c in contenders if c.name == "neuroscope"), None)
        result["contenders"] = [_row(c, reference) for c in contenders if c.runs]
        result["peak_rss_mib"] = peak_rss_mib()
        if json_path is not None:
            write_json_atomic(json_path, result)

    with tempfile.TemporaryDirectory(prefix="neuroscope-peers-") as tmp:
        _say(f"Loading {model} on {backend}…")
        session = _session(model, load_format, backend, sae_layer, sae_local_path, random_sae,
                           top_k, Path(tmp))  # fmt: skip
    prompt_ids = session.encode(prompt)
    layer, sae = session.layers[0], session.saes[session.layers[0]]
    result |= {
        "prompt_tokens": len(prompt_ids),
        "layer": layer,
        "sae": sae.id,
        "sae_width": sae.width,
        "dtype": str(session.backend.dtype).replace("torch.", "").replace("mlx.core.", ""),
        "device": session.backend.device,
    }
    contenders = neuroscope_contenders(session, prompt_ids)
    if backend == "torch":
        from benchmarks.peers_torch import saelens_sae, transformers_contenders

        lens_sae = saelens_sae(sae)
        contenders += [
            c
            for c in transformers_contenders(session, prompt_ids, lens_sae, layer, top_k)
            if c.name in chosen
        ]
    else:
        from benchmarks.peers_mlx import mlx_lm_contender

        contenders.append(mlx_lm_contender(session, prompt_ids))
    run_rounds(contenders, tokens, rounds, warmup_tokens, _say, lambda: save(contenders))
    save(contenders)

    if backend == "torch" and "tl-saelens" in chosen:
        from benchmarks.peers_torch import (
            last_logits,
            take_over_as_hooked_transformer,
            tl_contender,
            tl_last_logits,
        )

        reference = last_logits(session.backend.model, prompt_ids)
        hf_model = session.backend.model
        finished = [c for c in contenders if c.runs]
        for c in finished:
            c.run = None  # type: ignore[assignment]  # the closures hold the session's model
        session.close()
        del session
        gc.collect()
        _say("Handing the weights over to TransformerLens…")
        tl = take_over_as_hooked_transformer(hf_model)
        del hf_model
        gc.collect()
        diff = float(abs(tl_last_logits(tl, prompt_ids) - reference).max())
        result["tl_parity"] = {
            "max_abs_logit_diff": diff,
            "max_abs_logit": float(abs(reference).max()),
        }
        _say(f"TransformerLens vs transformers, last-position logits: max |diff| {diff:.2e}")
        tl_peer = tl_contender(tl, prompt_ids, lens_sae, layer, top_k)
        contenders = [*finished, tl_peer]
        run_rounds([tl_peer], tokens, tl_rounds, warmup_tokens, _say, lambda: save(contenders))
        save(contenders)

    rows = result["contenders"]
    typer.echo(
        f"{model} · {backend} ({result['device']}, {result['dtype']}) · prompt "
        f"{len(prompt_ids)} tokens · {tokens} generated · layer {layer} · SAE width {sae.width}"
    )
    typer.echo(markdown_table(rows))
    typer.echo("command: " + shlex.join(result["command"]))


if __name__ == "__main__":
    app()
