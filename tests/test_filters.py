"""Noise filters on hand-made calibration stats: order, counts and surprise for every mode."""

from __future__ import annotations

import numpy as np
import pytest

from neuroscope.calibration import (
    CalibrationError,
    CalibrationHeader,
    CalibrationStats,
    FeatureAccumulator,
    stats_path,
)
from neuroscope.errors import ConfigError
from neuroscope.filters import FeatureFilter, SAERef, load_filter, make_filter

TOKENS = 1000
# feature:       0     1     2     3     4     5     6     7
RATES = np.array([0.90, 0.60, 0.50, 0.10, 0.05, 0.01, 0.20, 0.00])
MEANS = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 10.0, 0.0])
STDS = np.array([1.0, 1.0, 1.0, 0.5, 0.25, 2.0, 5.0, 0.0])


def hand_stats(
    layer: int = 20, sae_id: str = "repo/layer_20/width_8", model: str = "m"
) -> CalibrationStats:
    count = np.round(RATES * TOKENS).astype(np.int64)
    acc = FeatureAccumulator(
        tokens=TOKENS,
        fire_count=count,
        act_mean=MEANS.copy(),
        act_m2=STDS**2 * count,
        act_max=(MEANS + 3 * STDS).astype(np.float32),
    )
    header = CalibrationHeader(
        model=model, sae_id=sae_id, sae_width=len(RATES), layer=layer, tokens=TOKENS
    )
    return CalibrationStats(header, acc)


def one(f: FeatureFilter, layer: int, idx: np.ndarray, act: np.ndarray, top_k: int | None = None):
    """(kept indices, activations, surprise or None, filtered_count or None) of one position."""
    out = f.plan(top_k).apply(layer, idx, act)
    n = int(out.counts[0])
    surprise = None if out.surprise is None else out.surprise[0, :n]
    filtered = None if out.filtered is None else int(out.filtered[0])
    return out.indices[0, :n], out.activations[0, :n], surprise, filtered


def candidates(*pairs: tuple[int, float]) -> tuple[np.ndarray, np.ndarray]:
    idx, act = zip(*pairs, strict=True)
    return np.array(idx, np.int64), np.array(act, np.float32)


# Activations chosen so that activation order, surprise order and the frequency rule all disagree.
# z = (act - mean) / std:  f0: (6-5)/1 = 1   f1: (5.5-4)/1 = 1.5   f3: (3-2)/.5 = 2
#                          f4: (1.5-1)/.25 = 2   f6: (12-10)/5 = 0.4   f2: (2-3)/1 = -1
POSITION = candidates((6, 12.0), (0, 6.0), (1, 5.5), (3, 3.0), (2, 2.0), (4, 1.5))


def test_none_passes_the_backend_order_through() -> None:
    f = make_filter("none", top_k=3)
    assert f.plan(3).candidates == 3
    idx, act, surprise, filtered = one(f, 20, *POSITION)
    assert idx.tolist() == [6, 0, 1] and act.tolist() == [12.0, 6.0, 5.5]
    assert surprise is None and filtered is None


def test_frequency_drops_features_above_the_threshold_and_keeps_activation_order() -> None:
    f = make_filter("frequency", 0.5, {20: hand_stats()})
    # two features (0 and 1) fire on more than half the tokens: asking for 2 more guarantees top_k
    assert f.plan(3).candidates == 5
    idx, act, surprise, filtered = one(f, 20, *POSITION, top_k=3)
    # rate 0.5 is not above 0.5: feature 2 stays
    assert idx.tolist() == [6, 3, 2]
    assert act.tolist() == [12.0, 3.0, 2.0]
    assert surprise is None
    # the unfiltered top 3 was 6, 0, 1: two of them were always-on noise
    assert filtered == 2
    # with top 2, only f0 of the unfiltered 6, 0 was hidden; f1 (rank 3) would not have been shown
    idx, _, _, filtered = one(f, 20, *POSITION, top_k=2)
    assert idx.tolist() == [6, 3] and filtered == 1


def test_surprise_ranks_by_z_score_against_the_calibration_mean_and_std() -> None:
    f = make_filter("surprise", 0.5, {20: hand_stats()})
    assert f.plan(3).candidates == 8  # 4 x 3, capped at the width
    idx, act, surprise, filtered = one(f, 20, *POSITION, top_k=3)
    # f3 and f4 tie at z=2: the larger activation (f3) comes first
    assert idx.tolist() == [3, 4, 1]
    np.testing.assert_allclose(surprise, [2.0, 2.0, 1.5], rtol=1e-6)
    assert act.tolist() == [3.0, 1.5, 5.5]
    assert filtered == 0


