"""Random weights at real shapes, built fast: on the target device, without transformers' init.

transformers' own init (``from_config``) runs every initializer on the CPU, element by element for
some, before the model is copied to the GPU: minutes for a 2B model. Here the model is allocated
directly on the target device with initialization switched off, then filled in one pass: matrices
get N(0, 1/fan_in) (unit-scale activations through each layer, as the MLX backend's dummy weights;
large ones on the CPU tiled from one random block, see ``CPU_BLOCK``),
biases zeros, and small modules (norms) transformers' own init, so each architecture's neutral norm
(ones, or zeros for Gemma's ``1 + weight``) stays right. Buffers (rotary frequencies, embedding
scales) are computed by the modules' constructors as usual.
"""

from __future__ import annotations

from typing import Any

import torch

# Drawing normal samples on the CPU costs ~20 ns each, a minute for a 2B model on a small machine:
# CPU tensors larger than this many elements repeat one random block instead (a prime length, so
# consecutive rows of any width start at different places in it), ~6x faster. The numbers only set
# the model's shapes and scales for benchmarks and tests; their exact values do not matter.
CPU_BLOCK = 1_000_003


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
                normal_(p, p.shape[-1] ** -0.5, generator)
            else:
                p.zero_()


def normal_(p: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Fill ``p`` with N(0, std²) samples: drawn on an accelerator, tiled from one block on the CPU."""
    n = p.numel()
    if p.device.type != "cpu" or n <= CPU_BLOCK:
        p.normal_(0.0, std, generator=generator)
        return
    block = torch.empty(CPU_BLOCK, dtype=p.dtype).normal_(0.0, std, generator=generator)
    flat, whole = p.view(-1), n // CPU_BLOCK
    flat[: whole * CPU_BLOCK].view(whole, CPU_BLOCK).copy_(block.expand(whole, CPU_BLOCK))
    flat[whole * CPU_BLOCK :].copy_(block[: n - whole * CPU_BLOCK])
