"""The whole corpus pass on the tiny random Gemma 2 with the torch backend, against an independent
reference: transformers' hidden states and the SAE formula in numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_LAYER, requires_torch
from reference import load_npz, numpy_sae_encode

from neuroscope.corpus import Corpus
from neuroscope.labels import examples as ex
from neuroscope.labels.corpus_pass import PassSettings, checkpoint_path, run_corpus_pass
from neuroscope.synthetic import TRAINING_TEXT

pytestmark = requires_torch

WORDS = TRAINING_TEXT.split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 30)))) for _ in range(n)]


@pytest.fixture(scope="module")
def session(tiny_model, tiny_sae):
    from neuroscope import Session

    with Session(
        model=str(tiny_model),
        sae_local_path=str(tiny_sae["npz"]),
        layer=TINY_LAYER,
        backend="torch",
        top_k=1,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_sae, session):
    """Per corpus sample: token ids and SAE activations [T, width] (position 0 zeroed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from neuroscope.calibration import tokenize

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, attn_implementation="eager"
    )
    params = load_npz(tiny_sae["npz"])
    seqs = tokenize(session.tokenizer.tokenizer, texts(24), 40)
    out = []
    with torch.no_grad():
        for seq in seqs:
            hidden = (
                model(torch.tensor([seq]), output_hidden_states=True)
                .hidden_states[TINY_LAYER + 1][0]
                .numpy()
            )
            acts = numpy_sae_encode(hidden, params)
            acts[0] = 0.0
            out.append((seq, acts))
    return out


def reference_top(reference, top_n: int):
    best: dict[int, list[tuple[float, int, int]]] = {}
    for s, (_, acts) in enumerate(reference):
        for f in np.flatnonzero(acts.max(0) > 0):
            p = int(acts[:, f].argmax())
            best.setdefault(int(f), []).append((float(acts[p, f]), s, p))
    return {f: sorted(v, key=lambda x: (-x[0], x[1]))[:top_n] for f, v in best.items()}


def run(session, folder: Path, batch_size: int, top_n: int = 6) -> dict:
    corpus = Corpus(texts(24), {"kind": "local", "path": "test"})
    settings = PassSettings(samples=24, examples_per_feature=top_n, max_length=40, batch_size=batch_size,
                            negatives=10, before=4, after=2)  # fmt: skip
    return run_corpus_pass(
        session, TINY_LAYER, corpus, folder, settings, model="tiny", progress=False
    )


def test_one_sample_per_batch_matches_the_reference_exactly(session, reference, tmp_path):
    meta = run(session, tmp_path / "ex", batch_size=1)
    tokenizer = session.tokenizer.tokenizer
    assert (
        meta["samples"] == 24
        and meta["layer"] == TINY_LAYER
        and meta["sae"] == session.saes[TINY_LAYER].id
    )
    assert meta["tokens"] == sum(len(seq) - 1 for seq, _ in reference)
    expected = reference_top(reference, 6)
    features = {f.index: f for f in ex.iter_features(tmp_path / "ex")}
    assert set(features) == set(expected)
    checked = 0
    for index, ref in expected.items():
        got = features[index].examples
        assert len(got) == len(ref)
        np.testing.assert_allclose([e.activation for e in got], [v for v, _, _ in ref], atol=2e-3)
        for rank, (value, s, p) in enumerate(ref):
            neighbours = [v for v, _, _ in ref[max(rank - 1, 0) : rank + 2] if v != value]
            if all(abs(v - value) > 5e-3 for v in neighbours):  # a clear order: same place expected
                assert (got[rank].sample, got[rank].position) == (s, p)
                seq = reference[s][0]
                assert got[rank].token == tokenizer.decode([seq[p]], skip_special_tokens=True)
                assert got[rank].text == tokenizer.decode(
                    seq[max(p - 4, 0) : p + 3], skip_special_tokens=True
                )
                checked += 1
    assert checked > 20
    counts, tokens = ex.fire_counts(tmp_path / "ex")  # type: ignore[misc]
    np.testing.assert_array_equal(counts, sum((acts > 0).sum(0) for _, acts in reference))
    assert not checkpoint_path("tiny", session.saes[TINY_LAYER].id).exists()  # removed once saved


def test_padded_batches_report_true_activations_and_counts(session, reference, tmp_path):
    run(session, tmp_path / "ex", batch_size=5)
    for feature in ex.iter_features(tmp_path / "ex"):
        for e in feature.examples:
            _, acts = reference[e.sample]
            assert e.activation == pytest.approx(float(acts[e.position, feature.index]), abs=2e-3)
    counts, _ = ex.fire_counts(tmp_path / "ex")  # type: ignore[misc]
    np.testing.assert_array_equal(counts, sum((acts > 0).sum(0) for _, acts in reference))
    for negative in ex.read_negatives(tmp_path / "ex"):
        assert negative.text and len(negative.fired) > 0


def test_generate_command_end_to_end(tiny_model, tiny_sae, session, tmp_path):
    """Corpus pass, labelling, scoring and export from one command; labels filed where serve looks."""
    from labels_support import FakeLabeler
    from typer.testing import CliRunner

    from neuroscope.cli import app
    from neuroscope.labels import store
    from neuroscope.labels.sources import LabelResolver

    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text(
        "\n\n".join(t + " and some more words to pass the length filter" for t in texts(12, seed=4))
    )
    args = ["labels", "generate", "--model", str(tiny_model), "--sae-local-path", str(tiny_sae["npz"]),
            "--sae-layer", str(TINY_LAYER), "--corpus-path", str(corpus_file), "--samples", "12",
            "--examples-per-feature", "4", "--batch-size", "4", "--max-length", "32", "--negatives", "10",
            "--backend", "torch", "--labeler", "test/labeler", "--concurrency", "4", "--score",
            "--output", str(tmp_path / "labels.json")]  # fmt: skip
    with FakeLabeler(128) as server:
        result = CliRunner().invoke(app, [*args, "--labeler-backend", server.url])
        assert result.exit_code == 0, result.output
        requested = len(server.requests)
        again = CliRunner().invoke(app, [*args, "--labeler-backend", server.url])
        assert again.exit_code == 0 and len(server.requests) == requested  # nothing left to ask
    sae_id = session.saes[TINY_LAYER].id
    folder = ex.examples_dir(str(tiny_model), sae_id)
    fired = [f.index for f in ex.iter_features(folder)]
    assert ex.require_meta(folder)["samples"] == 12 and fired
    resolver = LabelResolver(str(tiny_model), {TINY_LAYER: sae_id}, labeler="test/labeler")
    assert set(resolver.labels_for(TINY_LAYER)) == set(fired)
    assert resolver.label(TINY_LAYER, fired[0])[1] == "autointerp:test/labeler"
    exported = json.loads((tmp_path / "labels.json").read_text())
    assert {int(k) for k in exported} == set(fired)
    label_set = resolver.label_set(TINY_LAYER)
    assert label_set is not None and (label_set.folder / store.SCORES_FILE).exists()
    assert "Labelled" in result.output and "Scored" in result.output
