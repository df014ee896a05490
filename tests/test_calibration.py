"""Calibration: merged batch statistics against direct numpy, the stats file, checkpoints and resume."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from neuroscope import calibration as cal
from neuroscope.backend import BatchStats
from neuroscope.calibration import CalibrationError, CalibrationHeader, FeatureAccumulator

WIDTH = 24


class FakeBackend:
    """Activations looked up per (token, position) in a fixed random table; each batch reduced in numpy.

    Feature 0 fires on every token, the last one never does: the edge cases of the accumulator.
    """

    name = "fake"
    device = "cpu"

    def __init__(self, vocab: int = 50, width: int = WIDTH, seed: int = 0):
        rng = np.random.default_rng(seed)
        pre = rng.normal(size=(vocab, width)) * 3
        table = np.where(pre > 1.0, pre, 0.0)
        table[:, 0] = np.abs(pre[:, 0]) + 0.5
        table[:, -1] = 0.0
        self.table = table.astype(np.float32)
        self.seen: list[tuple[int, ...]] = []

    def activations(self, seq) -> np.ndarray:
        """[T, width]; the position scales them so that the same token differs along a sequence."""
        positions = np.arange(len(seq), dtype=np.float32)[:, None]
        return self.table[np.asarray(seq)] * (1 + 0.05 * positions)

    def batch_feature_stats(self, batch, layer, top_n=0) -> BatchStats:
        self.seen.extend(tuple(s) for s in batch)
        acts = np.concatenate([self.activations(s)[1:] for s in batch]).astype(np.float64)
        fired = acts > 0
        count = fired.sum(0)
        total = np.where(fired, acts, 0).sum(0)
        mean = total / np.maximum(count, 1)
        m2 = (np.where(fired, acts - mean, 0) ** 2).sum(0)
        return BatchStats(
            tokens=len(acts),
            seq_len=max(len(s) for s in batch),
            fire_count=count.astype(np.int64),
            act_sum=total,
            act_m2=m2,
            act_max=acts.max(0).astype(np.float32),
        )


class DyingBackend(FakeBackend):
    """Interrupted (Ctrl-C) on its ``die_at``-th batch, before computing it."""

    def __init__(self, die_at: int, **kwargs):
        super().__init__(**kwargs)
        self.calls, self.die_at = 0, die_at

    def batch_feature_stats(self, batch, layer, top_n=0) -> BatchStats:
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt
        return super().batch_feature_stats(batch, layer, top_n)


def random_sequences(n: int = 23, vocab: int = 50, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(3, vocab, rng.integers(1, 30)).tolist()] for _ in range(n)]


def header(width: int = WIDTH, **changes) -> CalibrationHeader:
    fields = {"model": "m", "sae_id": "repo/layer_3/width_24", "sae_width": width, "layer": 3}
    return CalibrationHeader(**{**fields, **changes})


def reference(acts: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics straight from every token's activations [N, width] (float64)."""
    fired = acts > 0
    count = fired.sum(0)
    firing = [acts[fired[:, j], j] for j in range(acts.shape[1])]
    return {
        "fire_count": count,
        "firing_rate": count / len(acts),
        "act_mean": np.array([v.mean() if v.size else 0.0 for v in firing]),
        "act_std": np.array([v.std() if v.size else 0.0 for v in firing]),
        "mean_all": acts.mean(0),
        "act_max": acts.max(0),
    }


