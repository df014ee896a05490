"""What the batching tests of both backends share: a backend's sequences served alone and
batched (newcomers prefilled in chunks between the others' decodes, one leaving mid-way), and the
comparisons of features and of streamed records with those served alone (1e-3 relative)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def serve_alone(b, prompt, sampling, steps):
    """(tokens, features per step) of ``prompt`` on the backend's single-sequence path."""
    feats = [b.prefill(prompt, sampling)]
    tokens = [b.sample()]
    for _ in range(steps):
        feats.append(b.decode(tokens[-1]))
        tokens.append(b.sample())
    return tokens, feats


def serve_batched(b, prompts, samplings, steps, chunk, join_at, leave_at):
    """Run ``prompts`` batched: the first two from the start, the others joining at step
    ``join_at`` (prefilled ``chunk`` tokens per call, one chunk per step while the others decode),
    the second leaving at step ``leave_at``. Returns the per-sequence state and the widths."""
    state: dict[int, dict] = {}
    prefilling: dict[int, object] = {}

    def begin(i):
        prefilling[i] = b.start(prompts[i], samplings[i])

    def prefill_some():
        for i, seq in list(prefilling.items()):
            features = b.prefill_chunk(seq, chunk)
            if features is not None:
                del prefilling[i]
                state[i] = {"seq": seq, "tokens": [b.sample_sequence(seq)], "feats": [features]}

    begin(0)
    begin(1)
    while prefilling:
        prefill_some()
    widths = []
    for step in range(4 * steps):
        if step == join_at:
            for i in range(2, len(prompts)):
                begin(i)
        if step == leave_at:
            del state[1]
        prefill_some()  # newcomers' chunks interleave with the others' decoding
        active = [i for i in state if len(state[i]["tokens"]) <= steps]
        if not active and not prefilling:
            break
        if not active:
            continue
        widths.append(len(active))
        out = b.decode_batch(
            [state[i]["seq"] for i in active], [state[i]["tokens"][-1] for i in active]
        )
        for i, f in zip(active, out, strict=True):
            state[i]["feats"].append(f)
            state[i]["tokens"].append(b.sample_sequence(state[i]["seq"]))
    return state, widths


def assert_batched_equals_alone(
    b, prompts, samplings, layers, *, steps=14, chunk=4, join_at=2, leave_at=9
) -> float:
    """Tokens and top-k indices equal alone's, activations within 1e-3 relative; the worst."""
    ref = [serve_alone(b, p, s, steps) for p, s in zip(prompts, samplings, strict=True)]
    state, widths = serve_batched(b, prompts, samplings, steps, chunk, join_at, leave_at)
    assert max(widths) >= 3 and min(widths) < max(widths), "rows must join and leave"
    worst = 0.0
    for i, s in state.items():
        tokens, feats = ref[i]
        assert s["tokens"] == tokens[: len(s["tokens"])], f"sequence {i}"
        assert len(s["tokens"]) == steps + 1
        for step, (a, c) in enumerate(zip(feats, s["feats"], strict=True)):
            for layer in layers:
                np.testing.assert_array_equal(c[layer].indices, a[layer].indices, f"{i} {step}")
                np.testing.assert_allclose(
                    c[layer].activations, a[layer].activations, rtol=1e-3, atol=1e-6
                )
                nonzero = np.abs(a[layer].activations) > 0
                rel = np.abs(c[layer].activations - a[layer].activations)[nonzero] / np.abs(
                    a[layer].activations[nonzero]
                )
                worst = max(worst, float(rel.max(initial=0.0)))
    return worst


def assert_stream_records_equal(streamed: Sequence[dict[str, Any]], alone: Sequence[Any]) -> float:
    """Records from the feature stream (JSON) against ``Session`` records of the request served
    alone: same positions, tokens and features, activations within 1e-3 relative; the worst."""
    assert len(streamed) == len(alone)
    worst = 0.0
    for r, a in zip(streamed, alone, strict=True):
        assert (r["position"], r["phase"], r["token"], r["next_token"]) == (
            a.position, a.phase, a.token, a.next_token,
        )  # fmt: skip
        assert [f["index"] for f in r["top_features"]] == [f.index for f in a.top_features]
        got = np.array([f["activation"] for f in r["top_features"]])
        want = np.array([f.activation for f in a.top_features])
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)
        if len(want):
            worst = max(worst, float(np.max(np.abs(got - want) / np.abs(want))))
    return worst
