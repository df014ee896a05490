"""One sequence's steering on the torch device: the compiled plan's arrays, moved once per request.

``apply`` runs inside the block's forward hook, before the residual is captured, so the SAE, the
next block and the records all see the steered stream. Positions below ``start`` are left alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch

from neuroscope.steering import AddOp, CompiledSteering, LayerSteering
from neuroscope_torch.sae import TorchSAE


def feature_encoder(sae: TorchSAE, feature: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function giving one feature's activation [...] of residuals [..., d] by the SAE's own
    ``encode``: on a copy of the SAE cut down to that feature (every architecture but top-k encodes
    each feature independently); a top-k SAE's activation depends on all features, so it is
    encoded in full.
    """
    if sae.architecture == "topk":
        return lambda x: sae.encode(x)[..., feature]
    one = copy.copy(sae)
    for name, value in vars(sae).items():
        # per-feature parameters end in the width axis (W_enc [d, width], b_enc, threshold, ...)
        if name != "b_dec" and isinstance(value, torch.Tensor) and value.shape[-1] == sae.width:
            setattr(one, name, value[..., feature : feature + 1])
    one.width = 1
    return lambda x: one.encode(x)[..., 0]


class LayerOps:
    """The operations of one block, as device tensors (float32: precision, whatever the model's)."""

    def __init__(self, steering: LayerSteering, sae: TorchSAE | None, device: torch.device):
        def put(a) -> torch.Tensor:
            return torch.as_tensor(a, dtype=torch.float32, device=device)

        # (encoder of the clamped feature or None for an add, clamp value, vector)
        self.ops: list[
            tuple[Callable[[torch.Tensor], torch.Tensor] | None, float, torch.Tensor]
        ] = []
        for op in steering.ops:
            if isinstance(op, AddOp):
                self.ops.append((None, 0.0, put(op.vector)))
            else:
                assert sae is not None, "a clamp needs the layer's SAE (SteeringPlan.check)"
                self.ops.append((feature_encoder(sae, op.feature), op.value, put(op.direction)))
        self.pinned = torch.tensor(list(steering.pinned), dtype=torch.long, device=device)
        self.pinned_values = put(list(steering.pinned.values()))
        self.watched = torch.tensor(steering.watched, dtype=torch.long, device=device)

    def apply(self, hidden: torch.Tensor, steered: torch.Tensor | None) -> torch.Tensor:
        """``hidden`` [B, T, d] with the ops applied where ``steered`` [T] (None: everywhere)."""
        x = hidden.float()
        mask = None if steered is None else steered[:, None].float()
        for encode, value, vector in self.ops:
            # a clamp measures its feature after the ops before it
            delta = vector if encode is None else (value - encode(x))[..., None] * vector
            x = x + (delta if mask is None else delta * mask)
        return x.to(hidden.dtype)


class SequenceSteering:
    """Everything the hooks do for one sequence: ops per layer, and from which position."""

    def __init__(
        self, compiled: CompiledSteering, saes: Mapping[int, TorchSAE], device: torch.device
    ):
        self.start = compiled.start
        self.layers = {
            layer: LayerOps(s, saes.get(layer), device) for layer, s in compiled.layers.items()
        }

    def steered(self, first: int, length: int, device: torch.device) -> torch.Tensor | None:
        """Which of the positions first..first+length-1 are steered (None: all of them)."""
        if first >= self.start:
            return None
        return torch.arange(first, first + length, device=device) >= self.start

    def apply(self, layer: int, hidden: torch.Tensor, first: int) -> torch.Tensor:
        ops = self.layers.get(layer)
        if ops is None or not ops.ops or first + hidden.shape[1] <= self.start:
            return hidden
        return ops.apply(hidden, self.steered(first, hidden.shape[1], hidden.device))

    def pin(self, layer: int, acts: torch.Tensor, first: int) -> torch.Tensor:
        """Feature activations [T, width] with clamped features reading their value where steered."""
        ops = self.layers.get(layer)
        if ops is None or not len(ops.pinned) or first + acts.shape[0] <= self.start:
            return acts
        steered = self.steered(first, acts.shape[0], acts.device)
        pinned = ops.pinned_values.expand(acts.shape[0], -1)
        if steered is not None:
            pinned = torch.where(steered[:, None], pinned, acts[:, ops.pinned])
        acts = acts.clone()
        acts[:, ops.pinned] = pinned
        return acts

    def watched(self, layer: int) -> torch.Tensor | None:
        ops = self.layers.get(layer)
        return None if ops is None or not len(ops.watched) else ops.watched
