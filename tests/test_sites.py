"""SAEs that read inside a block (attention output, the heads' outputs, the MLP's input and output,
the residual between attention and MLP) get exactly transformers' tensors there, on both backends.

The reference names transformers' modules the way Gemma Scope 2 and SAELens' ``hf_hook_name`` do
(``post_attention_layernorm.output`` is what Gemma's attention adds to the residual, ...).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import requires_mlx, requires_torch
from reference import numpy_sae_encode, numpy_top_k

from neuroscope.backend import SamplingParams, load_backend_class
from neuroscope.sae import SAE
from neuroscope.synthetic import build_tiny_gemma3, random_sae_arrays

pytestmark = requires_torch
BACKENDS = [
    pytest.param("torch", marks=pytest.mark.torch),
    pytest.param("mlx", marks=[requires_mlx, pytest.mark.mlx]),
]
LAYER, K = 2, 6
# site -> (transformers module under model.layers.L, "input" or "output")
HF = {
    "attn_out": ("post_attention_layernorm", "output"),
    "attn_z": ("self_attn.o_proj", "input"),
    "mlp_in": ("pre_feedforward_layernorm", "output"),
    "mlp_out": ("post_feedforward_layernorm", "output"),
    "resid_mid": ("pre_feedforward_layernorm", "input"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Gemma 3 and transformers' tensor at every site of block LAYER, over a prompt past the
    sliding window."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = build_tiny_gemma3(tmp_path_factory.mktemp("sites-gemma3"))
    ids = [2, *np.random.default_rng(3).integers(6, 512, size=30).tolist()]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    block = model.model.layers[LAYER]
    seen: dict[str, np.ndarray] = {}
    for site, (name, kind) in HF.items():
        module = block.get_submodule(name)
        if kind == "input":
            module.register_forward_pre_hook(
                lambda _m, args, site=site: seen.__setitem__(site, args[0][0].numpy().copy())
            )
        else:
            module.register_forward_hook(
                lambda _m, _a, out, site=site: seen.__setitem__(site, out[0].numpy().copy())
            )
    with torch.inference_mode():
        model(torch.tensor([ids]))
    return {"folder": folder, "ids": ids, "tensors": seen}


def _sae(site: str, d_in: int, seed: int) -> SAE:
    a = random_sae_arrays(d_in, 96, seed)
    return SAE(
        W_enc=a["W_enc"], b_enc=a["b_enc"] * 0, b_dec=a["b_dec"], W_dec=a["W_dec"],
        threshold=a["threshold"] * 0.2, id=f"test/{site}", layer=LAYER, site=site,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("site", list(HF))
def test_sites_read_transformers_tensors(tiny, backend_name: str, site: str) -> None:
    x = tiny["tensors"][site]
    # Scale the encoder to the site's magnitude, so features fire well above their thresholds.
    sae = _sae(site, x.shape[-1], seed=len(site))
    sae = replace(sae, W_enc=sae.W_enc / float(np.abs(x).mean()))
    params = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "threshold": sae.threshold}
    want_idx, want = numpy_top_k(numpy_sae_encode(x, params), K)
    backend = load_backend_class(backend_name).load(tiny["folder"], dtype="float32")
    backend.set_saes({LAYER: sae}, top_k=K)
    got = backend.prefill(tiny["ids"], SamplingParams(temperature=0.0))[LAYER]
    assert (want > 0).sum(-1).mean() >= 3, "test data: too few features fire"
    np.testing.assert_allclose(got.activations, want, rtol=1e-4, atol=1e-4)
    for p in range(len(tiny["ids"])):
        live = want[p] > 1e-3
        assert set(got.indices[p][live].tolist()) == set(want_idx[p][live].tolist()), p
    print(
        f"\n{site} ({x.shape[-1]} wide), {backend_name}: max |diff| {np.abs(got.activations - want).max():.1e}"
    )


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_site_that_does_not_fit_is_refused(tiny, backend_name: str) -> None:
    from neuroscope.errors import ConfigError

    backend = load_backend_class(backend_name).load(tiny["folder"], dtype="float32")
    with pytest.raises(
        ConfigError, match="attn_z vectors of size 80; this model's attention heads give 64"
    ):
        backend.set_saes({LAYER: _sae("attn_z", 80, 0)}, top_k=K)


def test_records_say_the_site_and_the_stream_filters_on_it(tiny, tmp_path) -> None:
    """A Gemma Scope 2 transcoder file (it reads the MLP's input) through Session: its records
    carry site "mlp_in"; the feature stream's site= filter keeps or drops them."""
    from test_gemma_scope_2 import gemma_scope_2_params, write_params

    from neuroscope import Session
    from neuroscope.server.features import event_filter

    path = (
        tmp_path / "transcoder" / f"layer_{LAYER}_width_16k_l0_small_affine" / "params.safetensors"
    )
    write_params(path, gemma_scope_2_params(80, 64, skip=True))
    with Session(
        model=str(tiny["folder"]), sae_local_path=str(path), layer=LAYER, backend="torch", top_k=3
    ) as s:
        assert (s.saes[LAYER].site, s.saes[LAYER].output_site) == ("mlp_in", "mlp_out")
        records = s.trace("The capital of France is Paris.")
    assert records and all(r.site == "mlp_in" and r.to_dict()["site"] == "mlp_in" for r in records)
    assert all(event_filter(None, "all", None, "mlp_in")(r) for r in records)
    assert not any(event_filter(None, "all", None, "resid_post")(r) for r in records)
