"""push/pull of labels and calibration, and models/sae list/pull, through huggingface_hub's real code
against a local stand-in for the Hub's HTTP API (tests/hubsync_standin.py). Nothing leaves 127.0.0.1:
conftest sets HF_HUB_OFFLINE for the session, and these tests lift it only while the Hub's endpoint
points at the stand-in."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hubsync_standin import HubStandIn
from test_labels_sources import rule_calibration, write_labels
from typer.testing import CliRunner

from neuroscope import hubsync, trash
from neuroscope.cli import app
from neuroscope.errors import ConfigError
from neuroscope.labels import store
from neuroscope.labels.firing import firing_rates
from neuroscope.labels.sources import LabelResolver

MODEL = "google/gemma-2-2b-it"
SAE = "google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71"
LABELER = "deepseek/deepseek-v3.2"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants as hf_constants

    with HubStandIn() as server:
        # What HF_ENDPOINT would set, had it been in the environment when huggingface_hub was imported.
        monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            hf_constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            server.url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.setenv("NEUROSCOPE_CACHE", str(tmp_path / "machine-a"))
        monkeypatch.delenv(hubsync.REPO_ENV, raising=False)
        yield server


def use_cache(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    monkeypatch.setenv("NEUROSCOPE_CACHE", str(path))


def test_push_then_pull_on_another_machine(
    hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_labels(LABELER, MODEL, SAE, [
        {"index": 1, "status": "ok", "label": "draft"}, {"index": 1, "status": "ok", "label": "one"},
        {"index": 2, "status": "failed", "error": "x"}, {"index": 5, "status": "ok", "label": "five"},
    ])  # fmt: skip
    with store.Journal(folder / store.SCORES_FILE) as scores:
        scores.append({"index": 1, "status": "ok", "label": "one", "score": 0.9})
    rule_calibration(MODEL, SAE, 20, 8, [1, 2, 3, 4, 5, 6, 7, 8], 100)
    result = hubsync.push("me/labels", "first")
    repo = hub.repos[("dataset", "me/labels")]
    prefix = "labels/deepseek--deepseek-v3.2/google--gemma-2-2b-it/google--gemma-scope-2b-pt-res--layer_20--width_16k--average_l0_71"
    assert set(repo) == {"README.md", f"{prefix}/labels.jsonl", f"{prefix}/scores.jsonl", f"{prefix}/meta.json",
                         "calibration/google--gemma-2-2b-it/google--gemma-scope-2b-pt-res--layer_20--width_16k--average_l0_71/layer_20.safetensors"}  # fmt: skip
    assert len(result.files) == 4 and hub.commits[-1]["summary"] == "first"
    pushed = [json.loads(line) for line in repo[f"{prefix}/labels.jsonl"].decode().splitlines()]
    assert [r["index"] for r in pushed] == [1, 2, 5] and pushed[0]["label"] == "one"  # compacted
    assert json.loads(repo[f"{prefix}/meta.json"]) == {
        "labeler": LABELER,
        "model": MODEL,
        "sae": SAE,
    }
    assert "neuroscope pull --repo me/labels" in repo["README.md"].decode()

    use_cache(monkeypatch, tmp_path / "machine-b")
    pulled = hubsync.pull("me/labels")
    assert len(pulled.added) == 4 and not pulled.merged and not pulled.kept_local
    resolver = LabelResolver(MODEL, {20: SAE})  # what serve uses
    assert (
        resolver.label(20, 1) == ("one", f"autointerp:{LABELER}")
        and resolver.label(20, 5)[0] == "five"
    )
    rates = firing_rates(MODEL, SAE, 20)
    assert (
        rates is not None and rates.source == "calibration" and rates.rate(3) == pytest.approx(0.04)
    )

    hubsync.push("me/labels", "second")  # the card is written once, not over the owner's edits
    assert hub.commits[-1]["files"] == hub.commits[0]["files"]
    assert (
        sum(1 for method, path in hub.log if method == "POST" and path == "/api/validate-yaml") == 1
    )


def test_pull_merges_labels_and_keeps_differing_files_unless_told(
    hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_labels(
        LABELER,
        MODEL,
        SAE,
        [{"index": i, "status": "ok", "label": f"theirs {i}"} for i in (1, 2, 3)],
    )
    rule_calibration(MODEL, SAE, 20, 4, [1, 1, 1, 1], 10)
    hubsync.push("me/labels")

    use_cache(monkeypatch, tmp_path / "machine-b")
    folder = write_labels(
        LABELER,
        MODEL,
        SAE,
        [
            {"index": 1, "status": "ok", "label": "mine 1"},
            {"index": 2, "status": "failed", "error": "x"},
        ],
    )
    rule_calibration(MODEL, SAE, 20, 4, [2, 2, 2, 2], 10)
    result = hubsync.pull("me/labels")
    labels = store.ok_labels(store.Journal(folder / store.LABELS_FILE).load())
    assert labels == {1: "mine 1", 2: "theirs 2", 3: "theirs 3"}
    assert list(result.merged.values()) == [2] and len(result.kept_local) == 1
    assert firing_rates(MODEL, SAE, 20).rate(0) == pytest.approx(0.2)  # type: ignore[union-attr]

    result = hubsync.pull("me/labels", overwrite=True)
    assert store.ok_labels(store.Journal(folder / store.LABELS_FILE).load())[1] == "theirs 1"
    assert len(result.replaced) == 1 and firing_rates(MODEL, SAE, 20).rate(0) == pytest.approx(0.1)  # type: ignore[union-attr]
    entry = trash.entries()[0]  # the local stats went to the trash, not away
    assert entry.targets == ["pull"] and entry.paths == result.replaced


def test_push_and_pull_errors_say_what_to_do(
    hub: HubStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="Nothing to push"):
        hubsync.push("me/labels")
    with pytest.raises(hubsync.HubSyncError, match="No dataset repo me/missing"):
        hubsync.pull("me/missing")
    assert hubsync.default_repo() == "me/neuroscope-labels"  # from whoami
    monkeypatch.setenv(hubsync.REPO_ENV, "team/shared")
    assert hubsync.default_repo() == "team/shared"


def test_push_and_pull_commands(
    hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_labels(LABELER, MODEL, SAE, [{"index": 7, "status": "ok", "label": "seven"}])
    runner = CliRunner()
    pushed = runner.invoke(app, ["push", "--message", "labels v1"])
    assert pushed.exit_code == 0, pushed.output
    assert "Pushed 2 files to me/neuroscope-labels" in pushed.output
    use_cache(monkeypatch, tmp_path / "machine-b")
    pulled = runner.invoke(app, ["pull", "--repo", "me/neuroscope-labels"])
    assert pulled.exit_code == 0 and "2 new files" in pulled.output
    assert LabelResolver(MODEL, {20: SAE}).label(20, 7)[0] == "seven"
    missing = runner.invoke(app, ["pull", "--repo", "me/nothing-here"])
    assert missing.exit_code == 1 and "No dataset repo me/nothing-here" in missing.output


# ---- models and SAEs in the HF cache --------------------------------------------------------------------


def npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, W_enc=np.zeros((2, 3), np.float32), b_enc=np.zeros(3, np.float32), b_dec=np.zeros(2, np.float32),
             threshold=np.zeros(3, np.float32))  # fmt: skip
    return buffer.getvalue()


def test_sae_and_model_pull_then_list(hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_repo("google/gemma-scope-2b-pt-res", {
        "layer_20/width_16k/average_l0_71/params.npz": npz_bytes(),
        "layer_12/width_16k/average_l0_82/params.npz": npz_bytes(),
    })  # fmt: skip
    hub.add_repo(
        "someone/saelens-saes",
        {"blocks.3/cfg.json": b"{}", "blocks.3/sae_weights.safetensors": b"x"},
    )
    hub.add_repo(
        "someone/tiny-lm",
        {"config.json": b'{"model_type": "gemma2"}', "tokenizer.json": b"{}", "model.gguf": b"big"},
    )
    runner = CliRunner()
    assert "No models" in runner.invoke(app, ["models", "list"]).output

    result = runner.invoke(app, ["sae", "pull"])  # the default SAE
    assert result.exit_code == 0, result.output
    assert (
        "google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71/params.npz is in"
        in result.output
    )
    assert runner.invoke(app, ["sae", "pull", "someone/saelens-saes/blocks.3"]).exit_code == 0
    folder = hubsync.download_sae("someone/saelens-saes", "blocks.3")
    assert (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()
    missing = runner.invoke(
        app, ["sae", "pull", "google/gemma-scope-2b-pt-res", "--path", "layer_99/width_16k"]
    )
    assert missing.exit_code == 1 and "no SAE at layer_99/width_16k" in missing.output
    vague = runner.invoke(app, ["sae", "pull", "someone/saelens-saes"])
    assert vague.exit_code == 1 and "--path" in vague.output

    result = runner.invoke(app, ["models", "pull", "someone/tiny-lm"])
    assert result.exit_code == 0, result.output

    listed = runner.invoke(app, ["sae", "list"]).output
    assert (
        "google/gemma-scope-2b-pt-res" in listed and "  layer_20/width_16k/average_l0_71" in listed
    )
    assert "layer_12" not in listed  # only what was downloaded
    assert "someone/saelens-saes" in listed and "  blocks.3" in listed
    models = runner.invoke(app, ["models", "list"]).output
    assert "someone/tiny-lm" in models and "gemma-scope" not in models
    repos = {r.repo_id: r for r in hubsync.scan_hf_cache()}
    assert (
        repos["someone/tiny-lm"].kind == "model" and repos["someone/tiny-lm"].files == 2
    )  # no .gguf
