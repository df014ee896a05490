"""Sparse autoencoders: parameters on the host, loaded from Gemma Scope files or SAELens folders.

Backends move these arrays to their device and encode there. Every SAE encodes the same way
(docs/design.md, "Conventions"; the formulas are SAELens' for each architecture):

    x   = x / rms(x)                         only with input_norm="rms" (the Rust prototype's habit)
    x   = normalize(x)                       SAELens' constant_norm_rescale or layer_norm, else x
    x   = x - b_dec                          only with apply_b_dec_to_input
    pre = x @ W_enc + b_enc
    f   = relu(pre) * (pre > threshold)      jumprelu (Gemma Scope, BatchTopK and Matryoshka saves)
        = relu(pre)                          relu ("standard" in SAELens)
        = relu(pre) on the k largest pre     topk
        = (pre > 0) * relu((x @ W_enc) * mag_scale + b_mag)   gated (b_enc is SAELens' b_gate)

What SAELens does once at load time is done here once too, folded into the weights so that the
backends stay simple: ``rescale_acts_by_decoder_norm`` (W_enc, b_enc times the decoder row norms, as
SAELens' own fold), ``expected_average_only_in`` with its scaling factor (W_enc times it), float16 and
bfloat16 weights (upcast to float32 exactly).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from neuroscope.errors import SAEError

Architecture = Literal["jumprelu", "relu", "topk", "gated"]
InputNorm = Literal["none", "rms"]
Normalize = Literal["none", "constant_norm_rescale", "layer_norm"]
# Where an SAE reads (and a transcoder writes). resid_post: the output of block L (the default);
# attn_out / mlp_out: what the attention / MLP adds to the residual (after Gemma's post-norms);
# attn_z: the attention heads' outputs concatenated, the input of o_proj; mlp_in: the MLP's normalised
# input (Gemma's pre_feedforward_layernorm output); resid_mid: the residual between attention and MLP.
Site = Literal["resid_post", "resid_mid", "attn_out", "attn_z", "mlp_in", "mlp_out"]
SITES: tuple[str, ...] = ("resid_post", "resid_mid", "attn_out", "attn_z", "mlp_in", "mlp_out")

DEFAULT_SAE_REPO = "google/gemma-scope-2b-pt-res"
DEFAULT_SAE_PATH = "layer_20/width_16k/average_l0_71/params.npz"
SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
GEMMA_SCOPE_2_FILE = "params.safetensors"


@dataclass(frozen=True)
class SAE:
    """One SAE's parameters, float32 numpy arrays; ``W_enc`` is [d_in, width]."""

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
    normalize: Normalize = "none"
    mag_scale: np.ndarray | None = None  # gated: exp(r_mag), per feature
    b_mag: np.ndarray | None = None  # gated: the magnitude path's bias
    W_skip: np.ndarray | None = None  # skip transcoders: [d_in, d_out], output += x @ W_skip
    layer: int | None = None  # the block the SAE was trained on, when its files say
    site: Site = "resid_post"
    output_site: Site | None = None  # transcoders: the site they reconstruct
    hook_name: str | None = None  # as the files spell it (SAELens / TransformerLens names)
    neuronpedia_id: str | None = None

    @property
    def d_model(self) -> int:
        """The size of the vectors the SAE reads."""
        return int(self.W_enc.shape[0])

    @property
    def width(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def is_transcoder(self) -> bool:
        return self.output_site is not None

    def with_input_norm(self, input_norm: InputNorm) -> SAE:
        if input_norm not in ("none", "rms"):
            raise SAEError(f"input_norm must be 'none' or 'rms', not {input_norm!r}.")
        return replace(self, input_norm=input_norm)

    def check_model(self, hidden_size: int, model: str = "the model") -> None:
        if self.site == "attn_z":
            return  # reads heads x head_dim, not the hidden size; the backend checks that site
        if self.d_model != hidden_size:
            raise SAEError(
                f"SAE {self.id} ({self.source}) reads vectors of size {self.d_model}, but {model} has "
                f"hidden size {hidden_size}. Pick an SAE trained on this model (for Gemma 2 2B: "
                f"{DEFAULT_SAE_REPO}), or the model this SAE was trained on."
            )

    def check_layer(self, layer: int) -> None:
        """Refuse to hook the SAE at a block other than the one its files name."""
        if self.layer is not None and self.layer != layer:
            where = f" ({self.hook_name})" if self.hook_name else ""
            raise SAEError(
                f"SAE {self.id} was trained on layer {self.layer}{where}, but it is hooked at layer "
                f"{layer}. Use --layer {self.layer}, or an SAE trained on layer {layer}."
            )


# --- reading arrays --------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as float32 (integers kept), bfloat16 included.

    ``safetensors.numpy`` cannot represent bfloat16; bfloat16 is the top half of a float32, so
    widening it is exact: the 16 stored bits shifted left by 16.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    except FileNotFoundError:
        raise SAEError(f"SAE file {path} does not exist.") from None
    except (OSError, ValueError, struct.error) as e:
        raise SAEError(
            f"{path} is not a readable .safetensors file ({e}). Download it again."
        ) from None
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in _SAFETENSORS_DTYPES:
            raise SAEError(
                f"{path}: tensor {name} is stored as {dtype}, which Neuroscope cannot read "
                f"(it reads {', '.join(_SAFETENSORS_DTYPES)})."
            )
        start, end = info["data_offsets"]
        raw = np.frombuffer(data[start:end], dtype=_SAFETENSORS_DTYPES[dtype]).reshape(
            info["shape"]
        )
        if dtype == "BF16":
            arrays[name] = (raw.astype(np.uint32) << 16).view(np.float32)
        elif dtype.startswith("F"):
            arrays[name] = raw.astype(np.float32)
        else:
            arrays[name] = np.array(raw)
    return arrays


def _require(arrays: dict[str, np.ndarray], keys: tuple[str, ...], source: str, fix: str) -> None:
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise SAEError(
            f"{source} has no {', '.join(missing)} (found: {', '.join(sorted(arrays)) or 'nothing'}). {fix}"
        )


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_shapes(arrays: dict[str, np.ndarray], source: str) -> None:
    W_enc = arrays["W_enc"]
    if W_enc.ndim != 2:
        raise SAEError(f"{source}: W_enc must be 2-D [d_in, width], got shape {W_enc.shape}.")
    width = W_enc.shape[1]
    for name in ("b_enc", "threshold", "b_gate", "b_mag", "r_mag"):
        if name in arrays and arrays[name].shape != (width,):
            raise SAEError(f"{source}: {name} has shape {arrays[name].shape}, expected ({width},).")


# --- where an SAE reads ----------------------------------------------------------------------------

# TransformerLens / SAELens hook names after "blocks.L.": the site they read.
_TL_SITES = {
    "hook_resid_post": "resid_post",
    "hook_resid_mid": "resid_mid",
    "hook_mlp_in": "resid_mid",  # TransformerLens' hook_mlp_in is the MLP's input before ln2
    "ln2.hook_normalized": "mlp_in",
    "hook_attn_out": "attn_out",
    "attn.hook_z": "attn_z",
    "hook_mlp_out": "mlp_out",
}
# Hugging Face module paths after "model.layers.L." (SAELens' hf_hook_name, Gemma Scope 2's config).
_HF_SITES = {
    "output": "resid_post",
    "self_attn.o_proj.input": "attn_z",
    "post_attention_layernorm.output": "attn_out",
    "pre_feedforward_layernorm.output": "mlp_in",
    "post_feedforward_layernorm.output": "mlp_out",
}


def parse_hook_name(hook_name: str) -> tuple[int, Site]:
    """'blocks.12.hook_resid_post' (or 'model.layers.12.output') -> (12, 'resid_post').

    ``hook_resid_pre`` of block L is the output of block L-1 (Neuroscope's layer L-1).
    """
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name) or re.fullmatch(
        r"model\.layers\.(\d+)\.(.+)", hook_name
    )
    if m is None:
        raise SAEError(
            f"SAE hook {hook_name!r} is not a per-block hook (blocks.L.hook_... or "
            "model.layers.L....); Neuroscope hooks decoder blocks only."
        )
    layer, name = int(m.group(1)), m.group(2)
    if hook_name.startswith("blocks.") and name == "hook_resid_pre":
        if layer == 0:
            raise SAEError(
                f"SAE hook {hook_name} reads the embeddings, before block 0; Neuroscope hooks the "
                "output of decoder blocks only."
            )
        return layer - 1, "resid_post"
    table = _TL_SITES if hook_name.startswith("blocks.") else _HF_SITES
    if name not in table:
        raise SAEError(
            f"SAE hook {hook_name!r} reads a site Neuroscope does not support (supported: "
            f"{', '.join(sorted(table))} within a block)."
        )
    return layer, table[name]  # type: ignore[return-value]


