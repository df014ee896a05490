"""Phase 1 of auto-interp: the corpus pass that finds, for every feature, where it fires hardest.

The backend prefills a batch and reduces it on the device (:meth:`Backend.batch_feature_stats`):
per feature, the batch's ``top_n`` largest activations and their flat token positions. Here, on the
host, :class:`TopExamples` merges each batch into a running top-N per feature and cuts the window of
token ids around every example as it enters, while the batch is at hand. Memory is bounded by
``width x top_n x window`` whatever the corpus size (16k features x 20 x 33 int32 ~ 43 MB).

At most one example per corpus sample is kept for a feature: neighbouring tokens of one passage give
near-identical windows, and a labeler learns more from twenty passages than from one seen twenty
times.

Negatives for detection scoring come from separate windows run one per call, so that "this feature
did not fire anywhere in this excerpt" is exact rather than guessed.

The examples folder (``corpus/examples/<model>/<sae>/``):

- ``examples.jsonl``: one line per feature that fired, by index:
  ``{"index": 7, "fires": 130, "examples": [{"activation": 4.2, "sample": 12, "position": 40,
  "before": "...", "token": " Paris", "after": "..."}, ...]}`` (strongest first).
- ``negatives.jsonl``: ``{"text": "...", "fired": [3, 17, ...]}``, every feature that fired in it.
- ``examples.json``: the meta (written last): model, SAE, layer, samples, tokens, settings, and
  ``fire_count`` totals live in ``fire_count.npy`` beside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroscope.backend import Backend, BatchStats
from neuroscope.cache import atomic_path, cache_root, slug, write_json_atomic
from neuroscope.errors import NeuroscopeError

EXAMPLES_FILE = "examples.jsonl"
NEGATIVES_FILE = "negatives.jsonl"
META_FILE = "examples.json"
FIRE_COUNT_FILE = "fire_count.npy"
FORMAT = "neuroscope-examples"
FORMAT_VERSION = 1

DEFAULT_BEFORE = 24
DEFAULT_AFTER = 8
CHECKPOINT_EVERY = 50  # samples
# Every HOLDOUT_EVERY-th example (ranks 3, 7, 11, ...) is kept from the labeler for scoring.
HOLDOUT_EVERY = 4


class ExamplesError(NeuroscopeError, ValueError):
    """An examples folder or checkpoint that cannot be used."""


_EMPTY_SLOT = -(1 << 61)
_EMPTY_CANDIDATE = -(1 << 62)


def _rank_key(values: np.ndarray, sample: np.ndarray, empty: int) -> np.ndarray:
    """An int64 that orders (activation desc, sample asc). Positive float32s order like their bit
    patterns, so ``bits << 32`` keeps the value order exactly and ``- sample`` breaks ties."""
    filled = np.isfinite(values)
    bits = np.where(filled, values, 1.0).astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(filled, (bits << 32) - sample, empty)


def examples_dir(model: str, sae: str) -> Path:
    """Where the corpus pass for ``model`` and ``sae`` keeps its examples (not created here)."""
    return cache_root() / "corpus" / "examples" / slug(model) / slug(sae)


# ---- the bounded top-N -------------------------------------------------------------------------------


class TopExamples:
    """Each feature's ``top_n`` strongest activations seen so far, with the token window around each.

    Slots are unordered while accumulating (a new example replaces a weaker one in place, so only
    the windows that change are copied); :meth:`ranked` sorts them.
    """

    def __init__(
        self, width: int, top_n: int, before: int = DEFAULT_BEFORE, after: int = DEFAULT_AFTER
    ):
        if top_n < 1:
            raise ExamplesError(f"examples per feature must be at least 1, not {top_n}.")
        self.width, self.top_n, self.before, self.after = width, top_n, before, after
        self.values = np.full((width, top_n), -np.inf, np.float32)
        self.sample = np.full((width, top_n), -1, np.int64)
        self.position = np.full((width, top_n), -1, np.int32)
        self.windows = np.full((width, top_n, self.window), -1, np.int32)
        self.fire_count = np.zeros(width, np.int64)
        self.tokens = 0
        self.samples_done = 0

    @property
    def window(self) -> int:
        return self.before + 1 + self.after

    def add(
        self, stats: BatchStats, batch: Sequence[Sequence[int]], sample_ids: Sequence[int]
    ) -> None:
        """Merge one batch. ``sample_ids[r]`` names row ``r`` of ``batch`` in the corpus."""
        if stats.top_values is None or stats.top_tokens is None:
            raise ExamplesError(
                "The backend returned no top_values/top_tokens; ask it for top_n > 0."
            )
        if stats.top_values.shape[0] != self.width or np.shape(stats.fire_count) != (self.width,):
            raise ExamplesError(
                f"The backend returned stats for {stats.top_values.shape[0]} features; the SAE has "
                f"{self.width}. This is a backend bug."
            )
        self.fire_count += np.asarray(stats.fire_count, np.int64)
        self.tokens += int(stats.tokens)
        self.samples_done += len(batch)

        values, rows, cols = self._candidates(stats, len(batch))
        n_old = self.top_n
        ids = np.asarray(sample_ids, np.int64)
        # Choose each feature's top-N among old slots and new candidates by one unique int64 key:
        # strongest first, the earlier sample on ties (as a plain sort of the whole corpus would).
        # Empty old slots rank above empty candidates, so an empty candidate is never chosen.
        old_key = _rank_key(self.values, self.sample, _EMPTY_SLOT)
        new_key = _rank_key(values, ids[rows], _EMPTY_CANDIDATE)
        merged = np.concatenate([old_key, new_key], axis=1)
        chosen = np.argpartition(-merged, n_old - 1, axis=1)[:, :n_old]
        kept_old = np.zeros((self.width, n_old), bool)
        feat, col = np.nonzero(chosen < n_old)
        kept_old[feat, chosen[feat, col]] = True
        # Per feature, the free slots and the chosen candidates are equal in number; np.nonzero walks
        # both in row-major order, so the two lists pair up feature by feature.
        free_f, free_slot = np.nonzero(~kept_old)
        new_f, new_col = np.nonzero(chosen >= n_old)
        if len(new_f) == 0:
            return
        cand = chosen[new_f, new_col] - n_old
        r, c = rows[new_f, cand], cols[new_f, cand]
        self.values[free_f, free_slot] = values[new_f, cand]
        self.sample[free_f, free_slot] = ids[r]
        self.position[free_f, free_slot] = c
        self.windows[free_f, free_slot] = self._cut_windows(batch, r, c)

    def _candidates(
        self, stats: BatchStats, batch_rows: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch's candidates as (values, rows, cols) [width, n]: only each sample's strongest
        token per feature, the rest (and empty ones) -inf."""
        values = np.asarray(stats.top_values, np.float32)
        tokens = np.asarray(stats.top_tokens, np.int64)
        valid = (tokens >= 0) & (values > 0) & np.isfinite(values)
        seq_len = max(int(stats.seq_len), 1)
        rows, cols = np.divmod(np.maximum(tokens, 0), seq_len)
        if (rows[valid] >= batch_rows).any():
            raise ExamplesError(
                "The backend returned a token index outside the batch. This is a backend bug."
            )
        # One example per sample: order each feature's candidates by (sample, strongest first) and
        # keep the first of each sample.
        bits = np.where(valid, values, 1.0).astype(np.float32).view(np.int32).astype(np.int64)
        group = np.where(valid, (rows << 32) + ((1 << 31) - bits), np.iinfo(np.int64).max)
        order = np.argsort(group, axis=1)
        sorted_rows = np.take_along_axis(rows, order, axis=1)
        first = np.take_along_axis(valid, order, axis=1)
        first[:, 1:] &= sorted_rows[:, 1:] != sorted_rows[:, :-1]
        keep = np.empty_like(first)
        np.put_along_axis(keep, order, first, axis=1)
        return np.where(keep, values, -np.inf).astype(np.float32), rows, cols

    def _cut_windows(
        self, batch: Sequence[Sequence[int]], rows: np.ndarray, cols: np.ndarray
    ) -> np.ndarray:
        seq_len = max(len(s) for s in batch)
        padded = np.full((len(batch), self.before + seq_len + self.after), -1, np.int32)
        for r, seq in enumerate(batch):
            padded[r, self.before : self.before + len(seq)] = seq
        offsets = np.arange(self.window)
        return padded[rows[:, None], cols[:, None] + offsets[None, :]]

    def ranked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(values, sample, position, windows), each feature's examples strongest first (ties: the
        earlier sample first, which is also the one the merge keeps)."""
        order = np.lexsort((self.sample, -self.values), axis=1)
        take = lambda a: np.take_along_axis(a, order if a.ndim == 2 else order[:, :, None], axis=1)  # noqa: E731
        return take(self.values), take(self.sample), take(self.position), take(self.windows)

    # ---- checkpoints ----------------------------------------------------------------------------------

    def save(self, path: Path, plan: str) -> None:
        """An atomic checkpoint; ``plan`` identifies what is being measured (see :func:`load`)."""
        meta = {"plan": plan, "tokens": self.tokens, "samples_done": self.samples_done,
                "before": self.before, "after": self.after}  # fmt: skip
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, values=self.values, sample=self.sample, position=self.position,
                     windows=self.windows, fire_count=self.fire_count,
                     meta=np.array(json.dumps(meta)))  # fmt: skip

    @classmethod
    def load(cls, path: Path, plan: str) -> TopExamples | None:
        """The checkpoint at ``path`` if it was made for the same plan; None if absent or foreign."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("plan") != plan:
                    return None
                values = data["values"]
                top = cls(values.shape[0], values.shape[1], int(meta["before"]), int(meta["after"]))
                top.values, top.sample, top.position = values, data["sample"], data["position"]
                top.windows, top.fire_count = data["windows"], data["fire_count"]
        except (OSError, ValueError, KeyError):
            return None
        top.tokens, top.samples_done = int(meta["tokens"]), int(meta["samples_done"])
        return top


