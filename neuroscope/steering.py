"""Steering and monitors: what a request asks to change in the residual stream, and what it watches.

A request's ``neuroscope`` object (the chat API's extension, or ``Session.generate(steering=...)``)
is parsed here into immutable dataclasses and checked against the loaded model before anything runs:

- ``FeatureSteer``: at the output of block ``layer``, ``add`` puts ``strength × W_dec[feature]`` on the
  residual; ``clamp`` makes the feature's activation ``value`` (``residual += (value − f) ×
  W_dec[feature]``, ``f`` measured after the entries before it); ``ablate`` is clamp to 0.
- ``VectorSteer``: ``strength × vector`` added at any block (``vector`` has ``hidden_size`` floats).
- ``Monitor``: watch one feature's full activation; the first time it passes ``above``, emit a
  ``monitor`` event, and with ``action="stop"`` end the generation there.

Entries apply in order. ``positions="all"`` steers every position but the first (the BOS, an
attention sink these SAEs never saw); ``"generation"`` only generated tokens.

``SteeringPlan.compile`` turns a plan into per-layer operations on plain float32 numpy arrays, which
each backend moves to its device once per request. Nothing here imports torch or mlx.

Every rejection is a ``SteeringError`` whose ``param`` names the offending field the way OpenAI's
errors do (``neuroscope.steering[2].feature``), so the chat API can answer a 400 that points at it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np

from neuroscope.errors import ConfigError

Mode = Literal["add", "clamp", "ablate"]
Positions = Literal["all", "generation"]
MonitorAction = Literal["flag", "stop"]
MonitorPhase = Literal["generation", "all"]

MODES: tuple[Mode, ...] = ("add", "clamp", "ablate")
POSITIONS: tuple[Positions, ...] = ("all", "generation")
MONITOR_ACTIONS: tuple[MonitorAction, ...] = ("flag", "stop")
MONITOR_PHASES: tuple[MonitorPhase, ...] = ("generation", "all")

MAX_ENTRIES = 64  # steering entries per request, and monitors per request
MAX_MAGNITUDE = 1e4  # |strength|, |value|, |above|: larger numbers are mistakes, not experiments

# What loads an SAE, for the error a feature entry gets when none is loaded (the CLI's wording by
# default; Session passes its own).
SAE_HINT_CLI = "start the server with --sae-layer and --sae-path (or --sae-local-path)"
SAE_HINT_PYTHON = "pass layer= and sae_path= (or sae_local_path=) to Session"


class SteeringError(ConfigError):
    """A steering or monitor request that cannot be honoured; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# -------------------------------------------------------------------------------------------------
# The request, as typed values


@dataclass(frozen=True)
class FeatureSteer:
    """Change one SAE feature at the output of block ``layer`` (which must have an SAE)."""

    layer: int
    feature: int
    mode: Mode = "add"
    strength: float = 1.0  # add: the multiple of W_dec[feature] that is added
    value: float = 0.0  # clamp: the activation the feature is set to (ablate: always 0)

    def __post_init__(self) -> None:
        _check_int(self.layer, "layer")
        _check_int(self.feature, "feature")
        if self.mode not in MODES:
            raise SteeringError(
                f"mode must be one of {', '.join(MODES)}, got {self.mode!r}.", "mode"
            )
        _check_magnitude(self.strength, "strength")
        _check_magnitude(self.value, "value")
        if self.mode == "ablate" and self.value != 0.0:
            raise SteeringError(
                "An ablate entry sets the feature to 0; it takes no value.", "value"
            )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "feature": self.feature, "mode": self.mode}
        if self.mode == "add":
            out["strength"] = self.strength
        elif self.mode == "clamp":
            out["value"] = self.value
        return out


