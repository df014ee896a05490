"""Hook points inside a decoder block, for SAEs that read a site other than the block's output.

Sites (neuroscope.sae.Site) name tensors by what they are, whatever a model calls its modules:

- ``attn_z``: the attention heads' outputs, concatenated: the input of ``o_proj``;
- ``attn_out``: what attention adds to the residual stream: Gemma's ``post_attention_layernorm``
  output where the block has sandwich norms, else ``o_proj``'s output;
- ``mlp_in``: the MLP's normalised input: Gemma's ``pre_feedforward_layernorm`` output, else the
  ``post_attention_layernorm`` output (Llama, Qwen, ... name their pre-MLP norm so);
- ``mlp_out``: what the MLP adds: Gemma's ``post_feedforward_layernorm`` output, else ``mlp``'s;
- ``resid_mid``: the residual stream between attention and MLP: the input of the pre-MLP norm.
"""

from __future__ import annotations

from typing import Any

import torch

from neuroscope.errors import ConfigError


def site_target(block: torch.nn.Module, site: str) -> tuple[torch.nn.Module, str]:
    """(module, "input" or "output"): where ``site`` is read in ``block``."""
    attn = getattr(block, "self_attn", None)
    sandwich = hasattr(block, "pre_feedforward_layernorm")  # Gemma 2/3: norms after attn and MLP
    found: tuple[Any, str] | None = None
    if site == "attn_z" and attn is not None:
        found = (getattr(attn, "o_proj", None), "input")
    elif site == "attn_out":
        found = (
            (block.post_attention_layernorm, "output")
            if sandwich
            else (getattr(attn, "o_proj", None), "output")
        )
    elif site == "mlp_in":
        norm = "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"
        found = (getattr(block, norm, None), "output")
    elif site == "resid_mid":
        norm = "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"
        found = (getattr(block, norm, None), "input")
    elif site == "mlp_out":
        found = (
            (block.post_feedforward_layernorm, "output")
            if sandwich and hasattr(block, "post_feedforward_layernorm")
            else (getattr(block, "mlp", None), "output")
        )
    if found is None or not isinstance(found[0], torch.nn.Module):
        raise ConfigError(
            f"Cannot hook site {site!r} in a {type(block).__name__}: it has no module for it "
            "(Neuroscope finds self_attn.o_proj, the attention and MLP norms, and mlp)."
        )
    return found


def site_width(module: torch.nn.Module, kind: str) -> int | None:
    """The size of the vectors read at a site, where the module says it (Linear, norms)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features if kind == "input" else module.out_features
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 1 else None


class SiteHook:
    """Captures the tensor at one site of one block on each forward pass (when ``capture``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.capture = False
        self.captured: torch.Tensor | None = None

    def install(self, module: torch.nn.Module) -> None:
        if self.kind == "input":
            module.register_forward_pre_hook(self._pre)
        else:
            module.register_forward_hook(self._post)

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        if self.capture:
            self.captured = args[0]

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.capture:
            self.captured = output[0] if isinstance(output, tuple) else output

    def take(self) -> torch.Tensor:
        if self.captured is None:
            raise RuntimeError("The hooked site did not run: nothing was captured.")
        captured, self.captured = self.captured, None
        return captured
