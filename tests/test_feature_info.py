"""``GET /v1/features/info``: what the page's feature panel shows about one feature, from the labels,
calibration stats and corpus-pass examples in the cache."""

from __future__ import annotations

import httpx
import pytest
from conftest import TINY_LAYER, requires_torch
from page_support import LABELER, label_for, labelled_server

pytestmark = [pytest.mark.torch, requires_torch]


@pytest.fixture(scope="module")
def server(tiny_model, tiny_sae, tmp_path_factory):
    with labelled_server(tiny_model, tiny_sae, tmp_path_factory.mktemp("info-cache")) as server:
        yield server


def test_feature_info_answers_what_the_panel_shows(server) -> None:
    url = server.listening.features_url + "/v1/features/info"
    info = httpx.get(url, params={"index": 12}, timeout=30).json()
    assert info["layer"] == TINY_LAYER and info["index"] == 12
    assert info["label"] == label_for(12) and info["label_source"] == f"autointerp:{LABELER}"
    assert info["firing_rate"] == pytest.approx(12 * 5 / 1000)
    assert info["mean_activation"] == pytest.approx(1.2)
    assert info["max_activation"] == pytest.approx(2.4)
    assert info["examples"][0]["token"] == "<b>tok12</b>"
    assert info["neuronpedia"] is None
    for params, param in [({"index": 128}, "index"), ({"index": "x"}, "index"),
                          ({"index": 1, "layer": 0}, "layer")]:  # fmt: skip
        refused = httpx.get(url, params=params, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param
