"""SSE ids and resuming: every event of the feature stream has an ``id:``, a client that reconnects
with ``Last-Event-ID`` gets what it missed (within the hub's replay ring), and a request cut short by
shutdown still ends with ``generation_complete`` (``cancelled``). Real server, httpx-sse clients."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from conftest import requires_torch
from serve_support import FeatureStream, build_long_context_model, start_server

pytestmark = [pytest.mark.torch, requires_torch]

HELLO = [{"role": "user", "content": "Hello! How are you today?"}]
REPLAY = 64


@pytest.fixture(scope="module")
def server(tiny_model, tiny_sae):
    server = start_server(tiny_model, tiny_sae["npz"], replay_events=REPLAY)
    yield server
    server.stop()


def chat(server, max_tokens: int) -> str:
    reply = httpx.post(
        server.listening.chat_url + "/v1/chat/completions",
        json={"messages": HELLO, "max_tokens": max_tokens, "temperature": 0},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["id"])


def of(stream: FeatureStream, request_id: str) -> list[tuple[str, str, dict]]:
    return [
        (e.id or "", e.name, e.data)
        for e in stream.events
        if e.data.get("request_id") == request_id
    ]


def test_every_event_has_an_increasing_id(server) -> None:
    with FeatureStream(server.listening.features_url, {"phase": "all"}) as stream:
        rid = chat(server, 4)
        stream.completion(rid)
    ids = [int(e.id) for e in stream.events if e.id is not None]
    assert len(ids) == len(stream.events) > 5
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_a_new_connection_resumes_after_its_last_event_id(server) -> None:
    params = {"phase": "generation"}
    with FeatureStream(server.listening.features_url, params) as first:
        seen = chat(server, 3)
        first.completion(seen)
    last = first.events[-1].id
    assert last is not None
    # While nobody is subscribed, another request runs: its events are what a reconnect missed.
    missed = chat(server, 5)
    with FeatureStream(
        server.listening.features_url, params, headers={"Last-Event-ID": last}
    ) as resumed:
        resumed.completion(missed)
    assert of(resumed, seen) == []  # nothing up to Last-Event-ID comes again
    got = of(resumed, missed)
    assert [name for _, name, _ in got] == ["feature_activation"] * 5 + ["generation_complete"]
    assert [r["token_index"] for _, _, r in got[:-1]] == list(range(5))
    # A plain subscriber at the same time would have seen the same events, with the same ids.
    with FeatureStream(server.listening.features_url, params) as live:
        again = chat(server, 2)
        live.completion(again)
    with FeatureStream(
        server.listening.features_url, params, headers={"Last-Event-ID": last}
    ) as replayed:
        replayed.completion(again)
    assert of(replayed, again) == of(live, again)


def test_a_reconnect_beyond_the_replay_ring_is_told_what_it_lost(server) -> None:
    with FeatureStream(server.listening.features_url, {"phase": "all"}) as first:
        old = chat(server, 1)
        first.completion(old)
    last = int(first.events[-1].id or 0)
    newer = [chat(server, 8) for _ in range(3)]  # prompts and replies: more than REPLAY events
    with FeatureStream(
        server.listening.features_url, {"phase": "all"}, headers={"Last-Event-ID": str(last)}
    ) as resumed:
        resumed.completion(newer[-1])
    assert resumed.events[0].name == "dropped"
    first_kept = int(resumed.events[1].id or 0)
    assert resumed.events[0].data["dropped"] == first_kept - last - 1 > 0
    assert int(resumed.events[0].id or 0) == first_kept - 1
    assert len(resumed.events) - 1 <= REPLAY


def test_a_malformed_last_event_id_is_a_400(server) -> None:
    r = httpx.get(
        server.listening.features_url + "/v1/features/stream", headers={"Last-Event-ID": "x1"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID"


def test_a_request_cut_by_shutdown_still_gets_its_generation_complete(tmp_path, tiny_sae) -> None:
    model = build_long_context_model(tmp_path / "model")
    server = start_server(model, tiny_sae["npz"])
    try:
        stream = FeatureStream(server.listening.features_url).__enter__()
        rid = "chatcmpl-cut-by-shutdown"
        body = {"messages": HELLO, "max_tokens": 3000, "temperature": 0, "stream": True}

        def long_chat() -> None:
            try:
                with httpx.stream(
                    "POST", server.listening.chat_url + "/v1/chat/completions", json=body,
                    headers={"X-Request-Id": rid}, timeout=60,
                ) as response:  # fmt: skip
                    for _ in response.iter_lines():
                        pass
            except httpx.HTTPError:
                pass

        client = threading.Thread(target=long_chat, daemon=True)
        client.start()
        deadline = time.monotonic() + 30
        while len(stream.records(rid)) < 3:
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.05)
    finally:
        server.stop()
    done = stream.completion(rid, timeout=10)
    stream.__exit__(None, None, None)
    client.join(10)
    assert done["finish_reason"] == "cancelled"
    assert done["completion_tokens"] < 3000
    assert stream.ended, "the stream ends after the shutdown"
