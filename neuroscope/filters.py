"""Noise filters: hide always-on features and rank the rest by how surprising their activation is.

Modes (``--feature-filter``):

- ``none``: the backend's top-k by activation, untouched.
- ``frequency``: drop features whose calibration firing rate exceeds ``threshold`` (default 0.5);
  the rest keep their activation order.
- ``surprise``: rank by ``z = (activation - mean) / std``, the feature's calibration mean and standard
  deviation over the tokens where it fired.
- ``combined`` (default): frequency first, then surprise.

Surprise can only re-rank what the backend reports, so filtering modes ask it for more candidates
than ``top_k`` (:attr:`FilterPlan.candidates`). ``filtered_count`` is how many features of the
unfiltered top-k (by activation) the frequency rule hid: it says how much of the plain view was noise,
and does not depend on how many candidates were fetched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from neuroscope.calibration import CalibrationError, CalibrationStats, find_stats, load_stats
from neuroscope.errors import ConfigError

FilterMode = Literal["none", "frequency", "surprise", "combined"]
MODES: tuple[str, ...] = ("none", "frequency", "surprise", "combined")
DEFAULT_MODE: FilterMode = "combined"
DEFAULT_THRESHOLD = 0.5
# Surprise re-ranks this many times top_k candidates by activation.
SURPRISE_POOL = 4
# A feature that fired once or never has no usable spread; it gets this fraction of a typical one.
STD_FLOOR_FRACTION = 0.1


@dataclass(frozen=True)
class LayerCalibration:
    """What the filter needs of one layer's stats, in arrays indexed by feature."""

    firing_rate: np.ndarray  # float64 [width]
    mean: np.ndarray  # float64 [width], 0 where the feature never fired
    std: np.ndarray  # float64 [width], floored (see from_stats)

    @classmethod
    def from_stats(cls, stats: CalibrationStats) -> LayerCalibration:
        """Floor each std at a tenth of the median std of features that fired at least twice.

        Why: a feature seen once (or never) in calibration has std 0, and any activation would then be
        infinitely surprising. The floor keeps such features near the top without infinite scores.
        """
        acc = stats.acc
        std = acc.act_std
        spread = std[(acc.fire_count >= 2) & (std > 0)]
        floor = STD_FLOOR_FRACTION * float(np.median(spread)) if spread.size else 1.0
        return cls(
            firing_rate=np.asarray(acc.firing_rate, np.float64),
            mean=np.asarray(acc.act_mean, np.float64),
            std=np.maximum(std, max(floor, 1e-12)),
        )


@dataclass(frozen=True)
class FilteredRows:
    """The filter's verdict on the candidates of several positions (rows) of one layer.

    ``indices``/``activations`` [rows, top_k] are best first; only the first ``counts[row]`` entries
    of a row are kept (the rest are padding). ``surprise`` is None unless the mode ranks by it;
    ``filtered`` (per row) is None in mode ``none`` and for layers without calibration.
    """

    indices: np.ndarray  # int64 [rows, top_k]
    activations: np.ndarray  # float32 [rows, top_k]
    counts: np.ndarray  # int64 [rows]
    surprise: np.ndarray | None = None  # float32 [rows, top_k]
    filtered: np.ndarray | None = None  # int64 [rows]


def _firing_prefix(indices: np.ndarray, activations: np.ndarray, shown: int) -> FilteredRows:
    """No filtering: the backend's top ``shown`` by activation, firing ones (> 0) only."""
    idx, act = indices[:, :shown], activations[:, :shown]
    order = np.argsort(act <= 0, axis=1, kind="stable")  # firing first, order kept
    idx, act = np.take_along_axis(idx, order, 1), np.take_along_axis(act, order, 1)
    return FilteredRows(idx, act, (act > 0).sum(axis=1))


@dataclass(frozen=True)
class FeatureFilter:
    """One mode over per-layer calibration (see the module docstring): the configuration only.

    Immutable; :meth:`plan` binds it to a ``top_k`` and is what runs on the token path.
    """

    mode: FilterMode = "none"
    threshold: float = DEFAULT_THRESHOLD
    layers: Mapping[int, LayerCalibration] = field(default_factory=dict)
    width: int | None = None
    top_k: int | None = None  # the default of plan()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(
                f"--feature-filter must be one of {', '.join(MODES)}, not {self.mode!r}."
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(
                f"--filter-threshold is a firing rate between 0 and 1, not {self.threshold}."
            )
        if self.mode != "none" and not self.layers:
            raise ConfigError(
                f"Feature filter {self.mode!r} needs calibration stats; none were given."
            )

    @property
    def drops_frequent(self) -> bool:
        return self.mode in ("frequency", "combined")

    @property
    def ranks_by_surprise(self) -> bool:
        return self.mode in ("surprise", "combined")

    def plan(self, top_k: int | None = None) -> FilterPlan:
        """This filter returning ``top_k`` features per position (default: the filter's own)."""
        top_k = top_k if top_k is not None else self.top_k
        if top_k is None or top_k < 1:
            raise ConfigError(f"top_k must be at least 1, not {top_k}.")
        pool = top_k * SURPRISE_POOL if self.ranks_by_surprise else top_k
        if self.drops_frequent:
            # The most features any layer's frequency rule can drop; asking for that many more
            # candidates guarantees top_k survivors whenever top_k features fire.
            pool += max(
                (int((cal.firing_rate > self.threshold).sum()) for cal in self.layers.values()),
                default=0,
            )
        return FilterPlan(self, top_k, min(pool, self.width) if self.width else pool)