# --- Gemma Scope -----------------------------------------------------------------------------------


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
    return _gemma_scope(arrays, path, sae_id)


def _gemma_scope(arrays: dict[str, np.ndarray], path: Path, sae_id: str | None) -> SAE:
    arrays = {("W" + k[1:] if k in ("w_enc", "w_dec") else k): v for k, v in arrays.items()}
    _require(
        arrays,
        ("W_enc", "b_enc", "b_dec", "threshold"),
        str(path),
        f"A Gemma Scope {path.name} holds W_enc, W_dec, b_enc, b_dec and threshold; "
        "re-download it or point --sae-path at a params file.",
    )
    _check_shapes(arrays, str(path))
    if "W_dec" in arrays and arrays["W_dec"].ndim == 3:
        # A cross-layer transcoder writes every later layer; SAELens sums those decoders.
        arrays["W_dec"] = arrays["W_dec"].sum(axis=1)
    return SAE(
        W_enc=_f32(arrays["W_enc"]),
        b_enc=_f32(arrays["b_enc"]),
        b_dec=_f32(arrays["b_dec"]),
        W_dec=_f32(arrays["W_dec"]) if "W_dec" in arrays else None,
        threshold=_f32(arrays["threshold"]),
        W_skip=_f32(arrays["affine_skip_connection"])
        if "affine_skip_connection" in arrays
        else None,
        architecture="jumprelu",
        id=sae_id or str(path),
        source=str(path),
    )


