"""Model files that replace mlx-lm's where mlx-lm is not exact (see ``MODELS``)."""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

from neuroscope_mlx.models import gemma2, gemma3

# model_type -> module (or namespace) with ModelArgs and Model, used instead of
# mlx_lm.models.<model_type>. "gemma3" is Gemma 3 4B and larger: image-text checkpoints whose
# language model is gemma3's.
MODELS: dict[str, ModuleType | SimpleNamespace] = {
    "gemma2": gemma2,
    "gemma3_text": gemma3,
    "gemma3": SimpleNamespace(Model=gemma3.MultimodalModel, ModelArgs=gemma3.MultimodalModelArgs),
}
