"""Residual-stream hooks for any mlx-lm decoder: wrap each block of the model's layer list.

mlx has no forward hooks, so each entry of ``model.layers`` is replaced by a ``HookedBlock`` that
calls the original block and then its ``LayerHook``. The wrapper forwards attribute reads to the
block, so model code that inspects its layers (``layer.use_sliding``, ``layer.is_sliding``) works.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from neuroscope.errors import ModelLoadError


class LayerHook:
    """What happens to one block's output: the steering vector is added, then it is captured.

    Capturing after steering means the SAE (and forward_reference) see the residual stream the
    next block reads. Plain Python state, not module parameters, so it never enters weight trees.
    ``edit`` is a request's steering, set only while one of its forward graphs is built (so nothing
    of a request outlives it); ``steering`` is the session-wide ``set_steering`` vector.
    """

    def __init__(self) -> None:
        self.steering: mx.array | None = None
        self.edit: Callable[[mx.array], mx.array] | None = None
        self.capture = False
        self.captured: mx.array | None = None

    def take(self) -> mx.array:
        """The captured output of the last forward pass (and forget it)."""
        if self.captured is None:
            raise RuntimeError("The hooked block did not run: no residual was captured.")
        captured, self.captured = self.captured, None
        return captured

    def __call__(self, hidden: mx.array) -> mx.array:
        if self.steering is not None:
            hidden = hidden + self.steering
        if self.edit is not None:
            hidden = self.edit(hidden)
        if self.capture:
            self.captured = hidden
        return hidden


class HookedBlock(nn.Module):
    def __init__(self, block: nn.Module, hook: LayerHook):
        super().__init__()
        self.block = block
        self.hook = hook

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.block(*args, **kwargs)
        if isinstance(out, tuple):  # blocks that also return auxiliary state
            return (self.hook(out[0]), *out[1:])
        return self.hook(out)

    def __getattr__(self, key: str) -> Any:
        if key in self:
            return self[key]
        if "block" not in self:  # still in __init__
            raise AttributeError(key)
        return getattr(self["block"], key)


def install_hooks(model: nn.Module) -> list[LayerHook]:
    """Wrap every block of ``model.layers`` (once) and return their hooks, by layer index."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise ModelLoadError(
            f"{type(model).__module__} has no list of decoder blocks at model.layers; "
            "Neuroscope can hook only decoder-only mlx-lm models."
        )
    for i, block in enumerate(layers):
        if not isinstance(block, HookedBlock):
            layers[i] = HookedBlock(block, LayerHook())
    if not all(isinstance(b, HookedBlock) for b in model.layers):
        # The property returned a copy: the model's forward would never see the wrappers.
        raise ModelLoadError(
            f"Cannot hook {type(model).__module__}: model.layers is not its own list."
        )
    return [block.hook for block in layers]
