"""From what the user typed (a repo id, a folder, a .gguf file, a preset) to a local model folder.

Every backend loads the Hugging Face layout from a local folder; this module is the one place that
downloads (huggingface_hub: HF cache, HF_TOKEN and HF_HUB_OFFLINE respected), converts GGUF files and
lays out configs for dummy weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from neuroscope.cache import cache_dir, slug, write_json_atomic
from neuroscope.errors import ConfigError, ModelLoadError, SAEError

DEFAULT_MODEL = "google/gemma-2-2b-it"
LoadFormat = Literal["auto", "dummy"]
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]

# Architecture presets for dummy weights: real shapes, no download. Values are the published configs.
PRESETS: dict[str, dict] = {
    "gemma-2-2b": {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "attention_bias": False,
        "attention_dropout": 0.0,
    },
}
PRESETS["gemma-2-2b-it"] = PRESETS["gemma-2-2b"]
PRESETS["google/gemma-2-2b"] = PRESETS["gemma-2-2b"]
PRESETS["google/gemma-2-2b-it"] = PRESETS["gemma-2-2b"]


def _gemma3(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, window: int,
            max_pos: int, rope_scaling: dict | None = None) -> dict:  # fmt: skip
    """A Gemma 3 text config as the Hub publishes it (a global layer every sixth)."""
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": window,
        "sliding_window_pattern": 6,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                        for i in range(layers)],
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "rope_scaling": rope_scaling,
        "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 2,
        "eos_token_id": [1, 106], "pad_token_id": 0, "attention_bias": False,
        "attention_dropout": 0.0,
    }  # fmt: skip


PRESETS["gemma-3-270m"] = _gemma3(640, 2048, 18, 4, 1, 262144, 512, 32768)
PRESETS["gemma-3-1b"] = _gemma3(1152, 6912, 26, 4, 1, 262144, 512, 32768)
# Gemma 3 4B's language model (the published checkpoint adds a vision tower, not built here).
PRESETS["gemma-3-4b"] = _gemma3(
    2560, 10240, 34, 8, 4, 262208, 1024, 131072, {"rope_type": "linear", "factor": 8.0}
)
PRESETS["llama-3.1-8b"] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
}  # fmt: skip
for _name in ("gemma-3-270m", "gemma-3-1b", "gemma-3-4b"):  # the Hub's names, base and -it
    for _alias in (f"{_name}-it", f"google/{_name}", f"google/{_name}-it", f"google/{_name}-pt"):
        PRESETS[_alias] = PRESETS[_name]
for _alias in ("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct"):  # fmt: skip
    PRESETS[_alias] = PRESETS["llama-3.1-8b"]


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user asked for, as served in /v1/models
    path: Path  # a local folder in the Hugging Face layout
    dummy_weights: bool = False


def resolve_model(
    model: str, load_format: LoadFormat = "auto", gguf_dtype: str | None = None
) -> ResolvedModel:
    """Find or make a local Hugging Face-layout folder for ``model``.

    ``gguf_dtype`` is how a ``.gguf`` is stored once converted (see ``neuroscope.gguf``); default
    ``$NEUROSCOPE_GGUF_DTYPE`` or ``auto`` (bfloat16 for quantized files).
    """
    if load_format not in ("auto", "dummy"):
        raise ConfigError(f"--load-format must be 'auto' or 'dummy', not {load_format!r}.")
    if load_format == "dummy":
        return ResolvedModel(model, _dummy_folder(model), dummy_weights=True)
    local = Path(model).expanduser()
    if local.suffix == ".gguf" and not local.is_file():
        raise ModelLoadError(f"GGUF file {local} does not exist.")
    if local.is_file():
        from neuroscope.gguf import DTYPE_ENV, convert_gguf, is_gguf_file

        # The magic decides, not the suffix: Ollama keeps GGUFs as suffix-less blobs.
        if local.suffix == ".gguf" or is_gguf_file(local):
            dtype = gguf_dtype or os.environ.get(DTYPE_ENV) or "auto"
            return ResolvedModel(model, convert_gguf(local, dtype=dtype))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"{local} has no config.json: give a folder in the Hugging Face layout, a .gguf file, "
                "or a Hub repo id such as google/gemma-2-2b-it."
            )
        return ResolvedModel(model, local)
    if local.exists() or model.startswith((".", "/", "~")):
        raise ModelLoadError(f"{model} is neither a model folder nor a .gguf file.")
    return ResolvedModel(model, _download(model))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILE_PATTERNS))
    except GatedRepoError:
        raise ModelLoadError(
            f"{repo_id} is gated: accept its licence on huggingface.co and set HF_TOKEN."
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"No model {repo_id} on the Hugging Face Hub (private ones need HF_TOKEN)."
        ) from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{repo_id} is not in the Hugging Face cache and the Hub cannot be reached. Connect once "
            "(or `neuroscope models pull`), or pass a local folder or .gguf file."
        ) from None
    except HFValidationError:
        raise ModelLoadError(
            f"{repo_id!r} is not a model folder, a .gguf file or a Hub repo id (owner/name)."
        ) from None


def _dummy_folder(model: str) -> Path:
    """A folder with ``config.json`` and a small tokenizer for random weights at real shapes."""
    local = Path(model).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        config_path = local / "config.json"
    elif local.is_file() and local.suffix == ".json":
        config_path = local
    elif model in PRESETS:
        config_path = None
    else:
        raise ConfigError(
            f"Dummy weights need a preset ({', '.join(sorted(PRESETS))}), a config.json or a folder "
            f"holding one; got {model!r}."
        )
    config = json.loads(config_path.read_text()) if config_path else dict(PRESETS[model])
    folder = cache_dir("models") / "dummy" / slug(model)
    if config_path and (config_path.parent / "tokenizer.json").is_file():
        tokenizer_source = config_path.parent
    else:
        tokenizer_source = None
    if not (folder / "tokenizer.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        if tokenizer_source is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)
        else:
            from neuroscope.synthetic import build_tokenizer

            build_tokenizer(folder)
    write_json_atomic(folder / "config.json", config)
    return folder


# ---- does the SAE fit the model? (checked before any weights load) ------------------------------

# Gemma Scope's residual SAEs by base model: their input width, known without a download.
_GEMMA_SCOPE_D_IN = {"2b": 2304, "9b": 3584, "27b": 4608}
_SAE_OPTIONS = (
    "Pass an SAE trained on this model: --sae REPO --sae-path PATH (a Hub repo; '{layer}' in the "
    "path is filled in) or --sae-local-path PATH (a params.npz or a SAELens folder); in Python, "
    "Session(sae=, sae_path=, sae_local_path=)."
)


def model_hidden_size(folder: Path) -> int | None:
    """``hidden_size`` from a model folder's config.json (a multimodal one nests it), or None."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        if isinstance(section.get("hidden_size"), int):
            return int(section["hidden_size"])
    return None


