"""The feature stream (:8081): ``GET /v1/features/stream`` (SSE), ``GET /v1/features/labels``,
``GET /v1/features/info``, ``GET /health``, and the live page (``GET /``, see ``server.page``).

SSE events:

- ``feature_activation``: one feature record (docs/design.md, "The feature record");
- ``generation_complete``: ``{"request_id", "finish_reason", "prompt_tokens", "completion_tokens"}``;
- ``dropped``: ``{"dropped": n}``: this subscriber fell behind and lost its ``n`` oldest events.

A comment line (``: keep-alive``) is sent whenever the stream has been idle for the keep-alive
interval, so proxies and clients do not time the connection out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.response import Stream

from neuroscope.anomaly import AnomalyEvent
from neuroscope.attribution import (
    AttributionRequestError,
    ablation_json,
    attribution_json,
    parse_ablation_request,
    parse_attribute_request,
)
from neuroscope.capture import MAX_REQUEST_CHARS, CaptureRequestError, capture_json
from neuroscope.engine import Engine
from neuroscope.hub import Dropped, Hub, HubEvent, Published, Subscription
from neuroscope.records import TokenFeatures
from neuroscope.sae import SITES
from neuroscope.server.auth import OPEN, guards
from neuroscope.server.errors import EXCEPTION_HANDLERS, APIError
from neuroscope.server.names import default_served_name
from neuroscope.server.page import PagePorts, cors_config, page_routes

DEFAULT_KEEPALIVE_S = 15.0
DEFAULT_COALESCE_S = 0.02
PHASES = ("prompt", "generation", "all")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event_filter(
    request_id: str | None, phase: str, layer: int | None, site: str | None = None
) -> Callable[[HubEvent], bool]:
    """Which hub events a subscriber wants; completions pass the phase, layer and site filters."""

    def accept(event: HubEvent) -> bool:
        if request_id is not None and event.request_id != request_id:
            return False
        if isinstance(event, TokenFeatures | AnomalyEvent):
            if phase != "all" and event.phase != phase:
                return False
            if layer is not None and event.layer != layer:
                return False
            if site is not None and event.site != site:
                return False
        return True

    return accept


def format_sse(item: Published | Dropped) -> str:
    """One SSE event. Every event has an ``id:`` (hub-wide, increasing), so a client that
    reconnects with ``Last-Event-ID`` resumes after it; a ``dropped`` notice carries the id of the
    newest event it stands for."""
    if isinstance(item, Dropped):
        return f'id: {item.last_id}\nevent: dropped\ndata: {{"dropped":{item.count}}}\n\n'
    return f"id: {item.id}\nevent: {item.name}\ndata: {item.data}\n\n"


def last_event_id(request: Request) -> int | None:
    """The ``Last-Event-ID`` a reconnecting client sends (browsers' EventSource does it itself)."""
    raw = request.headers.get("last-event-id")
    if raw is None or not raw.strip():
        return None
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise APIError(
            400,
            f"Last-Event-ID must be the id of an event of this stream (a whole number), got {raw!r}.",
            param="Last-Event-ID",
        )
    return int(raw)


async def sse_stream(
    sub: Subscription, keepalive_s: float, coalesce_s: float = DEFAULT_COALESCE_S
) -> AsyncIterator[str]:
    """The subscriber's events as SSE text; ends when the hub closes or the client leaves.

    After the first event of a burst, waits ``coalesce_s`` for more and writes them together: a
    fast model makes hundreds of records a second, and one socket write per subscriber per token
    would take event-loop (and GIL) time from generation. 20 ms is below what a viewer notices.
    """
    try:
        # Comments are single lines with no blank line after them: a blank line ends an event, and
        # after an ``id:`` some clients (httpx-sse) report an empty event for every blank line.
        yield ": subscribed\n"
        while True:
            items = await sub.get(timeout=keepalive_s)
            if items is None:
                return
            if not items:
                yield ": keep-alive\n"
                continue
            if coalesce_s > 0:
                await asyncio.sleep(coalesce_s)
                items.extend(await sub.get(timeout=0) or [])
            yield "".join(map(format_sse, items))
    finally:
        sub.close()


def _site_param(request: Request) -> str | None:
    """``site=`` of the stream: what the SAEs read (resid_post, attn_out, mlp_in, ...)."""
    site = request.query_params.get("site")
    if site is not None and site not in SITES:
        raise APIError(400, f"site must be one of {', '.join(SITES)}, got {site!r}.", param="site")
    return site


def _layer_param(request: Request, engine: Engine) -> int | None:
    raw = request.query_params.get("layer")
    if raw is None or raw == "":
        return None
    layers = engine.info.layers
    try:
        layer = int(raw)
    except ValueError:
        layer = None
    if layer not in layers:
        raise APIError(
            400,
            f"layer={raw} is not a hooked layer; this server hooks layer {', '.join(map(str, layers))}.",
            param="layer",
        )
    return layer


def _one_layer(request: Request, engine: Engine) -> int:
    """The ``?layer=`` asked for, or the only hooked layer (a 400 when several are hooked)."""
    layer = _layer_param(request, engine)
    if layer is not None:
        return layer
    layers = engine.info.layers
    if len(layers) > 1:
        raise APIError(
            400,
            f"Several layers are hooked ({', '.join(map(str, layers))}); pass ?layer=.",
            param="layer",
        )
    return layers[0]


def _capture_args(raw: bytes) -> dict[str, Any]:
    """The fields of a capture request, type-checked (bounds that need the model come later)."""
    # JSON escapes can quadruple a text; the rest leaves room for the other fields.
    if len(raw) > 8 * MAX_REQUEST_CHARS + 4096:
        raise APIError(400, f"The body is {len(raw)} bytes; a capture request is far smaller.")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"The body is not JSON: {e}.") from None
    if not isinstance(body, dict):
        raise APIError(400, "The body must be a JSON object.")
    text, messages = body.get("text"), body.get("messages")
    if (text is None) == (messages is None):
        raise APIError(400, "Give exactly one of text (raw text) and messages.", param="text")
    if text is not None and not isinstance(text, str):
        raise APIError(400, "text must be a string.", param="text")
    if messages is not None and (
        not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages)
    ):
        raise APIError(400, "messages must be a list of {role, content} objects.", param="messages")
    layers = body.get("layers", "all")
    if layers != "all" and (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
    ):
        raise APIError(400, 'layers must be "all" or a list of layer numbers.', param="layers")
    args: dict[str, Any] = {"prompt": text if text is not None else messages, "layers": layers}
    for name, default in (("residuals", False), ("attention", False), ("features", True)):
        value = body.get(name, default)
        if not isinstance(value, bool):
            raise APIError(400, f"{name} must be true or false.", param=name)
        args[name] = value
    generate = body.get("generate", 0)
    if not isinstance(generate, int) or isinstance(generate, bool):
        raise APIError(400, "generate must be a whole number.", param="generate")
    args["generate"] = generate
    return args


