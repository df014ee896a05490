"""The instrumented generation loop, shared by ``Session`` and the server's engine.

It drives a backend token by token and yields, in order, text pieces for the chat reply, one feature
record per position and hooked layer, and a closing ``GenerationComplete``. Position p's record is
emitted once token p+1 is known, so that it can name ``next_token``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from neuroscope.backend import Backend, LayerTopK, SamplingParams, StepFeatures
from neuroscope.chat import ChatTokenizer, StopStrings
from neuroscope.filters import FeatureFilter, FilterPlan
from neuroscope.grammar import TokenConstraint
from neuroscope.records import Feature, FinishReason, GenerationComplete, Phase, TokenFeatures
from neuroscope.steering import CompiledSteering, MonitorEvent, MonitorWatch

NO_FILTER = FeatureFilter()


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the chat reply, ready to send."""

    text: str


Event = TextDelta | TokenFeatures | GenerationComplete | MonitorEvent


@runtime_checkable
class Labels(Protocol):
    """Where feature labels come from: one at a time on the token path, or a whole layer at once."""

    def __call__(self, layer: int, index: int) -> str: ...

    def labels_for(self, layer: int, width: int | None = None) -> dict[int, str]:
        """Every feature's label when ``width`` is given (a fallback where none is known)."""
        ...


LabelLookup = Callable[[int, int], str]  # (layer, feature index) -> label


class FunctionLabels:
    """Labels from a plain ``(layer, index) -> label`` function (default: ``feature_<index>``)."""

    def __init__(self, lookup: LabelLookup | None = None):
        self._lookup = lookup or (lambda layer, index: f"feature_{index}")
        # A cache key for whole-layer listings: the default never changes; a function may, any time.
        self.version: int | None = 0 if lookup is None else None

    def __call__(self, layer: int, index: int) -> str:
        return self._lookup(layer, index)

    def labels_for(self, layer: int, width: int | None = None) -> dict[int, str]:
        return {i: self._lookup(layer, i) for i in range(width or 0)}


@dataclass(frozen=True)
class RecordBuilder:
    """Turns top-k arrays into ``TokenFeatures``: filter, label, tag. Immutable: replace it (with
    ``dataclasses.replace``) to change labels or the filter."""

    sae_ids: Mapping[int, str]  # layer -> SAE id
    top_k: int
    sites: Mapping[int, str] = field(default_factory=dict)  # layer -> site, when not resid_post
    labels: Labels = field(default_factory=FunctionLabels)
    feature_filter: FeatureFilter | None = None
    plan: FilterPlan = field(init=False)  # the filter (or none) bound to top_k

    def __post_init__(self) -> None:
        plan = (self.feature_filter or NO_FILTER).plan(self.top_k)
        object.__setattr__(self, "plan", plan)  # frozen: set once, here

    @property
    def backend_top_k(self) -> int:
        """How many candidates to ask the backend for."""
        return self.plan.candidates

    def build_rows(
        self,
        request_id: str,
        layer: int,
        topk: LayerTopK,
        rows: slice,
        *,
        positions: Sequence[int],
        phase: Phase,
        token_ids: Sequence[int],
        tokens: Sequence[str],
        next_tokens: Sequence[str | None],
        token_indices: Sequence[int | None],
    ) -> list[TokenFeatures]:
        """Records of ``topk``'s rows ``rows`` (one per position), filtered in one numpy call.

        Arrays become Python lists once per call (``tolist``), not one number at a time.
        """
        out = self.plan.apply(layer, topk.indices[rows], topk.activations[rows])
        # Rounded here, as the wire shows them: short JSON numbers, and the same value in Python.
        acts = np.round(out.activations.astype(np.float64), 6).tolist()
        indices, counts = out.indices.tolist(), out.counts.tolist()
        surprise = (
            None if out.surprise is None else np.round(out.surprise.astype(np.float64), 6).tolist()
        )
        filtered = [None] * len(counts) if out.filtered is None else out.filtered.tolist()
        # One label lookup per distinct feature of the call (a prompt repeats many), made now so
        # labels that arrive later (a live source) show in the next call's records.
        shown = np.arange(out.indices.shape[1]) < out.counts[:, None]
        label = self.labels
        names = {i: label(layer, i) for i in np.unique(out.indices[shown]).tolist()}
        sae = self.sae_ids[layer]
        site = self.sites.get(layer, "resid_post")
        records = []
        for r, n in enumerate(counts):
            idx, act = indices[r][:n], acts[r][:n]
            if surprise is None:
                features = [Feature(i, a, names[i]) for i, a in zip(idx, act, strict=True)]
            else:
                features = [
                    Feature(i, a, names[i], s)
                    for i, a, s in zip(idx, act, surprise[r], strict=False)
                ]
            records.append(
                TokenFeatures(
                    request_id, positions[r], phase, tokens[r], token_ids[r], layer, sae, features,
                    token_indices[r], next_tokens[r], site, filtered[r],
                )
            )  # fmt: skip
        return records

    def build(
        self,
        request_id: str,
        layer: int,
        topk: LayerTopK,
        row: int,
        *,
        position: int,
        phase: Phase,
        token_id: int,
        token: str,
        next_token: str | None,
        token_index: int | None,
    ) -> TokenFeatures:
        """The record of one row of ``topk``."""
        return self.build_rows(
            request_id, layer, topk, slice(row, row + 1), positions=[position], phase=phase,
            token_ids=[token_id], tokens=[token], next_tokens=[next_token],
            token_indices=[token_index],
        )[0]  # fmt: skip


