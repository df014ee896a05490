"""Continuous batching on torch: many sequences decode together, one forward pass per step.

Design (the simplest exact one): the running batch holds ONE left-padded transformers
``DynamicCache`` of full-length layers ([rows, heads, L, head_dim]) and a 2D attention mask
[rows, L] that marks each row's real tokens. A step feeds one token per row with that row's own
``position_ids``; transformers' own mask builders (``create_causal_mask`` and
``create_sliding_window_causal_mask``) turn the 2D mask into each layer's mask. Sliding windows stay
exact with left padding: they are measured as a difference of cache indices, and padding shifts the
query and its keys alike.

A newcomer's prompt is prefilled alone, in chunks (``prefill_chunk``: each chunk continues its own
cache at its own positions, so the attention is that of one prefill), and merged into the batch
before its first decode, by left-padding either side to the longer length; rows that leave are
dropped and columns that became all padding are trimmed. Each layer of the batch's cache is a
``GrowingLayer``: a step's keys and values are written in place, not concatenated.

Reused from transformers: ``DynamicCache``/``DynamicLayer`` and the masking utilities. Not reused:
``generation.continuous_batching`` (its manager owns the generation loop and sampling, and packs
all requests into one flattened sequence over paged attention, where the hooks would have to
un-pack rows by offsets); see docs/batching.md.

On the CPU the first batched step rearranges the linear weights for small batches
(``column_major_linears``, ``PackedLinears``): there a step of a few rows is bound by MKL's
matrix products, not by reading the weights.

The cache without a config keeps every token of sliding layers (more memory than the single
sequence path's sliding layers, exact all the same).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from neuroscope.backend import LayerTopK, SamplingParams, StepFeatures, concat_features
from neuroscope_torch.backend import TorchSequence

if TYPE_CHECKING:
    from neuroscope.steering import CompiledSteering
    from neuroscope_torch.backend import TorchBackend


@dataclass
class BatchedTorchSequence(TorchSequence):
    """A sequence of the batch: while its prompt is being fed, the prompt and the features of
    the chunks fed so far."""

    prompt: list[int] | None = None  # None once all fed
    prompt_features: list[StepFeatures] = field(default_factory=list)


def column_major_linears(model: torch.nn.Module) -> None:
    """Store every linear layer's weight [out, in] column-major (the transpose contiguous: the same
    values, another memory order) on the CPU. MKL multiplies a few rows by a row-major weight
    through a path that is slow for 2-16 rows (a batched decode step): on SmolLM2-135M, one torch
    thread, 8 rows cost 114 ms of matrix products that way and 72-91 ms column-major, while 1 row
    and 256 rows (a prefill chunk) cost the same either way. Tied weights are changed once; other
    dtypes (not MKL's sgemm) and devices are left alone."""
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        w = module.weight
        if w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous():
            w.data = w.data.T.contiguous().T


class PackedLinears:
    """MKL's packed copies of a small model's linear weights, for the CPU decode steps of
    ``FROM``..``ROWS`` rows (padded to ``ROWS``): MKL multiplies such a step's few rows by a weight
    it packed once for that row count faster than by the plain weight, which it repacks on every
    call (SmolLM2-135M, one thread, context 100: a step of 8 rows 100-113 ms plain, 86-100 ms
    packed; below 5 rows the padding costs more than it saves). MKL's packed format takes more
    room than the weights (SmolLM2-135M: 540 MB of weights, ~+800 MB resident), so only models
    whose linear weights take at most ``BUDGET`` bytes are packed (the small models a CPU serves);
    elsewhere, and where torch has no MKL, nothing changes. The packed
    product (``torch.ops.mkl._mkl_linear``, what torch.compile's CPU freezing pass emits) sums
    in another order: results agree with the plain product to float32 rounding."""

    ROWS = 8
    FROM = 5
    BUDGET = 768 << 20

    def __init__(self, model: torch.nn.Module):
        self.forwards: dict[torch.nn.Linear, Any] = {}
        self.steps = 0  # decode steps that used them (for tests)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        usable = (
            torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_linear")
            and all(
                m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 for m in linears
            )
        )
        if not linears or not usable or size > self.BUDGET:
            return
        try:
            for m in linears:
                # (from a row-major copy, dropped once packed; the forward holds the parameter)
                row_major = m.weight.detach().contiguous()
                packed = torch.ops.mkl._mkl_reorder_linear_weight(row_major, self.ROWS)
                self.forwards[m] = _packed_forward(m.weight, m.bias, packed, self.ROWS)
        except RuntimeError:  # a torch whose MKL ops refuse: keep the plain products
            self.forwards = {}

    @contextmanager
    def used_for(self, rows: int) -> Iterator[None]:
        """The linear layers compute with the packed weights in this block, when ``rows`` suits."""
        if not self.forwards or not self.FROM <= rows <= self.ROWS:
            yield
            return
        self.steps += 1
        for module, forward in self.forwards.items():
            module.forward = forward  # type: ignore[method-assign]
        try:
            yield
        finally:
            for module in self.forwards:
                del module.forward