def collect(
    backend: Backend,
    sequences: Sequence[Sequence[int]],
    layer: int,
    width: int,
    *,
    top_n: int,
    batch_size: int = 8,
    before: int = DEFAULT_BEFORE,
    after: int = DEFAULT_AFTER,
    checkpoint: Path | None = None,
    plan: str = "",
    progress: Callable[[int], None] | None = None,
) -> TopExamples:
    """Run the corpus pass over ``sequences`` (token ids, BOS first), resuming from ``checkpoint``.

    A checkpoint is written every :data:`CHECKPOINT_EVERY` samples (at the end of the batch that
    crosses the mark) and left in place; the caller removes it once the result is saved.
    ``progress(n)`` is called with the number of samples just done (also for resumed ones).
    """
    if batch_size < 1:
        raise ExamplesError(f"--batch-size must be at least 1, not {batch_size}.")
    top = (
        TopExamples.load(checkpoint, plan)
        if checkpoint is not None and checkpoint.exists()
        else None
    )
    if top is None or (top.top_n, top.before, top.after) != (top_n, before, after):
        top = TopExamples(width, top_n, before, after)
    if progress and top.samples_done:
        progress(top.samples_done)
    last_mark = top.samples_done // CHECKPOINT_EVERY
    for start in range(top.samples_done, len(sequences), batch_size):
        ids = list(range(start, min(start + batch_size, len(sequences))))
        batch = [sequences[i] for i in ids]
        top.add(backend.batch_feature_stats(batch, layer, top_n), batch, ids)
        if checkpoint is not None and top.samples_done // CHECKPOINT_EVERY > last_mark:
            last_mark = top.samples_done // CHECKPOINT_EVERY
            top.save(checkpoint, plan)
        if progress:
            progress(len(batch))
    return top


