"""Why did it fire: the feature map equals numpy's product; attributions are exact splits."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace

import numpy as np
import pytest

from neuroscope.attribution import feature_map, linearize
from neuroscope.errors import ConfigError
from neuroscope.sae import SAE
from neuroscope.synthetic import random_sae_arrays


def _sae(d: int, width: int, seed: int, **kw) -> SAE:
    a = random_sae_arrays(d, width, seed)
    return SAE(
        W_enc=a["W_enc"], b_enc=a["b_enc"], b_dec=a["b_dec"], W_dec=a["W_dec"],
        threshold=a["threshold"], id=f"sae{seed}", **kw,
    )  # fmt: skip


# --- the causal map between layers -----------------------------------------------------------------


def test_feature_map_out_and_in_equal_the_numpy_product():
    a, b = _sae(32, 300, 1), _sae(32, 200, 2)
    full = a.W_dec.astype(np.float64) @ b.W_enc.astype(np.float64)  # [300, 200]
    out = feature_map(a, b, 3, 7, feature=17, top=10, direction="out")
    expected = np.argsort(-np.abs(full[17]), kind="stable")[:10]
    assert [e.target for e in out.entries] == expected.tolist()
    np.testing.assert_allclose([e.weight for e in out.entries], full[17, expected], rtol=1e-5)
    assert all(e.source == 17 and e.from_layer == 3 and e.to_layer == 7 for e in out.entries)
    assert {e.effect for e in out.entries} == {"excite", "inhibit"}
    assert all((e.effect == "excite") == (e.weight > 0) for e in out.entries)

    into = feature_map(a, b, 3, 7, feature=5, top=300, direction="in")
    np.testing.assert_allclose(
        sorted(e.weight for e in into.entries), np.sort(full[:, 5]), rtol=1e-5, atol=1e-7
    )
    assert sorted(e.source for e in into.entries) == list(range(300))


@pytest.mark.parametrize("block_rows", [7, 64, 1024])
def test_strongest_pairs_in_blocks_equal_the_full_product(block_rows):
    a, b = _sae(24, 150, 3), _sae(24, 90, 4)
    full = a.W_dec.astype(np.float64) @ b.W_enc.astype(np.float64)
    pairs = feature_map(a, b, 0, 1, top=25, block_rows=block_rows)
    flat = np.argsort(-np.abs(full.ravel()), kind="stable")[:25]
    expected = [(int(i // 90), int(i % 90)) for i in flat]
    assert [(e.source, e.target) for e in pairs.entries] == expected
    np.testing.assert_allclose([e.weight for e in pairs.entries], full.ravel()[flat], rtol=1e-5)
    assert pairs.direction == "pairs" and pairs.feature is None


def test_layer_norm_sae_centres_the_decoder():
    a, b = _sae(16, 40, 5), replace(_sae(16, 30, 6), normalize="layer_norm")
    W = a.W_dec.astype(np.float64)
    full = (W - W.mean(1, keepdims=True)) @ b.W_enc
    got = feature_map(a, b, 0, 2, feature=3, top=30)
    np.testing.assert_allclose(
        {e.target: e.weight for e in got.entries}[11], full[3, 11], rtol=1e-5
    )


def test_feature_map_exports_and_labels():
    a, b = _sae(16, 20, 7), _sae(16, 20, 8)
    m = feature_map(a, b, 1, 2, feature=4, top=3, labels=lambda layer, i: f"L{layer}#{i}")
    rows = list(csv.DictReader(io.StringIO(m.to_csv())))
    assert len(rows) == 3 and rows[0]["source_label"] == "L1#4"
    assert rows[0]["target_label"] == f"L2#{m.entries[0].target}"
    assert float(rows[0]["weight"]) == pytest.approx(m.entries[0].weight, rel=1e-6)
    data = json.loads(m.to_json())
    assert data["entries"][1]["effect"] == m.entries[1].effect
    assert data["direction"] == "out" and data["feature"] == 4


def test_feature_map_bad_input():
    a, b = _sae(16, 20, 7), _sae(16, 20, 8)
    with pytest.raises(ConfigError, match="outside SAE"):
        feature_map(a, b, 1, 2, feature=20)
    with pytest.raises(ConfigError, match="before to_layer"):
        feature_map(a, b, 2, 2, feature=1)
    with pytest.raises(ConfigError, match="direction"):
        feature_map(a, b, 1, 2, feature=1, direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="same model"):
        feature_map(a, _sae(8, 20, 9), 1, 2)


def test_linearize_is_the_encoder_at_that_residual():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(16).astype(np.float32) * 3
    for kw in (
        {},
        {"input_norm": "rms"},
        {"normalize": "constant_norm_rescale", "apply_b_dec_to_input": True},
        {"normalize": "layer_norm", "apply_b_dec_to_input": True},
    ):
        sae = replace(_sae(16, 10, 1), **kw)
        # The encoder as neuroscope_torch.sae.TorchSAE.encode spells it, in numpy.
        y = x.astype(np.float64)
        if sae.input_norm == "rms":
            y = y / np.sqrt(np.mean(y * y))
        if sae.normalize == "constant_norm_rescale":
            y = y * np.sqrt(y.size) / np.linalg.norm(y)
        elif sae.normalize == "layer_norm":
            y = y - y.mean()
            y = y / (y.std(ddof=1) + 1e-5)
        if sae.apply_b_dec_to_input:
            y = y - sae.b_dec
        pre = y @ sae.W_enc[:, 4] + sae.b_enc[4]
        lin = linearize(sae, 4, x)
        assert x @ lin.direction + lin.constant == pytest.approx(pre, rel=1e-9), kw


def test_circuits_map_cli_writes_the_product(tmp_path):
    from typer.testing import CliRunner

    from neuroscope.cli import app
    from neuroscope.synthetic import build_random_sae

    paths = {L: build_random_sae(tmp_path / f"L{L}", d_model=16, width=40, seed=L) for L in (1, 3)}
    a, b = (random_sae_arrays(16, 40, L) for L in (1, 3))
    full = a["W_dec"].astype(np.float64) @ b["W_enc"].astype(np.float64)
    out = tmp_path / "map.csv"
    result = CliRunner().invoke(
        app,
        ["circuits", "map", "--from-layer", "1", "--to-layer", "3", "--direction", "in",
         "--feature", "9", "--top", "5", "--format", "csv", "--output", str(out),
         "--sae-local-path", str(tmp_path / "L{layer}" / "gemma_scope" / "params.npz")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    expected = np.argsort(-np.abs(full[:, 9]), kind="stable")[:5]
    assert [int(r["source"]) for r in rows] == expected.tolist()
    assert [float(r["weight"]) for r in rows] == pytest.approx(full[expected, 9], rel=1e-5)
    assert paths[1]["npz"].exists()
    bad = CliRunner().invoke(
        app, ["circuits", "map", "--from-layer", "3", "--to-layer", "1", "--feature", "0",
              "--sae-local-path", str(tmp_path / "L{layer}" / "gemma_scope" / "params.npz")],
    )  # fmt: skip
    assert bad.exit_code != 0 and "before to_layer" in bad.output
