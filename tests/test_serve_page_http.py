"""The page's files, its Content-Security-Policy and CORS, over raw HTTP on real servers: the files
and ``/page.json`` are open on both ports, the API is not; the page's sibling origin is allowed by
default and nothing else unless ``--cors-origin`` names it; never ``*`` with credentials."""

from __future__ import annotations

import json

import pytest
from conftest import requires_torch
from serve_support import raw_request, start_server
from typer.testing import CliRunner

from neuroscope.cli import app
from neuroscope.errors import ConfigError
from neuroscope.server.page import STATIC, check_cors_origins

pytestmark = [pytest.mark.torch, requires_torch]

KEY = "sk-neuroscope-page-test"
VIEWER = "http://viewer.example:9000"
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def server(tiny_model, tiny_sae):
    server = start_server(tiny_model, tiny_sae["npz"], api_key=KEY, cors_origins=[VIEWER])
    yield server
    server.stop()


def ports(server) -> dict[str, tuple[str, int]]:
    listening = server.listening
    return {
        "chat": (listening.chat_url, listening.features_port),
        "features": (listening.features_url, listening.port),
    }


def sibling_origin(server, port: str) -> str:
    return f"http://127.0.0.1:{ports(server)[port][1]}"


@pytest.mark.parametrize("port", ["chat", "features"])
def test_the_page_and_its_files_are_open_on_both_ports_the_api_is_not(server, port) -> None:
    url, sibling = ports(server)[port]
    page = raw_request(url, "GET", "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert page.body.startswith(b"<!doctype html>")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert f"connect-src 'self' http://127.0.0.1:{sibling}" in csp
    # The sibling in the CSP is on the host the browser used.
    by_name = raw_request(url, "GET", "/", headers={"Host": f"localhost:{url.rsplit(':', 1)[1]}"})
    assert f"http://localhost:{sibling}" in by_name.headers["content-security-policy"]
    for name in sorted(p.name for p in STATIC.iterdir() if p.is_file()):
        got = raw_request(url, "GET", "/" + name, max_body=1 << 20)
        assert got.status == 200, name
        assert got.body == (STATIC / name).read_bytes()
        assert got.headers.get("x-content-type-options") == "nosniff"
    info = json.loads(raw_request(url, "GET", "/page.json").body)
    assert info["api_key"] is True and KEY not in json.dumps(info)
    assert {info["chat_port"], info["features_port"]} == {
        server.listening.port,
        server.listening.features_port,
    }
    for path in ("/../server/page.py", "/%2e%2e/page.py", "/.hidden", "/nothing.js"):
        assert raw_request(url, "GET", path).status in (401, 404), path
    api = "/v1/models" if port == "chat" else "/v1/features/labels"
    assert raw_request(url, "GET", api).status == 401


def preflight(url: str, path: str, origin: str, method: str = "POST"):
    return raw_request(
        url,
        "OPTIONS",
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type, x-request-id",
        },
    )


def test_the_chat_post_preflight_allows_the_sibling_page_and_named_origins_only(server) -> None:
    chat = server.listening.chat_url
    for origin in (sibling_origin(server, "chat"), VIEWER):
        ok = preflight(chat, "/v1/chat/completions", origin)
        assert ok.status in (200, 204), (origin, ok.status, ok.body)
        assert ok.headers["access-control-allow-origin"] == origin
        allowed = ok.headers["access-control-allow-headers"].lower()
        assert {"authorization", "content-type", "x-request-id"} <= set(
            h.strip() for h in allowed.split(",")
        )
        assert "access-control-allow-credentials" not in ok.headers
    refused = preflight(chat, "/v1/chat/completions", EVIL)
    assert "access-control-allow-origin" not in refused.headers
    assert refused.status >= 400


@pytest.mark.parametrize("port", ["chat", "features"])
def test_responses_carry_cors_headers_only_for_allowed_origins(server, port) -> None:
    url, _ = ports(server)[port]
    path = "/v1/models" if port == "chat" else "/v1/features/labels"
    auth = {"Authorization": f"Bearer {KEY}"}
    for origin in (sibling_origin(server, port), VIEWER):
        r = raw_request(url, "GET", path, headers={**auth, "Origin": origin}, max_body=1 << 20)
        assert r.status == 200
        assert r.headers["access-control-allow-origin"] == origin
        assert "x-request-id" in r.headers.get("access-control-expose-headers", "").lower()
        assert "access-control-allow-credentials" not in r.headers
    # A 401 is readable by an allowed page (so it can ask for the key) ...
    no_key = raw_request(url, "GET", path, headers={"Origin": VIEWER})
    assert no_key.status == 401 and no_key.headers["access-control-allow-origin"] == VIEWER
    # ... and nothing is readable by another site.
    other = raw_request(url, "GET", path, headers={**auth, "Origin": EVIL}, max_body=1 << 20)
    assert "access-control-allow-origin" not in other.headers


def test_cors_origin_values_are_checked() -> None:
    assert check_cors_origins([" http://a.example/ ", "https://b.example:8443"], api_key=True) == (
        "http://a.example",
        "https://b.example:8443",
    )
    assert check_cors_origins(["*"], api_key=False) == ("*",)
    with pytest.raises(ConfigError, match="cannot be combined with --api-key"):
        check_cors_origins(["*"], api_key=True)
    for bad in ("example.com", "http://a.example/path", "ftp://a.example", "http://a b"):
        with pytest.raises(ConfigError, match="is not an origin"):
            check_cors_origins([bad], api_key=False)


def test_the_cli_reads_cors_origins_from_its_option_and_env(monkeypatch) -> None:
    monkeypatch.setenv("NEUROSCOPE_API_KEY", "k")
    result = CliRunner().invoke(
        app, ["serve", "--model", "/nonexistent", "--cors-origin", "*"], catch_exceptions=False
    )
    assert result.exit_code == 1 and "cannot be combined with --api-key" in result.output
    monkeypatch.setenv("NEUROSCOPE_CORS_ORIGINS", "http://a.example, nonsense")
    result = CliRunner().invoke(app, ["serve", "--model", "/nonexistent"])
    assert result.exit_code == 1 and "'nonsense' is not an origin" in result.output
    assert "Loading" not in result.output