def collect_negatives(
    backend: Backend,
    sequences: Sequence[Sequence[int]],
    layer: int,
    *,
    count: int,
    length: int,
    bos: int | None,
    seed: int = 0,
) -> list[tuple[list[int], np.ndarray]]:
    """``count`` excerpts of ``length`` tokens from the corpus, each run on its own (with BOS), and the
    features that fired anywhere in it: exact negatives for detection scoring."""
    rng = np.random.default_rng(seed)
    long_enough = [i for i, s in enumerate(sequences) if len(s) > 2]
    if not long_enough or count < 1:
        return []
    picks = rng.choice(long_enough, size=min(count, len(long_enough)), replace=False)
    out = []
    for i in sorted(picks.tolist()):
        body = list(
            sequences[i][1:] if bos is not None and sequences[i][0] == bos else sequences[i]
        )
        start = int(rng.integers(0, max(len(body) - length, 0) + 1))
        excerpt = body[start : start + length]
        run = [bos, *excerpt] if bos is not None else excerpt
        stats = backend.batch_feature_stats([run], layer, 0)
        out.append((excerpt, np.flatnonzero(np.asarray(stats.fire_count) > 0)))
    return out


# ---- the examples folder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    activation: float
    sample: int
    position: int
    before: str
    token: str
    after: str

    @property
    def text(self) -> str:
        return self.before + self.token + self.after

    def marked(self) -> str:
        """The excerpt with the firing token between << and >>."""
        return f"{self.before}<<{self.token}>>{self.after}"


@dataclass(frozen=True)
class FeatureExamples:
    index: int
    fires: int
    examples: list[Example]

    def for_labeling(self) -> list[Example]:
        """What the labeler sees: all but the held-out examples."""
        return [
            e for rank, e in enumerate(self.examples) if rank % HOLDOUT_EVERY != HOLDOUT_EVERY - 1
        ]

    def held_out(self) -> list[Example]:
        """Examples the labeler never saw, for scoring its label."""
        return [
            e for rank, e in enumerate(self.examples) if rank % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        ]


