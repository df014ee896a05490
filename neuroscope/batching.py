"""Continuous batching: many requests' generation loops share one decode step per token.

Each request runs the same loop as when served alone (``neuroscope.generation.generation_steps``),
so its sampling and seed, stop strings, max tokens, cancellation (``should_stop``), steering,
monitors and records (its own request id, its own position order) behave exactly as alone. The
loop yields a ``PrefillStep`` for its prompt and a ``DecodeStep`` where it needs a token decoded;
the scheduler answers the decodes of every running request with one ``decode_batch`` of the
backend, and prefills newcomers' prompts in chunks (``prefill_chunk`` tokens per step, spent in
arrival order) between those steps, so a long prompt delays the others by at most one chunk per
step. Requests join and leave (finished, stopped or cancelled) at every step; beyond
``max_batch`` (prefilling and decoding together) they wait in order.

Single-threaded and pull-driven: ``submit`` returns an iterator of the request's events; pulling
it runs scheduler steps until that request has something to give, buffering the other requests'
events. ``Session.generate_many`` and the engine's worker both drive it this way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from neuroscope.backend import Backend, SamplingParams, StepFeatures
from neuroscope.errors import ConfigError
from neuroscope.generation import DecodeStep, Event, PrefillStep, SequenceModel, Steps
from neuroscope.steering import CompiledSteering

# Prompt tokens prefilled per scheduler step. A chunk of 256 costs about as much CPU time as a few
# decode steps of a small model (SmolLM2-135M: ~0.2 s), so the running requests lose at most that
# per token while a long prompt comes in, and a chunk is still wide enough that the prefill runs
# at full matmul efficiency (a prompt of a chat turn fits in one or two chunks).
PREFILL_CHUNK = 256


@runtime_checkable
class BatchingBackend(Protocol):
    """A backend that decodes many sequences in one step and prefills prompts in chunks."""

    def start(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        steering: CompiledSteering | None = None,
    ) -> Any:
        """A new sequence of this prompt (ids checked, its generator seeded); nothing computed
        yet."""
        ...

    def prefill_chunk(self, seq: Any, max_tokens: int) -> StepFeatures | None:
        """Feed up to ``max_tokens`` more of ``seq``'s prompt (alone, not touching the running
        batch). None while some of the prompt remains; after its last chunk, the features of every
        prompt position (what ``Backend.prefill`` returns) and ``seq`` can be sampled and
        decoded."""
        ...

    def decode_batch(self, seqs: Sequence[Any], token_ids: Sequence[int]) -> list[StepFeatures]:
        """One token into each sequence (the running batch becomes exactly ``seqs``)."""
        ...

    def sample_sequence(self, seq: Any, allowed: np.ndarray | None = None) -> int:
        """``Backend.sample`` on one sequence of the batch."""
        ...


def can_batch(backend: object) -> bool:
    """Does ``backend`` decode many sequences per step?"""
    return isinstance(backend, BatchingBackend)


class BatchedSequence(SequenceModel):
    """One request's view of a batching backend: the sampling of its own sequence (the scheduler
    prefills and decodes it)."""

    def __init__(self, backend: BatchingBackend):
        self.backend = backend
        self.seq: Any = None

    def sample(self, allowed: np.ndarray | None = None) -> int:
        return self.backend.sample_sequence(self.seq, allowed)


@dataclass(eq=False)
class _Whole:
    """``OneAtATime``'s sequence: the prompt it prefills in one go."""

    token_ids: Sequence[int]
    sampling: SamplingParams
    steering: CompiledSteering | None


