"""The engine with the tiny model on its worker thread: parity with a direct Session, queueing,
cancellation within a token, failures that end a request but not the worker."""

from __future__ import annotations

import asyncio

import pytest
from conftest import requires_torch
from serve_support import TINY_LAYER, build_long_context_model, session_loader

from neuroscope.engine import (
    DuplicateRequestId,
    Engine,
    EngineBusy,
    EngineClosed,
    GenerationRequest,
    PromptTooLong,
)
from neuroscope.errors import ConfigError
from neuroscope.generation import TextDelta
from neuroscope.records import GenerationComplete, TokenFeatures

pytestmark = [pytest.mark.torch, requires_torch]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory):
    return build_long_context_model(tmp_path_factory.mktemp("long-tiny"))


@pytest.fixture(scope="module")
def engine(long_model, tiny_sae):
    engine = Engine(session_loader(long_model, tiny_sae["npz"]))
    engine.start(timeout=120)
    yield engine
    engine.close()


def request(engine: Engine, rid: str, max_tokens: int = 12, **kwargs) -> GenerationRequest:
    prepared = asyncio.run(engine.prepare(kwargs.pop("messages", MESSAGES), max_tokens))
    return GenerationRequest(rid, prepared.prompt_ids, prepared.max_tokens, **kwargs)


async def collect(handle) -> list:
    return [event async for event in handle.events()]


def test_info_describes_the_loaded_model(engine, long_model, tiny_sae) -> None:
    info = engine.info
    assert info.model_name == str(long_model) and info.layers == (TINY_LAYER,)
    assert info.sae_widths == {TINY_LAYER: 128} and info.top_k == 5
    assert info.max_context == 4096 and engine.context_limit == 4096


def test_events_equal_a_direct_session_run(engine, long_model, tiny_sae) -> None:
    req = request(engine, "chatcmpl-parity", max_tokens=16, temperature=0.0)

    async def run() -> list:
        return await collect(engine.submit(req, records=True))

    served = asyncio.run(run())
    with session_loader(long_model, tiny_sae["npz"])() as session:
        direct = list(
            session.events(
                req.prompt_ids, request_id=req.request_id, max_tokens=16, temperature=0.0
            )
        )

    def wire(events: list) -> list:
        return [e.text if isinstance(e, TextDelta) else e.to_dict() for e in events]

    assert wire(served) == wire(direct)
    assert isinstance(served[-1], GenerationComplete) and served[-1].completion_tokens == 16
    assert (
        sum(isinstance(e, TokenFeatures) and e.phase == "prompt" for e in served)
        == len(req.prompt_ids) - 1
    )


def test_requests_queue_in_order_and_never_mix(engine) -> None:
    reqs = [request(engine, f"chatcmpl-q{i}", max_tokens=6 + i, temperature=0.0) for i in range(3)]

    async def run() -> list[list]:
        handles = [engine.submit(r, records=True) for r in reqs]
        return await asyncio.gather(*(collect(h) for h in handles))

    results = asyncio.run(run())
    for req, events in zip(reqs, results, strict=True):
        assert {e.request_id for e in events if not isinstance(e, TextDelta)} == {req.request_id}
        done = events[-1]
        assert isinstance(done, GenerationComplete) and done.completion_tokens == req.max_tokens
        generated = [e for e in events if isinstance(e, TokenFeatures) and e.phase == "generation"]
        assert [e.token_index for e in generated] == list(range(req.max_tokens))
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        assert text == "".join(e.token for e in generated)


def test_cancel_stops_a_running_generation_within_one_token(engine) -> None:
    req = request(engine, "chatcmpl-cancel", max_tokens=3000, temperature=0.0)

    async def run():
        handle = engine.submit(req)
        async for event in handle.events():
            if isinstance(event, TextDelta) and handle.tokens_done >= 3:
                handle.cancel()
            if isinstance(event, GenerationComplete):
                return handle, event
        raise AssertionError("no completion")

    handle, done = asyncio.run(run())
    assert done.finish_reason == "cancelled"
    # The token being decoded when cancel() came may finish; the loop checks the flag before the next.
    assert done.completion_tokens <= handle.tokens_done_at_cancel + 2
    assert engine.pending == 0


