"""What is known of one feature: the page's feature panel (``GET /v1/features/info`` on :8081).

Everything comes from what is already on disk or in memory; nothing is fetched from the network:

- the label and where it came from (``autointerp:<labeler>``, ``neuronpedia``, ``fallback``);
- firing rate, mean and max activation from the calibration stats of this model, SAE and layer
  (``neuroscope calibrate``), when there are some;
- the top examples of the corpus pass (``neuroscope labels generate`` runs it), when it ran;
- the Neuronpedia page, when the SAE has a Neuronpedia id.

The calibration arrays are read once per layer and kept (a 16k-wide SAE is a few hundred kB).
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any

from neuroscope.calibration import CalibrationError, find_stats, load_stats
from neuroscope.labels.examples import examples_dir, read_features
from neuroscope.labels.neuronpedia import NeuronpediaId, neuronpedia_id_for, neuronpedia_url

if TYPE_CHECKING:
    from neuroscope.session import Session

MAX_EXAMPLES = 10

_Calibration = tuple[Any, Any, Any] | None  # (firing_rate, mean, max) arrays, or none


class FeatureInfo:
    """Answers for one loaded session (its labels and filter are read at each call: they can change)."""

    def __init__(self, session: Session):
        self.session = session
        self.model = session.model_name
        self.sae_ids = {layer: sae.id for layer, sae in session.saes.items()}
        self._calibration: dict[int, _Calibration] = {}
        self._lock = threading.Lock()

    @property
    def labels(self) -> Any:
        return self.session.builder.labels

    def describe(self, layer: int, index: int) -> dict[str, Any]:
        sae = self.sae_ids[layer]
        label, source = self._label(layer, index)
        out: dict[str, Any] = {
            "layer": layer,
            "index": index,
            "sae": sae,
            "label": label,
            "label_source": source,
            "firing_rate": None,
            "mean_activation": None,
            "max_activation": None,
            "examples": [],
            "neuronpedia": self._neuronpedia(layer, index),
        }
        stats = self._stats(layer)
        if stats is not None and index < len(stats[0]):
            rate, mean, top = (_number(a[index]) for a in stats)
            out.update(firing_rate=rate, mean_activation=mean, max_activation=top)
        out["examples"] = self._examples(sae, index)
        return out

    def _label(self, layer: int, index: int) -> tuple[str, str]:
        # A LabelResolver also says where a label came from; a plain lookup does not.
        resolve = getattr(self.labels, "label", None)
        if callable(resolve):
            text, source = resolve(layer, index)
            return str(text), str(source)
        return str(self.labels(layer, index)), "labels"

    def _neuronpedia(self, layer: int, index: int) -> str | None:
        lookup = getattr(self.labels, "neuronpedia_id", None)
        np_id: NeuronpediaId | None = lookup(layer) if callable(lookup) else None
        np_id = np_id or neuronpedia_id_for(self.sae_ids[layer])
        return f"{neuronpedia_url()}/{np_id}/{index}" if np_id else None

    def _stats(self, layer: int) -> _Calibration:
        with self._lock:
            if layer not in self._calibration:
                self._calibration[layer] = self._load_stats(layer)
            return self._calibration[layer]

    def _load_stats(self, layer: int) -> _Calibration:
        path = find_stats(self.model, self.sae_ids[layer], layer)
        if path is not None:
            try:
                acc = load_stats(path).acc
                return acc.firing_rate, acc.act_mean, acc.act_max
            except CalibrationError:  # a broken file: say "no calibration"; serving goes on
                pass
        # Stats given by path (--calibration) reach only the filter, which keeps no maximum.
        feature_filter = self.session.builder.feature_filter
        cal = feature_filter.layers.get(layer) if feature_filter is not None else None
        if cal is None:
            return None
        return cal.firing_rate, cal.mean, [math.nan] * len(cal.mean)

    def _examples(self, sae: str, index: int) -> list[dict[str, Any]]:
        found = read_features(examples_dir(self.model, sae), [index]).get(index)
        if found is None:
            return []
        return [
            {
                "activation": _number(e.activation),
                "before": e.before,
                "token": e.token,
                "after": e.after,
            }
            for e in found.examples[:MAX_EXAMPLES]
        ]


def _number(value: Any) -> float | None:
    x = float(value)
    return x if math.isfinite(x) else None
