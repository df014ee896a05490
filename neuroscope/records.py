"""The feature record: one per position per hooked layer (see docs/, "Feature record").

Records are ``msgspec`` structs: cheap to build (hundreds per prompt) and encoded to JSON by
msgspec in C, with no intermediate dict (``to_json_bytes``; the hub and the SSE server use it).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Phase = Literal["prompt", "generation"]
FinishReason = Literal["stop", "length", "cancelled", "error", "monitor"]  # monitor: action stop


class Feature(msgspec.Struct, omit_defaults=True, gc=False):
    """One SAE feature at one position: ``surprise`` is left out of JSON when None."""

    index: int
    activation: float
    label: str = ""
    surprise: float | None = None

    def __post_init__(self) -> None:
        if not self.label:  # every record names its features; the fallback is the index
            self.label = f"feature_{self.index}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "label": self.label,
            "activation": round(float(self.activation), 6),
        }
        if self.surprise is not None:
            out["surprise"] = round(float(self.surprise), 6)
        return out


# filtered_count is the last field, so a record without one ends in exactly these bytes.
_NO_FILTERED_COUNT = b',"filtered_count":null}'
_encoder = msgspec.json.Encoder()


class TokenFeatures(msgspec.Struct, gc=False):
    """What the SAE at one layer saw in the residual stream at one position."""

    request_id: str
    position: int
    phase: Phase
    token: str
    token_id: int
    layer: int
    sae: str
    top_features: list[Feature] = msgspec.field(default_factory=list)
    token_index: int | None = None
    next_token: str | None = None
    # What the SAE read: resid_post (a block's output), or attn_out, attn_z, mlp_in (transcoders),
    # mlp_out, resid_mid (see neuroscope.sae.Site).
    site: str = "resid_post"
    filtered_count: int | None = None

    def to_json_bytes(self) -> bytes:
        """The record as compact UTF-8 JSON, as sent on the wire (``filtered_count`` only when
        a filter computed it)."""
        data = _encoder.encode(self)
        if data.endswith(_NO_FILTERED_COUNT):
            return data[: -len(_NO_FILTERED_COUNT)] + b"}"
        return data

    def to_json(self) -> str:
        return self.to_json_bytes().decode()

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
            "site": self.site,
            "sae": self.sae,
            "top_features": [f.to_dict() for f in self.top_features],
        }
        if self.filtered_count is not None:
            out["filtered_count"] = self.filtered_count
        return out

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
            site=data.get("site", "resid_post"),
            filtered_count=data.get("filtered_count"),
        )


class GenerationComplete(msgspec.Struct, frozen=True, gc=False):
    request_id: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int

    def to_json_bytes(self) -> bytes:
        return _encoder.encode(self)

    def to_json(self) -> str:
        return self.to_json_bytes().decode()

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
