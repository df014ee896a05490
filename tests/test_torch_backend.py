"""The torch backend against transformers (model) and numpy (SAE)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LONG_PROMPT, TINY_LAYER, requires_torch
from reference import (
    load_npz,
    numpy_sae_encode,
    numpy_top_k,
    transformers_forward,
    transformers_greedy,
)

from neuroscope.backend import SamplingParams
from neuroscope.chat import ChatTokenizer
from neuroscope.sae import load_local

pytestmark = requires_torch


@pytest.fixture(scope="module")
def backend(tiny_model, tiny_sae):
    from neuroscope_torch import TorchBackend

    b = TorchBackend.load(tiny_model, dtype="float32")
    b.set_saes({TINY_LAYER: load_local(tiny_sae["npz"])}, top_k=8)
    return b


@pytest.fixture(scope="module")
def prompt_ids(tiny_model):
    ids = ChatTokenizer(tiny_model).encode_text(LONG_PROMPT)
    assert len(ids) > 3 * 8, "the prompt must be longer than the sliding window"
    return ids


@pytest.fixture(scope="module")
def reference(tiny_model, prompt_ids):
    return transformers_forward(tiny_model, prompt_ids)


def test_residuals_and_logits_match_transformers(backend, prompt_ids, reference):
    hidden, logits = reference
    layers = list(range(backend.info.num_layers))
    residuals, our_logits = backend.forward_reference(prompt_ids, layers)
    for layer in layers[:-1]:
        np.testing.assert_allclose(residuals[layer], hidden[layer + 1], atol=1e-5, rtol=0)
    # transformers applies the final norm to its last hidden state; the hook sits before it
    import torch

    final_norm = backend.model.model.norm
    normed = final_norm(torch.from_numpy(residuals[layers[-1]])).detach().numpy()
    np.testing.assert_allclose(normed, hidden[-1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(our_logits, logits, atol=1e-4, rtol=0)


def test_cached_decode_matches_full_forward(backend, prompt_ids, reference, tiny_sae):
    """Prefill part of the prompt, decode the rest token by token (well past the window)."""
    hidden, _ = reference
    params = load_npz(tiny_sae["npz"])
    split = 5
    steps = [backend.prefill(prompt_ids[:split], SamplingParams(temperature=0))[TINY_LAYER]]
    steps += [backend.decode(t)[TINY_LAYER] for t in prompt_ids[split:]]
    indices = np.concatenate([s.indices for s in steps])
    activations = np.concatenate([s.activations for s in steps])
    want_idx, want_act = numpy_top_k(numpy_sae_encode(hidden[TINY_LAYER + 1], params), 8)
    np.testing.assert_allclose(activations, want_act, atol=2e-4)
    assert (indices == want_idx).mean() > 0.99  # ties at the cut-off aside


@pytest.mark.parametrize("fmt", ["npz", "saelens"])
def test_sae_top_k_equals_numpy_formula(backend, prompt_ids, reference, tiny_sae, fmt):
    hidden, _ = reference
    backend.set_saes({TINY_LAYER: load_local(tiny_sae[fmt])}, top_k=10)
    features = backend.prefill(prompt_ids, SamplingParams(temperature=0))[TINY_LAYER]
    acts = numpy_sae_encode(hidden[TINY_LAYER + 1], load_npz(tiny_sae["npz"]))
    want_idx, want_act = numpy_top_k(acts, 10)
    np.testing.assert_allclose(features.activations, want_act, atol=1e-4)
    for got, want, row in zip(features.indices, want_idx, acts, strict=True):
        assert set(got[row[got] > 0]) == set(want[row[want] > 0])
    assert features.indices.dtype == np.int64 and features.activations.dtype == np.float32


def test_greedy_tokens_equal_transformers_generate(backend, tiny_model):
    tokenizer = ChatTokenizer(tiny_model)
    ids = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    want = transformers_greedy(tiny_model, ids, 20)
    backend.prefill(ids, SamplingParams(temperature=0))
    got = []
    for _ in range(20):
        got.append(backend.sample())
        backend.decode(got[-1])
    assert got == want
    assert len(set(got)) > 1, "the tiny model should not just repeat one token"


def test_sampling_is_reproducible_and_respects_top_k(backend, prompt_ids):
    def draw(params, n=12):
        backend.prefill(prompt_ids[:10], params)
        out = []
        for _ in range(n):
            out.append(backend.sample())
            backend.decode(out[-1])
        return out

    hot = SamplingParams(temperature=1.5, seed=7)
    assert draw(hot) == draw(hot)
    assert draw(hot) != draw(SamplingParams(temperature=1.5, seed=8))
    assert draw(SamplingParams(temperature=1.0, top_k=1, seed=3)) == draw(
        SamplingParams(temperature=0)
    )
    assert draw(SamplingParams(temperature=1.0, top_p=1e-6, seed=3)) == draw(
        SamplingParams(temperature=0)
    )


def test_batch_feature_stats_equal_numpy(backend, tiny_model, tiny_sae):
    tokenizer = ChatTokenizer(tiny_model)
    texts = [
        "The capital of France is Paris.",
        "Hello! How are you today? I am fine.",
        "Numbers: 1 2 3",
    ]
    batch = [tokenizer.encode_text(t) for t in texts]
    backend.set_saes({TINY_LAYER: load_local(tiny_sae["npz"])}, top_k=8)
    stats = backend.batch_feature_stats(batch, TINY_LAYER, top_n=4)
    params = load_npz(tiny_sae["npz"])
    acts = np.concatenate(
        [
            numpy_sae_encode(transformers_forward(tiny_model, seq)[0][TINY_LAYER + 1][1:], params)
            for seq in batch
        ]
    )
    fired = acts > 0
    assert stats.tokens == sum(len(s) - 1 for s in batch)
    np.testing.assert_array_equal(stats.fire_count, fired.sum(0))
    np.testing.assert_allclose(stats.act_sum, (acts * fired).sum(0), rtol=1e-5)
    mean = np.where(fired.sum(0) > 0, (acts * fired).sum(0) / np.maximum(fired.sum(0), 1), 0)
    np.testing.assert_allclose(
        stats.act_m2, (((acts - mean) ** 2) * fired).sum(0), rtol=1e-4, atol=1e-3
    )
    np.testing.assert_allclose(stats.act_max, acts.max(0), rtol=1e-5)
    assert stats.top_values.shape == (acts.shape[1], 4)
    np.testing.assert_allclose(stats.top_values[:, 0], acts.max(0), rtol=1e-5)
    # the flat index of each feature's top token points at a real (non-pad, non-BOS) position
    best = stats.top_tokens[:, 0][stats.top_values[:, 0] > 0]
    rows, cols = np.divmod(best, stats.seq_len)
    assert all(1 <= c < len(batch[r]) for r, c in zip(rows, cols, strict=True))


def test_steering_adds_the_vector_at_its_layer(backend, prompt_ids):
    base, _ = backend.forward_reference(prompt_ids, [TINY_LAYER])
    vector = np.random.default_rng(0).standard_normal(backend.info.hidden_size).astype(np.float32)
    backend.set_steering(TINY_LAYER, vector)
    try:
        steered, _ = backend.forward_reference(prompt_ids, [TINY_LAYER])
    finally:
        backend.set_steering(TINY_LAYER, None)
    np.testing.assert_allclose(
        steered[TINY_LAYER] - base[TINY_LAYER],
        np.broadcast_to(vector, base[TINY_LAYER].shape),
        atol=1e-5,
    )
    again, _ = backend.forward_reference(prompt_ids, [TINY_LAYER])
    np.testing.assert_array_equal(again[TINY_LAYER], base[TINY_LAYER])


def test_dummy_weights_build_from_config(tmp_path, tiny_model):
    from neuroscope.loading import resolve_model
    from neuroscope_torch import TorchBackend

    resolved = resolve_model(str(tiny_model / "config.json"), load_format="dummy")
    assert not list(resolved.path.glob("*.safetensors"))
    b = TorchBackend.load(resolved.path, dummy_weights=True)
    residuals, logits = b.forward_reference([2, 10, 11, 12], [1])
    assert logits.shape == (4, 512) and np.isfinite(logits).all() and residuals[1].std() > 0


def test_bad_settings_and_calls_out_of_order_are_refused(tiny_model, tiny_sae) -> None:
    """The same checks as the MLX backend, each with a message that says what to do."""
    from neuroscope.errors import ConfigError
    from neuroscope_torch import TorchBackend

    b = TorchBackend.load(tiny_model, dtype="float32")
    with pytest.raises(RuntimeError, match=r"decode\(\) before prefill\(\)"):
        b.decode(5)
    with pytest.raises(RuntimeError, match=r"sample\(\) before prefill\(\)"):
        b.sample()
    sae = load_local(tiny_sae["npz"])
    with pytest.raises(ConfigError, match="top_k must be between 1 and the SAE width 128"):
        b.set_saes({TINY_LAYER: sae}, top_k=129)
    with pytest.raises(ConfigError, match="Layer 4 does not exist"):
        b.set_saes({4: sae}, top_k=8)
    hidden = b.info.hidden_size
    with pytest.raises(ConfigError, match="Layer -1 does not exist"):
        b.set_steering(-1, np.zeros(hidden, np.float32))
    with pytest.raises(ConfigError, match=f"{hidden} finite numbers"):
        b.set_steering(TINY_LAYER, np.full(hidden, np.nan, np.float32))
    with pytest.raises(ConfigError, match=f"{hidden} finite numbers"):
        b.set_steering(TINY_LAYER, np.zeros(hidden + 1, np.float32))
    with pytest.raises(ConfigError, match="outside this model's vocabulary"):
        b.prefill([2, 512], SamplingParams(temperature=0))
    with pytest.raises(ConfigError, match="at least one token"):
        b.prefill([], SamplingParams(temperature=0))
    # nothing half-set: the refused calls left the backend usable
    b.set_saes({TINY_LAYER: sae}, top_k=128)
    assert b.prefill([2, 10, 11], SamplingParams(temperature=0))[TINY_LAYER].indices.shape == (
        3,
        128,
    )


def test_a_generation_uses_no_deprecated_transformers_api(backend, tiny_model) -> None:
    """Fails on any FutureWarning/DeprecationWarning that transformers raises while Neuroscope
    drives it (the cache argument was renamed, its old name removed in 5.40), or on its logged
    deprecation notices, so the next removal is caught before it breaks users."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from neuroscope.generation import RecordBuilder, generate

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    hf_logger = hf_logging.get_logger("transformers")
    hf_logger.addHandler(handler)
    tokenizer = ChatTokenizer(tiny_model)
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hello there"}])
    builder = RecordBuilder(sae_ids={TINY_LAYER: "tiny"}, top_k=8)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            events = list(
                generate(
                    backend,
                    tokenizer,
                    builder,
                    ids,
                    request_id="r",
                    max_tokens=4,
                    sampling=SamplingParams(temperature=0),
                )  # fmt: skip
            )
    finally:
        hf_logger.removeHandler(handler)
    assert len(events) > 4
    ours = [
        w for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning))
        and "transformers" in (w.filename + str(w.message))
    ]  # fmt: skip
    assert not ours, [str(w.message) for w in ours]
    notices = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert not notices, notices