def prompt_records(
    builder: RecordBuilder,
    tokenizer: ChatTokenizer,
    request_id: str,
    prompt_ids: Sequence[int],
    features: StepFeatures,
    next_token: str | None,
    report_bos: bool = False,
) -> Iterator[TokenFeatures]:
    """Records of the prompt positions, position by position; ``next_token`` is the text after the
    last one."""
    decoder = tokenizer.decoder(skip_special_tokens=False)
    ids = [int(t) for t in prompt_ids]
    texts = [decoder.push(t) for t in ids]
    first = 0 if report_bos or ids[0] != tokenizer.bos_token_id else 1
    nexts: list[str | None] = [*texts[first + 1 :], next_token]
    by_layer = [
        builder.build_rows(
            request_id,
            layer,
            topk,
            slice(first, len(ids)),
            positions=range(first, len(ids)),
            phase="prompt",
            token_ids=ids[first:],
            tokens=texts[first:],
            next_tokens=nexts,
            token_indices=[None] * (len(ids) - first),
        )  # fmt: skip
        for layer, topk in features.items()
    ]
    for row in zip(*by_layer, strict=True):
        yield from row


@dataclass(frozen=True, slots=True)
class PrefillStep:
    """What ``generation_steps`` asks of its driver first: prefill the prompt ``prompt_ids`` (with
    ``sampling`` and ``steering`` for the sequence it starts), send back the features of every
    prompt position (what ``Backend.prefill`` returns)."""

    prompt_ids: Sequence[int]
    sampling: SamplingParams
    steering: CompiledSteering | None = None


@dataclass(frozen=True, slots=True)
class DecodeStep:
    """What ``generation_steps`` asks of its driver per token: feed ``token``, send back its
    features."""

    token: int


Steps = Generator[Event | PrefillStep | DecodeStep, StepFeatures | None, None]


class SequenceModel(Protocol):
    """What one request's loop draws its tokens from (prefill and decodes are its driver's): a
    ``Backend``, or one sequence of a batch (``neuroscope.batching``)."""

    def sample(self, allowed: np.ndarray | None = None) -> int: ...


def generate(
    backend: Backend,
    tokenizer: ChatTokenizer,
    builder: RecordBuilder,
    prompt_ids: Sequence[int],
    *,
    request_id: str,
    max_tokens: int,
    sampling: SamplingParams,
    stop: Sequence[str] = (),
    report_bos: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    steering: CompiledSteering | None = None,
    constraint: TokenConstraint | None = None,
) -> Iterator[Event]:
    """Run one request alone: ``generation_steps`` driven by ``backend`` itself (``drive_alone``)."""
    steps = generation_steps(
        backend, tokenizer, builder, prompt_ids, request_id=request_id, max_tokens=max_tokens,
        sampling=sampling, stop=stop, report_bos=report_bos, should_stop=should_stop,
        steering=steering, constraint=constraint,
    )  # fmt: skip
    return drive_alone(backend, steps)


