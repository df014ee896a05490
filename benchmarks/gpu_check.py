"""One-go GPU check for a session with a lent device (well under 10 minutes on an H200).

    python -m benchmarks.gpu_check --out benchmarks/results/gpu-check.json

At Gemma 2 2B shapes (dummy weights, bf16 on CUDA; random Gemma Scope-shaped SAEs of 16k features):

1. dummy-weight load time (built on the device, see ``neuroscope_torch.dummy``);
2. ``neuroscope bench`` with one SAE (layer 20), eager path: decode tok/s uninstrumented and
   instrumented, the overhead, time to first token, the SAE encode alone, µs per feature record,
   peak device memory;
3. parity on the device: greedy tokens and top-k features of the instrumented loop equal those of
   a plain eager transformers forward pass with a hook;
4. the fast path (``--fast-mode``, default ``compile``: static cache + ``torch.compile``
   reduce-overhead, i.e. CUDA graphs): its parity against the eager path (greedy tokens, top-k
   indices and activations of the same positions), the first generation's time (compilation and
   graph capture), then the same bench as 2 on the fast path;
5. every layer hooked (26 SAEs), eager and fast: the all-layers overhead and time to first token;
6. the batching levels 1,2,4,8,16 (``benchmarks.batch_step``, its own process, the same model);
7. with ``--probe-dir``, the reference probe of /work/shared/gpu-probe (``gpu_probe.py``, its own
   process; it needs the directory to travel with the run).

Everything goes to one JSON file that ``docs/benchmarks.md`` quotes (``summary`` holds the issue's
targets); nothing is asserted here (speed is measured, never asserted), parity mismatches are
reported in the JSON and on stdout. Each section is guarded: a failure is recorded and the next
section runs. It also runs on the CPU with a small model (``--model /path/to/folder --layers 0,1
--fast-mode dynamo``) or the 2B preset cut to a few layers (``--num-layers 2``) to check the script
itself before spending device time.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
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


def _generate(backend: Any, ids: list[int], tokens: int) -> tuple[list[int], list[Any], float]:
    """Greedy ``tokens`` through the backend's single path: tokens, features per step, seconds."""
    from neuroscope.backend import SamplingParams

    t = time.perf_counter()
    features = [backend.prefill(ids, SamplingParams(temperature=0.0))]
    generated = []
    for _ in range(tokens):
        generated.append(backend.sample())
        features.append(backend.decode(generated[-1]))
    return generated, features, time.perf_counter() - t


def _fast_parity(session: Any, mode: str, tokens: int) -> dict[str, Any]:
    """The fast path against the eager one, same greedy request: tokens, and the top-k of every
    hooked layer at the positions both computed from the same inputs (up to the first token that
    differs, if any; bf16 kernels of different shapes may round differently)."""
    backend = session.backend
    ids = session.encode("The capital of France is")
    backend.set_fast("off")
    eager_tokens, eager_features, eager_s = _generate(backend, ids, tokens)
    backend.set_fast(mode)
    first_tokens, _, first_s = _generate(backend, ids, tokens)  # compiles, captures graphs
    fast_tokens, fast_features, fast_s = _generate(backend, ids, tokens)
    mismatch = next(
        (i for i, (a, b) in enumerate(zip(eager_tokens, fast_tokens, strict=True)) if a != b),
        None,
    )
    same = len(eager_tokens) if mismatch is None else mismatch
    steps = same + 1  # the prefill's features and those of each step fed the same token
    index_equal, diffs, scale = [], [0.0], [0.0]
    for a, b in zip(eager_features[:steps], fast_features[:steps], strict=True):
        for layer in a:
            index_equal.append(float(np.mean(a[layer].indices == b[layer].indices)))
            diffs.append(float(np.abs(a[layer].activations - b[layer].activations).max()))
            scale.append(float(np.abs(a[layer].activations).max()))
    return {
        "mode": mode,
        "tokens_equal": eager_tokens == fast_tokens,
        "first_token_mismatch": mismatch,
        "first_run_repeats_tokens": first_tokens == fast_tokens,
        "topk_index_agreement": min(index_equal) if index_equal else None,
        "max_abs_activation_diff": max(diffs),
        "max_activation": max(scale),
        "eager_generation_s": eager_s,
        "first_fast_generation_s": first_s,  # includes compilation and CUDA graph capture
        "fast_generation_s": fast_s,
    }