def test_combined_drops_frequent_then_ranks_by_surprise() -> None:
    f = make_filter("combined", 0.5, {20: hand_stats()})
    idx, act, surprise, filtered = one(f, 20, *POSITION, top_k=4)
    assert idx.tolist() == [3, 4, 6, 2]
    np.testing.assert_allclose(surprise, [2.0, 2.0, 0.4, -1.0], rtol=1e-6)
    assert filtered == 2  # f0 and f1 of the unfiltered top 4 (6, 0, 1, 3)


def test_threshold_moves_the_cut() -> None:
    f = make_filter("frequency", 0.15, {20: hand_stats()}, top_k=10)
    idx, _, _, filtered = one(f, 20, *POSITION)
    assert idx.tolist() == [3, 4]  # 6 (0.20), 0, 1, 2 all fire on more than 15% of tokens
    assert filtered == 4
    assert f.plan(2).candidates == 2 + 4


def test_filtering_modes_drop_candidates_that_did_not_fire() -> None:
    f = make_filter("combined", 0.5, {20: hand_stats()}, top_k=5)
    idx, act, surprise, filtered = one(f, 20, *candidates((3, 3.0), (5, 0.0), (4, 0.0)))
    assert idx.tolist() == [3] and filtered == 0 and len(surprise) == 1


def test_a_feature_never_seen_in_calibration_is_very_surprising_but_finite() -> None:
    f = make_filter("surprise", 0.5, {20: hand_stats()}, top_k=2)
    idx, _, surprise, _ = one(f, 20, *candidates((6, 30.0), (7, 0.5)))
    # f7 never fired: its std is floored at a tenth of the median std (median of 1,1,1,.5,.25,2,5 = 1)
    assert idx.tolist() == [7, 6]
    np.testing.assert_allclose(surprise, [0.5 / 0.1, (30 - 10) / 5], rtol=1e-6)


def test_unordered_candidates_are_sorted_before_counting() -> None:
    f = make_filter("frequency", 0.5, {20: hand_stats()}, top_k=2)
    idx, _, _, filtered = one(f, 20, *candidates((3, 3.0), (0, 6.0), (6, 12.0)))
    assert idx.tolist() == [6, 3] and filtered == 1


def test_layers_without_stats_pass_through() -> None:
    f = make_filter("combined", 0.5, {20: hand_stats()}, top_k=2)
    idx, _, surprise, filtered = one(f, 7, *POSITION)
    assert idx.tolist() == [6, 0] and surprise is None and filtered is None


def test_bad_modes_and_thresholds_are_refused() -> None:
    with pytest.raises(ConfigError, match="none, frequency, surprise, combined"):
        make_filter("loud", 0.5, {20: hand_stats()})
    with pytest.raises(ConfigError, match="between 0 and 1"):
        make_filter("frequency", 1.5, {20: hand_stats()})
    with pytest.raises(ConfigError, match="needs calibration"):
        make_filter("surprise", 0.5, {})


