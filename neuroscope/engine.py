"""The engine: one worker thread owns the model and runs requests one at a time, in arrival order.

Servers talk to it from an asyncio loop: ``prepare`` (tokenize and check a prompt, off the loop),
``submit`` (queue a request, get a ``RequestHandle``), then iterate the handle's events. Every feature
record and completion also goes to the ``Hub`` for the feature stream. The engine knows no HTTP; the
servers never touch the model or its tensors.

Why one thread: a backend holds one KV cache and (MLX) thread-bound device streams, so the session is
built and used on the worker thread only. Cancellation is a flag the generation loop checks after
every token, so a request whose client went away frees the engine within one token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from neuroscope.anomaly import DEFAULT_ANOMALY_Z, anomalies
from neuroscope.batching import can_batch
from neuroscope.errors import ConfigError, NeuroscopeError
from neuroscope.generation import Event, TextDelta
from neuroscope.hub import Hub, LoopBatcher
from neuroscope.records import GenerationComplete, TokenFeatures
from neuroscope.steering import SAE_HINT_CLI, MonitorEvent, SteeringPlan, SteeringTarget

if TYPE_CHECKING:
    from neuroscope.batching import BatchedEvents, BatchScheduler
    from neuroscope.feature_info import FeatureInfo
    from neuroscope.grammar import Grammar
    from neuroscope.session import Session

log = logging.getLogger("neuroscope.engine")

DEFAULT_MAX_PENDING = 64  # queued requests beyond the running one; more are refused (busy)
FALLBACK_MAX_TOKENS = 4096  # when neither the request nor the model bounds a reply


class EngineError(NeuroscopeError):
    """A request the engine cannot take or could not finish; ``status`` is the HTTP status it maps to."""

    status = 500


class PromptTooLong(ConfigError):
    """The prompt alone fills the context."""


class EngineBusy(EngineError):
    status = 429


class EngineClosed(EngineError):
    status = 503


class DuplicateRequestId(EngineError, ConfigError):
    status = 409


class RequestFailed(EngineError):
    """The generation raised; the worker survived and serves the next request."""


@dataclass(frozen=True)
class EngineInfo:
    """What servers may know about the loaded model, read once after loading."""

    model_name: str
    layers: tuple[int, ...]
    sae_ids: dict[int, str]
    sae_widths: dict[int, int]
    top_k: int
    backend: str
    device: str
    max_context: int | None  # tokens, prompt and reply together
    steering_target: SteeringTarget | None = None  # what steering requests are checked against


@dataclass(frozen=True)
class PreparedPrompt:
    prompt_ids: list[int]
    max_tokens: int  # what fits the context (at most what was asked)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    steering: SteeringPlan | None = None  # checked against EngineInfo.steering_target
    response_format: Grammar | None = None  # structured output, from Engine.grammar


@dataclass
class Completion:
    """A finished non-streaming generation."""

    request_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    monitor_events: list[MonitorEvent] = field(default_factory=list)


@dataclass
class _Failure:
    error: BaseException


class RequestHandle:
    """One queued or running request, consumed on the loop that submitted it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, records: bool):
        self.request = request
        self.records = records
        self._stop = threading.Event()
        self._buffer: deque[Event | _Failure] = deque()
        self._ready = asyncio.Event()
        self._batcher: LoopBatcher[Event | _Failure] = LoopBatcher(loop, self._receive)
        self.tokens_done = 0  # generated tokens whose records are out (written by the worker)
        self.tokens_done_at_cancel: int | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def cancel(self) -> None:
        """Thread-safe. A queued request is skipped; a running one stops after its current token."""
        if not self._stop.is_set():
            self.tokens_done_at_cancel = self.tokens_done
            self._stop.set()

    def _put(self, item: Event | _Failure) -> None:  # worker thread
        self._batcher.put(item)

    def _receive(self, items: list[Event | _Failure]) -> None:  # loop
        self._buffer.extend(items)
        self._ready.set()

    async def batches(self) -> AsyncIterator[list[Event]]:
        """Events in order, as many at a time as are ready; ends after ``GenerationComplete``.

        Raises ``RequestFailed`` (or the ``ConfigError`` that ended it) if the generation raised.
        """
        while True:
            await self._ready.wait()
            self._ready.clear()
            items = list(self._buffer)
            self._buffer.clear()
            batch: list[Event] = []
            for item in items:
                if isinstance(item, _Failure):
                    if batch:
                        yield batch
                    raise item.error
                batch.append(item)
                if isinstance(item, GenerationComplete):
                    yield batch
                    return
            if batch:
                yield batch

    async def events(self) -> AsyncIterator[Event]:
        async for batch in self.batches():
            for event in batch:
                yield event

    async def result(self) -> Completion:
        """Wait for the whole reply (cancel the handle if the caller gives up)."""
        text: list[str] = []
        monitors: list[MonitorEvent] = []
        async for event in self.events():
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, MonitorEvent):
                monitors.append(event)
            elif isinstance(event, GenerationComplete):
                return Completion(
                    self.request_id,
                    "".join(text),
                    event.finish_reason,
                    event.prompt_tokens,
                    event.completion_tokens,
                    monitors,
                )
        raise RequestFailed(f"Request {self.request_id} ended without completing.")


