"""Slow clients: a deadline for a request's headers, on uvicorn's HTTP/1.1 protocol.

uvicorn bounds idle keep-alive connections but not a client that sends its headers a byte at a time:
each byte resets nothing, yet the connection is held for as long as the client likes, and a few
hundred such connections exhaust the server's sockets. The deadline here is the *total* time from
the start of a request (the connection opening, or the previous response ending on a kept-alive
connection) to its complete headers; trickling bytes does not extend it. A client that misses it
gets ``408 Request Timeout`` and the connection is closed.

It is a subclass of uvicorn's h11 protocol because that is where the headers are parsed: the
request-response cycle object is created exactly when the headers are complete, which is the
signal used here. (The h11 implementation is the one uvicorn uses when httptools is not installed;
it is chosen explicitly so that the deadline always applies.)
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from neuroscope.server.defaults import DEFAULT_HEADER_TIMEOUT_S

REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: 44\r\n\r\n"
    b"The request headers did not arrive in time.\n"
)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for complete request headers."""

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_after: Any = None  # the cycle before the request whose headers are awaited

    def _arm(self) -> None:
        self._disarm()
        self._waiting_after = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _disarm_if_headers_arrived(self) -> None:
        # A new cycle object exists once h11 has parsed a complete request head.
        if self._header_timer is not None and self.cycle is not self._waiting_after:
            self._disarm()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is self._waiting_after and not self.transport.is_closing():
            self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._disarm_if_headers_arrived()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline
        super().on_response_complete()  # may start a pipelined request at once
        self._disarm_if_headers_arrived()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_with_header_timeout(timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class to hand to ``uvicorn.Config(http=...)``."""
    if not timeout_s > 0:
        raise ValueError(f"The header timeout must be positive, got {timeout_s}.")
    return type(
        "HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": timeout_s}
    )
