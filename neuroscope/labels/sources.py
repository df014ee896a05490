"""Which label a feature gets: the priority chain, answered from memory on the token path.

1. an auto-interp label from the chosen labeler (``--labeler``, env LABELER_MODEL, default
   deepseek/deepseek-v3.2; when none was named and the default has no labels for this SAE, the most
   recently written labeler's), for this model, else for another model with the same SAE;
2. a Neuronpedia label already in the cache (bulk import or an earlier live fetch);
3. top tokens (:mod:`neuroscope.labels.top_tokens`): the tokens the feature fires hardest on in the
   corpus pass, e.g. ``Paris · London · Berlin``, read from ``top_tokens.json`` beside a local SAE
   or from the cached examples; below every explanation, above the bare index;
4. Neuronpedia live, per feature, only when network use for labels is allowed: the lookup returns
   the top tokens or the fallback at once and a background thread fetches and caches the label;
5. ``feature_<index>``.

Everything is loaded once per layer; :meth:`LabelResolver.reload` picks up labels written since.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from neuroscope.cache import slug
from neuroscope.labels import store, top_tokens
from neuroscope.labels.labeler import DEFAULT_LABELER
from neuroscope.labels.neuronpedia import (
    LiveFetcher,
    NeuronpediaError,
    NeuronpediaId,
    load_cached,
    neuronpedia_id_for,
)

FALLBACK = "fallback"
NEURONPEDIA = "neuronpedia"
TOP_TOKENS = top_tokens.SOURCE
NETWORK_ENV = "NEUROSCOPE_NEURONPEDIA_LIVE"


def fallback_label(index: int) -> str:
    return f"feature_{index}"


def network_allowed_by_env() -> bool:
    """NEUROSCOPE_NEURONPEDIA_LIVE=1 allows live Neuronpedia fetches where no flag says otherwise."""
    return os.environ.get(NETWORK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class _Layer:
    sae: str
    autointerp: dict[int, str] = field(default_factory=dict)
    autointerp_source: str = ""
    label_set: store.LabelSet | None = None
    np_id: NeuronpediaId | None = None
    neuronpedia: dict[int, str | None] = field(default_factory=dict)
    top_tokens: dict[int, str] = field(default_factory=dict)


class LabelResolver:
    """Labels for the features of the SAEs hooked at some layers of one model.

    ``saes`` maps layer -> SAE id (as in feature records). ``neuronpedia_ids`` overrides the mapping
    to Neuronpedia per layer (``"model/sae"``; None turns Neuronpedia off for that layer).
    ``sae_sources`` names, per layer, the local SAE folder that may hold ``top_tokens.json``.
    """

    def __init__(
        self,
        model: str,
        saes: Mapping[int, str],
        *,
        labeler: str | None = None,
        allow_network: bool = False,
        neuronpedia_ids: Mapping[int, str | NeuronpediaId | None] | None = None,
        sae_sources: Mapping[int, str] | None = None,
    ):
        self.sae_sources = dict(sae_sources or {})
        self.model = model
        self.saes = dict(saes)
        self.labeler = labeler or os.environ.get("LABELER_MODEL") or None
        self.allow_network = allow_network
        # Parsed now, so that a bad id is a start-up error rather than one on the token path.
        self._np_override = {
            layer: NeuronpediaId.parse(given) if isinstance(given, str) else given
            for layer, given in (neuronpedia_ids or {}).items()
        }
        self._layers: dict[int, _Layer] = {}
        self._lock = threading.Lock()
        self._fetcher: LiveFetcher | None = None
        self._version = 0

    @property
    def version(self) -> int:
        """Changes whenever the labels this resolver gives may have: a layer loaded, a live fetch
        arrived, ``reload``. Cheap; callers that cache whole layers key their cache on it."""
        return self._version

    # ---- lookups (the token path) -----------------------------------------------------------------

    def label(self, layer: int, index: int) -> tuple[str, str]:
        """(label, source); source is ``autointerp:<labeler>``, ``neuronpedia`` or ``fallback``."""
        state = self._layer(layer)
        if state is None:
            return fallback_label(index), FALLBACK
        text = state.autointerp.get(index)
        if text is not None:
            return text, state.autointerp_source
        if index in state.neuronpedia:
            text = state.neuronpedia[index]
            if text is not None:
                return text, NEURONPEDIA
        elif self.allow_network and state.np_id is not None:
            self._live().request(state.np_id, index)
        text = state.top_tokens.get(index)
        if text is not None:
            return text, TOP_TOKENS
        return fallback_label(index), FALLBACK

    def __call__(self, layer: int, index: int) -> str:
        """The label alone: a ``LabelLookup`` for :class:`~neuroscope.generation.RecordBuilder`."""
        return self.label(layer, index)[0]

    def labels_for(self, layer: int, width: int | None = None) -> dict[int, str]:
        """Every known label of a layer; with ``width``, every feature's, ``feature_<i>`` where none is
        known. Never fetches anything (a live fetch per feature of a 16k SAE would be 16k requests)."""
        state = self._layer(layer)
        known = dict(state.top_tokens) if state else {}
        known.update({i: t for i, t in state.neuronpedia.items() if t is not None} if state else {})
        known.update(state.autointerp if state else {})
        if width is None:
            return dict(sorted(known.items()))
        return {i: known.get(i) or fallback_label(i) for i in range(width)}

    def label_set(self, layer: int) -> store.LabelSet | None:
        """The auto-interp labels in use for a layer (folder, labeler, model, SAE), if any."""
        state = self._layer(layer)
        return state.label_set if state else None

    def neuronpedia_id(self, layer: int) -> NeuronpediaId | None:
        state = self._layer(layer)
        return state.np_id if state else None

    # ---- network -----------------------------------------------------------------------------------

    def fetch_missing(self, layer: int, indices: Iterable[int]) -> list[str]:
        """Fetch from Neuronpedia, now, the features of ``indices`` that have no label at all yet.

        Only when network use is allowed; returns error messages (empty when all went well).
        """
        state = self._layer(layer)
        if not self.allow_network or state is None or state.np_id is None:
            return []
        errors = []
        for index in indices:
            if index in state.autointerp or index in state.neuronpedia:
                continue
            try:
                self._live().fetch_now(state.np_id, index)
            except NeuronpediaError as e:
                errors.append(str(e))
                break
        return errors

    def _live(self) -> LiveFetcher:
        with self._lock:
            if self._fetcher is None:
                self._fetcher = LiveFetcher(self._on_fetched)
            return self._fetcher

    def _on_fetched(self, np_id: NeuronpediaId, index: int, description: str | None) -> None:
        for state in list(self._layers.values()):
            if state.np_id == np_id:
                state.neuronpedia[index] = description
        self._version += 1

    def wait_idle(self, timeout: float = 10.0) -> bool:
        return self._fetcher.wait_idle(timeout) if self._fetcher else True

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()

    # ---- loading -----------------------------------------------------------------------------------

    def reload(self) -> None:
        with self._lock:
            self._layers.clear()
            self._version += 1

    def _layer(self, layer: int) -> _Layer | None:
        state = self._layers.get(layer)
        if state is not None or layer not in self.saes:
            return state
        with self._lock:
            if layer not in self._layers:
                self._layers[layer] = self._load(layer)
                self._version += 1
            return self._layers[layer]

    def _load(self, layer: int) -> _Layer:
        sae = self.saes[layer]
        state = _Layer(sae)
        label_set = self._label_set(sae)
        state.label_set = label_set
        if label_set is not None:
            state.autointerp = store.ok_labels(
                store.Journal(label_set.folder / store.LABELS_FILE).load()
            )
            state.autointerp_source = f"autointerp:{label_set.labeler}"
        state.np_id = (
            self._np_override[layer] if layer in self._np_override else neuronpedia_id_for(sae)
        )
        if state.np_id is not None:
            state.neuronpedia = load_cached(state.np_id)
        state.top_tokens = top_tokens.find(self.model, sae, self.sae_sources.get(layer))
        return state

    def _label_set(self, sae: str) -> store.LabelSet | None:
        """The chosen labeler's labels for this SAE, this model's first (the features are the SAE's,
        so another model's labels for it still apply); when no labeler was named and the default
        one has none, the newest labels for the SAE."""
        candidates = store.find_label_sets(sae=sae)  # newest first
        wanted = slug(self.labeler or DEFAULT_LABELER)
        pool = [c for c in candidates if slug(c.labeler) == wanted] or (
            [] if self.labeler else candidates
        )
        return min(pool, key=lambda c: slug(c.model) != slug(self.model), default=None)
