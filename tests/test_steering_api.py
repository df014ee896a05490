"""Steering and monitors through a real server (tiny model, torch): the official `openai` client's
``extra_body``, the feature stream's ``monitor`` events (httpx-sse), isolation and bad input."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import requires_torch
from serve_support import TINY_LAYER, FeatureStream, session_loader, start_server

pytestmark = [pytest.mark.torch, requires_torch]

MESSAGES = [{"role": "user", "content": "What is the capital of France? Tell me about Paris."}]
STEERING = [{"layer": TINY_LAYER, "feature": 7, "strength": 3.0}]


@pytest.fixture(scope="module")
def server(tiny_model, tiny_sae):
    server = start_server(tiny_model, tiny_sae["npz"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_sae):
    with session_loader(tiny_model, tiny_sae["npz"])() as session:
        yield session


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(
        base_url=server.listening.chat_url + "/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


def chat(client, **neuroscope):
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0.0,
        extra_body={"neuroscope": neuroscope} if neuroscope else None,
    )


def test_steered_reply_equals_the_library_and_the_next_one_is_not_steered(client, reference):
    plain = reference.generate(MESSAGES, max_tokens=10, temperature=0.0).run()
    steered = reference.generate(MESSAGES, max_tokens=10, temperature=0.0, steering=STEERING).run()
    assert steered.text != plain.text

    reply = chat(client, steering=STEERING)
    assert reply.choices[0].message.content == steered.text
    echo = reply.model_extra["neuroscope"]
    assert echo["steering"] == [{"layer": TINY_LAYER, "feature": 7, "mode": "add", "strength": 3.0}]
    assert echo["positions"] == "all" and echo["monitors"] == []

    after = chat(client)
    assert after.choices[0].message.content == plain.text
    assert "neuroscope" not in (after.model_extra or {})


def test_streamed_steered_reply(client, reference):
    steered = reference.generate(MESSAGES, max_tokens=10, temperature=0.0, steering=STEERING).run()
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=10,
        temperature=0.0, stream=True, extra_body={"neuroscope": {"steering": STEERING}},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == steered.text
    # the first chunk echoes what is applied, as the completion object does
    assert chunks[0].model_extra["neuroscope"]["steering"][0]["strength"] == 3.0
    assert all("neuroscope" not in (c.model_extra or {}) for c in chunks[1:])


def test_monitor_events_reach_the_feature_stream_and_stop_ends_the_reply(server, client, reference):
    plain = reference.generate(MESSAGES, max_tokens=10, temperature=0.0).run()
    generated = [r for r in plain.records if r.phase == "generation"]
    # the feature strongest at the third generated token, watched just under its value there
    target = generated[2].top_features[0]
    before = [
        f.activation for r in generated[:2] for f in r.top_features if f.index == target.index
    ]
    above = target.activation - 1e-3
    assert all(a <= above for a in before), "pick a prompt where the feature rises at token 3"
    monitor = {"layer": TINY_LAYER, "feature": target.index, "above": above, "action": "stop"}

    with FeatureStream(server.listening.features_url, {"phase": "all"}) as stream:
        reply = chat(client, monitors=[monitor])
        done = stream.completion(reply.id)
        events = [e for e in stream.events if e.name == "monitor"]
    assert reply.choices[0].finish_reason == "stop"
    assert done["finish_reason"] == "monitor"
    (event,) = events
    assert event.data == {
        "request_id": reply.id,
        "position": generated[2].position,
        "token": generated[2].token,
        "layer": TINY_LAYER,
        "feature": target.index,
        "activation": pytest.approx(target.activation, abs=1e-4),
        "action": "stop",
    }
    assert reply.choices[0].message.content == "".join(r.token for r in generated[:3])
    assert reply.usage.completion_tokens == 3


BAD = [
    ({"steering": [{"layer": TINY_LAYER, "feature": 1, "mode": "boost"}]}, "steering[0].mode"),
    (
        {"steering": [STEERING[0], STEERING[0], {"layer": TINY_LAYER, "feature": 128}]},
        "steering[2].feature",
    ),
    ({"steering": [{"layer": 1, "feature": 3}]}, "steering[0].layer"),
    ({"steering": [{"layer": 1, "vector": [0.1] * 63}]}, "steering[0].vector"),
    ({"steering": [{"layer": TINY_LAYER, "feature": 1, "strength": 2e4}]}, "steering[0].strength"),
    ({"steering": [{"layer": TINY_LAYER, "feature": 1, "strength": "big"}]}, "steering[0].strength"),
    ({"steering": [STEERING[0]] * 65}, "steering"),
    ({"monitors": [{"layer": TINY_LAYER, "feature": 1, "above": 1, "action": "halt"}]}, "monitors[0].action"),
    ("steer please", ""),
]  # fmt: skip


@pytest.mark.parametrize(("neuroscope", "param"), BAD)
def test_bad_input_is_a_400_pointing_at_the_entry(client, neuroscope, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=2,
            extra_body={"neuroscope": neuroscope},
        )  # fmt: skip
    assert info.value.status_code == 400
    assert info.value.param == ("neuroscope." + param if param else "neuroscope")
    assert info.value.body["type"] == "invalid_request_error"
    assert info.value.body["message"]


def test_a_non_finite_strength_in_raw_json_is_refused(server):
    # JSON has no NaN; a body that spells it is not valid JSON, and says so
    body = (
        b'{"messages": [{"role": "user", "content": "hi"}], "neuroscope": {"steering": '
        b'[{"layer": 2, "feature": 1, "strength": NaN}]}}'
    )
    r = httpx.post(
        server.listening.chat_url + "/v1/chat/completions",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["message"]
    # and the server still serves
    assert httpx.get(server.listening.chat_url + "/health").status_code == 200
