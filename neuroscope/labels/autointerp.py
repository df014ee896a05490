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
    without_thinking,
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
    # maxLength is the parser's own limit: a server that decodes under the schema (llama.cpp,
    # Ollama, `neuroscope serve`) cannot let a small model ramble inside the string.
    "properties": {
        "label": {"type": "string", "description": "at most 8 words", "maxLength": MAX_LABEL_CHARS}
    },
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


# "Label: ...", "**Label:** ...", "- label = ..." on a line of its own.
_LABEL_LINE = re.compile(r"^[\s*_#>-]*(?:feature\s+)?label[\s*_]*[:=][\s*_]*(.+)$", re.I | re.M)
# 'I would label it "French city names".'
_QUOTED_LABEL = re.compile(r"\blabel\b[^\"\n]{0,40}\"([^\"\n]{2,120})\"", re.I)
_FENCE = re.compile(r"^\s*```[\w-]*\s*$", re.M)
# Chat, not a label: a sentence about the task, an apology, a refusal.
_CHATTY = re.compile(
    r"^(i|i'm|i'd|i am|sure|here|okay|ok|certainly|sorry|unfortunately|as an|based on|the excerpts|"
    r"these excerpts|this feature|the feature|looking at|let me|note)\b",
    re.I,
)
MAX_LABEL_WORDS = 12


def _clean(value: str) -> str:
    return " ".join(value.strip().strip("\"'`*_").split())


def _lone_label(line: str) -> str | None:
    """``line`` as a label if it reads like one (a short phrase, not a sentence of chat)."""
    text = _clean(line.strip().lstrip("-*•>#").strip())
    if text.endswith(".") and text.count(".") == 1:
        text = text[:-1]
    if not text or _CHATTY.match(text) or text[-1] in "?!:;,":
        return None
    if len(text.split()) > MAX_LABEL_WORDS or "{" in text or "}" in text:
        return None
    return text


def _label_value(text: str) -> object:
    """Where the label is in an answer, in order of trust; UnusableAnswer when nowhere."""
    try:
        return json_object_in(text, "label")["label"]
    except UnusableAnswer:
        pass
    try:  # a JSON object with another key, {"feature": "..."}: its only value
        values = list(json_object_in(text).values())
        if len(values) == 1 and isinstance(values[0], str):
            return values[0]
    except UnusableAnswer:
        pass
    for pattern in (_LABEL_LINE, _QUOTED_LABEL):
        if match := pattern.search(text):
            return match.group(1)
    lines = [line for line in _FENCE.sub("", text).splitlines() if line.strip()]
    if len(lines) == 1 and (label := _lone_label(lines[0])):
        return label
    # "The feature detects:\n\nFrench city names" -- the phrase on the line after a colon.
    for before, line in zip(lines, lines[1:], strict=False):
        if before.rstrip().endswith(":") and (label := _lone_label(line)):
            return label
    raise UnusableAnswer(f"no label in the answer: {text[:80]!r}")


def parse_label(text: str) -> str:
    """The label in an answer: a JSON object's ``label`` (bare, fenced or amid prose), a
    ``Label: ...`` line, or a short phrase on a line of its own; else :class:`UnusableAnswer`."""
    value = _label_value(without_thinking(text))
    if not isinstance(value, str):
        raise UnusableAnswer("the answer's label is not text")
    label = _clean(value)
    if not label:
        raise UnusableAnswer("empty label")
    if not re.search(r"[^\W\d_]{2}", label):  # ":" or "4.0" names nothing
        raise UnusableAnswer(f"the label {label!r} has no words")
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
    concurrency: int | None = None,
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
