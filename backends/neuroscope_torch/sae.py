"""SAE encoding and top-k on the torch device (the formulas are neuroscope.sae's)."""

from __future__ import annotations

import torch

from neuroscope.errors import SAEError
from neuroscope.sae import SAE


class TorchSAE:
    """An SAE's encoder on the device, float32 (the residual is cast up before encoding)."""

    def __init__(self, sae: SAE, device: torch.device):
        if sae.architecture == "jumprelu" and sae.threshold is None:
            raise SAEError(f"SAE {sae.id} is JumpReLU but has no threshold.")
        if sae.architecture == "topk" and not sae.k:
            raise SAEError(f"SAE {sae.id} is top-k but has no k.")
        if sae.architecture == "gated" and (sae.mag_scale is None or sae.b_mag is None):
            raise SAEError(f"SAE {sae.id} is gated but lacks its magnitude path (r_mag, b_mag).")

        def put(a):
            return None if a is None else torch.from_numpy(a).to(device=device, dtype=torch.float32)

        self.W_enc, self.b_enc, self.b_dec = put(sae.W_enc), put(sae.b_enc), put(sae.b_dec)
        self.threshold = put(sae.threshold)
        self.mag_scale, self.b_mag = put(sae.mag_scale), put(sae.b_mag)
        self.architecture, self.k = sae.architecture, sae.k or 0  # k: topk only (checked above)
        self.apply_b_dec_to_input = sae.apply_b_dec_to_input
        self.input_norm, self.normalize = sae.input_norm, sae.normalize
        self.width = sae.width

    def encode(self, residual: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., width] of residuals [..., d]."""
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
        if self.architecture == "gated":
            proj = x @ self.W_enc
            gate = (proj + self.b_enc) > 0
            return gate * torch.relu(proj * self.mag_scale + self.b_mag)
        pre = x @ self.W_enc + self.b_enc
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
