"""The body of ``POST /v1/chat/completions``, checked field by field.

Parsed by hand rather than by a schema library so that every rejection names its field in ``param``
and says what to send, as OpenAI's own errors do. Fields other OpenAI-compatible servers ignore are
ignored here too (penalties, ``logit_bias``, ``user``, ``metadata``, ``store``, ...); fields whose
meaning we cannot honour (``n`` > 1, ``tools``, ``logprobs``) get a 400
rather than a reply that silently is not what was asked for.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from neuroscope.grammar import GrammarError, parse_response_format
from neuroscope.server.errors import APIError

ROLES = ("system", "developer", "user", "assistant")
MAX_TEMPERATURE = 2.0
SEED_RANGE = 2**63  # seeds are taken modulo this, so any JSON integer works on every backend
CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    neuroscope: Any = None  # the extension object, checked against the model by neuroscope.steering
    response_format: dict[str, Any] | None = None  # json_object / json_schema (None: text)


def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int(body: dict[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise _bad(key, f"{key} must be an integer, got {json.dumps(value)}.")
    if value < minimum:
        raise _bad(key, f"{key} must be at least {minimum}, got {value}.")
    return value


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not _is_number(value):
        raise _bad(key, f"{key} must be a number, got {json.dumps(value)}.")
    return float(value)


def _bool(body: dict[str, Any], key: str, default: bool = False, where: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        name = where or key
        raise _bad(name, f"{name} must be true or false, got {json.dumps(value)}.")
    return value


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why not."""
    if not raw.strip():
        raise APIError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(
            400,
            "The request body is nested too deeply to be a chat request; send a flat JSON object.",
            code="invalid_json",
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(
            400,
            f"The request body is not valid JSON ({e}). Send a JSON object with "
            "'Content-Type: application/json'.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise APIError(
            400,
            f"The request body must be a JSON object, not a JSON {type(body).__name__}.",
            code="invalid_json",
        )
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "messages is required: a list of {'role', 'content'} objects.")
    if not isinstance(messages, list):
        raise _bad("messages", f"messages must be a list, got a JSON {type(messages).__name__}.")
    if not messages:
        raise _bad("messages", "messages must not be empty; send at least one user message.")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, f"{where} must be an object with 'role' and 'content'.")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(
                f"{where}.role",
                f"{where}.role must be one of {', '.join(ROLES)}; got {json.dumps(role)}"
                + (" (tool calls are not supported)." if role in ("tool", "function") else "."),
            )
        out.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    return out