def create_features_app(
    engine: Engine,
    hub: Hub,
    *,
    api_key: str | None = None,
    keepalive_s: float = DEFAULT_KEEPALIVE_S,
    subscriber_queue: int | None = None,
    ports: PagePorts | None = None,
    host: str = "127.0.0.1",
    cors_origins: tuple[str, ...] = (),
    served_model_name: str | None = None,
) -> Any:
    """The ASGI app for :8081 (every route but the open ones needs ``api_key`` when it is set)."""
    ports = ports or PagePorts(chat=8080, features=8081)

    @get("/v1/features/stream")
    async def stream(request: Request) -> Stream:
        request_id = request.query_params.get("request_id") or None
        phase = request.query_params.get("phase") or "generation"
        if phase not in PHASES:
            raise APIError(
                400, f"phase must be one of {', '.join(PHASES)}, got {phase!r}.", param="phase"
            )
        layer = _layer_param(request, engine)
        site = _site_param(request)
        after = last_event_id(request)
        # Subscribe before the response starts: once a client has the headers, it misses nothing.
        sub = hub.subscribe(
            event_filter(request_id, phase, layer, site), subscriber_queue, after=after
        )
        return Stream(
            sse_stream(sub, keepalive_s), media_type="text/event-stream", headers=SSE_HEADERS
        )

    @get("/v1/features/labels")
    async def labels(request: Request) -> dict[str, str]:
        return await engine.labels(_one_layer(request, engine))

    @get("/v1/features/info")
    async def feature_info(request: Request) -> dict[str, Any]:
        """One feature: label and its source, calibration, top examples, Neuronpedia page."""
        layer = _one_layer(request, engine)
        raw = request.query_params.get("index", "")
        width = engine.info.sae_widths[layer]
        index = int(raw) if raw.isdigit() else -1
        if not 0 <= index < width:
            raise APIError(
                400,
                f"index must be a feature of the SAE at layer {layer} (0 to {width - 1}), got {raw!r}.",
                param="index",
            )
        return await engine.feature_info(layer, index)

    @post("/v1/features/capture", status_code=200)
    async def capture(request: Request) -> dict[str, Any]:
        """Every layer of one short text: norms, cosines, logit lens, SAE records; residuals and
        attention when asked (bounded; neuroscope.capture.MAX_REQUEST_*)."""
        args = _capture_args(await request.body())
        prompt = args.pop("prompt")
        try:
            return await engine.call(lambda session: capture_json(session, prompt, **args))
        except CaptureRequestError as e:
            raise APIError(400, str(e), param=e.param) from None

    @post("/v1/features/attribute", status_code=200)
    async def attribute(request: Request) -> dict[str, Any]:
        """Why a feature fired at one token: its pre-activation split exactly into the
        embedding, each block's attention per source token, MLPs and biases (docs/why.md)."""
        try:
            args = parse_attribute_request(await request.body())
            return await engine.call(lambda session: attribution_json(session, **args))
        except AttributionRequestError as e:
            raise APIError(400, str(e), param=e.param) from None

    @post("/v1/features/ablation", status_code=200)
    async def ablation(request: Request) -> dict[str, Any]:
        """Per strong feature at one token of a remembered request: the next-token distribution
        with it ablated (KL, the top token's probability; docs/why.md)."""
        try:
            args = parse_ablation_request(await request.body())
            return await engine.call(lambda session: ablation_json(session, **args))
        except AttributionRequestError as e:
            raise APIError(400, str(e), param=e.param) from None

    @get("/health", opt=OPEN)
    async def health() -> Response:
        if engine.closing:
            return Response({"status": "shutting_down"}, status_code=503)
        return Response({"status": "ready", "subscribers": hub.subscriber_count})

    app = Litestar(
        route_handlers=[
            stream,
            labels,
            feature_info,
            capture,
            attribute,
            ablation,
            health,
            *page_routes(
                engine,
                ports,
                role="features",
                api_key=bool(api_key),
                model_name=lambda: served_model_name or default_served_name(engine.info.model_name),
            ),  # fmt: skip
        ],
        cors_config=cors_config(ports.chat, host, cors_origins),
        exception_handlers=EXCEPTION_HANDLERS,
        guards=guards(api_key),
        openapi_config=None,
        logging_config=None,  # leave the host application's logging alone
    )
    return app
