"""Why did a feature fire: the causal map between layers (weight space) and per-token attribution.

Two tools, both exact (docs/why.md):

* ``feature_map``: virtual weights ``W_dec[from] @ W_enc[to]`` between the SAE of an earlier layer
  and the SAE of a later one: how much writing one unit of feature i into the residual stream moves
  the pre-activation of feature j, before any token-dependent scale. Pure numpy, no forward pass;
  the strongest pairs overall are found in blocks so a 16k x 16k map never sits in memory.
* ``Attribution``: a feature's pre-activation at one position split into the scaled embedding, each
  block's attention output per source position, each block's MLP output and the biases. The backend
  runs the forward pass with norm scales frozen at their observed values (``Backend.attribute``);
  this module turns the SAE's encoder into the linear functional it applies (``linearize``).
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from neuroscope.errors import ConfigError
from neuroscope.sae import SAE

Direction = Literal["out", "in"]
Component = Literal["embed", "attn", "mlp", "bias"]
# Rows of the from-SAE's decoder multiplied at once when looking for the strongest pairs overall:
# 1024 x 16k float32 is 64 MiB.
PAIR_BLOCK_ROWS = 1024


# --- the causal map between layers -----------------------------------------------------------------


@dataclass(frozen=True)
class MapEntry:
    """One virtual weight: feature ``source`` of ``from_layer`` -> feature ``target`` of ``to_layer``."""

    from_layer: int
    source: int
    to_layer: int
    target: int
    weight: float
    source_label: str = ""
    target_label: str = ""

    @property
    def effect(self) -> str:
        return "excite" if self.weight > 0 else "inhibit" if self.weight < 0 else "none"


@dataclass(frozen=True)
class FeatureMap:
    """The strongest virtual weights, strongest first (by absolute value, the sign kept)."""

    from_layer: int
    to_layer: int
    direction: Direction | Literal["pairs"]
    feature: int | None
    entries: list[MapEntry]

    def to_json(self) -> str:
        rows = [asdict(e) | {"effect": e.effect} for e in self.entries]
        return json.dumps(
            {
                "from_layer": self.from_layer,
                "to_layer": self.to_layer,
                "direction": self.direction,
                "feature": self.feature,
                "entries": rows,
            },
            indent=2,
        )

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(
            ["from_layer", "source", "source_label", "to_layer", "target", "target_label"]
            + ["weight", "effect"]
        )
        for e in self.entries:
            writer.writerow(
                [e.from_layer, e.source, e.source_label, e.to_layer, e.target, e.target_label]
                + [f"{e.weight:.9g}", e.effect]
            )
        return out.getvalue()


def map_matrices(sae_from: SAE, sae_to: SAE) -> tuple[np.ndarray, np.ndarray]:
    """The decoder of ``sae_from`` [width_from, d] and the encoder of ``sae_to`` [d, width_to] as
    the virtual-weight product uses them.

    The encoder's input conventions that are linear in the residual are applied: ``layer_norm``
    centres its input, so the decoder rows are centred (x - mean(x) is linear in x). Token-dependent
    scales (``input_norm="rms"``, ``constant_norm_rescale``, ``layer_norm``'s division by the std)
    are left out: the map is per unit of residual before them. ``b_dec`` subtraction and ``b_enc``
    are constants that no upstream feature moves, so they are not part of the map.
    """
    if sae_from.W_dec is None:
        raise ConfigError(f"SAE {sae_from.id} has no decoder (W_dec): it cannot start a map.")
    if sae_to.site == "attn_z" or sae_from.W_dec.shape[-1] != sae_to.d_model:
        raise ConfigError(
            f"SAE {sae_from.id} writes vectors of size {sae_from.W_dec.shape[-1]} but SAE "
            f"{sae_to.id} reads {sae_to.d_model} ({sae_to.site}): the map needs two SAEs on the "
            "residual stream of the same model."
        )
    W_dec = sae_from.W_dec
    if sae_to.normalize == "layer_norm":
        W_dec = W_dec - W_dec.mean(axis=-1, keepdims=True)
    return W_dec, sae_to.W_enc


def _check_feature(sae: SAE, feature: int, what: str) -> None:
    if not 0 <= feature < sae.width:
        raise ConfigError(
            f"{what} {feature} is outside SAE {sae.id}, which has features 0..{sae.width - 1}."
        )


def _top(values: np.ndarray, top: int) -> np.ndarray:
    """Indices of the ``top`` largest |values|, strongest first (ties: lower index first)."""
    top = min(top, values.size)
    part = (
        np.argpartition(-np.abs(values), top - 1)[:top]
        if top < values.size
        else np.arange(values.size)
    )
    return part[np.lexsort((part, -np.abs(values[part])))]


def feature_map(
    sae_from: SAE,
    sae_to: SAE,
    from_layer: int,
    to_layer: int,
    feature: int | None = None,
    top: int = 20,
    direction: Direction = "out",
    labels: Callable[[int, int], str] | None = None,
    block_rows: int = PAIR_BLOCK_ROWS,
) -> FeatureMap:
    """The strongest virtual weights from ``from_layer``'s SAE to ``to_layer``'s.

    ``feature`` with ``direction="out"``: a ``from_layer`` feature and the ``to_layer`` features it
    drives; ``direction="in"``: a ``to_layer`` feature and the ``from_layer`` features that drive
    it; ``feature=None``: the strongest pairs overall, computed ``block_rows`` decoder rows at a time.
    """
    if from_layer >= to_layer:
        raise ConfigError(
            f"from_layer ({from_layer}) must be before to_layer ({to_layer}): features act on "
            "later layers only."
        )
    if top < 1:
        raise ConfigError(f"top must be at least 1, got {top}.")
    if direction not in ("out", "in"):
        raise ConfigError(f"direction must be 'out' or 'in', not {direction!r}.")
    W_dec, W_enc = map_matrices(sae_from, sae_to)
    name = labels or (lambda layer, index: f"feature_{index}")

    def entry(i: Any, j: Any, w: Any) -> MapEntry:
        return MapEntry(
            from_layer, int(i), to_layer, int(j), float(w), name(from_layer, int(i)),
            name(to_layer, int(j)),
        )  # fmt: skip

    if feature is not None:
        if direction == "out":
            _check_feature(sae_from, feature, f"Feature (of layer {from_layer})")
            row = W_dec[feature] @ W_enc
            entries = [entry(feature, j, row[j]) for j in _top(row, top)]
        else:
            _check_feature(sae_to, feature, f"Feature (of layer {to_layer})")
            col = W_dec @ W_enc[:, feature]
            entries = [entry(i, feature, col[i]) for i in _top(col, top)]
        return FeatureMap(from_layer, to_layer, direction, feature, entries)

    # Strongest pairs overall: keep the best ``top`` of each block, merge as we go.
    best_w = np.empty(0, dtype=np.float32)
    best_i = np.empty(0, dtype=np.int64)
    best_j = np.empty(0, dtype=np.int64)
    width_to = W_enc.shape[1]
    for start in range(0, W_dec.shape[0], block_rows):
        block = W_dec[start : start + block_rows] @ W_enc  # [rows, width_to]
        flat = block.ravel()
        pick = _top(flat, top)
        best_w = np.concatenate([best_w, flat[pick]])
        best_i = np.concatenate([best_i, start + pick // width_to])
        best_j = np.concatenate([best_j, pick % width_to])
        keep = _top(best_w, top)
        best_w, best_i, best_j = best_w[keep], best_i[keep], best_j[keep]
    entries = [
        entry(int(i), int(j), float(w)) for i, j, w in zip(best_i, best_j, best_w, strict=True)
    ]
    return FeatureMap(from_layer, to_layer, "pairs", None, entries)


# --- per-token attribution -------------------------------------------------------------------------


@dataclass(frozen=True)
class Linearized:
    """The SAE's encoder for one feature at one residual, with its scales frozen:
    ``pre = residual @ direction + constant`` exactly at that residual."""

    direction: np.ndarray  # float64 [d]
    constant: float  # b_enc[f] minus b_dec's share when the SAE subtracts it


def linearize(sae: SAE, feature: int, residual: np.ndarray) -> Linearized:
    """Freeze the SAE's input scales at ``residual`` (as ``neuroscope_torch.sae.TorchSAE.encode``
    computes them): RMS normalisation, constant-norm rescaling and layer norm are linear maps once
    their scale is a number."""
    _check_feature(sae, feature, "Feature")
    if sae.site != "resid_post":
        raise ConfigError(
            f"Attribution reads SAEs on the residual stream (resid_post); SAE {sae.id} reads "
            f"{sae.site}."
        )
    x = residual.astype(np.float64)
    w = sae.W_enc[:, feature].astype(np.float64)
    constant = float(sae.b_enc[feature])
    if sae.apply_b_dec_to_input:  # b_dec is subtracted after the normalisation: a constant
        constant -= float(sae.b_dec.astype(np.float64) @ w)
    scale = 1.0
    if sae.input_norm == "rms":
        scale /= float(np.sqrt(np.mean(x * x)))
        x = x * scale
    if sae.normalize == "constant_norm_rescale":
        s = float(np.sqrt(x.size) / np.linalg.norm(x))
        x, scale = x * s, scale * s
    elif sae.normalize == "layer_norm":
        # (x - mean(x)) . w == x . (w - mean(w)); the std (unbiased, eps added) is frozen.
        centred = x - x.mean()
        s = 1.0 / (float(np.std(centred, ddof=1)) + 1e-5)
        w = w - w.mean()
        scale *= s
    return Linearized(direction=w * scale, constant=constant)


@dataclass(frozen=True)
class ResidualSplit:
    """What a backend's ``attribute`` returns: ``residual`` (block ``layer``'s output at the
    position) split along a direction into the embedding, each block's attention output by source
    position, each block's MLP output, and the model's own biases (o_proj's and the like, through
    the frozen post-norms)."""

    residual: np.ndarray  # float32 [d]
    embed: float
    attn: np.ndarray  # float64 [layer + 1, T]
    mlp: np.ndarray  # float64 [layer + 1]
    bias: float = 0.0


@dataclass(frozen=True)
class Term:
    """One part of a pre-activation. ``layer``/``source_position`` are None where they do not
    apply (embed has no layer; only attn has a source)."""

    component: Component
    layer: int | None
    source_position: int | None
    value: float
    source_token: str = ""


@dataclass(frozen=True)
class Attribution:
    """Why feature ``feature`` of ``layer`` fired at ``position``: ``terms`` sum to ``total``."""

    layer: int
    feature: int
    position: int
    token: str
    total: float  # the pre-activation x . W_enc[:, f] + b_enc[f] (with the SAE's conventions)
    activation: float  # the feature's activation after its nonlinearity (0 when it did not fire)
    terms: list[Term] = field(default_factory=list)
    label: str = ""
    tokens: list[str] = field(default_factory=list)

    @property
    def residual_error(self) -> float:
        """|sum(terms) - total|: how exact the split is."""
        return abs(sum(t.value for t in self.terms) - self.total)

    def by_component(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for t in self.terms:
            out[t.component] += t.value
        return dict(out)

    def by_layer(self) -> dict[int | None, float]:
        """Per block (attention + MLP); ``None`` holds the embedding and the biases."""
        out: dict[int | None, float] = defaultdict(float)
        for t in self.terms:
            out[t.layer if t.component in ("attn", "mlp") else None] += t.value
        return dict(out)

    def by_source(self) -> dict[int, float]:
        """Per earlier token: what attention moved from it (summed over blocks), plus the
        position's own embedding at the position itself."""
        out: dict[int, float] = defaultdict(float)
        for t in self.terms:
            if t.component == "attn" and t.source_position is not None:
                out[t.source_position] += t.value
            elif t.component == "embed":
                out[self.position] += t.value
        return dict(out)

    def top_terms(self, n: int = 10) -> list[Term]:
        return sorted(self.terms, key=lambda t: -abs(t.value))[:n]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"residual_error": self.residual_error}


