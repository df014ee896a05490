"""The single sequence's fast decode: a preallocated KV cache, and the step through ``torch.compile``.

Eager decoding is bound by the host: a 2B model's step launches ~1,000 small kernels, each a few
microseconds of Python and driver, so an H200 ran at ~4 % of its memory bandwidth. Here:

- the cache is transformers' ``StaticLayer`` for every layer, sized to a bucket (a power of two
  at least ``MIN_CAPACITY``) and doubled when a sequence outgrows it: the step's shapes stay
  fixed, so one compiled step (or CUDA graph) serves every token. Sliding-window layers get a
  full-length buffer too, and the model's own sliding-window mask (built from the config, with the
  query's position as a tensor) limits what they see. transformers' ``StaticSlidingWindowLayer``
  keeps its fill level as a Python int that the mask code reads, so a compiled step would be
  specialised (re-traced, and a CUDA graph re-recorded) at every position; a full-length buffer
  costs memory (Gemma 2 2B: +51 MiB per 1,000 tokens beyond the window, bf16) but never re-traces;
- the step (the model's forward with its hooks: residual capture, steering) runs through
  ``torch.compile``: mode ``reduce-overhead`` on CUDA (CUDA graphs: the whole step is replayed as
  one launch), the default inductor mode on the CPU.

Modes: ``static`` (the static cache, eager step: the reference for the compiled one),
``compile`` (as above), ``dynamo`` (the step captured by dynamo but run by its ``eager``
backend: checks graph capture and hooks without a C++ or Triton compiler, for tests).

Exactness: soft-capping and the sliding window are the model's own code; the static layers attend
over a fixed-length buffer with the unused slots (and, for sliding layers, the slots out of the
window) masked out, their softmax weight exactly 0, so results equal the eager path up to float
summation order (tests: 1e-5 relative in float32).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from neuroscope_torch.backend import TorchBackend, TorchSequence
    from neuroscope_torch.steering import SequenceSteering

MODES = ("static", "compile", "dynamo")
MIN_CAPACITY = 256  # tokens: the first bucket (attention reads the whole buffer every step)


def capacity_for(tokens: int) -> int:
    """The bucket that holds ``tokens``: a power of two, at least ``MIN_CAPACITY``."""
    capacity = MIN_CAPACITY
    while capacity < tokens:
        capacity *= 2
    return capacity


class FastDecode:
    """The static cache and the (compiled) decode step of one backend's single sequence."""

    def __init__(self, backend: TorchBackend, mode: str):
        self.backend = backend
        self.mode = mode
        self.cuda_graphs = False
        self._edits: tuple[Any, dict[int, Callable[[torch.Tensor], torch.Tensor]]] = (None, {})
        # One cache per bucket, reused by the next sequence of that size: the buffers keep their
        # addresses, so captured CUDA graphs replay instead of being recorded again per request
        # (the backend holds one single sequence at a time; set_fast("off") frees them).
        self._pool: dict[int, Any] = {}
        if mode == "compile":
            on_cuda = backend._device.type == "cuda"
            self.cuda_graphs = on_cuda
            self.step = torch.compile(
                self._run, mode="reduce-overhead" if on_cuda else None, dynamic=False
            )
        elif mode == "dynamo":
            self.step = torch.compile(self._run, backend="eager", dynamic=False)
        else:
            self.step = self._run

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        b = self.backend
        out = b.model(
            input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
            **{b._cache_arg: cache},
        )  # fmt: skip
        return out.logits[0, -1].float()

    def new_cache(self, tokens: int) -> Any:
        """An empty static cache for a sequence that starts with ``tokens``, allocated now (not on
        the first update) so its buffers' addresses are fixed before a step is compiled."""
        from transformers.cache_utils import Cache, StaticLayer

        b = self.backend
        capacity = capacity_for(tokens)
        if capacity in self._pool:  # the same buffers as the last sequence of this size
            cache = self._pool[capacity]
            cache.reset()
            return cache
        cache = Cache(
            layers=[StaticLayer(max_cache_len=capacity) for _ in range(b.info.num_layers)]
        )
        config = b.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        cache.early_initialization(1, heads, head_dim, b.dtype, b._device)
        cache.neuroscope_capacity = capacity  # type: ignore[attr-defined]
        self._pool[capacity] = cache
        return cache

    def reserve(self, seq: TorchSequence, tokens: int) -> None:
        """Make room for ``tokens`` more in ``seq``'s cache: when it would overflow, a cache of the
        next bucket with the tokens so far copied in (every layer holds every token, in order)."""
        cache = seq.cache
        need = seq.position + tokens
        if need <= cache.neuroscope_capacity:
            return
        grown = self.new_cache(need)
        for old, new in zip(cache.layers, grown.layers, strict=True):
            n = old.max_cache_len
            new.keys[:, :, :n].copy_(old.keys)
            new.values[:, :, :n].copy_(old.values)
            new.cumulative_length.copy_(old.cumulative_length)
        seq.cache = grown

    def decode(self, seq: TorchSequence, token_id: int) -> torch.Tensor:
        """One decode step of ``seq`` through the static cache; the float32 logits [vocab]."""
        b = self.backend
        self.reserve(seq, 1)
        if seq.drawn_device is not None and seq.drawn == token_id:
            ids = seq.drawn_device.view(1, 1)  # the drawn token goes back without a copy
        else:
            ids = torch.tensor([[token_id]], device=b._device)
        positions = torch.full((1, 1), seq.position, device=b._device)
        edited = []
        steering = seq.steering
        if steering is not None and seq.position >= steering.start:
            # decode positions at or after the start are steered everywhere: a position-free
            # edit, the same function object every step of the sequence (a compiled step is not
            # traced again per position)
            if self._edits[0] is not steering:
                self._edits = (steering, _position_free_edits(steering))
            for layer, edit in self._edits[1].items():
                hook = b._hook(layer)
                hook.edit = edit
                edited.append(hook)
        try:
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = self.step(ids, positions, seq.cache)
        finally:
            for hook in edited:
                hook.edit = None
        # a CUDA graph's outputs are overwritten by its next replay: keep a copy of the logits
        return logits.clone() if self.cuda_graphs else logits


def _position_free_edits(
    steering: SequenceSteering,
) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
    """Each steered layer's ops applied at every position (``SequenceSteering.apply`` for a step
    at or after the steering's start)."""

    def edit(ops: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda hidden: ops.apply(hidden, None)

    return {layer: edit(ops) for layer, ops in steering.layers.items() if ops.ops}
