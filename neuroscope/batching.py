"""Continuous batching: many requests' generation loops share one decode step per token.

Each request runs the same loop as when served alone (``neuroscope.generation.generation_steps``),
so its sampling and seed, stop strings, max tokens, cancellation (``should_stop``), steering,
monitors and records (its own request id, its own position order) behave exactly as alone. The
loop yields a ``DecodeStep`` where it needs a token decoded; the scheduler collects those of every
running request and answers them all with one ``decode_batch`` of the backend. Requests join (their
prompt is prefilled alone, then they decode with the others) and leave (finished, stopped or
cancelled) at every step; beyond ``max_batch`` they wait in order.

Single-threaded and pull-driven: ``submit`` returns an iterator of the request's events; pulling
it runs scheduler steps until that request has something to give, buffering the other requests'
events. ``Session.generate_many`` and the engine's worker both drive it this way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from neuroscope.backend import Backend, SamplingParams, StepFeatures
from neuroscope.errors import ConfigError
from neuroscope.generation import DecodeStep, Event, SequenceModel
from neuroscope.steering import CompiledSteering

Steps = Generator[Event | DecodeStep, StepFeatures | None, None]


@runtime_checkable
class BatchingBackend(Protocol):
    """A backend that decodes many sequences in one step (torch so far)."""

    def start(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        steering: CompiledSteering | None = None,
    ) -> tuple[Any, StepFeatures]:
        """Prefill a new sequence alone; its state and its prompt's features."""
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
    """One request's view of a batching backend: its own prefill and sampling."""

    def __init__(self, backend: BatchingBackend):
        self.backend = backend
        self.seq: Any = None

    def prefill(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        steering: CompiledSteering | None = None,
    ) -> StepFeatures:
        self.seq, features = self.backend.start(token_ids, sampling, steering)
        return features

    def sample(self, allowed: np.ndarray | None = None) -> int:
        return self.backend.sample_sequence(self.seq, allowed)


class OneAtATime:
    """A single-sequence ``Backend`` as a batching backend with room for one sequence, so the
    scheduler serves every backend (those that cannot batch run their requests in turn)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._current: object | None = None

    def start(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        steering: CompiledSteering | None = None,
    ) -> tuple[Any, StepFeatures]:
        features = self.backend.prefill(token_ids, sampling, steering)
        self._current = object()  # the backend's one sequence is this one now
        return self._current, features

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
    pending: DecodeStep | None = None  # the decode it waits for
    events: deque[Event] = field(default_factory=deque)
    done: bool = False
    error: BaseException | None = None


class BatchScheduler:
    """Runs submitted requests together, at most ``max_batch`` decoding at once (one at a time,
    in turn, on a backend that cannot batch)."""

    def __init__(self, backend: Backend | BatchingBackend, max_batch: int):
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}.")
        if isinstance(backend, BatchingBackend):
            self.backend: BatchingBackend = backend
            self.max_batch = max_batch
        else:
            self.backend, self.max_batch = OneAtATime(backend), 1
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.steps_run = 0  # batched decode steps, for tests and benchmarks
        self.widest = 0  # the most sequences one step decoded

    def submit(self, make: Callable[[SequenceModel], Steps]) -> BatchedEvents:
        """Queue a request whose loop ``make(model)`` builds (``generation_steps`` on ``model``);
        iterate the result for its events. Closing it early cancels the request."""
        request = _Request(make, BatchedSequence(self.backend))
        self.waiting.append(request)
        return BatchedEvents(self, request)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def _drop(self, request: _Request) -> None:
        """Forget a request (finished, failed or abandoned by its reader)."""
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
        if request.steps is not None and not request.done:
            request.steps.close()
        request.done = True

    def _advance(self, request: _Request, value: StepFeatures | None) -> None:
        """Run the request's loop to its next decode (or its end), keeping its events."""
        assert request.steps is not None
        try:
            item = request.steps.send(value)
            while not isinstance(item, DecodeStep):
                request.events.append(item)
                item = next(request.steps)
            request.pending = item
        except StopIteration:
            request.done, request.pending = True, None
        except Exception as e:  # one request's error (bad input) is its own, never the batch's
            request.error, request.done, request.pending = e, True, None

    def step(self) -> None:
        """Admit waiting requests (prefilling each alone), then one decode step for all running."""
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting.popleft()
            request.steps = request.make(request.model)
            self._advance(request, None)  # prefill and the first token
            if not request.done:
                self.running.append(request)
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