class OneAtATime:
    """A single-sequence ``Backend`` as a batching backend with room for one sequence, so the
    scheduler serves every backend (those that cannot batch run their requests in turn); its
    ``prefill_chunk`` prefills the whole prompt at once."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._current: object | None = None

    def start(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        steering: CompiledSteering | None = None,
    ) -> Any:
        return _Whole(token_ids, sampling, steering)

    def prefill_chunk(self, seq: Any, max_tokens: int) -> StepFeatures | None:
        features = self.backend.prefill(seq.token_ids, seq.sampling, seq.steering)
        self._current = seq  # the backend's one sequence is this one now
        return features

    def _check(self, seq: object) -> None:
        if seq is not self._current:
            raise RuntimeError("This backend holds one sequence: a later prefill replaced it.")

    def decode_batch(self, seqs: Sequence[Any], token_ids: Sequence[int]) -> list[StepFeatures]:
        if len(seqs) != 1:
            raise RuntimeError("This backend decodes one sequence at a time.")
        self._check(seqs[0])
        return [self.backend.decode(token_ids[0])]

    def sample_sequence(self, seq: Any, allowed: np.ndarray | None = None) -> int:
        self._check(seq)
        return self.backend.sample(allowed)


class BatchedEvents(Iterator[Event]):
    """One request's events. Iterating pulls: it runs scheduler steps until the request has an
    event (the others' events wait in their own buffers). A driver that steps the scheduler itself
    (the engine's worker) takes what is ready with ``drain`` instead."""

    def __init__(self, scheduler: BatchScheduler, request: _Request):
        self._scheduler, self._request = scheduler, request

    def __next__(self) -> Event:
        request = self._request
        while not request.events:
            if request.error is not None:
                self.close()
                raise request.error
            if request.done:
                self.close()
                raise StopIteration
            self._scheduler.step()
        return request.events.popleft()

    def drain(self) -> list[Event]:
        """The events ready now, without stepping; raises the request's error after its last."""
        request = self._request
        events = list(request.events)
        request.events.clear()
        if not events and request.error is not None:
            self.close()
            raise request.error
        return events

    @property
    def finished(self) -> bool:
        """Ended (completed, failed or closed) and every event taken."""
        return self._request.done and not self._request.events and self._request.error is None

    def close(self) -> None:
        """Leave the batch now (a reader that gives up cancels its request)."""
        self._scheduler._drop(self._request)


@dataclass(eq=False)
class _Request:
    make: Callable[[SequenceModel], Steps]
    model: BatchedSequence
    steps: Steps | None = None
    prompt: int = 0  # prompt tokens to prefill
    prefilled: int = 0  # of which fed so far
    pending: DecodeStep | None = None  # the decode it waits for
    events: deque[Event] = field(default_factory=deque)
    done: bool = False
    error: BaseException | None = None


class BatchScheduler:
    """Runs submitted requests together: at most ``max_batch`` at once (prefilling or decoding;
    one at a time, in turn, on a backend that cannot batch), newcomers' prompts prefilled
    ``prefill_chunk`` tokens per step between the running requests' decode steps."""

    def __init__(
        self,
        backend: Backend | BatchingBackend,
        max_batch: int,
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}.")
        if prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}.")
        if isinstance(backend, BatchingBackend):
            self.backend: BatchingBackend = backend
            self.max_batch = max_batch
        else:
            self.backend, self.max_batch = OneAtATime(backend), 1
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[_Request] = deque()
        self.prefilling: list[_Request] = []  # admitted, prompt not all fed yet (arrival order)
        self.running: list[_Request] = []  # decoding
        self.steps_run = 0  # batched decode steps, for tests and benchmarks
        self.chunks_run = 0  # prefill chunks fed
        self.widest = 0  # the most sequences one step decoded

    def submit(self, make: Callable[[SequenceModel], Steps]) -> BatchedEvents:
        """Queue a request whose loop ``make(model)`` builds (``generation_steps`` on ``model``);
        iterate the result for its events. Closing it early cancels the request."""
        request = _Request(make, BatchedSequence(self.backend))
        self.waiting.append(request)
        return BatchedEvents(self, request)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.prefilling and not self.running

    def _drop(self, request: _Request) -> None:
        """Forget a request (finished, failed or abandoned by its reader)."""
        for group in (self.waiting, self.prefilling, self.running):
            if request in group:
                group.remove(request)
        if request.steps is not None and not request.done:
            request.steps.close()
        request.done = True

    def _fail(self, request: _Request, error: BaseException) -> None:
        request.error, request.done, request.pending = error, True, None
        if request.steps is not None:
            request.steps.close()

    def _advance(self, request: _Request, value: StepFeatures | None) -> None:
        """Run the request's loop to its next request of the model (or its end), keeping its
        events; a prefill asked for starts the request's sequence."""
        assert request.steps is not None
        try:
            item = request.steps.send(value)
            while not isinstance(item, DecodeStep | PrefillStep):
                request.events.append(item)
                item = next(request.steps)
            if isinstance(item, PrefillStep):
                request.model.seq = self.backend.start(
                    item.prompt_ids, item.sampling, item.steering
                )
                request.prompt, request.prefilled = len(item.prompt_ids), 0
            else:
                request.pending = item
        except StopIteration:
            request.done, request.pending = True, None
        except Exception as e:  # one request's error (bad input) is its own, never the batch's
            self._fail(request, e)

    def _prefill(self) -> None:
        """Spend this step's prefill budget on the prefilling requests, in arrival order; those
        whose prompt is all fed sample their first token and wait for a decode."""
        budget = self.prefill_chunk
        for request in list(self.prefilling):
            while budget > 0 and not request.done and request.pending is None:
                # (at least 1: a backend answers a prompt it has all fed, or says what is wrong)
                n = min(budget, max(request.prompt - request.prefilled, 1))
                try:
                    features = self.backend.prefill_chunk(request.model.seq, n)
                except Exception as e:  # its own error (say, out of memory for its prompt)
                    self._fail(request, e)
                    break
                self.chunks_run += 1
                budget -= n
                request.prefilled += n
                if features is not None:
                    self._advance(request, features)  # its first token, up to its first decode
            if request.done or request.pending is not None:
                self.prefilling.remove(request)
                if not request.done:
                    self.running.append(request)
            if budget <= 0:
                break

    def step(self) -> None:
        """Admit waiting requests while there is room, feed one prefill budget's worth of
        prompts, then one decode step for every running request."""
        while self.waiting and len(self.prefilling) + len(self.running) < self.max_batch:
            request = self.waiting.popleft()
            request.steps = request.make(request.model)
            self._advance(request, None)  # up to its PrefillStep: its sequence, nothing computed
            if not request.done:
                self.prefilling.append(request)
        self._prefill()
        self.running = [r for r in self.running if not r.done]
        ready = [r for r in self.running if r.pending is not None]
        if not ready:
            return
        tokens = [r.pending.token for r in ready if r.pending is not None]
        features = self.backend.decode_batch([r.model.seq for r in ready], tokens)
        self.steps_run += 1
        self.widest = max(self.widest, len(ready))
        for request, feats in zip(ready, features, strict=True):
            request.pending = None
            self._advance(request, feats)
        self.running = [r for r in self.running if not r.done]