def test_a_cancelled_queued_request_is_skipped(engine) -> None:
    first = request(engine, "chatcmpl-first", max_tokens=8, temperature=0.0)
    skipped = request(engine, "chatcmpl-skipped", max_tokens=3000)
    last = request(engine, "chatcmpl-last", max_tokens=4, temperature=0.0)

    async def run():
        handles = [engine.submit(r) for r in (first, skipped, last)]
        handles[1].cancel()
        return await asyncio.gather(*(h.result() for h in handles))

    a, b, c = asyncio.run(run())
    assert (a.finish_reason, a.completion_tokens) == ("length", 8)
    assert (b.finish_reason, b.completion_tokens, b.text) == ("cancelled", 0, "")
    assert (c.finish_reason, c.completion_tokens) == ("length", 4)


def test_a_failing_request_ends_with_an_error_and_the_worker_serves_the_next(engine) -> None:
    bad = GenerationRequest("chatcmpl-bad", [2, 10**6], 4)  # a token id far outside the vocabulary
    good = request(engine, "chatcmpl-after", max_tokens=5, temperature=0.0)

    async def run():
        failing = engine.submit(bad)
        # The backend checks token ids: a client's mistake, reported as such (not a server error).
        with pytest.raises(ConfigError, match="outside this model's vocabulary"):
            await failing.result()
        return await engine.submit(good).result()

    after = asyncio.run(run())
    assert (after.finish_reason, after.completion_tokens) == ("length", 5)


def test_bad_sampling_values_fail_the_request_as_a_client_error(engine) -> None:
    bad = request(engine, "chatcmpl-badtemp", max_tokens=4, temperature=-1.0)

    async def run():
        with pytest.raises(ValueError, match="temperature must be >= 0"):
            await engine.submit(bad).result()

    asyncio.run(run())


def test_duplicate_ids_and_a_full_queue_are_refused(engine, monkeypatch) -> None:
    long = request(engine, "chatcmpl-dup", max_tokens=3000, temperature=0.0)

    async def run():
        handle = engine.submit(long)
        with pytest.raises(DuplicateRequestId):
            engine.submit(long)
        monkeypatch.setattr(engine, "max_pending", 0)
        with pytest.raises(EngineBusy, match="busy"):
            engine.submit(request_copy(long, "chatcmpl-other"))
        handle.cancel()
        return await handle.result()

    assert asyncio.run(run()).finish_reason == "cancelled"


def request_copy(req: GenerationRequest, rid: str) -> GenerationRequest:
    return GenerationRequest(rid, req.prompt_ids, req.max_tokens)


def test_prepare_rejects_a_prompt_that_fills_the_context(engine) -> None:
    long_text = "hello " * 1500  # about 7500 tokens with the tiny tokenizer
    with pytest.raises(PromptTooLong, match="context is 4096 tokens"):
        asyncio.run(engine.prepare([{"role": "user", "content": long_text}], 10))
    fitted = asyncio.run(engine.prepare(MESSAGES, None))
    assert fitted.max_tokens == 4096 - len(fitted.prompt_ids)


def test_close_cancels_running_work_and_refuses_new(long_model, tiny_sae) -> None:
    engine = Engine(session_loader(long_model, tiny_sae["npz"]))
    engine.start(timeout=120)
    req = request(engine, "chatcmpl-closing", max_tokens=3000, temperature=0.0)

    async def run():
        handle = engine.submit(req)
        async for event in handle.events():
            if isinstance(event, TextDelta):
                engine.cancel_all()
        with pytest.raises(EngineClosed):
            engine.submit(request_copy(req, "chatcmpl-late"))
        return handle

    handle = asyncio.run(run())
    engine.close()
    assert handle.cancelled and not engine._thread.is_alive()
