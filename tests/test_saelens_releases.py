"""SAELens release ids, resolved through the release table Neuroscope ships (SAELens' own
pretrained_saes.yaml as data), and loaded offline from a Hugging Face cache the test lays out."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import has_module, requires_torch
from test_gemma_scope_2 import REPO, RES, fake_hub_cache, gemma_scope_2_params, write_params

from neuroscope.errors import SAEError
from neuroscope.saelens_releases import (
    FORMATS,
    load_release,
    releases,
    resolve_for_layers,
    resolve_release,
)


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_gemma_scope_releases_resolve() -> None:
    e = resolve_release("gemma-scope-2-1b-it-res", "layer_13_width_16k_l0_medium")
    assert (e.repo, e.hub_path, e.layer) == (REPO, f"{RES}/params.safetensors", 13)
    assert e.neuronpedia == "gemma-3-1b-it/13-gemmascope-2-res-16k"
    canonical = resolve_release("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical")
    assert canonical.hub_path == "layer_20/width_16k/average_l0_71/params.npz"
    assert canonical.neuronpedia == "gemma-2-2b/20-gemmascope-res-16k"
    mlp = resolve_release("gpt2-small-mlp-tm", "blocks.3.hook_mlp_out")
    assert mlp.format == "saelens" and mlp.norm_scaling_factor and mlp.layer == 3


def test_layers_come_from_the_ids() -> None:
    layers, entries = resolve_for_layers(
        "gemma-scope-2-1b-it-res", "layer_13_width_16k_l0_medium", None
    )
    assert layers == [13]
    layers, entries = resolve_for_layers(
        "gemma-scope-2-1b-it-res", "layer_{layer}_width_16k_l0_medium", [7, 22]
    )
    assert [e.path for e in entries] == [
        "resid_post/layer_7_width_16k_l0_medium",
        "resid_post/layer_22_width_16k_l0_medium",
    ]


def test_errors_name_what_is_wrong() -> None:
    with pytest.raises(SAEError, match="Did you mean gemma-scope-2-1b-it-res"):
        resolve_release("gemma-scope-2-1b-it-resid", "x")
    with pytest.raises(SAEError, match="'llama_scope' format"):
        resolve_release("llama_scope_lxr_8x", "l0r_8x")
    with pytest.raises(
        SAEError, match="no SAE 'layer_13_width_16k_l0_mediu'.*Close: layer_13_width_16k_l0_medium"
    ):
        resolve_release("gemma-scope-2-1b-it-res", "layer_13_width_16k_l0_mediu")
    with pytest.raises(SAEError, match="needs --sae-id"):
        resolve_for_layers("gemma-scope-2-1b-it-res", None, None)


@pytest.mark.slow
@pytest.mark.skipif(not has_module("sae_lens"), reason="needs sae-lens")
def test_the_shipped_table_is_saelens_own() -> None:
    """Every SAE of every readable release, as SAELens' own directory reads it."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    theirs = get_pretrained_saes_directory()
    ours = releases()
    assert set(ours) == set(theirs)
    checked = 0
    for name, lookup in theirs.items():
        assert ours[name]["repo"] == lookup.repo_id
        if ours[name]["format"] not in FORMATS:
            continue
        assert (lookup.conversion_func or "saelens") == ours[name]["format"]
        for sae_id, path in lookup.saes_map.items():
            e = resolve_release(name, sae_id)
            assert e.path == str(path)
            assert e.cfg_overrides == (lookup.config_overrides or {})
            assert e.neuronpedia == (lookup.neuronpedia_id or {}).get(sae_id)
            assert e.norm_scaling_factor == (lookup.norm_scaling_factor or {}).get(sae_id)
            checked += 1
    print(f"\n{checked} SAEs of {len(theirs)} releases agree with SAELens' table")
    assert checked > 10_000