def _npz_d_in(path: Path) -> int | None:
    """W_enc's first dimension, read from the .npz member's header without loading the array."""
    import zipfile

    from numpy.lib import format as npy

    try:
        with zipfile.ZipFile(path) as archive:
            member = next(n for n in archive.namelist() if n in ("W_enc.npy", "w_enc.npy"))
            with archive.open(member) as f:
                version = npy.read_magic(f)
                read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                shape = read(f)[0]
    except (OSError, ValueError, StopIteration, zipfile.BadZipFile):
        return None  # the SAE loader gives the precise error
    return int(shape[0]) if len(shape) == 2 else None


def _safetensors_d_in(path: Path) -> int | None:
    """W_enc's first dimension from a safetensors header (Gemma Scope 2's params.safetensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            name = next((n for n in f.keys() if n in ("W_enc", "w_enc")), None)  # noqa: SIM118
            shape = f.get_slice(name).get_shape() if name else []
    except Exception:  # safetensors raises its own types; the SAE loader gives the precise error
        return None
    return int(shape[0]) if len(shape) == 2 else None


def _saelens_d_in(cfg_path: Path) -> int | None:
    try:
        d_in = json.loads(cfg_path.read_text(encoding="utf-8")).get("d_in")
    except (OSError, ValueError):
        return None
    return int(d_in) if isinstance(d_in, int) else None


def _local_sae_d_in(path: Path) -> int | None:
    if path.is_dir():
        if (path / "cfg.json").is_file():
            return _saelens_d_in(path / "cfg.json")
        return _safetensors_d_in(path / "params.safetensors")
    if not path.is_file():
        return None
    return _safetensors_d_in(path) if path.suffix == ".safetensors" else _npz_d_in(path)


def _hub_sae_d_in(repo: str, path: str) -> int | None:
    """Gemma Scope's width from its repo name; a SAELens cfg.json only if already in the HF cache."""
    name = repo.rsplit("/", 1)[-1]
    if name.startswith("gemma-scope-") and "-pt-" in name:
        size = name.removeprefix("gemma-scope-").split("-", 1)[0]
        if size in _GEMMA_SCOPE_D_IN:
            return _GEMMA_SCOPE_D_IN[size]
    from huggingface_hub import try_to_load_from_cache

    inner = path.strip("/")
    if inner.endswith((".npz", ".safetensors")):  # one file: readable only if already downloaded
        cached = try_to_load_from_cache(repo, inner)
        return _local_sae_d_in(Path(cached)) if isinstance(cached, str) else None
    cached = try_to_load_from_cache(repo, f"{inner}/cfg.json".lstrip("/"))
    return _saelens_d_in(Path(cached)) if isinstance(cached, str) else None


