"""Detection scoring: can the labeler tell, from the label alone, which excerpts make the feature fire?

For each feature the labeler gets the label and a shuffled mix of excerpts: held-out activating ones
(examples the labeler never saw while labelling) and as many non-activating ones (corpus excerpts in
which the feature fired nowhere, known exactly from the corpus pass). It answers which excerpts
activate. The score is the balanced accuracy ``(TP/P + TN/N) / 2``: 0.5 is chance, 1.0 perfect.
Scores are journalled beside the labels (``scores.jsonl``) with the label text they judged, so a
changed label is scored again and an unchanged one never is.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from neuroscope.labels import examples as ex
from neuroscope.labels.autointerp import one_line
from neuroscope.labels.labeler import (
    SCORE_MAX_TOKENS,
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
from neuroscope.labels.store import Journal

DEFAULT_THRESHOLD = 0.6

SYSTEM_PROMPT = """\
A feature of a language model's sparse autoencoder has been given a label describing the tokens and \
contexts it fires on. You see the label and numbered text excerpts. Decide which excerpts contain a \
token where the feature fires. Some do and some do not.

Reply with JSON only: {"activating": [numbers of the excerpts where it fires]}"""

DETECTION_SCHEMA = {
    "type": "object",
    "properties": {"activating": {"type": "array", "items": {"type": "integer"}}},
    "required": ["activating"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Trial:
    """One feature's detection test: excerpts in the order shown, and which of them activate."""

    index: int
    label: str
    excerpts: list[str]
    activating: frozenset[int]  # 1-based excerpt numbers


def build_trial(
    feature: ex.FeatureExamples, label: str, negatives: Sequence[ex.Negative], seed: int = 0
) -> Trial | None:
    """Held-out positives and as many exact negatives, shuffled; None when either side is empty."""
    positives = [e.text for e in feature.held_out()]
    pool = [n.text for n in negatives if feature.index not in n.fired]
    if not positives or not pool:
        return None
    rng = np.random.default_rng([seed, feature.index])
    picked = [
        pool[i] for i in rng.choice(len(pool), size=min(len(positives), len(pool)), replace=False)
    ]
    items = [(t, True) for t in positives] + [(t, False) for t in picked]
    order = rng.permutation(len(items))
    shown = [items[i] for i in order]
    return Trial(
        feature.index,
        label,
        [t for t, _ in shown],
        frozenset(n for n, (_, a) in enumerate(shown, 1) if a),
    )


def detection_messages(trial: Trial) -> list[dict[str, str]]:
    lines = [f"{n}. {one_line(text)}" for n, text in enumerate(trial.excerpts, start=1)]
    user = (
        f"Label: {trial.label}\n\nExcerpts:\n\n"
        + "\n".join(lines)
        + '\n\nReply with JSON only: {"activating": [...]}'
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_NUMBER_LIST = re.compile(r"\[([\d,\s]*)\]")
_ACTIVATING_LINE = re.compile(r"activating[\s*_\"]*[:=][\s*_]*([\d,\s]*|none)\s*$", re.I | re.M)


def _activating_value(text: str) -> object:
    """The list of excerpt numbers in an answer: a JSON object's ``activating``, else a bare list
    ``[1, 4]`` or an ``Activating: 1, 4`` line (what a model without JSON mode writes)."""
    try:
        return json_object_in(text, "activating")["activating"]
    except UnusableAnswer:
        pass
    for pattern in (_ACTIVATING_LINE, _NUMBER_LIST):
        if match := pattern.search(text):
            found = match.group(1)
            return [] if found.strip().lower() == "none" else re.findall(r"\d+", found)
    raise UnusableAnswer(f"no list of excerpts in the answer: {text[:80]!r}")


def parse_detection(text: str, count: int) -> frozenset[int]:
    value = _activating_value(without_thinking(text))
    if not isinstance(value, list):
        raise UnusableAnswer("'activating' is not a list")
    picked = set()
    for item in value:
        try:
            n = int(item)
        except (TypeError, ValueError):
            raise UnusableAnswer(f"'activating' holds {item!r}, not an excerpt number") from None
        if not 1 <= n <= count:
            raise UnusableAnswer(f"excerpt {n} does not exist (1..{count})")
        picked.add(n)
    return frozenset(picked)


def balanced_accuracy(predicted: frozenset[int], trial: Trial) -> dict[str, float | int]:
    numbers = set(range(1, len(trial.excerpts) + 1))
    negatives = numbers - trial.activating
    tp = len(predicted & trial.activating)
    tn = len(negatives - predicted)
    score = (tp / len(trial.activating) + tn / len(negatives)) / 2
    return {
        "score": round(score, 4),
        "tp": tp,
        "fn": len(trial.activating) - tp,
        "tn": tn,
        "fp": len(negatives) - tn,
    }


@dataclass(frozen=True)
class ScoreResult:
    summary: RunSummary
    insufficient: int  # no held-out example or no negative: not sent
    skipped_done: int
    scores: dict[int, float]  # every current score for these labels
    threshold: float

    @property
    def flagged(self) -> list[int]:
        return sorted(i for i, s in self.scores.items() if s < self.threshold)


def score_labels(
    labels: Mapping[int, str],
    examples_folder: Path,
    scores_path: Path,
    config: LabelerConfig,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    concurrency: int | None = None,
    policy: RetryPolicy | None = None,
    progress: bool = True,
    seed: int = 0,
) -> ScoreResult:
    """Score each label not yet scored (for its current text) and journal the result in ``scores_path``."""
    negatives = ex.read_negatives(examples_folder)
    journal = Journal(scores_path)
    previous = journal.load()

    def current(index: int) -> bool:
        r = previous.get(index)
        return r is not None and r.get("status") == "ok" and r.get("label") == labels[index]

    skipped = sum(1 for i in labels if current(i))
    trials: list[Trial] = []
    insufficient = 0
    for feature in ex.iter_features(examples_folder):
        if feature.index not in labels or current(feature.index):
            continue
        trial = build_trial(feature, labels[feature.index], negatives, seed)
        if trial is None:
            insufficient += 1
        else:
            trials.append(trial)
    by_index = {t.index: t for t in trials}

    def jobs() -> Iterator[Job[frozenset[int]]]:
        for t in trials:
            yield Job(t.index, detection_messages(t), "detection", DETECTION_SCHEMA,
                      partial(parse_detection, count=len(t.excerpts)),
                      max_tokens=SCORE_MAX_TOKENS)  # fmt: skip

    def on_done(outcome: Outcome[frozenset[int]]) -> None:
        trial = by_index[outcome.key]
        record: dict = {"index": outcome.key, "label": trial.label, "scorer": config.model,
                        "attempts": outcome.attempts, "time": round(time.time(), 3)}  # fmt: skip
        if outcome.ok:
            assert outcome.result is not None
            accuracy = balanced_accuracy(outcome.result, trial)
            record |= {"status": "ok", **accuracy, "flagged": accuracy["score"] < threshold}
        else:
            record |= {"status": "failed", "error": outcome.error}
        journal.append(record)

    try:
        summary = run_jobs(config, jobs(), on_done, total=len(trials), concurrency=concurrency,
                           policy=policy, progress=progress, desc="scoring")  # fmt: skip
    finally:
        journal.close()
    journal.compact()
    latest = journal.load()
    scores = {
        i: float(r["score"]) for i, r in latest.items()
        if i in labels and r.get("status") == "ok" and r.get("label") == labels[i]
    }  # fmt: skip
    return ScoreResult(summary, insufficient, skipped, scores, threshold)
