"""``neuroscope sae train`` on the tiny random Gemma 2: a real run of a few hundred steps, its output
read back by Neuroscope's own SAE loader, the held-out numbers recomputed independently, the size
check, and a kill followed by a rerun that continues."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_LAYER, has_module
from typer.testing import CliRunner

from neuroscope.errors import ConfigError
from neuroscope.sae_train import TrainOptions, pack_contexts, split_documents, train_sae

pytestmark = pytest.mark.skipif(
    not (has_module("torch") and has_module("sparsify")), reason="needs neuroscope[torch,train]"
)

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "Paris",
    "London",
    "Berlin",
    "city",
    "river",
    "France",
    "one",
    "two",
    "three",
    "four",
    "five",
    "and",
    "is",
    "was",
    "were",
    "ran",
    "walked",
    "over",
    "under",
    "house",
    "tree",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "1",
    "2",
    "3",
    "2024",
    "of",
    "in",
]


def _write_corpus(folder: Path, documents: int = 60, words: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(documents)]
    (folder / "text.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    return folder


def _options(tiny_model: Path, corpus: Path, output: Path, **overrides) -> TrainOptions:
    settings = dict(
        model=str(tiny_model), layer=TINY_LAYER, output=str(output), corpus=str(corpus),
        width=64, k=8, context=32, epochs=8, batch_tokens=128, eval_fraction=0.2,
        loss_contexts=8, log_every=50, save_every=25, weights_dtype="float32",
    )  # fmt: skip
    return TrainOptions(**(settings | overrides))


def test_pack_contexts_starts_each_row_with_bos_and_joins_documents():
    rows = pack_contexts([[5, 6, 7], [8, 9]], first_token=2, separator=1, context=4)
    # stream 5 6 7 1 8 9 1 -> rows of 3 after BOS; the partial last row (1) is dropped
    np.testing.assert_array_equal(rows, [[2, 5, 6, 7], [2, 1, 8, 9]])


def test_split_documents_keeps_whole_documents_apart():
    texts = [f"document {i}" for i in range(20)]
    train, held = split_documents(texts, 0.25, seed=3)
    assert len(held) == 5 and set(train).isdisjoint(held) and sorted(train + held) == sorted(texts)


def test_too_small_corpus_is_refused_before_any_model_runs(tiny_model, tmp_path):
    corpus = _write_corpus(tmp_path / "small", documents=10, words=20)
    options = _options(tiny_model, corpus, tmp_path / "out", width=4096)
    with pytest.raises(ConfigError, match=r"too few for 4,096 latents.*smaller --width"):
        train_sae(options, progress=lambda m: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_trained_folder_loads_and_encodes_as_training_says(tiny_model, tmp_path):
    import torch

    from neuroscope.sae import load_local
    from neuroscope_torch import training
    from neuroscope_torch.sae import TorchSAE

    corpus = _write_corpus(tmp_path / "corpus")
    options = _options(tiny_model, corpus, tmp_path / "sae")
    lines: list[str] = []
    result = train_sae(options, progress=lines.append)
    assert result is not None
    record = json.loads((tmp_path / "sae" / "training.json").read_text())
    assert record["steps"] >= 200, record["steps"]  # a few hundred steps
    assert any("tokens/s" in line and "L0" in line and "FVU" in line for line in lines)

    sae = load_local(tmp_path / "sae")
    assert (sae.architecture, sae.k, sae.width, sae.d_model) == ("topk", 8, 64, 64)
    assert sae.apply_b_dec_to_input

    # The trained sparsify SparseCoder, from the last checkpoint (schedule-free's averaged weights)
    work = next((Path(os.environ["NEUROSCOPE_CACHE"]) / "checkpoints" / "sae-train").iterdir())
    checkpoint = next(work.glob("train-*.pt"))
    acts = training.load_shards(sorted((work / "acts").glob("heldout_*.npy"))).float()
    coder = training._new_sae(options, 64)
    opt = training._optimizer(options, coder)
    state = torch.load(checkpoint, weights_only=True)
    coder.load_state_dict(state["sae"])
    opt.load_state_dict(state["optimizer"])
    opt.eval()
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(acts)
        ours = TorchSAE(sae, torch.device("cpu")).encode(acts)
    theirs = torch.zeros_like(ours).scatter_(-1, top_indices, top_acts)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    # FVU and L0 of the report, recomputed with plain numpy from the loaded parameters
    x = acts.numpy().astype(np.float64)
    pre = np.maximum((x - sae.b_dec) @ sae.W_enc + sae.b_enc, 0)
    kth = np.sort(pre, axis=1)[:, -sae.k][:, None]
    f = np.where(pre >= kth, pre, 0)
    recon = f @ sae.W_dec + sae.b_dec
    fvu = ((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    report = record["eval"]
    assert report["tokens"] == len(x)
    assert report["fvu"] == pytest.approx(fvu, rel=1e-3)
    assert report["fvu"] < 0.9  # it learned something
    assert report["mean_l0"] == pytest.approx((f > 0).sum(1).mean(), rel=1e-3)
    assert report["dead"] == int(((f > 0).sum(0) == 0).sum())
    assert np.isfinite(report["spliced_loss"]) and report["clean_loss"] > 0


@pytest.mark.slow
def test_jumprelu_trains_toward_its_target_l0(tiny_model, tmp_path):
    from neuroscope.sae import load_local

    corpus = _write_corpus(tmp_path / "corpus")
    options = _options(tiny_model, corpus, tmp_path / "sae", architecture="jumprelu", k=12)
    result = train_sae(options, progress=lambda m: None)
    assert result is not None
    sae = load_local(tmp_path / "sae")
    assert sae.architecture == "jumprelu" and sae.threshold is not None
    assert 0 < result.report.mean_l0 < 64
    assert result.report.fvu < 1.0


@pytest.mark.slow
def test_cli_resumes_after_a_kill(tiny_model, tmp_path):
    corpus = _write_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    env = os.environ | {"NEUROSCOPE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable, "-c", "from neuroscope.cli import app; app()", "sae", "train",
        "--model", str(tiny_model), "--layer", str(TINY_LAYER), "--corpus", str(corpus),
        "--output", str(tmp_path / "sae"), "--width", "64", "--k", "8", "--context", "32",
        "--epochs", "40", "--batch-tokens", "64", "--save-every", "20", "--log-every", "100",
        "--loss-contexts", "4",
    ]  # fmt: skip
    first = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(cache.glob("checkpoints/sae-train/*/train-*.pt")):
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (tmp_path / "sae" / "cfg.json").exists()

    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    resumed = [line for line in second.stderr.splitlines() if line.startswith("resuming at step")]
    assert resumed, second.stderr
    step = int(resumed[0].split()[3].split("/")[0])
    assert step >= 20
    assert "harvest train" not in second.stderr  # the stored activations were reused
    record = json.loads((tmp_path / "sae" / "training.json").read_text())
    assert record["steps"] == int(resumed[0].split()[3].split("/")[1])


def test_cli_help_lists_the_options():
    from neuroscope.cli import app

    result = CliRunner().invoke(app, ["sae", "train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--architecture", "--width", "--k", "--corpus", "--eval-corpus", "--layer"):
        assert option in result.output
