"""Load an mlx-lm model from a local Hugging Face folder, using Neuroscope's exact model files.

mlx-lm's loader does the work (config, safetensors, the model's own weight sanitizing,
quantization); we only swap in our model class where mlx-lm's is not exact (``models.MODELS``),
cast to the asked dtype, and can build the architecture with random weights instead.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load_config, load_model

from neuroscope.errors import ConfigError, ModelLoadError
from neuroscope_mlx.models import MODELS

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_dtype() -> str:
    """bfloat16 on Metal (the weights' own precision), float32 on CPU (where it is exact and fast)."""
    return "bfloat16" if mx.metal.is_available() and mx.default_device() == mx.gpu else "float32"


def resolve_dtype(dtype: str | None) -> mx.Dtype:
    name = dtype or default_dtype()
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}.")
    return DTYPES[name]


def model_classes(config: dict) -> tuple[type[nn.Module], type[Any]]:
    """(Model, ModelArgs) for a config: ours where mlx-lm's is not exact, else mlx-lm's."""
    module = MODELS.get(config.get("model_type", ""))
    if module is not None:
        return module.Model, module.ModelArgs
    from mlx_lm.utils import _get_classes  # mlx-lm's own lookup (the default of load_model)

    return _get_classes(config)


def randomize(model: nn.Module, seed: int) -> None:
    """Deterministic random weights: N(0, 1/fan_in) for matrices, constructor defaults otherwise.

    Matrices are [out, in] (embeddings [vocab, d]), so 1/sqrt(last dim) keeps activations of unit
    scale through each layer; norm weights and biases keep their neutral defaults.
    """
    params: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    keys = mx.random.split(mx.random.key(seed), len(params))
    new = []
    for key, (name, value) in zip(keys, params, strict=True):
        if value.ndim >= 2 and mx.issubdtype(value.dtype, mx.floating):
            scale = value.shape[-1] ** -0.5
            value = mx.random.normal(value.shape, dtype=mx.float32, key=key) * scale
        new.append((name, value))
    model.update(tree_unflatten(new))


def load_folder(
    model_dir: str | Path, dtype: mx.Dtype, dummy_weights: bool = False, seed: int = 0
) -> tuple[nn.Module, dict]:
    """The model in ``model_dir`` (config.json + model*.safetensors), evaluated, in ``dtype``."""
    folder = Path(model_dir).expanduser()
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise ModelLoadError(
            f"Model folder {folder} {what}. Give a folder in the Hugging Face layout "
            "(config.json, model*.safetensors, tokenizer files)."
        )
    if not dummy_weights and not glob.glob(str(folder / "model*.safetensors")):
        raise ModelLoadError(
            f"{folder} has no model*.safetensors weights. Download the model (e.g. "
            "`hf download <repo> --local-dir <folder>`), or use dummy weights for testing."
        )
    # mlx-lm raises these for an unsupported model type, a bad config or mismatched weights.
    try:
        if dummy_weights:
            config = load_config(folder)
            model_class, args_class = model_classes(config)
            mx.random.seed(seed)  # makes constructor-initialised parameters (biases) reproducible
            # mlx-lm's Model classes take their ModelArgs; nn.Module's own __init__ takes none.
            model = model_class(args_class.from_dict(config))  # type: ignore[call-arg]
            randomize(model, seed)
        else:
            model, config = load_model(folder, get_model_classes=model_classes)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"Cannot load the model in {folder} with mlx-lm: {e}") from None
    model.set_dtype(dtype)
    model.eval()
    mx.eval(model.parameters())
    return model, config
