"""One sequence's steering on the MLX device: the compiled plan's arrays, moved once per request.

``apply`` runs inside the block's hook, before the residual is captured, so the SAE, the next block
and the records all see the steered stream. Positions below ``start`` are left alone. Everything
stays lazy: the ops join the step's graph and are evaluated with it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import mlx.core as mx

from neuroscope.steering import AddOp, CompiledSteering, LayerSteering
from neuroscope_mlx.sae import MLXSAE


def feature_encoder(sae: MLXSAE, feature: int) -> Callable[[mx.array], mx.array]:
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
        if name != "b_dec" and isinstance(value, mx.array) and value.shape[-1] == sae.width:
            setattr(one, name, value[..., feature : feature + 1])
    one.width = 1
    return lambda x: one.encode(x)[..., 0]


class LayerOps:
    """The operations of one block, as device arrays (float32, whatever the model's dtype)."""

    def __init__(self, steering: LayerSteering, sae: MLXSAE | None):
        # (encoder of the clamped feature or None for an add, clamp value, vector)
        self.ops: list[tuple[Callable[[mx.array], mx.array] | None, float, mx.array]] = []
        for op in steering.ops:
            if isinstance(op, AddOp):
                self.ops.append((None, 0.0, mx.array(op.vector)))
            else:
                assert sae is not None, "a clamp needs the layer's SAE (SteeringPlan.check)"
                self.ops.append(
                    (feature_encoder(sae, op.feature), op.value, mx.array(op.direction))
                )
        self.pinned = mx.array(list(steering.pinned), dtype=mx.uint32)
        self.pinned_values = mx.array(list(steering.pinned.values()), dtype=mx.float32)
        self.watched = mx.array(steering.watched, dtype=mx.uint32)
        self.has_pins, self.has_watched = bool(steering.pinned), bool(steering.watched)
        mx.eval([v for _, _, v in self.ops], self.pinned, self.pinned_values, self.watched)

    def apply(self, hidden: mx.array, steered: mx.array | None) -> mx.array:
        """``hidden`` [B, T, d] with the ops applied where ``steered`` [T] (None: everywhere)."""
        x = hidden.astype(mx.float32)
        mask = None if steered is None else steered[:, None].astype(mx.float32)
        for encode, value, vector in self.ops:
            # a clamp measures its feature after the ops before it
            delta = vector if encode is None else (value - encode(x))[..., None] * vector
            x = x + (delta if mask is None else delta * mask)
        return x.astype(hidden.dtype)


class SequenceSteering:
    """Everything the hooks do for one sequence: ops per layer, and from which position."""

    def __init__(self, compiled: CompiledSteering, saes: Mapping[int, MLXSAE]):
        self.start = compiled.start
        self.layers = {layer: LayerOps(s, saes.get(layer)) for layer, s in compiled.layers.items()}

    def steered(self, first: int, length: int) -> mx.array | None:
        """Which of the positions first..first+length-1 are steered (None: all of them)."""
        if first >= self.start:
            return None
        return mx.arange(first, first + length) >= self.start

    def apply(self, layer: int, hidden: mx.array, first: int) -> mx.array:
        ops = self.layers.get(layer)
        if ops is None or not ops.ops or first + hidden.shape[1] <= self.start:
            return hidden
        return ops.apply(hidden, self.steered(first, hidden.shape[1]))

    def pin(self, layer: int, acts: mx.array, first: int) -> mx.array:
        """Feature activations [T, width] with clamped features reading their value where steered."""
        ops = self.layers.get(layer)
        if ops is None or not ops.has_pins or first + acts.shape[0] <= self.start:
            return acts
        T = acts.shape[0]
        pinned = mx.broadcast_to(ops.pinned_values, (T, ops.pinned_values.shape[0]))
        steered = self.steered(first, T)
        if steered is not None:
            pinned = mx.where(steered[:, None], pinned, acts[:, ops.pinned])
        acts = mx.array(acts)
        acts[:, ops.pinned] = pinned
        return acts

    def watched(self, layer: int) -> mx.array | None:
        ops = self.layers.get(layer)
        return None if ops is None or not ops.has_watched else ops.watched
