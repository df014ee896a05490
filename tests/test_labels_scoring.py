"""Detection scoring: trials from held-out and exact non-activating excerpts, balanced accuracy,
scores journalled beside the labels, low ones flagged, nothing scored twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from labels_support import FakeLabeler, feature_of_text, make_examples
from typer.testing import CliRunner

from neuroscope.cli import app
from neuroscope.labels import examples as ex
from neuroscope.labels import store
from neuroscope.labels.labeler import LabelerConfig, RetryPolicy, UnusableAnswer
from neuroscope.labels.scoring import (
    Trial,
    balanced_accuracy,
    build_trial,
    parse_detection,
    score_labels,
)

FAST = RetryPolicy(attempts=3, base_delay=0.01, timeout=5.0)
WIDTH = 12


@pytest.fixture
def examples_folder(tmp_path: Path) -> Path:
    make_examples(tmp_path / "examples", width=WIDTH)
    return tmp_path / "examples"


def labels_for(features: range) -> dict[int, str]:
    return {i: f"label of f{i}" for i in features}


def config_for(server: FakeLabeler) -> LabelerConfig:
    return LabelerConfig("test/scorer", server.url, "custom", "x")


def test_balanced_accuracy_counts_both_sides() -> None:
    trial = Trial(0, "x", ["a", "b", "c", "d", "e"], frozenset({1, 2}))
    assert balanced_accuracy(frozenset({1, 2}), trial) == {
        "score": 1.0,
        "tp": 2,
        "fn": 0,
        "tn": 3,
        "fp": 0,
    }
    assert (
        balanced_accuracy(frozenset({1, 2, 3, 4, 5}), trial)["score"] == 0.5
    )  # "all of them" is chance
    assert balanced_accuracy(frozenset(), trial)["score"] == 0.5
    got = balanced_accuracy(frozenset({1, 3}), trial)
    assert got["score"] == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-4) and got["fp"] == 1


def test_trials_mix_held_out_positives_with_exact_negatives(examples_folder: Path) -> None:
    negatives = ex.read_negatives(examples_folder)
    for feature in ex.iter_features(examples_folder):
        trial = build_trial(feature, "lbl", negatives)
        assert trial is not None
        shown = dict(enumerate(trial.excerpts, start=1))
        assert sorted(shown[n] for n in trial.activating) == sorted(
            e.text for e in feature.held_out()
        )
        for (
            n,
            text,
        ) in shown.items():  # by the rule, an excerpt activates iff it holds the feature's token
            assert (feature.index in feature_of_text(text, WIDTH)) == (n in trial.activating)
        assert len(trial.excerpts) == 2 * len(feature.held_out())
        assert build_trial(feature, "lbl", negatives) == trial  # deterministic
        assert not any("<<" in t for t in trial.excerpts)  # the scorer is not shown where it fires
    feature = next(ex.iter_features(examples_folder))
    only_firing = [n for n in negatives if feature.index in n.fired]
    assert build_trial(feature, "lbl", only_firing) is None


def test_detection_answers_must_name_real_excerpts() -> None:
    assert parse_detection('{"activating": [1, "3"]}', 4) == {1, 3}
    with pytest.raises(UnusableAnswer):
        parse_detection('{"activating": [5]}', 4)
    with pytest.raises(UnusableAnswer):
        parse_detection('{"activating": "1, 2"}', 4)
    # What a model without JSON mode writes.
    assert parse_detection("Activating: 2, 4", 4) == {2, 4}
    assert parse_detection("**Activating:** none", 4) == frozenset()
    assert parse_detection("The feature fires in [1, 3].", 4) == {1, 3}
    assert parse_detection("<think>[4]?</think>```json\n{\"activating\": [2]}\n```", 4) == {2}
    with pytest.raises(UnusableAnswer):
        parse_detection("It fires in several of them.", 4)


def test_scores_land_beside_labels_and_are_not_asked_twice(
    examples_folder: Path, tmp_path: Path
) -> None:
    scores_path = tmp_path / "labels" / store.SCORES_FILE
    labels = labels_for(range(WIDTH))
    with FakeLabeler(
        WIDTH, lambda f, a: "wrong" if f in (2, 9) else ("429" if a == 1 and f == 4 else "ok")
    ) as server:
        result = score_labels(
            labels,
            examples_folder,
            scores_path,
            config_for(server),
            threshold=0.6,
            concurrency=3,
            policy=FAST,
            progress=False,
        )
        assert server.features_requested("detect")[4] == 2  # the 429 was retried
    assert result.scores == {i: (0.0 if i in (2, 9) else 1.0) for i in range(WIDTH)}
    assert result.flagged == [2, 9]
    records = store.Journal(scores_path).load()
    assert records[2]["flagged"] is True and records[0]["flagged"] is False
    assert records[0]["label"] == "label of f0" and records[0]["scorer"] == "test/scorer"
    assert records[0]["tp"] + records[0]["fn"] == len(
        next(f for f in ex.iter_features(examples_folder) if f.index == 0).held_out()
    )

    changed = labels | {5: "label of f5, revised"}
    with FakeLabeler(WIDTH) as server:
        again = score_labels(
            changed, examples_folder, scores_path, config_for(server), policy=FAST, progress=False
        )
        assert server.features_requested("detect") == {5: 1}  # only the changed label
    assert again.skipped_done == WIDTH - 1 and again.scores[5] == 1.0


def test_features_without_negatives_are_counted_not_sent(
    examples_folder: Path, tmp_path: Path
) -> None:
    rows = [
        json.loads(line) for line in (examples_folder / ex.NEGATIVES_FILE).read_text().splitlines()
    ]
    (examples_folder / ex.NEGATIVES_FILE).write_text(
        "".join(json.dumps(r | {"fired": sorted(set(r["fired"]) | {3})}) + "\n" for r in rows)
    )
    with FakeLabeler(WIDTH) as server:
        result = score_labels(
            labels_for(range(WIDTH)),
            examples_folder,
            tmp_path / "s.jsonl",
            config_for(server),
            policy=FAST,
            progress=False,
        )
        assert 3 not in server.features_requested("detect")
    assert result.insufficient == 1 and 3 not in result.scores


def test_score_command_flags_low_labels(examples_folder: Path, tmp_path: Path) -> None:
    labels_json = tmp_path / "mine.json"
    labels_json.write_text(json.dumps({str(i): f"label of f{i}" for i in range(WIDTH)}))
    with FakeLabeler(WIDTH, lambda f, a: "wrong" if f == 6 else "ok") as server:
        result = CliRunner().invoke(
            app,
            ["labels", "score", "--labels", str(labels_json), "--model", "test/model", "--sae-local-path", str(tmp_path / "sae.npz"),
             "--sae-layer", "0", "--labeler-backend", server.url, "--labeler", "test/scorer"],
        )  # fmt: skip
        # the examples are found through --model/--sae-local-path: none there, so it says what to do
        assert result.exit_code == 1 and "labels generate" in result.output
        folder = ex.examples_dir("test/model", str(tmp_path / "sae.npz"))
        make_examples(folder, width=WIDTH)
        result = CliRunner().invoke(
            app,
            ["labels", "score", "--labels", str(labels_json), "--model", "test/model", "--sae-local-path", str(tmp_path / "sae.npz"),
             "--sae-layer", "0", "--labeler-backend", server.url, "--labeler", "test/scorer", "--threshold", "0.7"],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "under 0.7" in result.output and "Under the threshold: 6" in result.output
    scores = store.Journal(tmp_path / "mine.scores.jsonl").load()
    assert scores[6]["score"] == 0.0 and scores[0]["score"] == 1.0
