"""The instrumented generation loop, shared by ``Session`` and the server's engine.

It drives a backend token by token and yields, in order, text pieces for the chat reply, one feature
record per position and hooked layer, and a closing ``GenerationComplete``. Position p's record is
emitted once token p+1 is known, so that it can name ``next_token``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from neuroscope.backend import Backend, LayerTopK, SamplingParams, StepFeatures
from neuroscope.chat import ChatTokenizer, StopStrings
from neuroscope.records import Feature, GenerationComplete, Phase, TokenFeatures


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the chat reply, ready to send."""

    text: str


Event = TextDelta | TokenFeatures | GenerationComplete


class FeatureFilter(Protocol):
    def candidates(self, top_k: int) -> int: ...

    def apply(
        self, layer: int, indices: np.ndarray, activations: np.ndarray, top_k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int | None]:
        """At most ``top_k`` kept (indices, activations), their surprise (or None), and how many
        of the unfiltered top-k were hidden (or None)."""


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

    def __call__(self, layer: int, index: int) -> str:
        return self._lookup(layer, index)

    def labels_for(self, layer: int, width: int | None = None) -> dict[int, str]:
        return {i: self._lookup(layer, i) for i in range(width or 0)}


@dataclass
class RecordBuilder:
    """Turns top-k arrays into ``TokenFeatures``: filter, label, tag."""

    sae_ids: Mapping[int, str]  # layer -> SAE id
    top_k: int
    labels: Labels = field(default_factory=FunctionLabels)
    feature_filter: FeatureFilter | None = None

    @property
    def backend_top_k(self) -> int:
        """How many candidates to ask the backend for."""
        return self.feature_filter.candidates(self.top_k) if self.feature_filter else self.top_k

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
        indices, activations = topk.indices[row], topk.activations[row]
        surprise, filtered = None, None
        if self.feature_filter is not None:
            indices, activations, surprise, filtered = self.feature_filter.apply(
                layer, indices, activations
            )
        features = [
            Feature(
                index=int(i),
                activation=float(a),
                label=self.labels(layer, int(i)),
                surprise=None if surprise is None else float(surprise[n]),
            )
            for n, (i, a) in enumerate(
                zip(indices[: self.top_k], activations[: self.top_k], strict=True)
            )
            if a > 0
        ]
        return TokenFeatures(
            request_id=request_id,
            position=position,
            phase=phase,
            token=token,
            token_id=token_id,
            layer=layer,
            sae=self.sae_ids[layer],
            top_features=features,
            token_index=token_index,
            next_token=next_token,
            filtered_count=filtered,
        )


def prompt_records(
    builder: RecordBuilder,
    tokenizer: ChatTokenizer,
    request_id: str,
    prompt_ids: Sequence[int],
    features: StepFeatures,
    next_token: str | None,
    report_bos: bool = False,
) -> Iterator[TokenFeatures]:
    """Records of the prompt positions; ``next_token`` is the text after the last one."""
    decoder = tokenizer.decoder(skip_special_tokens=False)
    texts = [decoder.push(t) for t in prompt_ids]
    for p, token_id in enumerate(prompt_ids):
        if p == 0 and not report_bos and token_id == tokenizer.bos_token_id:
            continue
        nxt = texts[p + 1] if p + 1 < len(prompt_ids) else next_token
        for layer, topk in features.items():
            yield builder.build(
                request_id, layer, topk, p, position=p, phase="prompt", token_id=token_id,
                token=texts[p], next_token=nxt, token_index=None,
            )  # fmt: skip


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
) -> Iterator[Event]:
    """Run one request: prompt records, then per generated token its text and its records."""
    features = backend.prefill(prompt_ids, sampling)
    decoder = tokenizer.decoder()
    stops = StopStrings(stop)

    def draw() -> tuple[int, str]:
        token = backend.sample()
        if token in tokenizer.stop_token_ids:
            return token, tokenizer.token_text(token)
        return token, decoder.push(token)

    token, text = draw()
    yield from prompt_records(
        builder, tokenizer, request_id, prompt_ids, features, text, report_bos
    )

    finish = "length"
    completion = 0
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
        features = backend.decode(token)
        last = stopped or i + 1 == max_tokens
        nxt, nxt_text = (None, None) if last else draw()
        position = len(prompt_ids) + i
        for layer, topk in features.items():
            yield builder.build(
                request_id, layer, topk, 0, position=position, phase="generation", token_id=token,
                token=text, next_token=nxt_text, token_index=i,
            )  # fmt: skip
        if stopped:
            finish = "stop"
            break
        token, text = nxt, nxt_text  # type: ignore[assignment]
    tail = stops.flush()  # text held back for a stop string that never completed
    if tail:
        yield TextDelta(tail)
    yield GenerationComplete(request_id, finish, len(prompt_ids), completion)  # type: ignore[arg-type]
