"""Structured output: ``response_format`` json_object / json_schema by constrained decoding
(llguidance), on both backends, through the official ``openai`` client (``response_format`` and
``chat.completions.parse``) and langchain's ``with_structured_output`` against a real server."""

from __future__ import annotations

import json
from typing import Annotated, Any

import numpy as np
import openai
import pytest
from conftest import TINY_LAYER, has_module, requires_torch
from pydantic import BaseModel, ConfigDict, Field

from neuroscope.grammar import GrammarError, compile_response_format, parse_response_format
from neuroscope.server.run import BackgroundServer, ServeConfig

BACKENDS = [
    pytest.param("torch", marks=requires_torch),
    pytest.param("mlx", marks=pytest.mark.skipif(not has_module("mlx"), reason="needs mlx")),
]
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


# Bounded lengths keep a random model's reply short enough to finish: the grammar then forces the
# closing brackets. (A trained model needs no bounds; the tiny one writes random tokens.)
class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=12)
    zip: int = Field(ge=0, le=99999)


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=12)
    tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=3)
    home: Address
    ok: bool


SCHEMA: dict[str, Any] = Person.model_json_schema()
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}


def loader(model: Any, sae_npz: Any, backend: str) -> Any:
    def load() -> Any:
        from neuroscope.session import Session

        return Session(model=str(model), sae_local_path=str(sae_npz), layer=TINY_LAYER,
                       backend=backend, top_k=5)  # fmt: skip

    return load


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tiny_model, tiny_sae):
    server = BackgroundServer(
        loader(tiny_model, tiny_sae["npz"], request.param),
        ServeConfig(port=0, features_port=0, keepalive_s=0.3),
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.listening.chat_url + "/v1", api_key="-", max_retries=0, timeout=120
    )


def served_model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_json_schema_replies_validate_for_every_seed(client: openai.OpenAI) -> None:
    for seed in range(2):
        reply = client.chat.completions.create(
            model=served_model(client), messages=ASK, response_format=JSON_SCHEMA,  # type: ignore[arg-type]
            temperature=1.0, seed=seed, max_tokens=400,
        )  # fmt: skip
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        Person.model_validate_json(choice.message.content or "")  # raises unless schema-valid


def test_parse_helper_of_the_official_client(client: openai.OpenAI) -> None:
    parsed = client.chat.completions.parse(
        model=served_model(client), messages=ASK, response_format=Person, temperature=0.7, seed=1,  # type: ignore[arg-type]
        max_tokens=400,
    )  # fmt: skip
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and isinstance(person.home, Address)


def test_json_object_is_any_object_and_streams(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=served_model(client), messages=ASK, response_format={"type": "json_object"},
        temperature=0.0, max_tokens=60, stream=True,
    )  # fmt: skip
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens, as OpenAI does: a prefix of a JSON object
        assert finish == "length" and text.lstrip().startswith("{")


def test_a_reply_cut_by_max_tokens_ends_with_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=served_model(client), messages=ASK, response_format=JSON_SCHEMA,  # type: ignore[arg-type]
        temperature=0.0, max_tokens=3,
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert (reply.choices[0].message.content or "").lstrip().startswith("{")


def test_langchain_with_structured_output(server) -> None:
    from langchain_openai import ChatOpenAI

    client = openai.OpenAI(base_url=server.listening.chat_url + "/v1", api_key="-")
    llm = ChatOpenAI(
        model=served_model(client), base_url=server.listening.chat_url + "/v1", api_key="-",  # type: ignore[arg-type]
        temperature=0.5, max_tokens=400, max_retries=0, seed=3,  # type: ignore[call-arg]
    )  # fmt: skip
    person = llm.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person)


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ({"type": "xml"}, "use 'text', 'json_object' or 'json_schema'"),
        ({"type": "json_schema"}, "response_format.json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}},
         "cannot be used for constrained decoding"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
          "properties": {"a": {"type": "string", "pattern": "("}}}}}, "cannot be used"),
    ],
)  # fmt: skip
def test_formats_that_cannot_be_honoured_are_a_400_naming_the_field(
    client: openai.OpenAI, response_format: dict[str, Any], message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=served_model(client), messages=ASK, response_format=response_format,  # type: ignore[arg-type]
            max_tokens=5,
        )  # fmt: skip
    assert err.value.status_code == 400
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == "response_format", body
    assert message in body["message"]


# ---- the core module, without a server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model):
    from neuroscope.chat import ChatTokenizer

    return ChatTokenizer(tiny_model)


def test_the_mask_admits_exactly_the_valid_continuations(chat_tokenizer) -> None:
    """Walk a valid reply token by token: each of its tokens is allowed, and when the JSON is
    complete only the stop tokens are; a token that breaks the JSON is barred at that point."""
    grammar = compile_response_format(chat_tokenizer, parse_response_format(JSON_SCHEMA))  # type: ignore[arg-type]
    text = json.dumps({"name": "cat", "tags": ["a"], "home": {"city": "the", "zip": 7}, "ok": True})
    assert text.startswith('{"name": "cat", "tags": ["a"]')  # the separators the grammar uses
    ids = chat_tokenizer.tokenizer.encode(text, add_special_tokens=False)
    constraint = grammar.start()
    for token in ids:
        allowed = constraint.allowed()
        assert allowed.dtype == bool and allowed[token]
        constraint.accept(token)
    final = constraint.allowed()
    assert set(np.flatnonzero(final)) == set(chat_tokenizer.stop_token_ids)
    fresh = grammar.start().allowed()
    close = chat_tokenizer.tokenizer.encode("}", add_special_tokens=False)[0]
    assert not fresh[close] and fresh.sum() < len(fresh) / 2


def test_session_generate_takes_a_response_format_on_both_backends(tiny_model, tiny_sae) -> None:
    """Records come as for any request (one per position), steering included."""
    replies = {}
    for backend in ("torch", "mlx"):
        if not has_module(backend):
            continue
        with loader(tiny_model, tiny_sae["npz"], backend)() as session:
            generation = session.generate(
                ASK, max_tokens=400, temperature=0.0, response_format=JSON_SCHEMA,
                steering=[{"layer": TINY_LAYER, "feature": 3, "strength": 4.0}],
            )  # fmt: skip
            records = list(generation)
            assert generation.finish_reason == "stop", generation.text
            generated = [r for r in records if r.phase == "generation"]
            assert len(generated) == generation.completion_tokens > 0
            replies[backend] = generation.text
            Person.model_validate_json(generation.text)
    if len(replies) == 2:  # same model, same greedy path under the same mask
        assert replies["torch"] == replies["mlx"]


def test_response_format_field_errors_name_their_part() -> None:
    assert parse_response_format(None) is None and parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}).kind == "json_object"  # type: ignore[union-attr]
    with pytest.raises(GrammarError, match="json_schema.schema must be"):
        parse_response_format({"type": "json_schema", "json_schema": {"schema": []}})
    with pytest.raises(GrammarError, match="must be an object"):
        parse_response_format("json")


@pytest.mark.parametrize(
    "schema", [{"type": 5}, {"$ref": 3}, {"allOf": "x"}, {"properties": []}, {"type": "nope"}]
)
def test_odd_schemas_are_grammar_errors_not_crashes(chat_tokenizer, schema) -> None:
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"schema": schema}})
    with pytest.raises(GrammarError, match="response_format.json_schema.schema"):
        compile_response_format(chat_tokenizer, fmt)  # type: ignore[arg-type]
