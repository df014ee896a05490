"""TorchBackend: transformers models on CUDA or CPU, hooked at decoder-block outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from neuroscope.backend import (
    Backend,
    BatchStats,
    LayerTopK,
    ModelInfo,
    SamplingParams,
    StepFeatures,
)
from neuroscope.errors import ConfigError, ModelLoadError
from neuroscope.sae import SAE
from neuroscope_torch.sae import TorchSAE

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Soft-capped attention (Gemma 2) is exact only in the eager kernel.
EAGER_MODELS = {"gemma2"}


class ResidualHook:
    """Sits on one decoder block: records its output and, when steering, adds a vector to it."""

    def __init__(self) -> None:
        self.captured: torch.Tensor | None = None
        self.capture = False
        self.add: torch.Tensor | None = None

    def __call__(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if self.add is not None:
            hidden = hidden + self.add.to(hidden.dtype)
        if self.capture:
            self.captured = hidden
        if self.add is None:
            return None
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _decoder_layers(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList:
    """The list of decoder blocks, found by shape rather than by name, so any architecture works."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) == num_layers:
        return layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise ModelLoadError(f"Cannot find the {num_layers} decoder blocks of {type(model).__name__}.")


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str | None = None,
        dummy_weights: bool = False,
        device: str | None = None,
    ):
        from transformers import AutoConfig, AutoModelForCausalLM

        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = "bfloat16" if self._device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
        self.dtype = DTYPES[dtype]
        config = AutoConfig.from_pretrained(model_dir)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        attn = "eager" if text_config.model_type in EAGER_MODELS else "sdpa"
        if dummy_weights:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(
                config, dtype=self.dtype, attn_implementation=attn
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=self.dtype, attn_implementation=attn
            )
        self.model = model.to(self._device).eval()
        self.config = text_config
        max_len = getattr(text_config, "max_position_embeddings", None)
        self._info = ModelInfo(
            model_type=text_config.model_type,
            num_layers=text_config.num_hidden_layers,
            hidden_size=text_config.hidden_size,
            vocab_size=text_config.vocab_size,
            max_position_embeddings=max_len,
        )
        self._layers = _decoder_layers(self.model, text_config.num_hidden_layers)
        self._hooks: dict[int, ResidualHook] = {}
        self._saes: dict[int, TorchSAE] = {}
        self._top_k = 0
        self._cache = None
        self._logits: torch.Tensor | None = None
        self._sampling = SamplingParams()
        self._generator = torch.Generator(device=self._device)
        self._position = 0

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def device(self) -> str:
        return str(self._device)

    def _hook(self, layer: int) -> ResidualHook:
        if layer not in self._hooks:
            hook = ResidualHook()
            self._layers[layer].register_forward_hook(hook)
            self._hooks[layer] = hook
        return self._hooks[layer]

    def set_saes(self, saes: Mapping[int, SAE], top_k: int) -> None:
        for hook in self._hooks.values():
            hook.capture = False
        self._saes = {layer: TorchSAE(sae, self._device) for layer, sae in saes.items()}
        for layer in saes:
            self._hook(layer).capture = True
        self._top_k = top_k

    def set_steering(self, layer: int, vector: np.ndarray | None) -> None:
        if vector is not None and np.shape(vector) != (self._info.hidden_size,):
            raise ConfigError(f"A steering vector must have shape ({self._info.hidden_size},).")
        self._hook(layer).add = (
            None if vector is None else torch.as_tensor(vector, device=self._device)
        )

    def _features(self) -> StepFeatures:
        """Top-k of each hooked layer's captured residual (batch row 0), moved to the host."""
        out = {}
        for layer, sae in self._saes.items():
            hook = self._hooks[layer]
            indices, values = sae.top_k(hook.captured[0], self._top_k)
            hook.captured = None
            out[layer] = LayerTopK(indices.cpu().numpy(), values.cpu().numpy())
        return out

    @torch.inference_mode()
    def _forward(self, token_ids: Sequence[int]) -> None:
        ids = torch.tensor([list(token_ids)], device=self._device)
        positions = torch.arange(self._position, self._position + ids.shape[1], device=self._device)
        out = self.model(
            input_ids=ids, past_key_values=self._cache, use_cache=True,
            cache_position=positions, position_ids=positions[None], logits_to_keep=1,
        )  # fmt: skip
        self._cache = out.past_key_values
        self._logits = out.logits[0, -1].float()
        self._position += ids.shape[1]

    # -- generation -------------------------------------------------------------------------------

    def prefill(self, token_ids: Sequence[int], sampling: SamplingParams) -> StepFeatures:
        from transformers import DynamicCache

        if not token_ids:
            raise ConfigError("Cannot run an empty prompt.")
        self._cache = DynamicCache(config=self.model.config)
        self._position = 0
        self._sampling = sampling
        if sampling.seed is not None:
            self._generator.manual_seed(sampling.seed)
        else:
            self._generator.seed()
        with torch.inference_mode():
            self._forward(token_ids)
            return self._features()

    def decode(self, token_id: int) -> StepFeatures:
        with torch.inference_mode():
            self._forward([token_id])
            return self._features()

    @torch.inference_mode()
    def sample(self) -> int:
        logits, s = self._logits, self._sampling
        if s.greedy:
            return int(logits.argmax())
        logits = logits / s.temperature
        if s.top_k > 0:
            kth = logits.topk(min(s.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator))

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
        hook = self._hooks[layer]
        self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        acts = self._saes[layer].encode(hook.captured).flatten(0, 1)  # [B*T, width]
        hook.captured = None
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
        hooks = {layer: self._hook(layer) for layer in layers}
        was_capturing = {layer: h.capture for layer, h in hooks.items()}
        for h in hooks.values():
            h.capture = True
        try:
            ids = torch.tensor([list(token_ids)], device=self._device)
            logits = self.model(input_ids=ids, use_cache=False).logits[0].float().cpu().numpy()
            residuals = {layer: h.captured[0].float().cpu().numpy() for layer, h in hooks.items()}
        finally:
            for layer, h in hooks.items():
                h.capture, h.captured = was_capturing[layer], None
        return residuals, logits
