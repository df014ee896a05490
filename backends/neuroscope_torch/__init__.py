"""The torch backend: transformers models with Neuroscope's own generation loop (CUDA or CPU)."""

from neuroscope_torch.backend import TorchBackend

__all__ = ["TorchBackend"]
