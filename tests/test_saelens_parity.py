"""SAELens itself is the reference: its ``save_model`` folders, encoded by SAELens and by both
backends' encoders on the same residuals, for every architecture and option that changes encoding.

Each case prints its figure (max |difference| relative to the position's largest activation); the closing note of
issue 15 lists them. Run: ``python -m pytest -q -s tests/test_saelens_parity.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import has_module

from neuroscope.errors import SAEError
from neuroscope.sae import SAE, load_local

pytestmark = pytest.mark.skipif(
    not has_module("sae_lens"), reason="needs sae-lens (the [dev] extra)"
)

D_IN, WIDTH, N = 48, 192, 64
REL = 1e-5  # relative tolerance on every active feature (the bar)


def _randomise(sae, seed: int, dtype=None) -> None:
    """Parameters whose features fire on a fair share of the residuals below, thresholds included."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "W_enc":
                p.copy_(torch.randn(p.shape, generator=g) / D_IN**0.5)
            elif name == "W_dec":  # rows of unequal norm, so decoder-norm rescaling matters
                rows = torch.randn(p.shape, generator=g)
                rows = rows / rows.norm(dim=-1, keepdim=True)
                p.copy_(rows * (0.3 + 2.0 * torch.rand(p.shape[0], 1, generator=g)))
            elif name == "threshold":
                p.copy_(0.05 + 0.4 * torch.rand(p.shape, generator=g))
            elif name == "r_mag":
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif name == "W_skip":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.35)
    if dtype is not None:
        sae.to(dtype=dtype)


def _residuals(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 3.0, (N, 1))  # norms vary, so the normalisations matter
    return (rng.standard_normal((N, D_IN)) * scale + 0.2).astype(np.float32)


def _saelens_reference(folder: Path, x: np.ndarray, fold: Callable | None = None) -> np.ndarray:
    """SAELens' own encode of its saved folder, float32 (half-precision weights are upcast)."""
    import torch
    from sae_lens import SAE as SAELensSAE

    sae = SAELensSAE.load_from_disk(folder, dtype="float32")
    if fold is not None:
        fold(sae)
    with torch.no_grad():
        return sae.encode(torch.from_numpy(x)).numpy()


def _encoders() -> list[tuple[str, Callable[[SAE, np.ndarray], np.ndarray]]]:
    out = []
    if has_module("torch"):
        import torch

        from neuroscope_torch.sae import TorchSAE

        def torch_encode(sae: SAE, x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return TorchSAE(sae, torch.device("cpu")).encode(torch.from_numpy(x)).numpy()

        out.append(("torch", torch_encode))
    if has_module("mlx"):
        import mlx.core as mx

        from neuroscope_mlx.sae import MLXSAE

        def mlx_encode(sae: SAE, x: np.ndarray) -> np.ndarray:
            return np.array(MLXSAE(sae).encode(mx.array(x)))

        out.append(("mlx", mlx_encode))
    return out


def _assert_parity(name: str, ours: np.ndarray, ref: np.ndarray, k: int = 10) -> float:
    """Same active features, same top-k (as sets), activations within REL of the position's largest
    activation; returns the figure."""
    assert ours.shape == ref.shape
    active = ref > 0
    assert active.any(axis=-1).mean() > 0.5, "test data: too few positions fire any feature"
    np.testing.assert_array_equal(ours > 0, active, err_msg=f"{name}: active features differ")
    for row_ours, row_ref in zip(ours, ref, strict=True):
        n = min(k, int((row_ref > 0).sum()))
        top_ref = set(np.argsort(-row_ref, kind="stable")[:n].tolist())
        top_ours = set(np.argsort(-row_ours, kind="stable")[:n].tolist())
        assert top_ours == top_ref, f"{name}: top-{k} differs"
    # Relative to each position's largest activation: a feature just above zero carries the float32
    # rounding of a whole dot product, so its own relative error means nothing.
    rel = np.abs(ours - ref) / np.abs(ref).max(axis=-1, keepdims=True).clip(min=1e-30)
    worst = float(rel.max())
    assert worst <= REL, f"{name}: max relative difference {worst:.2e} > {REL}"
    return worst


def _check(name: str, sae: SAE, ref: np.ndarray, x: np.ndarray) -> None:
    encoders = _encoders()
    assert encoders, "neither torch nor mlx is installed"
    figures = [
        f"{b} {_assert_parity(f'{name} [{b}]', enc(sae, x), ref):.1e}" for b, enc in encoders
    ]
    active = (ref > 0).sum(-1).mean()
    print(
        f"\nSAELens parity {name}: {', '.join(figures)} (max |diff| / largest activation; {active:.0f} active/pos)"
    )


def _save(sae, folder: Path, hook_name: str = "blocks.3.hook_resid_post") -> Path:
    sae.cfg.metadata.hook_name = hook_name
    sae.save_model(folder)
    return folder


def _make(kind: str, **cfg):
    import sae_lens

    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
        "transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
        "skip_transcoder": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig),
        "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig),
        "jumprelu_skip_transcoder": (
            sae_lens.JumpReLUSkipTranscoder,
            sae_lens.JumpReLUSkipTranscoderConfig,
        ),
    }
    cls, cfg_cls = classes[kind]
    return cls(cfg_cls(d_in=D_IN, d_sae=WIDTH, **cfg))


