"""Structured output: ``response_format`` JSON object / JSON schema, by constrained decoding.

The chat API's ``response_format`` becomes a grammar compiled against the model's tokenizer; each
decode step the grammar says which tokens may come next (a numpy bool mask over the vocabulary) and
the backend sets every other token's logit to -inf before it samples. The reply is then valid JSON
matching the schema, unless ``max_tokens`` cuts it short (finish reason ``length``, as OpenAI does).

The library is llguidance (Microsoft's, the engine behind OpenAI's structured outputs): it computes
a mask lazily in tens of microseconds with no up-front vocabulary-wide precomputation per schema,
covers JSON Schema widely (refs, anyOf, patterns, formats), and is plain numpy on the host, so both
backends, torch and MLX, apply the same mask (llguidance also ships MLX and torch kernels). xgrammar
is as fast but its Python API is torch-first; outlines-core compiles every schema to a whole-vocab
index up front (seconds for nested schemas); lm-format-enforcer is pure Python and slower per step.

Nothing here imports torch or mlx.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from neuroscope.errors import ConfigError

if TYPE_CHECKING:
    from neuroscope.chat import ChatTokenizer

Kind = Literal["json_object", "json_schema"]

# JSON compile options: compact JSON with a space after ',' and ':'. llguidance lets optional
# whitespace repeat without bound, and a small model then emits newlines until max_tokens; with
# fixed separators every token of the reply is content.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarError(ConfigError):
    """A ``response_format`` that cannot be honoured (malformed, or a schema that does not compile)."""


@dataclass(frozen=True)
class ResponseFormat:
    """What the client asked for: any JSON object, or JSON matching ``schema``."""

    kind: Kind
    schema: Mapping[str, Any] | None = None
    name: str | None = None

    @property
    def json_schema(self) -> Mapping[str, Any]:
        return self.schema if self.schema is not None else ANY_OBJECT


def parse_response_format(value: Any) -> ResponseFormat | None:
    """OpenAI's ``response_format`` field: None for plain text, else the JSON format asked for.

    Raises ``GrammarError`` with a message that names the part of the field that is wrong.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise GrammarError("response_format must be an object like {'type': 'json_object'}.")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise GrammarError(
                "response_format.json_schema must be an object like "
                "{'name': 'answer', 'schema': {...}, 'strict': true}."
            )
        schema = spec.get("schema", ANY_OBJECT)
        if not isinstance(schema, dict):
            raise GrammarError("response_format.json_schema.schema must be a JSON Schema object.")
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise GrammarError("response_format.json_schema.name must be a string.")
        return ResponseFormat("json_schema", schema, name)
    raise GrammarError(
        f"response_format type {json.dumps(kind)} is not supported; use 'text', 'json_object' "
        "or 'json_schema'."
    )


class Grammar:
    """A compiled ``response_format``: start one :class:`TokenConstraint` per generation."""

    def __init__(self, tokenizer: Any, grammar: str, fmt: ResponseFormat, vocab_size: int):
        self._tokenizer, self._grammar, self.format = tokenizer, grammar, fmt
        self.vocab_size = vocab_size

    def start(self) -> TokenConstraint:
        import llguidance

        matcher = llguidance.LLMatcher(self._tokenizer, self._grammar, log_level=0)
        if matcher.is_error():  # validated at compile time; a limit can still be hit
            raise GrammarError(f"response_format: {matcher.get_error()}")
        return TokenConstraint(matcher, self.vocab_size)


class TokenConstraint:
    """One generation's grammar state: ``allowed()`` before each sample, ``accept(token)`` after."""

    def __init__(self, matcher: Any, vocab_size: int):
        import llguidance.numpy as lg_numpy

        self._matcher, self.vocab_size = matcher, vocab_size
        self._fill = lg_numpy.fill_next_token_bitmask
        self._bits = lg_numpy.allocate_token_bitmask(1, vocab_size)

    def allowed(self) -> np.ndarray:
        """bool [vocab_size]: the tokens that keep the reply valid (only end-of-sequence once the
        JSON is complete)."""
        self._fill(self._matcher, self._bits, 0)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            # Cannot happen for a token drawn from allowed(); a backend that ignored the mask would.
            raise RuntimeError(
                f"token {token} breaks the response_format grammar: {self._matcher.get_error()}"
            )

    @property
    def done(self) -> bool:
        """The JSON is complete (nothing but end-of-sequence may follow)."""
        return bool(self._matcher.is_stopped() or self._matcher.is_accepting())


class _Compiler:
    """The llguidance tokenizer for one chat tokenizer: built once (about a second), then shared."""

    def __init__(self, chat: ChatTokenizer):
        import llguidance.hf

        hf = chat.tokenizer
        stops = sorted(chat.stop_token_ids)
        # Every stop token ends the reply: the grammar allows them (and only them) once complete.
        self.tokenizer = llguidance.hf.from_tokenizer(hf, eos_token=stops or None)  # type: ignore[arg-type]
        self.vocab_size = int(self.tokenizer.vocab_size)
        self._cache: dict[str, Grammar] = {}
        self._lock = threading.Lock()

    def compile(self, fmt: ResponseFormat) -> Grammar:
        import llguidance

        key = json.dumps([fmt.kind, fmt.schema], sort_keys=True)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                dict(fmt.json_schema),
                overrides=JSON_OPTIONS,  # type: ignore[arg-type]
            )
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
                grammar, self.tokenizer
            )
        except Exception as e:  # noqa: BLE001 - whatever a client's schema does, it is a 400
            raise GrammarError(
                f"response_format.json_schema.schema cannot be compiled: {type(e).__name__}: {e}"
            ) from None
        if is_error:
            raise GrammarError(
                "response_format.json_schema.schema cannot be used for constrained decoding: "
                + _first_line(messages)
            )
        compiled = Grammar(self.tokenizer, grammar, fmt, self.vocab_size)
        with self._lock:
            # Schemas repeat; a client sending endless new ones must not grow memory.
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = compiled
        return compiled


def _first_line(messages: Iterable[str]) -> str:
    text = " ".join(m.strip() for m in messages if m.strip()) or "unknown error"
    return text[:400]


_compilers: weakref.WeakKeyDictionary[Any, _Compiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compile_response_format(chat: ChatTokenizer, fmt: ResponseFormat) -> Grammar:
    """``fmt`` compiled against the tokenizer of ``chat`` (GrammarError, a ConfigError, saying why
    when it cannot be). Thread-safe; the tokenizer's side is built once per tokenizer."""
    with _compilers_lock:
        compiler = _compilers.get(chat)
        if compiler is None:
            try:
                compiler = _Compiler(chat)
            except ImportError:
                raise GrammarError(
                    "Structured output needs the llguidance package: pip install llguidance"
                ) from None
            except ValueError as e:  # a slow (Python) tokenizer: llguidance reads fast ones only
                raise GrammarError(
                    f"Structured output is not available for this model's tokenizer ({e})."
                ) from None
            _compilers[chat] = compiler
    return compiler.compile(fmt)


__all__ = [
    "Grammar",
    "GrammarError",
    "ResponseFormat",
    "TokenConstraint",
    "compile_response_format",
    "parse_response_format",
]