def gemma_scope_site(path: str) -> tuple[int | None, Site, Site | None]:
    """(layer, site, output site) from a Gemma Scope 2 path such as
    'resid_post/layer_13_width_16k_l0_medium/params.safetensors' (Gemma Scope 1 paths: layer only)."""
    m = re.search(r"layer_(\d+)", path)
    layer = int(m.group(1)) if m else None
    first = path.strip("/").split("/")[0]
    if first.startswith("transcoder") or first.startswith("clt"):
        return layer, "mlp_in", "mlp_out"
    if first.startswith("attn_out"):
        return layer, "attn_z", None  # Gemma Scope 2 reads o_proj's input (SAELens: attn.hook_z)
    if first.startswith("mlp_out"):
        return layer, "mlp_out", None
    return layer, "resid_post", None


def load_gemma_scope_2(
    path: str | Path, sae_id: str | None = None, site_path: str | None = None
) -> SAE:
    """A Gemma Scope 2 ``params.safetensors`` (w_enc [d_in, width], w_dec, b_enc, b_dec, threshold,
    and ``affine_skip_connection`` [d_in, d_out] for affine transcoders), on the raw activations.

    ``site_path`` is the file's path inside its repo (it names the site and layer); by default the
    file's own path is read for them.
    """
    path = Path(path)
    sae = _gemma_scope(read_safetensors(path), path, sae_id)
    layer, site, output_site = gemma_scope_site(site_path or "/".join(path.parts[-3:]))
    if site_path is None and not re.search(
        r"(resid_post|attn_out|mlp_out|transcoder|clt)", str(path)
    ):
        layer = None  # a renamed local file: nothing to check the layer against
    return replace(sae, layer=layer, site=site, output_site=output_site)


# --- SAELens ---------------------------------------------------------------------------------------

