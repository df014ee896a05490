"""The whole corpus pass for ``labels generate``: corpus -> tokens -> backend -> examples folder.

It reuses the calibration run's pieces (the stored corpus, its tokenisation and plan digest), so a
corpus built once serves both; the checkpoint lives in ``checkpoints/`` and names its plan, so a
killed pass resumes where it stopped and a changed corpus or setting starts afresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from neuroscope.cache import cache_dir, slug
from neuroscope.labels import examples as ex

DEFAULT_SAMPLES = 5000
DEFAULT_MAX_LENGTH = 128
DEFAULT_NEGATIVES = 100


@dataclass(frozen=True)
class PassSettings:
    samples: int = DEFAULT_SAMPLES
    examples_per_feature: int = 20
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = 8
    negatives: int = DEFAULT_NEGATIVES
    before: int = ex.DEFAULT_BEFORE
    after: int = ex.DEFAULT_AFTER


def is_enough(meta: dict[str, Any] | None, settings: PassSettings) -> bool:
    """Does an existing examples folder already answer these settings?"""
    return (
        meta is not None
        and int(meta.get("samples", 0)) >= settings.samples
        and int(meta.get("examples_per_feature", 0)) >= settings.examples_per_feature
    )


def checkpoint_path(model: str, sae: str) -> Path:
    return cache_dir("checkpoints") / f"examples-{slug(model)}-{slug(sae)}.npz"


def run_corpus_pass(
    session: Any,
    layer: int,
    corpus: Any,
    folder: Path,
    settings: PassSettings,
    *,
    model: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Collect examples for the SAE at ``layer`` of ``session`` (a :class:`~neuroscope.Session`) over
    ``corpus`` (a :class:`~neuroscope.corpus.Corpus`) into ``folder``; return the meta written."""
    from neuroscope.calibration import plan_digest, tokenize

    sae = session.saes[layer]
    tokenizer = session.tokenizer.tokenizer
    sequences = tokenize(tokenizer, corpus.texts[: settings.samples], settings.max_length)
    identity = {"kind": "label-examples", "model": model, "sae": sae.id, "layer": layer,
                "top_n": settings.examples_per_feature, "before": settings.before, "after": settings.after,
                "max_length": settings.max_length}  # fmt: skip
    plan = plan_digest(identity, sequences)
    checkpoint = checkpoint_path(model, sae.id)
    bar = None
    if progress:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        bar = tqdm(total=len(sequences), desc="corpus pass", unit="sample", dynamic_ncols=True)
    try:
        top = ex.collect(
            session.backend, sequences, layer, sae.width, top_n=settings.examples_per_feature,
            batch_size=settings.batch_size, before=settings.before, after=settings.after,
            checkpoint=checkpoint, plan=plan, progress=bar.update if bar else None,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    negatives = ex.collect_negatives(
        session.backend, sequences, layer, count=settings.negatives, length=top.window,
        bos=getattr(tokenizer, "bos_token_id", None),
    )  # fmt: skip
    meta = {"model": model, "sae": sae.id, "layer": layer, "corpus": corpus.describe(),
            "corpus_sha256": corpus.sha256, "max_length": settings.max_length,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    ex.write_examples(
        folder,
        top,
        lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True),
        negatives,
        meta,
    )
    checkpoint.unlink(missing_ok=True)
    return ex.require_meta(folder)
