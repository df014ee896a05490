"""Exact per-token attribution on transformers models (``Backend.attribute``, docs/why.md).

Block ``l`` adds ``P_attn(o_proj(z))`` and ``P_mlp(mlp(...))`` to the residual stream, where the
P are Gemma's post-attention / post-feedforward RMSNorms (identity for Llama-style blocks). An
RMSNorm is ``x * w_eff / rms(x)``: linear in x once ``rms(x)`` is frozen at its observed value.
``z`` at the query position is ``sum_s A[h, p, s] v_h[s]`` per head, so the attention output
splits exactly by source position. One forward pass, eager attention (the only kernel that
materialises the weights), hooks on each block's attention, ``v_proj``, ``o_proj``, MLP and
post-norms; everything is projected on the direction in float64 on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from neuroscope.attribution import ResidualSplit
from neuroscope.errors import ConfigError

if TYPE_CHECKING:
    from neuroscope_torch.backend import TorchBackend

# |z rebuilt from A and v - z seen by o_proj| / |z| above this: the architecture does something to
# the values we do not model (a value norm, ...), so the split would not be exact.
Z_TOLERANCE = 1e-3


def _norm_gain(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen RMSNorm at ``x`` [d] as an elementwise gain: ``norm(x) == x * gain``.

    ``w_eff`` (Gemma's 1 + w, Llama's w) is read off the module itself: norm(ones) = w_eff /
    sqrt(1 + eps); the RMS is x's own."""
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    ones = torch.ones_like(x, dtype=torch.float32)
    w_eff = norm(ones[None])[0].double() * (1.0 + eps) ** 0.5
    xd = x.double()
    return w_eff / torch.sqrt(xd.pow(2).mean() + eps)


