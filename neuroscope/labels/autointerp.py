"""Phase 2 of auto-interp: one labelling request per feature, each label journalled as it arrives.

The labeler sees a feature's strongest excerpts (all but the held-out ones kept for scoring), the
firing token marked ``<<like this>>`` with its activation, and answers ``{"label": "..."}``. A rerun
skips every feature that already has a label, so nothing paid for is asked twice.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from neuroscope.labels import examples as ex
from neuroscope.labels.labeler import (
    Job,
    LabelerConfig,
    Outcome,
    RetryPolicy,
    RunSummary,
    UnusableAnswer,
    json_object_in,
    run_jobs,
)
from neuroscope.labels.store import LABELS_FILE, Journal, ok_labels, write_meta

MAX_LABEL_CHARS = 120

SYSTEM_PROMPT = """\
You name features of a sparse autoencoder trained on a language model's residual stream. A feature \
fires on some tokens depending on the token and its context. You see excerpts where one feature \
fires most strongly; in each, the token where it fires is marked <<like this>>, and its activation \
is given first.

Say what the feature detects, as a short noun phrase of at most 8 words (for example "French city \
names", "closing parenthesis in code", "expressions of gratitude"). Name the concept the excerpts \
share, not one excerpt; name the token itself only when the feature is about that token. No "this \
feature", no hedging.

Reply with JSON only: {"label": "..."}"""

LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "description": "at most 8 words"}},
    "required": ["label"],
    "additionalProperties": False,
}


def one_line(text: str) -> str:
    """Excerpts are listed one per line: show line breaks as ⏎ rather than breaking the list."""
    return text.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎")


def label_messages(feature: ex.FeatureExamples) -> list[dict[str, str]]:
    lines = [
        f"{n}. ({e.activation:.2f}) {one_line(e.marked())}"
        for n, e in enumerate(feature.for_labeling(), start=1)
    ]
    user = (
        "Excerpts, strongest first:\n\n"
        + "\n".join(lines)
        + '\n\nReply with JSON only: {"label": "..."}'
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_LABEL_LINE = re.compile(r"^\s*\**label\s*[:=]\**\s*(.+)$", re.IGNORECASE | re.MULTILINE)


def parse_label(text: str) -> str:
    """The label in an answer: a JSON object's ``label``, or a ``Label: ...`` line; else unusable."""
    try:
        value = json_object_in(text).get("label")
    except UnusableAnswer:
        match = _LABEL_LINE.search(text)
        if not match:
            raise
        value = match.group(1)
    if not isinstance(value, str):
        raise UnusableAnswer("the answer's label is not text")
    label = " ".join(value.strip().strip("\"'`*").split())
    if not label:
        raise UnusableAnswer("empty label")
    if len(label) > MAX_LABEL_CHARS:
        raise UnusableAnswer(f"label too long ({len(label)} characters)")
    return label


@dataclass(frozen=True)
class GenerateResult:
    summary: RunSummary
    skipped_done: int  # already labelled before this run
    without_examples: int  # asked for but never fired in the corpus pass
    labelled_total: int


def generate_labels(
    examples_folder: Path,
    labels_folder: Path,
    config: LabelerConfig,
    *,
    features: Sequence[int] | None = None,
    concurrency: int = 50,
    policy: RetryPolicy | None = None,
    progress: bool = True,
    ids: dict[str, str] | None = None,
) -> GenerateResult:
    """Label every feature with examples (or just ``features``) that has no label yet."""
    meta = ex.require_meta(examples_folder)
    journal = Journal(labels_folder / LABELS_FILE)
    done = set(ok_labels(journal.load()))
    wanted = set(features) if features is not None else None
    fired = set()
    todo: list[int] = []
    for feature in ex.iter_features(examples_folder):
        fired.add(feature.index)
        if (wanted is None or feature.index in wanted) and feature.index not in done:
            todo.append(feature.index)
    without = len(wanted - fired) if wanted is not None else 0
    skipped = len(done & wanted) if wanted is not None else len(done)
    write_meta(labels_folder, labeler=config.model, model=str(meta.get("model", "")),
               sae=str(meta.get("sae", "")), examples=str(examples_folder), **(ids or {}))  # fmt: skip
    todo_set = set(todo)

    def jobs() -> Iterator[Job[str]]:
        for feature in ex.iter_features(examples_folder):
            if feature.index in todo_set:
                yield Job(
                    feature.index,
                    label_messages(feature),
                    "feature_label",
                    LABEL_SCHEMA,
                    parse_label,
                )

    def on_done(outcome: Outcome[str]) -> None:
        record: dict = {
            "index": outcome.key,
            "labeler": config.model,
            "attempts": outcome.attempts,
            "time": round(time.time(), 3),
        }
        if outcome.ok:
            record |= {"status": "ok", "label": outcome.result}
        else:
            record |= {"status": "failed", "error": outcome.error}
        journal.append(record)

    try:
        summary = run_jobs(config, jobs(), on_done, total=len(todo), concurrency=concurrency,
                           policy=policy, progress=progress, desc="labelling")  # fmt: skip
    finally:
        journal.close()
    journal.compact()
    return GenerateResult(summary, skipped, without, len(ok_labels(journal.load())))
