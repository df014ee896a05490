"""The MLX backend against independent references: transformers (torch, float32) and numpy.

Everything runs on the tiny random Gemma 2 of neuroscope.synthetic, whose sliding window (8) is far
shorter than the prompts, so a model that ignores the window fails here.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
torch = pytest.importorskip("torch")

from neuroscope.backend import SamplingParams, load_backend_class  # noqa: E402
from neuroscope.errors import ConfigError, ModelLoadError, SAEError  # noqa: E402
from neuroscope.sae import SAE, load_local  # noqa: E402
from neuroscope.synthetic import (  # noqa: E402
    TRAINING_TEXT,
    build_random_sae,
    build_tiny_gemma2,
    tiny_gemma2_config,
)
from neuroscope_mlx import MLXBackend  # noqa: E402
from neuroscope_mlx.loading import default_dtype  # noqa: E402

pytestmark = pytest.mark.mlx

WINDOW = 8  # tiny_gemma2_config's sliding_window
NUM_LAYERS = 4
TOL = 1e-4  # absolute, on residuals of magnitude ~10 and logits of ~3 (float32 throughout)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma2(tmp_path_factory.mktemp("tiny_gemma2"))


@pytest.fixture(scope="module")
def sae_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_random_sae(tmp_path_factory.mktemp("sae"), d_model=64, width=128)


@pytest.fixture(scope="module")
def prompt(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(TRAINING_TEXT)["input_ids"][:40]
    assert len(ids) >= 30 and len(ids) > 3 * WINDOW
    return ids


@pytest.fixture(scope="module")
def torch_model(folder: Path):
    from transformers import Gemma2ForCausalLM

    return Gemma2ForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def reference(torch_model, prompt: list[int]) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """transformers' residual after every block ([T, d]) and logits ([T, V]) on the prompt.

    ``hidden_states[L+1]`` is the output of block L, except the last entry, which transformers
    returns after the final norm; the last block's output is taken with a forward hook instead.
    """
    captured = {}
    last = NUM_LAYERS - 1
    handle = torch_model.model.layers[last].register_forward_hook(
        lambda module, args, out: captured.__setitem__(
            last, out[0] if isinstance(out, tuple) else out
        )
    )
    try:
        with torch.no_grad():
            out = torch_model(torch.tensor([prompt]), output_hidden_states=True)
    finally:
        handle.remove()
    residuals = {layer: out.hidden_states[layer + 1][0].numpy() for layer in range(last)}
    residuals[last] = captured[last][0].numpy()
    return residuals, out.logits[0].numpy()


@pytest.fixture(scope="module")
def backend(folder: Path) -> MLXBackend:
    return MLXBackend.load(folder, dtype="float32")  # the default on Metal is bfloat16


@pytest.fixture()
def clean(backend: MLXBackend):
    """The shared backend with no SAEs, steering or recording before and after a test."""

    def reset() -> None:
        backend.set_saes({}, top_k=1)
        backend.record_residuals(())
        for layer in range(NUM_LAYERS):
            backend.set_steering(layer, None)

    reset()
    yield backend
    reset()


# --- numpy references ---------------------------------------------------------------------------


def encode_numpy(sae: SAE, residual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(activations, pre-activations) per neuroscope/sae.py's formula, in float64."""
    x = residual.astype(np.float64)
    if sae.input_norm == "rms":
        x = x / np.sqrt((x * x).mean(-1, keepdims=True))
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec
    pre = x @ sae.W_enc + sae.b_enc
    if sae.architecture == "jumprelu":
        return np.where(pre > sae.threshold, pre, 0.0), pre
    acts = np.maximum(pre, 0.0)
    if sae.architecture == "topk":
        kth = -np.sort(-acts, axis=-1)[:, sae.k - 1 : sae.k]
        acts = np.where(acts >= kth, acts, 0.0)
    return acts, pre