def test_load_filter_falls_back_to_none_with_one_message(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NEUROSCOPE_CACHE", str(tmp_path))
    f, message = load_filter(
        "combined", 0.5, "m", {20: SAERef("repo/layer_20/width_8", 8)}, top_k=3
    )
    assert f.mode == "none"
    assert "No calibration stats" in message and "calibrate run" in message
    assert one(f, 20, *POSITION)[3] is None


def test_load_filter_finds_stats_in_the_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NEUROSCOPE_CACHE", str(tmp_path))
    stats = hand_stats()
    stats.save(stats_path("m", stats.header.sae_id, 20))
    f, message = load_filter("combined", 0.5, "m", {20: SAERef(stats.header.sae_id, 8)}, top_k=4)
    assert message is None and f.mode == "combined"
    assert one(f, 20, *POSITION)[0].tolist() == [3, 4, 6, 2]
    # another model's lookup does not see these stats
    f_other, message = load_filter("combined", 0.5, "other", {20: SAERef(stats.header.sae_id, 8)})
    assert f_other.mode == "none" and message


def test_load_filter_refuses_stats_of_another_sae(tmp_path) -> None:
    path = hand_stats(sae_id="repo/layer_20/width_8").save(tmp_path / "stats.safetensors")
    with pytest.raises(CalibrationError) as err:
        load_filter("combined", 0.5, "m", {20: SAERef("repo/layer_20/width_16k", 16384)}, [path])
    message = str(err.value)
    assert "repo/layer_20/width_8 (width 8)" in message
    assert "repo/layer_20/width_16k (width 16384)" in message


def test_load_filter_with_stats_for_some_layers_says_which_pass_unfiltered(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("NEUROSCOPE_CACHE", str(tmp_path))
    path = hand_stats(layer=20).save(tmp_path / "l20.safetensors")
    saes = {20: SAERef("repo/layer_20/width_8", 8), 12: SAERef("repo/layer_12/width_8", 8)}
    f, message = load_filter("frequency", 0.5, "m", saes, [path], top_k=3)
    assert f.mode == "frequency" and "layer 12" in message
    assert one(f, 20, *POSITION)[3] == 2
    assert one(f, 12, *POSITION)[3] is None


def test_the_record_builder_uses_the_filter() -> None:
    from neuroscope.backend import LayerTopK
    from neuroscope.generation import RecordBuilder

    f = make_filter("combined", 0.5, {20: hand_stats()})
    builder = RecordBuilder(sae_ids={20: "repo/layer_20/width_8"}, top_k=3, feature_filter=f)
    assert builder.backend_top_k == 8  # 3 * 4 + 2, capped at the width
    idx, act = POSITION
    record = builder.build(
        "r", 20, LayerTopK(idx[None], act[None]), 0, position=1, phase="prompt", token_id=5,
        token="x", next_token=None, token_index=None,
    )  # fmt: skip
    data = record.to_dict()
    assert [feat["index"] for feat in data["top_features"]] == [3, 4, 6]
    assert data["filtered_count"] == 2  # f0 and f1 of the unfiltered top 3 (6, 0, 1)
    assert all("surprise" in feat for feat in data["top_features"])


@pytest.mark.parametrize("mode", ["none", "frequency", "surprise", "combined"])
def test_many_positions_at_once_equal_one_at_a_time(mode) -> None:
    """The token path filters every row of a step in one call: same answer as row by row."""
    rng = np.random.default_rng(0)
    rows, width = 50, len(RATES)
    idx = np.stack([rng.permutation(width) for _ in range(rows)]).astype(np.int64)
    act = np.round(rng.exponential(3.0, (rows, width)), 1).astype(np.float32)
    act[rng.random((rows, width)) < 0.3] = 0.0  # some candidates did not fire; ties happen too
    f = make_filter(mode, 0.5, {20: hand_stats()} if mode != "none" else None)
    out = f.plan(3).apply(20, idx, act)
    for r in range(rows):
        want = one(f, 20, idx[r], act[r], top_k=3)
        n = int(out.counts[r])
        assert out.indices[r, :n].tolist() == want[0].tolist()
        assert out.activations[r, :n].tolist() == want[1].tolist()
        if want[2] is not None:
            assert out.surprise is not None
            np.testing.assert_array_equal(out.surprise[r, :n], want[2])
        assert (None if out.filtered is None else int(out.filtered[r])) == want[3]
        # the naive reading of the modes, one feature at a time
        firing = [(int(i), float(a)) for i, a in zip(idx[r], act[r], strict=True) if a > 0]
        if mode == "none":  # the backend's first top_k, as they come (a backend sorts them)
            firing = [
                (int(i), float(a)) for i, a in zip(idx[r, :3], act[r, :3], strict=True) if a > 0
            ]
        else:
            firing.sort(key=lambda p: -p[1])
        kept = [p for p in firing if mode in ("none", "surprise") or RATES[p[0]] <= 0.5]
        if mode in ("surprise", "combined"):
            z = {i: (a - MEANS[i]) / max(STDS[i], 0.1) for i, a in kept}
            kept.sort(key=lambda p: (-z[p[0]], -p[1]))
        assert [i for i, _ in kept[:3]] == want[0].tolist()


def test_a_plan_is_immutable_and_asking_for_candidates_changes_nothing() -> None:
    import dataclasses

    f = make_filter("combined", 0.5, {20: hand_stats()})
    plan = f.plan(4)
    before = one(f, 20, *POSITION, top_k=4)
    assert f.plan(1).candidates == 1 * 4 + 2 and plan.candidates == 8
    assert one(f, 20, *POSITION, top_k=4)[0].tolist() == before[0].tolist()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.top_k = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.mode = "none"  # type: ignore[misc]
