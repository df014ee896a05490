"""Gemma 2 for MLX, exact against transformers' Gemma2ForCausalLM, sliding window included.

mlx-lm 0.32's gemma2 attends globally on every layer; Gemma 2 attends within a sliding window of
``sliding_window`` tokens on its "sliding_attention" layers (the even ones), so its outputs drift
from the reference once a sequence is longer than the window. This file keeps mlx-lm's shape
(ModelArgs / Attention / MLP / TransformerBlock / Model, the same weight names) and adds:

- per-layer attention kind from ``layer_types``; a sliding layer sees key ``k`` from query ``q``
  iff ``q - W < k <= q`` (``W`` keys, itself included), in prefill and in decode;
- masks built from absolute positions, exact for any prompt length, chunking and decode
  position: a plain KV cache on full layers, and on sliding layers one that holds only the last
  ``W`` keys (``window.WindowKVCache``, mlx-lm's rotating cache), so their attention cost and
  memory stay bounded; in a batch, per-row masks from per-row offsets and left padding;
- RMSNorm computed in float32 with ``(1 + w)`` and cast back, as transformers does;
- the embedding normaliser ``sqrt(hidden_size)`` rounded to the model dtype, as Gemma does;
- softcapping of attention logits and of final logits, ``query_pre_attn_scalar`` scaling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import KVCache

from neuroscope_mlx.models.window import WindowKVCache

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    sliding_window: int | None = 4096
    layer_types: list[str] | None = None
    rope_theta: float | None = None
    rope_parameters: dict[str, Any] | None = None
    hidden_activation: str | None = "gelu_pytorch_tanh"
    attention_bias: bool = False

    def __post_init__(self) -> None:
        if self.layer_types is None:  # configs written before transformers named them
            self.layer_types = [
                SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers."
            )
        if self.rope_theta is None:  # transformers 5 nests it under rope_parameters
            self.rope_theta = float((self.rope_parameters or {}).get("rope_theta", 10000.0))
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"Gemma 2 with rope_type {rope_type!r} is not supported.")
        if self.hidden_activation not in (None, "gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(
                f"Gemma 2 with activation {self.hidden_activation!r} is not supported."
            )


class RMSNorm(nn.Module):
    """``x / rms(x) * (1 + w)`` in float32, cast back to the input dtype (Gemma's convention)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


class AttentionSpan(NamedTuple):
    """Which cached keys a layer reads (from ``key_start`` on) and which of them each query sees."""

    key_start: int
    mask: mx.array | None  # bool [queries, keys]; None: every key read is visible


def attention_span(n_queries: int, offset: int, window: int | None) -> AttentionSpan:
    """Span for queries at positions ``offset .. offset + n_queries - 1``, keys from position 0.

    Causal: key k is visible to query q iff k <= q; with a window W also iff q - k < W. Keys before
    the first query's window are never visible, so they are not read at all.
    """
    key_start = max(0, offset - window + 1) if window else 0
    if n_queries == 1:  # the one query sees every key read
        return AttentionSpan(key_start, None)
    q = mx.arange(offset, offset + n_queries)[:, None]
    k = mx.arange(key_start, offset + n_queries)[None]
    visible = k <= q
    if window:
        visible = visible & (q - k < window)
    return AttentionSpan(key_start, visible)


def batch_attention_span(
    n_queries: int, length: int, left_padding: mx.array, window: int | None
) -> AttentionSpan:
    """Span for a left-padded batch (mlx-lm's ``BatchKVCache``): ``length`` cache columns before
    these queries, row ``b``'s real keys from column ``left_padding[b]`` on.

    Every row ends at the same column, so a row's own positions are its columns shifted by its
    padding: causality and the window are the same differences of columns for every row, and only
    the padding (never a real key) differs per row. Mask: bool [B, 1, 1, queries, keys], for the
    scores [B, kv heads, repeats, queries, keys].
    """
    key_start = max(0, length - window + 1) if window else 0
    q = mx.arange(length, length + n_queries)[:, None]
    k = mx.arange(key_start, length + n_queries)[None]
    visible = k <= q
    if window:
        visible = visible & (q - k < window)
    real = k[None] >= left_padding[:, None, None]  # [B, 1, keys]: not padding
    return AttentionSpan(key_start, (visible[None] & real)[:, None, None])


def layer_spans(
    n_queries: int, caches: Sequence[Any | None], kinds: Sequence[str], window: int | None
) -> dict[str, AttentionSpan]:
    """Each layer kind's span for ``n_queries`` new tokens after what the caches hold (the first
    layer of each kind tells for all of its kind): one sequence, or a left-padded batch.

    A sliding layer's ``WindowKVCache`` hands over only the keys from the window's start on, so
    its span reads them all (``key_start`` 0); the mask is the same, from absolute positions.
    """
    spans = {}
    for kind in set(kinds):
        cache = caches[list(kinds).index(kind)]
        size = window if kind == SLIDING else None
        if cache is not None and isinstance(cache.offset, mx.array):  # a batch: rows' offsets
            spans[kind] = batch_attention_span(n_queries, cache.size(), cache.left_padding, size)
            continue
        span = attention_span(n_queries, cache.offset if cache is not None else 0, size)
        if isinstance(cache, WindowKVCache):
            span = AttentionSpan(0, span.mask)
        spans[kind] = span
    return spans


def make_cache(kinds: Sequence[str], window: int | None) -> list[Any]:
    """A plain KV cache for full layers; the last ``window`` keys only for sliding ones."""
    return [WindowKVCache(window) if kind == SLIDING and window else KVCache() for kind in kinds]


def softcap(x: mx.array, cap: float | None) -> mx.array:
    return x if cap is None else mx.tanh(x / cap) * cap


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, self.head_dim = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = args.query_pre_attn_scalar**-0.5
        self.logit_cap = args.attn_logit_softcapping
        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        assert args.rope_theta is not None  # ModelArgs.__post_init__ sets it
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, span: AttentionSpan, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        # A batch cache's offset is each row's own position ([B]): RoPE takes it per row.
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        k, v = k[..., span.key_start :, :], v[..., span.key_start :, :]

        # Grouped-query attention: each key/value head serves `repeats` query heads.
        repeats = self.n_heads // self.n_kv_heads
        q = q.reshape(B, self.n_kv_heads, repeats, L, self.head_dim)
        k, v = mx.expand_dims(k, 2), mx.expand_dims(v, 2)

        scores = softcap((q @ k.swapaxes(-1, -2)) * self.scale, self.logit_cap)
        if span.mask is not None:
            scores = mx.where(span.mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        weights = mx.softmax(scores, axis=-1, precise=True)
        out = (weights @ v).reshape(B, self.n_heads, L, self.head_dim)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Norms before and after both attention and MLP ("sandwich" norms), residual adds after."""

    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        d, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def __call__(self, x: mx.array, span: AttentionSpan, cache: KVCache | None = None) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), span, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        assert args.layer_types is not None  # ModelArgs.__post_init__ sets it
        self.layers = [TransformerBlock(args, kind) for kind in args.layer_types]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        h = self.embed_tokens(inputs)
        # Gemma rounds the normaliser to the model dtype (sqrt(3584) is 60.0 in bfloat16).
        h = h * mx.array(math.sqrt(self.args.hidden_size), dtype=h.dtype)
        caches: list[KVCache | None] = list(cache) if cache else [None] * len(self.layers)
        kinds = self.args.layer_types
        assert kinds is not None
        spans = layer_spans(inputs.shape[1], caches, kinds, self.args.sliding_window)
        # Layers are called positionally as (h, span, cache), like mlx-lm's (h, mask, cache),
        # so wrappers around them see the usual signature.
        for layer, layer_type, c in zip(self.layers, kinds, caches, strict=True):
            h = layer(h, spans[layer_type], c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = GemmaModel(args)

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        out = self.model(inputs, cache)
        logits = self.model.embed_tokens.as_linear(out)  # embeddings are tied
        return softcap(logits, self.args.final_logit_softcapping)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # A saved lm_head is a copy of the tied embedding; rotary buffers are recomputed.
        return {k: v for k, v in weights.items() if k != "lm_head.weight" and "rotary_emb" not in k}

    @property
    def layers(self) -> list[Any]:  # blocks, or the hooks' wrappers around them
        return self.model.layers

    def make_cache(self) -> list[Any]:
        assert self.args.layer_types is not None
        return make_cache(self.args.layer_types, self.args.sliding_window)