@dataclass
class _Call:
    """A job that is not a generation: ``fn(session)`` on the worker (``Engine.call``)."""

    fn: Callable[[Session], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _describe(session: Session) -> EngineInfo:
    return EngineInfo(
        model_name=session.model_name,
        layers=tuple(session.layers),
        sae_ids={layer: sae.id for layer, sae in session.saes.items()},
        sae_widths={layer: sae.width for layer, sae in session.saes.items()},
        top_k=session.builder.top_k,
        backend=type(session.backend).__name__,
        device=session.backend.device,
        max_context=session.max_context,
        steering_target=session.steering_target(SAE_HINT_CLI),
    )


class Engine:
    """Owns a ``Session`` on a worker thread; see the module docstring.

    ``load_session`` runs on the worker thread (``start`` waits for it and re-raises its error).
    ``max_model_len`` caps the context below the model's own.
    """

    def __init__(
        self,
        load_session: Callable[[], Session],
        hub: Hub | None = None,
        *,
        max_model_len: int | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_batch: int = 1,
    ):
        if max_model_len is not None and max_model_len < 2:
            raise ConfigError(f"--max-model-len must be at least 2 tokens, got {max_model_len}.")
        if max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {max_batch}.")
        # Requests decoding together (neuroscope.batching); 1 runs them one at a time as before.
        self.max_batch = max_batch
        self.widest_batch = 0  # the most requests one decode step served (tests, benchmarks)
        self.hub = hub or Hub()
        self.max_pending = max_pending
        self._load_session = load_session
        self._max_model_len = max_model_len
        self._session: Session | None = None
        self._info: EngineInfo | None = None
        self._jobs: queue.Queue[RequestHandle | _Call | None] = queue.Queue()
        self._calls = 0  # Engine.call jobs queued or running
        # Features this many calibration standard deviations out are published as anomalies
        # (neuroscope.anomaly); None: never.
        self.anomaly_z: float | None = DEFAULT_ANOMALY_Z
        self._lock = threading.Lock()
        self._active: dict[str, RequestHandle] = {}  # request id -> queued or running handle
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="neuroscope-engine", daemon=True)
        # Tokenizing a long prompt takes milliseconds: never on the event loop. One thread, because
        # the tokenizer is shared with the worker and one reader more is all it needs to tolerate.
        self._prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="neuroscope-prepare")
        self._labels_cache: dict[int, tuple[int, dict[str, str]]] = {}  # layer -> (version, labels)
        self._feature_info: FeatureInfo | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> EngineInfo:
        """Start the worker, load the session on it, and wait; re-raise a loading error here."""
        self._thread.start()
        if not self._loaded.wait(timeout):
            raise EngineError(f"The model did not load within {timeout} s.")
        if self._load_error is not None:
            raise self._load_error
        assert self._info is not None
        return self._info

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineError("The engine has not loaded its model yet; call start() first.")
        return self._info

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return len(self._active)

    def cancel_all(self) -> None:
        """Cancel every queued and running request (shutdown); new ones are refused from now on."""
        self._closing = True
        with self._lock:
            handles = list(self._active.values())
        for handle in handles:
            handle.cancel()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything, stop the worker and release the model."""
        self.cancel_all()
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    # -- requests (call on the event loop) ---------------------------------------------------------

    async def prepare(
        self, messages: Sequence[dict[str, Any]], max_tokens: int | None
    ) -> PreparedPrompt:
        """Apply the chat template and fit ``max_tokens`` to the context (ConfigError if it cannot)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prepare_pool, self._prepare, messages, max_tokens)

    async def grammar(self, response_format: Any) -> Grammar | None:
        """OpenAI's ``response_format`` compiled against the model's tokenizer (None: plain text),
        off the loop: the first one builds the tokenizer's side (about a second). Raises
        ``GrammarError`` (a ConfigError) saying why a schema cannot be honoured."""
        loop = asyncio.get_running_loop()
        session = self._require_session()
        return await loop.run_in_executor(self._prepare_pool, session.grammar, response_format)

    def _prepare(
        self, messages: Sequence[dict[str, Any]], max_tokens: int | None
    ) -> PreparedPrompt:
        session = self._require_session()
        ids = session.encode(messages)
        limit = self.context_limit
        if limit is not None and len(ids) >= limit:
            raise PromptTooLong(
                f"The prompt is {len(ids)} tokens; this server's context is {limit} tokens "
                "(prompt and reply together). Shorten the messages."
            )
        if max_tokens is None:
            max_tokens = limit - len(ids) if limit is not None else FALLBACK_MAX_TOKENS
        if limit is not None:
            max_tokens = min(max_tokens, limit - len(ids))
        return PreparedPrompt(ids, session.check_length(ids, max_tokens))

    @property
    def context_limit(self) -> int | None:
        """The context in tokens: the model's, or ``max_model_len`` when that is smaller."""
        limits = [n for n in (self.info.max_context, self._max_model_len) if n is not None]
        return min(limits) if limits else None

    def submit(self, request: GenerationRequest, *, records: bool = False) -> RequestHandle:
        """Queue a request; its events arrive on the calling loop. ``records`` also delivers its
        feature records to the handle (they always go to the hub)."""
        loop = asyncio.get_running_loop()
        if self._closing:
            raise EngineClosed("The server is shutting down; send the request elsewhere or later.")
        handle = RequestHandle(request, loop, records)
        with self._lock:
            if request.request_id in self._active:
                raise DuplicateRequestId(
                    f"Request id {request.request_id!r} is already queued or running; use a new one."
                )
            if len(self._active) > self.max_pending:
                raise EngineBusy(
                    f"The server is busy: {len(self._active)} requests are queued or running. "
                    "Retry shortly."
                )
            self._active[request.request_id] = handle
        self._jobs.put(handle)
        return handle

    async def call(self, fn: Callable[[Session], Any]) -> Any:
        """Run ``fn(session)`` on the worker, in turn with generations (the session is the
        worker's alone), and return its result; its exception is raised here."""
        if self._closing:
            raise EngineClosed("The server is shutting down; send the request elsewhere or later.")
        with self._lock:
            if self._calls + len(self._active) > self.max_pending:
                raise EngineBusy("The server is busy. Retry shortly.")
            self._calls += 1
        loop = asyncio.get_running_loop()
        job = _Call(fn, loop.create_future(), loop)
        self._jobs.put(job)
        return await job.future

    def _run_call(self, session: Session, job: _Call) -> None:
        def settle(result: Any, error: BaseException | None) -> None:
            if job.future.done():  # the caller went away
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        try:
            result, error = job.fn(session), None
        except Exception as e:
            if not isinstance(e, ConfigError):
                log.exception("A worker call failed")
            result, error = None, e
        finally:
            with self._lock:
                self._calls -= 1
        job.loop.call_soon_threadsafe(settle, result, error)

    async def labels(self, layer: int) -> dict[str, str]:
        """Every feature's label at ``layer`` ({"index": label}), computed off the loop.

        Cached while the label source's ``version`` stays the same (labels arrive later: a live
        Neuronpedia fetch, a reload after ``labels generate``); a source without a version is asked
        every time."""
        version = getattr(self._require_session().builder.labels, "version", None)
        cached = self._labels_cache.get(layer)
        if version is not None and cached is not None and cached[0] == version:
            return cached[1]
        loop = asyncio.get_running_loop()
        labels = await loop.run_in_executor(self._prepare_pool, self._all_labels, layer)
        if version is not None:
            self._labels_cache[layer] = (version, labels)
        return labels

    async def feature_info(self, layer: int, index: int) -> dict[str, Any]:
        """What is known of one feature (``neuroscope.feature_info``), read off the loop."""
        if self._feature_info is None:
            from neuroscope.feature_info import FeatureInfo  # calibration and examples readers

            self._feature_info = FeatureInfo(self._require_session())
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._prepare_pool, self._feature_info.describe, layer, index
        )

    def _all_labels(self, layer: int) -> dict[str, str]:
        labels = self._require_session().builder.labels
        return {
            str(i): text
            for i, text in labels.labels_for(layer, self.info.sae_widths[layer]).items()
        }

    def _require_session(self) -> Session:
        if self._session is None:
            raise EngineClosed("The model is not loaded (the engine is starting or has stopped).")
        return self._session

    # -- the worker --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            session = self._load_session()
            self._session = session
            self._info = _describe(session)
        except BaseException as e:  # noqa: BLE001 - handed to start(), which re-raises it
            self._load_error = e
            self._loaded.set()
            return
        self._loaded.set()
        # A backend that cannot batch keeps the loop below: there a worker call never runs in
        # the middle of a generation, which would replace its one sequence.
        if self.max_batch > 1 and can_batch(session.backend):
            try:
                self._run_batched(session)
            finally:
                self._session = None
                session.close()
            return
        try:
            while True:
                handle = self._jobs.get()
                if handle is None:
                    break
                if isinstance(handle, _Call):
                    self._run_call(session, handle)
                    continue
                try:
                    self._run_one(session, handle)
                finally:
                    self._release(handle)
        finally:
            self._session = None
            session.close()

    def _run_one(self, session: Session, handle: RequestHandle) -> None:
        req = handle.request
        first_layer = session.layers[0]
        if handle.cancelled:
            self._finish(
                handle, GenerationComplete(req.request_id, "cancelled", len(req.prompt_ids), 0)
            )
            return
        try:
            events = session.events(
                req.prompt_ids, request_id=req.request_id, max_tokens=req.max_tokens,
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                stop=list(req.stop), should_stop=handle._stop.is_set, steering=req.steering,
                response_format=req.response_format,
            )  # fmt: skip
            for event in events:
                self._dispatch(handle, event, first_layer)
        except Exception as e:
            self._fail(handle, e)

    def _dispatch(self, handle: RequestHandle, event: Event, first_layer: int) -> None:
        """One event of a request to its client and the hub."""
        if isinstance(event, TextDelta):
            handle._put(event)
            return
        self.hub.publish(event)
        if isinstance(event, TokenFeatures):
            if self._session is not None:  # its tokens, for attribution by request_id later
                self._session.requests.observe(event)
            for anomaly in anomalies(event, self.anomaly_z):  # calibrated filters only
                self.hub.publish(anomaly)
            if event.phase == "generation" and event.layer == first_layer:
                handle.tokens_done += 1
            if handle.records:
                handle._put(event)
        elif isinstance(event, MonitorEvent):
            handle._put(event)
        else:
            self._release(handle)  # its id is free before its client hears it is done
            handle._put(event)

    def _fail(self, handle: RequestHandle, e: Exception) -> None:
        req = handle.request
        if not isinstance(e, ConfigError):
            log.exception("Request %s failed", req.request_id)
            e = RequestFailed(f"The generation failed: {type(e).__name__}: {e}")
        done = GenerationComplete(req.request_id, "error", len(req.prompt_ids), handle.tokens_done)
        self.hub.publish(done)
        self._release(handle)
        handle._put(_Failure(e))

    def _run_batched(self, session: Session) -> None:
        """The worker with continuous batching: up to ``max_batch`` requests decode together
        (``neuroscope.batching``), joining and leaving at every step; jobs that are not
        generations (``Engine.call``) run between steps."""
        from neuroscope.batching import BatchScheduler

        batch = BatchScheduler(session.backend, self.max_batch)
        first_layer = session.layers[0]
        running: list[tuple[RequestHandle, BatchedEvents]] = []
        while True:
            # wait for work when there is none; otherwise take what has arrived, without waiting
            jobs: list[RequestHandle | _Call | None] = []
            try:
                jobs.append(self._jobs.get(block=not running))
                while True:
                    jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                pass
            for job in jobs:
                if job is None:  # close(): the running requests were cancelled by cancel_all
                    for handle, events in running:
                        events.close()
                        self._release(handle)
                    return
                if isinstance(job, _Call):
                    self._run_call(session, job)
                elif job.cancelled:
                    req = job.request
                    done = GenerationComplete(req.request_id, "cancelled", len(req.prompt_ids), 0)
                    self._finish(job, done)
                else:
                    try:
                        running.append((job, self._batched_events(session, batch, job)))
                    except Exception as e:
                        self._fail(job, e)
            if not running:
                continue
            batch.step()
            self.widest_batch = batch.widest
            still = []
            for handle, events in running:
                try:
                    for event in events.drain():
                        self._dispatch(handle, event, first_layer)
                except Exception as e:
                    self._fail(handle, e)
                    continue
                if events.finished:
                    self._release(handle)
                else:
                    still.append((handle, events))
            running = still

    def _batched_events(
        self, session: Session, batch: BatchScheduler, handle: RequestHandle
    ) -> BatchedEvents:
        from neuroscope.batching import BatchedEvents

        req = handle.request
        events = session.events(
            req.prompt_ids, request_id=req.request_id, max_tokens=req.max_tokens,
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
            stop=list(req.stop), should_stop=handle._stop.is_set, steering=req.steering,
            response_format=req.response_format, batch=batch,
        )  # fmt: skip
        assert isinstance(events, BatchedEvents)
        return events

    def _finish(self, handle: RequestHandle, done: GenerationComplete) -> None:
        self.hub.publish(done)
        self._release(handle)
        handle._put(done)

    def _release(self, handle: RequestHandle) -> None:
        with self._lock:
            if self._active.get(handle.request_id) is handle:
                del self._active[handle.request_id]


__all__ = [
    "Completion",
    "DuplicateRequestId",
    "Engine",
    "EngineBusy",
    "EngineClosed",
    "EngineError",
    "EngineInfo",
    "GenerationRequest",
    "PreparedPrompt",
    "PromptTooLong",
    "RequestFailed",
    "RequestHandle",
]
