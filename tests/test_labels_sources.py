"""The label priority chain (auto-interp > cached Neuronpedia > live Neuronpedia > feature_<i>),
the journal it reads, firing rates, and ``labels show``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from labels_support import make_examples
from typer.testing import CliRunner

from neuroscope.calibration import (
    CalibrationHeader,
    CalibrationStats,
    FeatureAccumulator,
    stats_path,
)
from neuroscope.cli import app
from neuroscope.labels import examples as ex
from neuroscope.labels import store, top_tokens
from neuroscope.labels.firing import firing_rates
from neuroscope.labels.neuronpedia import NeuronpediaId, import_exports
from neuroscope.labels.sources import LabelResolver

SAE = "google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71"
MODEL = "google/gemma-2-2b-it"
NP = NeuronpediaId("gemma-2-2b", "20-gemmascope-res-16k")


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUROSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LABELER_MODEL", raising=False)


def write_labels(labeler: str, model: str, sae: str, records: list[dict]) -> Path:
    folder = store.autointerp_dir(labeler, model, sae)
    with store.Journal(folder / store.LABELS_FILE) as journal:
        journal.extend(records)
    store.write_meta(folder, labeler=labeler, model=model, sae=sae)
    return folder


def import_np(tmp_path: Path, labels: dict[int, str]) -> None:
    path = tmp_path / "np.jsonl"
    path.write_text(
        "".join(
            json.dumps({"modelId": NP.model, "layer": NP.sae, "index": i, "description": d}) + "\n"
            for i, d in labels.items()
        )
    )
    import_exports([path])


def test_the_priority_chain(tmp_path: Path) -> None:
    write_labels("deepseek/deepseek-v3.2", MODEL, SAE, [
        {"index": 1, "status": "ok", "label": "auto one"},
        {"index": 2, "status": "failed", "error": "x"},
        {"index": 3, "status": "ok", "label": "old three"},
        {"index": 3, "status": "ok", "label": "auto three"},  # the last record wins
    ])  # fmt: skip
    import_np(tmp_path, {1: "np one", 2: "np two", 4: "np four"})
    resolver = LabelResolver(MODEL, {20: SAE})
    assert resolver.label(20, 1) == ("auto one", "autointerp:deepseek/deepseek-v3.2")
    assert resolver.label(20, 2) == ("np two", "neuronpedia")  # a failed label falls through
    assert resolver.label(20, 3)[0] == "auto three"
    assert resolver.label(20, 4) == ("np four", "neuronpedia")
    assert resolver.label(20, 5) == ("feature_5", "fallback")
    assert resolver(20, 1) == "auto one"  # usable as a LabelLookup
    assert resolver.label(12, 1) == ("feature_1", "fallback")  # a layer without an SAE
    assert resolver.labels_for(20) == {1: "auto one", 2: "np two", 3: "auto three", 4: "np four"}
    assert resolver.labels_for(12) == {}
    everything = resolver.labels_for(20, width=7)
    assert everything == {
        0: "feature_0",
        1: "auto one",
        2: "np two",
        3: "auto three",
        4: "np four",
        5: "feature_5",
        6: "feature_6",
    }
    off = LabelResolver(MODEL, {20: SAE}, neuronpedia_ids={20: None})
    assert off.label(20, 4) == ("feature_4", "fallback")


def test_which_labeler_and_model(monkeypatch: pytest.MonkeyPatch) -> None:
    write_labels(
        "claude-haiku-4-5", MODEL, SAE, [{"index": 1, "status": "ok", "label": "claude one"}]
    )
    # No labeler named and none from the default one: the labels that exist are used.
    assert LabelResolver(MODEL, {20: SAE}).label(20, 1) == (
        "claude one",
        "autointerp:claude-haiku-4-5",
    )
    # A labeler named explicitly is the only one used.
    assert LabelResolver(MODEL, {20: SAE}, labeler="other/model").label(20, 1)[1] == "fallback"
    monkeypatch.setenv("LABELER_MODEL", "other/model")
    assert LabelResolver(MODEL, {20: SAE}).label(20, 1)[1] == "fallback"
    monkeypatch.delenv("LABELER_MODEL")
    # The default labeler, when it has labels, wins over others; this model over other models.
    write_labels(
        "deepseek/deepseek-v3.2",
        "google/gemma-2-2b",
        SAE,
        [{"index": 1, "status": "ok", "label": "base model"}],
    )
    assert LabelResolver(MODEL, {20: SAE}).label(20, 1)[0] == "base model"
    write_labels(
        "deepseek/deepseek-v3.2", MODEL, SAE, [{"index": 1, "status": "ok", "label": "it model"}]
    )
    resolver = LabelResolver(MODEL, {20: SAE})
    assert resolver.label(20, 1)[0] == "it model"
    assert resolver.label_set(20).model == MODEL  # type: ignore[union-attr]


def test_reload_picks_up_new_labels() -> None:
    resolver = LabelResolver(MODEL, {20: SAE})
    assert resolver.label(20, 1)[1] == "fallback"
    write_labels(
        "deepseek/deepseek-v3.2", MODEL, SAE, [{"index": 1, "status": "ok", "label": "new"}]
    )
    assert resolver.label(20, 1)[1] == "fallback"  # loaded once: the token path never reads disk
    resolver.reload()
    assert resolver.label(20, 1)[0] == "new"


def test_journal_survives_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with store.Journal(path) as journal:
        journal.append({"index": 1, "label": "a"})
    with open(path, "ab") as f:
        f.write(b'{"index": 2, "lab')  # killed mid-write
    journal = store.Journal(path)
    assert journal.load() == {1: {"index": 1, "label": "a"}} and journal.skipped_lines == 1
    journal.append({"index": 3, "label": "c"})
    journal.close()
    assert sorted(journal.load()) == [1, 3]
    assert journal.compact() == 2 and path.read_text().count("\n") == 2


def rule_calibration(
    model: str, sae: str, layer: int, width: int, fire: list[int], tokens: int
) -> None:
    from neuroscope.backend import BatchStats

    acc = FeatureAccumulator.zeros(width)
    acc.add(BatchStats(tokens=tokens, seq_len=1, fire_count=np.array(fire), act_sum=np.array(fire, float),
                       act_m2=np.zeros(width), act_max=np.ones(width, np.float32)))  # fmt: skip
    header = CalibrationHeader(model=model, sae_id=sae, sae_width=width, layer=layer, tokens=tokens)
    CalibrationStats(header, acc).save(stats_path(model, sae, layer))


def test_firing_rates_prefer_calibration_then_the_corpus_pass() -> None:
    assert firing_rates(MODEL, SAE, 20) is None
    make_examples(ex.examples_dir(MODEL, SAE), width=12)
    from_pass = firing_rates(MODEL, SAE, 20)
    counts, tokens = ex.fire_counts(ex.examples_dir(MODEL, SAE))  # type: ignore[misc]
    assert from_pass is not None and from_pass.source == "corpus pass"
    assert from_pass.rate(3) == pytest.approx(counts[3] / tokens) and from_pass.rate(99) is None
    rule_calibration(MODEL, SAE, 20, 12, [5] * 12, 1000)
    calibrated = firing_rates(MODEL, SAE, 20)
    assert (
        calibrated is not None
        and calibrated.source == "calibration"
        and calibrated.rate(3) == pytest.approx(0.005)
    )


def test_show_prints_label_source_score_rate_and_examples(tmp_path: Path) -> None:
    make_examples(ex.examples_dir(MODEL, SAE), width=12)
    folder = write_labels(
        "deepseek/deepseek-v3.2", MODEL, SAE, [{"index": 3, "status": "ok", "label": "threes"}]
    )
    with store.Journal(folder / store.SCORES_FILE) as scores:
        scores.append(
            {"index": 3, "status": "ok", "label": "threes", "score": 0.55, "flagged": True}
        )
    import_np(tmp_path, {4: "fours from neuronpedia"})
    result = CliRunner().invoke(app, ["labels", "show", "--features", "3,4,11", "--examples", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert (
        "#3  threes" in out
        and "source: autointerp:deepseek/deepseek-v3.2" in out
        and "score: 0.55 (low)" in out
    )
    assert "#4  fours from neuronpedia" in out and "source: neuronpedia" in out
    # no explanation for #11: the tokens it fires hardest on in the corpus pass stand in
    top = top_tokens.labels_from_examples(ex.examples_dir(MODEL, SAE))[11]
    assert f"#11  {top}" in out and "source: top_tokens" in out
    assert "firing rate:" in out and "(corpus pass)" in out
    feature = ex.read_features(ex.examples_dir(MODEL, SAE), [3])[3]
    assert f"1. ({feature.examples[0].activation:.2f}) {feature.examples[0].marked()}" in out
    assert feature.examples[2].marked() not in out

    as_json = CliRunner().invoke(app, ["labels", "show", "--features", "3", "--json"])
    record = json.loads(as_json.output)
    assert record["label"] == "threes" and record["score"] == 0.55 and len(record["examples"]) == 3
    bad = CliRunner().invoke(app, ["labels", "show", "--features", "3,x"])
    assert bad.exit_code == 1 and "--features" in bad.output
