"""Labels anyone can read without an API key: the tokens a feature fires hardest on.

Built from the corpus pass's max-activating examples (``examples.jsonl``, see
:mod:`neuroscope.labels.examples`): a feature whose strongest examples sit on " Paris", " London"
and " Berlin" is labelled ``Paris · London · Berlin``. Tokens are compared stripped and
case-folded, ranked by how many of the feature's examples they account for (then by activation),
and shown as they first appeared. In the priority chain they rank below auto-interp labels and above
Neuronpedia and ``feature_<index>`` (see :mod:`neuroscope.labels.sources`).

Where they are found, for a model and an SAE:

1. ``top_tokens.json`` beside a local SAE (a SAELens folder): how a shipped SAE brings its labels;
2. the corpus pass's examples folder in the cache (``labels generate`` writes it), read once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from neuroscope.cache import write_json_atomic
from neuroscope.labels import examples as ex

SOURCE = "top_tokens"
FILE = "top_tokens.json"
FORMAT = "neuroscope-top-tokens"
SEPARATOR = " · "
DEFAULT_TOKENS = 3
# Examples read per feature: enough for a vote, few enough that one stray passage cannot win.
DEFAULT_EXAMPLES = 20
SPECIAL = "⟨special token⟩"
_VISIBLE = str.maketrans({"\n": "↵", "\t": "⇥", " ": "␣", "\r": ""})


def top_token_label(tokens: Sequence[tuple[str, float]], n: int = DEFAULT_TOKENS) -> str | None:
    """``'Paris · London · Berlin'`` from a feature's (token, activation) examples, strongest first;
    None when there are none."""
    votes: dict[str, tuple[int, float, str]] = {}
    for token, activation in tokens:
        # whitespace-only tokens (newlines, indentation) fire features too: show them visibly; an
        # empty one is a special token (end of text, chat markers), which examples decode to ""
        shown = " ".join(token.split()) or token.translate(_VISIBLE) or SPECIAL
        key = shown.casefold()
        count, best, first = votes.get(key, (0, float("-inf"), shown))
        votes[key] = (count + 1, max(best, activation), first)
    if not votes:
        return None
    ranked = sorted(votes.values(), key=lambda v: (-v[0], -v[1]))
    return SEPARATOR.join(first for _, _, first in ranked[:n])


def labels_from_features(
    features: Iterable[ex.FeatureExamples],
    n: int = DEFAULT_TOKENS,
    examples: int = DEFAULT_EXAMPLES,
) -> dict[int, str]:
    labels = {}
    for feature in features:
        pairs = [(e.token, e.activation) for e in feature.examples[:examples]]
        label = top_token_label(pairs, n)
        if label is not None:
            labels[feature.index] = label
    return labels


def labels_from_examples(folder: Path, n: int = DEFAULT_TOKENS) -> dict[int, str]:
    """Top-token labels of every feature in a complete examples folder (empty when there is none)."""
    if ex.read_meta(folder) is None:
        return {}
    return labels_from_features(ex.iter_features(folder), n)


def save(path: Path, labels: Mapping[int, str], **meta: Any) -> None:
    write_json_atomic(
        path,
        {"format": FORMAT, **meta, "labels": {str(i): t for i, t in sorted(labels.items())}},
    )


def load(path: Path) -> dict[int, str]:
    """A ``top_tokens.json``; an unreadable or foreign file gives no labels rather than an error,
    because labels are a convenience on the token path, never a reason to refuse to serve."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return {}
    raw = data.get("labels") or {}
    return {int(i): str(t) for i, t in raw.items() if str(i).isdigit() and isinstance(t, str)}


def find(model: str, sae: str, sae_source: str | None = None) -> dict[int, str]:
    """The top-token labels for ``sae`` (its id as in records): a ``top_tokens.json`` in the SAE's
    own folder (``sae_source``, else the id when it is a folder), else the cached corpus pass's."""
    for folder in (sae_source, sae):
        if folder and Path(folder).is_dir() and (Path(folder) / FILE).is_file():
            return load(Path(folder) / FILE)
    return labels_from_examples(ex.examples_dir(model, sae))
