"""Use a local GGUF file (what Ollama and LM Studio keep) as a model, by converting it once.

Both backends load Hugging Face folders, so a ``.gguf`` is dequantized once into a cached folder in
that layout (``config.json``, safetensors, ``tokenizer.json`` with the file's chat template,
``generation_config.json`` with every end-of-turn id) and that folder is what the backends see.

The weights are stored in bfloat16 by default: a quantized file holds 4 to 8 bits a weight, so
float32 would make an 8B Q4 model a 32 GB folder; bfloat16 halves that at a rounding far below the
quantization's own error. A file whose matrices are already float16, bfloat16 or float32 keeps
that type, so they are stored unrounded. ``dtype="float32"`` (or ``NEUROSCOPE_GGUF_DTYPE=float32``) asks for float32;
the dtype is part of the cache key, so each choice has its own folder.

llama.cpp's converter changes a few weights on the way into GGUF; this module undoes each change:

- llama: the rows of the Q and K projections are permuted (per head, interleaved halves) so that
  llama.cpp can apply rotary embeddings to adjacent pairs; the HF layout rotates the two halves.
- gemma, gemma2, gemma3: every RMSNorm weight is stored with 1 added, because llama.cpp multiplies
  by the weight where the HF Gemma models multiply by ``1 + weight``.
- no ``output.weight`` tensor means the output layer is tied to the token embedding.

Nothing here imports torch or mlx: the weights are read with the ``gguf`` package and dequantized
with numpy, so an MLX-only install can convert too.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroscope.cache import cache_dir, cache_root, slug, write_json_atomic
from neuroscope.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "gemma", "gemma2", "gemma3")

# Bump when the converted folder's content changes, so that old conversions are not reused.
CONVERTER_VERSION = 2  # 2: bfloat16 (or the file's float type) by default instead of float32
# How the weights are stored: "auto" is the file's float type, or bfloat16 for quantized weights.
DTYPES = ("auto", "bfloat16", "float16", "float32")
DTYPE_ENV = "NEUROSCOPE_GGUF_DTYPE"
MARKER_NAME = "neuroscope_gguf.json"
GGUF_MAGIC = b"GGUF"
# A shard of at most this many bytes is held in memory while it is written.
SHARD_BYTES = 2 * 1024**3

# llama.cpp token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn in the chat formats of the supported families; llama.cpp stops on these too.
_END_OF_TURN_TOKENS = (
    "<end_of_turn>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
)

# The published Gemma turn format, used only when a Gemma-family GGUF carries no chat template.
# Gemma has no system role, so a system message is folded into the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'] + '\n\n' -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (ns.system if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# How llama.cpp splits text before byte-level BPE, by the name in tokenizer.ggml.pre.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    """One of llama.cpp's byte-level pre-tokenizer types."""

    splits: tuple[str, ...]  # regexes applied in turn, each match kept as its own piece
    ignore_merges: bool = False  # a piece found whole in the vocabulary skips the merges
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token flag


_GPT2 = _PreTokenizer((_GPT2_SPLIT,))
_DIGITS_THEN_GPT2 = _PreTokenizer((r"\p{N}", _GPT2_SPLIT))  # every digit on its own first
_LLAMA3 = _PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_BYTE_LEVEL_PRE: dict[str, _PreTokenizer] = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "falcon3": _LLAMA3,
    "smaug-bpe": _PreTokenizer((_LLAMA3_SPLIT,)),
    "dbrx": _PreTokenizer((_LLAMA3_SPLIT,)),
    "tekken": _PreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
}


