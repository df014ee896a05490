"""The live page on both ports: its static files, ``/page.json``, its Content-Security-Policy, and
the CORS that lets it (and only the origins named by ``--cors-origin``) reach the other port.

The page is served by the features port (``/``) and by the chat port (``/``): whichever the browser
opened, the other port is a different origin, so each port allows its sibling's origins by default
(on the loopback names, and on ``--host`` when it names one host). Nothing else is allowed unless
``--cors-origin`` names it: a page on any other site could otherwise read the user's conversation.
No credentials mode: the API key travels in the ``Authorization`` header, never in a cookie.

These routes are on the API key's open list: the browser needs them before anyone can type a key,
and none of them holds a secret (``/page.json`` says whether a key is needed, not which).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar import Request, Response, get
from litestar.config.cors import CORSConfig

from neuroscope.engine import Engine
from neuroscope.errors import ConfigError
from neuroscope.server.auth import OPEN
from neuroscope.server.errors import APIError

STATIC = Path(__file__).parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# What a browser sends to the other port: the key, JSON, the page's own request id, the SSE resume id.
CORS_HEADERS = ["Authorization", "Content-Type", "X-Request-Id", "Last-Event-ID"]
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
# A Host header's host part: a DNS name, IPv4, or a bracketed IPv6 literal; anything else is ignored.
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})$")


@dataclass(frozen=True)
class PagePorts:
    """Where the two servers listen, as the page needs to know it."""

    chat: int
    features: int


def static_files() -> dict[str, Path]:
    """The page's files by URL name (read from the package at start-up: a fixed list)."""
    return {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}


def _host_of(request: Request, fallback: str) -> str:
    host = (request.headers.get("host") or "").strip()
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]", 1)[0] + "]"
    return name if _HOST.match(name) else fallback


def content_security_policy(request: Request, sibling_port: int) -> str:
    """Scripts, styles, images and connections from the page's own origin, plus connections to
    the sibling port on the host the browser used; no inline script or style, no plugins."""
    sibling = f"{request.url.scheme}://{_host_of(request, '127.0.0.1')}:{sibling_port}"
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src 'self' {sibling}; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'none'"
    )


def page_routes(
    engine: Engine,
    ports: PagePorts,
    *,
    role: str,
    api_key: bool,
    model_name: Callable[[], str] | None = None,
) -> list[Any]:
    """``GET /``, ``GET /<file>`` and ``GET /page.json`` for the port ``role`` ("chat" or
    "features")."""
    files = static_files()
    sibling = ports.chat if role == "features" else ports.features

    def serve(request: Request, name: str) -> Response[bytes]:
        path = files.get(name)
        if path is None:
            raise APIError(404, f"No such file: /{name}. The page is at /.", code="not_found")
        headers = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
        if path.suffix == ".html":
            headers["Content-Security-Policy"] = content_security_policy(request, sibling)
            headers["Cache-Control"] = "no-cache"
        return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=headers)

    @get("/", opt=OPEN, include_in_schema=False)
    async def index(request: Request) -> Response[bytes]:
        return serve(request, "index.html")

    @get("/{name:str}", opt=OPEN, include_in_schema=False)
    async def static_file(request: Request, name: str) -> Response[bytes]:
        return serve(request, name)

    @get("/page.json", opt=OPEN, include_in_schema=False)
    async def page_json() -> dict[str, Any]:
        info = engine.info
        return {
            "chat_port": ports.chat,
            "features_port": ports.features,
            "model": model_name() if model_name else info.model_name,  # the chat API's name
            "layers": list(info.layers),
            "sae_ids": {str(layer): sae for layer, sae in info.sae_ids.items()},
            "top_k": info.top_k,
            "api_key": api_key,
            "feature_info": True,
        }

    return [index, static_file, page_json]


_ORIGIN = re.compile(r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(:[0-9]{1,5})?$")
CORS_ENV = "NEUROSCOPE_CORS_ORIGINS"


def check_cors_origins(origins: Iterable[str], *, api_key: bool) -> tuple[str, ...]:
    """``--cors-origin`` values as a tuple; a ConfigError for anything that is not an origin.

    ``*`` (any site) is accepted only without ``--api-key``: the key exists to keep other people
    out, and a wildcard would let any page the user visits read the streams once the key is typed
    into it. Credentials mode (cookies) is never enabled, wildcard or not.
    """
    out = []
    for origin in origins:
        origin = origin.strip().rstrip("/")
        if not origin:
            continue
        if origin == "*":
            if api_key:
                raise ConfigError(
                    "--cors-origin '*' cannot be combined with --api-key: name the origins whose "
                    "pages may read this server (e.g. --cors-origin https://viewer.example)."
                )
        elif not _ORIGIN.match(origin):
            raise ConfigError(
                f"--cors-origin {origin!r} is not an origin: give scheme://host[:port], e.g. "
                "http://localhost:5173, with no path."
            )
        out.append(origin)
    return tuple(dict.fromkeys(out))


def cors_config(sibling_port: int, host: str, cors_origins: tuple[str, ...] = ()) -> CORSConfig:
    """CORS for the sibling port's page (loopback names, and ``host`` when it names one host) and
    for each ``--cors-origin``."""
    hosts = list(LOOPBACK)
    if host not in ("", "0.0.0.0", "::", "127.0.0.1", "localhost", "::1"):
        hosts.append(f"[{host}]" if ":" in host else host)
    origins = [f"http://{h}:{sibling_port}" for h in hosts] + list(cors_origins)
    return CORSConfig(
        allow_origins=origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=CORS_HEADERS,
        expose_headers=["X-Request-Id"],
        allow_credentials=False,
    )
