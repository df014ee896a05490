"""TorchBackend: transformers models on CUDA or CPU, hooked at decoder-block outputs."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from neuroscope.backend import (
    Backend,
    BatchStats,
    ForwardCapture,
    LayerTopK,
    ModelInfo,
    SamplingParams,
    StepFeatures,
    median_seconds,
)
from neuroscope.errors import ConfigError, ModelLoadError
from neuroscope.sae import SAE
from neuroscope_torch.dummy import build_dummy
from neuroscope_torch.sae import TorchSAE
from neuroscope_torch.sites import SiteHook, site_target, site_width
from neuroscope_torch.steering import SequenceSteering

if TYPE_CHECKING:
    from typing_extensions import Self

    from neuroscope.attribution import ResidualSplit
    from neuroscope.steering import CompiledSteering

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Soft-capped attention (Gemma 2) is exact only in the eager kernel.
EAGER_MODELS = {"gemma2"}


class ResidualHook:
    """Sits on one decoder block: records its output and, when steering, changes it first.

    ``edit`` is a request's steering, set only for the duration of one of its forward passes
    (so nothing of a request outlives it); ``add`` is the session-wide ``set_steering`` vector.
    """

    def __init__(self) -> None:
        self.captured: torch.Tensor | None = None
        self.capture = False
        self.add: torch.Tensor | None = None
        self.edit: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if self.add is not None:
            hidden = hidden + self.add.to(hidden.dtype)
        if self.edit is not None:
            hidden = self.edit(hidden)
        if self.capture:
            self.captured = hidden
        if self.add is None and self.edit is None:
            return None
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def take(self) -> torch.Tensor:
        """The captured output of the last forward pass (and forget it)."""
        if self.captured is None:
            raise RuntimeError("The hooked block did not run: no residual was captured.")
        captured, self.captured = self.captured, None
        return captured


def _decoder_layers(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList:
    """The list of decoder blocks, found by shape rather than by name, so any architecture works."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) == num_layers:
        return layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise ModelLoadError(f"Cannot find the {num_layers} decoder blocks of {type(model).__name__}.")


# (indices [T, k], float32 values [T, k], float32 watched activations [T, w] or None) per layer
DeviceTop = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]

# Above this many float32 numbers, the layers' activations are not stacked for one top-k (a long
# prefill chunk with every layer hooked would copy gigabytes); one top-k per layer then.
STACK_LIMIT = 1 << 24


