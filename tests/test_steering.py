"""Steering and monitors: the request's shape, then the semantics on both backends against
transformers with a forward hook that adds the same vector (an independent reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuroscope.steering import (
    MAX_ENTRIES,
    AddOp,
    ClampOp,
    FeatureSteer,
    Monitor,
    SteeringError,
    SteeringPlan,
    SteeringTarget,
    VectorSteer,
    parse_neuroscope,
    parse_plan,
)

TARGET = SteeringTarget(hidden_size=8, num_layers=4, sae_widths={2: 16})


def rejected(body: object, target: SteeringTarget = TARGET) -> SteeringError:
    with pytest.raises(SteeringError) as info:
        parse_neuroscope(body, target)
    return info.value


# -------------------------------------------------------------------------------------------------
# The request's shape


def test_the_issue_example_parses_in_order():
    plan = parse_neuroscope(
        {
            "steering": [
                {"layer": 2, "feature": 5, "strength": 40.0},
                {"layer": 2, "feature": 7, "mode": "clamp", "value": 8.0},
                {"layer": 2, "feature": 9, "mode": "ablate"},
                {"layer": 1, "vector": [0.5] * 8, "strength": 2.0},
            ],
            "positions": "generation",
            "monitors": [{"layer": 2, "feature": 5, "above": 5.0, "action": "stop"}],
        },
        TARGET,
    )
    assert plan.steering == (
        FeatureSteer(2, 5, "add", strength=40.0),
        FeatureSteer(2, 7, "clamp", value=8.0),
        FeatureSteer(2, 9, "ablate"),
        VectorSteer(1, (0.5,) * 8, strength=2.0),
    )
    assert plan.positions == "generation"
    assert plan.monitors == (Monitor(2, 5, 5.0, "stop", "generation"),)
    echo = plan.to_dict()
    assert echo["steering"][0] == {"layer": 2, "feature": 5, "mode": "add", "strength": 40.0}
    assert echo["steering"][2] == {"layer": 2, "feature": 9, "mode": "ablate"}
    assert echo["steering"][3]["vector_size"] == 8
    assert math.isclose(echo["steering"][3]["vector_norm"], 0.5 * math.sqrt(8), rel_tol=1e-6)


def test_defaults():
    plan = parse_neuroscope({"steering": [{"layer": 2, "feature": 1}]}, TARGET)
    assert plan.steering == (FeatureSteer(2, 1, "add", strength=1.0),)
    assert plan.positions == "all"
    assert not parse_neuroscope({}, TARGET)
    assert not parse_neuroscope(None, TARGET)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"steering": [{"layer": 2, "feature": 1, "mode": "boost"}]}, "steering[0].mode", "boost"),
        ({"steering": [{}, {}, {"layer": 2, "feature": 16}]}, "steering[0].layer", "required"),
        (
            {"steering": [{"layer": 2, "feature": 1}, {"layer": 2, "feature": 1}, {"layer": 2, "feature": 16}]},
            "steering[2].feature",
            "0 to 15",
        ),
        ({"steering": [{"layer": 2, "feature": -1}]}, "steering[0].feature", "outside"),
        ({"steering": [{"layer": 3, "feature": 1}]}, "steering[0].layer", "no SAE"),
        ({"steering": [{"layer": 9, "vector": [0.0] * 8}]}, "steering[0].layer", "0 to 3"),
        ({"steering": [{"layer": 1, "vector": [0.0] * 7}]}, "steering[0].vector", "hidden size"),
        ({"steering": [{"layer": 1, "vector": [0.0, "x"]}]}, "steering[0].vector[1]", "finite"),
        ({"steering": [{"layer": 2, "feature": 1, "strength": 1e5}]}, "steering[0].strength", "at most 10000"),
        ({"steering": [{"layer": 2, "feature": 1, "strength": -1e4 - 1}]}, "steering[0].strength", "at most 10000"),
        ({"steering": [{"layer": 2, "feature": 1, "strength": float("nan")}]}, "steering[0].strength", "finite"),
        ({"steering": [{"layer": 2, "feature": 1, "strength": float("inf")}]}, "steering[0].strength", "finite"),
        ({"steering": [{"layer": 2, "feature": 1, "strength": "40"}]}, "steering[0].strength", "number"),
        ({"steering": [{"layer": 2, "feature": 1, "strength": True}]}, "steering[0].strength", "number"),
        ({"steering": [{"layer": 2.0, "feature": 1}]}, "steering[0].layer", "integer"),
        ({"steering": [{"layer": 2, "feature": 1, "mode": "clamp"}]}, "steering[0].value", "required"),
        ({"steering": [{"layer": 2, "feature": 1, "mode": "ablate", "value": 3}]}, "steering[0].value", "ablate"),
        ({"steering": [{"layer": 2, "feature": 1, "strenght": 3}]}, "steering[0].strenght", "unknown"),
        ({"steering": [{"layer": 1, "vector": [0.0] * 8, "mode": "clamp"}]}, "steering[0].mode", "vector"),
        ({"steering": [{"layer": 2, "feature": 1}] * (MAX_ENTRIES + 1)}, "steering", "64"),
        ({"steering": {"layer": 2, "feature": 1}}, "steering", "list"),
        ({"steering": ["x"]}, "steering[0]", "object"),
        ({"positions": "prompt"}, "positions", "generation"),
        ({"monitors": [{"layer": 2, "feature": 1, "above": 1, "action": "halt"}]}, "monitors[0].action", "flag"),
        ({"monitors": [{"layer": 2, "feature": 1}]}, "monitors[0].above", "required"),
        ({"monitors": [{"layer": 2, "feature": 99, "above": 1}]}, "monitors[0].feature", "outside"),
        ({"monitors": [{"layer": 1, "feature": 1, "above": 1}]}, "monitors[0].layer", "no SAE"),
        ({"monitors": [{"layer": 2, "feature": 1, "above": 1, "phase": "prompt"}]}, "monitors[0].phase", "all"),
        ({"monitors": [{"layer": 2, "feature": 1, "above": 1}] * (MAX_ENTRIES + 1)}, "monitors", "64"),
        ([], "", "object"),
    ],
)  # fmt: skip
def test_bad_input_names_its_field(body, param, words):
    error = rejected(body)
    assert error.param == ("neuroscope." + param if param else "neuroscope"), (error.param, error)
    assert words in str(error), str(error)


def test_no_sae_loaded_says_which_option_loads_one():
    bare = SteeringTarget(hidden_size=8, num_layers=4, sae_widths={})
    error = rejected({"steering": [{"layer": 2, "feature": 1}]}, bare)
    assert "--sae-layer" in str(error) and error.param == "neuroscope.steering[0].layer"
    # a vector needs no SAE
    assert parse_neuroscope({"steering": [{"layer": 2, "vector": [1.0] * 8}]}, bare)


def test_a_sae_without_decoder_cannot_steer_features():
    target = SteeringTarget(8, 4, {2: 16}, decoderless=frozenset({2}))
    assert "W_dec" in str(rejected({"steering": [{"layer": 2, "feature": 1}]}, target))
    # but it can still be monitored
    assert parse_neuroscope({"monitors": [{"layer": 2, "feature": 1, "above": 0.5}]}, target)


def test_python_values_and_paths_without_prefix():
    plan = parse_plan(
        [FeatureSteer(2, 3, "clamp", value=2.0), {"layer": 1, "vector": np.ones(8)}],
        [Monitor(2, 3, 1.0)],
        target=TARGET,
    )
    assert isinstance(plan.steering[1], VectorSteer) and plan.steering[1].vector == (1.0,) * 8
    with pytest.raises(SteeringError) as info:
        parse_plan([{"layer": 2, "feature": 99}], target=TARGET)
    assert info.value.param == "steering[0].feature"
    with pytest.raises(SteeringError):
        FeatureSteer(2, 3, "boost")  # type: ignore[arg-type]
    with pytest.raises(SteeringError):
        VectorSteer(1, [0.0, float("nan")])  # type: ignore[arg-type]


def test_compile_folds_adjacent_adds_and_pins_clamps():
    W_dec = np.arange(16 * 8, dtype=np.float32).reshape(16, 8) / 100
    plan = parse_plan(
        [
            {"layer": 2, "feature": 1, "strength": 2.0},
            {"layer": 2, "vector": [1.0] * 8, "strength": 0.5},
            {"layer": 2, "feature": 4, "mode": "clamp", "value": 3.0},
            {"layer": 2, "feature": 5, "mode": "ablate"},
            {"layer": 2, "feature": 6, "mode": "clamp", "value": 1.0},
            {"layer": 2, "feature": 6, "strength": 1.0},  # an add after its clamp: no longer pinned
        ],
        [{"layer": 2, "feature": 9, "above": 1.0}, {"layer": 2, "feature": 9, "above": 2.0}],
        positions="generation",
        target=TARGET,
    )
    compiled = plan.compile({2: W_dec}, prompt_length=11)
    assert compiled.start == 11
    ops = compiled.layers[2].ops
    assert [type(op) for op in ops] == [AddOp, ClampOp, ClampOp, ClampOp, AddOp]
    np.testing.assert_allclose(ops[0].vector, 2.0 * W_dec[1] + 0.5)
    assert (ops[1].feature, ops[1].value) == (4, 3.0)
    np.testing.assert_array_equal(ops[1].direction, W_dec[4])
    assert (ops[2].feature, ops[2].value) == (5, 0.0)
    assert dict(compiled.layers[2].pinned) == {4: 3.0, 5: 0.0}
    assert compiled.layers[2].watched == (9,)
    assert SteeringPlan(positions="all").compile({}, 11).start == 1
