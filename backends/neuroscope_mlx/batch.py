"""Continuous batching on MLX: many sequences decode together, one forward pass per step.

The protocol is ``neuroscope.batching.BatchingBackend``: ``start`` a sequence (nothing computed),
``prefill_chunk`` its prompt alone, in chunks, into its own cache (exactly as ``prefill`` does,
``prefill_step`` tokens per pass at most), then ``decode_batch`` one token into each of the running
sequences and ``sample_sequence`` each with its own PRNG key.

Reused from mlx-lm 0.32 (``mlx_lm.models.cache``): ``BatchKVCache`` holds the running batch, its
rows left-padded to a common length with per-row offsets (``offset`` [B] = each row's own position,
``left_padding`` [B]). A newcomer's own ``KVCache`` becomes a one-row batch cache with the cache's
``merge`` and joins with ``extend`` (left padding either side); leavers go with ``filter`` (which
also drops the left padding nobody needs any more). Gemma 2/3's sliding layers hold only their
window (``models/window.py``): their ``WindowKVCache`` merges into a ``BatchKVCache`` that cuts off
the columns before the window. Other mlx-lm cache types with ``merge``/``extend``/``filter``
(``RotatingKVCache`` → ``BatchRotatingKVCache``, ``ArraysCache``) go the same way, untested here; a
model whose caches cannot merge is refused at ``start``. mlx-lm's models (Llama/SmolLM2 …) build their
masks from the batch cache (``create_attention_mask`` → ``BatchKVCache.make_mask``: causal and not
padding) and rotate with the per-row offsets (``mx.fast.rope`` takes an array offset: exact, the
same numbers as a scalar offset per row). Our exact Gemma 2/3 (``models/gemma2.py``) read the same
two arrays and build their masks per row themselves, window included
(``gemma2.batch_attention_span``).

Not reused: ``mlx_lm.generate.BatchGenerator``. It owns the loop (prefill of several prompts
together, right-padded; sampling with its own samplers and logits processors; stop conditions),
while Neuroscope's loop (``neuroscope.generation``) must stay the very same per request (its seed,
structured-output mask, stop strings, steering and records), and needs the hooked residual of every
row at every step, which BatchGenerator does not expose. Its batch-prefill of newcomers (several
prompts in one pass, right padding and ``finalize``) is not used either: a prompt is prefilled
alone so its features equal those it gets alone.

The pipelined step of the single path (``AheadStep``: step n+1 scheduled before the host reads step
n) is not used for batched sequences: the next step's rows are only known when the scheduler asks
(rows join and leave), and a step run ahead on a row that then leaves would be wasted. Each batched
step is one ``mx.eval`` of the logits, every row's drawn token and every hooked layer's top-k.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from neuroscope.backend import LayerTopK, SamplingParams, StepFeatures, concat_features
from neuroscope.errors import ConfigError
from neuroscope_mlx.sae import top_k
from neuroscope_mlx.sampling import sample_token
from neuroscope_mlx.steering import SequenceSteering

if TYPE_CHECKING:
    from neuroscope.steering import CompiledSteering
    from neuroscope_mlx.backend import MLXBackend

# Decode steps between releases of MLX's buffer cache (as the single path and mlx-lm).
CLEAR_CACHE_EVERY = 256


@dataclass(eq=False)
class MLXBatchSequence:
    """One sequence of the batch: its prompt, how it samples, its own cache while its prompt is
    prefilled (then the batch holds its row), its last logits and the token drawn from them."""

    prompt: list[int]
    sampling: SamplingParams
    key: mx.array  # the PRNG key, split at each non-greedy draw
    steering: SequenceSteering | None = None
    cache: list[Any] | None = None  # its own prompt cache until it joins the batch
    prefilled: int = 0  # prompt tokens in its cache
    chunks: list[StepFeatures] = field(default_factory=list)  # features of the chunks so far
    logits: mx.array | None = None  # float32 [vocab] of its last position
    next_token: mx.array | None = None  # drawn with the step, not yet taken by sample
    position: int = 0  # tokens in its cache (its own positions), once prefilled

    @property
    def ready(self) -> bool:
        """Its whole prompt is in: it can be sampled and decoded."""
        return self.logits is not None


def _draw(seq: MLXBatchSequence, allowed: np.ndarray | None = None) -> mx.array:
    """The next token from ``seq``'s logits (lazy), splitting its key as the single path does."""
    assert seq.logits is not None
    key = None
    if not seq.sampling.greedy:
        seq.key, key = mx.random.split(seq.key)
    return sample_token(seq.logits, seq.sampling, key, allowed)


