"""Model files that replace mlx-lm's where mlx-lm is not exact (see ``MODELS``)."""

from __future__ import annotations

from types import ModuleType

from neuroscope_mlx.models import gemma2, gemma3

# model_type -> module with ModelArgs and Model, used instead of mlx_lm.models.<model_type>.
MODELS: dict[str, ModuleType] = {"gemma2": gemma2, "gemma3_text": gemma3}
