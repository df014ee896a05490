"""The backend protocol and how backends are found.

A backend owns the model on its device: it runs prefill and decode with a KV cache, samples, and
hooks the residual stream at the output of decoder blocks (``hidden_states[L+1]`` in transformers'
terms) where it encodes with the SAE and takes the top-k on the device. Only k (index, activation)
pairs per position and layer cross to the host.

Backends are plugins in the entry-point group ``neuroscope.backends``; the core imports them only
when asked, so ``neuroscope`` itself never imports mlx or torch.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from neuroscope.errors import BackendUnavailable, ConfigError
from neuroscope.sae import SAE

if TYPE_CHECKING:
    from typing_extensions import Self

    from neuroscope.attribution import ResidualSplit
    from neuroscope.steering import CompiledSteering

ENTRY_POINT_GROUP = "neuroscope.backends"
EXTRA_FOR_BACKEND = {"mlx": "mlx", "torch": "torch"}


GREEDY_BELOW = 1e-6  # temperatures below this sample greedily


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token; ``temperature == 0`` is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        # Below GREEDY_BELOW, dividing float32 logits by the temperature overflows to inf; the
        # distribution is already the argmax to float32 precision there.
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int | None = None


@dataclass(frozen=True)
class LayerTopK:
    """Top-k SAE features for consecutive positions of one layer, on the host."""

    indices: np.ndarray  # int64 [positions, k]
    activations: np.ndarray  # float32 [positions, k]
    # Full activations of the features a request's monitors watch, in the order of
    # ``CompiledSteering.watched(layer)``: float32 [positions, watched]; None when none are watched.
    watched: np.ndarray | None = None


StepFeatures = dict[int, LayerTopK]  # layer -> top-k for the positions just processed


def concat_features(parts: Sequence[StepFeatures]) -> StepFeatures:
    """The features of consecutive passes over one sequence (prefill chunks) as those of one
    pass: every layer's positions in order."""
    if len(parts) == 1:
        return parts[0]
    joined = {}
    for layer in parts[0]:
        rows = [p[layer] for p in parts]
        watched = [r.watched for r in rows if r.watched is not None]
        joined[layer] = LayerTopK(
            np.concatenate([r.indices for r in rows]),
            np.concatenate([r.activations for r in rows]),
            np.concatenate(watched) if len(watched) == len(rows) else None,
        )
    return joined


@dataclass(frozen=True)
class BatchStats:
    """Per-feature reductions of one batch of sequences at one layer, computed on the device.

    Only real tokens count: padding and position 0 (BOS) are excluded. Activations "fire" when > 0.
    Sums are float64 on the host; ``act_m2`` is the sum of squared deviations of the firing
    activations from this batch's own firing mean (so batches merge exactly with Chan's formula).
    ``top_values``/``top_tokens`` ([width, top_n]) are each feature's largest activations in the batch
    and where they occurred, as flat indices ``row * seq_len + col`` into the padded batch
    (``-1`` where fewer than top_n tokens fired).
    """

    tokens: int
    seq_len: int
    fire_count: np.ndarray  # int64 [width]
    act_sum: np.ndarray  # float64 [width], over firing tokens
    act_m2: np.ndarray  # float64 [width], over firing tokens, about this batch's firing mean
    act_max: np.ndarray  # float32 [width]
    top_values: np.ndarray | None = None  # float32 [width, top_n]
    top_tokens: np.ndarray | None = None  # int64 [width, top_n]


@dataclass(frozen=True)
class ForwardCapture:
    """Everything one uncached forward pass shows, on the host (``Backend.capture``).

    ``residuals[L]``: float32 [T, d], the output of block L (the hooks' convention).
    ``attention[L]``: float32 [query heads, T, T], the softmax weights as the model computes them
    (soft-capping, sliding window and masking included); empty unless asked.
    ``lens_ids`` / ``lens_logits``: int64 / float32 [layers, T, k], the logit lens: the top-k next
    tokens of each layer's residual through the model's final norm and unembedding (and its final
    soft-capping), in the order of ``layers``; k = 0 when not asked.
    """

    residuals: dict[int, np.ndarray]
    attention: dict[int, np.ndarray]
    lens_ids: np.ndarray
    lens_logits: np.ndarray