def start(
    backend: MLXBackend,
    token_ids: Sequence[int],
    sampling: SamplingParams,
    steering: CompiledSteering | None = None,
) -> MLXBatchSequence:
    """A new sequence; nothing is computed until ``prefill_chunk``."""
    ids = backend._check_ids(token_ids)
    cache = make_prompt_cache(backend.model)
    if not all(hasattr(c, "merge") for c in cache):
        raise ConfigError(
            f"This {backend.info.model_type} model's KV cache cannot join a batch; "
            "serve it with --max-batch 1."
        )
    key = mx.random.key(sampling.seed if sampling.seed is not None else secrets.randbits(63))
    steer = None if steering is None else SequenceSteering(steering, backend._saes)
    return MLXBatchSequence(ids, sampling, key, steer, cache)


def prefill_chunk(
    backend: MLXBackend, seq: MLXBatchSequence, max_tokens: int
) -> StepFeatures | None:
    """Feed up to ``max_tokens`` more prompt tokens of ``seq`` into its own cache, alone.

    As ``MLXBackend.prefill``: the prompt but its last token in passes of at most
    ``prefill_step``, then the last token, whose logits give the first draw. None while some of
    the prompt remains; after the last chunk, the features of every prompt position.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
    if seq.ready or seq.cache is None:
        raise RuntimeError("This sequence's prompt is already prefilled.")
    ids, cache, steer = seq.prompt, seq.cache, seq.steering
    end = min(len(ids), seq.prefilled + max_tokens)
    body_end = min(end, len(ids) - 1)
    for first in range(seq.prefilled, body_end, backend.prefill_step):
        stop = min(first + backend.prefill_step, body_end)
        backend._run(cache, ids[first:stop], first, steer)
        features = backend._features(steer, first)
        mx.eval(features, [c.state for c in cache])
        seq.chunks.append(backend._to_host(features)[0])
    seq.prefilled = max(seq.prefilled, body_end)
    if end < len(ids):
        return None
    last = len(ids) - 1
    seq.logits = backend._last_logits(cache, ids[-1:], last, steer)
    seq.next_token = _draw(seq)
    features = backend._features(steer, last)
    mx.eval(seq.next_token, seq.logits, features)
    seq.chunks.append(backend._to_host(features)[0])
    seq.prefilled = seq.position = len(ids)
    joined = concat_features(seq.chunks)
    seq.chunks = []
    return joined


class MLXBatch:
    """The running batch: its rows (sequences, in cache order) and their per-layer batch caches."""

    def __init__(self) -> None:
        self.rows: list[MLXBatchSequence] = []
        self.cache: list[Any] | None = None  # per layer: BatchKVCache [rows, heads, L, head_dim]
        self.steps = 0

    def keep(self, seqs: Sequence[MLXBatchSequence]) -> None:
        """Drop the rows not in ``seqs`` (``filter`` also trims padding no row needs)."""
        wanted = {id(s) for s in seqs}
        kept = [i for i, s in enumerate(self.rows) if id(s) in wanted]
        if len(kept) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in kept]
        if not kept:
            self.cache = None
            return
        assert self.cache is not None
        index = mx.array(kept)
        for c in self.cache:
            c.filter(index)

    def add(self, seq: MLXBatchSequence) -> None:
        """Merge a sequence prefilled alone (its own cache) as the last row."""
        assert seq.cache is not None
        own = [c.merge([c]) for c in seq.cache]  # a one-row batch cache per layer
        seq.cache = None  # it lives in the batch from now on
        if self.cache is None:
            self.cache = own
        else:
            for mine, theirs in zip(self.cache, own, strict=True):
                mine.extend(theirs)
        self.rows.append(seq)


def decode(
    backend: MLXBackend,
    batch: MLXBatch,
    seqs: Sequence[MLXBatchSequence],
    tokens: Sequence[int],
) -> list[StepFeatures]:
    """One decode step: ``tokens[i]`` into ``seqs[i]``; the features of each, in that order.

    The batch becomes exactly ``seqs``: rows not named leave, sequences not yet in it join.
    """
    if len(seqs) != len(tokens) or not seqs:
        raise ValueError("Give one token for each sequence, and at least one sequence.")
    if not all(s.ready for s in seqs):
        raise RuntimeError("decode_batch() before the sequence's prompt was prefilled.")
    backend._check_ids(tokens)
    batch.keep(seqs)
    present = {id(s) for s in batch.rows}
    for seq in seqs:
        if id(seq) not in present:
            batch.add(seq)
    by_row = {id(s): int(tokens[i]) for i, s in enumerate(seqs)}
    rows = batch.rows
    firsts = [s.position for s in rows]  # the position of the token each row feeds
    steered = [(r, s.steering) for r, s in enumerate(rows) if s.steering is not None]
    edited = []
    for layer in {layer for _, st in steered for layer in st.layers}:
        hook = backend._hooks[layer]
        hook.edit = lambda h, layer=layer: _steer_rows(h, layer, steered, firsts)
        edited.append(hook)
    try:
        ids = mx.array([[by_row[id(s)]] for s in rows])  # [B, 1]
        logits = backend.model(ids, cache=batch.cache)[:, -1].astype(mx.float32)
    finally:
        for hook in edited:
            hook.edit = None
    top = _features(backend, rows, firsts)
    drawn = []
    for r, seq in enumerate(rows):
        seq.logits = logits[r]
        seq.next_token = _draw(seq)
        seq.position += 1
        drawn.append(seq.next_token)
    mx.eval(drawn, logits, top)
    batch.steps += 1
    if batch.steps % CLEAR_CACHE_EVERY == 0:
        mx.clear_cache()  # as mlx-lm: long runs otherwise keep every freed buffer cached
    features = _to_host(top, len(rows))
    order = {id(s): r for r, s in enumerate(rows)}
    return [features[order[id(s)]] for s in seqs]


def _steer_rows(
    hidden: mx.array, layer: int, steered: list[tuple[int, SequenceSteering]], firsts: list[int]
) -> mx.array:
    """Each steered row's own steering on its own row of ``hidden`` [B, T, d]; others untouched."""
    rows = [hidden[r : r + 1] for r in range(hidden.shape[0])]
    for r, steering in steered:
        rows[r] = steering.apply(layer, rows[r], firsts[r])
    return mx.concatenate(rows)