def _top_k_all(
    acts: Mapping[int, torch.Tensor], k: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The top-k of every layer's activations [T, width]: one ``topk`` over the stacked layers per
    SAE width (one kernel for 26 layers instead of 26), per layer where the stack would be large."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for layer, a in acts.items():
        by_shape.setdefault(tuple(a.shape), []).append(layer)
    for shape, layers in by_shape.items():
        if len(layers) == 1 or len(layers) * int(np.prod(shape)) > STACK_LIMIT:
            for layer in layers:
                values, indices = acts[layer].topk(k, dim=-1)
                out[layer] = (indices, values)
            continue
        values, indices = torch.stack([acts[layer] for layer in layers]).topk(k, dim=-1)
        for i, layer in enumerate(layers):
            out[layer] = (indices[i], values[i])
    return out


# Pack the step's results into one copy on the CPU too (tests exercise the accelerators' path here).
PACK_ON_CPU = False


def _to_host(
    top: DeviceTop, token: torch.Tensor | None = None, pack: bool = True
) -> tuple[StepFeatures, int | None]:
    """Every layer's top-k, the watched activations and the drawn token in ONE device-to-host copy
    (on an accelerator each copy waits for the device: a step with 26 hooked layers used to wait
    52 times, then once more for the token). All of it travels as int32: indices and the token as
    numbers, float32 values bit-cast (exact). Without ``pack`` (CPU tensors: nothing to wait for,
    nothing to copy), numpy views of the tensors themselves."""
    if not pack or not top:
        features = {
            layer: LayerTopK(
                indices.numpy(), values.float().numpy(), None if w is None else w.float().numpy()
            )
            for layer, (indices, values, w) in top.items()
        }
        return features, None if token is None else int(token)
    layers = list(top)
    parts = []
    for layer in layers:
        indices, values, _ = top[layer]
        parts += [indices.reshape(-1).to(torch.int32), values.float().reshape(-1).view(torch.int32)]
    watched = {layer: w for layer in layers if (w := top[layer][2]) is not None}
    parts += [w.float().reshape(-1).view(torch.int32) for w in watched.values()]
    if token is not None:
        parts.append(token.reshape(1).to(torch.int32))
    host = torch.cat(parts).cpu().numpy()  # the step's one synchronisation
    arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    at = 0
    for layer in layers:
        shape = tuple(top[layer][0].shape)
        n = int(np.prod(shape))
        arrays[layer] = (
            host[at : at + n].astype(np.int64).reshape(shape),
            host[at + n : at + 2 * n].view(np.float32).reshape(shape),
        )
        at += 2 * n
    watched_host: dict[int, np.ndarray] = {}
    for layer, w in watched.items():  # the monitored features' activations (steered requests)
        watched_host[layer] = host[at : at + w.numel()].view(np.float32).reshape(tuple(w.shape))
        at += w.numel()
    features = {layer: LayerTopK(*arrays[layer], watched_host.get(layer)) for layer in layers}
    return features, None if token is None else int(host[at])


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword the model's forward takes its KV cache by: ``cache`` since transformers
    renamed ``past_key_values`` (which it warns about, then removes in 5.40)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class TorchSequence:
    """The state of one sequence: its KV cache, where it stands, how it samples, its last logits."""

    cache: Any  # a transformers Cache
    sampling: SamplingParams
    generator: torch.Generator
    position: int  # tokens in the cache
    logits: torch.Tensor  # float32 [vocab], of the last position
    steering: SequenceSteering | None = None  # this sequence's steering and monitors
    # The next token, drawn on the device with the features of the step (one host copy for both)
    # and returned by the next sample() without a mask; the generator's state before that draw,
    # restored when the draw goes unused (a mask, or a token decoded that was not sampled), so the
    # generator advances exactly as if sample() drew it then.
    drawn: int | None = None
    drawn_pending: bool = False  # drawn, not yet taken by sample()
    drawn_state: torch.Tensor | None = None  # None for greedy sequences (no generator used)
    drawn_device: torch.Tensor | None = None  # the drawn token (0-d) on the device, fed back


def draw_token(
    logits: torch.Tensor,
    s: SamplingParams,
    generator: torch.Generator,
    allowed: np.ndarray | None = None,
) -> torch.Tensor:
    """The next token (a 0-d long tensor, on the logits' device) drawn from float32 ``logits``
    [vocab]: greedy, or temperature, top-k and top-p with ``generator``; ``allowed`` masks."""
    if allowed is not None:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        n = min(len(allowed), logits.shape[-1])
        keep[:n] = torch.from_numpy(np.ascontiguousarray(allowed[:n])).to(logits.device)
        logits = logits.masked_fill(~keep, float("-inf"))
    if s.greedy:
        return logits.argmax()
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = logits.topk(min(s.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if s.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p
        drop[..., 0] = False  # the most likely token stays (a tiny top_p rounds to 0 in float32)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]


def _concat_top(parts: list[DeviceTop]) -> DeviceTop:
    """The device top-k of consecutive prefill chunks as one (positions in order)."""
    if len(parts) == 1:
        return parts[0]

    def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if ts[0] is None else torch.cat(ts)  # type: ignore[arg-type]

    return {
        layer: (
            torch.cat([p[layer][0] for p in parts]),
            torch.cat([p[layer][1] for p in parts]),
            cat([p[layer][2] for p in parts]),
        )
        for layer in parts[0]
    }


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: torch.nn.Module, text_config: Any, device: torch.device):
        """Wrap a loaded model (use :meth:`load`)."""
        self.model = model
        self.model_config: Any = getattr(model, "config", None)  # transformers' whole config
        self.config = text_config
        self._device = device
        self.dtype = next(model.parameters()).dtype
        max_len = getattr(text_config, "max_position_embeddings", None)
        self._info = ModelInfo(
            model_type=text_config.model_type,
            num_layers=text_config.num_hidden_layers,
            hidden_size=text_config.hidden_size,
            vocab_size=text_config.vocab_size,
            max_position_embeddings=max_len,
        )
        self._layers = _decoder_layers(self.model, text_config.num_hidden_layers)
        self._cache_arg = cache_keyword(model)
        self._hooks: dict[int, ResidualHook] = {}
        self._site_hooks: dict[tuple[int, str], SiteHook] = {}  # SAEs reading inside a block
        self._sites: dict[int, str] = {}  # layer -> the site its SAE reads
        self._saes: dict[int, TorchSAE] = {}
        self._top_k = 0
        self._seq: TorchSequence | None = None
        self._batch: Any = None  # neuroscope_torch.batch.TorchBatch, made on the first batched step
        # Prompt tokens per forward pass of prefill (as MLX's): bounds the attention scores and
        # the activations a long prompt holds at once; the chunks continue one cache, exactly.
        self.prefill_step = 512
        self._pack = device.type != "cpu" or PACK_ON_CPU  # see _to_host
        self._fast: Any = None  # neuroscope_torch.fast.FastDecode when the fast path is on
        self.set_fast(os.environ.get("NEUROSCOPE_TORCH_FAST", "off"))

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        dtype: str | None = None,
        dummy_weights: bool = False,
        device: str | None = None,
    ) -> Self:
        from transformers import AutoConfig, AutoModelForCausalLM

        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = "bfloat16" if target.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
        config = AutoConfig.from_pretrained(model_dir)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        attn = "eager" if text_config.model_type in EAGER_MODELS else "sdpa"
        if dummy_weights:
            model = build_dummy(config, DTYPES[dtype], attn, target)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=DTYPES[dtype], attn_implementation=attn
            )
        return cls(model.to(target).eval(), text_config, target)

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def fast(self) -> str:
        """The single sequence's decode path: off (eager, growing cache), static (preallocated
        cache), compile (static cache + ``torch.compile``; CUDA graphs on CUDA) or dynamo."""
        return "off" if self._fast is None else self._fast.mode

    def set_fast(self, mode: str) -> None:
        """Choose the decode path (see ``fast``; ``NEUROSCOPE_TORCH_FAST`` sets it at load).
        The current single sequence ends (its cache is of the other kind)."""
        from neuroscope_torch.fast import MODES, FastDecode

        if mode not in ("off", *MODES):
            raise ConfigError(
                f"The fast path must be one of off, {', '.join(MODES)}; not {mode!r} "
                "(NEUROSCOPE_TORCH_FAST)."
            )
        self._seq = None
        self._fast = None if mode == "off" else FastDecode(self, mode)

    def _hook(self, layer: int) -> ResidualHook:
        if layer not in self._hooks:
            hook = ResidualHook()
            self._layers[layer].register_forward_hook(hook)
            self._hooks[layer] = hook
        return self._hooks[layer]

    def _site_hook(self, layer: int, site: str) -> ResidualHook | SiteHook:
        """The hook that reads ``site`` of block ``layer`` (the block's own for resid_post)."""
        if site == "resid_post":
            return self._hook(layer)
        if (layer, site) not in self._site_hooks:
            module, kind = site_target(self._layers[layer], site)
            hook = SiteHook(kind)
            hook.install(module)
            self._site_hooks[layer, site] = hook
        return self._site_hooks[layer, site]

    def _take(self, layer: int) -> torch.Tensor:
        """What the SAE at ``layer`` reads, captured on the last forward pass."""
        return self._site_hook(layer, self._sites.get(layer, "resid_post")).take()

    def set_saes(self, saes: Mapping[int, SAE], top_k: int) -> None:
        for layer, sae in saes.items():
            self._check_layer(layer)
            if sae.site == "attn_z":  # heads x head_dim, read off o_proj
                module, kind = site_target(self._layers[layer], sae.site)
                if site_width(module, kind) not in (None, sae.d_model):
                    raise ConfigError(
                        f"SAE {sae.id} reads attn_z vectors of size {sae.d_model}; this model's "
                        f"attention heads give {site_width(module, kind)}."
                    )
            else:
                sae.check_model(self._info.hidden_size, model=f"this {self._info.model_type} model")
            if not 1 <= top_k <= sae.width:
                raise ConfigError(
                    f"top_k must be between 1 and the SAE width {sae.width}, not {top_k}."
                )
        hooks: list[ResidualHook | SiteHook] = [*self._hooks.values(), *self._site_hooks.values()]
        for hook in hooks:
            hook.capture = False
        self._saes = {layer: TorchSAE(sae, self._device, self.dtype) for layer, sae in saes.items()}
        self._sites = {layer: sae.site for layer, sae in saes.items()}
        for layer, sae in saes.items():
            self._site_hook(layer, sae.site).capture = True
        self._top_k = top_k

    def set_steering(self, layer: int, vector: np.ndarray | None) -> None:
        self._check_layer(layer)
        if vector is None:
            self._hook(layer).add = None
            return
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self._info.hidden_size,) or not np.isfinite(vector).all():
            raise ConfigError(
                f"A steering vector must be {self._info.hidden_size} finite numbers, "
                f"got shape {vector.shape}."
            )
        self._hook(layer).add = torch.as_tensor(vector, device=self._device)

    def _device_top(self, steering: SequenceSteering | None = None, first: int = 0) -> DeviceTop:
        """Top-k of each hooked layer's captured residual (batch row 0), still on the device.

        With steering, clamped features read their value at steered positions (from ``first``)
        and the watched features' full activations come along.
        """
        acts: dict[int, torch.Tensor] = {}
        watched: dict[int, torch.Tensor] = {}
        for layer, sae in self._saes.items():
            a = sae.encode(self._take(layer)[0])
            if steering is not None:
                a = steering.pin(layer, a, first)
                w = steering.watched(layer)
                if w is not None:
                    watched[layer] = a[:, w]
            acts[layer] = a
        top = _top_k_all(acts, self._top_k)
        return {layer: (*top[layer], watched.get(layer)) for layer in acts}

    def _features(self, steering: SequenceSteering | None = None, first: int = 0) -> StepFeatures:
        """``_device_top`` moved to the host in one copy."""
        return _to_host(self._device_top(steering, first), pack=self._pack)[0]

    def _finish(self, seq: TorchSequence, top: DeviceTop) -> StepFeatures:
        """Draw ``seq``'s next token on the device and bring it to the host with the features, in
        the step's one copy; ``sample()`` then returns it without waiting for the device."""
        if seq.drawn_pending and seq.drawn_state is not None:
            seq.generator.set_state(seq.drawn_state)  # the last draw went unused: undo it
        seq.drawn_state = None if seq.sampling.greedy else seq.generator.get_state()
        token = draw_token(seq.logits, seq.sampling, seq.generator)
        features, seq.drawn = _to_host(top, token, self._pack)
        seq.drawn_pending, seq.drawn_device = True, token
        return features

    def _forward(
        self,
        cache: Any,
        position: int,
        token_ids: list[int],
        steering: SequenceSteering | None = None,
    ) -> torch.Tensor:
        """Run ``token_ids`` from ``position`` through ``cache``; the last position's logits."""
        ids = torch.tensor([token_ids], device=self._device)
        positions = torch.arange(position, position + ids.shape[1], device=self._device)
        edited = []
        if steering is not None:
            for layer in steering.layers:
                hook = self._hook(layer)
                hook.edit = lambda h, layer=layer: steering.apply(layer, h, position)
                edited.append(hook)
        try:
            out = self.model(
                input_ids=ids, use_cache=True, position_ids=positions[None], logits_to_keep=1,
                **{self._cache_arg: cache},
            )  # fmt: skip
        finally:
            for hook in edited:
                hook.edit = None
        return out.logits[0, -1].float()

    # -- generation -------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        steering: CompiledSteering | None = None,
    ) -> StepFeatures:
        from transformers import DynamicCache

        ids = self._check_ids(token_ids)
        self._seq = None
        generator = torch.Generator(device=self._device)
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        else:
            generator.seed()
        if self._fast is not None:
            cache = self._fast.new_cache(len(ids))
        else:
            cache = DynamicCache(config=self.model_config)
        steer = None if steering is None else SequenceSteering(steering, self._saes, self._device)
        step = max(1, self.prefill_step)
        tops = []
        for first in range(0, len(ids), step):  # chunked: the same cache, exact
            logits = self._forward(cache, first, ids[first : first + step], steer)
            tops.append(self._device_top(steer, first))
        seq = TorchSequence(cache, sampling, generator, len(ids), logits, steer)
        features = self._finish(seq, _concat_top(tops))
        self._seq = seq
        return features

    @torch.inference_mode()
    def decode(self, token_id: int) -> StepFeatures:
        seq = self._sequence("decode")
        ids = self._check_ids([token_id])
        if self._fast is not None:
            seq.logits = self._fast.decode(seq, ids[0])
        else:
            seq.logits = self._forward(seq.cache, seq.position, ids, seq.steering)
        seq.position += 1
        return self._finish(seq, self._device_top(seq.steering, seq.position - 1))

    @property
    def last_logits(self) -> np.ndarray:
        """The float32 logits [vocab] that sample() reads (for tests and debugging)."""
        return self._sequence("last_logits").logits.cpu().numpy()

    @torch.inference_mode()
    def sample(self, allowed: np.ndarray | None = None) -> int:
        """The token drawn on the device with the last step (no wait), unless ``allowed`` rules it
        out: greedy keeps it when allowed; a sampled one is drawn again from the masked logits
        with the generator as it was before (a second device round trip, for masked steps only)."""
        seq = self._sequence("sample")
        if seq.drawn_pending and seq.drawn is not None:
            seq.drawn_pending = False
            token = seq.drawn
            if allowed is None or (
                seq.sampling.greedy and token < len(allowed) and bool(allowed[token])
            ):
                return token
            if seq.drawn_state is not None:
                seq.generator.set_state(seq.drawn_state)
        return int(draw_token(seq.logits, seq.sampling, seq.generator, allowed))

    # -- continuous batching (neuroscope.batching; the machinery is in neuroscope_torch.batch) ----

    def start(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        steering: CompiledSteering | None = None,
    ) -> TorchSequence:
        """A sequence that will decode in the running batch; nothing computed yet."""
        from neuroscope_torch import batch

        return batch.start(self, token_ids, sampling, steering)

    def prefill_chunk(self, seq: TorchSequence, max_tokens: int) -> StepFeatures | None:
        """The next ``max_tokens`` of ``seq``'s prompt; its prompt features after the last."""
        from neuroscope_torch import batch

        assert isinstance(seq, batch.BatchedTorchSequence), "a sequence made by start()"
        return batch.prefill_chunk(self, seq, max_tokens)

    def decode_batch(
        self, seqs: Sequence[TorchSequence], token_ids: Sequence[int]
    ) -> list[StepFeatures]:
        """One step of every sequence in ``seqs`` (the batch becomes exactly these)."""
        from neuroscope_torch import batch

        if self._batch is None:
            self._batch = batch.TorchBatch(self.model)
        return batch.decode(self, self._batch, seqs, token_ids)

    def sample_sequence(self, seq: TorchSequence, allowed: np.ndarray | None = None) -> int:
        """``sample`` on a batched sequence."""
        from neuroscope_torch import batch

        return batch.sample(self, seq, allowed)

    # -- measurement ------------------------------------------------------------------------------

    def peak_memory_mib(self) -> float | None:
        if self._device.type != "cuda":
            return None  # the CPU allocator keeps no peak; the process's RSS says it
        return torch.cuda.max_memory_allocated(self._device) / 2**20

    def time_sae_encode(self, sae: SAE, k: int, min_seconds: float = 0.3) -> float | None:
        device_sae = TorchSAE(sae, self._device, self.dtype)
        x = np.random.default_rng(0).standard_normal((1, sae.d_model)).astype(np.float32)
        residual = torch.from_numpy(x).to(device=self._device, dtype=self.dtype)

        @torch.inference_mode()
        def step() -> None:
            indices, values = device_sae.top_k(residual, k)
            indices.cpu().numpy(), values.cpu().numpy()

        return median_seconds(step, min_seconds)

    # -- batch statistics and reference -----------------------------------------------------------

    @torch.inference_mode()
    def batch_feature_stats(
        self, batch: Sequence[Sequence[int]], layer: int, top_n: int = 0
    ) -> BatchStats:
        if layer not in self._saes:
            raise ConfigError(f"No SAE is set at layer {layer}.")
        seq_len = max(len(s) for s in batch)
        ids = torch.zeros((len(batch), seq_len), dtype=torch.long, device=self._device)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(list(seq), device=self._device)
            mask[row, : len(seq)] = 1
        self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        acts = self._saes[layer].encode(self._take(layer)).flatten(0, 1)  # [B*T, width]
        real = mask.clone()
        real[:, 0] = 0  # BOS is out of distribution for these SAEs
        real = real.flatten().bool()
        acts = acts * real[:, None]
        fired = acts > 0
        count = fired.sum(0)
        total = acts.double().sum(0)
        mean = total / count.clamp(min=1)
        m2 = ((acts.double() - mean) ** 2 * fired).sum(0)
        top_values = top_tokens = None
        if top_n > 0:
            n = min(top_n, acts.shape[0])
            values, tokens = acts.topk(n, dim=0)  # [n, width]
            tokens = torch.where(values > 0, tokens, torch.full_like(tokens, -1))
            top_values = values.T.contiguous().cpu().numpy()
            top_tokens = tokens.T.contiguous().cpu().numpy()
            if n < top_n:
                pad = top_n - n
                top_values = np.pad(top_values, ((0, 0), (0, pad)))
                top_tokens = np.pad(top_tokens, ((0, 0), (0, pad)), constant_values=-1)
        return BatchStats(
            tokens=int(real.sum()),
            seq_len=seq_len,
            fire_count=count.cpu().numpy().astype(np.int64),
            act_sum=total.cpu().numpy(),
            act_m2=m2.cpu().numpy(),
            act_max=acts.max(0).values.float().cpu().numpy(),
            top_values=top_values,
            top_tokens=top_tokens,
        )

    @torch.inference_mode()
    def forward_reference(
        self, token_ids: Sequence[int], layers: Sequence[int]
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        ids = self._check_ids(token_ids)
        for layer in layers:
            self._check_layer(layer)
        hooks = {layer: self._hook(layer) for layer in layers}
        was_capturing = {layer: h.capture for layer, h in hooks.items()}
        for h in hooks.values():
            h.capture = True
        try:
            tokens = torch.tensor([ids], device=self._device)
            logits = self.model(input_ids=tokens, use_cache=False).logits[0].float().cpu().numpy()
            residuals = {layer: h.take()[0].float().cpu().numpy() for layer, h in hooks.items()}
        finally:
            for layer, h in hooks.items():
                h.capture, h.captured = was_capturing[layer], None
        return residuals, logits

    def capture(
        self,
        token_ids: Sequence[int],
        layers: Sequence[int],
        *,
        attention: bool = False,
        lens_top: int = 0,
    ) -> ForwardCapture:
        from neuroscope_torch.capture import capture

        ids = self._check_ids(token_ids)
        for layer in layers:
            self._check_layer(layer)
        return capture(self, ids, layers, attention, lens_top)

    def attribute(
        self,
        token_ids: Sequence[int],
        layer: int,
        position: int,
        direction_at: Callable[[np.ndarray], np.ndarray],
    ) -> ResidualSplit:
        from neuroscope_torch.attribution import attribute

        ids = self._check_ids(token_ids)
        self._check_layer(layer)
        if not 0 <= position < len(ids):
            raise ConfigError(f"position {position} is outside the {len(ids)} tokens.")
        return attribute(self, ids, layer, position, direction_at)

    @torch.inference_mode()
    def forward_patched(
        self, token_ids: Sequence[int], layer: int, residual: np.ndarray, positions: Sequence[int]
    ) -> np.ndarray:
        ids = self._check_ids(token_ids)
        self._check_layer(layer)
        hook = self._hook(layer)
        replacement = torch.from_numpy(np.asarray(residual)).to(self._device, self.dtype)[None]
        mask = torch.zeros(len(ids), dtype=torch.bool, device=self._device)
        mask[list(positions)] = True
        before = hook.edit
        hook.edit = lambda h: torch.where(mask[None, :, None], replacement, h)
        try:
            tokens = torch.tensor([ids], device=self._device)
            return self.model(input_ids=tokens, use_cache=False).logits[0].float().cpu().numpy()
        finally:
            hook.edit = before

    def upstream_gradient(
        self,
        token_ids: Sequence[int],
        from_layer: int,
        layer: int,
        position: int,
        direction_at: Callable[[np.ndarray], np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        from neuroscope_torch.attribution import upstream_gradient

        ids = self._check_ids(token_ids)
        self._check_layer(from_layer)
        self._check_layer(layer)
        return upstream_gradient(self, ids, from_layer, layer, position, direction_at)

    # -- checks -----------------------------------------------------------------------------------

    def _sequence(self, what: str) -> TorchSequence:
        if self._seq is None:
            raise RuntimeError(f"{what}() before prefill(): start a sequence with prefill().")
        return self._seq