# --------------------------------------------------------------------------------------------------
# Public API


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic.

    The magic, not the suffix, decides: Ollama stores its models as ``blobs/sha256-…`` with no suffix.
    """
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def conversions_dir() -> Path:
    """The cache folder that holds one converted folder per (GGUF file, dtype)."""
    return cache_root() / "models" / "gguf"


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ConfigError(
            f"GGUF conversion dtype must be one of {', '.join(DTYPES)}, not {dtype!r} "
            f"(check {DTYPE_ENV} or the dtype you passed)."
        )
    return dtype


def default_output_dir(path: str | os.PathLike[str], dtype: str = "auto") -> Path:
    """Where ``convert_gguf`` puts the folder for ``path`` by default.

    The name carries a hash of the file's absolute path, size and modification time, the requested
    dtype and the converter version, so an edited or replaced file gets a fresh conversion instead of
    a stale one, and a float32 conversion never stands in for a bfloat16 one (or the reverse).
    """
    source = Path(path).expanduser().resolve()
    stat = source.stat()
    key = f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}\0{CONVERTER_VERSION}\0{check_dtype(dtype)}"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    suffix = "" if dtype == "auto" else f"-{dtype}"
    return cache_dir("models") / "gguf" / f"{slug(source.stem)}{suffix}-{digest}"


def convert_gguf(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    dtype: str = "auto",
) -> Path:
    """Dequantize a GGUF model once into a Hugging Face folder and return that folder.

    ``dtype`` is how the weights are stored: ``auto`` (the file's own float type, or bfloat16 when
    the weights are quantized), ``bfloat16``, ``float16`` or ``float32``.

    A folder that an earlier call completed is returned at once. The folder is built beside its final
    place under a temporary name and renamed into place only when complete, so an interrupted
    conversion leaves nothing half-written behind.

    Raises:
        ModelLoadError: the file is missing, not a GGUF, truncated or corrupt, or of an architecture
            or tokenizer this converter does not know.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise ModelLoadError(f"GGUF file not found: {source}.")
    source = source.resolve()
    check_dtype(dtype)
    target = (
        Path(out_dir).expanduser() if out_dir is not None else default_output_dir(source, dtype)
    )
    stat = source.stat()
    identity = {
        "source": str(source),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "requested_dtype": dtype,
    }

    if _is_complete(target, identity):
        return target
    if target.exists() and not (target / MARKER_NAME).exists() and any(target.iterdir()):
        raise ModelLoadError(
            f"{target} exists and is not a folder converted from a GGUF; choose another out_dir."
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    started = time.perf_counter()
    try:
        log.info("Converting %s to a Hugging Face folder (once; cached at %s)", source, target)
        summary = _convert_into(source, tmp, dtype)
        write_json_atomic(
            tmp / MARKER_NAME,
            identity
            | summary
            | {
                "converter_version": CONVERTER_VERSION,
                "seconds": round(time.perf_counter() - started, 2),
            },
        )
        _move_into_place(tmp, target, identity)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Converted %s in %.1f s", source.name, time.perf_counter() - started)
    return target


# --------------------------------------------------------------------------------------------------
# Cache folder bookkeeping


@dataclass(frozen=True)
class Conversion:
    """A folder in the conversion cache, as ``models list`` shows it."""

    folder: Path
    source: str  # the GGUF file it was converted from ("?" when unfinished)
    bytes: int
    dtype: str  # as stored ("?" for a folder of an older converter that did not record it)
    complete: bool  # False: an interrupted conversion's leftover, or an outdated converter's

    @property
    def source_exists(self) -> bool:
        return Path(self.source).is_file()


def list_conversions() -> list[Conversion]:
    """Every folder under the conversion cache, largest first (nothing is created)."""
    from neuroscope.trash import folder_size

    root = conversions_dir()
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir():
            continue
        try:
            marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            marker = {}
        found.append(
            Conversion(
                folder=folder,
                source=str(marker.get("source", "?")),
                bytes=folder_size(folder),
                dtype=str(marker.get("dtype", "float32" if marker else "?")),
                complete=marker.get("converter_version") == CONVERTER_VERSION,
            )
        )
    return sorted(found, key=lambda c: -c.bytes)


def _is_complete(folder: Path, identity: dict[str, Any]) -> bool:
    marker = folder / MARKER_NAME
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded.get("converter_version") == CONVERTER_VERSION and all(
        recorded.get(key) == value for key, value in identity.items()
    )


def _move_into_place(tmp: Path, target: Path, identity: dict[str, Any]) -> None:
    """Rename the finished folder into place; a stale or outdated folder there is swapped out."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if _is_complete(target, identity):
            return  # another process finished the same conversion first
    old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temps(target: Path) -> None:
    """Delete temporary folders left by conversions of ``target`` whose process has died."""
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*-*-*"):
        parts = leftover.name.rsplit("-", 2)
        if len(parts) == 3 and parts[1].isdigit() and not _process_alive(int(parts[1])):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


# --------------------------------------------------------------------------------------------------
# Reading the file


class _Metadata:
    """The key-value metadata of a GGUF file, as plain Python values."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields
        self.architecture = str(self.get("general.architecture", ""))

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"GGUF metadata {key!r} is not valid UTF-8: {exc}") from exc

    def arch(self, key: str, default: Any = None) -> Any:
        """An architecture-scoped key: ``arch("block_count")`` reads ``gemma2.block_count``."""
        return self.get(f"{self.architecture}.{key}", default)

    def arch_int(self, key: str, default: int | None = None) -> int:
        value = self.arch(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ModelLoadError(
                    f"GGUF key {self.architecture}.{key} varies by layer ({value}); "
                    "models with per-layer sizes are not supported."
                )
            value = value[0]
        if value is None:
            raise ModelLoadError(
                f"GGUF file lacks {self.architecture}.{key}; it cannot be converted."
            )
        return int(value)


@functools.cache
def _reader_class() -> type:
    from gguf import GGUFReader

    class PlainArrayReader(GGUFReader):
        """GGUFReader over a plain ndarray view of its memory map.

        The reader slices its ``np.memmap`` once per metadata item, and each memmap slice costs a
        subclass finalisation: a 262k-token vocabulary took 10 s to parse. A plain view of the same
        mapped buffer reads identically at a third of that.
        """

        @property  # type: ignore[override]  # a plain ndarray view stands in for the memmap
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = np.asarray(value)

    return PlainArrayReader


def _open(path: Path) -> Any:
    """A GGUFReader over ``path``, with every failure turned into an error the user can act on."""
    if not is_gguf_file(path):
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with 'GGUF').")
    try:
        # A truncated or damaged file fails inside the reader as ValueError, IndexError, …
        return _reader_class()(path)
    except Exception as exc:
        raise ModelLoadError(
            f"Cannot read GGUF file {path}: it is truncated or corrupt ({exc}). Download it again."
        ) from exc


