"""Run both servers (chat :8080, features :8081) in one process, on one event loop, around one engine.

Order matters to users: the ports are bound first (a port in use fails in a second, not after the
model has loaded), the model loads, and only then do the servers listen and say where. SIGINT and
SIGTERM stop accepting connections, end feature streams, cancel generations (within one token) and
return; a second SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import uvicorn

from neuroscope.engine import Engine, EngineInfo
from neuroscope.errors import ConfigError
from neuroscope.hub import DEFAULT_REPLAY, DEFAULT_SUBSCRIBER_QUEUE, Hub
from neuroscope.server.chat import create_chat_app
from neuroscope.server.defaults import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS
from neuroscope.server.features import DEFAULT_KEEPALIVE_S, create_features_app
from neuroscope.server.limits import protocol_with_header_timeout
from neuroscope.server.page import PagePorts, check_cors_origins

if TYPE_CHECKING:
    from neuroscope.session import Session


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080  # chat API; 0 picks a free port
    features_port: int = 8081  # feature stream; 0 picks a free port
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()  # --cors-origin: other sites' pages that may read both ports
    served_model_name: str | None = None  # default: a model file's stem, else --model as given
    max_model_len: int | None = None
    max_batch: int = 1  # requests decoding together (continuous batching); 1: one at a time
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    subscriber_queue: int = DEFAULT_SUBSCRIBER_QUEUE
    replay_events: int = DEFAULT_REPLAY  # hub-wide ring for clients resuming with Last-Event-ID
    graceful_timeout_s: float = 5.0  # after this, connections still open at shutdown are cut
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S  # a request's complete headers, per request
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # per port; beyond it new requests get a 503

    def __post_init__(self) -> None:
        if not self.header_timeout_s > 0:
            raise ConfigError(f"--header-timeout must be positive, got {self.header_timeout_s}.")
        if self.max_connections < 1:
            raise ConfigError(f"--max-connections must be at least 1, got {self.max_connections}.")
        self.cors_origins = check_cors_origins(self.cors_origins, api_key=bool(self.api_key))


@dataclass(frozen=True)
class Listening:
    """Where the servers listen (the real ports, when 0 was asked for)."""

    host: str
    port: int
    features_port: int

    @property
    def chat_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def features_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.features_port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def bind_socket(host: str, port: int, option: str) -> socket.socket:
    """A bound, not yet listening, TCP socket; a clear ConfigError if the port cannot be had.

    Bound but not listening: connections are refused (not left hanging) until the model is loaded.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(
            f"--host {host!r} is not an address this machine can listen on ({e})."
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"Port {port} on {host} is in use (another neuroscope serve?). Stop that process or "
                f"pass another {option}."
            ) from None
        raise ConfigError(
            f"Cannot listen on {host}:{port} ({e.strerror}); check {option} and --host."
        ) from None
    sock.set_inheritable(True)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: one handler here stops both servers together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ServerPair:
    """The two uvicorn servers on the running loop, sharing one engine and one hub."""

    def __init__(
        self, engine: Engine, config: ServeConfig, sockets: tuple[socket.socket, socket.socket]
    ):
        self.engine = engine
        self.config = config
        self.sockets = sockets
        self.listening = Listening(
            config.host, sockets[0].getsockname()[1], sockets[1].getsockname()[1]
        )
        ports = PagePorts(chat=self.listening.port, features=self.listening.features_port)
        origins = tuple(config.cors_origins)
        chat = create_chat_app(
            engine, api_key=config.api_key, served_model_name=config.served_model_name,
            ports=ports, host=config.host, cors_origins=origins,
        )  # fmt: skip
        features = create_features_app(
            engine, engine.hub, api_key=config.api_key, keepalive_s=config.keepalive_s,
            subscriber_queue=config.subscriber_queue, ports=ports, host=config.host,
            cors_origins=origins, served_model_name=config.served_model_name,
        )  # fmt: skip
        self.servers = [_Uvicorn(self._uvicorn_config(app)) for app in (chat, features)]
        self.stopping = False
        self._hub_closing: asyncio.Future[None] | None = None

    def _uvicorn_config(self, app: Any) -> uvicorn.Config:
        return uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on", ws="none",
            timeout_graceful_shutdown=math.ceil(self.config.graceful_timeout_s),
            http=protocol_with_header_timeout(self.config.header_timeout_s),
            limit_concurrency=self.config.max_connections,
        )  # fmt: skip

    async def serve(self, on_ready: Callable[[Listening], None] | None = None) -> None:
        tasks = [
            asyncio.ensure_future(server.serve(sockets=[sock]))
            for server, sock in zip(self.servers, self.sockets, strict=True)
        ]
        while not all(server.started for server in self.servers):
            if any(task.done() for task in tasks):
                for server in self.servers:  # one failed to start: stop the other too, then
                    server.should_exit = True  # gather below raises the failure
                break
            await asyncio.sleep(0.01)
        else:
            if on_ready is not None:
                on_ready(self.listening)
        await asyncio.gather(*tasks)

    def shutdown(self) -> None:
        """Begin a graceful stop (call on the loop); calling it again forces the exit."""
        if self.stopping:
            for server in self.servers:
                server.force_exit = True
            return
        self.stopping = True
        self.engine.cancel_all()  # queued requests are skipped, the running one stops in a token
        for server in self.servers:
            server.should_exit = True
        self._hub_closing = asyncio.ensure_future(self._close_hub_when_drained())

    async def _close_hub_when_drained(self) -> None:
        """End the feature streams (so their connections can close) once every cancelled request
        has published its ``generation_complete`` (``cancelled``), or after the graceful timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.graceful_timeout_s
        while self.engine.pending and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.engine.hub.close()  # delivers what was published before it, then ends each stream


def bind_sockets(config: ServeConfig) -> tuple[socket.socket, socket.socket]:
    chat = bind_socket(config.host, config.port, "--port")
    try:
        features = bind_socket(config.host, config.features_port, "--features-port")
    except BaseException:
        chat.close()
        raise
    if chat.getsockname()[1] == features.getsockname()[1]:
        chat.close()
        features.close()
        raise ConfigError("--port and --features-port must differ.")
    return chat, features


def serve(
    load_session: Callable[[], Session],
    config: ServeConfig,
    *,
    on_loading: Callable[[], None] | None = None,
    on_loaded: Callable[[EngineInfo], None] | None = None,
    on_ready: Callable[[Listening], None] | None = None,
    on_stopping: Callable[[], None] | None = None,
) -> None:
    """Bind, load, serve until SIGINT/SIGTERM, shut down. Blocks; call from the main thread."""
    sockets = bind_sockets(config)
    if on_loading is not None:
        on_loading()
    engine = Engine(
        load_session,
        Hub(config.subscriber_queue, config.replay_events),
        max_model_len=config.max_model_len,
        max_batch=config.max_batch,
    )
    try:
        info = engine.start()
        if on_loaded is not None:
            on_loaded(info)
        asyncio.run(_serve_with_signals(ServerPair(engine, config, sockets), on_ready, on_stopping))
    finally:
        engine.close()
        for sock in sockets:
            sock.close()


async def _serve_with_signals(
    pair: ServerPair,
    on_ready: Callable[[Listening], None] | None,
    on_stopping: Callable[[], None] | None,
) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if not pair.stopping and on_stopping is not None:
            on_stopping()
        pair.shutdown()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop)
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop))
    await pair.serve(on_ready)


class BackgroundServer:
    """Both servers on a background thread: for tests, notebooks and embedding.

    with BackgroundServer(lambda: Session(...), ServeConfig(port=0, features_port=0)) as server:
        openai.OpenAI(base_url=server.listening.chat_url + "/v1", api_key="-")
    """

    def __init__(self, load_session: Callable[[], Session], config: ServeConfig | None = None):
        self.config = config or ServeConfig(port=0, features_port=0)
        self._load_session = load_session
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pair: ServerPair | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.engine: Engine | None = None
        self.listening: Listening | None = None

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        sockets = bind_sockets(self.config)
        engine = Engine(
            self._load_session,
            Hub(self.config.subscriber_queue, self.config.replay_events),
            max_model_len=self.config.max_model_len,
            max_batch=self.config.max_batch,
        )
        try:
            engine.start(timeout)
        except BaseException:
            engine.close()
            for sock in sockets:
                sock.close()
            raise
        self.engine = engine
        self._pair = ServerPair(engine, self.config, sockets)
        self._thread = threading.Thread(target=self._run, name="neuroscope-servers", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f"The servers did not start: {self._error!r}")
        return self

    def _run(self) -> None:
        assert self._pair is not None

        def ready(listening: Listening) -> None:
            self.listening = listening
            self._ready.set()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            await self._pair.serve(ready)  # type: ignore[union-attr]

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()

    def stop(self, timeout: float = 15.0) -> None:
        if (
            self._loop is not None
            and self._pair is not None
            and self._thread
            and self._thread.is_alive()
        ):
            with contextlib.suppress(RuntimeError):  # the loop already finished
                self._loop.call_soon_threadsafe(self._pair.shutdown)
            self._thread.join(timeout)
        if self.engine is not None:
            self.engine.close()
        if self._pair is not None:
            for sock in self._pair.sockets:
                sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
