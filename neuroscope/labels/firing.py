"""How often each feature fires, for ``labels show``: one small interface over two sources.

Calibration stats (``neuroscope.calibration``, ``neuroscope calibrate run``) are the reference; a
labelling corpus pass also counts firings as a by-product and fills in when there is no calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuroscope.labels import examples as ex


@dataclass(frozen=True)
class FiringRates:
    rates: np.ndarray  # float64 [width]: fraction of tokens on which each feature fired
    tokens: int
    source: str  # "calibration" or "corpus pass"

    def rate(self, index: int) -> float | None:
        return float(self.rates[index]) if 0 <= index < len(self.rates) else None


def firing_rates(model: str, sae: str, layer: int) -> FiringRates | None:
    """The best firing rates known for this model, SAE and layer, or None."""
    from neuroscope.calibration import CalibrationError, find_stats, load_stats

    path = find_stats(model, sae, layer)
    if path is not None:
        try:
            stats = load_stats(path)
            return FiringRates(np.asarray(stats.acc.firing_rate), stats.acc.tokens, "calibration")
        except CalibrationError:
            pass  # a broken stats file: calibration's own commands report it; fall through
    counts = ex.fire_counts(ex.examples_dir(model, sae))
    if counts is None:
        return None
    fire_count, tokens = counts
    return FiringRates(fire_count / max(tokens, 1), tokens, "corpus pass")
