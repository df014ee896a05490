"""Anomalies: feature activations far outside calibration, flagged on the feature stream.

With a calibrated filter on (``--feature-filter surprise`` or ``combined``, the demo's default),
every reported feature carries ``surprise``, its z-score against the calibration corpus:
``(activation - mean) / std``. A feature whose z-score reaches ``DEFAULT_ANOMALY_Z`` is published
as ``event: anomaly`` beside its record. Without calibration there is no surprise and no anomaly.
(Residual norms are not calibrated yet, so they are not flagged; see docs/fmri.md.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from neuroscope.records import TokenFeatures

# z-scores this far out are rare by construction: under a normal law, 10 standard deviations is
# below 1e-20; activation distributions have heavier tails, so this flags only the extreme.
DEFAULT_ANOMALY_Z = 10.0


@dataclass(frozen=True)
class AnomalyEvent:
    """A feature at a position whose activation is ``surprise`` standard deviations above its
    calibration mean."""

    request_id: str
    position: int
    phase: str
    token: str
    layer: int
    feature: int
    label: str
    activation: float
    surprise: float
    site: str = "resid_post"

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "position": self.position,
            "phase": self.phase,
            "token": self.token,
            "layer": self.layer,
            "feature": self.feature,
            "label": self.label,
            "activation": round(float(self.activation), 6),
            "surprise": round(float(self.surprise), 4),
            "site": self.site,
        }

    def to_json(self) -> str:
        """Compact JSON, as the feature stream's ``anomaly`` event carries it."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))


def anomalies(record: TokenFeatures, z: float | None = DEFAULT_ANOMALY_Z) -> list[AnomalyEvent]:
    """The record's features whose surprise reaches ``z`` (none when ``z`` is None)."""
    if z is None:
        return []
    return [
        AnomalyEvent(
            record.request_id,
            record.position,
            record.phase,
            record.token,
            record.layer,
            f.index,
            f.label,
            f.activation,
            f.surprise,
            record.site,
        )  # fmt: skip
        for f in record.top_features
        if f.surprise is not None and f.surprise >= z
    ]


__all__ = ["DEFAULT_ANOMALY_Z", "AnomalyEvent", "anomalies"]
