"""Neuroscope: a local LLM runtime that streams, token by token, the SAE features a model activates.

The core never imports mlx or torch at module level; backends are plugins (``neuroscope.backends``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from neuroscope.records import Feature, GenerationComplete, TokenFeatures

__version__ = "0.1.0"
__all__ = ["Feature", "GenerationComplete", "Session", "TokenFeatures", "__version__"]

if TYPE_CHECKING:
    from neuroscope.session import Session


def __getattr__(name: str) -> Any:
    # Session pulls in transformers' tokenizer machinery: import it only when asked for.
    if name == "Session":
        from neuroscope.session import Session

        return Session
    raise AttributeError(f"module 'neuroscope' has no attribute {name!r}")
