"""Loading SAEs: Gemma Scope npz, SAELens folders, the Hugging Face cache, and the errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from neuroscope.errors import SAEError
from neuroscope.sae import DEFAULT_SAE_PATH, load_from_hub, load_local, resolve_sae_path, sae_id_for
from neuroscope.synthetic import random_sae_arrays


def test_npz_and_saelens_hold_the_same_parameters(tiny_sae):
    a, b = load_local(tiny_sae["npz"]), load_local(tiny_sae["saelens"])
    assert (a.d_model, a.width, a.architecture) == (64, 128, "jumprelu")
    for name in ("W_enc", "b_enc", "b_dec", "threshold"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_lowercase_w_enc_is_accepted(tmp_path):
    arrays = random_sae_arrays(8, 16)
    arrays["w_enc"] = arrays.pop("W_enc")
    np.savez(tmp_path / "params.npz", **arrays)
    assert load_local(tmp_path / "params.npz").W_enc.shape == (8, 16)


def test_missing_key_names_the_file_and_the_fix(tmp_path):
    arrays = random_sae_arrays(8, 16)
    del arrays["threshold"]
    np.savez(tmp_path / "params.npz", **arrays)
    with pytest.raises(SAEError, match=r"params\.npz has no threshold.*re-download"):
        load_local(tmp_path / "params.npz")


def test_unreadable_and_absent_files(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SAEError, match="not a readable .npz"):
        load_local(tmp_path / "bad.npz")
    with pytest.raises(SAEError, match="absent.npz does not exist"):
        load_local(tmp_path / "absent.npz")
    with pytest.raises(SAEError, match="not a SAELens SAE folder"):
        load_local(tmp_path)


def test_saelens_architectures_and_options(tiny_sae, tmp_path):
    folder = tmp_path / "topk"
    shutil.copytree(tiny_sae["saelens"], folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"architecture": "topk"}))
    with pytest.raises(SAEError, match="needs 'k'"):
        load_local(folder)
    (folder / "cfg.json").write_text(
        json.dumps(cfg | {"architecture": "topk", "k": 4, "apply_b_dec_to_input": True})
    )
    sae = load_local(folder)
    assert (sae.architecture, sae.k, sae.apply_b_dec_to_input) == ("topk", 4, True)
    (folder / "cfg.json").write_text(json.dumps(cfg | {"architecture": "abstopk"}))
    with pytest.raises(SAEError, match="'abstopk' is not supported"):
        load_local(folder)


def test_sae_paths_and_ids():
    assert resolve_sae_path(None, 20, "google/gemma-scope-2b-pt-res") == DEFAULT_SAE_PATH
    assert resolve_sae_path(
        "layer_{layer}/width_16k/average_l0_77/params.npz", 12, "x/y"
    ).startswith("layer_12/")
    with pytest.raises(SAEError, match="No --sae-path for layer 12"):
        resolve_sae_path(None, 12, "google/gemma-scope-2b-pt-res")
    assert (
        sae_id_for("google/gemma-scope-2b-pt-res", DEFAULT_SAE_PATH)
        == "google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71"
    )


def _fake_hub_cache(root, repo, files):
    """A Hugging Face cache folder laid out as huggingface_hub writes it (refs + snapshots)."""
    commit = "0" * 40
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    for rel, src in files.items():
        dest = base / "snapshots" / commit / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)


def test_load_from_hub_reads_the_hf_cache_offline(tiny_sae, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    repo = "google/gemma-scope-2b-pt-res"
    _fake_hub_cache(tmp_path, repo, {DEFAULT_SAE_PATH: tiny_sae["npz"]})
    _fake_hub_cache(
        tmp_path,
        "someone/saelens-sae",
        {f"blocks.2/{n}": tiny_sae["saelens"] / n for n in ("cfg.json", "sae_weights.safetensors")},
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    sae = load_from_hub(repo, DEFAULT_SAE_PATH)
    assert (
        sae.id == "google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71"
        and sae.width == 128
    )
    assert load_from_hub("someone/saelens-sae", "blocks.2").id == "someone/saelens-sae/blocks.2"
    with pytest.raises(SAEError, match="not in the Hugging Face cache.*--sae-local-path"):
        load_from_hub(repo, "layer_3/width_16k/average_l0_1/params.npz")


def test_an_sae_is_hooked_where_it_was_trained(tiny_sae, tmp_path):
    """cfg.json's hook_name names a layer and a site; Session refuses any other layer."""
    from neuroscope.session import load_saes

    assert load_saes([2], sae_local_path=str(tiny_sae["saelens"]))[2].layer == 2
    with pytest.raises(SAEError, match=r"trained on layer 2 .*hooked at layer 3.*--layer 2"):
        load_saes([3], sae_local_path=str(tiny_sae["saelens"]))
    folder = tmp_path / "attn"
    shutil.copytree(tiny_sae["saelens"], folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"hook_name": "blocks.2.hook_attn_out"}))
    assert load_saes([2], sae_local_path=str(folder))[2].site == "attn_out"


def test_bfloat16_safetensors_widen_exactly(tmp_path):
    """bfloat16 is the top half of a float32: every stored value comes back exactly."""
    from neuroscope.sae import read_safetensors

    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    values = torch.randn(7, 5).to(torch.bfloat16)
    save_file({"w": values, "h": values.to(torch.float16)}, str(tmp_path / "x.safetensors"))
    arrays = read_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(arrays["w"], values.float().numpy())
    np.testing.assert_array_equal(arrays["h"], values.to(torch.float16).float().numpy())
    assert arrays["w"].dtype == np.float32


def test_load_saes_passes_the_norm_scaling_factor(tmp_path, tiny_sae):
    """An expected_average_only_in folder loads once Session is given its factor (folded in)."""
    from neuroscope.session import load_saes

    folder = tmp_path / "eaoi"
    shutil.copytree(tiny_sae["saelens"], folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(
        json.dumps(cfg | {"normalize_activations": "expected_average_only_in"})
    )
    with pytest.raises(SAEError, match="--sae-norm-scaling-factor"):
        load_saes([2], sae_local_path=str(folder))
    sae = load_saes([2], sae_local_path=str(folder), norm_scaling_factor=0.5)[2]
    np.testing.assert_allclose(sae.W_enc, load_local(tiny_sae["saelens"]).W_enc * 0.5)
