"""The server with --max-batch: concurrent streaming chats decode together, and each reply and
its feature records equal the same request served alone (greedy, float32, the tiny Gemma 2)."""

from __future__ import annotations

import threading
from typing import Any

import openai
import pytest
from batching_support import assert_stream_records_equal
from conftest import requires_torch
from serve_support import FeatureStream, build_long_context_model, session_loader, start_server

pytestmark = requires_torch

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Hello there"}],
]
MAX_TOKENS = [12, 9, 15, 6, 10]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return build_long_context_model(tmp_path_factory.mktemp("serve-batch-model"))


@pytest.fixture(scope="module")
def server(model, tiny_sae):
    server = start_server(model, tiny_sae["npz"], max_batch=4, subscriber_queue=4096)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(model, tiny_sae):
    with session_loader(model, tiny_sae["npz"], dtype="float32")() as session:
        yield session


def test_concurrent_streams_equal_their_replies_alone(server, reference, model) -> None:
    client = openai.OpenAI(
        base_url=server.listening.chat_url + "/v1", api_key="-", max_retries=0, timeout=120
    )
    want = [
        reference.generate(c, max_tokens=n, temperature=0.0).run()
        for c, n in zip(CHATS, MAX_TOKENS, strict=True)
    ]
    start = threading.Barrier(len(CHATS))
    got: list[dict[str, Any]] = [{} for _ in CHATS]

    def chat(i: int) -> None:
        start.wait()
        stream = client.chat.completions.create(
            model=str(model), messages=CHATS[i], max_tokens=MAX_TOKENS[i], temperature=0,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        got[i]["id"] = chunks[0].id
        got[i]["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        got[i]["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        got[i]["usage"] = chunks[-1].usage

    with FeatureStream(server.listening.features_url, {"phase": "all"}) as features:
        threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(CHATS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for g in got:
            features.completion(g["id"])
        records = {g["id"]: features.records(g["id"]) for g in got}

    assert server.engine is not None and server.engine.widest_batch >= 2, "no batching happened"
    assert server.engine.widest_batch <= 4
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        assert g["text"] == w.text and g["finish"] == w.finish_reason
        assert (g["usage"].prompt_tokens, g["usage"].completion_tokens) == (
            w.prompt_tokens, w.completion_tokens,
        )  # fmt: skip
        worst = max(worst, assert_stream_records_equal(records[g["id"]], w.records))
    print(f"\nwidest batch {server.engine.widest_batch}; worst relative activation gap {worst:.1e}")