def test_dummy_weights_are_built_in_one_pass_with_neutral_norms(tiny_model) -> None:
    """Fast dummy weights: N(0, 1/fan_in) matrices, biases 0, norms as transformers initialises
    them (Gemma's ``1 + weight`` norms: zeros), tied embeddings filled once, and reproducible."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from neuroscope_torch.dummy import build_dummy

    config = AutoConfig.from_pretrained(tiny_model)
    model = build_dummy(config, torch.float32, "eager", torch.device("cpu"))
    again = build_dummy(config, torch.float32, "eager", torch.device("cpu"))
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # transformers' init
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(again.named_parameters())[name]), name
        if p.ndim >= 2:
            assert abs(float(p.detach().std()) * p.shape[-1] ** 0.5 - 1) < 0.1, name
        else:
            torch.testing.assert_close(p, ref_params[name], msg=name)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(dict(model.named_buffers())[name], buffer, msg=name)


def test_large_cpu_tensors_are_filled_from_one_random_block() -> None:
    import torch

    from neuroscope_torch.dummy import CPU_BLOCK, normal_

    p = torch.empty(3 * CPU_BLOCK // 2304 + 7, 2304)  # more than the block, not a multiple of it
    normal_(p, 0.05, torch.Generator().manual_seed(0))
    flat = p.view(-1)
    assert abs(float(p.std()) - 0.05) < 1e-3 and abs(float(p.mean())) < 1e-3
    assert torch.equal(flat[:CPU_BLOCK], flat[CPU_BLOCK : 2 * CPU_BLOCK])  # tiled
    assert torch.equal(flat[2 * CPU_BLOCK :], flat[: flat.numel() - 2 * CPU_BLOCK])
    assert len({tuple(row[:4].tolist()) for row in p}) == p.shape[0]  # no two rows alike