# cfg "architecture" -> (encoding, transcoder?). BatchTopK and Matryoshka BatchTopK training saves
# encode with their learnt threshold (SAELens saves them for inference as JumpReLU with it).
_SAELENS_ARCH: dict[str, tuple[Architecture, bool]] = {
    "jumprelu": ("jumprelu", False),
    "standard": ("relu", False),
    "relu": ("relu", False),
    "topk": ("topk", False),
    "batchtopk": ("jumprelu", False),
    "matryoshka_batchtopk": ("jumprelu", False),
    "gated": ("gated", False),
    "transcoder": ("relu", True),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", True),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
_NORMALIZE = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")


def _saelens_cfg(cfg_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SAEError(f"{cfg_path} is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise SAEError(f"{cfg_path} is not a SAELens config (a JSON object).")
    raw_metadata = cfg.get("metadata")
    metadata: dict[str, Any] = raw_metadata if isinstance(raw_metadata, dict) else {}
    version = str(metadata.get("sae_lens_version") or cfg.get("sae_lens_version") or "0")
    if int(re.match(r"\d*", version).group() or 0) < 6:  # type: ignore[union-attr]
        # SAELens before v6 wrote hook_point, defaulted apply_b_dec_to_input to true and
        # normalize_activations to a bool; read them as SAELens' own loader does.
        cfg.setdefault("hook_name", cfg.get("hook_point"))
        cfg.setdefault("apply_b_dec_to_input", True)
        if isinstance(cfg.get("normalize_activations"), bool):
            cfg["normalize_activations"] = (
                "expected_average_only_in" if cfg["normalize_activations"] else "none"
            )
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if cfg.get("activation_fn") == "topk" and kwargs.get("k") is not None:
            cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
    return {**metadata, **{k: v for k, v in cfg.items() if k != "metadata"}}


def load_saelens_dir(
    folder: str | Path,
    sae_id: str | None = None,
    *,
    norm_scaling_factor: float | None = None,
    cfg_overrides: dict[str, Any] | None = None,
) -> SAE:
    """A SAELens folder: ``cfg.json`` + ``sae_weights.safetensors``, any dtype.

    ``norm_scaling_factor``: the factor of an ``expected_average_only_in`` SAE, which SAELens keeps
    in its release table rather than in the folder (SAELens' ``norm_scaling_factor``).
    ``cfg_overrides``: fields that replace cfg.json's (SAELens' release table has some).
    """
    folder = Path(folder)
    cfg_path, weights_path = (folder / name for name in SAELENS_FILES)
    if not cfg_path.is_file() or not weights_path.is_file():
        raise SAEError(
            f"{folder} is not a SAELens SAE folder: it needs {' and '.join(SAELENS_FILES)}. "
            "For a Gemma Scope params.npz or params.safetensors, pass the file itself."
        )
    cfg = _saelens_cfg(cfg_path) | (cfg_overrides or {})
    arch_name = str(cfg.get("architecture") or "standard").lower()
    if arch_name not in _SAELENS_ARCH:
        raise SAEError(
            f"{cfg_path}: architecture {arch_name!r} is not supported "
            f"(supported: {', '.join(sorted(_SAELENS_ARCH))})."
        )
    architecture, transcoder = _SAELENS_ARCH[arch_name]
    normalize = cfg.get("normalize_activations") or "none"
    if normalize not in _NORMALIZE:
        raise SAEError(
            f"{cfg_path}: normalize_activations={normalize!r} is not supported "
            f"(supported: {', '.join(_NORMALIZE)})."
        )
    if normalize == "expected_average_only_in" and norm_scaling_factor is None:
        raise SAEError(
            f"{cfg_path}: normalize_activations='expected_average_only_in' needs the SAE's scaling "
            "factor, which SAELens keeps in its release table (norm_scaling_factor). Load it by "
            "release (--sae-release/--sae-id) or pass the factor (--sae-norm-scaling-factor)."
        )
    if (cfg.get("reshape_activations") or "none") not in ("none", "hook_z"):
        raise SAEError(
            f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r} is not supported."
        )
    if cfg.get("hook_head_index") is not None:
        raise SAEError(
            f"{cfg_path}: SAEs of a single attention head (hook_head_index) are not supported."
        )
    arrays = read_safetensors(weights_path)
    source = str(weights_path)
    needed: tuple[str, ...] = ("W_enc", "b_dec")
    needed += ("b_gate", "b_mag", "r_mag") if architecture == "gated" else ("b_enc",)
    if arch_name in ("batchtopk", "matryoshka_batchtopk"):
        if "threshold" not in arrays and "topk_threshold" in arrays:
            arrays["threshold"] = np.full(arrays["W_enc"].shape[1], float(arrays["topk_threshold"]))
        needed += ("threshold",)
    elif architecture == "jumprelu":
        needed += ("threshold",)
    _require(arrays, needed, source, "Re-download the SAE or check that it is a SAELens export.")
    _check_shapes(arrays, source)
    scaling = arrays.get("scaling_factor", arrays.get("finetuning_scaling_factor"))
    if scaling is not None and not np.allclose(scaling, 1.0):
        raise SAEError(
            f"{source}: a finetuning scaling_factor (SAELens before v6) is not supported; "
            "re-save the SAE with SAELens 6."
        )
    k = cfg.get("k")
    if architecture == "topk" and not k:
        raise SAEError(f"{cfg_path}: a topk SAE needs 'k' in its config.")
    if transcoder and cfg.get("apply_b_dec_to_input"):
        raise SAEError(
            f"{cfg_path}: a transcoder cannot apply_b_dec_to_input (b_dec is its output's)."
        )

    W_enc, W_dec = arrays["W_enc"].astype(np.float32), arrays.get("W_dec")
    b_enc = arrays["b_gate" if architecture == "gated" else "b_enc"].astype(np.float32)
    b_dec = arrays["b_dec"].astype(np.float32)
    threshold = arrays.get("threshold")
    b_mag = arrays.get("b_mag")
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens scales pre-activations by ||W_dec[i]|| before top-k (and threshold) and divides
        # them out again when decoding: the same as its fold_W_dec_norm, done here once.
        if W_dec is None:
            raise SAEError(f"{source}: rescale_acts_by_decoder_norm needs W_dec, which is missing.")
        norms = np.linalg.norm(W_dec.astype(np.float32), axis=-1)
        W_enc, b_enc = W_enc * norms, b_enc * norms
        W_dec = W_dec / norms[:, None]
    if normalize == "expected_average_only_in":
        # SAELens folds the factor in the same way (fold_activation_norm_scaling_factor).
        s = float(norm_scaling_factor)  # type: ignore[arg-type]
        W_enc, b_dec = W_enc * s, b_dec / s
        W_dec = None if W_dec is None else W_dec / s
        normalize = "none"

    hook_name = cfg.get("hook_name") or cfg.get("hook_point")
    layer, site, output_site = None, "resid_post", None
    if cfg.get("hf_hook_name"):
        layer, site = parse_hook_name(str(cfg["hf_hook_name"]))
    elif hook_name:
        layer, site = parse_hook_name(str(hook_name))
    if transcoder:
        out = cfg.get("hf_hook_name_out") or cfg.get("hook_name_out")
        output_site = parse_hook_name(str(out))[1] if out else "mlp_out"
    W_skip = arrays.get("W_skip")  # SAELens stores [d_out, d_in]
    return SAE(
        W_enc=_f32(W_enc),
        b_enc=_f32(b_enc),
        b_dec=_f32(b_dec),
        W_dec=None if W_dec is None else _f32(W_dec),
        threshold=None if threshold is None else _f32(threshold),
        architecture=architecture,
        k=int(k) if k and architecture == "topk" else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)),
        normalize=normalize,  # type: ignore[arg-type]
        mag_scale=_f32(np.exp(arrays["r_mag"].astype(np.float32)))
        if architecture == "gated"
        else None,
        b_mag=None if b_mag is None else _f32(b_mag),
        W_skip=None if W_skip is None else _f32(W_skip.T),
        layer=layer,
        site=site,  # type: ignore[arg-type]
        output_site=output_site,  # type: ignore[arg-type]
        hook_name=str(hook_name) if hook_name else None,
        neuronpedia_id=cfg.get("neuronpedia_id") or None,
        id=sae_id or str(folder),
        source=str(folder),
    )