def _packed_forward(
    weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor, rows: int
) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        if n > rows:  # (a prefill chunk: never inside ``used_for``)
            return torch.nn.functional.linear(x, weight, bias)
        if n < rows:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, rows - n))
        out = torch.ops.mkl._mkl_linear(flat, packed, weight, bias, rows)[:n]
        return out.reshape(*x.shape[:-1], weight.shape[0])

    return forward


class GrowingLayer(DynamicLayer):
    """transformers' ``DynamicLayer`` that writes each step's keys and values in place into spare
    columns of a preallocated buffer, doubling it when full, instead of concatenating the whole
    cache every step (``DynamicLayer.update`` = ``torch.cat``: every step copied every row's
    whole cache, per layer: ~70 MB a step for 8 rows of 200 tokens on SmolLM2-135M). ``keys`` and
    ``values`` are views of the filled part, so everything that reads a ``DynamicLayer`` reads this
    one alike."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 64):
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self._filled = keys.shape[-2]
        self._keys = keys.new_empty((*keys.shape[:-2], self._filled + spare, keys.shape[-1]))
        self._values = values.new_empty(
            (*values.shape[:-2], self._filled + spare, values.shape[-1])
        )
        self._keys[..., : self._filled, :] = keys
        self._values[..., : self._filled, :] = values
        self._views()

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._keys[..., : self._filled, :], self._values[..., : self._filled, :]
        self.keys, self.values = keys, values
        return keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        if self._filled + n > self._keys.shape[-2]:  # full: double
            keys, values = self._views()
            grown = GrowingLayer(keys, values, spare=max(self._filled, n))
            self._keys, self._values = grown._keys, grown._values
        self._keys[..., self._filled : self._filled + n, :] = key_states
        self._values[..., self._filled : self._filled + n, :] = value_states
        self._filled += n
        return self._views()


class TorchBatch:
    """The running batch: its rows (sequences, in cache order), their cache and padding mask; and
    the model's weights arranged for small batches on the CPU (``column_major_linears``,
    ``PackedLinears``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        column_major_linears(model)
        self.packed = PackedLinears(model)
        self.rows: list[TorchSequence] = []
        self.cache: Any = None  # a DynamicCache of GrowingLayers [rows, heads, L, head_dim]
        self.mask: torch.Tensor | None = None  # long [rows, L], 1 where a real token is cached

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def keep(self, seqs: Sequence[TorchSequence]) -> None:
        """Drop the rows not in ``seqs``, then trim the columns no remaining row uses."""
        wanted = {id(s) for s in seqs}
        kept = [i for i, s in enumerate(self.rows) if id(s) in wanted]
        if len(kept) == len(self.rows):
            return
        if not kept:
            self.rows, self.cache, self.mask = [], None, None
            return
        assert self.mask is not None
        index = torch.tensor(kept, device=self.mask.device)
        self.mask = self.mask[index]
        self.rows = [self.rows[i] for i in kept]
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else self.mask.shape[1]
        self.mask = self.mask[:, first:]  # less the left padding nobody needs any more
        self.cache.layers = [
            GrowingLayer(layer.keys[index, :, first:], layer.values[index, :, first:])
            for layer in self.cache.layers
        ]

    def add(self, seq: TorchSequence) -> None:
        """Merge a sequence prefilled alone (its own cache) as the last row."""
        own = seq.cache
        seq.cache = None  # it lives in the batch from now on
        mask = torch.ones((1, seq.position), dtype=torch.long, device=seq.logits.device)
        if self.cache is None:
            own.layers = [GrowingLayer(layer.keys, layer.values) for layer in own.layers]
            self.rows, self.cache, self.mask = [seq], own, mask
            return
        assert self.mask is not None
        length = max(self.length, seq.position)
        pad_batch, pad_new = length - self.length, length - seq.position
        self.cache.layers = [
            GrowingLayer(
                torch.cat([_pad(mine.keys, pad_batch), _pad(theirs.keys, pad_new)]),
                torch.cat([_pad(mine.values, pad_batch), _pad(theirs.values, pad_new)]),
            )
            for mine, theirs in zip(self.cache.layers, own.layers, strict=True)
        ]
        self.mask = torch.cat(
            [
                torch.nn.functional.pad(self.mask, (pad_batch, 0)),
                torch.nn.functional.pad(mask, (pad_new, 0)),
            ]
        )
        self.rows.append(seq)


