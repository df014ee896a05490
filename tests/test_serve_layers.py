"""Serving with SAEs at two layers: one record per position and layer, and the layer filters."""

from __future__ import annotations

import httpx
import pytest
from conftest import requires_torch
from serve_support import FeatureStream, start_server

pytestmark = [pytest.mark.torch, requires_torch]

LAYERS = (1, 2)
HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


@pytest.fixture(scope="module")
def server(tiny_model, tiny_sae):
    # The same 64-wide SAE file at both layers: enough to tell the layers' records apart.
    server = start_server(tiny_model, tiny_sae["npz"], session={"layer": list(LAYERS)})
    yield server
    server.stop()


def chat(server, max_tokens: int) -> dict:
    body = {"messages": HELLO, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(server.listening.chat_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200
    return r.json()


def test_each_generated_token_has_a_record_per_layer_and_the_layer_filter_picks_one(server) -> None:
    features = server.listening.features_url
    with FeatureStream(features) as both, FeatureStream(features, {"layer": "1"}) as first:
        reply = chat(server, 6)
        both.completion(reply["id"])
        first.completion(reply["id"])
        records = both.records(reply["id"])
        only_1 = first.records(reply["id"])
    assert [(r["token_index"], r["layer"]) for r in records] == [
        (i, L) for i in range(6) for L in LAYERS
    ]
    assert only_1 == [r for r in records if r["layer"] == 1]
    # Same token at both layers, different residual streams, so (almost surely) different features.
    per_layer = {L: [r["top_features"] for r in records if r["layer"] == L] for L in LAYERS}
    assert per_layer[1] != per_layer[2]
    text = "".join(r["token"] for r in only_1)
    assert text == reply["choices"][0]["message"]["content"]


def test_labels_need_a_layer_when_several_are_hooked(server) -> None:
    url = server.listening.features_url + "/v1/features/labels"
    ambiguous = httpx.get(url)
    assert ambiguous.status_code == 400 and ambiguous.json()["error"]["param"] == "layer"
    assert "pass ?layer=" in ambiguous.json()["error"]["message"]
    for layer in LAYERS:
        labels = httpx.get(url, params={"layer": layer})
        assert labels.status_code == 200 and len(labels.json()) == 128
    assert httpx.get(url, params={"layer": 3}).status_code == 400
    health = httpx.get(server.listening.chat_url + "/health").json()
    assert health["layers"] == list(LAYERS)