def test_a_gemma_scope_2_release_loads_from_the_cache(tmp_path, hub) -> None:
    params = write_params(tmp_path / "p" / "params.safetensors", gemma_scope_2_params(80, 64))
    fake_hub_cache(hub, REPO, {f"{RES}/params.safetensors": params})
    sae = load_release(resolve_release("gemma-scope-2-1b-it-res", "layer_13_width_16k_l0_medium"))
    assert sae.id == f"{REPO}/{RES}" and sae.layer == 13
    assert sae.neuronpedia_id == "gemma-3-1b-it/13-gemmascope-2-res-16k"


@pytest.mark.skipif(not has_module("sae_lens"), reason="needs sae-lens")
def test_a_saelens_release_gets_its_norm_scaling_factor(tmp_path, hub) -> None:
    """gpt2-small-mlp-tm's SAEs are expected_average_only_in; the factor is in the table only.
    The reference is SAELens folding that factor itself."""
    import torch
    from sae_lens import SAE as SAELensSAE
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    entry = resolve_release("gpt2-small-mlp-tm", "blocks.3.hook_mlp_out")
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=24, d_sae=48, normalize_activations="expected_average_only_in",
            metadata=SAEMetadata(hook_name="blocks.3.hook_mlp_out"),
        )
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    sae.save_model(tmp_path / "saved")
    fake_hub_cache(
        hub,
        entry.repo,
        {
            f"{entry.path}/{n}": tmp_path / "saved" / n
            for n in ("cfg.json", "sae_weights.safetensors")
        },
    )
    ours = load_release(entry)
    assert (ours.layer, ours.site) == (3, "mlp_out")
    reference = SAELensSAE.load_from_disk(tmp_path / "saved")
    reference.fold_activation_norm_scaling_factor(entry.norm_scaling_factor)
    x = np.random.default_rng(0).standard_normal((9, 24)).astype(np.float32)
    with torch.no_grad():
        want = reference.encode(torch.from_numpy(x)).numpy()
    got = np.maximum(
        x @ ours.W_enc + ours.b_enc - (ours.b_dec @ ours.W_enc if ours.apply_b_dec_to_input else 0),
        0,
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "saved" / "cfg.json").read_text())["normalize_activations"] == (
        "expected_average_only_in"
    )


@requires_torch
def test_a_session_takes_a_release_and_its_layer(tmp_path, hub) -> None:
    from neuroscope import Session
    from neuroscope.synthetic import build_tiny_gemma3

    model = build_tiny_gemma3(tmp_path / "m", num_hidden_layers=14)
    params = write_params(tmp_path / "p" / "params.safetensors", gemma_scope_2_params(80, 64))
    fake_hub_cache(hub, REPO, {f"{RES}/params.safetensors": params})
    with Session(
        model=str(model),
        sae_release="gemma-scope-2-1b-it-res",
        sae_id="layer_13_width_16k_l0_medium",
        backend="torch",
        top_k=3,
    ) as s:
        assert (
            s.layers == [13]
            and s.saes[13].neuronpedia_id == "gemma-3-1b-it/13-gemmascope-2-res-16k"
        )
        records = s.trace("Paris is the capital of France.")
    assert records and all(r.sae == f"{REPO}/{RES}" and r.layer == 13 for r in records)


def test_the_releases_command_lists_releases_and_ids() -> None:
    from typer.testing import CliRunner

    from neuroscope.cli import app

    runner = CliRunner()
    everything = runner.invoke(app, ["sae", "releases"])
    assert everything.exit_code == 0
    assert (
        "gemma-scope-2-1b-it-res" in everything.output
        and "llama_scope: not readable" in everything.output
    )
    one = runner.invoke(app, ["sae", "releases", "gemma-scope-2-1b-it-res"])
    assert one.exit_code == 0
    assert "layer_13_width_16k_l0_medium" in one.output
    assert "gemma-3-1b-it/13-gemmascope-2-res-16k" in one.output
    wrong = runner.invoke(app, ["sae", "releases", "gemma-scope-2-1b-it-resid"])
    assert wrong.exit_code != 0 and "gemma-scope-2-1b-it-res" in wrong.output