def _pad(kv: torch.Tensor, n: int) -> torch.Tensor:
    """``kv`` [B, H, L, D] with ``n`` zero columns on the left of L (masked out, never read)."""
    return kv if n == 0 else torch.nn.functional.pad(kv, (0, 0, n, 0))


def start(
    backend: TorchBackend,
    token_ids: Sequence[int],
    sampling: SamplingParams,
    steering: CompiledSteering | None = None,
) -> BatchedTorchSequence:
    """A new sequence of ``token_ids``: ids checked, generator seeded, an empty cache that can
    join a batch (full-length layers); nothing computed yet (``prefill_chunk`` feeds the prompt)."""
    from transformers import DynamicCache

    from neuroscope_torch.steering import SequenceSteering

    ids = backend._check_ids(token_ids)
    generator = torch.Generator(device=backend._device)
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    cache = DynamicCache()  # no config: every layer full-length, so rows can be padded and merged
    steer = None if steering is None else SequenceSteering(steering, backend._saes, backend._device)
    nothing = torch.empty(0, device=backend._device)  # logits come with the last chunk
    return BatchedTorchSequence(cache, sampling, generator, 0, nothing, steer, prompt=ids)


@torch.inference_mode()
def prefill_chunk(
    backend: TorchBackend, seq: BatchedTorchSequence, max_tokens: int
) -> StepFeatures | None:
    """Feed the next ``max_tokens`` (at most) of ``seq``'s prompt into its own cache, from where
    the last chunk stopped (its positions, its cache offset: the same attention as one prefill,
    chunk by chunk); the features of every prompt position after the last chunk, else None."""
    if seq.prompt is None:
        raise RuntimeError("This sequence's prompt is all fed: decode it instead.")
    chunk = seq.prompt[seq.position : seq.position + max(max_tokens, 1)]
    seq.logits = backend._forward(seq.cache, seq.position, chunk, seq.steering)
    seq.prompt_features.append(backend._features(seq.steering, seq.position))
    seq.position += len(chunk)
    if seq.position < len(seq.prompt):
        return None
    parts, seq.prompt, seq.prompt_features = seq.prompt_features, None, []
    return concat_features(parts)


