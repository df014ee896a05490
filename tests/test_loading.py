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