def _convert_into(source: Path, folder: Path, dtype: str) -> dict[str, Any]:
    reader = _open(source)
    meta = _Metadata(reader)
    if int(meta.get("split.count", 1) or 1) > 1:
        raise ModelLoadError(
            f"{source.name} is one part of a split GGUF; merge the parts first "
            "(llama-gguf-split --merge FIRST_PART OUT.gguf) and pass the merged file."
        )
    if meta.architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF architecture {meta.architecture!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    if int(meta.arch("expert_count", 0) or 0) > 0:
        raise ModelLoadError(
            f"{source.name} is a mixture-of-experts model (e.g. Mixtral); only dense "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models are supported."
        )
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    tokenizer = _build_tokenizer(meta)
    config = _hf_config(meta, tensors, tokenizer)
    config["dtype"] = stored = _storage_dtype(dtype, tensors)
    _write_weights(meta, config, tensors, folder, stored)
    tokenizer.save(folder)
    write_json_atomic(folder / "config.json", config)
    write_json_atomic(folder / "generation_config.json", _generation_config(config))
    return {"architecture": meta.architecture, "model_type": config["model_type"], "dtype": stored}


def _storage_dtype(requested: str, tensors: dict[str, Any]) -> str:
    """The dtype to store: as requested, or for ``auto`` the file's own float type.

    Only matrices decide (norm vectors are float32 in nearly every file); any quantized matrix
    means bfloat16, and mixed float types keep the widest so that nothing is rounded.
    """
    if requested != "auto":
        return requested
    from gguf import GGMLQuantizationType as Q

    own = {Q.F32: "float32", Q.F16: "float16", Q.BF16: "bfloat16"}
    kinds = {
        own.get(t.tensor_type, "quantized")
        for name, t in tensors.items()
        if len(t.shape) >= 2 and name not in _CONFIG_ONLY
    }
    if not kinds or "quantized" in kinds:
        return "bfloat16"
    if len(kinds) == 1:
        return kinds.pop()
    return "float32"  # float16 beside bfloat16 (or float32): only float32 holds both exactly


# --------------------------------------------------------------------------------------------------
# config.json


def _hf_config(meta: _Metadata, tensors: dict[str, Any], tokenizer: _Tokenizer) -> dict[str, Any]:
    arch = meta.architecture
    hidden = meta.arch_int("embedding_length")
    heads = meta.arch_int("attention.head_count")
    if "token_embd.weight" not in tensors:
        raise ModelLoadError("GGUF file has no token_embd.weight tensor; it cannot be converted.")
    # The embedding's row count is the truth; the metadata vocab size is optional and sometimes off.
    vocab_size = int(tensors["token_embd.weight"].shape[-1])
    head_dim = int(meta.arch("attention.key_length") or hidden // heads)
    config: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": meta.arch_int("feed_forward_length"),
        "num_hidden_layers": meta.arch_int("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.arch_int("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": meta.arch_int("context_length"),
        "rms_norm_eps": float(meta.arch("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_ids,
        "pad_token_id": tokenizer.pad_id,
    }
    theta = float(meta.arch("rope.freq_base", 10000.0))
    if arch == "llama":
        rope = {"rope_theta": theta} | _llama_rope_scaling(meta, tensors, head_dim)
        config |= {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": "blk.0.attn_q.bias" in tensors,
            "mlp_bias": "blk.0.ffn_up.bias" in tensors,
            "rope_parameters": rope,
        }
        # mlx-lm's llama reads the pre-transformers-5 keys; without them it would use theta 10000.
        config["rope_theta"] = theta
        if rope["rope_type"] != "default":
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        return config

    gelu = "gelu_pytorch_tanh"  # Gemma's MLP uses the tanh approximation, in llama.cpp and HF alike
    config |= {"hidden_activation": gelu, "hidden_act": gelu, "attention_bias": False}
    if arch == "gemma":
        config |= {"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}
        config |= {
            "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
            "rope_theta": theta,
        }
        return config

    layers = config["num_hidden_layers"]
    # llama.cpp scales queries by 1/sqrt(hidden/heads) for the 27B models and by 1/sqrt(head_dim)
    # otherwise (a model-size switch: the file does not record the scale).
    is_27b = (arch, layers) in {("gemma2", 46), ("gemma3", 62)}
    scalar = hidden // heads if is_27b else head_dim
    sliding = _sliding_layers(meta, layers, default_pattern=2 if arch == "gemma2" else 6)
    # Gemma 2 soft-caps its logits (50 in attention, 30 at the output); Gemma 3 does not.
    caps = (50.0, 30.0) if arch == "gemma2" else (None, None)
    config |= {
        "query_pre_attn_scalar": scalar,
        "sliding_window": meta.arch_int(
            "attention.sliding_window", 4096 if arch == "gemma2" else None
        ),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "attn_logit_softcapping": _optional_float(meta.arch("attn_logit_softcapping", caps[0])),
        "final_logit_softcapping": _optional_float(meta.arch("final_logit_softcapping", caps[1])),
    }
    if arch == "gemma2":
        config |= {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}
        config |= {
            "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
            "rope_theta": theta,
        }
        return config

    # Gemma 3 rotates local (sliding) layers with their own base and scales only the global ones.
    local_theta = float(meta.arch("rope.freq_base_swa", 10000.0))
    full_rope: dict[str, Any] = {"rope_theta": theta, "rope_type": "default"}
    scaling_type = meta.arch("rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise ModelLoadError(
                f"Gemma 3 GGUF with rope scaling {scaling_type!r} is not supported."
            )
        full_rope = {
            "rope_theta": theta,
            "rope_type": "linear",
            "factor": float(meta.arch("rope.scaling.factor")),
        }
    config |= {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "rope_parameters": {
            "full_attention": full_rope,
            "sliding_attention": {"rope_theta": local_theta, "rope_type": "default"},
        },
        # The pre-transformers-5 spelling, which mlx-lm's gemma3_text reads.
        "rope_theta": theta,
        "rope_local_base_freq": local_theta,
        "rope_scaling": None if full_rope["rope_type"] == "default" else full_rope,
        "use_bidirectional_attention": False,
    }
    pattern = _pattern_period(sliding)
    if pattern is not None:
        config["sliding_window_pattern"] = pattern
        config["_sliding_window_pattern"] = pattern
    return config


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _sliding_layers(meta: _Metadata, layers: int, default_pattern: int) -> list[bool]:
    """Which layers use the sliding window: an explicit per-layer list, or every layer but each n-th."""
    pattern = meta.arch("attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise ModelLoadError(
                f"sliding_window_pattern has {len(pattern)} entries for {layers} layers."
            )
        return [bool(v) for v in pattern]
    period = int(pattern)
    return [(i + 1) % period != 0 for i in range(layers)]


def _pattern_period(sliding: list[bool]) -> int | None:
    for period in range(1, len(sliding) + 1):
        if sliding == [(i + 1) % period != 0 for i in range(len(sliding))]:
            return period
    return None


def _llama_rope_scaling(meta: _Metadata, tensors: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """The rope type of a llama file in transformers' terms.

    Llama 3.1+ files carry no scaling keys; llama.cpp stores the per-frequency divisors as a
    ``rope_freqs.weight`` tensor instead. Those divisors follow from four published numbers, so they
    are recomputed from the candidate numbers and accepted only if they match.
    """
    scaling_type = meta.arch("rope.scaling.type")
    if "rope_freqs.weight" in tensors:
        from gguf.quants import dequantize

        tensor = tensors["rope_freqs.weight"]
        divisors = np.asarray(
            dequantize(tensor.data, tensor.tensor_type), dtype=np.float64
        ).reshape(-1)
        original = int(meta.arch("rope.scaling.original_context_length", 8192))
        candidate = {
            "rope_type": "llama3",
            "factor": float(divisors.max()),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original,
        }
        theta = float(meta.arch("rope.freq_base", 10000.0))
        if not np.allclose(_llama3_divisors(candidate, theta, head_dim), divisors, rtol=1e-3):
            raise ModelLoadError(
                "This llama GGUF has rope frequency factors (rope_freqs) that do not match Llama 3's "
                "published scaling; it cannot be converted faithfully."
            )
        return candidate
    if scaling_type in (None, "none"):
        return {"rope_type": "default"}
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": float(meta.arch("rope.scaling.factor"))}
    raise ModelLoadError(
        f"llama GGUF with rope scaling {scaling_type!r} is not supported (only linear, llama3)."
    )


def _llama3_divisors(rope: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Llama 3's rope scaling as divisors of each inverse frequency (llama.cpp's rope_freqs)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    original, factor = rope["original_max_position_embeddings"], rope["factor"]
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }


# --------------------------------------------------------------------------------------------------
# Weights


# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N."), per family.
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA2_LAYER = _LLAMA_LAYER | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_NAMES = {
    "llama": _LLAMA_LAYER,
    "gemma": _LLAMA_LAYER,
    "gemma2": _GEMMA2_LAYER,
    "gemma3": _GEMMA2_LAYER
    | {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors llama.cpp adds that have no HF weight (their content is read into the config instead).
_CONFIG_ONLY = {"rope_freqs.weight"}


def _hf_name(arch: str, gguf_name: str) -> str:
    stem, _, kind = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, index, part = stem.split(".", 2)
        mapped = _LAYER_NAMES[arch].get(part)
        hf = None if mapped is None else f"model.layers.{index}.{mapped}"
    else:
        hf = _GLOBAL_NAMES.get(stem)
    if hf is None or kind not in ("weight", "bias"):
        raise ModelLoadError(
            f"GGUF tensor {gguf_name!r} has no counterpart in the HF {arch} model."
        )
    return f"{hf}.{kind}"


def _expected_names(config: dict[str, Any], arch: str) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        names.add("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        names |= {f"model.layers.{i}.{part}.weight" for part in set(_LAYER_NAMES[arch].values())}
    return names


def _unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of a Q or K projection (weight or bias).

    llama.cpp's converter views each head's rows as (2, head_dim/2) and transposes them to
    (head_dim/2, 2), which interleaves the two rotary halves; the inverse transposes back.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    grouped = weight.reshape(n_heads, half, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def _tensor_fix(
    arch: str, config: dict[str, Any], gguf_name: str
) -> Callable[[np.ndarray], np.ndarray]:
    """The inverse of what llama.cpp's converter did to this tensor."""
    if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        heads = config["num_attention_heads" if ".attn_q." in gguf_name else "num_key_value_heads"]
        return lambda w: _unpermute_rope_rows(w, heads)
    if arch.startswith("gemma") and gguf_name.endswith("norm.weight"):
        return lambda w: w - np.float32(1.0)
    return lambda w: w


def _weights(
    meta: _Metadata, config: dict[str, Any], tensors: dict[str, Any]
) -> Iterator[tuple[str, Any]]:
    """(HF name, GGUF tensor) in file order, after checking the names cover the HF model exactly."""
    arch = meta.architecture
    named = [
        (_hf_name(arch, name), tensor)
        for name, tensor in tensors.items()
        if name not in _CONFIG_ONLY
    ]
    mapped = {hf for hf, _ in named}
    missing = sorted(_expected_names(config, arch) - mapped)
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ModelLoadError(f"GGUF file lacks tensors the {arch} model needs: {shown}")
    return iter(named)


def _dequantized(meta: _Metadata, config: dict[str, Any], tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ModelLoadError(
            f"Tensor {tensor.name} uses quantization {tensor.tensor_type.name}, which the gguf package "
            f"cannot dequantize: {exc}. Upgrade gguf, or use a file with another quantization."
        ) from exc
    # GGUF lists dimensions innermost first; numpy wants them outermost first.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    fixed = _tensor_fix(meta.architecture, config, tensor.name)(values)
    return np.ascontiguousarray(fixed, dtype=np.float32)


_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even, as torch does.

    numpy has no bfloat16 type; the top 16 bits of a float32 are one, after rounding on the 16
    bits dropped. NaNs stay quiet NaNs (rounding could otherwise carry a NaN's payload into inf).
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def _stored(values: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """The bytes to write for ``values`` in ``dtype``, and safetensors' name for that dtype."""
    if dtype == "bfloat16":
        return to_bfloat16_bits(values), "bfloat16"
    return np.ascontiguousarray(values, dtype=np.dtype(dtype)), dtype


def _save_safetensors(arrays: dict[str, tuple[np.ndarray, str]], path: Path) -> None:
    # safetensors.numpy.save_file names the dtype after the numpy array, and numpy has no
    # bfloat16: the lower-level writer takes the dtype name and the raw buffer separately.
    from safetensors import TensorSpec, serialize_file

    specs = {
        name: TensorSpec(
            dtype=dtype, shape=list(data.shape), data_ptr=data.ctypes.data, data_len=data.nbytes
        )
        for name, (data, dtype) in arrays.items()
    }
    serialize_file(specs, str(path), metadata={"format": "pt"})


def _write_weights(
    meta: _Metadata, config: dict[str, Any], tensors: dict[str, Any], folder: Path, dtype: str
) -> None:
    """Safetensors in ``dtype``, in shards of at most SHARD_BYTES so memory stays bounded."""
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    item = _ITEM_BYTES[dtype]
    named = list(_weights(meta, config, tensors))
    shards: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for hf_name, tensor in named:
        nbytes = item * int(np.prod(tensor.shape))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((hf_name, tensor))
        size += nbytes
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    progress = tqdm(total=len(named), desc="Dequantizing GGUF", unit="tensor", disable=None)
    weight_map: dict[str, str] = {}
    total = 0
    for file, shard in zip(files, shards, strict=True):
        arrays: dict[str, tuple[np.ndarray, str]] = {}
        for hf_name, tensor in shard:
            arrays[hf_name] = _stored(_dequantized(meta, config, tensor), dtype)
            weight_map[hf_name] = file
            total += arrays[hf_name][0].nbytes
            progress.update()
        _save_safetensors(arrays, folder / file)
        del arrays
    progress.close()
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json_atomic(folder / "model.safetensors.index.json", index)


# --------------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class _Tokenizer:
    """A tokenizers.Tokenizer plus what transformers needs to wrap it."""

    backend: Any
    tokens: list[str]
    bos_id: int | None
    eos_ids: list[int]
    pad_id: int | None
    unk_id: int | None
    chat_template: str | None
    max_length: int | None

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    def save(self, folder: Path) -> None:
        """tokenizer.json, tokenizer_config.json and the chat template, via transformers' own writer."""
        from transformers import PreTrainedTokenizerFast

        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=self.backend,
            bos_token=self._token(self.bos_id),
            eos_token=self._token(self.eos_ids[0] if self.eos_ids else None),
            unk_token=self._token(self.unk_id),
            pad_token=self._token(self.pad_id),
            model_max_length=self.max_length,
        )
        if self.chat_template:
            wrapped.chat_template = self.chat_template
        wrapped.save_pretrained(str(folder))


def _token_id(meta: _Metadata, key: str, vocab_size: int) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    value = int(value)
    return value if 0 <= value < vocab_size else None


def _build_tokenizer(meta: _Metadata) -> _Tokenizer:
    """The file's tokenizer, rebuilt from its metadata with the ``tokenizers`` library.

    transformers can build one too (``AutoTokenizer.from_pretrained(..., gguf_file=...)``), but only
    with torch installed, and an MLX install has no torch.
    """
    tokens = meta.get("tokenizer.ggml.tokens")
    model = meta.get("tokenizer.ggml.model")
    if not tokens or model is None:
        raise ModelLoadError(
            "GGUF file has no tokenizer (tokenizer.ggml.tokens); it cannot be converted."
        )
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelLoadError(
            f"GGUF tokenizer lists {len(tokens)} tokens but {len(types)} token types; the file is corrupt."
        )
    embedded = meta.get("tokenizer.huggingface.json")
    if embedded:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(embedded)
    elif model == "gpt2":
        backend = _byte_level_bpe(meta, tokens, types)
    elif model == "llama":
        backend = _sentencepiece_bpe(meta, tokens, types)
    else:
        raise ModelLoadError(
            f"GGUF tokenizer model {model!r} is not supported; supported: 'gpt2' (byte-level BPE), "
            "'llama' (SentencePiece)."
        )

    vocab = len(tokens)
    bos, eos = _token_id(meta, "bos_token_id", vocab), _token_id(meta, "eos_token_id", vocab)
    eos_ids = [
        i
        for i in (
            eos,
            _token_id(meta, "eot_token_id", vocab),
            _token_id(meta, "eom_token_id", vocab),
        )
        if i is not None
    ]
    for index, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if (
            kind == _CONTROL
            and token in _END_OF_TURN_TOKENS
            and index not in eos_ids
            and index != bos
        ):
            eos_ids.append(index)
    template = meta.get("tokenizer.chat_template")
    if not template and meta.architecture.startswith("gemma") and "<start_of_turn>" in tokens:
        template = GEMMA_CHAT_TEMPLATE
    return _Tokenizer(
        backend=backend,
        tokens=tokens,
        bos_id=bos,
        eos_ids=list(dict.fromkeys(eos_ids)),
        pad_id=_token_id(meta, "padding_token_id", vocab),
        unk_id=_token_id(meta, "unknown_token_id", vocab),
        chat_template=template,
        max_length=meta.arch("context_length"),
    )


def _add_marked_tokens(
    backend: Any, tokens: list[str], types: list[int], vocab: dict[str, int]
) -> None:
    """Match control and user-defined tokens whole, as llama.cpp does, keeping their ids."""
    from tokenizers import AddedToken

    special = [
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, types, strict=True)
        if kind == _CONTROL and token and vocab.get(token) is not None
    ]
    user = [
        AddedToken(token, special=False, normalized=False)
        for token, kind in zip(tokens, types, strict=True)
        if kind == _USER_DEFINED and token and vocab.get(token) is not None
    ]
    backend.add_special_tokens(special)
    backend.add_tokens(user)


def _bos_eos_post_processor(meta: _Metadata, tokens: list[str], default_add_bos: bool) -> Any:
    """Add BOS (and EOS) around each encoding when the file says so, as llama.cpp does."""
    from tokenizers import processors

    bos = _token_id(meta, "bos_token_id", len(tokens))
    eos = _token_id(meta, "eos_token_id", len(tokens))
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if not (add_bos or add_eos):
        return None
    head = [tokens[bos]] if add_bos and bos is not None else []
    tail = [tokens[eos]] if add_eos and eos is not None else []
    specials = [
        (tokens[i], i)
        for i in dict.fromkeys(
            ([bos] if bos is not None and head else [])
            + ([eos] if eos is not None and tail else [])
        )
    ]
    single = " ".join(head + ["$A"] + tail)
    pair = " ".join(head + ["$A"] + tail + head + ["$B"] + tail)
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _byte_level_bpe(meta: _Metadata, tokens: list[str], types: list[int]) -> Any:
    """GPT-2-style BPE over bytes (SmolLM, Llama 3, Mistral Nemo), split as tokenizer.ggml.pre says."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    name = str(meta.get("tokenizer.ggml.pre") or "default")
    pre = _BYTE_LEVEL_PRE.get(name)
    if pre is None:
        raise ModelLoadError(
            f"GGUF byte-level tokenizer with pre-tokenizer {name!r} is not supported; "
            f"supported: {', '.join(sorted(_BYTE_LEVEL_PRE))}."
        )
    vocab = _first_ids(tokens)
    merges = []
    for merge in meta.get("tokenizer.ggml.merges") or []:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ModelLoadError(f"Malformed merge {merge!r} in the GGUF tokenizer.")
        merges.append((left, right))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    _add_marked_tokens(backend, tokens, types, vocab)
    post = _bos_eos_post_processor(meta, tokens, default_add_bos=pre.add_bos)
    backend.post_processor = post or processors.ByteLevel(trim_offsets=False)
    return backend


def _sentencepiece_bpe(meta: _Metadata, tokens: list[str], types: list[int]) -> Any:
    """SentencePiece BPE (Gemma, Llama 2) as a tokenizers BPE with byte fallback.

    The file has no merges; they are derived from the vocabulary, best piece first. For Gemma the
    file's order is the merge order (its user-defined runs of spaces carry score -1000 yet merge
    first); elsewhere the scores give it. Gemma stores runs of spaces as real spaces, while the
    pipeline sees them as '▁', so those pieces are respelled.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    is_gemma = meta.architecture.startswith("gemma")
    spelled = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = _first_ids(spelled)
    if is_gemma:
        order = list(range(len(tokens)))
    else:
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        order = sorted(range(len(tokens)), key=lambda i: -scores[i])
    rank = {i: r for r, i in enumerate(order)}
    candidates = []
    for index in order:
        if types[index] not in (_NORMAL, _USER_DEFINED):
            continue
        piece = spelled[index]
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left is not None and right is not None:
                candidates.append((rank[index], left, right))
    candidates.sort()
    merges = [(spelled[left], spelled[right]) for _, left, right in candidates]

    unk = _token_id(meta, "unknown_token_id", len(tokens))
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=None if unk is None else spelled[unk],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", not is_gemma))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    # Respelled runs of spaces are left to the merges: as added tokens they would match raw text only.
    _add_marked_tokens(backend, tokens, types, vocab)
    post = _bos_eos_post_processor(meta, spelled, default_add_bos=True)
    if post is not None:
        backend.post_processor = post
    return backend


def _first_ids(tokens: list[str]) -> dict[str, int]:
    """token -> id; a token listed twice keeps its first id (the later copy is unreachable anyway)."""
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    return vocab