@dataclass(frozen=True)
class Negative:
    text: str
    fired: frozenset[int]


def write_examples(
    folder: Path,
    top: TopExamples,
    decode: Callable[[list[list[int]]], list[str]],
    negatives: Sequence[tuple[list[int], np.ndarray]],
    meta: Mapping[str, Any],
) -> None:
    """Render windows to text with ``decode`` (a batch decoder that skips special tokens) and write
    the folder; the meta file goes last, so a folder without it is incomplete."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).unlink(missing_ok=True)
    values, sample, position, windows = top.ranked()
    filled = np.isfinite(values)
    feat, rank = np.nonzero(filled)
    w = windows[feat, rank]
    pieces = []
    for part in (w[:, : top.before], w[:, top.before : top.before + 1], w[:, top.before + 1 :]):
        # -1 (outside the sample) only pads the ends of a window: strip it per row, in C when none.
        if (part >= 0).all():
            pieces += part.tolist()
        else:
            pieces += [[t for t in row if t >= 0] for row in part.tolist()]
    texts = decode(pieces) if pieces else []
    n = len(feat)
    before, token, after = texts[:n], texts[n : 2 * n], texts[2 * n :]
    with atomic_path(folder / EXAMPLES_FILE) as tmp, open(tmp, "w", encoding="utf-8") as f:
        k = 0
        for index in range(top.width):
            count = int(filled[index].sum())
            if count == 0:
                continue
            examples = [
                {
                    "activation": round(float(values[index, j]), 4),
                    "sample": int(sample[index, j]),
                    "position": int(position[index, j]),
                    "before": before[k + j],
                    "token": token[k + j],
                    "after": after[k + j],
                }  # fmt: skip
                for j in range(count)
            ]
            k += count
            line = {"index": index, "fires": int(top.fire_count[index]), "examples": examples}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    neg_texts = decode([list(map(int, excerpt)) for excerpt, _ in negatives]) if negatives else []
    with atomic_path(folder / NEGATIVES_FILE) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for text, (_, fired) in zip(neg_texts, negatives, strict=True):
            f.write(
                json.dumps({"text": text, "fired": [int(i) for i in fired]}, ensure_ascii=False)
                + "\n"
            )
    with atomic_path(folder / FIRE_COUNT_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, top.fire_count)
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "width": top.width,
            "examples_per_feature": top.top_n, "before": top.before, "after": top.after,
            "tokens": top.tokens, "samples": top.samples_done, "negatives": len(negatives), **meta}  # fmt: skip
    write_json_atomic(folder / META_FILE, full)


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The examples meta, or None when the folder is missing or incomplete."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    return meta


def require_meta(folder: Path) -> dict[str, Any]:
    meta = read_meta(folder)
    if meta is None:
        raise ExamplesError(
            f"No finished corpus pass in {folder}. Run `neuroscope labels generate` (it runs the pass "
            "first) with the same --model and SAE options."
        )
    return meta


def _parse_feature(line: str) -> FeatureExamples:
    data = json.loads(line)
    return FeatureExamples(
        index=int(data["index"]),
        fires=int(data.get("fires", 0)),
        examples=[Example(**e) for e in data["examples"]],
    )


def iter_features(folder: Path) -> Iterator[FeatureExamples]:
    """Every feature with examples, by index, read lazily."""
    require_meta(folder)
    with open(folder / EXAMPLES_FILE, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield _parse_feature(line)


def read_features(folder: Path, indices: Sequence[int]) -> dict[int, FeatureExamples]:
    """The examples of just these features (a streaming scan: the file can be tens of MB)."""
    wanted = set(indices)
    found: dict[int, FeatureExamples] = {}
    if read_meta(folder) is None:
        return found
    prefixes = {f'{{"index": {i},': i for i in wanted}
    with open(folder / EXAMPLES_FILE, encoding="utf-8") as f:
        for line in f:
            head = line[: line.find(",") + 1]
            if head in prefixes:
                found[prefixes[head]] = _parse_feature(line)
                if len(found) == len(wanted):
                    break
    return found


def read_negatives(folder: Path) -> list[Negative]:
    try:
        with open(folder / NEGATIVES_FILE, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []
    return [Negative(r["text"], frozenset(r["fired"])) for r in rows]


def fire_counts(folder: Path) -> tuple[np.ndarray, int] | None:
    """(fire_count per feature, tokens seen) from the corpus pass, if there was one."""
    meta = read_meta(folder)
    if meta is None:
        return None
    try:
        return np.load(folder / FIRE_COUNT_FILE, allow_pickle=False), int(meta["tokens"])
    except (OSError, ValueError, KeyError):
        return None