def _section(result: dict[str, Any], name: str, fn: Any, deadline: float = float("inf")) -> Any:
    """Run one section; record its figures, or its error, and its wall time; skip it past the
    deadline (a ``time.perf_counter`` value) so the JSON is written before the run's limit."""
    t = time.perf_counter()
    if t > deadline:
        result[name] = {"skipped": "past --budget-s"}
        _log(f"{name}: skipped, past the time budget")
        return result[name]
    try:
        result[name] = fn()
    except Exception as e:  # one failing section must not cost the others' figures
        result[name] = {
            "error": f"{type(e).__name__}: {e}",
            "trace": traceback.format_exc()[-3000:],
        }
        _log(f"{name} failed: {type(e).__name__}: {e}")
    result[f"{name}_wall_s"] = time.perf_counter() - t
    return result[name]


def _cut_layers(folder: Path, num_layers: int, into: Path) -> Path:
    """A copy of a dummy-weights folder (config and tokenizer) with ``num_layers`` blocks."""
    into.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file():
            shutil.copy(f, into / f.name)
    config = json.loads((into / "config.json").read_text())
    text = config.get("text_config", config)
    text["num_hidden_layers"] = num_layers
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][:num_layers]
    (into / "config.json").write_text(json.dumps(config, indent=1))
    return into


