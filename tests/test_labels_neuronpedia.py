"""Neuronpedia: id mapping, bulk-export import (local files in the export format, and a download from
a local stand-in for the export bucket), live per-feature fetches from a local stand-in API."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from labels_support import FileServer
from typer.testing import CliRunner

from neuroscope.cli import app
from neuroscope.errors import ConfigError
from neuroscope.labels.neuronpedia import (
    NeuronpediaId,
    cache_path,
    import_exports,
    load_cached,
    neuronpedia_id_for,
)
from neuroscope.labels.sources import LabelResolver

DEFAULT_SAE = "google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71"
NP = NeuronpediaId("gemma-2-2b", "20-gemmascope-res-16k")


def export_rows(indices: range, np_id: NeuronpediaId = NP, prefix: str = "np") -> list[dict]:
    """Rows shaped like Neuronpedia's explanation exports (index as a string, extra fields)."""
    return [
        {"modelId": np_id.model, "layer": np_id.sae, "index": str(i), "description": f"{prefix} {i}",
         "explanationModelName": "gemini-2.5-flash-lite", "typeName": "np_acts-logits-general",
         "authorId": "x", "embedding": [0.1, 0.2], "createdAt": "2025-01-01T00:00:00.000Z"}
        for i in indices
    ]  # fmt: skip


def gz_jsonl(rows: list[dict]) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUROSCOPE_CACHE", str(tmp_path / "cache"))


def test_our_sae_ids_map_to_neuronpedia_ids() -> None:
    assert neuronpedia_id_for(DEFAULT_SAE) == NP
    assert (
        str(neuronpedia_id_for("google/gemma-scope-2b-pt-mlp/layer_3/width_65k/average_l0_40"))
        == "gemma-2-2b/3-gemmascope-mlp-65k"
    )
    assert (
        str(neuronpedia_id_for("google/gemma-scope-9b-it-res/layer_31/width_131k/canonical"))
        == "gemma-2-9b-it/31-gemmascope-res-131k"
    )
    assert neuronpedia_id_for("/home/me/params.npz") is None
    assert neuronpedia_id_for("someone/other-saes/layer_20/width_16k") is None
    assert NeuronpediaId.parse("gemma-2-2b/20-gemmascope-res-16k") == NP
    for bad in ("gemma-2-2b", "a/b/c", "/x"):
        with pytest.raises(ConfigError, match="MODEL/SAE"):
            NeuronpediaId.parse(bad)


def test_import_local_export_files(tmp_path: Path) -> None:
    (tmp_path / "batch-0.jsonl.gz").write_bytes(gz_jsonl(export_rows(range(0, 5))))
    second = export_rows(range(5, 8)) + export_rows(range(0, 2), prefix="later duplicate")
    second.append(
        {"modelId": NP.model, "layer": NP.sae, "index": "9", "description": ""}
    )  # no label
    (tmp_path / "batch-1.jsonl.gz").write_bytes(gz_jsonl(second))
    counts = import_exports(sorted(tmp_path.glob("*.gz")))
    assert counts == {NP: 8}
    cached = load_cached(NP)
    assert cached == {i: f"np {i}" for i in range(8)}  # first explanation wins; empty ones skipped
    record = json.loads(cache_path(NP).read_text().splitlines()[0])
    assert record["explanation_model"] == "gemini-2.5-flash-lite" and record["source"] == "export"
    assert "embedding" not in record


def test_import_refuses_mixups_and_needs_an_id_for_anonymous_rows(tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl.gz"
    other.write_bytes(
        gz_jsonl(export_rows(range(3), NeuronpediaId("gemma-2-2b", "12-gemmascope-res-16k")))
    )
    with pytest.raises(ConfigError, match="not gemma-2-2b/20-gemmascope-res-16k"):
        import_exports([other], NP)
    assert not cache_path(NP).exists()
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"index": 4, "description": "plain"}) + "\n")
    with pytest.raises(ConfigError, match="--neuronpedia-id"):
        import_exports([bare])
    assert import_exports([bare], NP) == {NP: 1} and load_cached(NP) == {4: "plain"}
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match="Cannot read"):
        import_exports([broken], NP)