@dataclass(frozen=True)
class VectorSteer:
    """Add ``strength × vector`` to the residual stream after block ``layer`` (any block)."""

    layer: int
    vector: tuple[float, ...] = field(repr=False)
    strength: float = 1.0

    def __post_init__(self) -> None:
        _check_int(self.layer, "layer")
        if not isinstance(self.vector, tuple):  # accept any sequence or array, store a tuple
            object.__setattr__(self, "vector", _float_tuple(self.vector, "vector"))
        _check_magnitude(self.strength, "strength")

    def to_dict(self) -> dict[str, Any]:
        """What the echo shows: the vector's size and norm, not its thousands of floats."""
        norm = float(np.linalg.norm(np.asarray(self.vector, dtype=np.float64)))
        return {
            "layer": self.layer,
            "mode": "add",
            "strength": self.strength,
            "vector_size": len(self.vector),
            "vector_norm": round(norm, 6),
        }


SteeringEntry: TypeAlias = FeatureSteer | VectorSteer


@dataclass(frozen=True)
class Monitor:
    """Watch ``feature`` at block ``layer``; act the first time its activation exceeds ``above``."""

    layer: int
    feature: int
    above: float
    action: MonitorAction = "flag"
    phase: MonitorPhase = "generation"  # "all": prompt positions too

    def __post_init__(self) -> None:
        _check_int(self.layer, "layer")
        _check_int(self.feature, "feature")
        _check_magnitude(self.above, "above")
        if self.action not in MONITOR_ACTIONS:
            raise SteeringError(f"action must be 'flag' or 'stop', got {self.action!r}.", "action")
        if self.phase not in MONITOR_PHASES:
            raise SteeringError(
                f"phase must be 'generation' or 'all', got {self.phase!r}.", "phase"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "feature": self.feature,
            "above": self.above,
            "action": self.action,
            "phase": self.phase,
        }


@dataclass(frozen=True)
class SteeringTarget:
    """What a plan is checked against: the loaded model and its SAEs."""

    hidden_size: int
    num_layers: int
    sae_widths: Mapping[int, int]  # hooked layer -> SAE width
    decoderless: frozenset[int] = frozenset()  # hooked layers whose SAE has no W_dec
    sae_hint: str = SAE_HINT_CLI  # how to load an SAE, for the error when there is none


@dataclass(frozen=True)
class MonitorEvent:
    """A monitor passed its threshold (once per monitor per request)."""

    request_id: str
    position: int
    token: str
    layer: int
    feature: int
    activation: float
    action: MonitorAction

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "position": self.position,
            "token": self.token,
            "layer": self.layer,
            "feature": self.feature,
            "activation": round(float(self.activation), 6),
            "action": self.action,
        }

    def to_json(self) -> str:
        """Compact JSON, as the feature stream's ``monitor`` event carries it."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))


# -------------------------------------------------------------------------------------------------
# Compiled form: per-layer operations on float32 arrays, what a backend applies


@dataclass(frozen=True)
class AddOp:
    """Add ``vector`` (strengths applied; consecutive adds summed) at steered positions."""

    vector: np.ndarray  # float32 [hidden]


@dataclass(frozen=True)
class ClampOp:
    """Set ``feature``'s activation to ``value``: add ``(value − f) × direction``."""

    feature: int
    value: float
    direction: np.ndarray  # float32 [hidden], the SAE's W_dec[feature]


LayerOp: TypeAlias = AddOp | ClampOp


@dataclass(frozen=True)
class LayerSteering:
    """Everything one block's hook does for one sequence."""

    ops: tuple[LayerOp, ...] = ()
    pinned: Mapping[int, float] = field(default_factory=dict)  # feature -> the value it reads
    watched: tuple[int, ...] = ()  # features whose full activation the backend reports

    @property
    def steers(self) -> bool:
        return bool(self.ops)


@dataclass(frozen=True)
class CompiledSteering:
    """A plan made concrete for one sequence: positions >= ``start`` are steered."""

    start: int
    layers: Mapping[int, LayerSteering]
    monitors: tuple[Monitor, ...] = ()

    @property
    def steers(self) -> bool:
        return any(layer.steers for layer in self.layers.values())

    def watched(self, layer: int) -> tuple[int, ...]:
        steering = self.layers.get(layer)
        return steering.watched if steering else ()


