"""Continuous batching (neuroscope.batching, torch): every request's reply, records and monitor
events under batching equal the same request served alone (greedy and seeded sampling, float32),
with prompts of different lengths (longer and shorter than the tiny Gemma 2's sliding window of 8),
one joining mid-way and one cancelled mid-way; a steered request steers only itself."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from batching_support import assert_batched_equals_alone
from conftest import LONG_PROMPT, TINY_LAYER, requires_torch

from neuroscope import Session
from neuroscope.backend import SamplingParams
from neuroscope.batching import BatchScheduler, OneAtATime
from neuroscope.generation import TextDelta
from neuroscope.records import GenerationComplete, TokenFeatures
from neuroscope.sae import load_local
from neuroscope.steering import MonitorEvent

pytestmark = requires_torch

PROMPTS = ["Hi", LONG_PROMPT, "What is the capital of France?", "Why is the sky blue?"]
STEER = [{"layer": TINY_LAYER, "feature": 3, "strength": 30.0}]


@pytest.fixture(scope="module")
def session(tiny_model, tiny_sae):
    with Session(
        model=str(tiny_model), sae_local_path=str(tiny_sae["npz"]), layer=TINY_LAYER,
        backend="torch", top_k=5, dtype="float32",
    ) as s:  # fmt: skip
        yield s


def anon(record: TokenFeatures) -> TokenFeatures:
    return msgspec.structs.replace(record, request_id="")


def split(events):
    """(text, records without request ids, monitor events, finish reason)."""
    text, records, monitors, finish = "", [], [], None
    for e in events:
        if isinstance(e, TextDelta):
            text += e.text
        elif isinstance(e, TokenFeatures):
            records.append(anon(e))
        elif isinstance(e, MonitorEvent):  # activations are compared in the records
            monitors.append((e.position, e.token, e.layer, e.feature, e.action))
        elif isinstance(e, GenerationComplete):
            finish = e.finish_reason
    return text, records, monitors, finish


def assert_same_records(batched, alone):
    """Same positions, tokens and features; activations within 1e-3 relative."""
    assert len(batched) == len(alone)
    worst = 0.0
    for b, a in zip(batched, alone, strict=True):
        assert (b.position, b.phase, b.token_id, b.token, b.next_token) == (
            a.position, a.phase, a.token_id, a.token, a.next_token,
        )  # fmt: skip
        assert [f.index for f in b.top_features] == [f.index for f in a.top_features]
        acts_b = np.array([f.activation for f in b.top_features])
        acts_a = np.array([f.activation for f in a.top_features])
        np.testing.assert_allclose(acts_b, acts_a, rtol=1e-3, atol=1e-6)
        if len(acts_a):
            worst = max(worst, float(np.max(np.abs(acts_b - acts_a) / np.abs(acts_a))))
    return worst


def alone(session, prompt, **kw):
    return split(session.events(session.encode(prompt), **kw))


@pytest.mark.parametrize("chunk", [4, 512])
def test_backend_batched_steps_equal_alone_on_two_layers(tiny_model, tiny_sae, chunk) -> None:
    """The torch backend itself: SAEs on a full (1) and a sliding (3) layer; prompts of 5, 23, 14
    and 40 tokens (window 8), two joining at step 2 prefilled 4 tokens per step (or at once), one
    seeded sampled; the second leaves at step 9."""
    from neuroscope_torch import TorchBackend

    b = TorchBackend.load(tiny_model, dtype="float32")
    sae = load_local(tiny_sae["npz"])
    b.set_saes({1: sae, 3: sae}, top_k=8)
    greedy, seeded = SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=7)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 500, n).tolist() for n in (5, 23, 14, 40)]
    worst = assert_batched_equals_alone(
        b, prompts, [greedy, greedy, seeded, greedy], (1, 3), chunk=chunk
    )
    print(f"\nbatched vs alone (chunk {chunk}), worst relative activation difference: {worst:.1e}")


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunked_prefill_equals_one_prefill(session, chunk) -> None:
    """A 40-token prompt fed in chunks (shorter than, and as long as, the sliding window of 8)
    gives the prompt features and the logits of one ``Backend.prefill``, steered from position 20
    (a clamp of a feature mid-prompt) too, and its decodes continue alike."""
    b = session.backend
    greedy = SamplingParams(temperature=0)
    ids = np.random.default_rng(1).integers(10, 500, 40).tolist()
    plan = session.steering_plan(STEER, None, "all")
    for steering in (None, session._compile(plan, 20)):
        want = b.prefill(ids, greedy, steering)
        want_logits = b.last_logits
        want_tokens = [b.sample()]
        want_steps = []
        for _ in range(3):
            want_steps.append(b.decode(want_tokens[-1]))
            want_tokens.append(b.sample())

        seq = b.start(ids, greedy, steering)
        got, fed = None, 0
        while got is None:
            got = b.prefill_chunk(seq, chunk)
            fed += 1
        assert fed == -(-len(ids) // chunk)
        np.testing.assert_allclose(np.array(seq.logits), want_logits, rtol=1e-4, atol=1e-5)
        tokens = [b.sample_sequence(seq)]
        steps = []
        for _ in range(3):
            steps.append(b.decode_batch([seq], [tokens[-1]])[0])
            tokens.append(b.sample_sequence(seq))
        assert tokens == want_tokens
        for g, w in zip([got, *steps], [want, *want_steps], strict=True):
            layer = TINY_LAYER
            assert g[layer].indices.shape == w[layer].indices.shape
            np.testing.assert_array_equal(g[layer].indices, w[layer].indices)
            np.testing.assert_allclose(g[layer].activations, w[layer].activations, rtol=1e-4)
        assert got[TINY_LAYER].indices.shape[0] == len(ids)


def test_one_at_a_time_prefills_the_whole_prompt_at_once(session) -> None:
    """A backend that cannot batch: its one "chunk" is the whole prompt, whatever is asked."""
    ids = session.encode(PROMPTS[1])
    one = OneAtATime(session.backend)
    seq = one.start(ids, SamplingParams(temperature=0))
    got = one.prefill_chunk(seq, 2)
    assert got is not None and got[TINY_LAYER].indices.shape[0] == len(ids)
    want = session.backend.prefill(ids, SamplingParams(temperature=0))
    np.testing.assert_array_equal(got[TINY_LAYER].indices, want[TINY_LAYER].indices)


def test_a_long_prompt_is_prefilled_between_the_running_decodes(session) -> None:
    """Two requests decode; a long prompt (many chunks of 8) joins: every step feeds one chunk of
    it AND decodes the other two, so they do not wait for its whole prompt; every reply and
    record equals its request served alone."""
    kw = {"max_tokens": 24, "temperature": 0.0}
    long_prompt = LONG_PROMPT + " " + LONG_PROMPT
    batch = BatchScheduler(session.backend, max_batch=3, prefill_chunk=8)
    first = session.events(session.encode(PROMPTS[0]), batch=batch, **kw)
    second = session.events(session.encode(PROMPTS[2]), batch=batch, **kw)
    while batch.prefilling or batch.waiting or batch.steps_run < 2:
        batch.step()
    assert len(batch.running) == 2
    before = batch.steps_run
    long_ids = session.encode(long_prompt)
    chunks = -(-len(long_ids) // 8)
    assert chunks >= 6
    late = session.events(long_ids, batch=batch, **{**kw, "max_tokens": 6})
    log = []  # per step: (decode steps run, chunks fed, widest decode so far, still prefilling)
    while True:
        batch.step()
        log.append((batch.steps_run, batch.chunks_run, len(batch.running), len(batch.prefilling)))
        if not batch.prefilling:
            break
    # one chunk of the long prompt per step, and a decode of the two others in each of them
    assert len(log) == chunks
    assert [s for s, *_ in log] == list(range(before + 1, before + 1 + chunks))
    assert [c for _, c, *_ in log] == list(range(log[0][1], log[0][1] + chunks))
    assert all(prefilling == 1 for *_, prefilling in log[:-1])
    assert log[-1][2] == 3  # after its last chunk it decodes with them, in the same step
    assert batch.widest == 3
    results = [split(e) for e in (first, second, late)]
    for (text, records, _, finish), prompt, n in zip(
        results, [PROMPTS[0], PROMPTS[2], long_prompt], [24, 24, 6], strict=True
    ):
        want = alone(session, prompt, **{**kw, "max_tokens": n})
        assert (text, finish) == (want[0], want[3])
        assert_same_records(records, want[1])
    assert batch.idle


def test_generate_many_equals_generate_alone(session) -> None:
    want = [session.generate(p, max_tokens=10, temperature=0.0).run() for p in PROMPTS]
    got = session.generate_many(PROMPTS, max_tokens=10, temperature=0.0, max_batch=3)
    for g in reversed(got):  # read in any order: each read advances all of them
        g.run()
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        assert (g.text, g.finish_reason, g.completion_tokens) == (w.text, w.finish_reason, 10)
        worst = max(worst, assert_same_records(
            [anon(r) for r in g.records], [anon(r) for r in w.records]
        ))  # fmt: skip
    assert len({g.records[0].request_id for g in got}) == len(PROMPTS)
    print(f"\ngenerate_many vs generate: worst relative activation difference {worst:.1e}")


def test_wide_steps_on_packed_weights_equal_alone(session) -> None:
    """Six requests decode together: on the CPU with MKL such steps multiply by MKL-packed
    weights (``PackedLinears``, 5-8 rows); replies and records still equal each alone."""
    prompts = [*PROMPTS, "Name three rivers.", "Count to five."]
    want = [session.generate(p, max_tokens=8, temperature=0.0).run() for p in prompts]
    got = session.generate_many(prompts, max_tokens=8, temperature=0.0, max_batch=6)
    for g in got:
        g.run()
    batch = session.backend._batch
    if not batch.packed.forwards:
        pytest.skip("this torch has no MKL packed products (or the device is not the CPU)")
    assert batch.packed.steps > 0
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        assert (g.text, g.finish_reason) == (w.text, w.finish_reason)
        worst = max(worst, assert_same_records(
            [anon(r) for r in g.records], [anon(r) for r in w.records]
        ))  # fmt: skip
    print(f"\npacked steps vs alone: worst relative activation difference {worst:.1e}")


def test_join_midway_cancel_midway_steer_and_seed_stay_per_request(session) -> None:
    """Four requests in one scheduler (room for 3): a plain greedy one, a steered one with a
    monitor, a seeded sampled one that joins when the first finishes, and one cancelled after
    the batch's fifth step; each equals itself served alone."""
    kw = {"max_tokens": 12, "temperature": 0.0}
    # a monitor that fires mid-reply: the top feature of the steered reply's fourth token
    reply = session.generate(PROMPTS[1], steering=STEER, **kw).run()
    fourth = [r for r in reply.records if r.phase == "generation"][3].top_features[0]
    monitor = {"layer": TINY_LAYER, "feature": fourth.index, "above": fourth.activation / 2}
    plan = session.steering_plan(STEER, [monitor], "all")
    sampled = {"max_tokens": 12, "temperature": 1.0, "seed": 7}
    want_steered = alone(session, PROMPTS[1], steering=plan, **kw)
    want_unsteered = alone(session, PROMPTS[1], **kw)
    want_sampled = alone(session, PROMPTS[2], **sampled)
    want_cancelled = alone(session, PROMPTS[3], **kw)
    assert want_steered[0] != want_unsteered[0], "the steering must change this reply"

    batch = BatchScheduler(session.backend, max_batch=3)
    plain = session.events(session.encode(PROMPTS[0]), batch=batch, **{**kw, "max_tokens": 4})
    steered = session.events(session.encode(PROMPTS[1]), batch=batch, steering=plan, **kw)
    cancelled = session.events(
        session.encode(PROMPTS[3]), batch=batch, should_stop=lambda: batch.steps_run >= 5, **kw
    )
    late = session.events(session.encode(PROMPTS[2]), batch=batch, **sampled)  # waits for room
    got_plain = split(plain)
    assert batch.widest == 3 and batch.steps_run == 4
    got_sampled, got_cancelled, got_steered = split(late), split(cancelled), split(steered)

    short_plain = alone(session, PROMPTS[0], **{**kw, "max_tokens": 4})
    assert got_plain[0] == short_plain[0] and got_plain[3] == "length"
    assert_same_records(got_plain[1], short_plain[1])
    assert got_steered[0] == want_steered[0] and got_steered[2] == want_steered[2]
    assert got_steered[2], "the monitor fires in this reply"
    assert_same_records(got_steered[1], want_steered[1])
    assert got_sampled[0] == want_sampled[0]
    assert_same_records(got_sampled[1], want_sampled[1])
    assert got_cancelled[3] == "cancelled"
    assert 0 < len(got_cancelled[1]) < len(want_cancelled[1])
    assert want_cancelled[0].startswith(got_cancelled[0])
    assert_same_records(got_cancelled[1], want_cancelled[1][: len(got_cancelled[1])])
    assert batch.idle