CASES = {
    "jumprelu": ("jumprelu", {"apply_b_dec_to_input": False}),
    "jumprelu+b_dec": ("jumprelu", {"apply_b_dec_to_input": True}),
    "standard": ("standard", {"apply_b_dec_to_input": False}),
    "standard+b_dec": ("standard", {"apply_b_dec_to_input": True}),
    "topk": ("topk", {"k": 12}),
    "topk+rescale_acts_by_decoder_norm": ("topk", {"k": 12, "rescale_acts_by_decoder_norm": True}),
    "gated": ("gated", {"apply_b_dec_to_input": True}),
    "standard+constant_norm_rescale": (
        "standard",
        {"normalize_activations": "constant_norm_rescale"},
    ),
    "standard+layer_norm": ("standard", {"normalize_activations": "layer_norm"}),
    "jumprelu+layer_norm": ("jumprelu", {"normalize_activations": "layer_norm"}),
    "topk+constant_norm_rescale": (
        "topk",
        {"k": 12, "normalize_activations": "constant_norm_rescale"},
    ),
    "transcoder": ("transcoder", {"apply_b_dec_to_input": False, "d_out": D_IN}),
    "skip_transcoder": ("skip_transcoder", {"apply_b_dec_to_input": False, "d_out": D_IN}),
    "jumprelu_transcoder": ("jumprelu_transcoder", {"apply_b_dec_to_input": False, "d_out": 32}),
    "jumprelu_skip_transcoder": (
        "jumprelu_skip_transcoder",
        {"apply_b_dec_to_input": False, "d_out": D_IN},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_architectures_and_options(case: str, tmp_path: Path) -> None:
    kind, cfg = CASES[case]
    sae = _make(kind, **cfg)
    _randomise(sae, seed=len(case))
    hook = "blocks.3.hook_mlp_in" if "transcoder" in kind else "blocks.3.hook_resid_post"
    folder = _save(sae, tmp_path / case, hook)
    x = _residuals()
    ours = load_local(folder)
    assert ours.layer == 3
    if "transcoder" in kind:
        assert (ours.site, ours.output_site) == ("resid_mid", "mlp_out")
        if "skip" in kind:
            np.testing.assert_array_equal(ours.W_skip, sae.W_skip.detach().numpy().T)
    else:
        assert ours.site == "resid_post"
    _check(case, ours, _saelens_reference(folder, x), x)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["jumprelu", "topk+rescale_acts_by_decoder_norm", "gated"])
def test_half_precision_weights(kind: str, dtype: str, tmp_path: Path) -> None:
    """The reference is SAELens' formula on the stored weights upcast to float32."""
    import torch

    arch, cfg = CASES[kind]
    sae = _make(arch, **cfg)
    _randomise(sae, seed=7, dtype=getattr(torch, dtype))
    folder = _save(sae, tmp_path / kind)
    assert json.loads((folder / "cfg.json").read_text())["dtype"] == dtype
    x = _residuals(1)
    _check(f"{kind} {dtype}", load_local(folder), _saelens_reference(folder, x), x)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_training_saves_encode_with_their_threshold(arch: str, tmp_path: Path) -> None:
    """A BatchTopK (or Matryoshka) training save and SAELens' inference save of it (JumpReLU with the
    learnt threshold, decoder norms folded) both encode like SAELens' JumpReLU of the latter."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )

    if arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=WIDTH, k=12))
    else:
        sae = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=D_IN, d_sae=WIDTH, k=12, matryoshka_widths=[64, WIDTH]
            )
        )
    assert sae.cfg.rescale_acts_by_decoder_norm  # SAELens' default: the harder case
    _randomise(sae, seed=3)
    sae.cfg.metadata.hook_name = "blocks.5.hook_resid_post"
    sae.save_model(tmp_path / "training")
    sae.save_inference_model(tmp_path / "inference")
    assert json.loads((tmp_path / "training" / "cfg.json").read_text())["architecture"] == arch
    x = _residuals(2)
    ref = _saelens_reference(tmp_path / "inference", x)
    for save in ("training", "inference"):
        ours = load_local(tmp_path / save)
        assert ours.layer == 5
        _check(f"{arch} ({save} save)", ours, ref, x)


def test_expected_average_only_in_takes_its_scaling_factor(tmp_path: Path) -> None:
    """SAELens keeps this factor in its release table and folds it in at from_pretrained."""
    sae = _make("standard", normalize_activations="expected_average_only_in")
    _randomise(sae, seed=11)
    folder = _save(sae, tmp_path / "eaoi")
    with pytest.raises(SAEError, match="expected_average_only_in.*scaling factor"):
        load_local(folder)
    factor = 0.37
    x = _residuals(3)
    ref = _saelens_reference(
        folder, x, fold=lambda s: s.fold_activation_norm_scaling_factor(factor)
    )
    _check(
        "standard+expected_average_only_in", load_local(folder, norm_scaling_factor=factor), ref, x
    )


def test_hook_names_map_to_layer_and_site(tmp_path: Path) -> None:
    sae = _make("standard", apply_b_dec_to_input=False)
    _randomise(sae, seed=1)
    expected = {
        "blocks.7.hook_resid_post": (7, "resid_post"),
        "blocks.7.hook_resid_pre": (6, "resid_post"),  # the input of block 7 is the output of 6
        "blocks.7.hook_attn_out": (7, "attn_out"),
        "blocks.7.hook_mlp_out": (7, "mlp_out"),
        "blocks.7.attn.hook_z": (7, "attn_z"),
        "blocks.7.ln2.hook_normalized": (7, "mlp_in"),
    }
    for hook, (layer, site) in expected.items():
        loaded = load_local(_save(sae, tmp_path / hook, hook))
        assert (loaded.layer, loaded.site, loaded.hook_name) == (layer, site, hook)
    with pytest.raises(SAEError, match="reads the embeddings"):
        load_local(_save(sae, tmp_path / "embed", "blocks.0.hook_resid_pre"))
    with pytest.raises(SAEError, match="hook_q"):
        load_local(_save(sae, tmp_path / "q", "blocks.2.attn.hook_q"))


def test_unsupported_architectures_are_named(tmp_path: Path) -> None:
    sae = _make("standard", apply_b_dec_to_input=False)
    _randomise(sae, seed=1)
    folder = _save(sae, tmp_path / "x")
    cfg = json.loads((folder / "cfg.json").read_text())
    for arch in ("temporal", "matching_pursuit", "abstopk"):
        (folder / "cfg.json").write_text(json.dumps(cfg | {"architecture": arch}))
        with pytest.raises(SAEError, match=f"architecture '{arch}' is not supported"):
            load_local(folder)
    (folder / "cfg.json").write_text(
        json.dumps(cfg | {"normalize_activations": "covariance_whitening"})
    )
    with pytest.raises(SAEError, match="covariance_whitening"):
        load_local(folder)