def activation_of(sae: SAE, pre: float, feature: int) -> float:
    """The feature's activation from its pre-activation (top-k and gated need the whole vector:
    reported as relu(pre), which they equal when the feature fires)."""
    if sae.architecture == "jumprelu" and sae.threshold is not None:
        return pre if pre > float(sae.threshold[feature]) and pre > 0 else 0.0
    return max(pre, 0.0)


def build_attribution(
    sae: SAE,
    layer: int,
    feature: int,
    position: int,
    split: ResidualSplit,
    lin: Linearized,
    tokens: Sequence[str],
    label: str = "",
) -> Attribution:
    """Terms from a backend's split and the frozen encoder (the SAE's bias folded into "bias")."""
    terms = [Term("embed", None, position, split.embed, tokens[position])]
    for block in range(split.attn.shape[0]):
        for source in range(position + 1):
            terms.append(
                Term("attn", block, source, float(split.attn[block, source]), tokens[source])
            )
        terms.append(Term("mlp", block, None, float(split.mlp[block])))
    terms.append(Term("bias", None, None, split.bias + lin.constant))
    total = float(split.residual.astype(np.float64) @ lin.direction) + lin.constant
    return Attribution(
        layer=layer, feature=feature, position=position, token=tokens[position], total=total,
        activation=activation_of(sae, total, feature), terms=terms, label=label,
        tokens=list(tokens),
    )  # fmt: skip