@dataclass(frozen=True)
class SteeringPlan:
    """One request's steering entries (applied in order), positions and monitors."""

    steering: tuple[SteeringEntry, ...] = ()
    positions: Positions = "all"
    monitors: tuple[Monitor, ...] = ()

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise SteeringError(
                f"positions must be 'all' or 'generation', got {self.positions!r}.", "positions"
            )
        object.__setattr__(self, "steering", tuple(self.steering))
        object.__setattr__(self, "monitors", tuple(self.monitors))

    def __bool__(self) -> bool:
        return bool(self.steering or self.monitors)

    def to_dict(self) -> dict[str, Any]:
        """The echo in a completion object: what was applied, normalised."""
        return {
            "steering": [e.to_dict() for e in self.steering],
            "positions": self.positions,
            "monitors": [m.to_dict() for m in self.monitors],
        }

    def first_steered(self, prompt_length: int) -> int:
        """The first steered position: 1 (all but the BOS) or the first generated token's."""
        return 1 if self.positions == "all" else prompt_length

    def compile(
        self, decoders: Mapping[int, np.ndarray | None], prompt_length: int
    ) -> CompiledSteering:
        """Per-layer operations; ``decoders`` maps each hooked layer to its SAE's W_dec [width, d].

        The plan must have been checked (``check``) against the same model and SAEs.
        """
        ops: dict[int, list[LayerOp]] = {}
        pinned: dict[int, dict[int, float]] = {}
        for entry in self.steering:
            layer_ops = ops.setdefault(entry.layer, [])
            layer_pins = pinned.setdefault(entry.layer, {})
            if isinstance(entry, VectorSteer):
                add = np.float32(entry.strength) * np.asarray(entry.vector, dtype=np.float32)
                _append_add(layer_ops, add)
                continue
            W_dec = decoders[entry.layer]
            assert W_dec is not None, "check() rejects feature entries on SAEs without W_dec"
            direction = np.ascontiguousarray(W_dec[entry.feature], dtype=np.float32)
            if entry.mode == "add":
                _append_add(layer_ops, np.float32(entry.strength) * direction)
                layer_pins.pop(entry.feature, None)  # an add after a clamp moves it off the pin
            else:
                value = entry.value if entry.mode == "clamp" else 0.0
                layer_ops.append(ClampOp(entry.feature, float(value), direction))
                layer_pins[entry.feature] = float(value)
        watched: dict[int, list[int]] = {}
        for monitor in self.monitors:
            features = watched.setdefault(monitor.layer, [])
            if monitor.feature not in features:
                features.append(monitor.feature)
        layers = {
            layer: LayerSteering(
                ops=tuple(ops.get(layer, ())),
                pinned=dict(pinned.get(layer, {})),
                watched=tuple(watched.get(layer, ())),
            )
            for layer in sorted(set(ops) | set(watched))
        }
        return CompiledSteering(self.first_steered(prompt_length), layers, self.monitors)

    def check(self, target: SteeringTarget, param: str = "") -> None:
        """Raise ``SteeringError`` (with ``param`` paths under ``param``) unless the loaded model
        and SAEs can carry out this plan."""
        base = f"{param}." if param else ""
        if len(self.steering) > MAX_ENTRIES:
            raise SteeringError(
                f"{len(self.steering)} steering entries is more than the limit of {MAX_ENTRIES}; "
                "combine directions into vector entries.",
                f"{base}steering",
            )
        if len(self.monitors) > MAX_ENTRIES:
            raise SteeringError(
                f"{len(self.monitors)} monitors is more than the limit of {MAX_ENTRIES}.",
                f"{base}monitors",
            )
        for i, entry in enumerate(self.steering):
            where = f"{base}steering[{i}]"
            _check_layer(entry.layer, target, f"{where}.layer")
            if isinstance(entry, VectorSteer):
                if len(entry.vector) != target.hidden_size:
                    raise SteeringError(
                        f"{where}.vector has {len(entry.vector)} numbers; this model's hidden size "
                        f"is {target.hidden_size}.",
                        f"{where}.vector",
                    )
                continue
            _check_feature(entry.layer, entry.feature, target, where, "steering entry")
            if entry.layer in target.decoderless:
                raise SteeringError(
                    f"The SAE at layer {entry.layer} has no decoder weights (W_dec) that write the "
                    "residual stream, which feature steering needs; load an SAE file that includes "
                    "them, or use a vector entry.",
                    f"{where}.feature",
                )
        for i, monitor in enumerate(self.monitors):
            where = f"{base}monitors[{i}]"
            _check_layer(monitor.layer, target, f"{where}.layer")
            _check_feature(monitor.layer, monitor.feature, target, where, "monitor")


