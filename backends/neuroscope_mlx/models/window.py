"""KV caches for sliding-window layers: they hold the last ``window`` keys, not every token.

A sliding layer's query at position q sees keys q - W + 1 .. q (W = ``window``, itself included),
so older keys are never read again. Keeping them costs memory that grows with the context (at 8k
tokens, Gemma 2 2B's 13 sliding layers would hold 8k keys each where 4k are ever used).

- ``WindowKVCache``, one sequence: mlx-lm's ``RotatingKVCache`` with ``max_size = W``, reused as
  it is: a prefill chunk of S tokens is attended over the last W - 1 keys and the S new ones, in
  order of position (the model's mask comes from absolute positions, ``gemma2.attention_span``);
  a decoded token overwrites the oldest slot of a ring of W, every key of which is inside the
  window, so it needs no mask. Added: one decoded token can always be trimmed off again (the
  pipelined decode of ``MLXBackend`` runs a step ahead and takes it back when the token differs),
  because the key it overwrote was the one falling out of the window; mlx-lm refuses any trim
  once the ring is full.
- ``WindowBatchKVCache``, the running batch: mlx-lm's ``BatchKVCache`` (left-padded rows, every
  row ending at the same column) whose columns older than the window are cut off every
  ``step`` tokens (one copy per 256 steps), so it holds at most W - 1 + 256 columns. A row's
  positions are its columns shifted by a constant, so the window stays a difference of columns
  and the masks of ``gemma2.batch_attention_span`` stay exact; ``left_padding`` may go negative
  (every column of such a row is real). A sequence joins from its ``WindowKVCache`` (its last
  W keys, in order of position).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, RotatingKVCache


class WindowKVCache(RotatingKVCache):
    """One sequence's sliding-layer cache: the last ``window`` keys (+ a prefill chunk)."""

    def __init__(self, window: int):
        super().__init__(max_size=window, keep=0)
        self.window = window
        self._one_step = False  # the last update was one token: it can be trimmed off
        self._stale = False  # a full ring's slot about to be written holds a trimmed-off key

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self._one_step, self._stale = keys.shape[2] == 1, False
        return super().update_and_fetch(keys, values)

    def is_trimmable(self) -> bool:
        return self.offset < self.max_size or self._one_step

    def trim(self, n: int) -> int:
        if self.offset >= self.max_size:  # a full ring: only the last decoded token comes back
            n = min(n, int(self._one_step))
            self._stale = n > 0
        self._one_step = False
        return int(super().trim(n))

    def ordered(self) -> tuple[mx.array, mx.array]:
        """The keys and values held, oldest position first: [1, heads, min(offset, W), dim]."""
        keys, values = self._temporal_order(self.keys), self._temporal_order(self.values)
        # (after a trim of a full ring, its oldest slot in this order is the trimmed-off key)
        held = min(self.offset, keys.shape[2] - int(self._stale))
        return keys[..., -held:, :], values[..., -held:, :]

    @classmethod
    def merge(cls, caches: list[Any]) -> WindowBatchKVCache:
        return WindowBatchKVCache.merge(caches)


class WindowBatchKVCache(BatchKVCache):
    """The batch's sliding-layer cache: left-padded rows, columns before the window cut off."""

    def __init__(self, left_padding: list[int], window: int):
        super().__init__(left_padding)
        self.window = window

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        out = super().update_and_fetch(keys, values)
        # After this step's keys are fetched: the next query (one column on) never reads the
        # columns before the last W - 1; drop them once they are a step's worth.
        cut = self._idx - (self.window - 1)
        if cut >= self.step:
            held: Any = (self.keys, self.values)  # (mlx-lm's attributes start as None)
            self.keys, self.values = held[0][..., cut:, :], held[1][..., cut:, :]
            self._idx -= cut
            self.left_padding = self.left_padding - cut
        return out

    @classmethod
    def merge(cls, caches: list[Any]) -> WindowBatchKVCache:
        """A batch of ``WindowKVCache``s: each row's held keys, right-aligned (left padding)."""
        held = [c.ordered() for c in caches]
        length = max(k.shape[2] for k, _ in held)
        window = caches[0].window
        batch: Any = cls([length - k.shape[2] for k, _ in held], window)
        pad = [[(0, 0), (0, 0), (length - k.shape[2], 0), (0, 0)] for k, _ in held]
        batch.keys = mx.concatenate([mx.pad(k, p) for (k, _), p in zip(held, pad, strict=True)])
        batch.values = mx.concatenate([mx.pad(v, p) for (_, v), p in zip(held, pad, strict=True)])
        batch.offset = mx.array([c.offset for c in caches])  # each row's own position
        batch._idx = length
        return batch