# --- patching ----------------------------------------------------------------------------------------


def encode_numpy(sae: SAE, x: np.ndarray) -> np.ndarray:
    """Feature activations [T, width] of residuals [T, d] in float64, as the backends encode
    (``neuroscope_torch.sae.TorchSAE.encode``); used to patch features between two runs."""
    x = x.astype(np.float64)
    if sae.input_norm == "rms":
        x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True))
    if sae.normalize == "constant_norm_rescale":
        x = x * (np.sqrt(x.shape[-1]) / np.linalg.norm(x, axis=-1, keepdims=True))
    elif sae.normalize == "layer_norm":
        x = x - x.mean(-1, keepdims=True)
        x = x / (x.std(-1, ddof=1, keepdims=True) + 1e-5)
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec
    if sae.architecture == "gated":
        proj = x @ sae.W_enc
        gate = (proj + sae.b_enc) > 0
        return gate * np.maximum(proj * sae.mag_scale + sae.b_mag, 0.0)
    pre = x @ sae.W_enc + sae.b_enc
    acts = np.maximum(pre, 0.0)
    if sae.architecture == "jumprelu" and sae.threshold is not None:
        return acts * (pre > sae.threshold)
    if sae.architecture == "topk" and sae.k:
        keep = np.argpartition(-acts, sae.k - 1, axis=-1)[:, : sae.k]
        out = np.zeros_like(acts)
        np.put_along_axis(out, keep, np.take_along_axis(acts, keep, -1), -1)
        return out
    return acts


