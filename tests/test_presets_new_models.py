"""Dummy-weight presets for Gemma 3 (270M, 1B, 4B) and Llama 3.1 8B: real shapes, no download.

The shapes are checked by parameter count against the published model sizes, built on
transformers' meta device (no memory); Gemma 3's are read by Neuroscope's MLX Gemma 3 as well.
"""

from __future__ import annotations

import pytest
from conftest import requires_mlx, requires_torch

from neuroscope.loading import PRESETS, resolve_model

# Published sizes (the language model only for Gemma 3 4B, whose checkpoint adds a vision tower).
SIZES = {"gemma-3-270m": 268e6, "gemma-3-1b": 1.000e9, "gemma-3-4b": 3.88e9, "llama-3.1-8b": 8.03e9}


@requires_torch
@pytest.mark.parametrize("name", list(SIZES))
def test_presets_have_the_published_sizes(name: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(PRESETS[name])
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    print(f"\n{name}: {n:,} parameters")
    assert abs(n - SIZES[name]) / SIZES[name] < 0.01


def test_aliases_and_the_dummy_folder() -> None:
    assert PRESETS["google/gemma-3-1b-it"] is PRESETS["gemma-3-1b"]
    assert PRESETS["meta-llama/Llama-3.1-8B-Instruct"] is PRESETS["llama-3.1-8b"]
    resolved = resolve_model("google/gemma-3-270m-it", "dummy")
    assert resolved.dummy_weights and (resolved.path / "config.json").is_file()


@requires_mlx
@pytest.mark.parametrize("name", ["gemma-3-270m", "gemma-3-1b", "gemma-3-4b"])
def test_mlx_gemma3_reads_the_presets(name: str) -> None:
    from neuroscope_mlx.models.gemma3 import ModelArgs

    args = ModelArgs.from_dict(PRESETS[name])
    assert args.layer_types is not None and args.layer_types.count("full_attention") == (
        args.num_hidden_layers // 6
    )
    assert args.rope("sliding_attention") == (10_000.0, 1.0)
    assert args.rope("full_attention") == (1_000_000.0, 0.125 if name == "gemma-3-4b" else 1.0)
