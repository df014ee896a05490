"""An fMRI of the model: every layer's residual stream, attention patterns, a logit lens and the SAE
features of one text, captured in one pass (``Session.capture``) and saved in formats that open
without Neuroscope (safetensors for tensors, Parquet for long-form tables).

Layout of a saved capture (a folder):

    capture.safetensors   token_ids [T], norms [L, T], cosine [L-1, T], lens_ids / lens_logits
                          [L, T, k], residual.<layer> [T, d], attention.<layer> [heads, T, T]
    meta.json             model, source, layers, tokens, prompt_tokens, format version
    tokens.parquet        position, token_id, token, phase
    layers.parquet        position, layer, norm, cosine_next (to the next captured layer)
    lens.parquet          position, layer, rank, token_id, token, logit
    features.parquet      position, layer, rank, feature, activation, label, surprise, ... (one row
                          per feature; a record with no feature keeps one row with rank null)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from neuroscope.cache import atomic_path, write_text_atomic
from neuroscope.errors import ConfigError
from neuroscope.records import Feature, TokenFeatures

if TYPE_CHECKING:
    from neuroscope.chat import Message
    from neuroscope.session import Session

FORMAT_VERSION = 1
TENSORS = "capture.safetensors"
LENS_TOP = 5  # next-token guesses kept per layer and position


@dataclass
class Capture:
    """One text seen through every captured layer. Arrays are float32 / int64 numpy on the host.

    ``norms[i]`` and ``cosine[i]`` follow ``layers[i]``: the L2 norm of each token's residual, and
    the cosine between the residual after ``layers[i]`` and after ``layers[i + 1]`` (how much a
    block turns the stream: the "information flow" view). ``lens_ids[i, t]`` are the ``k`` tokens
    the final norm and unembedding read off ``layers[i]``'s residual at position t, best first.
    """

    model: str
    source: str  # the text, or the messages as JSON
    token_ids: np.ndarray  # int64 [T]
    tokens: list[str]
    prompt_tokens: int
    layers: list[int]
    norms: np.ndarray  # float32 [L, T]
    cosine: np.ndarray  # float32 [L-1, T]
    lens_ids: np.ndarray  # int64 [L, T, k]
    lens_logits: np.ndarray  # float32 [L, T, k]
    lens_tokens: list[list[list[str]]]  # [L][T][k], the text of lens_ids
    residual: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> float32 [T, d]
    attention: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [heads, T, T]
    features: list[TokenFeatures] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    def row(self, layer: int) -> int:
        """The index of ``layer`` in ``layers`` (and in norms, lens_ids, ...)."""
        if layer not in self.layers:
            raise ConfigError(f"Layer {layer} was not captured; captured layers: {self.layers}.")
        return self.layers.index(layer)

    # -- derived views -----------------------------------------------------------------------------

    def feature_activity(self, layer: int, features: Sequence[int] | None = None) -> np.ndarray:
        """float32 [T, n]: each listed feature's activation at each position (0 where it was not in
        the position's top-k); by default the features that appear at ``layer``."""
        records = [r for r in self.features if r.layer == layer]
        if features is None:
            features = sorted({f.index for r in records for f in r.top_features})
        column = {f: i for i, f in enumerate(features)}
        out = np.zeros((len(self), len(features)), dtype=np.float32)
        for r in records:
            for f in r.top_features:
                if f.index in column:
                    out[r.position, column[f.index]] = f.activation
        return out

    # -- files -------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the capture into the folder ``path`` (created; files replaced atomically)."""
        from safetensors.numpy import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, np.ndarray] = {
            "token_ids": self.token_ids, "norms": self.norms, "cosine": self.cosine,
            "lens_ids": self.lens_ids, "lens_logits": self.lens_logits,
        }  # fmt: skip
        tensors.update({f"residual.{L}": a for L, a in self.residual.items()})
        tensors.update({f"attention.{L}": a for L, a in self.attention.items()})
        meta = self._meta()
        with atomic_path(folder / TENSORS) as tmp:
            save_file(
                {k: np.ascontiguousarray(v) for k, v in tensors.items()},
                str(tmp),
                metadata={"neuroscope_capture": json.dumps(meta)},
            )
        for name, table in self.tables().items():
            _write_parquet(table, folder / f"{name}.parquet")
        write_text_atomic(folder / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False))
        return folder

    def _meta(self) -> dict[str, Any]:
        return {
            "format": "neuroscope-capture", "version": FORMAT_VERSION, "model": self.model,
            "source": self.source, "layers": self.layers, "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "residual_layers": sorted(self.residual), "attention_layers": sorted(self.attention),
        }  # fmt: skip

    def tables(self) -> dict[str, Any]:
        """The long-form tables as ``pyarrow.Table`` objects, by file stem."""
        import pyarrow as pa  # type: ignore[import-untyped]

        T, L = len(self), len(self.layers)
        positions = np.arange(T, dtype=np.int64)
        tokens = pa.table({
            "position": positions, "token_id": self.token_ids.astype(np.int64),
            "token": self.tokens,
            "phase": ["prompt" if p < self.prompt_tokens else "generation" for p in range(T)],
        })  # fmt: skip
        cos_next = np.full((L, T), np.nan, dtype=np.float32)
        cos_next[: L - 1] = self.cosine
        layers = pa.table({
            "position": np.tile(positions, L),
            "layer": np.repeat(np.array(self.layers, dtype=np.int64), T),
            "norm": self.norms.reshape(-1),
            "cosine_next": pa.array(cos_next.reshape(-1), from_pandas=True),  # NaN -> null
        })  # fmt: skip
        k = self.lens_ids.shape[-1]
        lens = pa.table({
            "position": np.tile(np.repeat(positions, k), L),
            "layer": np.repeat(np.array(self.layers, dtype=np.int64), T * k),
            "rank": np.tile(np.arange(k, dtype=np.int64), L * T),
            "token_id": self.lens_ids.reshape(-1),
            "token": [t for per_layer in self.lens_tokens for per_pos in per_layer for t in per_pos],
            "logit": self.lens_logits.reshape(-1),
        })  # fmt: skip
        return {
            "tokens": tokens,
            "layers": layers,
            "lens": lens,
            "features": _feature_table(self.features),
        }

    @classmethod
    def load(cls, path: str | Path) -> Capture:
        """Read a capture written by :meth:`save`."""
        import pyarrow.parquet as pq  # type: ignore[import-untyped]
        from safetensors.numpy import load_file

        folder = Path(path)
        if not (folder / TENSORS).is_file():
            raise ConfigError(f"{folder} holds no capture ({TENSORS} is missing).")
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != "neuroscope-capture" or meta.get("version") != FORMAT_VERSION:
            raise ConfigError(f"{folder}/meta.json is not a capture of format {FORMAT_VERSION}.")
        t = load_file(str(folder / TENSORS))
        layers = [int(x) for x in meta["layers"]]
        T = len(t["token_ids"])
        k = t["lens_ids"].shape[-1]
        lens_text = pq.read_table(folder / "lens.parquet", columns=["token"]).column(0).to_pylist()
        lens_tokens = [
            [lens_text[(i * T + p) * k : (i * T + p + 1) * k] for p in range(T)]
            for i in range(len(layers))
        ]
        return cls(
            model=meta["model"], source=meta["source"], token_ids=t["token_ids"],
            tokens=list(meta["tokens"]), prompt_tokens=int(meta["prompt_tokens"]), layers=layers,
            norms=t["norms"], cosine=t["cosine"], lens_ids=t["lens_ids"],
            lens_logits=t["lens_logits"], lens_tokens=lens_tokens,
            residual={int(L): t[f"residual.{L}"] for L in meta["residual_layers"]},
            attention={int(L): t[f"attention.{L}"] for L in meta["attention_layers"]},
            features=_features_from_table(pq.read_table(folder / "features.parquet")),
        )  # fmt: skip