# layer -> (indices [B, k], activations [B, k], {row: watched activations [1, w]}), on the device
BatchTopK = dict[int, tuple[mx.array, mx.array, dict[int, mx.array]]]


def _features(backend: MLXBackend, rows: list[MLXBatchSequence], firsts: list[int]) -> BatchTopK:
    """Every hooked layer's SAE encode and top-k once for the whole batch (lazy); steered rows'
    clamped features read their pinned value, and their watched features come along."""
    resid = (backend._saes.keys() - backend._sites.keys()) | set(backend._recorded)
    read = {layer: backend._hooks[layer].take()[:, -1] for layer in resid}  # [B, d] each
    read.update({layer: s.take()[:, -1] for layer, s in backend._sites.items()})
    top: BatchTopK = {}
    for layer, sae in backend._saes.items():
        acts = sae.encode(read[layer])  # [B, width]
        watched: dict[int, mx.array] = {}
        pinned = False
        parts = [acts[r : r + 1] for r in range(len(rows))]
        for r, seq in enumerate(rows):
            ops = None if seq.steering is None else seq.steering.layers.get(layer)
            if seq.steering is None or ops is None:
                continue
            if ops.has_pins:
                parts[r] = seq.steering.pin(layer, parts[r], firsts[r])
                pinned = True
            if ops.has_watched:
                watched[r] = parts[r][:, ops.watched]
        if pinned:
            acts = mx.concatenate(parts)
        top[layer] = (*top_k(acts, backend._top_k), watched)
    return top


def _to_host(top: BatchTopK, n_rows: int) -> list[StepFeatures]:
    """Per row, each layer's top-k as numpy: one host copy per layer and kind for all rows."""
    host = {
        layer: (np.array(idx).astype(np.int64), np.array(vals, dtype=np.float32), watched)
        for layer, (idx, vals, watched) in top.items()
    }
    return [
        {
            layer: LayerTopK(
                indices[r : r + 1],
                values[r : r + 1],
                None if r not in watched else np.array(watched[r], dtype=np.float32),
            )
            for layer, (indices, values, watched) in host.items()
        }
        for r in range(n_rows)
    ]


def sample(backend: MLXBackend, seq: MLXBatchSequence, allowed: np.ndarray | None = None) -> int:
    """``MLXBackend.sample`` on one sequence: the token drawn with its step, or a masked redraw."""
    if not seq.ready:
        raise RuntimeError("sample_sequence() before the sequence's prompt was prefilled.")
    if allowed is not None:  # the token drawn with the step knew no mask: draw again, masked
        token = _draw(seq, allowed)
    else:
        token = seq.next_token if seq.next_token is not None else _draw(seq)
    seq.next_token = None
    return int(np.asarray(token))