def _per_layer(value: str | Sequence[str] | None, count: int) -> list[str | None]:
    if value is None or isinstance(value, str):
        return [value] * count
    return list(value) if len(value) == count else [None] * count  # Session reports the mismatch


def check_sae_fits(
    resolved: ResolvedModel,
    layers: Sequence[int],
    *,
    sae: str,
    sae_path: str | Sequence[str] | None = None,
    sae_local_path: str | Sequence[str] | None = None,
) -> None:
    """Refuse an SAE whose input width is not the model's hidden size, before weights load.

    Loading a model takes seconds to minutes; finding then that the SAE (often the Gemma Scope
    default, given no SAE option) reads vectors of another size wastes them. The width comes from
    what is cheap to read: a SAELens cfg.json, a .npz member's or a safetensors file's header, Gemma
    Scope's repo name; a Hub SAE not yet downloaded is not downloaded for this.
    When it cannot be known without a download, the full load checks it later.
    """
    from neuroscope.sae import DEFAULT_SAE_REPO, resolve_sae_path, sae_id_for

    hidden = model_hidden_size(resolved.path)
    if hidden is None:
        return
    paths = _per_layer(sae_path, len(layers))
    locals_ = _per_layer(sae_local_path, len(layers))
    for layer, path, local in zip(layers, paths, locals_, strict=True):
        if local:
            local = local.format(layer=layer) if "{layer}" in local else local
            where = str(Path(local).expanduser())
            d_in = _local_sae_d_in(Path(where))
        elif resolved.dummy_weights and not path:
            continue  # a random SAE of the model's width is made
        else:
            inner = resolve_sae_path(path, layer, sae)
            where, d_in = sae_id_for(sae, inner), _hub_sae_d_in(sae, inner)
        if d_in is None or d_in == hidden:
            continue
        default = "" if (sae != DEFAULT_SAE_REPO or path or local) else (
            f" No SAE option was given, so the default ({DEFAULT_SAE_REPO}, made for Gemma 2 2B) "
            "was chosen."
        )  # fmt: skip
        raise SAEError(
            f"The SAE {where} reads vectors of size {d_in}, but {resolved.name} has hidden size "
            f"{hidden}: they do not fit.{default} {_SAE_OPTIONS} Nothing was loaded."
        )
