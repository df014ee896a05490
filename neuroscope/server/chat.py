"""The OpenAI-compatible chat API (:8080): ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``.

The completion ``id`` is the ``request_id`` of the request's feature records (also sent back in the
``X-Request-Id`` header), so a client can pick its own tokens out of the feature stream. A client
may choose the id by sending ``X-Request-Id`` (the id becomes ``chatcmpl-<its value>``) and
subscribe to ``/v1/features/stream?request_id=...`` before it sends the chat.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody
from litestar.response import Stream

from neuroscope.engine import Completion, Engine, EngineClosed, GenerationRequest, RequestHandle
from neuroscope.errors import ConfigError
from neuroscope.generation import TextDelta
from neuroscope.records import GenerationComplete
from neuroscope.server.auth import OPEN, guards
from neuroscope.server.errors import (
    EXCEPTION_HANDLERS,
    SERVER_ERROR,
    APIError,
    error_body,
    from_exception,
)
from neuroscope.server.names import default_served_name
from neuroscope.server.page import PagePorts, cors_config, page_routes
from neuroscope.server.schema import (
    CHAT_REQUEST_SCHEMA,
    ChatRequest,
    parse_chat_request,
    request_id_from_header,
)
from neuroscope.session import new_request_id
from neuroscope.steering import MonitorEvent, SteeringError, SteeringPlan, parse_neuroscope

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SHUTTING_DOWN = "The server is shutting down; the reply was cut short."


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(obj: Any) -> str:
    return f"data: {_json(obj)}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class ChatAPI:
    """The route handlers, bound to one engine."""

    def __init__(self, engine: Engine, served_model_name: str | None = None):
        self.engine = engine
        self.created = int(time.time())
        self._served_model_name = served_model_name

    @property
    def model(self) -> str:
        """The name clients use (``--served-model-name``; default: see ``default_served_name``)."""
        return self._served_model_name or default_served_name(self.engine.info.model_name)

    @property
    def aliases(self) -> frozenset[str]:
        """Other names accepted in a request's ``model``: the model as given to ``--model`` and
        the default served name, so a client configured before ``--served-model-name`` still works."""
        given = self.engine.info.model_name
        return frozenset({given, default_served_name(given)}) - {self.model}

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "neuroscope",
        }

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    async def model_info(self, model_id: str) -> dict[str, Any]:
        # Slashes at the ends do not survive URL paths (a model folder /x/y arrives as x/y).
        model_id = model_id.strip("/")
        if model_id != self.model.strip("/") and model_id not in {
            a.strip("/") for a in self.aliases
        }:
            raise APIError(
                404,
                f"The model {model_id!r} does not exist on this server; it serves {self.model!r}.",
                param="model",
                code="model_not_found",
            )
        return self._model_card()

    async def health(self) -> Response[dict[str, Any]]:
        if self.engine.closing:
            return Response({"status": "shutting_down"}, status_code=503)
        info = self.engine.info
        return Response(
            {
                "status": "ready",
                "model": self.model,
                "layers": list(info.layers),
                "pending": self.engine.pending,
            }
        )

    async def chat_completions(self, request: Request) -> Response[Any] | Stream:
        chat = parse_chat_request(await request.body(), self.model, self.aliases)
        steering = self._steering(chat)
        request_id = request_id_from_header(request.headers.get("x-request-id"), new_request_id())
        try:
            prepared = await self.engine.prepare(chat.messages, chat.max_tokens)
        except ConfigError as e:  # the chat template refused the messages, or they do not fit
            raise from_exception(e, param="messages") from None
        try:  # a schema the constrained decoder cannot compile: 400, saying why
            grammar = await self.engine.grammar(chat.response_format)
        except ConfigError as e:
            raise from_exception(e, param="response_format") from None
        handle = self.engine.submit(
            GenerationRequest(
                request_id=request_id, prompt_ids=prepared.prompt_ids, max_tokens=prepared.max_tokens,
                temperature=chat.temperature, top_p=chat.top_p, top_k=chat.top_k, seed=chat.seed,
                stop=chat.stop, steering=steering, response_format=grammar,
            )
        )  # fmt: skip
        headers = {"X-Request-Id": request_id}
        created = int(time.time())
        if chat.stream:
            chunks = self._stream(handle, chat, created)
            # A client gone before the stream started never runs its ``finally``: cancel on collection.
            weakref.finalize(chunks, handle.cancel)
            return Stream(chunks, media_type="text/event-stream", headers=headers | SSE_HEADERS)
        completion = await _result_unless_disconnected(handle, request)
        if completion is None:  # the client left; nobody reads this
            return Response(error_body("Client disconnected."), status_code=499)
        if completion.finish_reason == "monitor":  # a stop monitor ended it: OpenAI's "stop"
            completion.finish_reason = "stop"
        if completion.finish_reason not in ("stop", "length"):
            raise EngineClosed(SHUTTING_DOWN)
        body = self._completion_body(completion, created)
        return Response(body | _echo(steering, completion.monitor_events), headers=headers)

    def _steering(self, chat: ChatRequest) -> SteeringPlan | None:
        """The request's ``neuroscope`` steering and monitors, checked against the loaded model
        (a 400 naming the entry, e.g. ``neuroscope.steering[2].feature``); None when absent."""
        target = self.engine.info.steering_target
        if chat.neuroscope is None or target is None:
            return None
        try:
            return parse_neuroscope(chat.neuroscope, target) or None
        except SteeringError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None

    def _completion_body(self, done: Completion, created: int) -> dict[str, Any]:
        return {
            "id": done.request_id,
            "object": "chat.completion",
            "created": created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done.text},
                    "logprobs": None,
                    "finish_reason": done.finish_reason,
                }
            ],
            "usage": _usage(done.prompt_tokens, done.completion_tokens),
        }

    async def _stream(
        self, handle: RequestHandle, chat: ChatRequest, created: int
    ) -> AsyncIterator[str]:
        """Role chunk, content chunks, finish chunk, usage chunk (if asked), ``[DONE]``.

        If the client disconnects, Litestar cancels this generator; ``finally`` cancels the
        generation, which stops within one token.
        """
        base = {
            "id": handle.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.model,
        }
        usage_field = {"usage": None} if chat.include_usage else {}

        def chunk(
            delta: dict[str, str], finish: str | None = None, extra: dict[str, Any] | None = None
        ) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse(base | {"choices": [choice]} | usage_field | (extra or {}))

        try:  # the first chunk echoes the steering applied, as the completion object does
            yield chunk({"role": "assistant", "content": ""}, extra=_echo(handle.request.steering))
            async for batch in handle.batches():
                out = []
                for event in batch:
                    if isinstance(event, TextDelta):
                        out.append(chunk({"content": event.text}))
                    elif isinstance(event, GenerationComplete):
                        finish = "stop" if event.finish_reason == "monitor" else event.finish_reason
                        if finish in ("stop", "length"):
                            out.append(chunk({}, finish))
                            if chat.include_usage:
                                usage = _usage(event.prompt_tokens, event.completion_tokens)
                                out.append(_sse(base | {"choices": [], "usage": usage}))
                        else:
                            out.append(
                                _sse(error_body(SHUTTING_DOWN, SERVER_ERROR, code="shutting_down"))
                            )
                        out.append("data: [DONE]\n\n")
                if out:
                    yield "".join(out)
        except Exception as e:  # the generation failed after the response started: say so in-band
            yield _sse(from_exception(e).body()) + "data: [DONE]\n\n"
        finally:
            handle.cancel()


def _echo(steering: SteeringPlan | None, fired: list[MonitorEvent] | None = None) -> dict[str, Any]:
    """``{"neuroscope": ...}``: the steering and monitors applied (and, once known, the monitor
    events that fired), for a completion object; nothing for a request without them."""
    if steering is None:
        return {}
    echo = steering.to_dict()
    if fired is not None:
        echo["monitor_events"] = [event.to_dict() for event in fired]
    return {"neuroscope": echo}


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _result_unless_disconnected(handle: RequestHandle, request: Request) -> Completion | None:
    """The completion, or None if the client disconnects first (then the generation is cancelled)."""
    result = asyncio.ensure_future(handle.result())
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            handle.cancel()
            result.cancel()
    return result.result() if result.done() and not result.cancelled() else None


@dataclass
class ChatCompletionOperation(Operation):
    """The OpenAPI operation of ``POST /v1/chat/completions`` with its request body described: the
    handler parses the body itself (to name the field of every error), so Litestar cannot see it."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={"application/json": OpenAPIMediaType(schema=CHAT_REQUEST_SCHEMA)},  # type: ignore[arg-type]
            required=True,
        )


