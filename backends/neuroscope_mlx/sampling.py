"""Next-token sampling on the device: temperature, top-k, top-p, with an explicit PRNG key."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from neuroscope.backend import SamplingParams


def sample_token(
    logits: mx.array,
    params: SamplingParams,
    key: mx.array | None,
    allowed: np.ndarray | None = None,
) -> mx.array:
    """One token id (uint32 scalar) from float32 ``logits`` [vocab]; greedy needs no key.

    ``allowed`` (bool [n], n <= vocab) bars every token it does not mark (structured output).
    """
    if allowed is not None:
        keep = np.zeros(logits.shape[-1], dtype=bool)
        n = min(len(allowed), logits.shape[-1])
        keep[:n] = allowed[:n]
        logits = mx.where(mx.array(keep), logits, mx.array(-mx.inf, logits.dtype))
    if params.greedy:
        return mx.argmax(logits, axis=-1)
    logits = logits / params.temperature
    neg_inf = mx.array(-mx.inf, logits.dtype)
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth_largest = mx.min(mx.topk(logits, params.top_k, axis=-1))
        logits = mx.where(logits >= kth_largest, logits, neg_inf)
    if params.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p: a token
        # stays if the mass strictly before it (in descending order) is still below top_p.
        desc = mx.sort(logits, axis=-1)[::-1]
        probs = mx.softmax(desc, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs
        # ``before <= 0``: the most likely token stays (a tiny top_p rounds to 0 in float32).
        cutoff = mx.min(mx.where((before < params.top_p) | (before <= 0), desc, mx.inf))
        logits = mx.where(logits >= cutoff, logits, neg_inf)
    return mx.random.categorical(logits, key=key)