def _append_add(ops: list[LayerOp], vector: np.ndarray) -> None:
    # Adds commute with each other but not with a clamp, so only adjacent ones are summed.
    if ops and isinstance(ops[-1], AddOp):
        ops[-1] = AddOp(ops[-1].vector + vector)
    else:
        ops.append(AddOp(vector.astype(np.float32)))


def _check_layer(layer: int, target: SteeringTarget, where: str) -> None:
    if not 0 <= layer < target.num_layers:
        raise SteeringError(
            f"{where} is {layer}, but this model has decoder blocks 0 to {target.num_layers - 1}.",
            where,
        )


def _check_feature(layer: int, feature: int, target: SteeringTarget, where: str, what: str) -> None:
    if not target.sae_widths:
        raise SteeringError(
            f"{where}: a feature {what} needs an SAE, and none is loaded; {target.sae_hint}. "
            "A vector entry needs no SAE.",
            f"{where}.layer",
        )
    if layer not in target.sae_widths:
        hooked = ", ".join(str(L) for L in sorted(target.sae_widths))
        raise SteeringError(
            f"{where}.layer is {layer}, which has no SAE; SAEs are loaded at layer(s) {hooked}. "
            "Use one of those layers, or a vector entry.",
            f"{where}.layer",
        )
    width = target.sae_widths[layer]
    if not 0 <= feature < width:
        raise SteeringError(
            f"{where}.feature is {feature}, outside the SAE at layer {layer} (features 0 to "
            f"{width - 1}).",
            f"{where}.feature",
        )


class MonitorWatch:
    """One request's monitors as generation runs: each fires at most once, at the first position
    where its feature's activation exceeds ``above``."""

    def __init__(self, compiled: CompiledSteering, request_id: str):
        self.request_id = request_id
        # (monitor, its column in LayerTopK.watched) for the monitors that have not fired yet
        self.pending = [(m, compiled.watched(m.layer).index(m.feature)) for m in compiled.monitors]

    def __bool__(self) -> bool:
        return bool(self.pending)

    def wants_prompt(self) -> bool:
        return any(m.phase == "all" for m, _ in self.pending)

    def check(
        self,
        features: Mapping[int, Any],
        first: int,
        tokens: Sequence[str],
        prompt: bool = False,
        skip: int = 0,
    ) -> list[MonitorEvent]:
        """Events for the positions ``first``, ``first + 1``, ... whose rows ``features``
        (``StepFeatures``) holds, in position order; rows before ``skip`` are not watched."""
        fired: list[tuple[int, int, MonitorEvent]] = []
        still = []
        for order, (monitor, column) in enumerate(self.pending):
            watched = features[monitor.layer].watched
            if (prompt and monitor.phase != "all") or watched is None:
                still.append((monitor, column))
                continue
            values = watched[skip:, column]
            hits = np.flatnonzero(values > monitor.above)
            if not len(hits):
                still.append((monitor, column))
                continue
            row = skip + int(hits[0])
            event = MonitorEvent(
                self.request_id, first + row, tokens[row], monitor.layer, monitor.feature,
                float(watched[row, column]), monitor.action,
            )  # fmt: skip
            fired.append((row, order, event))
        self.pending = still
        return [event for _, _, event in sorted(fired, key=lambda f: (f[0], f[1]))]


# -------------------------------------------------------------------------------------------------
# Parsing JSON-shaped values (the chat API's body, or Python dicts)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float | np.floating)) and not isinstance(
        value, bool
    )


