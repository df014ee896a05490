"""MLXBackend: mlx-lm models hooked at decoder-block outputs, SAE top-k and sampling on the device.

Each step builds one lazy graph (model, SAE encode, top-k, next-token sample) and evaluates it
once; only k (index, activation) pairs per position and hooked layer, and the sampled token, are
copied to the host.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from neuroscope.backend import (
    Backend,
    BatchStats,
    ForwardCapture,
    LayerTopK,
    ModelInfo,
    SamplingParams,
    StepFeatures,
    concat_features,
    median_seconds,
)
from neuroscope.errors import ConfigError
from neuroscope.sae import SAE
from neuroscope_mlx import batch
from neuroscope_mlx.batch import MLXBatch, MLXBatchSequence
from neuroscope_mlx.hooks import install_hooks
from neuroscope_mlx.loading import load_folder, resolve_dtype
from neuroscope_mlx.sae import MLXSAE, top_k
from neuroscope_mlx.sampling import sample_token
from neuroscope_mlx.sites import SiteState, install_site, site_width
from neuroscope_mlx.steering import SequenceSteering

if TYPE_CHECKING:
    from typing_extensions import Self

    from neuroscope.attribution import ResidualSplit
    from neuroscope.steering import CompiledSteering

# layer -> (indices, activations, watched activations or None), on the device
# Decode steps between releases of MLX's buffer cache (mlx-lm's interval).
CLEAR_CACHE_EVERY = 256

TopK = dict[int, tuple[mx.array, mx.array, mx.array | None]]


@dataclass
class AheadStep:
    """The next decode step, scheduled on the device before the host has read the current one.

    It runs on the token drawn at the end of the current step (``token``, lazy when scheduled), so
    the device computes step n+1 while the host builds step n's records (mlx-lm's pipelining).
    ``decode`` takes it when asked for that token; otherwise the cache is trimmed back.
    """

    token: mx.array  # the token it was run on (the sequence's next_token when scheduled)
    key_before: mx.array  # the sequence's key then: a redraw since (a masked sample) voids it
    key_after: mx.array  # the key after its own draw
    logits: mx.array  # float32 [vocab]
    next_token: mx.array  # drawn from ``logits``
    features: tuple[TopK, dict[int, mx.array]]


@dataclass
class MLXSequence:
    """The state of one sequence: its KV cache, how it samples, its last logits and the token
    already drawn from them (with the step's graph) that ``sample`` has not taken yet."""

    cache: list[Any]  # mlx-lm's per-layer caches
    sampling: SamplingParams
    key: mx.array  # the PRNG key, split at each non-greedy draw
    logits: mx.array  # float32 [vocab], of the last position (lazy until the step is evaluated)
    next_token: mx.array | None = None
    position: int = 0  # tokens in the cache
    steering: SequenceSteering | None = None  # this sequence's steering and monitors
    ahead: AheadStep | None = None  # the next decode step, already scheduled


class MLXBackend(Backend):
    name = "mlx"
    # Prompt tokens per forward pass: bounds the attention and activation memory of long prompts.
    prefill_step = 512
    # Schedule decode step n+1 before the host reads step n (see AheadStep); off: one step at a time.
    pipeline = True

    def __init__(self, model: nn.Module, config: dict[str, Any], dtype: mx.Dtype):
        """Wrap a loaded model (use :meth:`load`)."""
        self.dtype = dtype
        self.model, self.config = model, config
        self._hooks = install_hooks(self.model)
        self._info = _model_info(self.config, num_layers=len(self._hooks))
        self._saes: dict[int, MLXSAE] = {}
        self._sites: dict[int, SiteState] = {}  # layer -> its SAE's site, when not resid_post
        self._top_k = 10
        self._recorded: tuple[int, ...] = ()
        self._seq: MLXSequence | None = None
        self._batch: MLXBatch | None = None  # the running batch of decode_batch, made at its first
        self.last_residuals: dict[int, np.ndarray] = {}

    @classmethod
    def load(
        cls, model_dir: str | Path, *, dtype: str | None = None, dummy_weights: bool = False
    ) -> Self:
        mx_dtype = resolve_dtype(dtype)
        model, config = load_folder(model_dir, mx_dtype, dummy_weights=dummy_weights)
        return cls(model, config, mx_dtype)

    @classmethod
    def is_available(cls) -> bool:
        try:
            import mlx.core  # noqa: F401
            import mlx_lm  # noqa: F401
        except ImportError:
            return False
        return True

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def device(self) -> str:
        return "metal" if mx.default_device() == mx.gpu else "cpu"

    # --- configuration -------------------------------------------------------------------

    def set_saes(self, saes: Mapping[int, SAE], top_k: int) -> None:
        device_saes = {}
        sites = {}
        for layer, sae in saes.items():
            self._check_layer(layer)
            if sae.site == "attn_z":  # heads x head_dim, read off o_proj
                width = site_width(self.model.layers[layer], sae.site)
                if width not in (None, sae.d_model):
                    raise ConfigError(
                        f"SAE {sae.id} reads attn_z vectors of size {sae.d_model}; this model's "
                        f"attention heads give {width}."
                    )
            else:
                sae.check_model(self._info.hidden_size, model=f"this {self._info.model_type} model")
            if sae.site != "resid_post":
                sites[layer] = install_site(self.model.layers[layer], sae.site)
            if not 1 <= top_k <= sae.width:
                raise ConfigError(
                    f"top_k must be between 1 and the SAE width {sae.width}, not {top_k}."
                )
            device_saes[layer] = MLXSAE(sae)
        self._saes, self._top_k = device_saes, top_k
        for state in self._sites.values():
            state.capture, state.captured = False, None
        self._sites = sites
        self._update_capture()

    def set_steering(self, layer: int, vector: np.ndarray | None) -> None:
        self._check_layer(layer)
        self._drop_ahead()  # it was built with the old vector
        if vector is None:
            self._hooks[layer].steering = None
            return
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self._info.hidden_size,) or not np.isfinite(vector).all():
            raise ConfigError(
                f"A steering vector must be {self._info.hidden_size} finite numbers, "
                f"got shape {vector.shape}."
            )
        steering = mx.array(vector).astype(self.dtype)
        mx.eval(steering)
        self._hooks[layer].steering = steering

    def record_residuals(self, layers: Sequence[int]) -> None:
        """Also copy these layers' residuals to ``last_residuals`` after each prefill/decode.

        For parity tests and debugging (like forward_reference): it costs a host copy per step.
        """
        for layer in layers:
            self._check_layer(layer)
        self._recorded = tuple(layers)
        self._update_capture()

    # --- generation ----------------------------------------------------------------------

    def prefill(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        steering: CompiledSteering | None = None,
    ) -> StepFeatures:
        ids = self._check_ids(token_ids)
        self._seq = None
        cache = make_prompt_cache(self.model)
        steer = None if steering is None else SequenceSteering(steering, self._saes)
        # All but the last token: fill the cache; their logits are never evaluated (nor computed).
        steps = []
        body = ids[:-1]
        for start in range(0, len(body), self.prefill_step):
            self._run(cache, body[start : start + self.prefill_step], start, steer)
            features = self._features(steer, start)
            mx.eval(features, [c.state for c in cache])
            steps.append(self._to_host(features))
        key = mx.random.key(sampling.seed if sampling.seed is not None else secrets.randbits(63))
        logits = self._last_logits(cache, ids[-1:], len(body), steer)
        self._seq = MLXSequence(cache, sampling, key, logits, position=len(ids), steering=steer)
        steps.append(self._finish_step(self._seq, len(body)))
        self.last_residuals = {
            layer: np.concatenate([s[1][layer] for s in steps]) for layer in self._recorded
        }
        return concat_features([s[0] for s in steps])

    def decode(self, token_id: int) -> StepFeatures:
        seq = self._sequence("decode")
        ids = self._check_ids([token_id])
        first = seq.position
        ahead = self._take_ahead(seq, token_id)
        if ahead is None:
            seq.logits = self._last_logits(seq.cache, ids, first, seq.steering)
            features: tuple[TopK, dict[int, mx.array]] | None = None
        else:
            seq.logits, seq.next_token, seq.key = ahead.logits, ahead.next_token, ahead.key_after
            features = ahead.features
        seq.position += 1
        if seq.position % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()  # as mlx-lm: long runs otherwise keep every freed buffer cached
        host, residuals = self._finish_step(seq, first, features)
        self.last_residuals = residuals
        return host

    def sample(self, allowed: np.ndarray | None = None) -> int:
        seq = self._sequence("sample")
        if allowed is not None:  # the token drawn ahead knew no mask: draw again, masked
            token = self._draw(seq, allowed)
        else:
            token = seq.next_token if seq.next_token is not None else self._draw(seq)
        seq.next_token = None
        return int(np.asarray(token))

    # --- continuous batching (neuroscope.batching; the machinery is in neuroscope_mlx.batch) ---
    # Batched sequences have their own state (cache, logits, key), apart from the one sequence of
    # prefill/decode/sample above: neither disturbs the other, nor do calls between steps.

    def start(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        steering: CompiledSteering | None = None,
    ) -> MLXBatchSequence:
        """A new sequence for the running batch; nothing is computed until ``prefill_chunk``."""
        return batch.start(self, token_ids, sampling, steering)

    def prefill_chunk(self, seq: MLXBatchSequence, max_tokens: int) -> StepFeatures | None:
        """Up to ``max_tokens`` more of ``seq``'s prompt, alone; after the last chunk the
        features of every prompt position (as ``prefill``), None before."""
        return batch.prefill_chunk(self, seq, max_tokens)

    def decode_batch(
        self, seqs: Sequence[MLXBatchSequence], token_ids: Sequence[int]
    ) -> list[StepFeatures]:
        """One step of every sequence in ``seqs`` (the batch becomes exactly these)."""
        if self._batch is None:
            self._batch = MLXBatch()
        return batch.decode(self, self._batch, seqs, token_ids)

    def sample_sequence(self, seq: MLXBatchSequence, allowed: np.ndarray | None = None) -> int:
        """``sample`` on a batched sequence."""
        return batch.sample(self, seq, allowed)

    @property
    def last_logits(self) -> np.ndarray:
        """The float32 logits [vocab] that sample() reads (for tests and debugging)."""
        return np.array(self._sequence("last_logits").logits)

    def _run(
        self,
        cache: list[Any],
        ids: list[int] | mx.array,
        first: int,
        steering: SequenceSteering | None,
    ) -> mx.array:
        """Build the (lazy) forward graph of ``ids`` at positions from ``first``: the logits.

        A request's steering joins the graph through the hooks' ``edit``, which is set only
        while the graph is built.
        """
        edited = []
        if steering is not None:
            for layer in steering.layers:
                hook = self._hooks[layer]
                hook.edit = lambda h, layer=layer: steering.apply(layer, h, first)
                edited.append(hook)
        try:
            inputs = ids if isinstance(ids, mx.array) else mx.array([ids])  # [1, T]
            return self.model(inputs, cache=cache)
        finally:
            for hook in edited:
                hook.edit = None

    def _last_logits(
        self,
        cache: list[Any],
        ids: list[int],
        first: int = 0,
        steering: SequenceSteering | None = None,
    ) -> mx.array:
        """The (lazy) float32 logits of the last of ``ids``, run through ``cache``."""
        return self._run(cache, ids, first, steering)[0, -1].astype(mx.float32)

    def _finish_step(
        self,
        seq: MLXSequence,
        first: int,
        features: tuple[TopK, dict[int, mx.array]] | None = None,
    ) -> tuple[StepFeatures, dict[int, np.ndarray]]:
        """Sample the next token from the step's logits and take its features, in one evaluation
        (``features``: of a step scheduled ahead, whose token is drawn already). With
        ``pipeline``, the next step is scheduled before this one's features are read."""
        if features is None:
            seq.next_token = self._draw(seq)
            features = self._features(seq.steering, first)
        if not self.pipeline or not can_trim_prompt_cache(seq.cache):
            mx.eval(seq.next_token, seq.logits, features)
            return self._to_host(features)
        mx.async_eval(seq.next_token, seq.logits, features)
        seq.ahead = self._schedule_ahead(seq)
        return self._to_host(features)  # waits for this step only; the next one runs meanwhile

    def _schedule_ahead(self, seq: MLXSequence) -> AheadStep:
        """Build and start the step on the token just drawn, without the host reading it."""
        assert seq.next_token is not None
        token = seq.next_token
        first = seq.position
        logits = self._run(seq.cache, token.reshape(1, 1), first, seq.steering)[0, -1]
        logits = logits.astype(mx.float32)
        features = self._features(seq.steering, first)
        key_after, sub = seq.key, None
        if not seq.sampling.greedy:
            key_after, sub = mx.random.split(seq.key)
        next_token = sample_token(logits, seq.sampling, sub)
        mx.async_eval(next_token, logits, features)
        return AheadStep(token, seq.key, key_after, logits, next_token, features)

    def _take_ahead(self, seq: MLXSequence, token_id: int) -> AheadStep | None:
        """The step scheduled ahead if it ran on ``token_id`` with the sequence's current key;
        otherwise it is dropped (and the cache trimmed back)."""
        ahead, seq.ahead = seq.ahead, None
        if ahead is None:
            return None
        if int(np.asarray(ahead.token)) == token_id and ahead.key_before is seq.key:
            return ahead
        trim_prompt_cache(seq.cache, 1)
        return None

    def _drop_ahead(self) -> None:
        if self._seq is not None and self._seq.ahead is not None:
            self._seq.ahead = None
            trim_prompt_cache(self._seq.cache, 1)

    @staticmethod
    def _draw(seq: MLXSequence, allowed: np.ndarray | None = None) -> mx.array:
        key = None
        if not seq.sampling.greedy:
            seq.key, key = mx.random.split(seq.key)
        return sample_token(seq.logits, seq.sampling, key, allowed)

    def _sequence(self, what: str) -> MLXSequence:
        if self._seq is None:
            raise RuntimeError(f"{what}() before prefill(): start a sequence with prefill().")
        return self._seq

    # --- measurement ---------------------------------------------------------------------

    def peak_memory_mib(self) -> float | None:
        peak = mx.get_peak_memory()
        return peak / 2**20 if peak else None

    def time_sae_encode(self, sae: SAE, k: int, min_seconds: float = 0.3) -> float | None:
        device_sae = MLXSAE(sae)
        x = np.random.default_rng(0).standard_normal((1, sae.d_model)).astype(np.float32)
        residual = mx.array(x).astype(self.dtype)
        mx.eval(residual)

        def step() -> None:
            indices, values = device_sae.top_k(residual, k)
            mx.eval(indices, values)
            np.array(indices), np.array(values)

        return median_seconds(step, min_seconds)

    # --- SAE features --------------------------------------------------------------------

    def _update_capture(self) -> None:
        self._drop_ahead()  # it was built with the old SAEs or recorded layers
        for layer, hook in enumerate(self._hooks):
            own = layer in self._saes and layer not in self._sites  # an SAE reading the output
            hook.capture = own or layer in self._recorded
            hook.captured = None
        for state in self._sites.values():
            state.capture, state.captured = True, None

    def _features(
        self, steering: SequenceSteering | None = None, first: int = 0
    ) -> tuple[TopK, dict[int, mx.array]]:
        """Top-k per hooked layer and recorded residuals of the last forward pass (lazy).

        With steering, clamped features read their value at steered positions (from ``first``)
        and the watched features' full activations come along.
        """
        resid = (self._saes.keys() - self._sites.keys()) | set(self._recorded)
        captured = {layer: self._hooks[layer].take()[0] for layer in resid}
        read = {**captured, **{layer: s.take()[0] for layer, s in self._sites.items()}}
        top: TopK = {}
        for layer, sae in self._saes.items():
            if steering is None:
                top[layer] = (*sae.top_k(read[layer], self._top_k), None)
                continue
            acts = steering.pin(layer, sae.encode(read[layer]), first)
            watched = steering.watched(layer)
            top[layer] = (*top_k(acts, self._top_k), None if watched is None else acts[:, watched])
        residuals = {layer: captured[layer].astype(mx.float32) for layer in self._recorded}
        return top, residuals

    @staticmethod
    def _to_host(
        features: tuple[TopK, dict[int, mx.array]],
    ) -> tuple[StepFeatures, dict[int, np.ndarray]]:
        top, residuals = features
        host = {
            layer: LayerTopK(
                indices=np.array(idx).astype(np.int64),
                activations=np.array(vals, dtype=np.float32),
                watched=None if watched is None else np.array(watched, dtype=np.float32),
            )
            for layer, (idx, vals, watched) in top.items()
        }
        return host, {layer: np.array(r) for layer, r in residuals.items()}

    # --- batch statistics and reference --------------------------------------------------

    def batch_feature_stats(
        self, batch: Sequence[Sequence[int]], layer: int, top_n: int = 0
    ) -> BatchStats:
        if layer not in self._saes:
            raise ConfigError(f"No SAE is set at layer {layer}; call set_saes first.")
        if not batch:
            raise ConfigError("batch_feature_stats needs at least one sequence.")
        rows = [self._check_ids(seq) for seq in batch]
        seq_len = max(len(r) for r in rows)
        ids = np.zeros((len(rows), seq_len), dtype=np.int32)  # right padding; id 0 is never read
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        hook = self._hooks[layer]
        # No cache: a causal mask already keeps right padding out of every real token's view.
        # Only the residual at `layer` is evaluated, so later blocks and the logits never run.
        self.model(mx.array(ids))
        residual = self._sites[layer].take() if layer in self._sites else hook.take()
        self._update_capture()
        acts = self._saes[layer].encode(residual).reshape(len(rows) * seq_len, -1)
        pos = mx.arange(seq_len)[None]
        real = (pos >= 1) & (pos < mx.array([len(r) for r in rows])[:, None])  # no BOS, no padding
        acts = acts * real.reshape(-1, 1)
        fired = acts > 0
        count = fired.sum(axis=0)
        total = acts.sum(axis=0)
        mean = total / mx.maximum(count, 1)
        m2 = mx.where(fired, mx.square(acts - mean), 0.0).sum(axis=0)
        stats = [count, total, m2, acts.max(axis=0), real.sum()]
        n = min(top_n, acts.shape[0])
        if n > 0:
            tokens, values = top_k(acts.T, n)  # [width, n]
            stats += [mx.where(values > 0, tokens.astype(mx.int32), -1), mx.maximum(values, 0.0)]
        mx.eval(stats)
        top_values = top_tokens = None
        if n > 0:
            pad = ((0, 0), (0, top_n - n))
            top_tokens = np.pad(np.array(stats[5]).astype(np.int64), pad, constant_values=-1)
            top_values = np.pad(np.array(stats[6], dtype=np.float32), pad)
        return BatchStats(
            tokens=int(np.asarray(stats[4])),
            seq_len=seq_len,
            fire_count=np.array(stats[0]).astype(np.int64),
            act_sum=np.array(stats[1]).astype(np.float64),
            act_m2=np.array(stats[2]).astype(np.float64),
            act_max=np.array(stats[3], dtype=np.float32),
            top_values=top_values,
            top_tokens=top_tokens,
        )

    def forward_reference(
        self, token_ids: Sequence[int], layers: Sequence[int]
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        ids = self._check_ids(token_ids)
        for layer in layers:
            self._check_layer(layer)
            self._hooks[layer].capture = True
        try:
            logits = self.model(mx.array([ids]))[0].astype(mx.float32)
            residuals = {layer: self._hooks[layer].take()[0].astype(mx.float32) for layer in layers}
            mx.eval(logits, residuals)
            return {layer: np.array(r) for layer, r in residuals.items()}, np.array(logits)
        finally:
            self._update_capture()

    def capture(
        self,
        token_ids: Sequence[int],
        layers: Sequence[int],
        *,
        attention: bool = False,
        lens_top: int = 0,
    ) -> ForwardCapture:
        from neuroscope_mlx.capture import capture

        ids = self._check_ids(token_ids)
        for layer in layers:
            self._check_layer(layer)
        self._drop_ahead()  # the pass below changes what the hooks capture
        return capture(self, ids, layers, attention, lens_top)

    # --- checks --------------------------------------------------------------------------

    def attribute(
        self,
        token_ids: Sequence[int],
        layer: int,
        position: int,
        direction_at: Callable[[np.ndarray], np.ndarray],
    ) -> ResidualSplit:
        from neuroscope_mlx.attribution import attribute

        ids = self._check_ids(token_ids)
        self._check_layer(layer)
        if not 0 <= position < len(ids):
            raise ConfigError(f"position {position} is outside the {len(ids)} tokens.")
        self._drop_ahead()  # the pass below wraps the blocks for a moment
        return attribute(self, ids, layer, position, direction_at)

    def upstream_gradient(
        self,
        token_ids: Sequence[int],
        from_layer: int,
        layer: int,
        position: int,
        direction_at: Callable[[np.ndarray], np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        from neuroscope_mlx.attribution import upstream_gradient

        ids = self._check_ids(token_ids)
        self._check_layer(from_layer)
        self._check_layer(layer)
        self._drop_ahead()  # the passes below edit the residual for a moment
        return upstream_gradient(self, ids, from_layer, layer, position, direction_at)

    def forward_patched(
        self, token_ids: Sequence[int], layer: int, residual: np.ndarray, positions: Sequence[int]
    ) -> np.ndarray:
        ids = self._check_ids(token_ids)
        self._check_layer(layer)
        self._drop_ahead()  # the pass below edits the residual for a moment
        hook = self._hooks[layer]
        replacement = mx.array(np.asarray(residual))[None]
        mask_np = np.zeros(len(ids), dtype=bool)
        mask_np[list(positions)] = True
        mask = mx.array(mask_np)[None, :, None]
        before = hook.edit
        hook.edit = lambda h: mx.where(mask, replacement.astype(h.dtype), h)
        try:
            logits = self.model(mx.array([ids]))[0].astype(mx.float32)
            mx.eval(logits)
            return np.array(logits)
        finally:
            hook.edit = before
            self._update_capture()


def _model_info(config: dict, num_layers: int) -> ModelInfo:
    text = {**config, **config.get("text_config", {})}  # multimodal configs nest the text model
    return ModelInfo(
        model_type=str(config.get("model_type", "unknown")),
        num_layers=num_layers,
        hidden_size=int(text["hidden_size"]),
        vocab_size=int(text["vocab_size"]),
        max_position_embeddings=text.get("max_position_embeddings"),
    )
