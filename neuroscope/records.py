"""The feature record: one per position per hooked layer (see DESIGN.md, "Feature record")."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

Phase = Literal["prompt", "generation"]


@dataclass(frozen=True, slots=True)
class Feature:
    index: int
    activation: float
    label: str = ""
    surprise: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "label": self.label or f"feature_{self.index}",
            "activation": round(float(self.activation), 6),
        }
        if self.surprise is not None:
            out["surprise"] = round(float(self.surprise), 6)
        return out


@dataclass(slots=True)
class TokenFeatures:
    """What the SAE at one layer saw in the residual stream at one position."""

    request_id: str
    position: int
    phase: Phase
    token: str
    token_id: int
    layer: int
    sae: str
    top_features: list[Feature] = field(default_factory=list)
    token_index: int | None = None
    next_token: str | None = None
    filtered_count: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "token_index": self.token_index,
            "position": self.position,
            "phase": self.phase,
            "token": self.token,
            "token_id": self.token_id,
            "next_token": self.next_token,
            "layer": self.layer,
            "sae": self.sae,
            "top_features": [f.to_dict() for f in self.top_features],
        }
        if self.filtered_count is not None:
            out["filtered_count"] = self.filtered_count
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenFeatures:
        features = [
            Feature(
                index=int(f["index"]),
                activation=float(f["activation"]),
                label=f.get("label", ""),
                surprise=f.get("surprise"),
            )
            for f in data.get("top_features", [])
        ]
        return cls(
            request_id=data["request_id"],
            position=int(data["position"]),
            phase=data["phase"],
            token=data["token"],
            token_id=int(data["token_id"]),
            layer=int(data["layer"]),
            sae=data["sae"],
            top_features=features,
            token_index=data.get("token_index"),
            next_token=data.get("next_token"),
            filtered_count=data.get("filtered_count"),
        )


@dataclass(frozen=True, slots=True)
class GenerationComplete:
    request_id: str
    finish_reason: Literal["stop", "length", "cancelled", "error"]
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
