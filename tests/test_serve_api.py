"""`neuroscope serve` end to end: a real server (tiny model, torch) on free loopback ports, the
official `openai` client, SSE clients (httpx-sse), concurrency, disconnects and bad input."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from conftest import requires_torch
from httpx_sse import aconnect_sse
from serve_support import (
    TINY_LAYER,
    FeatureStream,
    build_long_context_model,
    session_loader,
    start_server,
)

pytestmark = [pytest.mark.torch, requires_torch]

HELLO = [{"role": "user", "content": "Hello! How are you today?"}]
FRANCE = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]
LONG_PROMPT = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 150}]
SUBSCRIBER_QUEUE = 256


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return build_long_context_model(tmp_path_factory.mktemp("serve-api-model"))


@pytest.fixture(scope="module")
def server(model, tiny_sae):
    server = start_server(model, tiny_sae["npz"], subscriber_queue=SUBSCRIBER_QUEUE)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(model, tiny_sae):
    """The same model and SAE as a plain Session: what the server must reproduce."""
    with session_loader(model, tiny_sae["npz"])() as session:
        yield session


@pytest.fixture(scope="module")
def chat_url(server) -> str:
    return server.listening.chat_url


@pytest.fixture(scope="module")
def features_url(server) -> str:
    return server.listening.features_url


@pytest.fixture(scope="module")
def client(chat_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=chat_url + "/v1", api_key="not-needed", max_retries=0, timeout=60)


def expected(reference, messages, max_tokens: int, **kwargs: Any):
    kwargs.setdefault("temperature", 0.0)
    return reference.generate(messages, max_tokens=max_tokens, **kwargs).run()


def post(
    url: str, body: Any, headers: dict[str, str] | None = None, **kwargs: Any
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    kwargs.setdefault("timeout", 60)
    return httpx.post(url + "/v1/chat/completions", content=content, headers=headers, **kwargs)


# -- the OpenAI API --------------------------------------------------------------------------------


def test_models_and_health(client, chat_url, features_url, model) -> None:
    assert [m.id for m in client.models.list()] == [str(model)]
    assert client.models.retrieve(str(model)).id == str(model)
    assert httpx.get(chat_url + "/health").json()["status"] == "ready"
    assert httpx.get(features_url + "/health").json()["status"] == "ready"


def test_openai_client_reply_equals_the_library(client, reference, model) -> None:
    want = expected(reference, FRANCE, 12)
    raw = client.chat.completions.with_raw_response.create(
        model=str(model), messages=FRANCE, max_tokens=12, temperature=0
    )
    reply = raw.parse()
    assert raw.headers["x-request-id"] == reply.id and reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion" and reply.model == str(model)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (want.prompt_tokens, 12)
    assert reply.usage.total_tokens == want.prompt_tokens + 12


def test_openai_client_streaming(client, reference, model) -> None:
    want = expected(reference, HELLO, 10)
    stream = client.chat.completions.create(
        model=str(model), messages=HELLO, max_completion_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == want.text
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens


def test_raw_stream_ends_with_done_and_has_no_usage_unless_asked(chat_url) -> None:
    body = {"messages": HELLO, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", chat_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_system_and_developer_turns_fold_into_the_first_user_turn(client, reference, model) -> None:
    folded = [{"role": "user", "content": "Answer briefly.\n\nWhat is the capital of France?"}]
    developer = [{"role": "developer", "content": "Answer briefly."}, FRANCE[1]]
    want = expected(reference, folded, 8).text
    for messages in (FRANCE, developer):
        reply = client.chat.completions.create(
            model=str(model), messages=messages, max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content == want


def test_text_parts_multi_turn_stop_and_seed(client, reference, model) -> None:
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hello!"},
                {"type": "text", "text": "How are you today?"},
            ],
        }
    ]
    reply = client.chat.completions.create(
        model=str(model), messages=parts, max_tokens=6, temperature=0
    )
    # Text parts are joined with a newline, as vLLM does (not run together).
    joined = [{"role": "user", "content": "Hello!\nHow are you today?"}]
    run_together = [{"role": "user", "content": "Hello!How are you today?"}]
    assert reference.encode(joined) != reference.encode(run_together)
    assert reply.choices[0].message.content == expected(reference, joined, 6).text
    assert expected(reference, joined, 6).text != expected(reference, run_together, 6).text

    turns = [
        *HELLO,
        {"role": "assistant", "content": "I am fine."},
        {"role": "user", "content": "Tell me a story."},
    ]
    reply = client.chat.completions.create(
        model=str(model), messages=turns, max_tokens=6, temperature=0
    )
    assert reply.choices[0].message.content == expected(reference, turns, 6).text

    full = expected(reference, HELLO, 24).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    want = expected(reference, HELLO, 24, stop=[stop])
    assert want.finish_reason == "stop" and want.text == full[: full.find(stop)]
    reply = client.chat.completions.create(
        model=str(model), messages=HELLO, max_tokens=24, temperature=0, stop=stop
    )
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (want.text, "stop")

    sampled = [
        client.chat.completions.create(model=str(model), messages=HELLO, max_tokens=8, temperature=1.0, seed=7)
        .choices[0].message.content
        for _ in range(2)
    ]  # fmt: skip
    assert sampled[0] == sampled[1] == expected(reference, HELLO, 8, temperature=1.0, seed=7).text


# -- the feature stream ----------------------------------------------------------------------------


def test_feature_stream_has_exactly_the_records_of_the_request(
    client, reference, model, features_url
) -> None:
    with FeatureStream(features_url, {"phase": "all"}) as stream:
        reply = client.chat.completions.create(
            model=str(model), messages=FRANCE, max_tokens=10, temperature=0
        )
        done = stream.completion(reply.id)
        records = stream.records(reply.id)
    prompt_ids = reference.encode(FRANCE)
    direct = [r.to_dict() for r in expected(reference, FRANCE, 10).records]
    for r in direct:
        r["request_id"] = reply.id
    assert records == direct  # every record, in order, equal to the library's
    prompt = [r for r in records if r["phase"] == "prompt"]
    generated = [r for r in records if r["phase"] == "generation"]
    assert [r["position"] for r in prompt] == list(range(1, len(prompt_ids)))  # BOS not reported
    assert [r["token_index"] for r in generated] == list(range(10))
    assert "".join(r["token"] for r in generated) == reply.choices[0].message.content
    assert {r["layer"] for r in records} == {TINY_LAYER}
    assert done == {
        "request_id": reply.id, "finish_reason": "length",
        "prompt_tokens": reply.usage.prompt_tokens, "completion_tokens": 10,
    }  # fmt: skip


def test_stream_filters_by_request_id_phase_and_layer(chat_url, features_url, reference) -> None:
    mine = "chatcmpl-filter-test-1"
    params = {"request_id": mine, "phase": "prompt", "layer": str(TINY_LAYER), "site": "resid_post"}
    with (
        FeatureStream(features_url, params) as only_mine,
        FeatureStream(features_url) as generation,
    ):
        other = post(chat_url, {"messages": HELLO, "max_tokens": 3, "temperature": 0}).json()
        r = post(
            chat_url,
            {"messages": HELLO, "max_tokens": 3, "temperature": 0},
            headers={"X-Request-Id": "filter-test-1"},
        )
        assert r.status_code == 200 and r.json()["id"] == mine and r.headers["x-request-id"] == mine
        only_mine.completion(mine)
        generation.completion(mine)
        assert only_mine.request_ids() == {mine}
        records = only_mine.records(mine)
        assert {x["phase"] for x in records} == {"prompt"}
        assert {x["site"] for x in records} == {"resid_post"}
        assert len(records) == len(reference.encode(HELLO)) - 1
        assert {x["phase"] for x in generation.records(mine) + generation.records(other["id"])} == {
            "generation"
        }
        assert len(generation.records(mine)) == 3
    for bad in ({"phase": "everything"}, {"layer": "7"}, {"layer": "two"}, {"site": "attn"}):
        r = httpx.get(features_url + "/v1/features/stream", params=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad))


def test_two_concurrent_chats_complete_correctly_and_their_records_never_mix(
    client, reference, model, features_url
) -> None:
    asks = {"a": (FRANCE, 20), "b": (HELLO, 24)}
    want = {k: expected(reference, m, n).text for k, (m, n) in asks.items()}
    replies: dict[str, tuple[str, str]] = {}

    def run(key: str, streaming: bool) -> None:
        messages, n = asks[key]
        if streaming:
            chunks = list(
                client.chat.completions.create(
                    model=str(model), messages=messages, max_tokens=n, temperature=0, stream=True
                )
            )
            replies[key] = (
                chunks[0].id,
                "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
            )
        else:
            reply = client.chat.completions.create(
                model=str(model), messages=messages, max_tokens=n, temperature=0
            )
            replies[key] = (reply.id, reply.choices[0].message.content)

    with FeatureStream(features_url) as stream:
        threads = [
            threading.Thread(target=run, args=("a", True)),
            threading.Thread(target=run, args=("b", False)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for key, (rid, text) in replies.items():
            assert text == want[key]
            stream.completion(rid)
            records = stream.records(rid)
            assert [r["token_index"] for r in records] == list(range(asks[key][1]))
            assert "".join(r["token"] for r in records) == text
    assert replies["a"][0] != replies["b"][0]


def test_ten_subscribers_receive_identical_streams(chat_url, features_url) -> None:
    async def subscriber(ready: asyncio.Event, count: list[int], out: list) -> None:
        async with (
            httpx.AsyncClient(timeout=60) as http,
            aconnect_sse(
                http, "GET", features_url + "/v1/features/stream", params={"phase": "all"}
            ) as source,
        ):
            count.append(1)
            if len(count) == 10:
                ready.set()
            async for sse in source.aiter_sse():
                out.append((sse.event, sse.data))
                if sse.event == "generation_complete":
                    return

    async def main() -> list[list]:
        ready, count = asyncio.Event(), []
        outs: list[list] = [[] for _ in range(10)]
        tasks = [asyncio.create_task(subscriber(ready, count, out)) for out in outs]
        await asyncio.wait_for(ready.wait(), 30)
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(
                chat_url + "/v1/chat/completions",
                json={"messages": HELLO, "max_tokens": 8, "temperature": 0},
            )
            assert r.status_code == 200
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return outs

    outs = asyncio.run(main())
    assert all(out == outs[0] for out in outs)
    assert sum(name == "feature_activation" for name, _ in outs[0]) > 8


def test_idle_stream_sends_keep_alive_comments(features_url) -> None:
    lines = []
    with httpx.stream("GET", features_url + "/v1/features/stream", timeout=10) as r:
        start = time.monotonic()
        for line in r.iter_lines():
            lines.append(line)
            if line == ": keep-alive" or time.monotonic() - start > 5:
                break
    assert lines[0] == ": subscribed" and ": keep-alive" in lines


def test_a_stalled_subscriber_loses_the_oldest_records_is_told_and_generation_goes_on(
    chat_url, features_url, reference
) -> None:
    rid = "chatcmpl-stalled-1"
    host, port = httpx.URL(features_url).host, httpx.URL(features_url).port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after a few records
    sock.connect((host, port))
    # HTTP/1.0: the body comes unchunked, so SSE lines can be read straight off the socket.
    sock.sendall(f"GET /v1/features/stream?phase=all&request_id={rid} HTTP/1.0\r\n\r\n".encode())
    try:
        time.sleep(0.2)  # let the server subscribe it
        r = post(
            chat_url,
            {"messages": LONG_PROMPT, "max_tokens": 4, "temperature": 0},
            headers={"X-Request-Id": "stalled-1"},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4  # not held up
        published = r.json()["usage"]["prompt_tokens"] - 1 + 4  # records of this request (no BOS)
        assert published > 2 * SUBSCRIBER_QUEUE
        text = _read_until(sock, b"event: generation_complete")
    finally:
        sock.close()
    dropped = sum(json.loads(line[6:])["dropped"] for line in _data_after(text, "event: dropped"))
    received = len(_data_after(text, "event: feature_activation"))
    assert dropped > 0 and received + dropped == published


def _read_until(sock: socket.socket, marker: bytes, timeout: float = 30.0) -> str:
    sock.settimeout(timeout)
    data = b""
    while marker not in data or b"\n\n" not in data[data.index(marker) :]:
        chunk = sock.recv(65536)
        assert chunk, "the stream closed early"
        data += chunk
    return data.decode()


def _data_after(text: str, event_line: str) -> list[str]:
    lines = text.split("\n")
    return [lines[i + 1] for i, line in enumerate(lines[:-1]) if line == event_line]


def test_labels_page_and_unknown_routes(chat_url, features_url) -> None:
    labels = httpx.get(features_url + "/v1/features/labels").json()
    assert len(labels) == 128 and labels["17"] == "feature_17"
    assert (
        httpx.get(features_url + "/v1/features/labels", params={"layer": TINY_LAYER}).json()
        == labels
    )
    assert httpx.get(features_url + "/v1/features/labels", params={"layer": 0}).status_code == 400
    page = httpx.get(features_url + "/")
    assert page.status_code == 200 and '<script src="app.js"' in page.text  # the live page
    missing = httpx.get(chat_url + "/v1/completions")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong_method = httpx.get(chat_url + "/v1/chat/completions")
    assert (
        wrong_method.status_code == 405
        and wrong_method.json()["error"]["type"] == "invalid_request_error"
    )


# -- cancellation ----------------------------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(
    client, model, features_url, chat_url
) -> None:
    with FeatureStream(features_url) as stream:
        chunks = client.chat.completions.create(
            model=str(model), messages=HELLO, max_tokens=3000, temperature=0, stream=True
        )
        rid = None
        for n, chunk in enumerate(chunks):
            rid = chunk.id
            if n == 3:
                break
        chunks.close()  # the client goes away
        done = stream.completion(rid, timeout=30)
    assert done["finish_reason"] == "cancelled" and done["completion_tokens"] < 3000
    _assert_engine_free_and_serving(chat_url)


def test_a_non_streaming_client_that_gives_up_cancels_its_generation(
    features_url, chat_url
) -> None:
    with FeatureStream(features_url) as stream:
        with pytest.raises(httpx.ReadTimeout):
            post(
                chat_url,
                {"messages": HELLO, "max_tokens": 3000, "temperature": 0},
                headers={"X-Request-Id": "gives-up"},
                timeout=httpx.Timeout(30, read=1.0),
            )
        done = stream.completion("chatcmpl-gives-up", timeout=30)
    assert done["finish_reason"] == "cancelled" and done["completion_tokens"] < 3000
    _assert_engine_free_and_serving(chat_url)


def test_a_client_gone_before_its_stream_starts_cancels_it_too(features_url, chat_url) -> None:
    url = httpx.URL(chat_url)
    body = json.dumps({"messages": HELLO, "max_tokens": 3000, "temperature": 0, "stream": True})
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Request-Id: hangs-up\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with FeatureStream(features_url) as stream:
        with socket.create_connection((url.host, url.port)) as sock:
            sock.sendall(head.encode() + body.encode())  # and hang up at once
        done = stream.completion("chatcmpl-hangs-up", timeout=30)
    assert done["finish_reason"] == "cancelled" and done["completion_tokens"] < 3000
    _assert_engine_free_and_serving(chat_url)


def _assert_engine_free_and_serving(chat_url: str) -> None:
    r = post(chat_url, {"messages": HELLO, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(chat_url + "/health").json()["pending"] == 0


def test_a_request_id_in_use_is_refused(chat_url) -> None:
    body = {"messages": HELLO, "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST",
        chat_url + "/v1/chat/completions",
        json=body,
        headers={"X-Request-Id": "twice"},
        timeout=60,
    ) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: dropping the iterator would close the connection
        assert next(lines).startswith("data: ")
        again = post(
            chat_url, {"messages": HELLO, "max_tokens": 2}, headers={"X-Request-Id": "twice"}
        )
        assert again.status_code == 409 and again.json()["error"]["code"] == "duplicate_request_id"
    _assert_engine_free_and_serving(chat_url)


# -- bad input -------------------------------------------------------------------------------------

GOOD = {"messages": HELLO, "max_tokens": 3}


def with_(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


BAD_INPUTS: list[tuple[str, Any, int, str | None, str | None]] = [
    # (name, body, status, param, code)
    ("malformed JSON", b'{"messages": [', 400, None, "invalid_json"),
    ("empty body", b"", 400, None, "invalid_json"),
    (
        "NaN is not JSON",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        400,
        None,
        "invalid_json",
    ),
    ("body is a list", [GOOD], 400, None, "invalid_json"),
    ("body is a string", "hello", 400, None, "invalid_json"),
    ("missing messages", {"max_tokens": 3}, 400, "messages", None),
    ("empty messages", with_(messages=[]), 400, "messages", None),
    (
        "messages not a list",
        with_(messages={"role": "user", "content": "hi"}),
        400,
        "messages",
        None,
    ),
    ("message not an object", with_(messages=["hi"]), 400, "messages[0]", None),
    (
        "unknown role",
        with_(messages=[{"role": "robot", "content": "hi"}]),
        400,
        "messages[0].role",
        None,
    ),
    (
        "tool role",
        with_(messages=[*HELLO, {"role": "tool", "content": "42"}]),
        400,
        "messages[1].role",
        None,
    ),
    ("missing content", with_(messages=[{"role": "user"}]), 400, "messages[0].content", None),
    (
        "content a number",
        with_(messages=[{"role": "user", "content": 5}]),
        400,
        "messages[0].content",
        None,
    ),
    (
        "image part",
        with_(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        ),
        400,
        "messages[0].content[0]",
        None,
    ),
    ("roles that do not alternate", with_(messages=[*HELLO, *HELLO]), 400, "messages", None),
    ("temperature a string", with_(temperature="hot"), 400, "temperature", None),
    ("negative temperature", with_(temperature=-0.5), 400, "temperature", None),
    ("temperature above 2", with_(temperature=2.5), 400, "temperature", None),
    ("top_p zero", with_(top_p=0), 400, "top_p", None),
    ("max_tokens zero", with_(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens negative", with_(max_tokens=-5), 400, "max_tokens", None),
    ("max_tokens a string", with_(max_tokens="10"), 400, "max_tokens", None),
    ("max_tokens a float", with_(max_tokens=2.5), 400, "max_tokens", None),
    (
        "max_completion_tokens zero",
        with_(max_completion_tokens=0),
        400,
        "max_completion_tokens",
        None,
    ),
    ("stream a string", with_(stream="yes"), 400, "stream", None),
    ("stop a number", with_(stop=5), 400, "stop", None),
    ("seed a string", with_(seed="abc"), 400, "seed", None),
    ("model a number", with_(model=5), 400, "model", None),
    ("unknown model", with_(model="gpt-4o"), 404, "model", "model_not_found"),
    ("n above 1", with_(n=2), 400, "n", "unsupported_value"),
    (
        "tools",
        with_(tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "tools",
        "unsupported_parameter",
    ),
    ("logprobs", with_(logprobs=True), 400, "logprobs", "unsupported_parameter"),
    (
        "unknown response format",
        with_(response_format={"type": "yaml"}),
        400,
        "response_format",
        "unsupported_value",
    ),
    (
        "JSON nested 100 000 deep",
        b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
        None,
        "invalid_json",
    ),
    (
        "lone surrogate in content",
        with_(messages=[{"role": "user", "content": "a\ud800b"}]),
        400,
        "messages[0].content",
        None,
    ),
    (
        "lone surrogate in a text part",
        with_(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]),
        400,
        "messages[0].content[0].text",
        None,
    ),
    ("lone surrogate in stop", with_(stop="x\ud800"), 400, "stop", None),
    ("logprobs a string", with_(logprobs="yes"), 400, "logprobs", None),
    ("top_logprobs a string", with_(top_logprobs="5"), 400, "top_logprobs", None),
    ("stop empty", with_(stop=""), 400, "stop", None),
    ("an empty stop in a list", with_(stop=["end", ""]), 400, "stop[1]", None),
    (
        "only system turns that the template refuses (nothing to fold them into)",
        with_(messages=[{"role": "system", "content": ""}]),
        400,
        "messages",
        None,
    ),
    (
        "prompt longer than the context",
        with_(messages=[{"role": "user", "content": "hello " * 1500}]),
        400,
        "messages",
        "context_length_exceeded",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "param", "code"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_gets_an_openai_error_and_the_next_request_is_served(
    chat_url, reference, body, status, param, code
) -> None:
    r = post(chat_url, body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    good = post(chat_url, with_(temperature=0))
    assert good.status_code == 200
    assert good.json()["choices"][0]["message"]["content"] == expected(reference, HELLO, 3).text


def test_bad_request_id_header_and_ignored_fields(chat_url) -> None:
    r = post(chat_url, GOOD, headers={"X-Request-Id": "spaces are not allowed"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"
    ignored = with_(
        presence_penalty=0.5,
        frequency_penalty=0.1,
        user="u",
        logprobs=False,
        n=1,
        tool_choice="none",
        response_format={"type": "text"},
        metadata={"a": "b"},
    )
    assert post(chat_url, ignored).status_code == 200


def test_the_openai_client_raises_typed_errors(client) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert not_found.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="x", messages=[], max_tokens=2, extra_body={"model": None}
        )
    assert bad.value.body["param"] == "messages"


@pytest.mark.parametrize(
    "sampling",
    [{"top_p": 5e-324}, {"temperature": 5e-324}, {"temperature": 1e-30, "top_p": 1e-30}],
    ids=["top_p below float32", "temperature below float32", "both tiny"],
)
def test_extreme_but_valid_sampling_values_are_served(chat_url, sampling) -> None:
    """Found by schemathesis: a top_p that rounds to 0 in float32 dropped every token (a 500)."""
    r = post(chat_url, with_(**sampling))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