def load_local(
    path: str | Path, sae_id: str | None = None, *, norm_scaling_factor: float | None = None
) -> SAE:
    """A local SAE: a Gemma Scope ``.npz``, a Gemma Scope 2 ``params.safetensors``, or a SAELens folder."""
    path = Path(path).expanduser().resolve()  # the id must not depend on the working directory
    if path.is_dir():
        if not (path / SAELENS_FILES[0]).is_file() and (path / GEMMA_SCOPE_2_FILE).is_file():
            return load_gemma_scope_2(path / GEMMA_SCOPE_2_FILE, sae_id)
        return load_saelens_dir(path, sae_id, norm_scaling_factor=norm_scaling_factor)
    if path.suffix == ".safetensors":
        return load_gemma_scope_2(path, sae_id)
    if path.suffix == ".npz" or path.is_file():
        return load_gemma_scope_npz(path, sae_id)
    raise SAEError(
        f"No SAE at {path}: give a Gemma Scope params.npz or params.safetensors file, or a SAELens folder."
    )


def sae_id_for(repo: str, path: str) -> str:
    """'google/gemma-scope-2b-pt-res' + 'layer_20/width_16k/average_l0_71/params.npz' -> the id in records."""
    path = path.strip("/")
    for suffix in (
        "/params.npz",
        "/" + GEMMA_SCOPE_2_FILE,
        "/cfg.json",
        "/sae_weights.safetensors",
    ):
        path = path.removesuffix(suffix)
    return f"{repo}/{path}" if path else repo


