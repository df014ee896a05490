"""Package a trained SAE as the demo's: weights, calibration stats and top-token labels.

After ``neuroscope sae train`` (see docs/demo.md for the exact command), this reads the activations
that the training run stored in its work folder (the held-out contexts, the residual after block L,
position 0 left out), encodes them with the trained SAE as the backends do, and feeds per-batch
feature reductions (:class:`neuroscope.backend.BatchStats`) to the same accumulators that
``neuroscope calibrate run`` and the corpus pass of ``neuroscope labels generate`` use. No model run
is needed: the residuals are already on disk.

    python examples/build_demo_sae.py SAE_FOLDER WORK_FOLDER HELDOUT_CORPUS_FOLDER
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from neuroscope import demo
from neuroscope.backend import BatchStats
from neuroscope.calibration import CalibrationStats, FeatureAccumulator, new_header
from neuroscope.chat import ChatTokenizer
from neuroscope.corpus import open_corpus
from neuroscope.labels import examples as ex
from neuroscope.labels import top_tokens
from neuroscope.loading import resolve_model
from neuroscope.sae import load_local
from neuroscope_torch.sae import TorchSAE

TOP_N = 20


def batch_stats(feats: torch.Tensor, n_contexts: int, context: int) -> BatchStats:
    """What ``TorchBackend.batch_feature_stats`` reduces, for rows that are positions 1.. of
    ``n_contexts`` contexts (flat token index = row * context + column)."""
    fired = feats > 0
    count = fired.sum(0)
    total = feats.double().sum(0)
    mean = total / count.clamp(min=1)
    m2 = ((feats.double() - mean) ** 2 * fired).sum(0)
    values, rows = feats.topk(min(TOP_N, len(feats)), dim=0)
    flat = (rows // (context - 1)) * context + 1 + rows % (context - 1)
    flat = torch.where(values > 0, flat, torch.full_like(flat, -1))
    return BatchStats(
        tokens=len(feats), seq_len=context,
        fire_count=count.numpy().astype(np.int64), act_sum=total.numpy(), act_m2=m2.numpy(),
        act_max=feats.max(0).values.numpy(),
        top_values=values.T.contiguous().numpy(), top_tokens=flat.T.contiguous().numpy(),
    )  # fmt: skip


def main(sae_folder: str, work_folder: str, heldout_corpus: str) -> None:
    work, target = Path(work_folder), demo.SAE_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in ("cfg.json", "sae_weights.safetensors", "training.json"):
        shutil.copyfile(Path(sae_folder) / name, target / name)
    sae = load_local(target, sae_id=demo.SAE_ID)
    torch_sae = TorchSAE(sae, torch.device("cpu"))
    contexts = np.load(work / "heldout_contexts.npy")
    context = contexts.shape[1]
    shards = sorted((work / "acts").glob("heldout_*.npy"))

    acc = FeatureAccumulator.zeros(sae.width)
    top = ex.TopExamples(sae.width, TOP_N)
    done = 0
    for shard in shards:
        acts = torch.from_numpy(np.load(shard)).float()
        n_ctx = len(acts) // (context - 1)
        with torch.inference_mode():
            stats = batch_stats(torch_sae.encode(acts), n_ctx, context)
        acc.add(stats)
        batch = [list(map(int, row)) for row in contexts[done : done + n_ctx]]
        top.add(stats, batch, list(range(done, done + n_ctx)))
        done += n_ctx
        print(f"{shard.name}: {acc.tokens:,} tokens", flush=True)

    model = str(demo.model_path())
    tokenizer = ChatTokenizer(resolve_model(model).path).tokenizer
    corpus = open_corpus(heldout_corpus)
    header = new_header(
        model="SmolLM2-135M-Instruct", sae=sae, layer=demo.LAYER, corpus=corpus,
        max_length=context, backend=SimpleNamespace(name="torch", device="cpu"), dtype="float32",
    )  # fmt: skip
    CalibrationStats(header, acc).save(demo.CALIBRATION_FILE)

    folder = work / "examples"
    ex.write_examples(
        folder, top, lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True), [],
        {"model": "SmolLM2-135M-Instruct", "sae": demo.SAE_ID, "layer": demo.LAYER},
    )  # fmt: skip
    labels = top_tokens.labels_from_examples(folder)
    top_tokens.save(
        target / top_tokens.FILE, labels, sae=demo.SAE_ID,
        built_from=f"max-activating examples over {acc.tokens:,} held-out tokens",
    )  # fmt: skip
    print(f"{len(labels):,} labels; calibration over {acc.tokens:,} tokens; examples in {folder}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
