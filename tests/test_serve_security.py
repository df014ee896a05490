"""The API key cannot be bypassed by spelling a path differently, and slow clients cannot hold the
servers: requests are sent raw (``http.client``, the path exactly as written) to a real server."""

from __future__ import annotations

import json

import pytest
from conftest import requires_torch
from serve_support import raw_request, start_server

pytestmark = [pytest.mark.torch, requires_torch]

KEY = "sk-neuroscope-security-test-41d2"
CHAT_BODY = json.dumps(
    {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "stream": True}
).encode()


@pytest.fixture(scope="module")
def server(tiny_model, tiny_sae):
    server = start_server(tiny_model, tiny_sae["npz"], api_key=KEY)
    yield server
    server.stop()


def spellings(path: str) -> list[str]:
    """Ways to write ``path`` (``/v1/...``) that a router might take for it."""
    rest = path[len("/v1/") :]
    first, _, tail = rest.partition("/")
    return [
        path,
        "/" + path,
        "//" + path,
        path.replace("/v1/", "/v1//"),
        path + "/",
        path + "//",
        "/%2F" + path[1:],
        path.replace("/v1/", "/v1%2F"),
        path.replace("/v1/", "/v1%2f"),
        "/./" + path[1:],
        path.replace("/v1/", "/v1/./"),
        "/x/.." + path,
        "/v1/x/../" + rest,
        "/%2e/" + path[1:],
        path.upper(),
        path.replace("/v1/", "/V1/"),
        f"/v1/{first.upper()}/{tail}" if tail else f"/v1/{first.upper()}",
        path + "?x=1",
        path + "%00",
        path + ";x",
        "/health/.." + path,
        "/health/../.." + path,
    ]


PROTECTED = {
    "chat": [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models/x")],
    "features": [("GET", "/v1/features/stream"), ("GET", "/v1/features/labels")],
}


@pytest.mark.parametrize("port", ["chat", "features"])
def test_no_spelling_of_a_protected_path_skips_the_key(server, port) -> None:
    url = server.listening.chat_url if port == "chat" else server.listening.features_url
    served = []
    for method, path in PROTECTED[port]:
        for spelled in spellings(path):
            body = CHAT_BODY if method == "POST" else None
            headers = {"Content-Type": "application/json"} if body else {}
            r = raw_request(url, method, spelled, headers=headers, body=body)
            if r.status not in (401, 404) or "event-stream" in r.headers.get("content-type", ""):
                served.append(f"{method} {spelled} -> {r.status} {r.body[:80]!r}")
            if r.status == 401:
                assert KEY not in r.body.decode()
                assert set(json.loads(r.body)["error"]) == {"message", "type", "param", "code"}
    assert not served, "served without the key:\n" + "\n".join(served)
    # With the key, the plain spelling is served: the matrix above did not pass only by refusing all.
    auth = {"Authorization": f"Bearer {KEY}"}
    method, path = PROTECTED[port][0]
    assert raw_request(url, method, path + ("?phase=all" if port == "features" else ""),
                       headers=auth, max_body=16).status == 200  # fmt: skip


@pytest.mark.parametrize("port", ["chat", "features"])
def test_health_stays_open(server, port) -> None:
    url = server.listening.chat_url if port == "chat" else server.listening.features_url
    assert raw_request(url, "GET", "/health").status == 200


def test_an_unknown_path_on_either_port_is_a_404_or_401_not_a_page(server) -> None:
    for url in (server.listening.chat_url, server.listening.features_url):
        for path in ("/v1/nothing", "/v1/features/nothing", "/../../etc/passwd", "/v1/../../x"):
            assert raw_request(url, "GET", path).status in (401, 404), (url, path)
