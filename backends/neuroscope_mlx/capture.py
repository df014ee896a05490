"""Capture for the MLX backend: every block's output, attention patterns and a logit lens from one
uncached forward pass (``Backend.capture``, ``neuroscope.capture``).

mlx's fused attention never returns its weights, so they are recomputed here from what the model
itself used: each block's ``self_attn`` is wrapped for the pass to record its input and its mask
argument, then the weights are rebuilt with the module's own projections, q/k norms, RoPE, scale
and attention soft-capping, and the same mask (Gemma 2's sliding window comes in the mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from neuroscope.backend import ForwardCapture
from neuroscope.errors import ConfigError
from neuroscope_mlx.hooks import HookedBlock

if TYPE_CHECKING:
    from neuroscope_mlx.backend import MLXBackend

LENS_ROWS = 256  # positions unembedded at once: bounds the [rows, vocab] logits


class AttentionInput:
    """Plain Python state (never part of the weight tree): what one attention call received."""

    def __init__(self) -> None:
        self.x: mx.array | None = None
        self.mask: Any = None


class RecordingAttention(nn.Module):
    def __init__(self, inner: nn.Module, record: AttentionInput):
        super().__init__()
        self.inner = inner
        self.record = record

    def __call__(self, x: mx.array, mask: Any = None, *args: Any, **kwargs: Any) -> Any:
        self.record.x, self.record.mask = x, mask
        return self.inner(x, mask, *args, **kwargs)

    def __getattr__(self, key: str) -> Any:
        if key in self:
            return self[key]
        if "inner" not in self:  # still in __init__
            raise AttributeError(key)
        return getattr(self["inner"], key)


def _block(model: nn.Module, layer: int) -> nn.Module:
    block = model.layers[layer]
    return block["block"] if isinstance(block, HookedBlock) else block


def _visible(mask: Any, n: int) -> mx.array | None:
    """The mask the model passed, as bool [T, T] (True: the query sees the key); None: additive."""
    if mask is None or (isinstance(mask, str) and mask == "causal"):
        return mx.tril(mx.ones((n, n), dtype=mx.bool_))
    if hasattr(mask, "key_start"):  # neuroscope_mlx.models' AttentionSpan (no cache: keys from 0)
        if mask.key_start != 0:
            raise ConfigError("Attention capture needs an uncached pass (keys from position 0).")
        return mx.ones((n, n), dtype=mx.bool_) if mask.mask is None else mask.mask
    if isinstance(mask, mx.array) and mask.dtype == mx.bool_:
        return mask.reshape(mask.shape[-2:])
    return None


def attention_weights(attn: nn.Module, record: AttentionInput) -> mx.array:
    """Softmax weights [query heads, T, T] of one recorded call, as the module computes them."""
    x = record.x
    if x is None:
        raise RuntimeError("The attention module did not run: nothing was recorded.")
    missing = [n for n in ("q_proj", "k_proj", "rope", "scale", "n_heads") if not hasattr(attn, n)]
    if missing:
        raise ConfigError(
            f"Cannot rebuild attention weights of {type(attn).__name__}: it has no "
            f"{', '.join(missing)}."
        )
    B, n, _ = x.shape
    n_heads = attn.n_heads
    n_kv = getattr(attn, "n_kv_heads", n_heads)
    q = attn.q_proj(x).reshape(B, n, n_heads, -1).transpose(0, 2, 1, 3)
    k = attn.k_proj(x).reshape(B, n, n_kv, -1).transpose(0, 2, 1, 3)
    if "q_norm" in attn:  # Gemma 3 normalises q and k per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = attn.rope(q), attn.rope(k)
    k = mx.repeat(k, n_heads // n_kv, axis=1)  # head h reads key/value head h // repeats
    scores = (q @ k.swapaxes(-1, -2)) * attn.scale
    cap = getattr(attn, "logit_cap", None) or getattr(attn, "attn_logit_softcapping", None)
    if cap:
        scores = mx.tanh(scores / cap) * cap
    visible = _visible(record.mask, n)
    if visible is not None:
        scores = mx.where(visible, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    else:  # an additive float mask
        scores = scores + record.mask.astype(scores.dtype)
    return mx.softmax(scores, axis=-1, precise=True)[0].astype(mx.float32)


def logit_lens(
    model: nn.Module, residuals: Sequence[mx.array], k: int, softcap: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (ids, logits) of each residual [T, d] read as if it were the last block's output."""
    inner = model.model
    norm = inner.norm
    unembed = model.lm_head if "lm_head" in model else inner.embed_tokens.as_linear
    ids, values = [], []
    for residual in residuals:
        layer_ids, layer_values = [], []
        for start in range(0, residual.shape[0], LENS_ROWS):
            logits = unembed(norm(residual[start : start + LENS_ROWS])).astype(mx.float32)
            if softcap:
                logits = mx.tanh(logits / softcap) * softcap
            order = mx.argsort(-logits, axis=-1)[:, :k]
            top = mx.take_along_axis(logits, order, axis=-1)
            mx.eval(order, top)
            layer_ids.append(np.array(order).astype(np.int64))
            layer_values.append(np.array(top, dtype=np.float32))
        ids.append(np.concatenate(layer_ids))
        values.append(np.concatenate(layer_values))
    return np.stack(ids), np.stack(values)


def capture(
    backend: MLXBackend,
    token_ids: list[int],
    layers: Sequence[int],
    attention: bool,
    lens_top: int,
) -> ForwardCapture:
    model = backend.model
    records: dict[int, AttentionInput] = {}
    wrapped: dict[int, nn.Module] = {}
    for layer in layers:
        backend._hooks[layer].capture = True
    try:
        if attention:
            for layer in layers:
                block = _block(model, layer)
                if "self_attn" not in block:
                    raise ConfigError(f"Block {layer} has no self_attn: no attention to capture.")
                wrapped[layer] = block["self_attn"]
                records[layer] = AttentionInput()
                block.self_attn = RecordingAttention(wrapped[layer], records[layer])
        inputs = mx.array([token_ids])
        # The inner model stops at the final norm: no [T, vocab] logits for the whole sequence.
        (model.model if "model" in model else model)(inputs)
        device_residuals = {layer: backend._hooks[layer].take()[0] for layer in layers}
        patterns: dict[int, np.ndarray] = {}
        for layer in layers:
            mx.eval(device_residuals[layer])
            if attention:
                weights = attention_weights(wrapped[layer], records[layer])
                mx.eval(weights)
                patterns[layer] = np.array(weights)
                records[layer].x = records[layer].mask = None
    finally:
        for layer, inner in wrapped.items():
            _block(model, layer).self_attn = inner
        backend._update_capture()
    if lens_top > 0:
        softcap = {**backend.config, **backend.config.get("text_config", {})}.get(
            "final_logit_softcapping"
        )
        k = min(lens_top, backend.info.vocab_size)
        lens_ids, lens_logits = logit_lens(
            model, [device_residuals[layer] for layer in layers], k, softcap
        )
    else:
        lens_ids = np.zeros((len(layers), len(token_ids), 0), dtype=np.int64)
        lens_logits = np.zeros((len(layers), len(token_ids), 0), dtype=np.float32)
    residuals = {layer: np.array(r.astype(mx.float32)) for layer, r in device_residuals.items()}
    return ForwardCapture(residuals, patterns, lens_ids, lens_logits)