def _check_int(value: Any, name: str) -> None:
    if not _is_int(value):
        raise SteeringError(f"{name} must be an integer, got {value!r}.", name)


def _check_magnitude(value: Any, name: str) -> None:
    if not _is_number(value):
        raise SteeringError(f"{name} must be a number, got {value!r}.", name)
    if not math.isfinite(value):
        raise SteeringError(f"{name} must be a finite number, got {value!r}.", name)
    if abs(value) > MAX_MAGNITUDE:
        raise SteeringError(
            f"{name} is {value:g}; |{name}| may be at most {MAX_MAGNITUDE:g} (Gemma Scope "
            "activations are of order 1 to 100; see docs/steering.md).",
            name,
        )


def _float_tuple(values: Any, name: str) -> tuple[float, ...]:
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.number):
            raise SteeringError(f"{name} must be a flat list of numbers.", name)
        if not np.isfinite(values).all():
            raise SteeringError(f"{name} must hold finite numbers only.", name)
        return tuple(float(v) for v in values)
    if not isinstance(values, list | tuple):
        raise SteeringError(f"{name} must be a list of numbers, got {type(values).__name__}.", name)
    for j, v in enumerate(values):
        if not _is_number(v) or not math.isfinite(v):
            raise SteeringError(f"{name}[{j}] must be a finite number, got {v!r}.", f"{name}[{j}]")
    return tuple(float(v) for v in values)


def _prefixed(error: SteeringError, where: str) -> SteeringError:
    """The same error, its ``param`` placed under ``where``."""
    if error.param and str(error).startswith(error.param):  # "strength must ..." reads on
        return SteeringError(f"{where}.{error}", f"{where}.{error.param}")
    param = f"{where}.{error.param}" if error.param else where
    return SteeringError(f"{where}: {error}", param)


FEATURE_KEYS = {"layer", "feature", "mode", "strength", "value"}
VECTOR_KEYS = {"layer", "vector", "strength", "mode"}
MONITOR_KEYS = {"layer", "feature", "above", "action", "phase"}


def _require(obj: Mapping[str, Any], key: str, where: str, example: str) -> Any:
    if key not in obj or obj[key] is None:
        raise SteeringError(f"{where}.{key} is required ({example}).", f"{where}.{key}")
    return obj[key]