def assert_unambiguous(sae: SAE, pre: np.ndarray, margin: float = TOL) -> None:
    """Exact comparison needs no pre-activation within float error of the JumpReLU threshold."""
    if sae.architecture == "jumprelu":
        closest = float(np.abs(pre - sae.threshold).min())
        assert closest > margin, f"test data has a pre-activation {closest} from its threshold"


def assert_same_top_k(indices: np.ndarray, acts: np.ndarray, ref: np.ndarray, k: int) -> float:
    """Our top-k per position equals the reference's; returns the max abs activation difference.

    Activations must match in order. Indices must match as sets wherever activations are not tied:
    features clearly above the (k+1)-th reference value must be ours, and ours must not fall
    clearly below the k-th. Zero activations (fewer than k features fired) carry no index.
    """
    assert indices.shape == acts.shape == (ref.shape[0], k)
    assert indices.dtype == np.int64 and acts.dtype == np.float32
    order = np.argsort(-ref, axis=-1, kind="stable")
    want = np.take_along_axis(ref, order[:, :k], axis=-1)
    np.testing.assert_allclose(acts, want, rtol=1e-4, atol=TOL)
    for p in range(ref.shape[0]):
        below = ref[p, order[p, k]] if k < ref.shape[1] else 0.0
        sure = {int(i) for i in order[p, :k] if ref[p, i] > max(below, 0.0) + TOL}
        got = {int(i) for i, a in zip(indices[p], acts[p], strict=True) if a > 0}
        assert sure <= got, f"position {p}: missing features {sure - got}"
        assert all(ref[p, i] >= ref[p, order[p, k - 1]] - TOL for i in got), f"position {p}"
    return float(np.abs(acts - want).max())


# --- parity with transformers --------------------------------------------------------------------


def test_forward_matches_transformers_beyond_the_window(clean, reference, prompt) -> None:
    ref_res, ref_logits = reference
    residuals, logits = clean.forward_reference(prompt, range(NUM_LAYERS))
    for layer in range(NUM_LAYERS):
        diff = np.abs(residuals[layer] - ref_res[layer]).max()
        scale = np.abs(ref_res[layer]).max()
        print(
            f"layer {layer}: max abs diff {diff:.2e} (max |x| {scale:.1f}, relative {diff / scale:.1e})"
        )
        assert residuals[layer].dtype == np.float32 and residuals[layer].shape == (len(prompt), 64)
        assert diff < TOL, f"layer {layer}"
    diff = np.abs(logits - ref_logits).max()
    print(f"logits: max abs diff {diff:.2e} (max |logit| {np.abs(ref_logits).max():.1f})")
    assert logits.shape == (len(prompt), 512) and diff < TOL


def test_stock_mlx_lm_gemma2_differs_beyond_the_window(folder, reference, prompt) -> None:
    """mlx-lm's own gemma2 ignores the sliding window: right inside it, wrong beyond it."""
    from mlx_lm.utils import load_model

    stock, _ = load_model(folder)  # mlx-lm's default model classes
    assert type(stock).__module__ == "mlx_lm.models.gemma2"
    logits = np.array(stock(mx.array([prompt]))[0].astype(mx.float32))
    ref_logits = reference[1]
    inside = np.abs(logits[:WINDOW] - ref_logits[:WINDOW]).max()
    beyond = np.abs(logits[WINDOW:] - ref_logits[WINDOW:]).max()
    print(f"stock mlx-lm gemma2: inside the window {inside:.2e}, beyond it {beyond:.2e}")
    assert inside < TOL
    assert beyond > 100 * TOL


