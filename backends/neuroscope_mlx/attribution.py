"""Exact per-token attribution on MLX (``Backend.attribute``, docs/why.md): the torch backend's
decomposition on the models MLX runs.

mlx has no forward hooks: for one uncached pass, blocks 0..layer are wrapped to record their input
and output, and their ``self_attn`` to record its input, mask and output (``neuroscope_mlx.capture``'s
``RecordingAttention``). Attention weights are rebuilt from the module's own projections, RoPE,
scale, soft-capping and mask (``capture.attention_weights``), and checked: ``o_proj(A @ v)`` must
give back the output the model computed. What attention adds is ``o`` (through Gemma's
post-attention RMSNorm, its RMS frozen); the MLP's part is what remains of the block's output
minus its input and attention part, so the split is exact by construction; everything is projected
on the direction in float64 on the host (a few [T, d] arrays per block).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from neuroscope.attribution import ResidualSplit
from neuroscope.errors import ConfigError
from neuroscope_mlx.capture import AttentionInput, RecordingAttention, _block, attention_weights

if TYPE_CHECKING:
    from neuroscope_mlx.backend import MLXBackend

O_TOLERANCE = 1e-3  # relative; see neuroscope_torch.attribution.Z_TOLERANCE


class _BlockRecord(nn.Module):
    """Wraps one entry of ``model.layers`` for one pass: keeps its input and output."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[mx.array] = []  # plain Python state: [input, output]

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(x, *args, **kwargs)
        self.seen = [x, out[0] if isinstance(out, tuple) else out]
        return out

    def __getattr__(self, key: str) -> Any:
        if key in self:
            return self[key]
        if "inner" not in self:
            raise AttributeError(key)
        return getattr(self["inner"], key)


class _AttnRecord(RecordingAttention):
    """``RecordingAttention`` that also keeps what the module returned."""

    def __call__(self, x: mx.array, mask: Any = None, *args: Any, **kwargs: Any) -> Any:
        out = super().__call__(x, mask, *args, **kwargs)
        self.record.out = out  # type: ignore[attr-defined]
        return out


def _host(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def _weight(linear: Any) -> np.ndarray:
    """A Linear's weight [out, in] as float64 (quantized ones dequantized)."""
    if "scales" in linear:
        w = mx.dequantize(
            linear.weight, linear.scales, linear.get("biases"), linear.group_size, linear.bits
        )
        return _host(w)
    return _host(linear.weight)


def attribute(
    backend: MLXBackend,
    token_ids: list[int],
    layer: int,
    position: int,
    direction_at: Callable[[np.ndarray], np.ndarray],
) -> ResidualSplit:
    model: Any = backend.model
    layers = model.layers
    blocks: dict[int, _BlockRecord] = {}
    attns: dict[int, tuple[nn.Module, AttentionInput]] = {}
    try:
        for i in range(layer + 1):
            block = _block(model, i)
            if "self_attn" not in block:
                raise ConfigError(f"Block {i} has no self_attn: attribution cannot split it.")
            record = AttentionInput()
            attns[i] = (block["self_attn"], record)
            block.self_attn = _AttnRecord(attns[i][0], record)
            blocks[i] = _BlockRecord(layers[i])
            layers[i] = blocks[i]
        (model.model if "model" in model else model)(mx.array([token_ids]))
        seen = [blocks[i].seen for i in range(layer + 1)]
        mx.eval([a for s in seen for a in s])
    finally:
        for i, wrapper in blocks.items():
            layers[i] = wrapper.inner
        for i, (inner, _) in attns.items():
            _block(model, i).self_attn = inner
    p = position
    residual = np.array(seen[layer][1][0, p].astype(mx.float32))
    d = np.asarray(direction_at(residual), dtype=np.float64)
    embed = float(_host(seen[0][0][0, p]) @ d)
    attn = np.zeros((layer + 1, len(token_ids)), dtype=np.float64)
    mlp = np.zeros(layer + 1, dtype=np.float64)
    bias = 0.0
    for i in range(layer + 1):
        block = _block(model, i)
        module, record = attns[i]
        o = _host(record.out[0, p])  # type: ignore[attr-defined]
        A = _host(attention_weights(module, record)[:, p, :])  # [H, T]
        x = record.x
        assert x is not None
        v = _host(module.v_proj(x)[0])  # [T, kv * hd]
        W_O = _weight(module.o_proj)  # [d, H * hd]
        b_O = _host(module.o_proj.bias) if "bias" in module.o_proj else None
        heads = A.shape[0]
        hd = W_O.shape[1] // heads
        kv = v.shape[1] // hd
        vh = np.repeat(v.reshape(-1, kv, hd), heads // kv, axis=1)  # [T, H, hd]
        z = np.einsum("hs,shd->hd", A, vh).reshape(-1)
        rebuilt = W_O @ z + (b_O if b_O is not None else 0.0)
        err = float(np.linalg.norm(rebuilt - o)) / max(float(np.linalg.norm(o)), 1e-30)
        if err > O_TOLERANCE:
            raise ConfigError(
                f"Block {i}'s attention does not read its values as softmax(QK) @ v_proj(x) "
                f"(mismatch {err:.1e}); attribution does not support this architecture."
            )
        gd = d
        attn_add = o
        if "post_feedforward_layernorm" in block:  # Gemma: sandwich norms, RMS frozen
            norm = block.post_attention_layernorm
            gain = (1.0 + _host(norm.weight)) / np.sqrt(np.mean(o * o) + norm.eps)
            gd, attn_add = d * gain, o * gain
        u = (W_O.T @ gd).reshape(heads, hd)
        if b_O is not None:
            bias += float(b_O @ gd)
        attn[i] = (A.T * np.einsum("shd,hd->sh", vh, u)).sum(-1)
        block_in, block_out = _host(seen[i][0][0, p]), _host(seen[i][1][0, p])
        mlp[i] = float((block_out - block_in - attn_add) @ d)
    return ResidualSplit(residual=residual, embed=embed, attn=attn, mlp=mlp, bias=bias)


def upstream_gradient(
    backend: MLXBackend,
    token_ids: list[int],
    from_layer: int,
    layer: int,
    position: int,
    direction_at: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Block ``from_layer``'s output and the gradient of ``x_layer[position] . d`` with respect to
    it, by ``mx.grad`` of a pass whose hook at ``from_layer`` adds the differentiated zeros."""
    residuals, _ = backend.forward_reference(token_ids, [from_layer, layer])
    d = mx.array(np.asarray(direction_at(residuals[layer][position]), dtype=np.float32))
    model: Any = backend.model
    inner = model.model if "model" in model else model
    hook_from, hook_to = backend._hooks[from_layer], backend._hooks[layer]
    before = hook_from.edit
    inputs = mx.array([token_ids])

    def objective(delta: mx.array) -> mx.array:
        hook_from.edit = (
            (lambda h: before(h) + delta.astype(h.dtype))
            if before is not None
            else (lambda h: h + delta.astype(h.dtype))
        )
        hook_to.capture = True
        inner(inputs)
        out = hook_to.take()
        return (out[0, position].astype(mx.float32) * d).sum()

    try:
        zeros = mx.zeros((1, len(token_ids), residuals[from_layer].shape[-1]), dtype=mx.float32)
        grad = mx.grad(objective)(zeros)
        mx.eval(grad)
    finally:
        hook_from.edit = before
        backend._update_capture()
    return residuals[from_layer], np.array(grad[0].astype(mx.float32))
