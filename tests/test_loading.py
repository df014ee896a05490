"""Model resolution: Hub ids through the Hugging Face cache, folders, presets for dummy weights."""

from __future__ import annotations

import shutil

import pytest

from neuroscope.errors import ConfigError, ModelLoadError
from neuroscope.loading import PRESETS, resolve_model


def _fake_hub_model(cache, repo, folder):
    commit = "1" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(folder, base / "snapshots" / commit)


def test_repo_id_resolves_through_the_hf_cache_offline(tiny_model, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    _fake_hub_model(tmp_path, "google/gemma-2-2b-it", tiny_model)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    resolved = resolve_model("google/gemma-2-2b-it")
    assert (resolved.path / "config.json").is_file() and not resolved.dummy_weights
    with pytest.raises(
        ModelLoadError, match="not in the Hugging Face cache.*local folder or .gguf"
    ):
        resolve_model("google/gemma-2-9b-it")


def test_local_folders_and_bad_paths(tiny_model, tmp_path):
    assert resolve_model(str(tiny_model)).path == tiny_model
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "model.gguf"))
    with pytest.raises(ConfigError, match="load-format"):
        resolve_model(str(tiny_model), load_format="pickle")  # type: ignore[arg-type]


def test_dummy_preset_has_real_shapes_and_a_tokenizer():
    resolved = resolve_model("gemma-2-2b", load_format="dummy")
    assert resolved.dummy_weights
    import json

    config = json.loads((resolved.path / "config.json").read_text())
    assert (
        config["hidden_size"] == 2304
        and config["num_hidden_layers"] == 26
        and config["vocab_size"] == 256000
    )
    assert (resolved.path / "tokenizer.json").is_file()
    with pytest.raises(ConfigError, match="preset"):
        resolve_model("no-such-preset", load_format="dummy")
    assert "gemma-2-2b" in PRESETS


# ---- the SAE must fit the model, checked before weights load ---------------------------------------


@pytest.fixture
def no_backend(monkeypatch):
    """Fail the test if Session gets as far as loading a backend (the model's weights)."""
    import neuroscope.session

    def refuse(name):
        raise AssertionError(f"the {name} backend was loaded before the SAE was checked")

    monkeypatch.setattr(neuroscope.session, "load_backend_class", refuse)


def test_the_default_gemma_scope_sae_on_another_model_fails_before_loading(tiny_model, no_backend):
    from neuroscope import Session
    from neuroscope.errors import SAEError

    with pytest.raises(SAEError) as raised:
        Session(model=str(tiny_model))  # hidden size 64; Gemma Scope 2B reads 2304
    message = str(raised.value)
    assert "size 2304" in message and "hidden size 64" in message
    assert "No SAE option was given" in message and "google/gemma-scope-2b-pt-res" in message
    for option in ("--sae-local-path", "--sae-path", "--sae "):
        assert option in message


@pytest.mark.parametrize("kind", ["npz", "saelens"])
def test_a_local_sae_of_another_width_fails_before_loading(tiny_model, tmp_path, no_backend, kind):
    from neuroscope import Session
    from neuroscope.errors import SAEError
    from neuroscope.synthetic import build_random_sae

    narrow = build_random_sae(tmp_path, d_model=32, width=16)[kind]
    with pytest.raises(SAEError, match="size 32, but .* has hidden size 64") as raised:
        Session(model=str(tiny_model), sae_local_path=str(narrow), layer=1)
    assert "No SAE option was given" not in str(raised.value)


def test_an_sae_that_fits_passes_the_check(tiny_model, tiny_sae):
    from neuroscope.loading import check_sae_fits, model_hidden_size, resolve_model

    resolved = resolve_model(str(tiny_model))
    assert model_hidden_size(resolved.path) == 64
    for kind in ("npz", "saelens"):
        check_sae_fits(resolved, [1, 2], sae="unused/repo", sae_local_path=str(tiny_sae[kind]))
    # Dummy weights with no SAE named get a random SAE of the model's width: nothing to check.
    check_sae_fits(resolve_model("gemma-2-2b", "dummy"), [20], sae="google/gemma-scope-2b-pt-res")


def test_serve_with_a_non_gemma_model_and_no_sae_option_says_what_to_pass(tiny_model, no_backend):
    from typer.testing import CliRunner

    from neuroscope.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_model), "--port", "0"])
    assert result.exit_code == 1, result.output
    assert "--sae-local-path" in result.output and "hidden size 64" in result.output
    assert "Traceback" not in result.output


def test_gemma_scope_2_safetensors_and_cached_hub_saes_are_checked_too(
    tiny_model, tmp_path, monkeypatch, no_backend
):
    """A params.safetensors (Gemma Scope 2) is read from its header; a Hub SAE already in the HF
    cache is read there, offline; one not downloaded is left to the full load."""
    import huggingface_hub.constants as hf_constants
    import numpy as np
    from safetensors.numpy import save_file

    from neuroscope import Session
    from neuroscope.errors import SAEError
    from neuroscope.loading import check_sae_fits, resolve_model

    params = tmp_path / "gs2" / "params.safetensors"
    params.parent.mkdir()
    save_file({"w_enc": np.zeros((48, 16), np.float32), "b_enc": np.zeros(16, np.float32)},
              str(params))  # fmt: skip
    for local in (params, params.parent):
        with pytest.raises(SAEError, match="size 48, but .* has hidden size 64"):
            Session(model=str(tiny_model), sae_local_path=str(local), layer=1)

    hub = tmp_path / "hub"
    _fake_hub_model(hub, "someone/saes", params.parent)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    resolved = resolve_model(str(tiny_model))
    with pytest.raises(SAEError, match="someone/saes/params.safetensors reads vectors of size 48"):
        check_sae_fits(resolved, [1], sae="someone/saes", sae_path="params.safetensors")
    # Not in the cache: nothing to read without a download, so no early verdict.
    check_sae_fits(resolved, [1], sae="someone/other", sae_path="layer_1/params.npz")
