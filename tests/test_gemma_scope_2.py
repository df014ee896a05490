"""Gemma Scope 2 (Gemma 3's SAEs and transcoders): ``params.safetensors`` files, their repo layout,
Neuronpedia ids and the default SAE of a Gemma 3 model, all offline on a Hugging Face cache the test
lays out itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_torch
from reference import numpy_sae_encode

from neuroscope.labels.neuronpedia import neuronpedia_id_for
from neuroscope.sae import default_sae_for, load_from_hub, load_local
from neuroscope.synthetic import random_sae_arrays

REPO = "google/gemma-scope-2-1b-it"
RES = "resid_post/layer_13_width_16k_l0_medium"
TRANSCODER = "transcoder/layer_13_width_16k_l0_medium_affine"


def gemma_scope_2_params(d_in: int, width: int, seed: int = 0, skip: bool = False) -> dict:
    """The keys Gemma Scope 2 stores (lower-case w_enc/w_dec, and a skip for affine transcoders)."""
    arrays = random_sae_arrays(d_in, width, seed)
    out = {
        "w_enc": arrays["W_enc"],
        "w_dec": arrays["W_dec"],
        "b_enc": arrays["b_enc"],
        "b_dec": arrays["b_dec"],
        "threshold": arrays["threshold"],
    }
    if skip:
        rng = np.random.default_rng(seed + 1)
        out["affine_skip_connection"] = (rng.standard_normal((d_in, d_in)) * 0.01).astype(
            np.float32
        )
    return out


def write_params(path: Path, arrays: dict, dtype: str = "float32") -> Path:
    """params.safetensors as Google writes it (bfloat16 too: written through torch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype == "float32":
        from safetensors.numpy import save_file

        save_file(arrays, str(path))
    else:
        torch = pytest.importorskip("torch")
        from safetensors.torch import save_file as save_torch

        save_torch(
            {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in arrays.items()}, str(path)
        )
    return path


def fake_hub_cache(root: Path, repo: str, files: dict[str, Path]) -> None:
    """A Hugging Face cache folder laid out as huggingface_hub writes it (refs + snapshots)."""
    commit = "0" * 40
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    for rel, src in files.items():
        dest = base / "snapshots" / commit / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_params_safetensors_encode_like_the_formula(tmp_path) -> None:
    arrays = gemma_scope_2_params(80, 256)
    sae = load_local(write_params(tmp_path / RES / "params.safetensors", arrays))
    assert (sae.d_model, sae.width, sae.architecture) == (80, 256, "jumprelu")
    assert (sae.layer, sae.site, sae.is_transcoder) == (13, "resid_post", False)
    x = np.random.default_rng(0).standard_normal((5, 80)).astype(np.float32)
    params = {"W_enc": arrays["w_enc"], "b_enc": arrays["b_enc"], "threshold": arrays["threshold"]}
    want = numpy_sae_encode(x, params)
    got = numpy_sae_encode(x, {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "threshold": sae.threshold})
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(sae.W_dec, arrays["w_dec"])
    # The folder works as well as the file.
    assert load_local(tmp_path / RES).W_enc.shape == (80, 256)


def test_bfloat16_params_load_exactly(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    arrays = gemma_scope_2_params(16, 32)
    sae = load_local(write_params(tmp_path / RES / "params.safetensors", arrays, "bfloat16"))
    want = torch.from_numpy(arrays["w_enc"]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(sae.W_enc, want)


def test_affine_transcoders_read_the_mlp_input(tmp_path) -> None:
    arrays = gemma_scope_2_params(80, 128, skip=True)
    sae = load_local(write_params(tmp_path / TRANSCODER / "params.safetensors", arrays))
    assert (sae.layer, sae.site, sae.output_site) == (13, "mlp_in", "mlp_out")
    np.testing.assert_array_equal(sae.W_skip, arrays["affine_skip_connection"])
    att = load_local(
        write_params(
            tmp_path / "attn_out/layer_4_width_16k_l0_small/params.safetensors",
            gemma_scope_2_params(64, 32),
        )
    )
    assert (att.layer, att.site) == (4, "attn_z")  # o_proj's input: heads x head_dim
    mlp = load_local(
        write_params(
            tmp_path / "mlp_out/layer_4_width_16k_l0_small/params.safetensors",
            gemma_scope_2_params(80, 32),
        )
    )
    assert (mlp.layer, mlp.site) == (4, "mlp_out")


def test_repo_layout_from_the_hf_cache(tmp_path, hub) -> None:
    res = write_params(tmp_path / "a" / "params.safetensors", gemma_scope_2_params(80, 64))
    tc = write_params(
        tmp_path / "b" / "params.safetensors", gemma_scope_2_params(80, 64, skip=True)
    )
    fake_hub_cache(
        hub, REPO, {f"{RES}/params.safetensors": res, f"{TRANSCODER}/params.safetensors": tc}
    )
    for path in (RES, f"{RES}/params.safetensors", f"{RES}/"):
        sae = load_from_hub(REPO, path)
        assert sae.id == f"{REPO}/{RES}" and (sae.layer, sae.site) == (13, "resid_post")
    assert load_from_hub(REPO, TRANSCODER).site == "mlp_in"
    from neuroscope.errors import SAEError

    with pytest.raises(SAEError, match="not in the Hugging Face cache"):
        load_from_hub(REPO, "resid_post/layer_7_width_16k_l0_medium")


def test_neuronpedia_ids() -> None:
    assert str(neuronpedia_id_for(f"{REPO}/{RES}")) == "gemma-3-1b-it/13-gemmascope-2-res-16k"
    assert (
        str(
            neuronpedia_id_for(
                "google/gemma-scope-2-270m-pt/transcoder_all/layer_3_width_262k_l0_big_affine"
            )
        )
        == "gemma-3-270m/3-gemmascope-2-transcoder-262k"
    )
    assert (
        neuronpedia_id_for("google/gemma-scope-2-1b-it/attn_out/layer_3_width_16k_l0_big") is None
    )


def test_gemma3_models_default_to_gemma_scope_2_at_a_middle_layer() -> None:
    d = default_sae_for("google/gemma-3-1b-it")
    assert (d.repo, d.layer) == ("google/gemma-scope-2-1b-it", 13)
    assert d.path.format(layer=13) == f"{RES}/params.safetensors"
    assert default_sae_for("google/gemma-3-270m").repo == "google/gemma-scope-2-270m-pt"
    assert default_sae_for("/models/gemma-3-4b-it-Q4_K_M.gguf").layer == 17
    assert default_sae_for("google/gemma-2-2b-it").repo == "google/gemma-scope-2b-pt-res"


@requires_torch
def test_a_session_on_gemma3_picks_gemma_scope_2_offline(tmp_path, hub) -> None:
    """`Session(model=<a Gemma 3 1B>)` with no SAE option loads Gemma Scope 2's layer-13 residual
    SAE from the HF cache (a tiny Gemma 3 with 14 blocks stands in for the 1B, its SAE with it)."""
    from neuroscope import Session
    from neuroscope.synthetic import build_tiny_gemma3

    model = build_tiny_gemma3(tmp_path / "google" / "gemma-3-1b-it", num_hidden_layers=14)
    params = write_params(tmp_path / "p" / "params.safetensors", gemma_scope_2_params(80, 64))
    fake_hub_cache(hub, REPO, {f"{RES}/params.safetensors": params})
    with Session(model=str(model), backend="torch", top_k=3) as s:
        assert s.layers == [13]
        assert s.saes[13].id == f"{REPO}/{RES}"
        records = s.trace("The capital of France is Paris.")
    assert records and {r.layer for r in records} == {13}
    assert all(r.sae == f"{REPO}/{RES}" for r in records)