def _batch_levels(folder: Path, layer: int, batches: str, dtype: str) -> dict[str, Any]:
    """``benchmarks.batch_step`` over the levels, in its own process on the same model."""
    command = [
        sys.executable, "-m", "benchmarks.batch_step", "--model", str(folder),
        "--layer", str(layer), "--batches", batches, "--steps", "16",
    ]  # fmt: skip
    helptext = subprocess.run(
        [sys.executable, "-m", "benchmarks.batch_step", "--help"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    missing = [o for o in ("--load-format", "--dtype", "--clock") if o not in helptext]
    if missing:
        return {"skipped": f"benchmarks.batch_step lacks {', '.join(missing)} (dummy weights, "
                "bf16 and the wall clock are needed on a GPU)", "command": command}  # fmt: skip
    command += ["--load-format", "dummy", "--dtype", dtype, "--clock", "wall"]
    _log(" ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=420)
    print(done.stdout, done.stderr[-2000:], flush=True)
    levels = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {"command": command, "returncode": done.returncode, "levels": levels}


def _probe(probe_dir: Path) -> dict[str, Any]:
    """/work/shared/gpu-probe's reference probe, unchanged, in its own process (the figures of
    its README are from it)."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OUT": out, "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, str(probe_dir / "gpu_probe.py")]
        _log(" ".join(command))
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, check=False, timeout=480
        )
        print(done.stdout[-4000:], done.stderr[-2000:], flush=True)
        report = Path(out) / "probe.json"
        figures = json.loads(report.read_text()) if report.exists() else None
    return {"command": command, "returncode": done.returncode, "probe": figures}


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, from the sections that ran (None where a section is missing)."""

    def fig(section: str, key: str) -> float | None:
        value = result.get(section, {})
        return value.get("summary", {}).get(key) if isinstance(value, dict) else None

    out: dict[str, Any] = {}
    for path in ("eager", "fast"):
        one, every = (
            ("one_sae", "all_layers") if path == "eager" else ("one_sae_fast", "all_layers_fast")
        )
        plain, ttft_plain, ttft_all = (
            fig(one, "decode_tps_plain"),
            fig(every, "ttft_s_plain"),
            fig(every, "ttft_s_sae"),
        )
        out[path] = {
            "single_stream_tok_s": plain,  # target >= 110 (aim 150) on an H200
            "one_sae_overhead_pct": fig(one, "overhead_pct"),  # target <= 3
            "all_layers_overhead_pct": fig(every, "overhead_pct"),  # target <= 8
            "all_layers_ttft_ratio": ttft_all / ttft_plain if ttft_all and ttft_plain else None,
        }  # fmt: skip
    return out


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path(
        "benchmarks/results/gpu-check.json"
    ),
    model: Annotated[
        str, typer.Option(help="A preset or a folder (dummy weights).")
    ] = "gemma-2-2b",
    num_layers: Annotated[
        int, typer.Option(help="Cut the model to this many blocks (0: all); for CPU dry runs.")
    ] = 0,
    layers: Annotated[
        str, typer.Option(help="Hooked layers for the all-layers run: 'all' or '0,5,…'.")
    ] = "all",
    one_layer: Annotated[int, typer.Option(help="The layer of the one-SAE run.")] = 20,
    tokens: Annotated[int, typer.Option(help="Generated tokens per timed run.")] = 64,
    rounds: Annotated[int, typer.Option(help="Rounds per bench (modes alternate).")] = 3,
    backend: Annotated[str, typer.Option(help="Backend: torch (CUDA) or mlx.")] = "torch",
    fast_mode: Annotated[
        str, typer.Option(help="The torch fast path to compare: compile, static, dynamo or off.")
    ] = "compile",
    batches: Annotated[
        str, typer.Option(help="Batching levels (benchmarks.batch_step); '' skips them.")
    ] = "1,2,4,8,16",
    probe_dir: Annotated[
        Path | None, typer.Option(help="A copy of /work/shared/gpu-probe to run its probe too.")
    ] = None,
    budget_s: Annotated[
        float, typer.Option(help="Start no section after this many seconds (the JSON is kept).")
    ] = 480.0,
) -> None:
    """Run every check above in one process and write one JSON file."""
    from neuroscope.bench import machine_info
    from neuroscope.loading import resolve_model
    from neuroscope.session import Session

    started = time.perf_counter()
    deadline = started + budget_s
    result: dict[str, Any] = {"machine": machine_info(), "command": sys.argv}
    folder = resolve_model(model, "dummy").path
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    if num_layers:
        folder = _cut_layers(folder, num_layers, scratch / "model")
        model = str(folder)
    config = json.loads((folder / "config.json").read_text())
    total_layers = int(config.get("text_config", config)["num_hidden_layers"])
    hooked = list(range(total_layers)) if layers == "all" else [int(x) for x in layers.split(",")]
    one_layer = one_layer if one_layer in hooked else hooked[-1]
    fast = backend == "torch" and fast_mode != "off"

    def save() -> None:
        result["summary"] = _summary(result)
        result["wall_s"] = time.perf_counter() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))

    _log(f"loading {model} (dummy weights) with {len(hooked)} random SAEs")
    t = time.perf_counter()
    session = Session(model=model, load_format="dummy", layer=hooked, backend=backend)
    result["load_s_with_saes"] = time.perf_counter() - t
    result["device"] = session.backend.device
    result["dtype"] = str(getattr(session.backend, "dtype", "?"))
    _log(f"loaded in {result['load_s_with_saes']:.1f} s on {result['device']}")

    def dummy_alone() -> float:
        t = time.perf_counter()
        type(session.backend).load(session.resolved.path, dummy_weights=True)
        return time.perf_counter() - t  # the model alone, warm caches

    _section(result, "dummy_load_s", dummy_alone, deadline)
    all_saes, all_layers = session.saes, session.layers
    torch_backend: Any = session.backend  # set_fast: the torch backend's own

    def with_saes(chosen: dict[int, Any], name: str, fn: Any) -> None:
        session.saes, session.layers = chosen, list(chosen)
        try:
            _section(result, name, fn, deadline)
        finally:
            session.saes, session.layers = all_saes, all_layers
        save()

    one = {one_layer: all_saes[one_layer]}
    _log(f"bench, one SAE at layer {one_layer}, eager")
    with_saes(one, "one_sae", lambda: _bench(session, tokens, rounds))
    if backend == "torch":
        _log("parity: the instrumented loop against an eager forward pass")

        def parity() -> dict[str, Any]:
            session.backend.set_saes(session.saes, session.builder.backend_top_k)
            return _parity(session, min(tokens, 32))

        with_saes(one, "parity", parity)
        _log(f"parity: {result['parity']}")
    if fast:
        _log(f"fast path ({fast_mode}) against eager, then its bench")

        def fast_parity() -> dict[str, Any]:
            session.backend.set_saes(session.saes, session.builder.backend_top_k)
            return _fast_parity(session, fast_mode, min(tokens, 32))

        with_saes(all_saes, "fast_parity", fast_parity)
        _log(f"fast parity: {result['fast_parity']}")
        torch_backend.set_fast(fast_mode)
        with_saes(one, "one_sae_fast", lambda: _bench(session, tokens, rounds))
        torch_backend.set_fast("off")
    _log(f"bench, {len(hooked)} SAEs, eager")
    with_saes(all_saes, "all_layers", lambda: _bench(session, tokens, rounds))
    if fast:
        torch_backend.set_fast(fast_mode)
        _log(f"bench, {len(hooked)} SAEs, fast")
        with_saes(all_saes, "all_layers_fast", lambda: _bench(session, tokens, rounds))
        torch_backend.set_fast("off")
    session.close()
    gc.collect()
    if batches and backend == "torch":
        dtype = str(result["dtype"]).replace("torch.", "")
        _section(
            result, "batching", lambda: _batch_levels(folder, one_layer, batches, dtype), deadline
        )
        save()
    if probe_dir is not None:
        _section(result, "probe", lambda: _probe(probe_dir), deadline)
    save()
    _log(f"summary: {json.dumps(result['summary'])}")
    _log(f"wrote {out} ({result['wall_s']:.0f} s in all)")


if __name__ == "__main__":
    app()
