"""Capture for the torch backend: every block's output, transformers' own attention weights and a
logit lens, from one uncached forward pass (``Backend.capture``, ``neuroscope.capture``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from neuroscope.backend import ForwardCapture
from neuroscope.errors import ConfigError

if TYPE_CHECKING:
    from neuroscope_torch.backend import TorchBackend

# Positions unembedded at once by the logit lens: bounds the [rows, vocab] logits in memory
# (256 x 256k float32 is 256 MiB at Gemma's vocabulary).
LENS_ROWS = 256


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm the model applies after its last block (``model.model.norm`` in transformers)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else model
    for name in ("norm", "final_layernorm", "ln_f"):
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ConfigError(f"Cannot find the final norm of {type(model).__name__} for the logit lens.")


@torch.inference_mode()
def logit_lens(
    model: Any, residuals: Sequence[torch.Tensor], k: int, softcap: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (ids, logits) of each residual [T, d] read as if it were the last block's output."""
    norm = final_norm(model)
    unembed: Any = model.get_output_embeddings()
    if unembed is None:
        raise ConfigError(f"{type(model).__name__} has no output embedding for the logit lens.")
    ids, values = [], []
    for residual in residuals:
        layer_ids, layer_values = [], []
        for start in range(0, residual.shape[0], LENS_ROWS):
            logits = unembed(norm(residual[start : start + LENS_ROWS])).float()
            if softcap:  # Gemma 2's final soft-capping, as its forward applies it
                logits = torch.tanh(logits / softcap) * softcap
            top = logits.topk(k, dim=-1)
            layer_ids.append(top.indices.cpu().numpy())
            layer_values.append(top.values.cpu().numpy())
        ids.append(np.concatenate(layer_ids))
        values.append(np.concatenate(layer_values))
    return np.stack(ids).astype(np.int64), np.stack(values).astype(np.float32)


@torch.inference_mode()
def capture(
    backend: TorchBackend,
    token_ids: list[int],
    layers: Sequence[int],
    attention: bool,
    lens_top: int,
) -> ForwardCapture:
    model: Any = backend.model
    hooks = {layer: backend._hook(layer) for layer in layers}
    was_capturing = {layer: h.capture for layer, h in hooks.items()}
    # Attention weights exist only in the eager kernel (sdpa and flash never materialise them):
    # switch for this pass and back.
    config = model.config
    kernel = getattr(config, "_attn_implementation", None)
    switch = attention and kernel != "eager"
    for h in hooks.values():
        h.capture = True
    try:
        if switch:
            model.set_attn_implementation("eager")
        tokens = torch.tensor([token_ids], device=backend._device)
        out = model(
            input_ids=tokens, use_cache=False, logits_to_keep=1, output_attentions=attention
        )
        device_residuals = {layer: h.take()[0] for layer, h in hooks.items()}
    finally:
        if switch:
            model.set_attn_implementation(kernel)
        for layer, h in hooks.items():
            h.capture, h.captured = was_capturing[layer], None
    patterns: dict[int, np.ndarray] = {}
    if attention:
        if out.attentions is None or len(out.attentions) != backend.info.num_layers:
            raise ConfigError(f"{type(model).__name__} returned no attention weights.")
        patterns = {layer: out.attentions[layer][0].float().cpu().numpy() for layer in layers}
    if lens_top > 0:
        softcap = getattr(backend.config, "final_logit_softcapping", None)
        k = min(lens_top, backend.info.vocab_size)
        lens_ids, lens_logits = logit_lens(
            model, [device_residuals[layer] for layer in layers], k, softcap
        )
    else:
        lens_ids = np.zeros((len(layers), len(token_ids), 0), dtype=np.int64)
        lens_logits = np.zeros((len(layers), len(token_ids), 0), dtype=np.float32)
    residuals = {layer: r.float().cpu().numpy() for layer, r in device_residuals.items()}
    return ForwardCapture(residuals, patterns, lens_ids, lens_logits)