def _text(value: str, where: str) -> str:
    """``value``, if it is text a tokenizer can take: JSON's ``\\ud800`` escapes can make a string
    with a lone UTF-16 surrogate, which is not Unicode text and cannot be encoded."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(
            where,
            f"{where} contains a lone surrogate (\\u{ord(value[e.start]):04x} at character "
            f"{e.start}), which is not valid Unicode text; send valid UTF-8.",
        ) from None
    return value


def _content(content: Any, where: str) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        return _text(content, where)
    if content is None:
        raise _bad(where, f"{where} is required (a string or a list of text parts).")
    if not isinstance(content, list):
        raise _bad(
            where,
            f"{where} must be a string or a list of text parts, got a JSON {type(content).__name__}.",
        )
    parts = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _bad(here, f"{here} must be an object like {{'type': 'text', 'text': '...'}}.")
        if part.get("type") != "text":
            raise _bad(
                here,
                f"{here} has type {json.dumps(part.get('type'))}; only text parts are supported.",
            )
        if not isinstance(part.get("text"), str):
            raise _bad(f"{here}.text", f"{here}.text must be a string.")
        parts.append({"type": "text", "text": _text(part["text"], f"{here}.text")})
    return parts


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "stop must be a string or a list of strings.")
    for i, s in enumerate(stops):
        where = "stop" if isinstance(stop, str) else f"stop[{i}]"
        if not s:
            raise _bad(where, f"{where} is empty; a stop string needs at least one character.")
        _text(s, where)
    return list(stops)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise _bad(
            "n",
            f"n={n} is not supported: this server returns one choice (n=1).",
            "unsupported_value",
        )
    for key in ("tools", "functions"):
        value = body.get(key)
        if value and body.get("tool_choice", body.get("function_call")) != "none":
            raise _bad(
                key,
                f"{key} are not supported by this server; send the request without them.",
                "unsupported_parameter",
            )
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _bad("logprobs", f"logprobs must be true or false, got {json.dumps(logprobs)}.")
    _int(body, "top_logprobs", 0)  # ignored without logprobs, but only as the right type
    if logprobs is True:
        raise _bad(
            "logprobs",
            "logprobs are not supported by this server; send logprobs=false.",
            "unsupported_parameter",
        )


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """A JSON ``response_format`` (its shape checked here; the schema is compiled by the engine
    against the model's tokenizer), or None for plain text."""
    try:
        fmt = parse_response_format(body.get("response_format"))
    except GrammarError as e:
        raise _bad("response_format", str(e), "unsupported_value") from None
    return body["response_format"] if fmt is not None else None


def check_model(body: dict[str, Any], served: str, aliases: Collection[str] = ()) -> None:
    """A missing ``model`` means the served one; a name other than it (or one of its ``aliases``)
    is a 404, as OpenAI answers."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise _bad("model", "model must be a string.")
    if model != served and model not in aliases:
        raise APIError(
            404,
            f"The model {model!r} does not exist on this server; it serves {served!r} (GET /v1/models).",
            param="model",
            code="model_not_found",
        )


def parse_chat_request(raw: bytes, served_model: str, aliases: Collection[str] = ()) -> ChatRequest:
    body = parse_json_object(raw)
    check_model(body, served_model, aliases)
    messages = _messages(body)
    _refuse_unsupported(body)
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    temperature = _number(body, "temperature", 1.0)
    if not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise _bad(
            "temperature",
            f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {temperature:g}.",
        )
    top_p = _number(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise _bad("top_p", f"top_p must be greater than 0 and at most 1, got {top_p:g}.")
    top_k = _int(body, "top_k", -1)  # an extension (vLLM's); -1 or 0 means off
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad("seed", f"seed must be an integer, got {json.dumps(seed)}.")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _bad(
            "stream_options", "stream_options must be an object like {'include_usage': true}."
        )
    return ChatRequest(
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k or 0, 0),
        seed=None if seed is None else seed % SEED_RANGE,
        stop=_stop(body),
        stream=_bool(body, "stream"),
        include_usage=_bool(
            stream_options or {}, "include_usage", where="stream_options.include_usage"
        ),
        neuroscope=body.get("neuroscope"),
        response_format=_response_format(body),
    )


def request_id_from_header(value: str | None, new_id: str) -> str:
    """``chatcmpl-<client id>`` when the client sent ``X-Request-Id`` (so it can subscribe to its
    features before sending), else ``new_id``."""
    if value is None:
        return new_id
    if not CLIENT_REQUEST_ID.match(value):
        raise APIError(
            400,
            "The X-Request-Id header must be 1 to 64 characters of letters, digits, '.', '_', ':' or '-'.",
            param="X-Request-Id",
        )
    return value if value.startswith("chatcmpl-") else f"chatcmpl-{value}"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": list(ROLES)},
        "content": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}],
            "description": "A string, or text parts (joined with newlines).",
        },
    },
}
_NON_EMPTY = {"type": "string", "minLength": 1}

# The body of POST /v1/chat/completions as JSON Schema, for the published OpenAPI document: what
# parse_chat_request accepts. Unknown fields are accepted (and ignored), as OpenAI's clients send them.
CHAT_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "model": _nullable({"type": "string", "description": "The served name (GET /v1/models)."}),
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "max_tokens": _nullable({"type": "integer", "minimum": 1}),
        "max_completion_tokens": _nullable({"type": "integer", "minimum": 1}),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": MAX_TEMPERATURE}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_k": _nullable(
            {"type": "integer", "minimum": -1, "description": "vLLM's extension; 0 or -1: off."}
        ),
        "seed": _nullable({"type": "integer"}),
        "stop": _nullable({"anyOf": [_NON_EMPTY, {"type": "array", "items": _NON_EMPTY}]}),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable(
            {"type": "object", "properties": {"include_usage": _nullable({"type": "boolean"})}}
        ),
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": 1}),
        "logprobs": _nullable({"const": False}),
        "top_logprobs": _nullable({"type": "integer", "minimum": 0}),
        "response_format": _nullable(
            {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"enum": ["text", "json_object", "json_schema"]},
                    "json_schema": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "schema": {"type": "object"},
                            "strict": _nullable({"type": "boolean"}),
                        },
                    },
                },
                "description": "JSON output by constrained decoding (json_object, json_schema).",
            }
        ),
        "neuroscope": _nullable(
            {"type": "object", "description": "Steering and monitors (docs/steering.md)."}
        ),
    },
}
