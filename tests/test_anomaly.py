"""Anomalies: features far outside calibration reach the feature stream as ``event: anomaly``."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from conftest import TINY_LAYER, requires_torch
from serve_support import FeatureStream, start_server

from neuroscope.anomaly import DEFAULT_ANOMALY_Z, anomalies
from neuroscope.filters import FeatureFilter, LayerCalibration
from neuroscope.records import Feature, TokenFeatures

WIDTH = 128  # the tiny SAE's


def _record(surprises: list[float | None]) -> TokenFeatures:
    return TokenFeatures(
        request_id="r", position=3, phase="prompt", token=" Paris", token_id=9, layer=2, sae="s",
        top_features=[Feature(i, 1.0 + i, f"f{i}", s) for i, s in enumerate(surprises)],
    )  # fmt: skip


def test_only_features_past_the_threshold_are_anomalies():
    found = anomalies(_record([12.0, 9.99, None, 10.0]))
    assert [(a.feature, a.surprise) for a in found] == [(0, 12.0), (3, 10.0)]
    assert found[0].to_dict() == {
        "request_id": "r", "position": 3, "phase": "prompt", "token": " Paris", "layer": 2,
        "feature": 0, "label": "f0", "activation": 1.0, "surprise": 12.0, "site": "resid_post",
    }  # fmt: skip
    assert anomalies(_record([None, None])) == []  # no calibration, no surprise, no anomaly
    assert anomalies(_record([50.0]), z=None) == []


@pytest.fixture(scope="module")
def server(tiny_model, tiny_sae):
    # A calibration in which every feature fires rarely and weakly (mean 0, std 0.05): what the
    # random SAE does on the tiny model is far outside it, so many features are anomalies.
    calibration = LayerCalibration(
        firing_rate=np.full(WIDTH, 0.001),
        mean=np.zeros(WIDTH),
        std=np.full(WIDTH, 0.05),
    )
    feature_filter = FeatureFilter(mode="surprise", layers={TINY_LAYER: calibration}, width=WIDTH)
    server = start_server(tiny_model, tiny_sae["npz"], session={"feature_filter": feature_filter})
    yield server
    server.stop()


@requires_torch
def test_the_stream_flags_every_feature_past_the_threshold(server):
    with FeatureStream(server.listening.features_url, params={"phase": "all"}) as stream:
        r = httpx.post(
            server.listening.chat_url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Tell me about Paris."}],
                  "max_tokens": 4, "temperature": 0},
            timeout=60,
        )  # fmt: skip
        request_id = r.json()["id"]
        stream.completion(request_id)
    records = [e.data for e in stream.events if e.name == "feature_activation"]
    flagged = [e.data for e in stream.events if e.name == "anomaly"]
    expected = [
        (rec["position"], f["index"])
        for rec in records
        for f in rec["top_features"]
        if f["surprise"] >= DEFAULT_ANOMALY_Z
    ]
    assert expected, "the calibration above should make some features anomalous"
    assert sorted((a["position"], a["feature"]) for a in flagged) == sorted(expected)
    assert {a["request_id"] for a in flagged} == {request_id}
    assert {a["phase"] for a in flagged} <= {"prompt", "generation"}
    assert all(a["surprise"] >= DEFAULT_ANOMALY_Z for a in flagged)
