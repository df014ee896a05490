"""neuroscope.Session end to end on the tiny model (torch backend)."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_LAYER, requires_torch

from neuroscope import Session, TokenFeatures
from neuroscope.errors import BackendUnavailable, ConfigError, SAEError

pytestmark = requires_torch


@pytest.fixture(scope="module")
def session(tiny_model, tiny_sae):
    with Session(
        model=str(tiny_model),
        sae_local_path=str(tiny_sae["npz"]),
        layer=TINY_LAYER,
        backend="torch",
        top_k=5,
    ) as s:
        yield s


def test_generate_yields_prompt_then_generation_records_in_order(session):
    gen = session.generate("What is the capital of France?", max_tokens=8, temperature=0.0)
    records = list(gen)
    prompt = [r for r in records if r.phase == "prompt"]
    generated = [r for r in records if r.phase == "generation"]
    assert [r.position for r in records] == list(range(1, len(records) + 1)), (
        "BOS is skipped; no gaps"
    )
    assert records[: len(prompt)] == prompt
    assert gen.prompt_tokens == len(prompt) + 1 and gen.completion_tokens == len(generated) == 8
    assert gen.finish_reason == "length"
    assert [r.token_index for r in generated] == list(range(8))
    assert all(r.token_index is None for r in prompt)
    assert "".join(r.token for r in generated) == gen.text
    # each record names the token that follows it
    for a, b in zip(records, records[1:], strict=False):
        assert a.next_token == b.token
    assert generated[-1].next_token is None
    for r in records:
        assert 0 < len(r.top_features) <= 5
        acts = [f.activation for f in r.top_features]
        assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
        assert r.layer == TINY_LAYER and r.sae.endswith("params.npz")


def test_same_seed_same_reply_and_records_serialise(session):
    a = session.generate("Tell me a story", max_tokens=6, temperature=1.0, seed=11).run()
    b = session.generate("Tell me a story", max_tokens=6, temperature=1.0, seed=11).run()
    assert a.text == b.text
    rec = a.records[-1]
    wire = json.loads(rec.to_json())
    assert set(wire) >= {
        "request_id",
        "token_index",
        "position",
        "phase",
        "token",
        "token_id",
        "next_token",
        "layer",
        "sae",
        "top_features",
    }
    assert wire["top_features"][0]["label"] == f"feature_{wire['top_features'][0]['index']}"
    assert TokenFeatures.from_dict(wire).to_dict() == wire


def test_phase_filter_and_messages(session):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello!"}]},
    ]
    gen = session.generate(messages, max_tokens=3, temperature=0.0, phase="generation")
    records = list(gen)
    assert {r.phase for r in records} == {"generation"} and len(records) == 3
    # Gemma has no system role: the system text was folded into the user turn
    ids = session.encode(messages)
    assert "Be brief.\n\nHello!" in session.tokenizer.tokenizer.decode(ids)


def test_stop_string_cuts_the_reply(session):
    full = session.generate("What is the capital of France?", max_tokens=12, temperature=0.0).run()
    stop = full.text[3:6]
    assert stop.strip(), "pick a stop string inside the reply"
    cut = session.generate(
        "What is the capital of France?", max_tokens=12, temperature=0.0, stop=[stop]
    ).run()
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_trace_returns_prompt_records_only(session):
    records = session.trace("The capital of France is Paris.")
    assert records and all(r.phase == "prompt" for r in records)
    assert "".join(r.token for r in records) == "The capital of France is Paris."
    assert records[-1].next_token is None


def test_several_layers_at_once(tiny_model, tiny_sae):
    with Session(
        model=str(tiny_model),
        sae_local_path=[str(tiny_sae["npz"]), str(tiny_sae["saelens"])],
        layer=[1, 2],  # the SAELens folder says blocks.2.hook_resid_post
        backend="torch",
        top_k=3,
    ) as s:
        records = list(s.generate("Hello", max_tokens=2, temperature=0.0))
    by_position = {}
    for r in records:
        by_position.setdefault(r.position, []).append(r.layer)
    assert all(layers == [1, 2] for layers in by_position.values())


def test_errors_say_what_to_do(tiny_model, tiny_sae, tmp_path):
    with pytest.raises(ConfigError, match="out of range.*4 decoder blocks"):
        Session(
            model=str(tiny_model), sae_local_path=str(tiny_sae["npz"]), layer=7, backend="torch"
        )
    with pytest.raises(ConfigError, match="Unknown backend 'jax'"):
        Session(model=str(tiny_model), sae_local_path=str(tiny_sae["npz"]), layer=1, backend="jax")
    import numpy as np

    from neuroscope.synthetic import random_sae_arrays

    wide = tmp_path / "wrong.npz"
    np.savez(wide, **random_sae_arrays(32, 16))
    with pytest.raises(SAEError, match="size 32.*hidden size 64"):
        Session(model=str(tiny_model), sae_local_path=str(wide), layer=1, backend="torch")
    assert issubclass(BackendUnavailable, ImportError)


def test_bad_generate_arguments(session):
    with pytest.raises(ConfigError, match="max_tokens"):
        session.generate("hi", max_tokens=0).run()
    with pytest.raises(ConfigError, match="temperature"):
        session.generate("hi", temperature=-1).run()
    with pytest.raises(ConfigError, match="role"):
        session.generate([{"role": "wizard", "content": "hi"}]).run()
    with pytest.raises(ConfigError, match="context"):
        session.generate("word " * 300).run()
