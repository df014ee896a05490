"""Random weights at real shapes, built fast: on the target device, without transformers' init.

transformers' own init (``from_config``) runs every initializer on the CPU, element by element for
some, before the model is copied to the GPU: minutes for a 2B model. Here the model is allocated
directly on the target device with initialization switched off, then filled in one pass: matrices
get N(0, 1/fan_in) (unit-scale activations through each layer, as the MLX backend's dummy weights),
biases zeros, and small modules (norms) transformers' own init, so each architecture's neutral norm
(ones, or zeros for Gemma's ``1 + weight``) stays right. Buffers (rotary frequencies, embedding
scales) are computed by the modules' constructors as usual.
"""

from __future__ import annotations

from typing import Any

import torch


def build_dummy(
    config: Any, dtype: torch.dtype, attn: str, device: torch.device, seed: int = 0
) -> Any:
    """``AutoModelForCausalLM`` for ``config`` on ``device`` with deterministic random weights."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: its slow init, on the target device
        torch.manual_seed(seed)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.tie_weights()  # skipped with the init above; tied parameters are then filled once
    randomize(model, seed)
    return model


@torch.no_grad()
def randomize(model: Any, seed: int = 0) -> None:
    """Fill every parameter of ``model`` in place (see the module docstring)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if all(p.ndim < 2 for p in own):
            model._init_weights(module)  # norms: the architecture's own neutral values
            continue
        for p in own:
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=generator)
            else:
                p.zero_()