def drive_alone(backend: Backend, steps: Steps) -> Iterator[Event]:
    """The events of a request's loop, run alone: its prefill by ``backend.prefill``, its decodes
    one at a time by ``backend.decode``."""
    try:
        item = next(steps)
        while True:
            if isinstance(item, PrefillStep):
                item = steps.send(backend.prefill(item.prompt_ids, item.sampling, item.steering))
            elif isinstance(item, DecodeStep):
                item = steps.send(backend.decode(item.token))
            else:
                yield item
                item = next(steps)
    except StopIteration:
        return
    finally:
        steps.close()


def generation_steps(
    backend: SequenceModel,
    tokenizer: ChatTokenizer,
    builder: RecordBuilder,
    prompt_ids: Sequence[int],
    *,
    request_id: str,
    max_tokens: int,
    sampling: SamplingParams,
    stop: Sequence[str] = (),
    report_bos: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    steering: CompiledSteering | None = None,
    constraint: TokenConstraint | None = None,
) -> Steps:
    """Run one request: prompt records, then per generated token its text and its records.

    ``constraint`` (structured output, ``neuroscope.grammar``) says before each sample which
    tokens may come next, and is told each token drawn.

    Besides events it yields a ``PrefillStep`` first and a ``DecodeStep`` per generated token; its
    driver answers each with ``send(features)`` (of the prompt, of that token): ``drive_alone``
    alone, ``neuroscope.batching`` in a batch (which may prefill in chunks between other requests'
    decodes). ``backend`` only samples: the driver owns the model's state.

    ``steering`` (compiled for this prompt) is handed to the backend with the prompt and lives
    as long as this sequence; its monitors yield a ``MonitorEvent`` after the record of the position
    where they fire, and a ``stop`` monitor ends the generation there (finish reason ``monitor``).
    """
    if should_stop():  # cancelled while it waited for its turn: spend no prefill on it
        yield GenerationComplete(request_id, "cancelled", len(prompt_ids), 0)
        return
    features = yield PrefillStep(prompt_ids, sampling, steering)
    assert features is not None, "send the features of a PrefillStep"
    monitors = MonitorWatch(steering, request_id) if steering and steering.monitors else None
    decoder = tokenizer.decoder()
    stops = StopStrings(stop)

    def draw() -> tuple[int, str]:
        if constraint is None:
            token = backend.sample()
        else:
            token = backend.sample(constraint.allowed())
            constraint.accept(token)
        if token in tokenizer.stop_token_ids:
            return token, tokenizer.token_text(token)
        return token, decoder.push(token)

    token, text = draw()
    yield from prompt_records(
        builder, tokenizer, request_id, prompt_ids, features, text, report_bos
    )

    finish: FinishReason = "length"
    completion = 0
    if monitors is not None and monitors.wants_prompt():
        prompt_decoder = tokenizer.decoder(skip_special_tokens=False)
        texts = [prompt_decoder.push(int(t)) for t in prompt_ids]
        skip = 0 if report_bos or prompt_ids[0] != tokenizer.bos_token_id else 1
        for event in monitors.check(features, 0, texts, prompt=True, skip=skip):
            yield event
            if event.action == "stop":
                finish, max_tokens = "monitor", 0  # no generation at all
                break
    for i in range(max_tokens):
        if token in tokenizer.stop_token_ids:
            finish = "stop"
            break
        completion += 1
        visible, stopped = stops.push(text)
        if visible:
            yield TextDelta(visible)
        if should_stop():
            finish = "cancelled"
            break
        step = yield DecodeStep(token)  # the driver decodes: alone, or in a batch
        assert step is not None, "send the features of a DecodeStep"
        features = step
        last = stopped or i + 1 == max_tokens
        nxt = None if last else draw()
        nxt_text = None if nxt is None else nxt[1]
        position = len(prompt_ids) + i
        for layer, topk in features.items():
            yield from builder.build_rows(
                request_id, layer, topk, slice(0, 1), positions=[position], phase="generation",
                token_ids=[token], tokens=[text], next_tokens=[nxt_text], token_indices=[i],
            )  # fmt: skip
        if monitors:
            events = monitors.check(features, position, [text])
            yield from events
            if any(e.action == "stop" for e in events):
                finish = "monitor"
                break
        if stopped:
            finish = "stop"
            break
        if nxt is None:
            break
        token, text = nxt
    tail = stops.flush()  # text held back for a stop string that never completed
    if tail:
        yield TextDelta(tail)
    yield GenerationComplete(request_id, finish, len(prompt_ids), completion)
