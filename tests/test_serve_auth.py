"""`--api-key`: a bearer token required on both ports (health checks and the page stay open)."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import requires_torch
from serve_support import FeatureStream, start_server

pytestmark = [pytest.mark.torch, requires_torch]

KEY = "sk-neuroscope-test-7f3a9c"
HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


@pytest.fixture(scope="module")
def server(tiny_model, tiny_sae):
    server = start_server(tiny_model, tiny_sae["npz"], api_key=KEY)
    yield server
    server.stop()


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.listening.chat_url + "/v1", api_key=key, max_retries=0)


def test_the_right_key_serves_chats_and_the_feature_stream(server, tiny_model) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    with FeatureStream(server.listening.features_url, headers=auth) as stream:
        reply = client(server, KEY).chat.completions.create(
            model=str(tiny_model), messages=HELLO, max_tokens=5, temperature=0
        )
        assert stream.completion(reply.id)["completion_tokens"] == 5
        assert (
            "".join(r["token"] for r in stream.records(reply.id))
            == reply.choices[0].message.content
        )
    chunks = list(
        client(server, KEY).chat.completions.create(
            model=str(tiny_model), messages=HELLO, max_tokens=5, temperature=0, stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    labels = httpx.get(server.listening.features_url + "/v1/features/labels", headers=auth)
    assert labels.status_code == 200 and len(labels.json()) == 128


def test_a_wrong_key_is_refused_in_openai_shape_without_echoing_it(server, tiny_model) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        client(server, "sk-wrong").chat.completions.create(model=str(tiny_model), messages=HELLO)
    body = refused.value.body
    assert body["code"] == "invalid_api_key" and body["type"] == "invalid_request_error"
    assert "sk-wrong" not in str(body) and KEY not in str(body)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY}x"},
    ],
    ids=["missing", "empty bearer", "basic scheme", "key with a suffix"],
)
def test_every_api_path_on_both_ports_needs_the_key(server, headers) -> None:
    chat, features = server.listening.chat_url, server.listening.features_url
    requests = [
        ("POST", chat + "/v1/chat/completions"),
        ("GET", chat + "/v1/models"),
        ("GET", features + "/v1/features/stream"),
        ("GET", features + "/v1/features/labels"),
    ]
    for method, url in requests:
        r = httpx.request(method, url, headers=headers, json={"messages": HELLO, "max_tokens": 2})
        assert r.status_code == 401, url
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert KEY not in r.text
    # Health checks and the page stay open; the next good request is served as usual.
    assert httpx.get(chat + "/health").status_code == 200
    assert httpx.get(features + "/health").status_code == 200
    assert httpx.get(features + "/").status_code == 200
    good = httpx.get(chat + "/v1/models", headers={"authorization": f"bearer {KEY}"})
    assert good.status_code == 200
