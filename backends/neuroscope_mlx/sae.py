"""SAE encoding and top-k on the MLX device (float32: the residual is cast up before encoding)."""

from __future__ import annotations

import mlx.core as mx

from neuroscope.errors import SAEError
from neuroscope.sae import SAE


class MLXSAE:
    """An SAE's encoder on the device; the formula is neuroscope.sae's (docs/design.md, Conventions)."""

    def __init__(self, sae: SAE):
        if sae.architecture == "jumprelu" and sae.threshold is None:
            raise SAEError(f"SAE {sae.id} is JumpReLU but has no threshold.")
        if sae.architecture == "topk" and not sae.k:
            raise SAEError(f"SAE {sae.id} is top-k but has no k.")
        if sae.architecture == "gated" and (sae.mag_scale is None or sae.b_mag is None):
            raise SAEError(f"SAE {sae.id} is gated but lacks its magnitude path (r_mag, b_mag).")
        self.W_enc, self.b_enc, self.b_dec = (
            mx.array(sae.W_enc),
            mx.array(sae.b_enc),
            mx.array(sae.b_dec),
        )
        self.threshold = None if sae.threshold is None else mx.array(sae.threshold)
        self.mag_scale = None if sae.mag_scale is None else mx.array(sae.mag_scale)
        self.b_mag = None if sae.b_mag is None else mx.array(sae.b_mag)
        self.architecture, self.k = sae.architecture, sae.k or 0  # k: topk only (checked above)
        self.apply_b_dec_to_input = sae.apply_b_dec_to_input
        self.input_norm, self.normalize = sae.input_norm, sae.normalize
        self.width = sae.width
        mx.eval(self.W_enc, self.b_enc, self.b_dec, self.threshold, self.mag_scale, self.b_mag)

    def encode(self, residual: mx.array) -> mx.array:
        """Feature activations [..., width] of residuals [..., d]."""
        x = residual.astype(mx.float32)
        if self.input_norm == "rms":
            x = x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True))
        if self.normalize == "constant_norm_rescale":
            x = x * (x.shape[-1] ** 0.5 / mx.linalg.norm(x, axis=-1, keepdims=True))
        elif self.normalize == "layer_norm":  # SAELens: unbiased std, eps added to it
            x = x - mx.mean(x, axis=-1, keepdims=True)
            x = x / (mx.sqrt(mx.var(x, axis=-1, keepdims=True, ddof=1)) + 1e-5)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if self.architecture == "gated":
            proj = x @ self.W_enc
            magnitude = mx.maximum(proj * self.mag_scale + self.b_mag, 0.0)  # type: ignore[operator]
            return mx.where(proj + self.b_enc > 0, magnitude, 0.0)
        pre = x @ self.W_enc + self.b_enc
        acts = mx.maximum(pre, 0.0)
        if self.architecture == "jumprelu":
            return mx.where(pre > self.threshold, acts, 0.0)  # type: ignore[operator]
        if self.architecture == "topk":  # keep exactly k, as SAELens does
            idx = mx.argpartition(-acts, kth=self.k - 1, axis=-1)[..., : self.k]
            kept = mx.take_along_axis(acts, idx, axis=-1)
            acts = mx.put_along_axis(mx.zeros_like(acts), idx, kept, axis=-1)
        return acts

    def top_k(self, residual: mx.array, k: int) -> tuple[mx.array, mx.array]:
        """(indices uint32, activations float32) [..., k], largest activation first."""
        return top_k(self.encode(residual), k)


def top_k(values: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest entries along the last axis, sorted descending: partition, then sort only k."""
    idx = mx.argpartition(-values, kth=k - 1, axis=-1)[..., :k]
    top = mx.take_along_axis(values, idx, axis=-1)
    order = mx.argsort(-top, axis=-1)
    return mx.take_along_axis(idx, order, axis=-1), mx.take_along_axis(top, order, axis=-1)
