"""The peers in benchmarks/ compute what Neuroscope computes, or their timings compare nothing.

On the tiny model (real, saved weights): the SAELens SAE encodes like Neuroscope's, the
TransformerLens copy of the model gives the transformers logits, and every greedy contender
generates Neuroscope's tokens. No speed is asserted.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import TINY_LAYER, has_module, requires_mlx, requires_torch

TOKENS = 6

requires_lens = pytest.mark.skipif(
    not (has_module("sae_lens") and has_module("transformer_lens")),
    reason="needs the [bench] extra (sae-lens, transformer-lens)",
)


@pytest.fixture(scope="module")
def torch_session(tiny_model, tiny_sae):
    from neuroscope.session import Session

    with Session(
        model=str(tiny_model), sae_local_path=str(tiny_sae["npz"]), layer=TINY_LAYER,
        backend="torch",
    ) as session:  # fmt: skip
        yield session


@requires_torch
@requires_lens
def test_saelens_sae_encodes_like_neuroscope(torch_session) -> None:
    import torch

    from benchmarks.peers_torch import saelens_sae
    from neuroscope_torch.sae import TorchSAE

    sae = torch_session.saes[TINY_LAYER]
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((7, sae.d_model)) * 3).float()
    ours = TorchSAE(sae, torch.device("cpu")).encode(x)
    theirs = saelens_sae(sae).encode(x)
    assert (ours > 0).sum() > 0  # the comparison is not between two all-zero outputs
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@requires_torch
@requires_lens
def test_transformers_peers_generate_neuroscopes_tokens(torch_session) -> None:
    from benchmarks.common import neuroscope_contenders
    from benchmarks.peers_torch import saelens_sae, transformers_contenders

    ids = torch_session.encode("What is the capital of France?")
    ours, plain = neuroscope_contenders(torch_session, ids)
    reference = ours.run(TOKENS)
    assert reference.feature_positions == len(ids) - 1 + TOKENS  # BOS is not reported
    assert plain.run(TOKENS).tokens == reference.tokens
    sae = saelens_sae(torch_session.saes[TINY_LAYER])
    # Were the model's EOS honoured, generate would stop after the second token: it must not.
    config = torch_session.backend.model.generation_config
    saved_eos, config.eos_token_id = config.eos_token_id, reference.tokens[1]
    try:
        runs = {
            peer.name: peer.run(TOKENS)
            for peer in transformers_contenders(torch_session, ids, sae, TINY_LAYER, top_k=10)
        }
    finally:
        config.eos_token_id = saved_eos
    assert set(runs) == {"hf-generate", "hf-hidden-states", "hf-forward-loop"}
    for name, run in runs.items():
        assert run.tokens == reference.tokens, name
        assert 0 < run.ttft_s < run.total_s and len(run.step_s) == TOKENS - 1
        if name != "hf-generate":  # the others encode the prompt and all but the last token
            assert run.feature_positions == len(ids) + TOKENS - 1, name


@requires_torch
@requires_lens
def test_transformer_lens_copy_matches_transformers(tiny_model, tiny_sae) -> None:
    from benchmarks.common import neuroscope_contenders
    from benchmarks.peers_torch import (
        last_logits,
        saelens_sae,
        take_over_as_hooked_transformer,
        tl_contender,
        tl_last_logits,
    )
    from neuroscope.session import Session

    session = Session(
        model=str(tiny_model), sae_local_path=str(tiny_sae["npz"]), layer=TINY_LAYER,
        backend="torch",
    )  # fmt: skip
    # Longer than the tiny model's sliding window (8), so local attention is exercised.
    ids = session.encode("The capital of France is Paris. Paris is a city on the Seine.")
    assert len(ids) > 2 * session.backend.config.sliding_window
    reference_tokens = neuroscope_contenders(session, ids)[0].run(TOKENS).tokens
    reference = last_logits(session.backend.model, ids)
    sae = saelens_sae(session.saes[TINY_LAYER])
    model = session.backend.model
    session.close()
    tl = take_over_as_hooked_transformer(model)
    assert not list(model.parameters())  # the weights moved, they were not duplicated
    np.testing.assert_allclose(tl_last_logits(tl, ids), reference, rtol=1e-4, atol=1e-4)
    run = tl_contender(tl, ids, sae, TINY_LAYER, top_k=10).run(TOKENS)
    assert run.tokens == reference_tokens
    assert run.feature_positions == len(ids) + TOKENS - 1


@requires_mlx
def test_mlx_lm_peer_generates_neuroscopes_tokens(tiny_sae, tmp_path) -> None:
    from benchmarks.common import neuroscope_contenders
    from benchmarks.peers_mlx import mlx_lm_contender
    from neuroscope.session import Session
    from neuroscope.synthetic import build_tiny_gemma2

    # mlx-lm's Gemma 2 attends globally; with a window longer than the run the two are the same
    # model, as gemma-2-2b's 4096-token window is at benchmark lengths.
    model = build_tiny_gemma2(tmp_path / "wide-window", sliding_window=256)
    with Session(
        model=str(model), sae_local_path=str(tiny_sae["npz"]), layer=TINY_LAYER, backend="mlx"
    ) as session:
        ids = session.encode("What is the capital of France?")
        reference = neuroscope_contenders(session, ids)[0].run(TOKENS)
        run = mlx_lm_contender(session, ids).run(TOKENS)
        assert run.tokens == reference.tokens