@torch.inference_mode()
def decode(
    backend: TorchBackend, batch: TorchBatch, seqs: Sequence[TorchSequence], tokens: Sequence[int]
) -> list[StepFeatures]:
    """One decode step: ``tokens[i]`` into ``seqs[i]``; the features of each, in that order.

    The batch becomes exactly ``seqs``: rows not named leave, sequences not yet in it join.
    """
    if len(seqs) != len(tokens) or not seqs:
        raise ValueError("Give one token for each sequence, and at least one sequence.")
    batch.keep(seqs)
    present = {id(s) for s in batch.rows}
    for seq in seqs:
        if id(seq) not in present:
            batch.add(seq)
    by_row = {id(s): tokens[i] for i, s in enumerate(seqs)}
    rows = batch.rows
    device = backend._device
    ids = torch.tensor([[by_row[id(s)]] for s in rows], device=device)
    backend._check_ids(ids.flatten().tolist())
    firsts = [s.position for s in rows]  # the position of the token each row feeds
    assert batch.mask is not None
    mask = torch.cat([batch.mask, torch.ones((len(rows), 1), dtype=torch.long, device=device)], 1)
    positions = torch.tensor(firsts, device=device)[:, None]
    steered = [(r, s.steering) for r, s in enumerate(rows) if s.steering is not None]
    edited = []
    for layer in {layer for _, st in steered for layer in st.layers}:
        hook = backend._hook(layer)
        hook.edit = lambda h, layer=layer: _steer_rows(h, layer, steered, firsts)
        edited.append(hook)
    try:
        with batch.packed.used_for(len(rows)):
            out = backend.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **{backend._cache_arg: batch.cache},
            )  # fmt: skip
    finally:
        for hook in edited:
            hook.edit = None
    batch.mask = mask
    logits = out.logits[:, -1].float()
    for r, seq in enumerate(rows):
        seq.logits = logits[r]
        seq.position += 1
    features = _features(backend, rows, firsts)
    order = {id(s): r for r, s in enumerate(rows)}
    return [features[order[id(s)]] for s in seqs]


def _steer_rows(
    hidden: torch.Tensor, layer: int, steered: list[tuple[int, Any]], firsts: list[int]
) -> torch.Tensor:
    """Each steered row's own steering on its own row of ``hidden`` [B, T, d]; others untouched."""
    hidden = hidden.clone()
    for r, steering in steered:
        hidden[r : r + 1] = steering.apply(layer, hidden[r : r + 1], firsts[r])
    return hidden


def _features(
    backend: TorchBackend, rows: list[TorchSequence], firsts: list[int]
) -> list[StepFeatures]:
    """Every hooked layer's SAE encode and top-k once for the whole batch; one host copy per kind."""
    k = backend._top_k
    per_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    watched: dict[tuple[int, int], np.ndarray] = {}  # (row, layer) -> [1, watched]
    for layer, sae in backend._saes.items():
        residual = backend._take(layer)[:, -1]  # [B, d]: each row's one new position
        acts = sae.encode(residual)
        for r, seq in enumerate(rows):
            if seq.steering is None:
                continue
            acts[r : r + 1] = seq.steering.pin(layer, acts[r : r + 1], firsts[r])
            w = seq.steering.watched(layer)
            if w is not None:
                watched[r, layer] = acts[r : r + 1, w].cpu().numpy()
        values, indices = acts.topk(k, dim=-1)
        per_layer[layer] = (indices, values)
    if not per_layer:
        return [{} for _ in rows]
    layers = list(per_layer)
    host_indices = torch.stack([per_layer[layer][0] for layer in layers]).cpu().numpy()  # [L, B, k]
    host_values = torch.stack([per_layer[layer][1].float() for layer in layers]).cpu().numpy()
    return [
        {
            layer: LayerTopK(
                host_indices[i, r : r + 1], host_values[i, r : r + 1], watched.get((r, layer))
            )
            for i, layer in enumerate(layers)
        }
        for r in range(len(rows))
    ]


@torch.inference_mode()
def sample(backend: TorchBackend, seq: TorchSequence, allowed: np.ndarray | None = None) -> int:
    """The backend's own sampling, on ``seq``'s logits and generator."""
    if getattr(seq, "prompt", None) is not None:
        raise RuntimeError("This sequence's prompt is not all fed yet: prefill_chunk first.")
    saved = backend._seq
    backend._seq = seq
    try:
        return backend.sample(allowed)
    finally:
        backend._seq = saved
