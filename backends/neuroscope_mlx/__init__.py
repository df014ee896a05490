"""The MLX backend: mlx-lm models on unified memory (Metal on Apple Silicon, mlx[cpu] on Linux)."""

from neuroscope_mlx.backend import MLXBackend

__all__ = ["MLXBackend"]