def assert_matches(stats: cal.CalibrationStats, ref: dict[str, np.ndarray], rtol: float) -> None:
    acc = stats.acc
    np.testing.assert_array_equal(acc.fire_count, ref["fire_count"])
    np.testing.assert_allclose(acc.firing_rate, ref["firing_rate"], rtol=rtol)
    np.testing.assert_allclose(acc.act_mean, ref["act_mean"], rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(acc.act_std, ref["act_std"], rtol=rtol * 10, atol=1e-5)
    np.testing.assert_allclose(acc.mean_all, ref["mean_all"], rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(acc.act_max, ref["act_max"], rtol=1e-6)


# ---- merging ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 4, 100])
def test_merged_batches_equal_a_direct_computation_over_all_tokens(batch_size) -> None:
    sequences = random_sequences()
    backend = FakeBackend()
    stats = cal.calibrate(backend, sequences, header(), batch_size=batch_size, progress=False)
    acts = np.concatenate([backend.activations(s)[1:] for s in sequences]).astype(np.float64)
    assert stats.acc.tokens == len(acts) == sum(len(s) - 1 for s in sequences)
    assert stats.header.tokens == len(acts) and stats.header.samples == len(sequences)
    assert_matches(stats, reference(acts), rtol=1e-12)
    assert stats.acc.fire_count[0] == len(acts) and stats.acc.fire_count[-1] == 0
    assert sorted(backend.seen) == sorted(tuple(s) for s in sequences)


def test_the_merge_is_stable_where_a_sum_of_squares_would_not_be() -> None:
    # Activations near 1e6 with a spread of 1e-3: sum(x^2)/n - mean^2 loses every digit in float64.
    rng = np.random.default_rng(0)
    values = 1e6 + rng.normal(0, 1e-3, size=(3000, 2))
    acc = FeatureAccumulator.zeros(2)
    for chunk in np.array_split(values, 37):
        mean = chunk.mean(0)
        acc.add(
            BatchStats(
                tokens=len(chunk), seq_len=len(chunk), fire_count=np.full(2, len(chunk)),
                act_sum=chunk.sum(0), act_m2=((chunk - mean) ** 2).sum(0),
                act_max=chunk.max(0).astype(np.float32),
            )
        )  # fmt: skip
    np.testing.assert_allclose(acc.act_std, values.std(0), rtol=1e-6)
    np.testing.assert_allclose(acc.act_mean, values.mean(0), rtol=1e-13)


def test_a_backend_returning_the_wrong_width_is_reported() -> None:
    acc = FeatureAccumulator.zeros(4)
    bad = FakeBackend(width=5).batch_feature_stats([[2, 5, 6]], 0)
    with pytest.raises(CalibrationError, match="width 4"):
        acc.add(bad)


# ---- the stats file ----------------------------------------------------------------------------------


def make_stats(tmp_path: Path) -> tuple[cal.CalibrationStats, Path]:
    stats = cal.calibrate(
        FakeBackend(), random_sequences(), header(corpus={"source": "x"}), progress=False
    )
    return stats, stats.save(tmp_path / "stats.safetensors")


def test_stats_file_round_trips_with_its_header(tmp_path) -> None:
    stats, path = make_stats(tmp_path)
    loaded = cal.load_stats(path)
    assert loaded.header.model == "m" and loaded.header.sae_id == "repo/layer_3/width_24"
    assert loaded.header.sae_width == WIDTH and loaded.header.layer == 3
    assert loaded.header.tokens == stats.acc.tokens and loaded.header.corpus == {"source": "x"}
    assert loaded.header.format_version == cal.FORMAT_VERSION
    for name in cal.ACCUMULATORS:
        np.testing.assert_array_equal(getattr(loaded.acc, name), getattr(stats.acc, name))
    # the derived arrays are stored too, for readers that do not merge
    from safetensors.numpy import load_file

    arrays = load_file(str(path))
    np.testing.assert_allclose(arrays["firing_rate"], stats.acc.firing_rate)
    np.testing.assert_allclose(arrays["act_std"], stats.acc.act_std)


def test_truncated_corrupt_and_foreign_files_are_refused(tmp_path) -> None:
    _, path = make_stats(tmp_path)
    data = path.read_bytes()

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(CalibrationError, match="corrupt or cut short"):
        cal.load_stats(cut)

    flipped = bytearray(data)
    flipped[-20] ^= 0xFF  # inside the last array's bytes
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CalibrationError, match="digest"):
        cal.load_stats(bad)

    text = tmp_path / "text.safetensors"
    text.write_text("not a stats file")
    with pytest.raises(CalibrationError, match="not a readable"):
        cal.load_stats(text)

    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": np.zeros(3)}, str(foreign))
    with pytest.raises(CalibrationError, match="not a Neuroscope calibration"):
        cal.load_stats(foreign)

    with pytest.raises(CalibrationError, match="No calibration stats file"):
        cal.load_stats(tmp_path / "missing.safetensors")


def test_a_newer_format_is_refused_with_upgrade_advice(tmp_path) -> None:
    stats, _ = make_stats(tmp_path)
    newer = cal.CalibrationStats(cal._with(stats.header, format_version=99), stats.acc)
    path = newer.save(tmp_path / "newer.safetensors")
    with pytest.raises(CalibrationError, match="Upgrade"):
        cal.load_stats(path)


def test_stats_of_another_sae_are_refused_naming_both(tmp_path) -> None:
    stats, path = make_stats(tmp_path)
    loaded = cal.load_stats(path)
    loaded.check_sae("repo/layer_3/width_24", WIDTH)
    with pytest.raises(CalibrationError) as err:
        loaded.check_sae("repo/layer_3/width_24", 16384)
    assert "width 24" in str(err.value) and "width 16384" in str(err.value)
    with pytest.raises(CalibrationError, match="other/sae"):
        loaded.check_sae("other/sae", WIDTH)
    with pytest.raises(CalibrationError, match="layer 3, not layer 4"):
        loaded.check_sae("repo/layer_3/width_24", WIDTH, layer=4)


def test_stats_live_in_the_cache_by_model_sae_and_layer(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NEUROSCOPE_CACHE", str(tmp_path))
    assert cal.find_stats("google/gemma-2-2b-it", "g/layer_20/width_16k", 20) is None
    path = cal.stats_path("google/gemma-2-2b-it", "g/layer_20/width_16k", 20)
    make_stats(tmp_path)[0].save(path)
    assert path.is_relative_to(tmp_path / "calibration")
    assert cal.find_stats("google/gemma-2-2b-it", "g/layer_20/width_16k", 20) == path
    assert cal.find_stats("google/gemma-2-2b-it", "g/layer_20/width_16k", 12) is None


def test_summary_and_most_frequent() -> None:
    stats = cal.calibrate(FakeBackend(), random_sequences(), header(), progress=False)
    summary = cal.summarize(stats)
    rate = stats.acc.firing_rate
    assert summary.never_fire == int((stats.acc.fire_count == 0).sum()) >= 1
    assert summary.fire_over_half == int((rate > 0.5).sum()) >= 1
    rows = cal.most_frequent(stats, 5)
    assert rows[0]["index"] == 0 and rows[0]["firing_rate"] == 1.0
    assert [r["firing_rate"] for r in rows] == sorted(
        (r["firing_rate"] for r in rows), reverse=True
    )


# ---- checkpoints ---------------------------------------------------------------------------------------


def test_an_interrupted_run_resumes_counting_each_sample_once(tmp_path) -> None:
    sequences = random_sequences(30)
    whole = cal.calibrate(FakeBackend(), sequences, header(), batch_size=4, progress=False)

    ckpt = tmp_path / "ckpt.safetensors"
    dying = DyingBackend(die_at=4)
    with pytest.raises(KeyboardInterrupt):
        cal.calibrate(dying, sequences, header(), batch_size=4, checkpoint=ckpt, checkpoint_every=1e9, progress=False)  # fmt: skip
    saved = cal.load_checkpoint(ckpt)
    assert saved.samples_done == 12  # three whole batches of 4

    messages: list[str] = []
    rest = FakeBackend()
    resumed = cal.calibrate(rest, sequences, header(), batch_size=4, checkpoint=ckpt, progress=False, log=messages.append)  # fmt: skip
    assert any("Resuming" in m for m in messages)
    # every sample was measured exactly once across the two runs
    assert sorted(dying.seen + rest.seen) == sorted(tuple(s) for s in sequences)
    assert resumed.acc.tokens == whole.acc.tokens
    for name in cal.ACCUMULATORS:
        np.testing.assert_array_equal(getattr(resumed.acc, name), getattr(whole.acc, name))


def test_a_checkpoint_for_another_corpus_is_not_resumed(tmp_path) -> None:
    ckpt = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        cal.calibrate(DyingBackend(die_at=3), random_sequences(seed=1), header(), batch_size=2, checkpoint=ckpt, checkpoint_every=0, progress=False)  # fmt: skip
    messages: list[str] = []
    other = random_sequences(seed=2)
    backend = FakeBackend()
    cal.calibrate(backend, other, header(), batch_size=2, checkpoint=ckpt, progress=False, log=messages.append)  # fmt: skip
    assert any("another corpus" in m for m in messages)
    assert len(backend.seen) == len(other)


def test_restart_ignores_the_checkpoint(tmp_path) -> None:
    ckpt = tmp_path / "ckpt.safetensors"
    sequences = random_sequences()
    with pytest.raises(KeyboardInterrupt):
        cal.calibrate(DyingBackend(die_at=3), sequences, header(), batch_size=2, checkpoint=ckpt, checkpoint_every=0, progress=False)  # fmt: skip
    backend = FakeBackend()
    cal.calibrate(backend, sequences, header(), batch_size=2, checkpoint=ckpt, resume=False, progress=False)  # fmt: skip
    assert len(backend.seen) == len(sequences)


def test_a_corrupt_checkpoint_is_ignored_with_a_message(tmp_path) -> None:
    ckpt = tmp_path / "ckpt.safetensors"
    ckpt.write_bytes(b"\x00" * 64)
    messages: list[str] = []
    backend = FakeBackend()
    sequences = random_sequences()
    cal.calibrate(
        backend, sequences, header(), checkpoint=ckpt, progress=False, log=messages.append
    )
    assert any("unusable checkpoint" in m for m in messages) and len(backend.seen) == len(sequences)


def test_tokenize_makes_every_sequence_start_with_bos() -> None:
    class NoBosTokenizer:
        bos_token_id = 2

        def __call__(self, texts, add_special_tokens, truncation, max_length):
            return {"input_ids": [[10 + len(w) for w in t.split()][:max_length] for t in texts]}

    sequences = cal.tokenize(NoBosTokenizer(), ["one two three four five", "", "x"], max_length=4)
    # BOS prepended and the result cut to max_length; a text with no tokens is left out
    assert sequences == [[2, 13, 13, 15], [2, 11]]
    with pytest.raises(CalibrationError, match="max-length"):
        cal.tokenize(NoBosTokenizer(), ["a b"], max_length=1)


def test_finish_writes_the_stats_then_drops_the_checkpoint(tmp_path) -> None:
    ckpt = tmp_path / "ckpt.safetensors"
    sequences = random_sequences()
    stats = cal.calibrate(FakeBackend(), sequences, header(), batch_size=2, checkpoint=ckpt, checkpoint_every=0, progress=False)  # fmt: skip
    assert ckpt.is_file()  # saved after every batch but the last
    out = cal.finish(stats, tmp_path / "out" / "stats.safetensors", ckpt)
    assert out.is_file() and not ckpt.exists()
    assert [p.name for p in out.parent.iterdir()] == ["stats.safetensors"]  # no temp file left


def test_progress_reports_samples_and_tokens_per_second() -> None:
    bars = []

    class Bar:
        def __init__(self, total, initial):
            self.total, self.n, self.postfix, self.closed = total, initial, "", False
            bars.append(self)

        def update(self, n):
            self.n += n

        def set_postfix_str(self, text, refresh=True):
            self.postfix = text

        def close(self):
            self.closed = True

    sequences = random_sequences()
    cal.calibrate(FakeBackend(), sequences, header(), batch_size=5, progress=Bar)
    (bar,) = bars
    assert bar.total == bar.n == len(sequences) and bar.closed
    assert bar.postfix.endswith("tok/s")


def test_empty_input_and_bad_settings_are_refused() -> None:
    with pytest.raises(CalibrationError, match="no tokens"):
        cal.calibrate(FakeBackend(), [], header(), progress=False)
    with pytest.raises(CalibrationError, match="batch-size"):
        cal.calibrate(FakeBackend(), random_sequences(), header(), batch_size=0, progress=False)


# ---- the real backends on the tiny model ---------------------------------------------------------

LAYER = 2
TEXTS = [
    "The capital of France is Paris. Paris is a city on the Seine, known for art and food.",
    "Language models read tokens and write tokens.",
    "Sparse autoencoders find features in the residual stream of a language model.",
    "Hello! How are you today? I am fine, thank you. Please tell me a story about a cat and a dog.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of Germany is Berlin; Rome is the capital of Italy.",
] * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Gemma 2, a random SAE for it, and a corpus file (built once per module)."""
    from neuroscope.synthetic import build_random_sae, build_tiny_gemma2

    root = tmp_path_factory.mktemp("tiny")
    model = build_tiny_gemma2(root / "model")
    sae_files = build_random_sae(root / "sae")
    corpus_file = root / "corpus.txt"
    corpus_file.write_text("\n\n".join(f"{t} ({i})" for i, t in enumerate(TEXTS)))
    return {"model": model, "npz": sae_files["npz"], "corpus": corpus_file, "root": root}


BACKENDS = {"torch": ("neuroscope_torch", "TorchBackend"), "mlx": ("neuroscope_mlx", "MLXBackend")}


@pytest.fixture(
    scope="module", params=[pytest.param(n, marks=getattr(pytest.mark, n)) for n in BACKENDS]
)
def real_backend(request, tiny):
    module_name, class_name = BACKENDS[request.param]
    module = pytest.importorskip(module_name)
    return getattr(module, class_name).load(tiny["model"], dtype="float32")


def test_backend_stats_equal_numpy_over_the_same_tokens(tiny, real_backend) -> None:
    from transformers import AutoTokenizer

    from neuroscope.sae import load_local

    sae = load_local(tiny["npz"])
    real_backend.set_saes({LAYER: sae}, 1)
    sequences = cal.tokenize(AutoTokenizer.from_pretrained(tiny["model"]), TEXTS, max_length=24)
    assert len({len(s) for s in sequences}) > 3  # ragged: batches are padded
    assert max(len(s) for s in sequences) > 8  # longer than the sliding window
    stats = cal.calibrate(real_backend, sequences, header(width=sae.width, sae_id=sae.id, layer=LAYER), batch_size=3, progress=False)  # fmt: skip

    per_token = []
    for seq in sequences:
        residuals, _ = real_backend.forward_reference(seq, [LAYER])
        x = residuals[LAYER].astype(np.float64)
        pre = x @ sae.W_enc.astype(np.float64) + sae.b_enc
        per_token.append((pre * (pre > sae.threshold))[1:])  # position 0 is BOS
    acts = np.concatenate(per_token)
    assert stats.acc.tokens == len(acts)
    ref = reference(acts)
    assert 0 < ref["firing_rate"].mean() < 1
    assert_matches(stats, ref, rtol=1e-4)


def _cli_args(tiny, output: Path) -> list[str]:
    return [
        "calibrate", "run", "--model", str(tiny["model"]), "--sae-local-path", str(tiny["npz"]),
        "--sae-layer", str(LAYER), "--corpus-path", str(tiny["corpus"]), "--backend", "torch",
        "--dtype", "float32", "--batch-size", "2", "--max-length", "24", "--checkpoint-every", "0",
        "--output", str(output),
    ]  # fmt: skip


@pytest.mark.torch
def test_a_killed_cli_run_resumes_to_the_same_stats(tiny, tmp_path) -> None:
    pytest.importorskip("neuroscope_torch")
    from neuroscope.cli import app

    env = {**os.environ, "NEUROSCOPE_CACHE": str(tmp_path / "cache")}
    killed = tmp_path / "killed.safetensors"
    script = textwrap.dedent(
        """
        import os, signal, sys
        from neuroscope_torch import TorchBackend
        real, calls = TorchBackend.batch_feature_stats, [0]
        def dying(self, batch, layer, top_n=0):
            calls[0] += 1
            if calls[0] == 4:  # three batches done and checkpointed
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, batch, layer, top_n)
        TorchBackend.batch_feature_stats = dying
        from neuroscope.cli import app
        app(sys.argv[1:])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, *_cli_args(tiny, killed)], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    assert not killed.exists()
    checkpoints = list((tmp_path / "cache" / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and cal.load_checkpoint(checkpoints[0]).samples_done == 6

    runner = CliRunner()
    resumed = runner.invoke(app, _cli_args(tiny, killed), env=env)
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming" in resumed.output and "6 of 14 samples" in resumed.output
    whole = runner.invoke(app, _cli_args(tiny, tmp_path / "whole.safetensors"), env=env)
    assert whole.exit_code == 0, whole.output

    a, b = cal.load_stats(killed), cal.load_stats(tmp_path / "whole.safetensors")
    assert a.header.tokens == b.header.tokens and a.header.samples == b.header.samples == 14
    np.testing.assert_array_equal(a.acc.fire_count, b.acc.fire_count)
    for name in ("act_mean", "act_m2", "act_max"):
        np.testing.assert_allclose(getattr(a.acc, name), getattr(b.acc, name), rtol=1e-6, atol=1e-9)
    assert not list((tmp_path / "cache" / "checkpoints").iterdir())


@pytest.mark.torch
def test_cli_run_writes_to_the_cache_where_serve_finds_it(tiny, tmp_path, monkeypatch) -> None:
    pytest.importorskip("neuroscope_torch")
    from neuroscope.cli import app
    from neuroscope.filters import SAERef, load_filter
    from neuroscope.sae import load_local

    monkeypatch.setenv("NEUROSCOPE_CACHE", str(tmp_path))
    args = _cli_args(tiny, tmp_path / "unused")[:-2]  # no --output
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "features never fire" in result.output

    sae = load_local(tiny["npz"])
    found = cal.find_stats(str(tiny["model"]), sae.id, LAYER)
    assert found is not None
    stats = cal.load_stats(found)
    assert stats.header.model == str(tiny["model"]) and stats.header.sae_width == sae.width
    assert stats.header.corpus["samples"] == len(TEXTS) and stats.header.backend == "torch"
    assert stats.header.sae_path == str(tiny["npz"]) and stats.header.sae_repo is None
    assert stats.header.dtype == "float32" and stats.header.max_length == 24
    f, message = load_filter(
        "combined", 0.5, str(tiny["model"]), {LAYER: SAERef(sae.id, sae.width)}
    )
    assert message is None and f.mode == "combined"

    shown = runner.invoke(app, ["calibrate", "show", "--stats", str(found), "--top", "3"])
    assert shown.exit_code == 0, shown.output
    assert "fire on more than half" in shown.output and len(shown.output.splitlines()) == 3 + 2 + 3


@pytest.mark.torch
def test_cli_run_on_an_empty_corpus_fails_cleanly_and_writes_nothing(tiny, tmp_path) -> None:
    pytest.importorskip("neuroscope_torch")
    from neuroscope.cli import app

    empty = tmp_path / "empty.txt"
    empty.write_text("too short\n\n= Heading =\n")
    output = tmp_path / "stats.safetensors"
    args = _cli_args(tiny, output)
    args[args.index("--corpus-path") + 1] = str(empty)
    result = CliRunner().invoke(app, args, env={"NEUROSCOPE_CACHE": str(tmp_path / "cache")})
    assert result.exit_code == 1
    assert "no text samples" in result.output and "Traceback" not in result.output
    assert not output.exists()


@pytest.mark.torch
def test_cli_run_with_dummy_weights_and_a_random_sae(tiny, tmp_path, monkeypatch) -> None:
    pytest.importorskip("neuroscope_torch")
    from neuroscope.cli import app

    monkeypatch.setenv("NEUROSCOPE_CACHE", str(tmp_path))
    args = [
        "calibrate", "run", "--model", str(tiny["model"]), "--load-format", "dummy",
        "--sae-layer", "1", "--corpus-path", str(tiny["corpus"]), "--samples", "4",
        "--output", str(tmp_path / "dummy.safetensors"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stats = cal.load_stats(tmp_path / "dummy.safetensors")
    assert stats.header.sae_id == "dummy/layer_1/width_16k" and stats.width == 16384
    assert stats.header.sae_repo is None and stats.header.sae_path is None
    assert stats.header.samples == 4 and stats.header.corpus["samples"] == 4


def test_cli_show_refuses_a_truncated_file(tmp_path) -> None:
    from neuroscope.cli import app

    _, path = make_stats(tmp_path)
    path.write_bytes(path.read_bytes()[:-50])
    result = CliRunner().invoke(app, ["calibrate", "show", "--stats", str(path)])
    assert result.exit_code == 1 and "corrupt or cut short" in result.output


@pytest.mark.parametrize("name", ["stats.json", "stats", "stats.safetensors.tmp"])
def test_cli_run_refuses_an_output_name_of_another_format_before_any_work(tmp_path, name) -> None:
    from neuroscope.cli import app

    output = tmp_path / name
    result = CliRunner().invoke(
        app,
        ["calibrate", "run", "--model", str(tmp_path / "no-model"), "--output", str(output)],
        env={"NEUROSCOPE_CACHE": str(tmp_path / "cache")},
    )
    assert result.exit_code == 1, result.output
    assert ".safetensors" in result.output and "Traceback" not in result.output
    assert not output.exists() and not (tmp_path / "cache" / "corpus").exists()


def test_cli_run_names_its_own_corpus_option_when_the_corpus_cannot_be_built(tmp_path) -> None:
    pytest.importorskip("datasets")
    from neuroscope.cli import app

    # The default corpus is built from a Hub dataset: offline (conftest), that fails at once.
    env = {"NEUROSCOPE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = CliRunner().invoke(app, ["calibrate", "run", "--model", str(tmp_path / "m")], env=env)
    assert result.exit_code == 1 and "Could not read dataset" in result.output
    assert "--corpus-path PATH" in result.output
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    args = ["calibrate", "run", "--corpus-path", str(empty), "--model", str(tmp_path / "m")]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 1 and "holds no" in result.output
    # `--from` belongs to `corpus build` only; calibrate must not suggest it as its own option.
    assert "--from" not in result.output
