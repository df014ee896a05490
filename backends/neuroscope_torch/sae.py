"""SAE encoding and top-k on the torch device (the formulas are neuroscope.sae's).

The encoder matrix is kept in the model's dtype (a 16k SAE of Gemma 2 2B is 37.7M numbers: 150 MB
to read per token in float32, 75 MB in bfloat16), while the pre-activations stay float32 numbers:
the input is split into two bfloat16 halves (``hi + lo`` carries 16 bits of mantissa, as exact as
the float32 input for this use) and both rows go through one matrix product that accumulates in
float32 (``torch.mm(out_dtype=float32)`` on CUDA; float32 blocks elsewhere). A product of two
bfloat16 numbers is exact in float32, so the only rounding left is the encoder's own, to the
model's dtype; thresholds and top-k compare these float32 pre-activations. float32 models keep
everything float32, bit for bit as before.
"""

from __future__ import annotations

import torch

from neuroscope.errors import SAEError
from neuroscope.sae import SAE

# Columns of the encoder upcast at a time where no mixed-precision product exists (CPU): bounds the
# float32 copy to d x 4096 while the product still reads the matrix once.
BLOCK = 4096


def mm_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` [..., width] in float32 for float32 ``x`` [..., d] and ``w`` [d, width] of any
    dtype: float32 accumulation, ``x`` kept to ~16 bits of mantissa (see the module docstring)."""
    if w.dtype == torch.float32:
        return x @ w
    flat = x.reshape(-1, x.shape[-1])
    hi = flat.to(w.dtype)
    lo = (flat - hi.float()).to(w.dtype)
    both = torch.cat([hi, lo])  # one pass over w for both halves
    out = None
    if w.is_cuda:
        try:
            out = torch.mm(both, w, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch or a GPU without the mixed product
            out = None
    if out is None:
        out = torch.cat(
            [both.float() @ w[:, i : i + BLOCK].float() for i in range(0, w.shape[1], BLOCK)],
            dim=-1,
        )
    n = flat.shape[0]
    return (out[:n] + out[n:]).reshape(*x.shape[:-1], w.shape[1])


class TorchSAE:
    """An SAE's encoder on the device: the encoder matrix in ``dtype`` (the model's), everything
    else (biases, thresholds, pre-activations, activations) float32."""

    def __init__(self, sae: SAE, device: torch.device, dtype: torch.dtype = torch.float32):
        if sae.architecture == "jumprelu" and sae.threshold is None:
            raise SAEError(f"SAE {sae.id} is JumpReLU but has no threshold.")
        if sae.architecture == "topk" and not sae.k:
            raise SAEError(f"SAE {sae.id} is top-k but has no k.")
        if sae.architecture == "gated" and (sae.mag_scale is None or sae.b_mag is None):
            raise SAEError(f"SAE {sae.id} is gated but lacks its magnitude path (r_mag, b_mag).")

        def put(a, as_dtype=torch.float32):
            return None if a is None else torch.from_numpy(a).to(device=device, dtype=as_dtype)

        self.W_enc = put(sae.W_enc, dtype)
        self.b_enc, self.b_dec = put(sae.b_enc), put(sae.b_dec)
        self.threshold = put(sae.threshold)
        self.mag_scale, self.b_mag = put(sae.mag_scale), put(sae.b_mag)
        self.architecture, self.k = sae.architecture, sae.k or 0  # k: topk only (checked above)
        self.apply_b_dec_to_input = sae.apply_b_dec_to_input
        self.input_norm, self.normalize = sae.input_norm, sae.normalize
        self.width = sae.width

    def encode(self, residual: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., width] (float32) of residuals [..., d]."""
        x = residual.float()
        if self.input_norm == "rms":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
        if self.normalize == "constant_norm_rescale":
            x = x * (x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True))
        elif self.normalize == "layer_norm":  # SAELens: unbiased std, eps added to it
            x = x - x.mean(-1, keepdim=True)
            x = x / (x.std(-1, keepdim=True) + 1e-5)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        proj = mm_f32(x, self.W_enc)
        if self.architecture == "gated":
            gate = (proj + self.b_enc) > 0
            return gate * torch.relu(proj * self.mag_scale + self.b_mag)
        pre = proj + self.b_enc
        acts = torch.relu(pre)
        if self.architecture == "jumprelu":
            return acts * (pre > self.threshold)
        if self.architecture == "topk":
            values, indices = acts.topk(self.k, dim=-1)
            acts = torch.zeros_like(acts).scatter_(-1, indices, values)
        return acts

    def top_k(self, residual: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = self.encode(residual).topk(k, dim=-1)
        return indices, values