FEATURE_COLUMNS = {
    "position": "int64", "layer": "int64", "rank": "int64", "feature": "int64",
    "activation": "float64", "label": "string", "surprise": "float64", "token": "string",
    "token_id": "int64", "next_token": "string", "phase": "string", "token_index": "int64",
    "site": "string", "sae": "string", "request_id": "string", "filtered_count": "int64",
}  # fmt: skip


def _feature_table(records: Sequence[TokenFeatures]) -> Any:
    import pyarrow as pa  # type: ignore[import-untyped]

    cols: dict[str, list[Any]] = {name: [] for name in FEATURE_COLUMNS}
    for r in records:
        base = {
            "position": r.position, "layer": r.layer, "token": r.token, "token_id": r.token_id,
            "next_token": r.next_token, "phase": r.phase, "token_index": r.token_index,
            "site": r.site, "sae": r.sae, "request_id": r.request_id,
            "filtered_count": r.filtered_count,
        }  # fmt: skip
        rows = [
            {"rank": i, "feature": f.index, "activation": f.activation, "label": f.label,
             "surprise": f.surprise}
            for i, f in enumerate(r.top_features)
        ] or [{"rank": None, "feature": None, "activation": None, "label": None, "surprise": None}]  # fmt: skip
        for row in rows:
            for name, value in {**base, **row}.items():
                cols[name].append(value)
    return pa.table(
        {
            name: pa.array(values, type=getattr(pa, FEATURE_COLUMNS[name])())
            for name, values in cols.items()
        }
    )