def test_download_and_import_through_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    base = f"/v1/{NP.model}/{NP.sae}/explanations"
    routes = {f"{base}/batch-0.jsonl.gz": (200, gz_jsonl(export_rows(range(0, 4)))),
              f"{base}/batch-1.jsonl.gz": (200, gz_jsonl(export_rows(range(4, 6))))}  # fmt: skip
    with FileServer(routes) as server:
        monkeypatch.setenv("NEURONPEDIA_EXPORTS_URL", server.url + "/v1")
        result = CliRunner().invoke(app, ["labels", "import-neuronpedia", "--download"])
        assert server.hits == [
            f"{base}/batch-{i}.jsonl.gz" for i in range(3)
        ]  # stops at the first missing
    assert result.exit_code == 0, result.output
    assert "Imported 6 Neuronpedia labels for gemma-2-2b/20-gemmascope-res-16k" in result.output
    assert load_cached(NP) == {i: f"np {i}" for i in range(6)}


def test_download_of_an_unknown_sae_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    with FileServer({}) as server:
        monkeypatch.setenv("NEURONPEDIA_EXPORTS_URL", server.url + "/v1")
        result = CliRunner().invoke(
            app,
            [
                "labels",
                "import-neuronpedia",
                "--download",
                "--neuronpedia-id",
                "gemma-2-2b/99-nothing",
            ],
        )
    assert (
        result.exit_code == 1
        and "no explanations export for gemma-2-2b/99-nothing" in result.output
    )
    result = CliRunner().invoke(
        app, ["labels", "import-neuronpedia", "--download", "--sae-local-path", "/tmp/x.npz"]
    )
    assert result.exit_code == 1 and "--neuronpedia-id" in result.output


def feature_api(routes: dict[int, tuple[int, object]]) -> dict[str, tuple[int, bytes]]:
    return {
        f"/api/feature/{NP.model}/{NP.sae}/{i}": (status, json.dumps(body).encode())
        for i, (status, body) in routes.items()
    }


def test_live_fetch_is_opt_in_background_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    routes = feature_api({
        5: (200, {"index": "5", "explanations": [{"description": "capital cities", "explanationModelName": "m"},
                                                 {"description": "second opinion"}]}),
        6: (200, {"index": "6", "explanations": []}),
        7: (404, {"error": "not found"}),
    })  # fmt: skip
    with FileServer(routes) as server:
        monkeypatch.setenv("NEURONPEDIA_URL", server.url)
        offline = LabelResolver("m", {20: DEFAULT_SAE})
        assert offline.label(20, 5) == ("feature_5", "fallback")
        assert (
            offline.fetch_missing(20, [5]) == [] and server.hits == []
        )  # no network unless allowed

        live = LabelResolver("m", {20: DEFAULT_SAE}, allow_network=True)
        assert len(live.labels_for(20, width=16384)) == 16384 and live.wait_idle(10)
        assert server.hits == []  # listing every label never fetches
        assert live.label(20, 5) == ("feature_5", "fallback")  # never waits on the token path
        live.label(20, 6)
        live.label(20, 7)
        assert live.wait_idle(10)
        assert live.label(20, 5) == ("capital cities", "neuronpedia")
        assert live.label(20, 6) == ("feature_6", "fallback") and live.label(20, 7) == (
            "feature_7",
            "fallback",
        )
        hits = len(server.hits)
        live.label(20, 6)
        live.label(20, 5)
        assert live.wait_idle(10) and len(server.hits) == hits  # "none" is remembered too
        live.close()
    assert load_cached(NP) == {5: "capital cities", 6: None, 7: None}
    assert LabelResolver("m", {20: DEFAULT_SAE}).label(20, 5) == ("capital cities", "neuronpedia")


def test_an_unreachable_neuronpedia_pauses_live_fetches(monkeypatch: pytest.MonkeyPatch) -> None:
    with FileServer(feature_api({8: (500, {"error": "down"})})) as server:
        monkeypatch.setenv("NEURONPEDIA_URL", server.url)
        live = LabelResolver("m", {20: DEFAULT_SAE}, allow_network=True)
        live.label(20, 8)
        assert live.wait_idle(10)
        live.label(20, 9)  # within the pause: not even asked
        assert live.wait_idle(10)
        assert server.hits == [f"/api/feature/{NP.model}/{NP.sae}/8"]
        errors = LabelResolver("m", {20: DEFAULT_SAE}, allow_network=True).fetch_missing(20, [8])
        assert errors and "HTTP 500" in errors[0]
        live.close()
    assert load_cached(NP) == {}  # failures are not cached as "none"