def load_from_hub(
    repo: str,
    path: str,
    revision: str | None = None,
    *,
    norm_scaling_factor: float | None = None,
    cfg_overrides: dict[str, Any] | None = None,
) -> SAE:
    """Download (or find in the Hugging Face cache) an SAE in ``repo`` at ``path``.

    ``path`` is a ``.npz`` file (Gemma Scope), a ``params.safetensors`` file or its folder (Gemma
    Scope 2), or a folder holding a SAELens export.
    Honours HF_TOKEN, HF_HOME and HF_HUB_OFFLINE like every huggingface_hub call.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    sae_id = sae_id_for(repo, path)
    folder = path.strip("/")

    def get(name: str) -> str:
        return hf_hub_download(repo, f"{folder}/{name}" if folder else name, revision=revision)

    try:
        if path.endswith(".npz"):
            return load_gemma_scope_npz(hf_hub_download(repo, path, revision=revision), sae_id)
        if path.endswith(".safetensors") and not path.endswith(SAELENS_FILES[1]):
            local = hf_hub_download(repo, folder, revision=revision)
            return load_gemma_scope_2(local, sae_id, site_path=folder)
        folder = folder.removesuffix("/" + SAELENS_FILES[1]).removesuffix("/cfg.json")
        try:
            cfg = get(SAELENS_FILES[0])
        except (EntryNotFoundError, LocalEntryNotFoundError) as first:
            try:  # a Gemma Scope 2 folder has params.safetensors and no cfg.json
                local = get(GEMMA_SCOPE_2_FILE)
            except (EntryNotFoundError, LocalEntryNotFoundError):
                raise first from None
            return load_gemma_scope_2(local, sae_id, site_path=f"{folder}/{GEMMA_SCOPE_2_FILE}")
        get(SAELENS_FILES[1])
        return load_saelens_dir(
            Path(cfg).parent,
            sae_id,
            norm_scaling_factor=norm_scaling_factor,
            cfg_overrides=cfg_overrides,
        )
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


# Gemma Scope 2's residual SAEs that Neuronpedia labels sit at four layers per model; the second of
# them is near the middle of the model. Sizes as in Gemma 3's repo ids.
GEMMA_SCOPE_2_MIDDLE_LAYER = {"270m": 9, "1b": 13, "4b": 17, "12b": 24, "27b": 31}
GEMMA_SCOPE_2_RES_PATH = "resid_post/layer_{layer}_width_16k_l0_medium/params.safetensors"


@dataclass(frozen=True)
class DefaultSAE:
    """The SAE a model gets when none is named: its repo, path template and layer."""

    repo: str
    path: str
    layer: int


def default_sae_for(model: str) -> DefaultSAE:
    """Gemma Scope 2's 16k residual SAE (medium L0) at a middle layer for a Gemma 3 model
    ('google/gemma-3-1b-it', 'gemma-3-270m', a GGUF named so); Gemma Scope's layer-20 SAE otherwise."""
    m = re.search(r"gemma-3-(270m|1b|4b|12b|27b)(?:-(pt|it))?", model.lower())
    if m is None:
        return DefaultSAE(DEFAULT_SAE_REPO, DEFAULT_SAE_PATH, 20)
    size, kind = m.group(1), "it" if m.group(2) == "it" else "pt"
    return DefaultSAE(
        f"google/gemma-scope-2-{size}-{kind}",
        GEMMA_SCOPE_2_RES_PATH,
        GEMMA_SCOPE_2_MIDDLE_LAYER[size],
    )


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