def _features_from_table(table: Any) -> list[TokenFeatures]:
    records: list[TokenFeatures] = []
    last: tuple[int, int] | None = None
    for row in table.to_pylist():
        key = (row["position"], row["layer"])
        if key != last:
            records.append(
                TokenFeatures(
                    request_id=row["request_id"],
                    position=row["position"],
                    phase=row["phase"],
                    token=row["token"],
                    token_id=row["token_id"],
                    layer=row["layer"],
                    sae=row["sae"],
                    token_index=row["token_index"],
                    next_token=row["next_token"],
                    site=row["site"],
                    filtered_count=row["filtered_count"],
                )  # fmt: skip
            )
            last = key
        if row["rank"] is not None:
            records[-1].top_features.append(
                Feature(row["feature"], row["activation"], row["label"], row["surprise"])
            )
    return records


def _write_parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))


# Bounds of a capture asked over HTTP (POST /v1/features/capture): the work and the answer's size.
MAX_REQUEST_CHARS = 20_000
MAX_REQUEST_TOKENS = 1_024
MAX_REQUEST_GENERATE = 64
MAX_REQUEST_VALUES = 4_000_000  # floats of residuals, and of attention, in one answer (~40 MB JSON)


class CaptureRequestError(ConfigError):
    """A capture request outside the bounds; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _floats(a: np.ndarray) -> list[Any]:
    return np.round(a.astype(np.float64), 6).tolist()


def _num_heads(session: Session) -> int:
    """Query heads per layer, from the model's config.json (1 where it does not say)."""
    try:
        config = json.loads((Path(session.resolved.path) / "config.json").read_text())
    except (OSError, ValueError):
        return 1
    config = {**config, **config.get("text_config", {})}
    return int(config.get("num_attention_heads") or 1)


def capture_json(
    session: Session,
    prompt: str | Sequence[Message],
    *,
    layers: str | Sequence[int] = "all",
    residuals: bool = False,
    attention: bool = False,
    features: bool = True,
    generate: int = 0,
) -> dict[str, Any]:
    """A bounded capture as JSON-ready data (the body of ``POST /v1/features/capture``).

    Norms, cosines and the logit lens always; residuals and attention only when asked and only
    while they stay under ``MAX_REQUEST_VALUES`` floats each. Raises ``CaptureRequestError``.
    """
    param = "text" if isinstance(prompt, str) else "messages"
    chars = len(prompt) if isinstance(prompt, str) else len(json.dumps(list(prompt)))
    if chars > MAX_REQUEST_CHARS:
        raise CaptureRequestError(
            f"The {param} is {chars} characters; a capture takes at most {MAX_REQUEST_CHARS}.",
            param,
        )
    if not 0 <= generate <= MAX_REQUEST_GENERATE:
        raise CaptureRequestError(
            f"generate must be between 0 and {MAX_REQUEST_GENERATE}, got {generate}.", "generate"
        )
    ids = (
        session.tokenizer.encode_text(prompt) if isinstance(prompt, str) else session.encode(prompt)
    )
    total = len(ids) + generate
    if total > MAX_REQUEST_TOKENS:
        raise CaptureRequestError(
            f"The {param} is {len(ids)} tokens (+{generate} to generate); a capture takes at most "
            f"{MAX_REQUEST_TOKENS} tokens. Shorten it, or use `neuroscope capture` for long texts.",
            param,
        )
    info = session.backend.info
    n_layers = info.num_layers if isinstance(layers, str) else len(set(layers))
    if residuals and total * n_layers * info.hidden_size > MAX_REQUEST_VALUES:
        raise CaptureRequestError(
            f"Residuals of {total} tokens x {n_layers} layers x {info.hidden_size} are more than "
            f"{MAX_REQUEST_VALUES:,} numbers; ask for fewer layers or a shorter text.",
            "residuals",
        )
    if attention:
        heads = _num_heads(session)
        if total * total * n_layers * heads > MAX_REQUEST_VALUES:
            raise CaptureRequestError(
                f"Attention of {total} tokens x {n_layers} layers is more than "
                f"{MAX_REQUEST_VALUES:,} numbers; ask for fewer layers or a shorter text.",
                "attention",
            )
    c = capture(
        session, prompt, layers, residual=residuals, attention=attention, features=features,
        generate=generate,
    )  # fmt: skip
    if attention and sum(a.size for a in c.attention.values()) > MAX_REQUEST_VALUES:
        raise CaptureRequestError(
            f"Attention of {len(c)} tokens x {len(c.layers)} layers is more than "
            f"{MAX_REQUEST_VALUES:,} numbers; ask for fewer layers or a shorter text.",
            "attention",
        )
    out: dict[str, Any] = {
        "object": "neuroscope.capture", "model": c.model, "layers": c.layers,
        "tokens": c.tokens, "token_ids": c.token_ids.tolist(), "prompt_tokens": c.prompt_tokens,
        "norms": _floats(c.norms), "cosine": _floats(c.cosine),
        "logit_lens": {
            "token_ids": c.lens_ids.tolist(), "tokens": c.lens_tokens,
            "logits": _floats(c.lens_logits),
        },
        "features": [r.to_dict() for r in c.features],
    }  # fmt: skip
    if residuals:
        out["residuals"] = {str(L): _floats(r) for L, r in c.residual.items()}
    if attention:
        out["attention"] = {str(L): _floats(a) for L, a in c.attention.items()}
    return out