def test_decode_matches_full_forward(clean, reference, prompt) -> None:
    """Prefill a few tokens, then decode the rest one by one, far past the window."""
    ref_res, ref_logits = reference
    clean.record_residuals(range(NUM_LAYERS))
    start = 5
    clean.prefill(prompt[:start], SamplingParams(temperature=0.0))
    worst_logits = np.abs(clean.last_logits - ref_logits[start - 1]).max()
    worst_res = max(
        np.abs(clean.last_residuals[layer] - ref_res[layer][:start]).max()
        for layer in range(NUM_LAYERS)
    )
    for pos in range(start, len(prompt)):
        clean.decode(prompt[pos])
        worst_logits = max(worst_logits, np.abs(clean.last_logits - ref_logits[pos]).max())
        for layer in range(NUM_LAYERS):
            assert clean.last_residuals[layer].shape == (1, 64)
            worst_res = max(
                worst_res, np.abs(clean.last_residuals[layer][0] - ref_res[layer][pos]).max()
            )
    print(
        f"decode vs transformers, positions 0..{len(prompt) - 1}: logits {worst_logits:.2e}, residuals {worst_res:.2e}"
    )
    assert worst_logits < TOL and worst_res < TOL


def test_decode_past_the_cache_buffer_growth(clean, torch_model) -> None:
    """Positions past mlx-lm's KV-cache growth step (256) still match transformers."""
    ids = [2, *np.random.default_rng(5).integers(6, 512, size=279).tolist()]
    with torch.no_grad():
        ref_logits = torch_model(torch.tensor([ids])).logits[0].numpy()
    start = 250
    clean.prefill(ids[:start], SamplingParams(temperature=0.0))
    worst = np.abs(clean.last_logits - ref_logits[start - 1]).max()
    for pos in range(start, len(ids)):
        clean.decode(ids[pos])
        worst = max(worst, np.abs(clean.last_logits - ref_logits[pos]).max())
    print(f"decode at positions {start}..{len(ids) - 1}: logits max abs diff {worst:.2e}")
    assert worst < TOL


def test_long_prompt_prefill_in_chunks_matches(clean, reference, prompt, monkeypatch) -> None:
    """A prompt split over several prefill passes (each crossing window edges) is still exact."""
    monkeypatch.setattr(clean, "prefill_step", 7)
    clean.record_residuals(range(NUM_LAYERS))
    clean.prefill(prompt, SamplingParams(temperature=0.0))
    for layer in range(NUM_LAYERS):
        assert np.abs(clean.last_residuals[layer] - reference[0][layer]).max() < TOL
    assert np.abs(clean.last_logits - reference[1][-1]).max() < TOL