@dataclass(frozen=True)
class Metric:
    """What a patch is measured by, at the last position: the ``logit`` or ``prob`` of ``token``,
    or with ``minus`` the logit difference ``token - minus``."""

    token: int
    kind: Literal["logit", "prob"] = "logit"
    minus: int | None = None

    def __call__(self, logits: np.ndarray) -> float:
        last = logits[-1].astype(np.float64)
        if self.minus is not None:
            return float(last[self.token] - last[self.minus])
        if self.kind == "prob":
            e = np.exp(last - last.max())
            return float(e[self.token] / e.sum())
        return float(last[self.token])


@dataclass(frozen=True)
class PatchResult:
    """The metric on the clean run, the corrupted run, and the corrupted run patched with the
    clean run's residual (or features) at ``layer``; ``recovered``: the share of the clean-corrupted
    gap the patch closes (None when there is no gap)."""

    clean: float
    corrupted: float
    patched: float
    layer: int
    positions: list[int]
    features: list[int] | None
    patched_logits: np.ndarray = field(repr=False)

    @property
    def effect(self) -> float:
        return self.patched - self.corrupted

    @property
    def recovered(self) -> float | None:
        gap = self.clean - self.corrupted
        return None if gap == 0 else self.effect / gap


def session_patch(
    session: Any,
    clean: str,
    corrupted: str,
    layer: int,
    metric: Metric,
    features: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> PatchResult:
    """``Session.patch``: run both texts, replace block ``layer``'s output in the corrupted run
    with the clean run's (``features=None``) or only the chosen features' share of it (the
    corrupted run keeps its SAE error and other features: residual + sum_f (a_clean - a_corr)
    W_dec[f]) at ``positions`` (default: all), and measure ``metric`` at the last position."""
    clean_ids = session.tokenizer.encode_text(clean)
    corrupt_ids = session.tokenizer.encode_text(corrupted)
    if len(clean_ids) != len(corrupt_ids):
        raise ConfigError(
            f"The clean text is {len(clean_ids)} tokens and the corrupted one {len(corrupt_ids)}: "
            "patching aligns positions, so both must have the same number of tokens."
        )
    T = len(clean_ids)
    chosen = list(range(T)) if positions is None else [int(p) for p in positions]
    bad = [p for p in chosen if not 0 <= p < T]
    if bad:
        raise ConfigError(f"position {bad[0]} is outside the texts (0 to {T - 1}).")
    for token in (metric.token, metric.minus):
        if token is not None and not 0 <= token < session.backend.info.vocab_size:
            raise ConfigError(f"metric token {token} is outside the vocabulary.")
    clean_res, clean_logits = session.backend.forward_reference(clean_ids, [layer])
    corr_res, corr_logits = session.backend.forward_reference(corrupt_ids, [layer])
    replacement = corr_res[layer].astype(np.float64).copy()
    if features is None:
        replacement[chosen] = clean_res[layer][chosen]
    else:
        if layer not in session.saes:
            raise ConfigError(f"layer {layer} has no SAE in this session: no features to patch.")
        sae: SAE = session.saes[layer]
        if sae.W_dec is None or sae.site != "resid_post":
            raise ConfigError(
                f"The SAE at layer {layer} cannot write features back to the residual."
            )
        idx = [int(f) for f in features]
        for f in idx:
            _check_feature(sae, f, "feature")
        delta = (
            encode_numpy(sae, clean_res[layer])[:, idx] - encode_numpy(sae, corr_res[layer])[:, idx]
        )
        replacement[chosen] += delta[chosen] @ sae.W_dec[idx].astype(np.float64)
    patched = session.backend.forward_patched(
        corrupt_ids, layer, replacement.astype(np.float32), chosen
    )
    return PatchResult(
        clean=metric(clean_logits), corrupted=metric(corr_logits), patched=metric(patched),
        layer=layer, positions=chosen, features=None if features is None else list(features),
        patched_logits=patched,
    )  # fmt: skip


@dataclass(frozen=True)
class AblationEffect:
    """Feature ``feature`` of ``layer`` removed at ``position`` (its ``activation`` times its
    decoder row subtracted from the residual, the steering issue's ablation): how the next-token
    distribution at that position moved."""

    feature: int
    activation: float
    label: str
    kl: float  # KL(before || after), nats
    top_token: int  # the most likely next token before
    top_prob_before: float
    top_prob_after: float
    new_top_token: int  # the most likely next token after


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    e = np.exp(z)
    return e / e.sum()


def session_ablation_effects(
    session: Any, text: str | Sequence[int], layer: int, position: int, top: int = 5
) -> list[AblationEffect]:
    """``Session.ablation_effects``: for the ``top`` strongest SAE features at ``position``, the
    next-token distribution there with each ablated in turn (one forward pass per feature).
    ``text`` may be token ids already (a remembered request's)."""
    if layer not in session.saes:
        raise ConfigError(f"layer {layer} has no SAE in this session (hooked: {session.layers}).")
    sae: SAE = session.saes[layer]
    if sae.W_dec is None or sae.site != "resid_post":
        raise ConfigError(f"The SAE at layer {layer} cannot write features back to the residual.")
    ids = session.tokenizer.encode_text(text) if isinstance(text, str) else list(text)
    if not 0 <= position < len(ids):
        raise ConfigError(
            f"position {position} is outside the text, which has {len(ids)} tokens "
            f"(0 to {len(ids) - 1})."
        )
    residuals, logits = session.backend.forward_reference(ids, [layer])
    residual = residuals[layer]
    acts = encode_numpy(sae, residual[position : position + 1])[0]
    before = _softmax(logits[position])
    top_token = int(np.argmax(before))
    out = []
    for f in [int(i) for i in np.argsort(-acts)[:top] if acts[i] > 0]:
        edited = residual.astype(np.float64).copy()
        edited[position] -= acts[f] * sae.W_dec[f].astype(np.float64)
        after_logits = session.backend.forward_patched(
            ids, layer, edited.astype(np.float32), [position]
        )
        after = _softmax(after_logits[position])
        kl = float(np.sum(before * (np.log(before + 1e-30) - np.log(after + 1e-30))))
        out.append(
            AblationEffect(
                feature=f,
                activation=float(acts[f]),
                label=session.builder.labels(layer, f),
                kl=kl,
                top_token=top_token,
                top_prob_before=float(before[top_token]),
                top_prob_after=float(after[top_token]),
                new_top_token=int(np.argmax(after)),
            )  # fmt: skip
        )
    return out


# --- upstream features (gradient x activation) ------------------------------------------------------


@dataclass(frozen=True)
class UpstreamFeature:
    """Feature ``feature`` of the earlier layer ``layer`` at ``position``: its ``activation`` times
    the gradient of the later feature's pre-activation along its decoder direction (``value``)."""

    layer: int
    feature: int
    position: int
    activation: float
    value: float
    label: str = ""
    token: str = ""


def session_upstream(
    session: Any,
    text: str,
    layer: int,
    feature: int,
    position: int,
    from_layer: int,
    top: int = 20,
) -> list[UpstreamFeature]:
    """``Session.upstream``: the ``from_layer`` SAE features (any position up to ``position``)
    that most raised or lowered feature ``feature`` of ``layer`` at ``position``, by gradient x
    activation: ``a_i(t) * (W_dec[i] . d pre / d x_from(t))``. One backward pass; the later SAE's
    input scales are frozen at the observed residual (as in ``attribute``), the model's own norms
    are differentiated. A first-order estimate, not an exact split (the SAE error and b_dec of
    ``from_layer`` take the rest)."""
    for which, L in (("layer", layer), ("from_layer", from_layer)):
        if L not in session.saes:
            raise ConfigError(f"{which} {L} has no SAE in this session (hooked: {session.layers}).")
    if from_layer >= layer:
        raise ConfigError(f"from_layer ({from_layer}) must be before layer ({layer}).")
    sae, up = session.saes[layer], session.saes[from_layer]
    _check_feature(sae, feature, "feature")
    if up.W_dec is None or up.site != "resid_post":
        raise ConfigError(f"The SAE at layer {from_layer} has no residual-stream decoder.")
    ids = session.tokenizer.encode_text(text)
    if not 0 <= position < len(ids):
        raise ConfigError(
            f"position {position} is outside the text, which has {len(ids)} tokens "
            f"(0 to {len(ids) - 1})."
        )

    def direction_at(residual: np.ndarray) -> np.ndarray:
        return linearize(sae, feature, residual).direction

    x_from, grad = session.backend.upstream_gradient(ids, from_layer, layer, position, direction_at)
    acts = encode_numpy(up, x_from[: position + 1])  # [P, width]
    along = grad[: position + 1].astype(np.float64) @ up.W_dec.astype(np.float64).T  # [P, width]
    scores = acts * along
    best = _top(scores.ravel(), top)
    width = up.width
    return [
        UpstreamFeature(
            layer=from_layer,
            feature=int(i % width),
            position=int(i // width),
            activation=float(acts.ravel()[i]),
            value=float(scores.ravel()[i]),
            label=session.builder.labels(from_layer, int(i % width)),
            token=session.tokenizer.token_text(ids[int(i // width)]),
        )  # fmt: skip
        for i in best
        if scores.ravel()[i] != 0
    ]


# --- the session's side -----------------------------------------------------------------------------


def session_feature_map(
    session: Any,
    from_layer: int,
    to_layer: int,
    feature: int | None = None,
    top: int = 20,
    direction: Direction = "out",
) -> FeatureMap:
    """``Session.feature_map``: both layers must have an SAE; labels are the session's."""
    for which, layer in (("from_layer", from_layer), ("to_layer", to_layer)):
        if layer not in session.saes:
            raise ConfigError(
                f"{which} {layer} has no SAE in this session (hooked layers: {session.layers})."
            )
    return feature_map(
        session.saes[from_layer], session.saes[to_layer], from_layer, to_layer, feature=feature,
        top=top, direction=direction, labels=session.builder.labels,
    )  # fmt: skip


def session_attribute(
    session: Any, token_ids: Sequence[int], layer: int, feature: int, position: int
) -> Attribution:
    """``Session.attribute`` on token ids: checks, then the backend's exact split."""
    if layer not in session.saes:
        raise ConfigError(f"layer {layer} has no SAE in this session (hooked: {session.layers}).")
    sae: SAE = session.saes[layer]
    _check_feature(sae, feature, "feature")
    if sae.site != "resid_post":
        raise ConfigError(
            f"Attribution reads SAEs on the residual stream (resid_post); the SAE at layer {layer} "
            f"reads {sae.site}."
        )
    if not 0 <= position < len(token_ids):
        raise ConfigError(
            f"position {position} is outside the text, which has {len(token_ids)} tokens "
            f"(positions 0..{len(token_ids) - 1}, BOS at 0)."
        )
    lins: list[Linearized] = []

    def direction_at(residual: np.ndarray) -> np.ndarray:
        lins.append(linearize(sae, feature, residual))
        return lins[-1].direction

    split = session.backend.attribute(list(token_ids), layer, position, direction_at)
    tokens = [session.tokenizer.token_text(t) for t in token_ids]
    return build_attribution(
        sae,
        layer,
        feature,
        position,
        split,
        lins[-1],
        tokens,
        session.builder.labels(layer, feature),
    )


# --- the features API (POST /v1/features/attribute) ------------------------------------------------

MAX_REQUEST_CHARS = 20_000
MAX_REQUEST_TOKENS = 1_024


class AttributionRequestError(ConfigError):
    """A bad attribution request; ``param`` names the field (a 400 on the API)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _whole(body: dict[str, Any], name: str, default: Any = ...) -> int:
    value = body.get(name, default)
    if value is ...:
        raise AttributionRequestError(f"{name} is required (a whole number).", name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise AttributionRequestError(f"{name} must be a whole number, got {value!r}.", name)
    return value


def _json_object(raw: bytes, max_bytes: int, param: str) -> dict[str, Any]:
    """A request body that must be a JSON object of at most ``max_bytes``; errors name ``param``."""
    if len(raw) > max_bytes:
        raise AttributionRequestError(f"The body is {len(raw)} bytes; far too large.", param)
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise AttributionRequestError(f"The body is not JSON: {e}.", param) from None
    if not isinstance(body, dict):
        raise AttributionRequestError("The body must be a JSON object.", param)
    return body


def parse_attribute_request(raw: bytes) -> dict[str, Any]:
    """The fields of ``POST /v1/features/attribute``, type-checked: ``text`` (raw text, as
    ``trace`` takes it) or ``request_id`` (one of the server's last requests), ``layer``,
    ``feature``, ``position`` (default: the last token), ``top`` (terms listed, default 20)."""
    body = _json_object(raw, 8 * MAX_REQUEST_CHARS + 4096, "text")
    request_id = body.get("request_id")
    if request_id is not None and "text" in body:
        raise AttributionRequestError("Give text or request_id, not both.", "request_id")
    if request_id is not None:
        if not isinstance(request_id, str) or not request_id or len(request_id) > 200:
            raise AttributionRequestError(
                "request_id must be the id of one of this server's requests (a string).",
                "request_id",
            )
        return {
            "text": None,
            "request_id": request_id,
            "layer": _whole(body, "layer"),
            "feature": _whole(body, "feature"),
            "position": _whole(body, "position"),
            "top": _top_field(body),
        }
    text = body.get("text")
    if not isinstance(text, str) or not text:
        raise AttributionRequestError("text must be a non-empty string.", "text")
    if len(text) > MAX_REQUEST_CHARS:
        raise AttributionRequestError(
            f"The text is {len(text)} characters; an attribution takes at most "
            f"{MAX_REQUEST_CHARS}.",
            "text",
        )
    args: dict[str, Any] = {
        "text": text,
        "layer": _whole(body, "layer"),
        "feature": _whole(body, "feature"),
        "position": _whole(body, "position", None) if body.get("position") is not None else None,
        "top": _top_field(body),
    }
    return args


def _top_field(body: dict[str, Any]) -> int:
    top = _whole(body, "top", 20)
    if top < 1:
        raise AttributionRequestError("top must be at least 1.", "top")
    return top


def attribution_json(
    session: Any,
    text: str | None,
    layer: int,
    feature: int,
    position: int | None,
    top: int = 20,
    request_id: str | None = None,
) -> dict[str, Any]:
    """The answer of ``POST /v1/features/attribute``: the total, the activation, the groups by
    component, block and source token, and the ``top`` largest terms. ``request_id`` instead of
    ``text``: the tokens of one of the session's last requests (``session.requests``). Bad input
    raises ``AttributionRequestError`` naming the field."""
    if layer not in session.saes:
        raise AttributionRequestError(
            f"layer {layer} has no SAE on this server (hooked layers: {session.layers}).", "layer"
        )
    width = session.saes[layer].width
    if not 0 <= feature < width:
        raise AttributionRequestError(
            f"feature must be a feature of the SAE at layer {layer} (0 to {width - 1}), got "
            f"{feature}.",
            "feature",
        )
    if request_id is not None:
        try:
            ids = session.requests.ids(request_id, position)
        except ConfigError as e:
            raise AttributionRequestError(
                str(e), "position" if request_id in session.requests else "request_id"
            ) from None
    else:
        ids = session.tokenizer.encode_text(text or "")
    if len(ids) > MAX_REQUEST_TOKENS:
        raise AttributionRequestError(
            f"The text is {len(ids)} tokens; an attribution takes at most {MAX_REQUEST_TOKENS}.",
            "text",
        )
    if position is None:
        position = len(ids) - 1
    if not 0 <= position < len(ids):
        raise AttributionRequestError(
            f"position {position} is outside the text, which has {len(ids)} tokens (0 to "
            f"{len(ids) - 1}).",
            "position",
        )
    try:
        att = session_attribute(session, ids, layer, feature, position)
    except ConfigError as e:  # e.g. an SAE on another site than the residual stream
        raise AttributionRequestError(str(e), "layer") from None
    return {
        "layer": att.layer,
        "feature": att.feature,
        "label": att.label,
        "position": att.position,
        "token": att.token,
        "tokens": att.tokens,
        "total": att.total,
        "activation": att.activation,
        "residual_error": att.residual_error,
        "by_component": att.by_component(),
        "by_layer": [{"layer": layer_, "value": v} for layer_, v in att.by_layer().items()],
        "by_source": [
            {"position": pos, "token": att.tokens[pos], "value": v}
            for pos, v in sorted(att.by_source().items())
        ],
        "terms": [asdict(t) for t in att.top_terms(top)],
        "term_count": len(att.terms),
    }


MAX_ABLATION_TOP = 10  # one forward pass per feature


def parse_ablation_request(raw: bytes) -> dict[str, Any]:
    """The fields of ``POST /v1/features/ablation``: ``request_id`` (one of the server's last
    requests), ``layer``, ``position``, ``top`` (features, default 5, at most 10)."""
    body = _json_object(raw, 4096, "request_id")
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > 200:
        raise AttributionRequestError(
            "request_id must be the id of one of this server's requests (a string).", "request_id"
        )
    top = _whole(body, "top", 5)
    if not 1 <= top <= MAX_ABLATION_TOP:
        raise AttributionRequestError(f"top must be 1 to {MAX_ABLATION_TOP}.", "top")
    return {
        "request_id": request_id,
        "layer": _whole(body, "layer"),
        "position": _whole(body, "position"),
        "top": top,
    }


def ablation_json(
    session: Any, request_id: str, layer: int, position: int, top: int = 5
) -> dict[str, Any]:
    """The answer of ``POST /v1/features/ablation``: per strong feature at the position, how the
    next-token distribution moves when it is ablated (``session_ablation_effects``)."""
    if layer not in session.saes:
        raise AttributionRequestError(
            f"layer {layer} has no SAE on this server (hooked layers: {session.layers}).", "layer"
        )
    try:
        ids = session.requests.ids(request_id, position)
    except ConfigError as e:
        raise AttributionRequestError(
            str(e), "position" if request_id in session.requests else "request_id"
        ) from None
    if len(ids) > MAX_REQUEST_TOKENS:
        raise AttributionRequestError(
            f"The request is {len(ids)} tokens; an ablation takes at most {MAX_REQUEST_TOKENS}.",
            "request_id",
        )
    try:
        effects = session_ablation_effects(session, ids, layer, position, top)
    except ConfigError as e:  # an SAE that cannot write back to the residual
        raise AttributionRequestError(str(e), "layer") from None
    text = session.tokenizer.token_text
    return {
        "request_id": request_id,
        "layer": layer,
        "position": position,
        "token": text(ids[position]),
        "effects": [
            {
                **asdict(e),
                "top_token_text": text(e.top_token),
                "new_top_token_text": text(e.new_top_token),
            }
            for e in effects
        ],
    }


__all__ = [
    "AblationEffect",
    "Attribution",
    "AttributionRequestError",
    "FeatureMap",
    "Linearized",
    "MapEntry",
    "Metric",
    "PatchResult",
    "ResidualSplit",
    "Term",
    "UpstreamFeature",
    "build_attribution",
    "feature_map",
    "linearize",
    "map_matrices",
]