def layer_norms(residuals: Sequence[np.ndarray]) -> np.ndarray:
    """float32 [L, T]: each token's residual L2 norm per layer (computed in float64)."""
    return np.stack([np.linalg.norm(r.astype(np.float64), axis=-1) for r in residuals]).astype(
        np.float32
    )


def layer_cosines(residuals: Sequence[np.ndarray]) -> np.ndarray:
    """float32 [L-1, T]: cosine between each token's residual at consecutive captured layers."""
    out = []
    for a, b in zip(residuals[:-1], residuals[1:], strict=True):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        denom = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
        out.append((a64 * b64).sum(-1) / np.where(denom == 0, 1.0, denom))
    width = residuals[0].shape[0] if residuals else 0
    return np.stack(out).astype(np.float32) if out else np.zeros((0, width), np.float32)


def capture(
    session: Session,
    text_or_messages: str | Sequence[Message],
    layers: str | Sequence[int] = "all",
    *,
    residual: bool = True,
    attention: bool = False,
    features: bool = True,
    generate: int = 0,
    lens_top: int = LENS_TOP,
    request_id: str | None = None,
) -> Capture:
    """See ``Session.capture``."""
    from neuroscope.backend import SamplingParams
    from neuroscope.generation import prompt_records
    from neuroscope.session import new_request_id

    info = session.backend.info
    if isinstance(layers, str):
        if layers != "all":
            raise ConfigError(f"layers must be 'all' or a list of layer numbers, not {layers!r}.")
        chosen = list(range(info.num_layers))
    else:
        chosen = sorted({int(L) for L in layers})
        if not chosen:
            raise ConfigError("layers lists no layer.")
        bad = [L for L in chosen if not 0 <= L < info.num_layers]
        if bad:
            raise ConfigError(
                f"Layer {bad[0]} does not exist: this model has layers 0..{info.num_layers - 1}."
            )
    if generate < 0:
        raise ConfigError(f"generate must be 0 or more, got {generate}.")
    if isinstance(text_or_messages, str):
        ids = session.tokenizer.encode_text(text_or_messages)
        source = text_or_messages
    else:
        ids = session.encode(text_or_messages)
        source = json.dumps(list(text_or_messages), ensure_ascii=False)
    session.check_length(ids[:-1], 1)
    request_id = request_id or new_request_id()
    records: list[TokenFeatures] = []
    if generate > 0:  # greedy, so that the capture is reproducible
        events = session.events(ids, request_id=request_id, max_tokens=generate, temperature=0.0)
        records = [e for e in events if isinstance(e, TokenFeatures)]
        first_layer = session.layers[0]
        generated = sorted(
            (r.position, r.token_id)
            for r in records
            if r.phase == "generation" and r.layer == first_layer
        )
        all_ids = [*ids, *(t for _, t in generated)]
    else:
        all_ids = list(ids)
        if features:
            step = session.backend.prefill(ids, SamplingParams(temperature=0.0))
            records = list(
                prompt_records(session.builder, session.tokenizer, request_id, ids, step, None,
                               session.report_bos)
            )  # fmt: skip
    forward = session.backend.capture(all_ids, chosen, attention=attention, lens_top=lens_top)
    stack = [forward.residuals[L] for L in chosen]
    decoder = session.tokenizer.decoder(skip_special_tokens=False)
    names: dict[int, str] = {}

    def name(token_id: int) -> str:
        if token_id not in names:
            names[token_id] = session.tokenizer.token_text(token_id)
        return names[token_id]

    lens_tokens = [
        [[name(int(t)) for t in row] for row in per_layer] for per_layer in forward.lens_ids
    ]
    return Capture(
        model=session.model_name, source=source,
        token_ids=np.asarray(all_ids, dtype=np.int64),
        tokens=[decoder.push(int(t)) for t in all_ids], prompt_tokens=len(ids), layers=chosen,
        norms=layer_norms(stack), cosine=layer_cosines(stack),
        lens_ids=forward.lens_ids, lens_logits=forward.lens_logits, lens_tokens=lens_tokens,
        residual=dict(forward.residuals) if residual else {},
        attention=dict(forward.attention), features=records if features else [],
    )  # fmt: skip


__all__ = [
    "Capture",
    "CaptureRequestError",
    "capture",
    "capture_json",
    "layer_cosines",
    "layer_norms",
]