OPENAPI_PATH = "/openapi.json"


def openapi_config() -> OpenAPIConfig:
    """The chat API's OpenAPI document at ``/openapi.json`` (JSON only: the UIs load scripts from
    CDNs). It is behind the API key like everything but the open list: it tells a client with a
    key how to call the API and tells anyone else nothing they may use."""
    from neuroscope import __version__

    return OpenAPIConfig(
        title="Neuroscope chat API (OpenAI-compatible)",
        version=__version__,
        path=OPENAPI_PATH,
        render_plugins=[JsonRenderPlugin(path="/")],
    )


def create_chat_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    served_model_name: str | None = None,
    ports: PagePorts | None = None,
    host: str = "127.0.0.1",
    cors_origins: tuple[str, ...] = (),
) -> Any:
    """The ASGI app for :8080 (every route but the open ones needs ``api_key`` when it is set)."""
    ports = ports or PagePorts(chat=8080, features=8081)
    api = ChatAPI(engine, served_model_name)

    @post("/v1/chat/completions", status_code=200, operation_class=ChatCompletionOperation)
    async def chat_completions(request: Request) -> Response:
        """OpenAI's chat completions, streaming (SSE) or not; the id is the feature records' id."""
        return await api.chat_completions(request)

    @get("/v1/models")
    async def models() -> dict[str, Any]:
        return await api.models()

    @get("/v1/models/{model_id:path}")
    async def model_info(model_id: str) -> dict[str, Any]:
        return await api.model_info(model_id)

    @get("/health", opt=OPEN)
    async def health() -> Response:
        return await api.health()

    app = Litestar(
        route_handlers=[
            chat_completions,
            models,
            model_info,
            health,
            *page_routes(
                engine, ports, role="chat", api_key=bool(api_key), model_name=lambda: api.model
            ),
        ],
        cors_config=cors_config(ports.features, host, cors_origins),
        exception_handlers=EXCEPTION_HANDLERS,
        guards=guards(api_key),
        openapi_config=openapi_config(),
        logging_config=None,  # leave the host application's logging alone
    )
    return app
