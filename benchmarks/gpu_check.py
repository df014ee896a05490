"""One-go GPU check for a session with a lent device (well under 10 minutes on an H200).

    python -m benchmarks.gpu_check --out benchmarks/results/gpu-check.json

At Gemma 2 2B shapes (dummy weights, bf16 on CUDA; random Gemma Scope-shaped SAEs of 16k features):

1. dummy-weight load time (built on the device, see ``neuroscope_torch.dummy``);
2. ``neuroscope bench`` with one SAE (layer 20): decode tok/s uninstrumented and instrumented, the
   overhead, time to first token, the SAE encode alone, µs per feature record, peak device memory;
3. the same with every layer hooked (26 SAEs): the all-layers overhead and time to first token;
4. parity on the device: greedy tokens and top-k features of the instrumented loop equal those of
   a plain eager transformers forward pass with a hook (so a faster path, once built, is checked
   against the eager one by the same code).

Everything goes to one JSON file that ``docs/benchmarks.md`` quotes; nothing is asserted here
(speed is measured, never asserted), parity mismatches are reported in the JSON and on stdout.
It also runs on the CPU with a small model (``--model /path/to/folder --layers 0,1``) to check the
script itself before spending device time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

app = typer.Typer(add_completion=False)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _bench(session: Any, tokens: int, rounds: int) -> dict[str, Any]:
    from neuroscope.bench import format_table, run_bench

    report = run_bench(session, tokens=tokens, rounds=rounds, subscribers=0, warmup=1, log=_log)
    print(format_table(report), flush=True)
    return report.to_dict()


def _parity(session: Any, tokens: int) -> dict[str, Any]:
    """Greedy tokens and the first hooked layer's top-k: the instrumented loop against an eager
    forward pass over the whole sequence (no cache), on the same device and dtype."""
    import torch

    from neuroscope.backend import SamplingParams

    backend = session.backend
    layer = session.layers[0]
    ids = session.encode("The capital of France is")
    features = [backend.prefill(ids, SamplingParams(temperature=0.0))]
    generated = []
    for _ in range(tokens):
        generated.append(backend.sample())
        features.append(backend.decode(generated[-1]))
    sequence = [*ids, *generated]
    residuals, logits = backend.forward_reference(sequence, [layer])
    eager_tokens = logits[len(ids) - 1 : -1].argmax(-1).tolist()
    sae = backend._saes[layer]
    k = features[0][layer].indices.shape[1]
    with torch.inference_mode():
        x = torch.from_numpy(residuals[layer]).to(backend.model.device, backend.dtype)
        _, values = sae.top_k(x, k)  # (indices, activations)
    ours = np.concatenate([f[layer].activations for f in features])
    eager = values.float().cpu().numpy()
    return {
        "tokens_equal": generated == eager_tokens,
        "first_token_mismatch": next(
            (i for i, (a, b) in enumerate(zip(generated, eager_tokens, strict=True)) if a != b),
            None,
        ),
        "max_abs_activation_diff": float(np.abs(ours - eager).max()),
        "max_activation": float(np.abs(eager).max()),
    }


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path(
        "benchmarks/results/gpu-check.json"
    ),
    model: Annotated[
        str, typer.Option(help="A preset or a folder (dummy weights).")
    ] = "gemma-2-2b",
    layers: Annotated[
        str, typer.Option(help="Hooked layers for the all-layers run: 'all' or '0,5,…'.")
    ] = "all",
    one_layer: Annotated[int, typer.Option(help="The layer of the one-SAE run.")] = 20,
    tokens: Annotated[int, typer.Option(help="Generated tokens per timed run.")] = 64,
    rounds: Annotated[int, typer.Option(help="Rounds per bench (modes alternate).")] = 3,
    backend: Annotated[str, typer.Option(help="Backend: torch (CUDA) or mlx.")] = "torch",
) -> None:
    """Run every check above in one process and write one JSON file."""
    from neuroscope.bench import machine_info
    from neuroscope.loading import resolve_model
    from neuroscope.session import Session

    started = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(), "command": sys.argv}
    config = json.loads((resolve_model(model, "dummy").path / "config.json").read_text())
    num_layers = int(config.get("text_config", config)["num_hidden_layers"])
    hooked = list(range(num_layers)) if layers == "all" else [int(x) for x in layers.split(",")]
    one_layer = one_layer if one_layer in hooked else hooked[0]

    _log(f"loading {model} (dummy weights) with {len(hooked)} random SAEs")
    t = time.perf_counter()
    session = Session(model=model, load_format="dummy", layer=hooked, backend=backend)
    result["load_s_with_saes"] = time.perf_counter() - t
    result["device"] = session.backend.device
    result["dtype"] = str(getattr(session.backend, "dtype", "?"))
    _log(f"loaded in {result['load_s_with_saes']:.1f} s on {result['device']}")

    t = time.perf_counter()
    type(session.backend).load(session.resolved.path, dummy_weights=True)
    result["dummy_load_s"] = time.perf_counter() - t  # the model alone, warm caches
    _log(f"dummy weights alone: {result['dummy_load_s']:.1f} s")

    all_saes, all_layers = session.saes, session.layers
    try:
        session.saes, session.layers = {one_layer: all_saes[one_layer]}, [one_layer]
        _log(f"bench, one SAE at layer {one_layer}")
        result["one_sae"] = _bench(session, tokens, rounds)
        if backend == "torch":
            _log("parity: the instrumented loop against an eager forward pass")
            session.backend.set_saes(session.saes, session.builder.backend_top_k)
            result["parity"] = _parity(session, min(tokens, 32))
            _log(f"parity: {result['parity']}")
    finally:
        session.saes, session.layers = all_saes, all_layers
    _log(f"bench, {len(hooked)} SAEs")
    result["all_layers"] = _bench(session, tokens, rounds)
    result["wall_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _log(f"wrote {out} ({result['wall_s']:.0f} s in all)")


if __name__ == "__main__":
    app()