class Backend(ABC):
    """One loaded model on one device, running one sequence at a time (created by :meth:`load`)."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def load(
        cls, model_dir: str | Path, *, dtype: str | None = None, dummy_weights: bool = False
    ) -> Self:
        """Load the model in ``model_dir`` (a local folder in the Hugging Face layout) in ``dtype``
        (None: the device's default); ``dummy_weights`` builds the architecture from its
        ``config.json`` with random weights."""

    @classmethod
    def is_available(cls) -> bool:
        """Can this backend run on this machine (its packages import, its device exists)?"""
        return True

    @property
    @abstractmethod
    def info(self) -> ModelInfo: ...

    @property
    @abstractmethod
    def device(self) -> str:
        """A human-readable device name: 'cpu', 'cuda:0', 'metal', ..."""

    @abstractmethod
    def set_saes(self, saes: Mapping[int, SAE], top_k: int) -> None:
        """Hook these layers (layer -> SAE) and report ``top_k`` features per position."""

    @abstractmethod
    def set_steering(self, layer: int, vector: np.ndarray | None) -> None:
        """Add ``vector`` [hidden_size] to the residual stream after block ``layer`` (None: stop)."""

    @abstractmethod
    def prefill(
        self,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        steering: CompiledSteering | None = None,
    ) -> StepFeatures:
        """Start a new sequence: reset the cache and RNG, run the prompt, return its features.

        ``steering`` belongs to this sequence alone: it applies to its prompt and every ``decode``
        until the next ``prefill`` (see ``neuroscope.steering``); records at a steered layer show
        the steered residual, clamped features reading their value, and ``LayerTopK.watched``
        carries the monitored features' activations.
        """

    @abstractmethod
    def decode(self, token_id: int) -> StepFeatures:
        """Feed one token through the cache; return its features."""

    @abstractmethod
    def sample(self, allowed: np.ndarray | None = None) -> int:
        """Sample the next token from the last logits with the sequence's sampling params.

        ``allowed`` (bool [n], n <= vocab; structured output, see ``neuroscope.grammar``) bars
        every token it does not mark, ids from n on included, before any other step of sampling.
        """

    @abstractmethod
    def batch_feature_stats(
        self, batch: Sequence[Sequence[int]], layer: int, top_n: int = 0
    ) -> BatchStats:
        """Prefill a batch (right-padded, no cache, no generation) and reduce the SAE features of
        ``layer`` (which must have an SAE set) on the device; see :class:`BatchStats`."""

    def _check_layer(self, layer: int) -> None:
        """For subclasses: a clear error for a layer the model does not have."""
        layers = self.info.num_layers
        if not 0 <= layer < layers:
            raise ConfigError(
                f"Layer {layer} does not exist: this model has layers 0..{layers - 1}."
            )

    def _check_ids(self, token_ids: Sequence[int]) -> list[int]:
        """For subclasses: ``token_ids`` as ints, with a clear error for none or one outside the
        vocabulary."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ConfigError("Give at least one token.")
        vocab = self.info.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(
                f"Token id {bad[0]} is outside this model's vocabulary (0..{vocab - 1}); "
                "was the prompt tokenized for another model?"
            )
        return ids

    def capture(
        self,
        token_ids: Sequence[int],
        layers: Sequence[int],
        *,
        attention: bool = False,
        lens_top: int = 0,
    ) -> ForwardCapture:
        """One forward pass over ``token_ids`` (no cache, no SAE, no steering of a request) that
        keeps the residuals of ``layers``, their attention patterns when asked and a logit lens of
        ``lens_top`` tokens (``neuroscope.capture``)."""
        raise ConfigError(f"The {self.name} backend cannot capture activations.")

    def attribute(
        self,
        token_ids: Sequence[int],
        layer: int,
        position: int,
        direction_at: Callable[[np.ndarray], np.ndarray],
    ) -> ResidualSplit:
        """One uncached forward pass over ``token_ids`` with block ``layer``'s output at
        ``position`` split along ``direction_at(that output)`` (float64 [d]) into the embedding,
        each block's attention output per source position, each MLP output and the model's biases,
        norm scales frozen at their observed values (``neuroscope.attribution``)."""
        raise ConfigError(f"The {self.name} backend cannot attribute features.")

    def forward_patched(
        self, token_ids: Sequence[int], layer: int, residual: np.ndarray, positions: Sequence[int]
    ) -> np.ndarray:
        """``forward_reference``'s logits [T, V] with block ``layer``'s output replaced by
        ``residual`` [T, d] at ``positions`` (``Session.patch``)."""
        raise ConfigError(f"The {self.name} backend cannot patch activations.")

    def upstream_gradient(
        self,
        token_ids: Sequence[int],
        from_layer: int,
        layer: int,
        position: int,
        direction_at: Callable[[np.ndarray], np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Block ``from_layer``'s output [T, d] and the gradient [T, d] of
        ``block layer's output at position . direction_at(it)`` with respect to it (one backward
        pass; ``Session.upstream``)."""
        raise ConfigError(f"The {self.name} backend cannot take gradients of features.")

    def peak_memory_mib(self) -> float | None:
        """Peak memory the device's allocator reports, in MiB; None where it reports none."""
        return None

    def time_sae_encode(self, sae: SAE, k: int, min_seconds: float = 0.3) -> float | None:
        """Seconds per token of ``sae``'s encode + top-``k`` + copy of the top-k to the host, on a
        random residual in the model's dtype, in isolation (median of repetitions). None where the
        backend cannot time it alone."""
        return None

    @abstractmethod
    def forward_reference(
        self, token_ids: Sequence[int], layers: Sequence[int]
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """No cache, no SAE: residuals after the given blocks ([T, d] each) and logits [T, V].

        For parity tests and debugging; float32 numpy on the host.
        """


def available_backends() -> dict[str, type[Backend]]:
    """The installed backend plugins, by name (loading each imports its framework)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}  # type: ignore[misc]


def _is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def load_backend_class(name: str) -> type[Backend]:
    """The backend class called ``name``; ``auto`` is MLX on Apple Silicon, torch elsewhere."""
    if name == "auto":
        name = "mlx" if _is_apple_silicon() else "torch"
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise ConfigError(f"Unknown backend {name!r}. Installed backends: {known}; or 'auto'.")
    extra = EXTRA_FOR_BACKEND.get(name, name)
    try:
        cls = eps[name].load()
    except ImportError as e:
        raise BackendUnavailable(
            f"The {name} backend needs packages that are not installed ({e.name or e}). "
            f"From your clone of Neuroscope: pip install -e '.[{extra}]'"
        ) from None
    if not cls.is_available():
        raise BackendUnavailable(
            f"The {name} backend cannot run on this machine ({sys.platform}/{platform.machine()}). "
            f"Try --backend {'torch' if name == 'mlx' else 'mlx'}."
        )
    return cls


def median_seconds(step: Callable[[], object], min_seconds: float = 0.3) -> float:
    """The median duration of ``step`` after 3 untimed calls: at least 5 timed calls, and more until
    ``min_seconds`` have passed (at most 1000). For backends' micro-benchmarks."""
    for _ in range(3):
        step()
    times: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