def test_greedy_generation_matches_transformers(clean, torch_model, prompt) -> None:
    n = 20
    context = prompt[:12]
    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor([context]),
            attention_mask=torch.ones(1, len(context), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    want = out[0, len(context) :].tolist()
    # eos_token_id=None: no stop and no EOS suppression, so both sides pick the plain argmax n times.
    clean.prefill(context, SamplingParams(temperature=0.0))
    got = []
    for _ in range(n):
        got.append(clean.sample())
        clean.decode(got[-1])
    print(f"greedy tokens: {got}")
    assert len(want) == n and got == want
    assert len(context) + n > 3 * WINDOW


# --- SAE features ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["npz", "saelens"])
def test_sae_top_k_matches_numpy(clean, reference, prompt, sae_paths, kind) -> None:
    """Two layers hooked at once; prompt features from prefill and decode equal numpy's."""
    sae = load_local(sae_paths[kind])
    layers, k = (1, 2), 8
    clean.set_saes(dict.fromkeys(layers, sae), top_k=k)
    start = 10
    steps = [clean.prefill(prompt[:start], SamplingParams(temperature=0.0))]
    steps += [clean.decode(t) for t in prompt[start:]]
    for layer in layers:
        indices = np.concatenate([s[layer].indices for s in steps])
        acts = np.concatenate([s[layer].activations for s in steps])
        ref, pre = encode_numpy(sae, reference[0][layer])
        assert_unambiguous(sae, pre)
        diff = assert_same_top_k(indices, acts, ref, k)
        print(f"{kind} SAE, layer {layer}: top-{k} activations max abs diff {diff:.2e}")


@pytest.mark.parametrize(
    "variant",
    [
        {"architecture": "relu"},
        {"architecture": "topk", "k": 5},
        {"apply_b_dec_to_input": True},
        {"input_norm": "rms"},
    ],
    ids=["relu", "topk", "b_dec", "rms"],
)
def test_sae_variants_match_numpy(clean, reference, prompt, sae_paths, variant) -> None:
    sae = replace(load_local(sae_paths["npz"]), **variant)
    k = 6
    clean.set_saes({2: sae}, top_k=k)
    features = clean.prefill(prompt, SamplingParams(temperature=0.0))[2]
    ref, pre = encode_numpy(sae, reference[0][2])
    assert_unambiguous(sae, pre)
    assert_same_top_k(features.indices, features.activations, ref, k)


def test_bad_sae_settings_are_refused(clean, sae_paths) -> None:
    sae = load_local(sae_paths["npz"])
    with pytest.raises(SAEError, match="hidden size 64"):
        clean.set_saes({1: replace(sae, W_enc=np.zeros((32, 128), np.float32))}, top_k=4)
    with pytest.raises(ConfigError, match="Layer 9"):
        clean.set_saes({9: sae}, top_k=4)
    with pytest.raises(ConfigError, match="top_k"):
        clean.set_saes({1: sae}, top_k=500)


def test_batch_feature_stats_match_numpy(clean, prompt, sae_paths) -> None:
    sae = load_local(sae_paths["npz"])
    layer, top_n = 2, 5
    clean.set_saes({layer: sae}, top_k=4)
    batch = [prompt[:30], prompt[3:12], prompt[:2], prompt[5:25]]
    stats = clean.batch_feature_stats(batch, layer, top_n=top_n)
    seq_len = 30
    # Reference: each sequence alone (no padding) through forward_reference, then numpy.
    acts, where = [], []
    for row, seq in enumerate(batch):
        ref, pre = encode_numpy(sae, clean.forward_reference(seq, [layer])[0][layer])
        assert_unambiguous(sae, pre[1:])
        acts.append(ref[1:])  # position 0 is excluded
        where += [row * seq_len + col for col in range(1, len(seq))]
    acts, where = np.concatenate(acts), np.array(where)
    fired = acts > 0
    count = fired.sum(0)
    mean = acts.sum(0) / np.maximum(count, 1)
    assert stats.tokens == len(where) == sum(len(s) - 1 for s in batch)
    assert stats.seq_len == seq_len
    np.testing.assert_array_equal(stats.fire_count, count)
    assert stats.act_sum.dtype == np.float64 and stats.act_m2.dtype == np.float64
    np.testing.assert_allclose(stats.act_sum, acts.sum(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        stats.act_m2, (((acts - mean) ** 2) * fired).sum(0), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(stats.act_max, acts.max(0), rtol=1e-5, atol=1e-5)
    assert stats.top_values.shape == stats.top_tokens.shape == (128, top_n)
    # Top tokens: the values are the reference's largest, and each names a token (row * seq_len +
    # col) whose activation is that value; ties (the shared prefixes repeat tokens) may pick either.
    row_of = {flat: i for i, flat in enumerate(where)}
    for feature in range(128):
        want = -np.sort(-acts[:, feature])[:top_n]
        np.testing.assert_allclose(stats.top_values[feature], want, rtol=1e-5, atol=1e-5)
        tokens = stats.top_tokens[feature]
        assert ((tokens == -1) == (want == 0)).all()
        named = [int(t) for t in tokens if t != -1]
        assert len(set(named)) == len(named)
        for token, value in zip(named, stats.top_values[feature][: len(named)], strict=True):
            assert abs(acts[row_of[token], feature] - value) < 1e-5
    # More slots than real tokens: padded with -1 / 0.
    small = clean.batch_feature_stats([prompt[:3]], layer, top_n=4)
    assert (small.top_tokens[:, 2:] == -1).all() and (small.top_values[:, 2:] == 0).all()
    with pytest.raises(ConfigError, match="No SAE"):
        clean.batch_feature_stats(batch, 1)


# --- steering, sampling --------------------------------------------------------------------------


def test_steering_shifts_the_residual_by_the_vector(clean, prompt, sae_paths) -> None:
    layer = 1
    before, logits_before = clean.forward_reference(prompt, [layer, layer + 1])
    v = np.random.default_rng(1).standard_normal(64).astype(np.float32) * 3
    clean.set_steering(layer, v)
    after, logits_after = clean.forward_reference(prompt, [layer, layer + 1])
    shift = after[layer] - before[layer]
    print(f"steering: residual shift - v, max abs {np.abs(shift - v).max():.2e}")
    np.testing.assert_allclose(shift, np.broadcast_to(v, shift.shape), atol=1e-5)
    assert np.abs(after[layer + 1] - before[layer + 1]).max() > 0.1  # later blocks see it
    assert np.abs(logits_after - logits_before).max() > 1e-3
    # The SAE at the steered layer reads the steered residual.
    sae = load_local(sae_paths["npz"])
    clean.set_saes({layer: sae}, top_k=5)
    feats = clean.prefill(prompt, SamplingParams(temperature=0.0))[layer]
    assert_same_top_k(feats.indices, feats.activations, encode_numpy(sae, after[layer])[0], 5)
    clean.set_steering(layer, None)
    restored, _ = clean.forward_reference(prompt, [layer])
    np.testing.assert_array_equal(restored[layer], before[layer])
    with pytest.raises(ConfigError, match="64 finite numbers"):
        clean.set_steering(layer, np.ones(3))


def _sample_many(
    backend: MLXBackend, context: list[int], params: SamplingParams, n: int = 12
) -> list[int]:
    backend.prefill(context, params)
    out = []
    for _ in range(n):
        out.append(backend.sample())
        backend.decode(out[-1])
    return out


def test_sampling_is_reproducible_and_respects_top_k_and_top_p(clean, prompt) -> None:
    context = prompt[:10]
    hot = SamplingParams(temperature=1.5, seed=7)
    first = _sample_many(clean, context, hot)
    assert _sample_many(clean, context, hot) == first
    assert _sample_many(clean, context, replace(hot, seed=8)) != first
    greedy = _sample_many(clean, context, SamplingParams(temperature=0.0))
    assert _sample_many(clean, context, replace(hot, top_k=1)) == greedy
    assert _sample_many(clean, context, replace(hot, top_p=1e-6)) == greedy
    # top_k=3: every draw is one of the 3 most likely tokens of its step.
    clean.prefill(context, replace(hot, top_k=3, seed=3))
    for _ in range(30):
        top3 = set(np.argsort(-clean.last_logits)[:3].tolist())
        token = clean.sample()
        assert token in top3
        clean.decode(token)
    # top_p: draws stay within the smallest set of tokens reaching the mass.
    clean.prefill(context, replace(hot, top_p=0.5, seed=4))
    for _ in range(30):
        z = clean.last_logits / hot.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p)
        nucleus = set(order[: int(np.searchsorted(np.cumsum(p[order]), 0.5)) + 1].tolist())
        token = clean.sample()
        assert token in nucleus
        clean.decode(token)


def test_decode_and_sample_need_a_prefill(folder) -> None:
    fresh = MLXBackend.load(folder)
    with pytest.raises(RuntimeError, match="prefill"):
        fresh.decode(5)
    with pytest.raises(RuntimeError, match="prefill"):
        fresh.sample()
    with pytest.raises(ConfigError, match="vocabulary"):
        fresh.prefill([2, 100000], SamplingParams())
    with pytest.raises(ConfigError, match="at least one"):
        fresh.prefill([], SamplingParams())


def test_runs_from_a_worker_thread(clean, prompt, reference) -> None:
    """The engine drives the backend from its own thread."""
    result = {}

    def work() -> None:
        clean.prefill(prompt, SamplingParams(temperature=0.0))
        result["logits"] = clean.last_logits

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert np.abs(result["logits"] - reference[1][-1]).max() < TOL


# --- loading ----------------------------------------------------------------------------------------


def test_entry_point_and_info(backend) -> None:
    assert load_backend_class("mlx") is MLXBackend
    assert MLXBackend.is_available()
    assert backend.device == ("metal" if mx.default_device() == mx.gpu else "cpu")
    assert default_dtype() == ("bfloat16" if backend.device == "metal" else "float32")
    info = backend.info
    assert (info.model_type, info.num_layers, info.hidden_size, info.vocab_size) == (
        "gemma2",
        4,
        64,
        512,
    )
    assert info.max_position_embeddings == 256


def test_published_gemma2_config_gets_transformers_layer_types() -> None:
    """Gemma 2 2B's config.json predates layer_types: even layers must come out sliding."""
    from transformers import Gemma2Config

    from neuroscope_mlx.models.gemma2 import ModelArgs

    published = {  # google/gemma-2-2b-it's config.json, the fields that matter here
        "model_type": "gemma2",
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "vocab_size": 256000,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "rope_theta": 10000.0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "cache_implementation": "hybrid",
    }
    ours, theirs = ModelArgs.from_dict(published), Gemma2Config(**published)
    assert ours.layer_types == theirs.layer_types
    assert ours.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert (ours.rope_theta, ours.sliding_window) == (10000.0, 4096)


def test_load_errors_say_what_to_do(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        MLXBackend.load(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps(tiny_gemma2_config()))
    with pytest.raises(ModelLoadError, match="safetensors"):
        MLXBackend.load(tmp_path)
    with pytest.raises(ConfigError, match="dtype"):
        MLXBackend.load(tmp_path, dtype="float64", dummy_weights=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_close(folder, reference, prompt, dtype) -> None:
    half = MLXBackend.load(folder, dtype=dtype)
    residuals, logits = half.forward_reference(prompt, [NUM_LAYERS - 1])
    diff = np.abs(logits - reference[1]).max()
    print(f"{dtype}: logits max abs diff {diff:.2e}")
    assert half.model.model.embed_tokens.weight.dtype.size == 2
    assert diff < 0.25


TINY_CONFIGS = {
    "gemma2": tiny_gemma2_config(),
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 300,
        "tie_word_embeddings": True,
    },
    "qwen3": {
        "model_type": "qwen3",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": 300,
        "max_position_embeddings": 512,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    "gemma3_text": {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 300,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
    },
}


@pytest.mark.parametrize("model_type", list(TINY_CONFIGS))
def test_dummy_weights_build_run_and_hook_any_decoder(tmp_path, model_type) -> None:
    """Random weights from config.json alone; the hook works on mlx-lm's own models too."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIGS[model_type]))
    model = MLXBackend.load(tmp_path, dtype="float32", dummy_weights=True)
    assert model.info.model_type == model_type
    ids = list(np.random.default_rng(0).integers(3, 300, size=20))
    residuals, logits = model.forward_reference(ids, [0, 1])
    assert np.isfinite(logits).all()
    spread = residuals[1].std(axis=-1)
    assert (spread > 0.05).all() and (spread < 100).all(), spread  # neither vanishing nor exploding
    assert logits.std() > 1e-2
    # Deterministic: a second build gives the same model.
    again = MLXBackend.load(tmp_path, dtype="float32", dummy_weights=True)
    np.testing.assert_array_equal(again.forward_reference(ids, [0])[1], logits)
    # Cached decode equals the full forward; steering shifts the hooked residual.
    model.record_residuals([1])
    model.prefill(ids[:4], SamplingParams(temperature=0.0))
    for pos in range(4, len(ids)):
        model.decode(ids[pos])
        assert np.abs(model.last_logits - logits[pos]).max() < TOL
        assert np.abs(model.last_residuals[1][0] - residuals[1][pos]).max() < TOL
    v = np.full(model.info.hidden_size, 0.5, np.float32)
    model.set_steering(1, v)
    steered = model.forward_reference(ids, [1])[0][1]
    np.testing.assert_allclose(steered - residuals[1], np.broadcast_to(v, steered.shape), atol=1e-5)


def test_decode_speed_with_and_without_sae_hooks(folder, sae_paths, prompt) -> None:
    """Measured, not asserted: the cost of SAE encode + top-k per decoded token."""
    model = MLXBackend.load(folder)
    sae = load_local(sae_paths["npz"])
    n = 100
    rates = {}
    model.prefill(prompt[:8], SamplingParams(temperature=0.0))  # warm-up
    for _ in range(10):
        model.decode(model.sample())
    for label, saes in (("no SAE", {}), ("SAE at 2 layers", {1: sae, 2: sae})):
        model.set_saes(saes, top_k=10)
        model.prefill(prompt[:8], SamplingParams(temperature=0.0))
        token = model.sample()
        start = time.perf_counter()
        for _ in range(n):
            model.decode(token)
            token = model.sample()
        rates[label] = n / (time.perf_counter() - start)
    print(
        "decode tokens/s on the tiny model: " + ", ".join(f"{k}: {v:.0f}" for k, v in rates.items())
    )


# --- pipelining --------------------------------------------------------------------------------


def _run_steps(
    backend: MLXBackend, prompt: list[int], sampling: SamplingParams, feed: list[int] | None
):
    """Prefill, then 12 decode steps: on the sampled token (feed None) or on the given tokens."""
    out = [backend.prefill(prompt[:10], sampling)]
    tokens = []
    for i in range(12):
        token = backend.sample()
        tokens.append(token)
        out.append(backend.decode(token if feed is None else feed[i]))
    return tokens, out, backend.last_logits.copy(), dict(backend.last_residuals)


@pytest.mark.parametrize(
    "sampling", [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, seed=11)]
)
@pytest.mark.parametrize("feed", ["sampled", "other tokens"])
def test_pipelined_decode_equals_one_step_at_a_time(
    clean, prompt, sae_paths, sampling, feed
) -> None:
    """With step n+1 scheduled before the host reads step n (mlx-lm's pipelining), every token,
    feature, residual and logit is the same as one step at a time; decoding a token other than
    the one drawn ahead (a stop, a masked redraw, a forced token) trims the speculative step away."""
    clean.set_saes({2: load_local(sae_paths["npz"])}, top_k=8)
    clean.record_residuals([1])
    tokens_fed = None if feed == "sampled" else prompt[10:22]
    runs = {}
    for pipeline in (True, False):
        clean.pipeline = pipeline
        try:
            runs[pipeline] = _run_steps(clean, prompt, sampling, tokens_fed)
        finally:
            clean.pipeline = True
    (tok_a, feats_a, logits_a, res_a), (tok_b, feats_b, logits_b, res_b) = runs[True], runs[False]
    assert tok_a == tok_b
    for a, b in zip(feats_a, feats_b, strict=True):
        np.testing.assert_array_equal(a[2].indices, b[2].indices)
        np.testing.assert_array_equal(a[2].activations, b[2].activations)
    np.testing.assert_array_equal(logits_a, logits_b)
    np.testing.assert_array_equal(res_a[1], res_b[1])
    if feed == "other tokens":  # the cache held the fed tokens only: features equal a fresh prefill
        fresh = clean.prefill(prompt[:22], SamplingParams(temperature=0.0))
        last = np.concatenate([f[2].activations for f in feats_a])
        np.testing.assert_allclose(last, fresh[2].activations, atol=1e-5)


def test_a_step_is_scheduled_ahead_and_dropped_when_settings_change(
    clean, prompt, sae_paths
) -> None:
    clean.set_saes({2: load_local(sae_paths["npz"])}, top_k=8)
    clean.prefill(prompt[:10], SamplingParams(temperature=0.0))
    seq = clean._sequence("test")
    assert seq.ahead is not None and seq.cache[0].offset == 11  # 10 + the step ahead
    clean.set_steering(1, np.zeros(clean.info.hidden_size, np.float32))
    assert seq.ahead is None and seq.cache[0].offset == 10