def _no_unknown(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise SteeringError(
            f"{where} has unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}.",
            f"{where}.{unknown[0]}",
        )


def parse_entry(obj: Any, where: str = "steering[0]") -> SteeringEntry:
    """One steering entry from a dict (or an entry object, returned as it is)."""
    if isinstance(obj, FeatureSteer | VectorSteer):
        return obj
    if not isinstance(obj, Mapping):
        raise SteeringError(
            f"{where} must be an object like {{'layer': 20, 'feature': 4521, 'strength': 40.0}}.",
            where,
        )
    try:
        if "vector" in obj:
            _no_unknown(obj, VECTOR_KEYS, where)
            if obj.get("mode", "add") != "add":
                raise SteeringError(
                    f"{where}.mode is {obj['mode']!r}, but a vector entry can only add.",
                    f"{where}.mode",
                )
            layer = _require(obj, "layer", where, "the block whose output gets the vector")
            vector = _float_tuple(obj["vector"], f"{where}.vector")
            return VectorSteer(layer=layer, vector=vector, strength=obj.get("strength", 1.0))
        _no_unknown(obj, FEATURE_KEYS, where)
        mode = obj.get("mode", "add")
        if mode not in MODES:
            raise SteeringError(
                f"{where}.mode is {mode!r}; use one of {', '.join(MODES)} "
                "(or give a 'vector' instead of a 'feature').",
                f"{where}.mode",
            )
        layer = _require(obj, "layer", where, "the block whose SAE feature is steered")
        feature = _require(obj, "feature", where, "an SAE feature index, or give a 'vector'")
        if mode == "clamp":
            value = _require(obj, "value", where, "the activation to clamp the feature to")
        else:
            for key in ("value",) if mode == "add" else ("value", "strength"):
                if key in obj:
                    raise SteeringError(
                        f"{where}.{key} does not apply to mode {mode!r}.", f"{where}.{key}"
                    )
            value = 0.0
        if mode == "clamp" and "strength" in obj:
            raise SteeringError(
                f"{where}.strength does not apply to mode 'clamp' (it takes a value).",
                f"{where}.strength",
            )
        return FeatureSteer(
            layer=layer, feature=feature, mode=mode, strength=obj.get("strength", 1.0), value=value
        )
    except SteeringError as e:
        if e.param and e.param.startswith(where):
            raise
        raise _prefixed(e, where) from None


def parse_monitor(obj: Any, where: str = "monitors[0]") -> Monitor:
    """One monitor from a dict (or a Monitor, returned as it is)."""
    if isinstance(obj, Monitor):
        return obj
    if not isinstance(obj, Mapping):
        raise SteeringError(
            f"{where} must be an object like "
            "{'layer': 20, 'feature': 4521, 'above': 5.0, 'action': 'flag'}.",
            where,
        )
    try:
        _no_unknown(obj, MONITOR_KEYS, where)
        return Monitor(
            layer=_require(obj, "layer", where, "the block whose SAE feature is watched"),
            feature=_require(obj, "feature", where, "the SAE feature index to watch"),
            above=_require(obj, "above", where, "the activation that triggers the monitor"),
            action=obj.get("action", "flag"),
            phase=obj.get("phase", "generation"),
        )
    except SteeringError as e:
        if e.param and e.param.startswith(where):
            raise
        raise _prefixed(e, where) from None


def _parse_list(value: Any, where: str, parse: Any, what: str) -> tuple[Any, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise SteeringError(f"{where} must be a list of {what}.", where)
    if len(value) > MAX_ENTRIES:
        raise SteeringError(
            f"{where} has {len(value)} {what}; at most {MAX_ENTRIES} are allowed per request.",
            where,
        )
    return tuple(parse(item, f"{where}[{i}]") for i, item in enumerate(value))


def parse_plan(
    steering: Any = None,
    monitors: Any = None,
    positions: Any = "all",
    *,
    target: SteeringTarget | None = None,
    param: str = "",
) -> SteeringPlan:
    """A plan from Python values (dicts or entry objects); checked against ``target`` if given.

    ``param`` prefixes every error's field path (``"neuroscope"`` for the chat API).
    """
    base = f"{param}." if param else ""
    if isinstance(steering, SteeringPlan):
        plan = steering
    else:
        if positions is None:
            positions = "all"
        if positions not in POSITIONS:
            raise SteeringError(
                f"{base}positions must be 'all' or 'generation', got {positions!r}.",
                f"{base}positions",
            )
        plan = SteeringPlan(
            steering=_parse_list(steering, f"{base}steering", parse_entry, "steering entries"),
            positions=positions,
            monitors=_parse_list(monitors, f"{base}monitors", parse_monitor, "monitors"),
        )
    if target is not None:
        plan.check(target, param)
    return plan


def parse_neuroscope(body: Any, target: SteeringTarget, param: str = "neuroscope") -> SteeringPlan:
    """The steering part of a chat request's ``neuroscope`` object (other keys are left alone)."""
    if body is None:
        return SteeringPlan()
    if not isinstance(body, Mapping):
        raise SteeringError(
            f"{param} must be an object like {{'steering': [...], 'monitors': [...]}}.", param
        )
    return parse_plan(
        body.get("steering"),
        body.get("monitors"),
        body.get("positions", "all"),
        target=target,
        param=param,
    )


__all__ = [
    "AddOp",
    "ClampOp",
    "CompiledSteering",
    "FeatureSteer",
    "LayerSteering",
    "Monitor",
    "MonitorEvent",
    "MonitorWatch",
    "SteeringError",
    "SteeringPlan",
    "SteeringTarget",
    "VectorSteer",
    "parse_entry",
    "parse_monitor",
    "parse_neuroscope",
    "parse_plan",
]
