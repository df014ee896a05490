"""Hook points inside a decoder block, for SAEs that read a site other than the block's output.

mlx has no forward hooks: the module at a site is replaced by a ``SiteModule`` that calls it and
records its input or output. The sites are those of ``neuroscope_torch.sites`` (the same module
names: mlx-lm keeps Hugging Face's), found the same way:

- ``attn_z``: the input of ``self_attn.o_proj`` (the heads' outputs, concatenated);
- ``attn_out``: Gemma's ``post_attention_layernorm`` output (sandwich norms), else ``o_proj``'s;
- ``mlp_in``: Gemma's ``pre_feedforward_layernorm`` output, else ``post_attention_layernorm``'s;
- ``mlp_out``: Gemma's ``post_feedforward_layernorm`` output, else ``mlp``'s;
- ``resid_mid``: the input of the pre-MLP norm.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from neuroscope.errors import ConfigError
from neuroscope_mlx.hooks import HookedBlock


class SiteState:
    """Plain Python state (never part of the weight tree): capture on/off and the last capture."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.capture = False
        self.captured: mx.array | None = None

    def take(self) -> mx.array:
        if self.captured is None:
            raise RuntimeError("The hooked site did not run: nothing was captured.")
        captured, self.captured = self.captured, None
        return captured


class SiteModule(nn.Module):
    def __init__(self, inner: nn.Module, state: SiteState):
        super().__init__()
        self.inner = inner
        self.site_state = state

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> Any:
        if self.site_state.capture and self.site_state.kind == "input":
            self.site_state.captured = x
        out = self.inner(x, *args, **kwargs)
        if self.site_state.capture and self.site_state.kind == "output":
            self.site_state.captured = out[0] if isinstance(out, tuple) else out
        return out

    def __getattr__(self, key: str) -> Any:
        if key in self:
            return self[key]
        if "inner" not in self:  # still in __init__
            raise AttributeError(key)
        return getattr(self["inner"], key)


def _where(block: nn.Module, site: str) -> tuple[nn.Module, str, str]:
    """(parent module, attribute name, "input" or "output") of ``site`` in ``block``."""
    if isinstance(block, HookedBlock):  # the residual hook's wrapper: look inside it
        block = block["block"]
    attn = getattr(block, "self_attn", None)
    sandwich = "pre_feedforward_layernorm" in block
    pre_mlp_norm = "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"
    table = {
        "attn_z": (attn, "o_proj", "input"),
        "attn_out": (block, "post_attention_layernorm", "output")
        if sandwich
        else (attn, "o_proj", "output"),
        "mlp_in": (block, pre_mlp_norm, "output"),
        "resid_mid": (block, pre_mlp_norm, "input"),
        "mlp_out": (block, "post_feedforward_layernorm", "output")
        if sandwich
        else (block, "mlp", "output"),
    }
    parent, name, kind = table.get(site, (None, "", ""))
    if parent is None or name not in parent:
        raise ConfigError(
            f"Cannot hook site {site!r} in a {type(block).__name__}: it has no module for it "
            "(Neuroscope finds self_attn.o_proj, the attention and MLP norms, and mlp)."
        )
    return parent, name, kind


def install_site(block: nn.Module, site: str) -> SiteState:
    """Wrap the module at ``site`` of ``block`` (once) and return its state."""
    parent, name, kind = _where(block, site)
    current = parent[name]
    if isinstance(current, SiteModule):
        if current.site_state.kind == kind:
            return current.site_state
        raise ConfigError(f"Site {site!r} clashes with another site on the same module.")
    state = SiteState(kind)
    setattr(parent, name, SiteModule(current, state))
    return state


def site_width(block: nn.Module, site: str) -> int | None:
    """The size of the vectors at ``site`` where the module says it (a Linear's weight)."""
    parent, name, kind = _where(block, site)
    module = parent[name]
    module = module.inner if isinstance(module, SiteModule) else module
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and weight is not None:
        return int(weight.shape[1] if kind == "input" else weight.shape[0])
    return None
