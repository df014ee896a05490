"""The API key cannot be bypassed by spelling a path differently, and slow clients cannot hold the
servers: requests are sent raw (``http.client``, the path exactly as written) to a real server."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
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


# -- slow clients ------------------------------------------------------------------------------------

HEADER_TIMEOUT = 1.5
MAX_CONNECTIONS = 64


@pytest.fixture(scope="module")
def limited(tiny_model, tiny_sae):
    server = start_server(
        tiny_model,
        tiny_sae["npz"],
        header_timeout_s=HEADER_TIMEOUT,
        max_connections=MAX_CONNECTIONS,
    )
    yield server
    server.stop()


def slow_connection(url: str) -> socket.socket:
    """A connection that has sent part of a request head and will send the rest very slowly."""
    where = urlsplit(url)
    sock = socket.create_connection((where.hostname, where.port), timeout=10)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    return sock


def test_a_client_trickling_its_headers_is_cut_off_after_the_header_timeout(limited) -> None:
    sock = slow_connection(limited.listening.chat_url)
    start = time.monotonic()
    got = b""
    try:
        sock.settimeout(0.2)
        while time.monotonic() - start < HEADER_TIMEOUT * 4:
            try:
                sock.sendall(b"X-Slow: 1\r\n")  # each byte arrives in time; the total does not
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            got += chunk
            if not chunk:
                break
    finally:
        sock.close()
    took = time.monotonic() - start
    assert got.startswith(b"HTTP/1.1 408"), got
    assert HEADER_TIMEOUT * 0.8 < took < HEADER_TIMEOUT * 3, took


def test_normal_requests_succeed_while_dozens_of_slow_connections_are_open(limited) -> None:
    chat = limited.listening.chat_url
    slow = [slow_connection(u) for u in (chat, limited.listening.features_url) for _ in range(50)]
    try:
        time.sleep(0.2)
        reply = httpx.post(
            chat + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        assert httpx.get(limited.listening.features_url + "/health").status_code == 200
        # Past the bound, new requests are refused at once rather than queued behind the slow ones.
        more = [slow_connection(chat) for _ in range(MAX_CONNECTIONS - 50)]
        slow += more
        time.sleep(0.2)
        assert httpx.get(chat + "/health").status_code == 503
        # The header timeout frees them all; the server serves again.
        time.sleep(HEADER_TIMEOUT + 0.5)
        assert httpx.get(chat + "/health").status_code == 200
    finally:
        for sock in slow:
            sock.close()
