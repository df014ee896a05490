"""Sparse autoencoders: parameters on the host, loaded from Gemma Scope npz files or SAELens folders.

Backends move these arrays to their device and encode there. The formula (DESIGN.md, "Correctness
conventions") for the default Gemma Scope JumpReLU SAE on the raw residual x:

    pre = x @ W_enc + b_enc
    f   = pre * (pre > threshold)

SAELens folders may ask for ``apply_b_dec_to_input`` (x - b_dec before encoding); ``relu`` is
``max(pre, 0)``; ``topk`` keeps the k largest ``relu(pre)``. ``input_norm="rms"`` divides x by its
root mean square first, which is what the Rust prototype did (only for parity with it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from neuroscope.errors import SAEError

Architecture = Literal["jumprelu", "relu", "topk"]
InputNorm = Literal["none", "rms"]

DEFAULT_SAE_REPO = "google/gemma-scope-2b-pt-res"
DEFAULT_SAE_PATH = "layer_20/width_16k/average_l0_71/params.npz"
SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")


@dataclass(frozen=True)
class SAE:
    """One SAE's parameters, float32 numpy arrays; ``W_enc`` is [d_model, width]."""

    W_enc: np.ndarray
    b_enc: np.ndarray
    b_dec: np.ndarray
    W_dec: np.ndarray | None = None
    threshold: np.ndarray | None = None
    architecture: Architecture = "jumprelu"
    k: int | None = None
    apply_b_dec_to_input: bool = False
    input_norm: InputNorm = "none"
    id: str = "sae"
    source: str = ""

    @property
    def d_model(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def width(self) -> int:
        return int(self.W_enc.shape[1])

    def with_input_norm(self, input_norm: InputNorm) -> SAE:
        if input_norm not in ("none", "rms"):
            raise SAEError(f"input_norm must be 'none' or 'rms', not {input_norm!r}.")
        return replace(self, input_norm=input_norm)

    def check_model(self, hidden_size: int, model: str = "the model") -> None:
        if self.d_model != hidden_size:
            raise SAEError(
                f"SAE {self.id} ({self.source}) reads vectors of size {self.d_model}, but {model} has "
                f"hidden size {hidden_size}. Pick an SAE trained on this model (for Gemma 2 2B: "
                f"{DEFAULT_SAE_REPO}), or the model this SAE was trained on."
            )


def _require(arrays: dict[str, np.ndarray], keys: tuple[str, ...], source: str, fix: str) -> None:
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise SAEError(
            f"{source} has no {', '.join(missing)} (found: {', '.join(sorted(arrays)) or 'nothing'}). {fix}"
        )


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def load_gemma_scope_npz(path: str | Path, sae_id: str | None = None) -> SAE:
    """A Gemma Scope ``params.npz`` (keys W_enc, W_dec, b_enc, b_dec, threshold; some spell w_enc)."""
    path = Path(path)
    try:
        with np.load(path) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise SAEError(f"SAE file {path} does not exist. Check --sae-local-path.") from None
    except (OSError, ValueError) as e:
        raise SAEError(f"{path} is not a readable .npz file ({e}). Download it again.") from None
    arrays = {("W" + k[1:] if k in ("w_enc", "w_dec") else k): v for k, v in arrays.items()}
    _require(
        arrays,
        ("W_enc", "b_enc", "b_dec", "threshold"),
        str(path),
        "A Gemma Scope params.npz holds W_enc, W_dec, b_enc, b_dec and threshold; "
        "re-download it or point --sae-path at a params.npz file.",
    )
    W_enc = _f32(arrays["W_enc"])
    if W_enc.ndim != 2:
        raise SAEError(f"{path}: W_enc must be 2-D [d_model, width], got shape {W_enc.shape}.")
    width = W_enc.shape[1]
    for name in ("b_enc", "threshold"):
        if arrays[name].shape != (width,):
            raise SAEError(f"{path}: {name} has shape {arrays[name].shape}, expected ({width},).")
    return SAE(
        W_enc=W_enc,
        b_enc=_f32(arrays["b_enc"]),
        b_dec=_f32(arrays["b_dec"]),
        W_dec=_f32(arrays["W_dec"]) if "W_dec" in arrays else None,
        threshold=_f32(arrays["threshold"]),
        architecture="jumprelu",
        id=sae_id or str(path),
        source=str(path),
    )


_SAELENS_ARCH = {"jumprelu": "jumprelu", "standard": "relu", "relu": "relu", "topk": "topk"}


def load_saelens_dir(folder: str | Path, sae_id: str | None = None) -> SAE:
    """A SAELens folder: ``cfg.json`` + ``sae_weights.safetensors`` (jumprelu, standard/relu, topk)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    cfg_path, weights_path = (folder / name for name in SAELENS_FILES)
    if not cfg_path.is_file() or not weights_path.is_file():
        raise SAEError(
            f"{folder} is not a SAELens SAE folder: it needs {' and '.join(SAELENS_FILES)}. "
            "For a Gemma Scope params.npz, pass the .npz file itself."
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SAEError(f"{cfg_path} is not valid JSON ({e}).") from None
    arch_name = str(cfg.get("architecture", "standard")).lower()
    if arch_name not in _SAELENS_ARCH:
        raise SAEError(
            f"{cfg_path}: architecture {arch_name!r} is not supported "
            f"(supported: {', '.join(sorted(_SAELENS_ARCH))})."
        )
    architecture = _SAELENS_ARCH[arch_name]
    try:
        arrays = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error types
        raise SAEError(f"{weights_path} could not be read ({e}). Download it again.") from None
    needed = ("W_enc", "b_enc", "b_dec") + (("threshold",) if architecture == "jumprelu" else ())
    _require(
        arrays,
        needed,
        str(weights_path),
        "Re-download the SAE or check that it is a SAELens export.",
    )
    k = cfg.get("k")
    if architecture == "topk" and not k:
        raise SAEError(f"{cfg_path}: a topk SAE needs 'k' in its config.")
    normalize = cfg.get("normalize_activations", "none") or "none"
    if normalize not in ("none", None):
        raise SAEError(
            f"{cfg_path}: normalize_activations={normalize!r} is not supported; only 'none' is."
        )
    return SAE(
        W_enc=_f32(arrays["W_enc"]),
        b_enc=_f32(arrays["b_enc"]),
        b_dec=_f32(arrays["b_dec"]),
        W_dec=_f32(arrays["W_dec"]) if "W_dec" in arrays else None,
        threshold=_f32(arrays["threshold"]) if "threshold" in arrays else None,
        architecture=architecture,  # type: ignore[arg-type]
        k=int(k) if k else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)),
        id=sae_id or str(folder),
        source=str(folder),
    )


def load_local(path: str | Path, sae_id: str | None = None) -> SAE:
    """A local SAE: a ``.npz`` file (Gemma Scope) or a SAELens folder."""
    path = Path(path).expanduser().resolve()  # the id must not depend on the working directory
    if path.is_dir():
        return load_saelens_dir(path, sae_id)
    if path.suffix == ".npz" or path.is_file():
        return load_gemma_scope_npz(path, sae_id)
    raise SAEError(f"No SAE at {path}: give a Gemma Scope params.npz file or a SAELens folder.")


def sae_id_for(repo: str, path: str) -> str:
    """'google/gemma-scope-2b-pt-res' + 'layer_20/width_16k/average_l0_71/params.npz' -> the id in records."""
    path = path.strip("/")
    for suffix in ("/params.npz", "/cfg.json", "/sae_weights.safetensors"):
        path = path.removesuffix(suffix)
    return f"{repo}/{path}" if path else repo


def load_from_hub(repo: str, path: str, revision: str | None = None) -> SAE:
    """Download (or find in the Hugging Face cache) an SAE in ``repo`` at ``path``.

    ``path`` is a ``.npz`` file, or a folder holding a SAELens export.
    Honours HF_TOKEN, HF_HOME and HF_HUB_OFFLINE like every huggingface_hub call.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    sae_id = sae_id_for(repo, path)
    try:
        if path.endswith(".npz"):
            return load_gemma_scope_npz(hf_hub_download(repo, path, revision=revision), sae_id)
        folder = path.strip("/")
        local = None
        for name in SAELENS_FILES:
            local = hf_hub_download(repo, f"{folder}/{name}" if folder else name, revision=revision)
        return load_saelens_dir(Path(local).parent, sae_id)  # type: ignore[arg-type]
    except LocalEntryNotFoundError:
        raise SAEError(
            f"SAE {repo}/{path} is not in the Hugging Face cache and the Hub cannot be reached. "
            "Connect once (or `neuroscope sae pull`), or give a local file with --sae-local-path."
        ) from None
    except (EntryNotFoundError, RepositoryNotFoundError) as e:
        raise SAEError(
            f"SAE {repo}/{path} was not found on the Hub ({type(e).__name__}). Check --sae and "
            "--sae-path; gated repos need HF_TOKEN."
        ) from None


def resolve_sae_path(sae_path: str | None, layer: int, repo: str) -> str:
    """The SAE path for ``layer``: a ``{layer}`` template is filled in; the default repo has a default."""
    if sae_path:
        return sae_path.format(layer=layer) if "{layer}" in sae_path else sae_path
    if repo == DEFAULT_SAE_REPO and layer == 20:
        return DEFAULT_SAE_PATH
    raise SAEError(
        f"No --sae-path for layer {layer} of {repo}. Give one, e.g. "
        "'layer_{layer}/width_16k/average_l0_71/params.npz' (Gemma Scope's L0 differs per layer)."
    )