@dataclass(frozen=True)
class FilterPlan:
    """A :class:`FeatureFilter` bound to ``top_k``: ask the backend for ``candidates`` features per
    position, then :meth:`apply` keeps at most ``top_k`` of them. No state changes after creation."""

    filter: FeatureFilter
    top_k: int
    candidates: int

    def apply(self, layer: int, indices: np.ndarray, activations: np.ndarray) -> FilteredRows:
        """Filter and rank the candidates of every row (position) of one layer at once.

        ``indices``/``activations`` are [rows, candidates] (a single position may be 1-D). Only
        firing candidates (activation > 0) are kept. Layers without calibration pass through
        unfiltered (``filtered`` None).
        """
        indices = np.atleast_2d(np.asarray(indices))
        activations = np.atleast_2d(np.asarray(activations))
        shown, f = self.top_k, self.filter
        cal = f.layers.get(layer)
        if f.mode == "none" or cal is None:
            return _firing_prefix(indices, activations, shown)
        # Activation order first (stable: ties keep the backend's order); firing ones lead.
        order = np.argsort(-activations, axis=1, kind="stable")
        idx = np.take_along_axis(indices, order, 1)
        act = np.take_along_axis(activations, order, 1)
        keep = act > 0

        filtered = np.zeros(len(idx), np.int64)
        if f.drops_frequent:
            frequent = (cal.firing_rate[idx] > f.threshold) & keep
            filtered = frequent[:, :shown].sum(axis=1)
            keep &= ~frequent

        surprise = None
        if f.ranks_by_surprise:
            z = ((act - cal.mean[idx]) / cal.std[idx]).astype(np.float32)
            # Kept ones first, by surprise, ties by activation (lexsort: the last key is primary).
            rank = np.lexsort((-act, -np.where(keep, z, -np.inf), ~keep), axis=1)
            surprise = np.take_along_axis(z, rank, 1)[:, :shown]
        else:
            rank = np.argsort(~keep, axis=1, kind="stable")  # kept first, activation order kept
        idx = np.take_along_axis(idx, rank, 1)[:, :shown]
        act = np.take_along_axis(act, rank, 1)[:, :shown]
        counts = np.minimum(keep.sum(axis=1), shown)
        return FilteredRows(idx, act, counts, surprise, filtered)


def make_filter(
    mode: str,
    threshold: float = DEFAULT_THRESHOLD,
    stats_by_layer: Mapping[int, CalibrationStats] | None = None,
    top_k: int | None = None,
) -> FeatureFilter:
    """A filter for ``mode`` over these stats (``none`` needs none) returning ``top_k`` features."""
    stats_by_layer = stats_by_layer or {}
    widths = {stats.width for stats in stats_by_layer.values()}
    layers = {layer: LayerCalibration.from_stats(stats) for layer, stats in stats_by_layer.items()}
    return FeatureFilter(
        mode=mode,  # type: ignore[arg-type]
        threshold=threshold,
        layers=layers if mode != "none" else {},
        width=min(widths) if widths else None,
        top_k=top_k,
    )


@dataclass(frozen=True)
class SAERef:
    """The SAE hooked at a layer, as far as calibration is concerned."""

    id: str
    width: int


def load_filter(
    mode: str,
    threshold: float,
    model: str,
    saes: Mapping[int, SAERef],
    calibration_paths: Sequence[str | Path] = (),
    top_k: int | None = None,
) -> tuple[FeatureFilter, str | None]:
    """The filter to serve with, and a message to show once if it had to fall back.

    Stats come from ``calibration_paths`` (each file's header names its layer) or else from the cache
    (model + SAE + layer). Stats for another SAE are refused with an error. With no stats at all, the
    filter falls back to ``none``; with stats for only some layers, the others pass unfiltered.
    """
    if mode not in MODES:
        raise ConfigError(f"--feature-filter must be one of {', '.join(MODES)}, not {mode!r}.")
    if mode == "none":
        return make_filter("none", top_k=top_k), None
    stats_by_layer: dict[int, CalibrationStats] = {}
    for path in calibration_paths:
        stats = load_stats(path)
        if stats.layer not in saes:
            hooked = ", ".join(str(layer) for layer in sorted(saes))
            raise CalibrationError(
                f"{path} holds stats for layer {stats.layer}, but the hooked layers are {hooked}."
            )
        ref = saes[stats.layer]
        stats.check_sae(ref.id, ref.width)
        stats_by_layer[stats.layer] = stats
    for layer, ref in saes.items():
        if layer in stats_by_layer:
            continue
        found = find_stats(model, ref.id, layer)
        if found is not None:
            stats = load_stats(found)
            stats.check_sae(ref.id, ref.width, layer)
            stats_by_layer[layer] = stats
    missing = sorted(set(saes) - set(stats_by_layer))
    if not stats_by_layer:
        layers = ", ".join(str(layer) for layer in missing)
        return make_filter("none", top_k=top_k), (
            f"No calibration stats for {model} with this SAE at layer {layers}: feature filter "
            f"{mode!r} is off and raw top features are shown. Run `neuroscope calibrate run` "
            "(or pass --calibration-path) to hide always-on features."
        )
    message = None
    if missing:
        message = (
            f"No calibration stats for layer {', '.join(map(str, missing))}: its features are shown "
            f"unfiltered; feature filter {mode!r} applies to layer {', '.join(map(str, sorted(stats_by_layer)))}."
        )
    return make_filter(mode, threshold, stats_by_layer, top_k), message