def test_a_request_cancelled_while_it_waits_is_never_prefilled(session) -> None:
    """Room for one: the second request is cancelled while the first decodes; when its turn
    comes it ends "cancelled" with no prompt records and no prefill chunk spent on it."""
    kw = {"max_tokens": 6, "temperature": 0.0}
    batch = BatchScheduler(session.backend, max_batch=1, prefill_chunk=4)
    cancel = {"now": False}
    first = session.events(session.encode(PROMPTS[0]), batch=batch, **kw)
    waiting = session.events(
        session.encode(PROMPTS[1]), batch=batch, should_stop=lambda: cancel["now"], **kw
    )
    got_first = split(first)
    chunks = batch.chunks_run
    cancel["now"] = True
    text, records, _, finish = split(waiting)
    assert (text, records, finish) == ("", [], "cancelled")
    assert batch.chunks_run == chunks  # its 23-token prompt would have taken 6 chunks of 4
    want_first = alone(session, PROMPTS[0], **kw)
    assert got_first[0] == want_first[0]
    assert_same_records(got_first[1], want_first[1])
    assert batch.idle


def test_an_abandoned_request_leaves_the_batch(session) -> None:
    batch = BatchScheduler(session.backend, max_batch=2)
    kw = {"max_tokens": 8, "temperature": 0.0}
    a = session.events(session.encode(PROMPTS[0]), batch=batch, **kw)
    b = session.events(session.encode(PROMPTS[2]), batch=batch, **kw)
    for i, _ in enumerate(a):
        if i == 10:
            break
    a.close()  # type: ignore[attr-defined]  # Session.events types it as an Iterator
    got, want = split(b), alone(session, PROMPTS[2], **kw)
    assert got[0] == want[0]
    assert_same_records(got[1], want[1])
    assert batch.idle


