"""Gemma 3 (text) for MLX, exact against transformers' Gemma3ForCausalLM.

mlx-lm 0.32's gemma3_text multiplies the embeddings by sqrt(hidden_size) rounded to bfloat16
whatever the model's dtype, so in float32 its residual stream drifts ~1e-3 from transformers.
Gemma 3 is Gemma 2 (sandwich norms, GeGLU MLP, ``query_pre_attn_scalar``, tied embeddings; the
shared parts come from ``gemma2``) with:

- RMSNorm of each head's queries and keys (``q_norm``, ``k_norm``) before the rotary embedding;
- local and global layers: sliding-window layers ("sliding_attention", five of every six on the
  Hub, window 512) rotate with ``rope_local_base_freq`` (10 000), global ones with ``rope_theta``
  (1 000 000) and, on the larger models, linear RoPE scaling. transformers 5 writes this as
  ``layer_types`` and a ``rope_parameters`` dict per layer type; older configs on the Hub as
  ``sliding_window_pattern``, ``rope_theta``, ``rope_local_base_freq`` and ``rope_scaling``;
- no attention or final logit soft-capping by default (kept when a config asks for it).

The embedding normaliser is sqrt(hidden_size) rounded to the model dtype, as transformers does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import KVCache

from neuroscope_mlx.models.gemma2 import (
    FULL,
    MLP,
    SLIDING,
    AttentionSpan,
    RMSNorm,
    layer_spans,
    make_cache,
    softcap,
)


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
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 6
    layer_types: list[str] | None = None
    rope_parameters: dict[str, Any] | None = None
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: dict[str, Any] | None = None
    hidden_activation: str | None = "gelu_pytorch_tanh"
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    use_bidirectional_attention: bool | None = False

    def __post_init__(self) -> None:
        if (
            self.layer_types is None
        ):  # older configs: every sliding_window_pattern-th layer is global
            p = self.sliding_window_pattern
            self.layer_types = [
                SLIDING if (i + 1) % p else FULL for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers."
            )
        if self.use_bidirectional_attention:
            raise ValueError(
                "Gemma 3 with bidirectional attention (EmbeddingGemma) is not supported."
            )
        if self.hidden_activation not in (None, "gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(
                f"Gemma 3 with activation {self.hidden_activation!r} is not supported."
            )
        for kind in set(self.layer_types):
            self.rope(kind)  # refuse an unsupported RoPE at load time, not at the first token

    def rope(self, layer_type: str) -> tuple[float, float]:
        """(base, position scale) of the rotary embedding of one kind of layer."""
        nested = self.rope_parameters or {}
        if layer_type in nested:  # transformers 5: one dict per layer type
            params = dict(nested[layer_type])
        elif layer_type == SLIDING:
            params = {"rope_theta": self.rope_local_base_freq}
        else:
            params = {"rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        params.setdefault(
            "rope_theta", self.rope_local_base_freq if layer_type == SLIDING else self.rope_theta
        )
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            return float(params["rope_theta"]), 1.0
        if rope_type == "linear":  # positions divided by the factor
            return float(params["rope_theta"]), 1.0 / float(params["factor"])
        raise ValueError(f"Gemma 3 with rope_type {rope_type!r} ({layer_type}) is not supported.")


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
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
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        base, scale = args.rope(layer_type)
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=base, scale=scale)

    def __call__(self, x: mx.array, span: AttentionSpan, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.q_norm(q), self.k_norm(k)

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


class TransformerBlock(nn.Module):
    """Norms before and after both attention and MLP ("sandwich" norms), residual adds after."""

    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(args, layer_type)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        d, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def __call__(self, x: mx.array, span: AttentionSpan, cache: KVCache | None = None) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), span, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, kind) for kind in args.layer_types or []]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list[KVCache | None] | None = None) -> mx.array:
        h = self.embed_tokens(inputs)
        # The normaliser in the model's dtype: exact in float32 (mlx-lm rounds it to bfloat16).
        h = h * mx.array(math.sqrt(self.args.hidden_size), dtype=h.dtype)
        cache = cache or [None] * len(self.layers)
        layer_types = self.args.layer_types or []
        spans = layer_spans(inputs.shape[1], cache, layer_types, self.args.sliding_window)
        # Layers are called positionally as (h, span, cache), like mlx-lm's (h, mask, cache),
        # so wrappers around them see the usual signature.
        for layer, layer_type, c in zip(self.layers, layer_types, cache, strict=True):
            h = layer(h, spans[layer_type], c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Gemma3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list[KVCache | None] | None = None) -> mx.array:
        out = self.model(inputs, cache)
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(out)
        else:
            logits = self.lm_head(out)
        return softcap(logits, self.args.final_logit_softcapping)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # With tied embeddings a saved lm_head is a copy of them; rotary buffers are recomputed.
        tied = self.args.tie_word_embeddings
        return {
            k: v
            for k, v in weights.items()
            if not (tied and k == "lm_head.weight") and "rotary_emb" not in k
        }

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers

    def make_cache(self) -> list[Any]:
        return make_cache(self.args.layer_types or [], self.args.sliding_window)


# --- Gemma 3 4B and larger: model_type "gemma3", a vision tower beside this text model ------------

# transformers' Gemma3TextConfig defaults, for the fields a checkpoint's text_config leaves out.
TEXT_CONFIG_DEFAULTS: dict[str, Any] = {
    "model_type": "gemma3_text",
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "vocab_size": 262208,
}


@dataclass
class MultimodalModelArgs(BaseModelArgs):
    model_type: str
    text_config: dict[str, Any]


class MultimodalModel(nn.Module):
    """The language model of a Gemma 3 image-text checkpoint (images are not read: text only)."""

    def __init__(self, args: MultimodalModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        text = {**TEXT_CONFIG_DEFAULTS, **args.text_config, "model_type": "gemma3_text"}
        self.language_model = Model(ModelArgs.from_dict(text))

    def __call__(self, inputs: mx.array, cache: list[KVCache | None] | None = None) -> mx.array:
        return self.language_model(inputs, cache)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # Checkpoints name the text model language_model.model.* (transformers 5 too, on save);
        # the vision tower and the projector are left out.
        prefix = "language_model."
        text = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        return {prefix + k: v for k, v in self.language_model.sanitize(text).items()}

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.language_model.layers

    def make_cache(self) -> list[Any]:
        return self.language_model.make_cache()
