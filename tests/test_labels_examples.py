"""The corpus pass (host side): bounded top-N merge, context windows, checkpoints, the examples files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from labels_support import BOS, RuleBackend, decode, feature_of_text, make_examples, token_text

from neuroscope.backend import BatchStats
from neuroscope.labels import examples as ex


def distinct_feature_corpus(n: int, width: int, vocab: int, seed: int = 3) -> list[list[int]]:
    """Sequences in which no feature fires twice (tokens with distinct residues mod width), of
    varying length: a sample's best token is then always among a batch's top-N, and the
    one-example-per-sample rule is exact, so a brute-force reference applies."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(2, width))
        residues = rng.permutation(width)[:length]
        tokens = [int(r + width * rng.integers(0 if r else 1, vocab // width)) for r in residues]
        out.append([BOS, *tokens])
    return out


def brute_force_top(backend: RuleBackend, seqs: list[list[int]], top_n: int):
    """Per feature: the top_n (value, sample, position) by each sample's strongest token."""
    best: dict[int, list[tuple[float, int, int]]] = {f: [] for f in range(backend.width)}
    for s, seq in enumerate(seqs):
        acts = backend.activations(seq)
        for f in range(backend.width):
            if acts[:, f].max() > 0:
                p = int(acts[:, f].argmax())
                best[f].append((float(acts[p, f]), s, p))
    return {f: sorted(v, key=lambda x: -x[0])[:top_n] for f, v in best.items()}


def expected_window(seq: list[int], pos: int, before: int, after: int) -> list[int]:
    return [seq[i] if 0 <= i < len(seq) else -1 for i in range(pos - before, pos + after + 1)]


def test_merge_matches_brute_force_and_cuts_the_right_windows() -> None:
    width, vocab, top_n, before, after = 10, 60, 5, 3, 2
    backend = RuleBackend(width, vocab)
    seqs = distinct_feature_corpus(53, width, vocab)
    top = ex.collect(backend, seqs, 0, width, top_n=top_n, batch_size=4, before=before, after=after)  # type: ignore[arg-type]
    values, sample, position, windows = top.ranked()
    reference = brute_force_top(backend, seqs, top_n)
    for f in range(width):
        ref = reference[f]
        got = np.isfinite(values[f])
        assert got.sum() == len(ref)
        np.testing.assert_allclose(values[f][got], [v for v, _, _ in ref], rtol=1e-6)
        assert sample[f][got].tolist() == [s for _, s, _ in ref]
        assert position[f][got].tolist() == [p for _, _, p in ref]
        for j, (_, s, p) in enumerate(ref):
            assert windows[f, j].tolist() == expected_window(seqs[s], p, before, after)
    assert top.samples_done == len(seqs)
    assert top.tokens == sum(len(s) - 1 for s in seqs)
    fired = np.zeros(width, np.int64)
    for seq in seqs:
        fired += (backend.activations(seq) > 0).sum(0)
    assert top.fire_count.tolist() == fired.tolist()
    assert backend.calls == [4] * 13 + [1]


def test_one_example_per_sample_keeps_the_strongest_token() -> None:
    # Feature 0 fires at three places of sample 0 and once in sample 1.
    stats = BatchStats(
        tokens=10, seq_len=6, fire_count=np.array([4, 0]), act_sum=np.zeros(2), act_m2=np.zeros(2),
        act_max=np.zeros(2, np.float32),
        top_values=np.array([[5.0, 4.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]], np.float32),
        top_tokens=np.array([[2, 4, 7, 1], [-1, -1, -1, -1]]),
    )  # fmt: skip
    batch = [[BOS, 11, 12, 13, 14, 15], [BOS, 21, 22, 23]]
    top = ex.TopExamples(width=2, top_n=3, before=1, after=1)
    top.add(stats, batch, sample_ids=[40, 41])
    values, sample, position, windows = top.ranked()
    assert values[0].tolist()[:2] == [5.0, 3.0] and np.isneginf(values[0, 2])
    assert sample[0, :2].tolist() == [40, 41] and position[0, :2].tolist() == [2, 1]
    assert windows[0, 0].tolist() == [11, 12, 13] and windows[0, 1].tolist() == [BOS, 21, 22]
    assert np.isneginf(values[1]).all()  # nothing fired: no example, no garbage window


def test_new_batches_replace_only_weaker_examples() -> None:
    top = ex.TopExamples(width=1, top_n=2, before=0, after=0)

    def stats(values: list[float], tokens: list[int]) -> BatchStats:
        return BatchStats(tokens=3, seq_len=4, fire_count=np.array([len(tokens)]), act_sum=np.zeros(1),
                          act_m2=np.zeros(1), act_max=np.zeros(1, np.float32),
                          top_values=np.array([values], np.float32), top_tokens=np.array([tokens]))  # fmt: skip

    top.add(stats([3.0, 1.0], [1, 5]), [[BOS, 7, 8, 9], [BOS, 6]], [0, 1])
    top.add(stats([2.0, 0.5], [2, 6]), [[BOS, 3, 4, 5], [BOS, 2, 1]], [2, 3])
    values, sample, _, windows = top.ranked()
    assert values[0].tolist() == [3.0, 2.0] and sample[0].tolist() == [0, 2]
    assert windows[0, :, 0].tolist() == [7, 4]
    top.add(
        stats([3.0, 1.0], [1, 2]), [[BOS, 9, 9], [BOS, 9]], [4, 5]
    )  # a tie with the best: old wins
    assert top.ranked()[1][0].tolist() == [0, 4]


def test_backend_bugs_are_reported_not_swallowed() -> None:
    top = ex.TopExamples(width=3, top_n=2)
    bad = BatchStats(tokens=1, seq_len=2, fire_count=np.zeros(4, np.int64), act_sum=np.zeros(4), act_m2=np.zeros(4),
                     act_max=np.zeros(4, np.float32), top_values=np.ones((4, 2), np.float32), top_tokens=np.zeros((4, 2), np.int64))  # fmt: skip
    with pytest.raises(ex.ExamplesError, match="4 features"):
        top.add(bad, [[BOS, 1]], [0])
    with pytest.raises(ex.ExamplesError, match="top_n > 0"):
        top.add(
            BatchStats(
                1, 2, np.zeros(3, np.int64), np.zeros(3), np.zeros(3), np.zeros(3, np.float32)
            ),
            [[BOS, 1]],
            [0],
        )


class Interrupt(Exception):
    pass


class DiesAfter(RuleBackend):
    def __init__(self, calls: int, *args: object):
        super().__init__(*args)  # type: ignore[arg-type]
        self.left = calls

    def batch_feature_stats(self, batch, layer, top_n=0):  # type: ignore[no-untyped-def]
        if self.left == 0:
            raise Interrupt
        self.left -= 1
        return super().batch_feature_stats(batch, layer, top_n)


def test_a_killed_pass_resumes_from_its_checkpoint_with_the_same_result(tmp_path: Path) -> None:
    width, vocab = 8, 40
    seqs = distinct_feature_corpus(130, width, vocab, seed=5)
    kwargs = {"top_n": 4, "batch_size": 7, "before": 2, "after": 1}
    whole = ex.collect(RuleBackend(width, vocab), seqs, 0, width, **kwargs)  # type: ignore[arg-type]

    ckpt = tmp_path / "examples.npz"
    with pytest.raises(Interrupt):  # dies in batch 17, after checkpoints at 56 and 105 samples
        ex.collect(
            DiesAfter(16, width, vocab), seqs, 0, width, checkpoint=ckpt, plan="p1", **kwargs
        )  # type: ignore[arg-type]
    assert ex.TopExamples.load(ckpt, "p1").samples_done == 105  # type: ignore[union-attr]
    assert ex.TopExamples.load(ckpt, "another plan") is None

    resumed_backend = RuleBackend(width, vocab)
    seen: list[int] = []
    resumed = ex.collect(
        resumed_backend, seqs, 0, width, checkpoint=ckpt, plan="p1", progress=seen.append, **kwargs
    )  # type: ignore[arg-type]
    assert sum(resumed_backend.calls) == len(seqs) - 105  # only the rest was run again
    assert seen[0] == 105 and sum(seen) == len(seqs)
    for a, b in zip(whole.ranked(), resumed.ranked(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole.fire_count, resumed.fire_count)
    assert whole.tokens == resumed.tokens

    fresh_backend = RuleBackend(width, vocab)  # another plan: the checkpoint is not used
    ex.collect(fresh_backend, seqs, 0, width, checkpoint=ckpt, plan="p2", **kwargs)  # type: ignore[arg-type]
    assert sum(fresh_backend.calls) == len(seqs)


def test_examples_folder_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "ex"
    backend = make_examples(folder, width=12, vocab=48, samples=40, top_n=8)
    meta = ex.require_meta(folder)
    assert meta["model"] == "test/model" and meta["width"] == 12 and meta["samples"] == 40
    features = list(ex.iter_features(folder))
    assert [f.index for f in features] == list(range(12))
    for feature in features:
        assert len(feature.examples) == 8
        acts = [e.activation for e in feature.examples]
        assert acts == sorted(acts, reverse=True)
        assert len({e.sample for e in feature.examples}) == 8
        for e in feature.examples:
            assert feature_of_text(e.token, 12) == {feature.index}
            assert e.marked() == f"{e.before}<<{e.token}>>{e.after}"
            tok = int(e.token[1:])
            assert e.activation == pytest.approx(
                backend.strength[tok] * (1 + e.position / 1000), abs=1e-4
            )
        assert len(feature.held_out()) == 2 and len(feature.for_labeling()) == 6
        assert feature.held_out() == [feature.examples[3], feature.examples[7]]
    subset = ex.read_features(folder, [11, 3, 99])
    assert set(subset) == {3, 11} and subset[3] == features[3]
    negatives = ex.read_negatives(folder)
    assert len(negatives) == 30
    for n in negatives:  # exact: the features that fire in an excerpt are those of its tokens
        assert n.fired == frozenset(feature_of_text(n.text, 12))
        assert len(n.text.split()) == 5
    counts, tokens = ex.fire_counts(folder)  # type: ignore[misc]
    assert counts.sum() == tokens == meta["tokens"]  # every non-BOS token fires exactly one feature


def test_an_unfinished_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ex"
    make_examples(folder)
    (folder / ex.META_FILE).unlink()
    assert ex.read_meta(folder) is None and ex.read_features(folder, [1]) == {}
    with pytest.raises(ex.ExamplesError, match="labels generate"):
        list(ex.iter_features(folder))


def test_token_text_helper_matches_decode() -> None:
    assert decode([[BOS, 5, 6]]) == [token_text(5) + token_text(6)]