class _Recorder:
    """Forward hooks on blocks 0..layer that keep what the split needs (batch row 0)."""

    def __init__(self, blocks: Sequence[torch.nn.Module]):
        self.blocks = blocks
        self.handles: list[Any] = []
        self.block_in: torch.Tensor | None = None
        self.block_out: torch.Tensor | None = None
        n = len(blocks)
        self.weights: list[torch.Tensor | None] = [None] * n  # [H, T, T]
        self.values: list[torch.Tensor | None] = [None] * n  # [T, kv * hd]
        self.z: list[torch.Tensor | None] = [None] * n  # o_proj input [T, H * hd]
        self.attn_out: list[torch.Tensor | None] = [None] * n  # what attention adds [T, d]
        self.attn_raw: list[torch.Tensor | None] = [None] * n  # o_proj output [T, d]
        self.mlp_out: list[torch.Tensor | None] = [None] * n  # what the MLP adds [T, d]
        self.mlp_raw: list[torch.Tensor | None] = [None] * n

    def install(self) -> None:
        def first(output: Any) -> torch.Tensor:
            return (output[0] if isinstance(output, tuple) else output)[0]

        def block0_pre(module: Any, args: Any, kwargs: Any) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            self.block_in = h[0]

        self.handles.append(self.blocks[0].register_forward_pre_hook(block0_pre, with_kwargs=True))

        def last_out(module: Any, args: Any, output: Any) -> None:
            self.block_out = first(output)

        self.handles.append(self.blocks[-1].register_forward_hook(last_out))
        block: Any
        for i, block in enumerate(self.blocks):
            attn: Any = getattr(block, "self_attn", None)
            mlp: Any = getattr(block, "mlp", None)
            if attn is None or mlp is None or not hasattr(attn, "v_proj"):
                raise ConfigError(
                    f"Attribution needs blocks with self_attn (v_proj, o_proj) and mlp; "
                    f"{type(block).__name__} has another layout."
                )
            self._keep(attn, "attention", i)
            self._keep(attn.v_proj, "values", i)
            self._keep(attn.o_proj, "o_proj", i)
            self._keep(mlp, "mlp", i)
            if hasattr(block, "post_feedforward_layernorm"):  # Gemma 2/3: sandwich norms
                self._keep(block.post_attention_layernorm, "post_attn", i)
                self._keep(block.post_feedforward_layernorm, "post_mlp", i)

    def _keep(self, module: torch.nn.Module, what: str, i: int) -> None:
        def hook(mod: Any, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if what == "attention":
                self.attn_raw[i] = out[0]
                if self.attn_out[i] is None:
                    self.attn_out[i] = out[0]
                self.weights[i] = output[1][0] if isinstance(output, tuple) else None
            elif what == "values":
                self.values[i] = out[0]
            elif what == "o_proj":
                self.z[i] = args[0][0]
            elif what == "mlp":
                self.mlp_raw[i] = out[0]
                if self.mlp_out[i] is None:
                    self.mlp_out[i] = out[0]
            elif what == "post_attn":
                self.attn_out[i] = out[0]
            elif what == "post_mlp":
                self.mlp_out[i] = out[0]

        self.handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def attribute(
    backend: TorchBackend,
    token_ids: list[int],
    layer: int,
    position: int,
    direction_at: Callable[[np.ndarray], np.ndarray],
) -> ResidualSplit:
    model: Any = backend.model
    blocks = list(backend._layers[: layer + 1])
    rec = _Recorder(blocks)
    kernel = getattr(model.config, "_attn_implementation", None)
    # Steering hooks on these blocks would change what is split; the hooks that read top-k stay
    # as they are (they only record).
    try:
        if kernel != "eager":
            model.set_attn_implementation("eager")
        rec.install()
        tokens = torch.tensor([token_ids], device=backend._device)
        model(input_ids=tokens, use_cache=False, logits_to_keep=1, output_attentions=True)
    finally:
        rec.remove()
        if kernel != "eager":
            model.set_attn_implementation(kernel)
    if rec.block_in is None or rec.block_out is None:
        raise RuntimeError("The hooked blocks did not run.")
    residual = rec.block_out[position].float()
    d = torch.from_numpy(np.asarray(direction_at(residual.cpu().numpy()), dtype=np.float64)).to(
        backend._device
    )
    p = position
    embed = float(rec.block_in[p].double() @ d)
    attn = np.zeros((len(blocks), len(token_ids)), dtype=np.float64)
    mlp = np.zeros(len(blocks), dtype=np.float64)
    bias = 0.0
    block: Any
    for i, block in enumerate(blocks):
        A, v, z = rec.weights[i], rec.values[i], rec.z[i]
        raw, mlp_out = rec.attn_raw[i], rec.mlp_out[i]
        if A is None or v is None or z is None or raw is None or mlp_out is None:
            raise ConfigError(
                f"Block {i} returned no attention weights: the model must run eager attention."
            )
        mlp[i] = float(mlp_out[p].double() @ d)
        # The direction pulled back through the frozen post-norm and o_proj: u [H * hd].
        gd = d
        if hasattr(block, "post_feedforward_layernorm"):
            gd = d * _norm_gain(block.post_attention_layernorm, raw[p])
        o_proj: Any = block.self_attn.o_proj
        u = o_proj.weight.double().T @ gd
        if getattr(o_proj, "bias", None) is not None:
            bias += float(o_proj.bias.double() @ gd)
        heads, hd = A.shape[0], u.shape[0] // A.shape[0]
        kv = v.shape[-1] // hd
        vh = v.double().view(-1, kv, hd).repeat_interleave(heads // kv, dim=1)  # [T, H, hd]
        weights = A[:, p, :].double()  # [H, T]
        rebuilt = torch.einsum("hs,shd->hd", weights, vh).reshape(-1)
        err = float((rebuilt - z[p].double()).norm() / z[p].double().norm().clamp_min(1e-30))
        if err > Z_TOLERANCE:
            raise ConfigError(
                f"Block {i}'s attention does not read its values as softmax(QK) @ v_proj(x) "
                f"(mismatch {err:.1e}); attribution does not support this architecture."
            )
        per_head = torch.einsum("shd,hd->sh", vh, u.view(heads, hd))  # v_h[s] . u_h
        attn[i] = (weights.T * per_head).sum(-1).cpu().numpy()
    return ResidualSplit(
        residual=residual.cpu().numpy(), embed=embed, attn=attn, mlp=mlp, bias=bias
    )


def upstream_gradient(
    backend: TorchBackend,
    token_ids: list[int],
    from_layer: int,
    layer: int,
    position: int,
    direction_at: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Block ``from_layer``'s output and the gradient of ``x_layer[position] . d`` with respect to
    it: the output is swapped for a leaf that requires grad, one forward and one backward pass."""
    model: Any = backend.model
    blocks = backend._layers
    kept: dict[str, torch.Tensor] = {}

    def make_leaf(module: Any, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        leaf = hidden.detach().requires_grad_(True)
        kept["leaf"] = leaf
        return (leaf, *output[1:]) if isinstance(output, tuple) else leaf

    def keep_out(module: Any, args: Any, output: Any) -> None:
        kept["out"] = output[0] if isinstance(output, tuple) else output

    handles = [
        blocks[from_layer].register_forward_hook(make_leaf),
        blocks[layer].register_forward_hook(keep_out),
    ]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            tokens = torch.tensor([token_ids], device=backend._device)
            model(input_ids=tokens, use_cache=False, logits_to_keep=1)
            out = kept["out"][0, position]
            d = np.asarray(direction_at(out.detach().float().cpu().numpy()), dtype=np.float32)
            objective = out.float() @ torch.from_numpy(d).to(out.device)
            (grad,) = torch.autograd.grad(objective, kept["leaf"])
    finally:
        for h in handles:
            h.remove()
    return (
        kept["leaf"][0].detach().float().cpu().numpy(),
        grad[0].float().cpu().numpy(),
    )
