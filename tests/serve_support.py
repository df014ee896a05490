"""Helpers for the serve tests: a real server on free loopback ports, and a feature-stream reader."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

from neuroscope.server.run import BackgroundServer, ServeConfig
from neuroscope.synthetic import build_tiny_gemma2

TINY_LAYER = 2
# Long enough that a generation can run for seconds: cancellation must be seen to cut it short.
LONG_CONTEXT = 4096


def build_long_context_model(folder: Path) -> Path:
    return build_tiny_gemma2(folder, max_position_embeddings=LONG_CONTEXT)


def session_loader(model: Path, sae_npz: Path, **kwargs: Any) -> Callable[[], Any]:
    kwargs.setdefault("layer", TINY_LAYER)

    def load() -> Any:
        from neuroscope.session import Session

        return Session(
            model=str(model), sae_local_path=str(sae_npz), backend="torch", top_k=5, **kwargs
        )

    return load


def start_server(
    model: Path, sae_npz: Path, session: dict[str, Any] | None = None, **config: Any
) -> BackgroundServer:
    config.setdefault("keepalive_s", 0.3)
    return BackgroundServer(
        session_loader(model, sae_npz, **(session or {})),
        ServeConfig(port=0, features_port=0, **config),
    ).start()


@dataclass
class Event:
    name: str
    data: dict[str, Any]
    id: str | None = None


class FeatureStream:
    """Reads ``/v1/features/stream`` on a thread (with httpx-sse) and keeps every event.

    Entering returns once the response headers are in, by which time the server has subscribed it:
    nothing published afterwards is missed.
    """

    def __init__(
        self, url: str, params: dict[str, str] | None = None, headers: dict[str, str] | None = None
    ):
        self.url = url + "/v1/features/stream"
        self.params = params or {}
        self.headers = headers or {}
        self.events: list[Event] = []
        self.status: int | None = None
        self._changed = threading.Condition()
        self._connected = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(30.0, read=None))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self.error: BaseException | None = None
        self.ended = False

    def _read(self) -> None:
        try:
            with connect_sse(
                self._client, "GET", self.url, params=self.params, headers=self.headers
            ) as source:
                self.status = source.response.status_code
                self._connected.set()
                for sse in source.iter_sse():
                    with self._changed:
                        self.events.append(Event(sse.event, json.loads(sse.data), sse.id or None))
                        self._changed.notify_all()
        except BaseException as e:  # noqa: BLE001 - closed by the test, or the server stopped
            self.error = e
        finally:
            self._connected.set()
            with self._changed:
                self.ended = True
                self._changed.notify_all()

    def __enter__(self) -> FeatureStream:
        self._thread.start()
        assert self._connected.wait(10), "the feature stream did not connect"
        assert self.status == 200, f"feature stream answered {self.status}: {self.error!r}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()
        self._thread.join(5)

    def completion(self, request_id: str, timeout: float = 20.0) -> dict[str, Any]:
        """Wait for the request's generation_complete event; return its data."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events:
                    if (
                        event.name == "generation_complete"
                        and event.data["request_id"] == request_id
                    ):
                        return event.data
                left = deadline - time.monotonic()
                assert left > 0 and not self.ended, f"no generation_complete for {request_id}"
                self._changed.wait(left)

    def records(self, request_id: str) -> list[dict[str, Any]]:
        with self._changed:
            return [
                e.data
                for e in self.events
                if e.name == "feature_activation" and e.data["request_id"] == request_id
            ]

    def request_ids(self) -> set[str]:
        with self._changed:
            return {e.data["request_id"] for e in self.events if "request_id" in e.data}


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


def raw_request(
    url: str,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
    max_body: int = 65536,
) -> RawResponse:
    """One request with ``path`` sent exactly as given (httpx normalises ``//`` and dot segments).

    Reads at most ``max_body`` bytes of the body, so a stream that never ends cannot hang a test.
    """
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=timeout)
    try:
        given = {name.lower() for name in headers or {}}
        conn.putrequest(method, path, skip_host="host" in given, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        got = {k.lower(): v for k, v in response.getheaders()}
        if method == "HEAD" or not max_body:
            data = b""
        elif "content-length" in got:  # a whole body: read it all (up to max_body)
            data = response.read(min(int(got["content-length"]), max_body))
        else:  # a stream: what has arrived
            data = response.read1(max_body)
        return RawResponse(response.status, got, data)
    finally:
        conn.close()
