"""Labels reach the feature stream: auto-interp labels in the cache show up on records and in
``/v1/features/labels``; features without one fall back to ``feature_<index>``."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import TINY_LAYER, requires_torch
from labels_support import FileServer
from serve_support import FeatureStream, start_server

from neuroscope.labels import store
from neuroscope.labels.sources import LabelResolver

pytestmark = [pytest.mark.torch, requires_torch]
LABELER = "test/labeler"


def expected(index: int) -> str:
    return f"concept {index}" if index % 2 == 0 else f"feature_{index}"


@pytest.fixture(scope="module")
def server(tiny_model, tiny_sae, tmp_path_factory):
    # A cache of its own: other tests file labels for the same tiny SAE.
    patch = pytest.MonkeyPatch()
    patch.setenv("NEUROSCOPE_CACHE", str(tmp_path_factory.mktemp("labels-cache")))
    sae_id = str(Path(tiny_sae["npz"]).resolve())
    folder = store.autointerp_dir(LABELER, str(tiny_model), sae_id)
    folder.mkdir(parents=True, exist_ok=True)
    store.write_meta(folder, labeler=LABELER, model=str(tiny_model), sae=sae_id)
    with store.Journal(folder / store.LABELS_FILE) as journal:
        journal.extend({"index": i, "label": f"concept {i}"} for i in range(0, 128, 2))
    resolver = LabelResolver(str(tiny_model), {TINY_LAYER: sae_id}, labeler=LABELER)
    server = start_server(tiny_model, tiny_sae["npz"], session={"labels": resolver})
    yield server
    server.stop()
    patch.undo()


def test_labels_endpoint_lists_every_feature(server):
    labels = httpx.get(server.listening.features_url + "/v1/features/labels", timeout=30).json()
    assert len(labels) == 128
    assert all(labels[str(i)] == expected(i) for i in range(128))


def test_records_carry_the_cached_labels(server):
    body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4, "temperature": 0}
    with FeatureStream(server.listening.features_url) as stream:
        reply = httpx.post(
            server.listening.chat_url + "/v1/chat/completions", json=body, timeout=60
        ).json()
        stream.completion(reply["id"])
    features = [f for r in stream.records(reply["id"]) for f in r["top_features"]]
    assert features and all(f["label"] == expected(f["index"]) for f in features)
    assert any(f["index"] % 2 == 0 for f in features), "some shown feature has a cached label"


def test_labels_that_arrive_later_are_served(tiny_model, tiny_sae, tmp_path, monkeypatch):
    """A live Neuronpedia fetch (started by the features a chat shows) changes the label source;
    ``/v1/features/labels`` then serves the new labels instead of a listing cached at the start."""
    monkeypatch.setenv("NEUROSCOPE_CACHE", str(tmp_path / "cache"))
    routes = {
        f"/api/feature/tiny/tiny-sae/{i}": (
            200,
            json.dumps({"index": str(i), "explanations": [{"description": f"np {i}"}]}).encode(),
        )
        for i in range(128)
    }
    with FileServer(routes) as neuronpedia:
        monkeypatch.setenv("NEURONPEDIA_URL", neuronpedia.url)
        resolver = LabelResolver(
            str(tiny_model), {TINY_LAYER: "tiny-sae"}, allow_network=True,
            neuronpedia_ids={TINY_LAYER: "tiny/tiny-sae"},
        )  # fmt: skip
        server = start_server(tiny_model, tiny_sae["npz"], session={"labels": resolver})
        try:
            url = server.listening.features_url + "/v1/features/labels"
            before = httpx.get(url, timeout=30).json()
            assert all(before[str(i)] == f"feature_{i}" for i in range(128))
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            reply = httpx.post(server.listening.chat_url + "/v1/chat/completions", json=body)
            assert reply.status_code == 200
            assert resolver.wait_idle(20) and neuronpedia.hits, "the chat's features were fetched"
            after = httpx.get(url, timeout=30).json()
            fetched = {int(p.rsplit("/", 1)[1]) for p in neuronpedia.hits}
            assert fetched and all(after[str(i)] == f"np {i}" for i in fetched)
            assert all(after[str(i)] == f"feature_{i}" for i in set(range(128)) - fetched)
        finally:
            server.stop()
