"""Pictures of a ``Capture`` (docs/fmri.md): the layer x token heatmap of residual norms, a feature
activity heatmap, the attention heads of one token, and a 2-D projection of one layer's token
residuals coloured by cluster.

matplotlib draws (the Agg backend: no display needed); the projection is UMAP (umap-learn) with
k-means clusters (scikit-learn), or PCA when asked or when umap-learn is not installed
(``pip install 'neuroscope-sae[fmri]'``). Token text is drawn as text, never interpreted.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from neuroscope.errors import ConfigError

if TYPE_CHECKING:
    from neuroscope.capture import Capture

Projection = Literal["umap", "pca"]
MAX_TICKS = 64  # token labels drawn on an axis; beyond that every n-th


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "Pictures need matplotlib: pip install 'neuroscope-sae[fmri]' (matplotlib, "
            "scikit-learn, umap-learn)."
        ) from None
    return plt


def _label(token: str, width: int = 14) -> str:
    # Newlines and tabs would break the axis; '$' would start matplotlib's math mode.
    return repr(token)[1:-1].replace("$", r"\$")[:width]


def _token_ticks(ax: Any, tokens: list[str], axis: str = "x") -> None:
    step = max(1, -(-len(tokens) // MAX_TICKS))
    where = list(range(0, len(tokens), step))
    labels = [_label(tokens[i]) for i in where]
    if axis == "x":
        ax.set_xticks(where, labels, rotation=90, fontsize=7)
    else:
        ax.set_yticks(where, labels, fontsize=7)


def _save(fig: Any, path: str | Path) -> Path:
    from neuroscope.cache import atomic_path

    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return target


def _model_name(capture: Capture) -> str:
    return Path(capture.model).name or capture.model  # a GGUF or folder path: its last part


def first_is_outlier(capture: Capture, ratio: float = 4.0) -> bool:
    """Is position 0's norm, at some layer, ``ratio`` times the median of the others? (The first
    token, BOS or not, is often an "attention sink" whose norm dwarfs the rest and would wash out
    the colour scale.)"""
    if len(capture) < 3:
        return False
    median = np.median(capture.norms[:, 1:], axis=1)
    return bool((capture.norms[:, 0] > ratio * np.maximum(median, 1e-12)).any())


def norm_heatmap(capture: Capture, path: str | Path) -> Path:
    """Layers (rows) x tokens (columns), coloured by the residual's L2 norm; position 0 is left
    out when it is an outlier (:func:`first_is_outlier`), and the title says so."""
    plt = _pyplot()
    first = 1 if first_is_outlier(capture) else 0
    norms = capture.norms[:, first:]
    tokens = capture.tokens[first:]
    fig, ax = plt.subplots(figsize=(min(18, 2 + 0.22 * len(tokens)), 1.5 + 0.25 * len(norms)))
    image = ax.imshow(norms, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(capture.layers)), [str(L) for L in capture.layers], fontsize=7)
    ax.set_ylabel("layer")
    _token_ticks(ax, tokens)
    note = " (position 0, an outlier, left out)" if first else ""
    ax.set_title(f"{_model_name(capture)}: residual norm per layer and token{note}")
    fig.colorbar(image, ax=ax, label="L2 norm")
    return _save(fig, path)


def feature_heatmap(capture: Capture, layer: int, path: str | Path, top: int = 24) -> Path:
    """The ``top`` features of ``layer`` with the largest total activation (rows) x tokens."""
    plt = _pyplot()
    records = [r for r in capture.features if r.layer == layer]
    if not records:
        raise ConfigError(f"The capture has no SAE records at layer {layer}.")
    grid = capture.feature_activity(layer)
    features = sorted({f.index for r in records for f in r.top_features})
    order = np.argsort(-grid.sum(0), kind="stable")[:top]
    labels = {f.index: f.label for r in records for f in r.top_features}
    fig, ax = plt.subplots(figsize=(min(18, 2 + 0.22 * len(capture)), 1.5 + 0.25 * len(order)))
    image = ax.imshow(grid[:, order].T, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(
        range(len(order)),
        [_label(f"{features[i]} {labels[features[i]]}", 36) for i in order],
        fontsize=7,
    )
    _token_ticks(ax, capture.tokens)
    ax.set_title(f"SAE features at layer {layer} (strongest {len(order)})")
    fig.colorbar(image, ax=ax, label="activation")
    return _save(fig, path)


def attention_heads(capture: Capture, layer: int, token: int, path: str | Path) -> Path:
    """For the token at position ``token``: each head (rows) over the tokens up to it (columns)."""
    plt = _pyplot()
    if layer not in capture.attention:
        raise ConfigError(
            f"No attention was captured at layer {layer}; capture with attention=True "
            f"(--attention). Captured: {sorted(capture.attention) or 'none'}."
        )
    if not 0 <= token < len(capture):
        raise ConfigError(f"Token {token} is outside the capture (0..{len(capture) - 1}).")
    weights = capture.attention[layer][:, token, : token + 1]  # [heads, keys]
    fig, ax = plt.subplots(
        figsize=(min(18, 2.5 + 0.25 * (token + 1)), 1.2 + 0.3 * weights.shape[0])
    )
    image = ax.imshow(weights, aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(weights.shape[0]), [f"head {h}" for h in range(weights.shape[0])])
    _token_ticks(ax, capture.tokens[: token + 1])
    ax.set_title(f"Layer {layer}: where {_label(capture.tokens[token])!r} (position {token}) looks")
    fig.colorbar(image, ax=ax, label="attention weight")
    return _save(fig, path)


def project(
    residual: np.ndarray, method: Projection = "umap", clusters: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, str]:
    """2-D coordinates [T, 2], k-means cluster ids [T] and the method actually used."""
    from sklearn.cluster import KMeans  # type: ignore[import-untyped]
    from sklearn.decomposition import PCA  # type: ignore[import-untyped]

    x = residual.astype(np.float32)
    used = method
    if method == "umap":
        try:
            import umap  # type: ignore[import-untyped, import-not-found]  # optional: [fmri]
        except ImportError:
            used = "pca"
    if used == "umap" and len(x) > 3:
        reducer = umap.UMAP(n_neighbors=min(15, len(x) - 1), random_state=seed)
        xy = reducer.fit_transform(x)
    else:
        used = "pca"
        xy = PCA(n_components=2, random_state=seed).fit_transform(x)
    k = max(1, min(clusters, len(x)))
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return np.asarray(xy, dtype=np.float32), labels, used


def projection(
    capture: Capture,
    layer: int,
    path: str | Path,
    method: Projection = "umap",
    clusters: int = 4,
) -> Path:
    """Each token's residual at ``layer`` as a point (position 0 left out when it is an outlier),
    coloured by its k-means cluster in the full space, labelled with the token."""
    plt = _pyplot()
    if layer not in capture.residual:
        raise ConfigError(f"No residual was kept at layer {layer}; capture with residual=True.")
    first = 1 if first_is_outlier(capture) else 0
    xy, labels, used = project(capture.residual[layer][first:], method, clusters)
    fig, ax = plt.subplots(figsize=(8, 6.5))
    ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=28)
    for (x, y), token in zip(xy, capture.tokens[first:], strict=True):
        ax.annotate(_label(token), (x, y), fontsize=6, alpha=0.8)
    ax.set_title(
        f"Layer {layer} token residuals: {used.upper()}, {labels.max() + 1} k-means clusters"
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


__all__ = ["attention_heads", "feature_heatmap", "norm_heatmap", "project", "projection"]
