"""The feature record's wire form: msgspec's bytes equal the documented dict, field for field."""

from __future__ import annotations

import json

import pytest

from neuroscope.records import Feature, GenerationComplete, TokenFeatures


def record(**overrides: object) -> TokenFeatures:
    fields: dict = dict(
        request_id="chatcmpl-1", position=3, phase="generation", token=' "Paris"\n東京',
        token_id=9, layer=2, sae="repo/layer_2", token_index=0, next_token=".",
        top_features=[Feature(4521, 3.82, "geography"), Feature(7, 0.5, "", 2.25)],
    )  # fmt: skip
    fields.update(overrides)
    return TokenFeatures(**fields)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"filtered_count": 0}, {"filtered_count": 3}, {"token_index": None, "next_token": None}],
)
def test_json_bytes_equal_the_dict(overrides) -> None:
    rec = record(**overrides)
    data = rec.to_json_bytes()
    assert json.loads(data) == rec.to_dict()
    assert rec.to_json() == data.decode()
    parsed = json.loads(data)
    # documented: token_index/next_token always present; filtered_count/surprise only when computed
    assert "token_index" in parsed and "next_token" in parsed
    assert ("filtered_count" in parsed) is ("filtered_count" in overrides)
    assert ["surprise" in f for f in parsed["top_features"]] == [False, True]
    assert parsed["top_features"][1]["label"] == "feature_7"  # an empty label falls back
    assert "東京" in data.decode()  # UTF-8, not \\u escapes
    assert TokenFeatures.from_dict(parsed) == rec


def test_completion_json() -> None:
    done = GenerationComplete("chatcmpl-1", "stop", 5, 7)
    assert json.loads(done.to_json_bytes()) == done.to_dict()
