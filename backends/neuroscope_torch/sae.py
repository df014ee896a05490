"""SAE encoding and top-k on the torch device."""

from __future__ import annotations

import torch

from neuroscope.sae import SAE


class TorchSAE:
    """An SAE's encoder on the device, float32 (the residual is cast up before encoding)."""

    def __init__(self, sae: SAE, device: torch.device):
        def put(a):
            return None if a is None else torch.from_numpy(a).to(device=device, dtype=torch.float32)

        self.W_enc, self.b_enc, self.b_dec = put(sae.W_enc), put(sae.b_enc), put(sae.b_dec)
        self.threshold = put(sae.threshold)
        self.architecture, self.k = sae.architecture, sae.k
        self.apply_b_dec_to_input = sae.apply_b_dec_to_input
        self.input_norm = sae.input_norm
        self.width = sae.width

    def encode(self, residual: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., width] of residuals [..., d]."""
        x = residual.float()
        if self.input_norm == "rms":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return pre * (pre > self.threshold)
        acts = torch.relu(pre)
        if self.architecture == "topk":
            values, indices = acts.topk(self.k, dim=-1)
            acts = torch.zeros_like(acts).scatter_(-1, indices, values)
        return acts

    def top_k(self, residual: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = self.encode(residual).topk(k, dim=-1)
        return indices, values