def test_structured_output_and_sampling_stay_per_request_in_a_batch(session) -> None:
    """A JSON-constrained request and a seeded sampled plain one decode together; each equals
    itself alone (the constraint masks only its own row's sampling)."""
    grammar = session.grammar({"type": "json_object"})
    json_kw = {"max_tokens": 24, "temperature": 1.0, "seed": 3}
    plain_kw = {"max_tokens": 16, "temperature": 1.0, "seed": 3}
    want_json = alone(session, PROMPTS[2], response_format=grammar, **json_kw)
    want_plain = alone(session, PROMPTS[2], **plain_kw)
    batch = BatchScheduler(session.backend, max_batch=2)
    constrained = session.events(
        session.encode(PROMPTS[2]), batch=batch, response_format=grammar, **json_kw
    )
    plain = session.events(session.encode(PROMPTS[2]), batch=batch, **plain_kw)
    got_json, got_plain = split(constrained), split(plain)
    assert batch.widest == 2
    assert got_json[0] == want_json[0] and got_json[0].startswith("{")
    assert got_plain[0] == want_plain[0] and got_plain[0] != got_json[0]
    assert_same_records(got_json[1], want_json[1])
    assert_same_records(got_plain[1], want_plain[1])


def test_growing_cache_layer_equals_concatenation() -> None:
    """The batch's KV layer writes in place and doubles when full: what it returns after each
    update is what transformers' concatenating DynamicLayer returns."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from neuroscope_torch.batch import GrowingLayer

    g = torch.Generator().manual_seed(0)
    first = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    grown, plain = GrowingLayer(*first, spare=2), DynamicLayer()
    plain.update(*first)
    for n in (1, 1, 1, 4, 1, 9):  # past the spare columns, then past the doubled buffer
        new = torch.randn(3, 2, n, 4, generator=g), torch.randn(3, 2, n, 4, generator=g)
        got, want = grown.update(*new), plain.update(*new)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        assert grown.get_seq_length() == plain.get_seq_length()
