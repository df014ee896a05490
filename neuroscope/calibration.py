"""Per-feature activation statistics over a corpus, and the versioned file that keeps them.

Why: raw SAE output is dominated by features that fire on nearly every token. Measuring every feature
once over ordinary text lets the filters (``neuroscope.filters``) hide the always-on ones and rank the
rest by how unusual their activation is.

The backend reduces each batch on its device (:class:`~neuroscope.backend.BatchStats`); the host merges
batches in float64 with Chan et al.'s pairwise formula, so the result does not depend on how the
tokens were split into batches beyond rounding. Only real tokens count: padding and position 0 (BOS)
never do.

Stats file (``*.safetensors``, format ``neuroscope-calibration`` version 1): safetensors arrays, one
value per feature, and a JSON header in the safetensors metadata under ``neuroscope_calibration``.
See docs/calibration.md for every field.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from neuroscope.backend import Backend, BatchStats
from neuroscope.cache import atomic_path, cache_dir, slug
from neuroscope.errors import NeuroscopeError

FORMAT = "neuroscope-calibration"
FORMAT_VERSION = 1
METADATA_KEY = "neuroscope_calibration"
CHECKPOINT_KEY = "neuroscope_calibration_checkpoint"
SUFFIX = ".safetensors"

DEFAULT_SAMPLES = 1000
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 128  # Neuronpedia's context length for activation statistics
DEFAULT_CHECKPOINT_SECONDS = 60.0

# name -> dtype of the arrays in a stats file; the first four are the exact accumulators, the rest
# are derived from them for readers that want them ready-made.
ARRAYS: dict[str, type] = {
    "fire_count": np.int64,
    "act_mean": np.float64,
    "act_m2": np.float64,
    "act_max": np.float32,
    "firing_rate": np.float64,
    "act_std": np.float64,
    "mean_all": np.float64,
}
ACCUMULATORS = ("fire_count", "act_mean", "act_m2", "act_max")


class CalibrationError(NeuroscopeError, ValueError):
    """A stats file that cannot be used, or a calibration run that cannot go on."""


# ---- accumulation ----------------------------------------------------------------------------------


@dataclass
class FeatureAccumulator:
    """Running per-feature statistics over the firing activations (activation > 0) of many tokens."""

    tokens: int
    fire_count: np.ndarray  # int64 [width]
    act_mean: np.ndarray  # float64 [width], mean activation over the tokens where the feature fired
    act_m2: np.ndarray  # float64 [width], sum of squared deviations from act_mean over those tokens
    act_max: np.ndarray  # float32 [width]

    @classmethod
    def zeros(cls, width: int) -> FeatureAccumulator:
        return cls(
            tokens=0,
            fire_count=np.zeros(width, np.int64),
            act_mean=np.zeros(width, np.float64),
            act_m2=np.zeros(width, np.float64),
            act_max=np.zeros(width, np.float32),
        )

    @property
    def width(self) -> int:
        return int(self.fire_count.shape[0])

    def merged(self, batch: BatchStats) -> FeatureAccumulator:
        """This plus one batch, as a new accumulator (Chan, Golub & LeVeque's parallel update).

        A new object rather than an update in place: a Ctrl-C mid-merge must not leave a half-merged
        state that a checkpoint could save.
        """
        width = self.width
        for name in ("fire_count", "act_sum", "act_m2", "act_max"):
            shape = np.shape(getattr(batch, name))
            if shape != (width,):
                raise CalibrationError(
                    f"The backend returned {name} of shape {shape} for an SAE of width {width}; "
                    "this is a backend bug, please report it."
                )
        n_b = np.asarray(batch.fire_count, np.int64)
        n_a = self.fire_count
        n = n_a + n_b
        mean_b = np.divide(
            np.asarray(batch.act_sum, np.float64), n_b, out=np.zeros(width), where=n_b > 0
        )
        share_b = np.divide(n_b, n, out=np.zeros(width), where=n > 0)
        delta = mean_b - self.act_mean
        return FeatureAccumulator(
            tokens=self.tokens + int(batch.tokens),
            fire_count=n,
            act_mean=self.act_mean + delta * share_b,
            # n_a * n_b / n written as n_a * share_b: no int64 product that could overflow.
            act_m2=self.act_m2
            + np.asarray(batch.act_m2, np.float64)
            + delta * delta * n_a * share_b,
            act_max=np.maximum(self.act_max, np.asarray(batch.act_max, np.float32)),
        )

    def add(self, batch: BatchStats) -> None:
        """Merge one batch into this accumulator."""
        merged = self.merged(batch)
        self.tokens, self.fire_count, self.act_mean = (
            merged.tokens,
            merged.fire_count,
            merged.act_mean,
        )
        self.act_m2, self.act_max = merged.act_m2, merged.act_max

    @property
    def firing_rate(self) -> np.ndarray:
        """Fraction of tokens on which each feature fired."""
        return self.fire_count / max(self.tokens, 1)

    @property
    def act_var(self) -> np.ndarray:
        """Population variance of the firing activations (0 where a feature fired fewer than twice)."""
        return np.divide(
            self.act_m2, self.fire_count, out=np.zeros(self.width), where=self.fire_count > 0
        )

    @property
    def act_std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.act_var, 0.0))

    @property
    def mean_all(self) -> np.ndarray:
        """Mean activation over all tokens, zeros included."""
        return self.act_mean * self.fire_count / max(self.tokens, 1)

    def arrays(self) -> dict[str, np.ndarray]:
        values = {
            "fire_count": self.fire_count,
            "act_mean": self.act_mean,
            "act_m2": self.act_m2,
            "act_max": self.act_max,
            "firing_rate": self.firing_rate,
            "act_std": self.act_std,
            "mean_all": self.mean_all,
        }
        return {
            name: np.ascontiguousarray(values[name], dtype=dtype) for name, dtype in ARRAYS.items()
        }


# ---- the stats file ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationHeader:
    """What a stats file was measured on; the JSON header of the file."""

    model: str
    sae_id: str
    sae_width: int
    layer: int
    tokens: int = 0
    samples: int = 0
    sae_repo: str | None = None
    sae_path: str | None = None
    d_model: int | None = None
    sae_input_norm: str = "none"
    corpus: dict[str, Any] = field(default_factory=dict)
    max_length: int = DEFAULT_MAX_LENGTH
    backend: str = ""
    device: str = ""
    dtype: str | None = None
    created: str = ""
    neuroscope_version: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    arrays_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> CalibrationHeader:
        missing = [k for k in ("model", "sae_id", "sae_width", "layer") if k not in data]
        if missing:
            raise CalibrationError(
                f"{source}: the header lacks {', '.join(missing)}. Run calibration again."
            )
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            for name in ("sae_width", "layer", "tokens", "samples"):
                fields[name] = int(fields.get(name, 0))
        except (TypeError, ValueError):
            raise CalibrationError(f"{source}: the header's counts are not numbers.") from None
        return cls(**fields)


@dataclass
class CalibrationStats:
    """A complete calibration: the header and the per-feature statistics."""

    header: CalibrationHeader
    acc: FeatureAccumulator
    path: Path | None = None

    @property
    def width(self) -> int:
        return self.acc.width

    @property
    def layer(self) -> int:
        return self.header.layer

    def check_sae(self, sae_id: str, width: int, layer: int | None = None) -> None:
        """Refuse stats measured on another SAE (or layer): they would filter the wrong features."""
        where = f" ({self.path})" if self.path else ""
        if self.header.sae_id != sae_id or self.header.sae_width != width:
            raise CalibrationError(
                f"Calibration stats{where} were measured on SAE {self.header.sae_id} "
                f"(width {self.header.sae_width}), but the SAE in use is {sae_id} (width {width}). "
                "Run `neuroscope calibrate run` for this SAE, or pass the matching --calibration-path."
            )
        if layer is not None and self.header.layer != layer:
            raise CalibrationError(
                f"Calibration stats{where} are for layer {self.header.layer}, not layer {layer}. "
                "Pass the stats for this layer."
            )

    def save(self, path: str | Path) -> Path:
        """Write the stats file atomically (the header's token count is the accumulator's)."""
        path = Path(path).expanduser()
        _write(path, self.acc.arrays(), METADATA_KEY, _with(self.header, tokens=self.acc.tokens))
        return path


def _arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def _write(
    path: Path,
    arrays: Mapping[str, np.ndarray],
    key: str,
    header: CalibrationHeader,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write arrays and a JSON header atomically; the header carries a digest of the arrays."""
    from safetensors.numpy import save_file

    body = {**header.to_dict(), "arrays_sha256": _arrays_digest(arrays), **(extra or {})}
    with atomic_path(path) as tmp:
        save_file(dict(arrays), str(tmp), metadata={key: json.dumps(body, ensure_ascii=False)})


def _read(path: Path, key: str, what: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors import safe_open

    if not path.is_file():
        raise CalibrationError(
            f"No {what} at {path}. Run `neuroscope calibrate run`, or check the path."
        )
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise CalibrationError(
            f"{path} is not a readable {what} ({e}); it may be corrupt or cut short. "
            "Delete it and run `neuroscope calibrate run` again."
        ) from None
    if key not in metadata:
        raise CalibrationError(
            f"{path} is a safetensors file but not a Neuroscope {what} (no {key!r} header)."
        )
    try:
        header = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise CalibrationError(
            f"{path}: its header is not valid JSON ({e}). Run calibration again."
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CalibrationError(f"{path}: its header is not a {FORMAT} header.")
    version = int(header.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise CalibrationError(
            f"{path} uses stats format version {version}; this Neuroscope reads up to "
            f"{FORMAT_VERSION}. Upgrade Neuroscope."
        )
    if header.get("arrays_sha256") != _arrays_digest(arrays):
        raise CalibrationError(
            f"{path}: the arrays do not match the digest in the header (the file is corrupt). "
            "Delete it and run `neuroscope calibrate run` again."
        )
    return header, arrays


def _accumulator(
    arrays: Mapping[str, np.ndarray], tokens: int, width: int, path: Path
) -> FeatureAccumulator:
    for name in ACCUMULATORS:
        if name not in arrays:
            raise CalibrationError(
                f"{path} has no {name!r} array; it is corrupt. Run calibration again."
            )
        if arrays[name].shape != (width,):
            raise CalibrationError(
                f"{path}: {name} has shape {arrays[name].shape}, but the header says width {width}."
            )
    acc = FeatureAccumulator(
        tokens=tokens,
        fire_count=arrays["fire_count"].astype(np.int64),
        act_mean=arrays["act_mean"].astype(np.float64),
        act_m2=arrays["act_m2"].astype(np.float64),
        act_max=arrays["act_max"].astype(np.float32),
    )
    if (acc.fire_count < 0).any() or (acc.fire_count > tokens).any():
        raise CalibrationError(
            f"{path}: firing counts outside 0..{tokens} tokens; the file is corrupt."
        )
    return acc


def load_stats(path: str | Path) -> CalibrationStats:
    """Read and check a stats file; every defect becomes a :class:`CalibrationError` saying what to do."""
    path = Path(path).expanduser()
    raw, arrays = _read(path, METADATA_KEY, "calibration stats file")
    header = CalibrationHeader.from_dict(raw, str(path))
    return CalibrationStats(
        header, _accumulator(arrays, int(header.tokens), int(header.sae_width), path), path
    )


# ---- where stats live --------------------------------------------------------------------------------


def stats_path(model: str, sae_id: str, layer: int) -> Path:
    """The cache location of the stats for this model, SAE and layer."""
    return cache_dir("calibration") / slug(model) / slug(sae_id) / f"layer_{layer}{SUFFIX}"


def find_stats(model: str, sae_id: str, layer: int) -> Path | None:
    path = stats_path(model, sae_id, layer)
    return path if path.is_file() else None


def check_output_name(output: Path) -> None:
    """Stats files are safetensors; a name that promises another format (stats.json) is refused
    before any work, rather than written in a format its name belies."""
    if output.suffix != SUFFIX:
        raise CalibrationError(
            f"--output {output}: calibration stats are a safetensors file (arrays plus a JSON "
            f"header), so the name must end in {SUFFIX}, e.g. {output.with_suffix(SUFFIX).name}. "
            "`neuroscope calibrate show --stats FILE` prints them as text."
        )


def checkpoint_path(output: Path) -> Path:
    """Checkpoints live in the cache, one per output file, named so a user can tell them apart."""
    key = hashlib.sha256(str(output.expanduser().resolve()).encode()).hexdigest()[:12]
    return cache_dir("checkpoints") / f"calibration-{slug(output.stem)}-{key}{SUFFIX}"


# ---- tokenising and batching --------------------------------------------------------------------------


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``, each starting with BOS when the model has one.

    The backends never count position 0, so a tokenizer that adds no BOS gets one prepended: otherwise
    the first real token of every sample would be silently dropped. Sequences with no token after BOS
    are left out.
    """
    if max_length < 2:
        raise CalibrationError(
            f"--max-length must be at least 2 (BOS and one token), not {max_length}."
        )
    bos = getattr(tokenizer, "bos_token_id", None)
    encoded = tokenizer(
        list(texts), add_special_tokens=True, truncation=True, max_length=max_length
    )["input_ids"]
    sequences = []
    for ids in encoded:
        ids = list(ids)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids][:max_length]
        if len(ids) >= 2:
            sequences.append(ids)
    return sequences


def batch_order(sequences: Sequence[Sequence[int]]) -> list[int]:
    """Longest first: batches of similar length waste little on padding, and memory peaks at once."""
    return sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))


def plan_digest(identity: Mapping[str, Any], sequences: Sequence[Sequence[int]]) -> str:
    """A hash of what is being measured, in order: a checkpoint resumes only the same plan."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for seq in sequences:
        digest.update(np.asarray(seq, np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


# ---- the run -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    acc: FeatureAccumulator
    samples_done: int
    plan: str


def save_checkpoint(
    path: Path, header: CalibrationHeader, acc: FeatureAccumulator, samples_done: int, plan: str
) -> None:
    arrays = {name: acc.arrays()[name] for name in ACCUMULATORS}
    header = _with(header, tokens=acc.tokens)
    _write(
        path, arrays, CHECKPOINT_KEY, header, {"samples_done": samples_done, "plan_sha256": plan}
    )


def load_checkpoint(path: Path) -> Checkpoint:
    raw, arrays = _read(path, CHECKPOINT_KEY, "calibration checkpoint")
    header = CalibrationHeader.from_dict(raw, str(path))
    acc = _accumulator(arrays, int(header.tokens), int(header.sae_width), path)
    return Checkpoint(acc, int(raw.get("samples_done", 0)), str(raw.get("plan_sha256", "")))


def _with(header: CalibrationHeader, **changes: Any) -> CalibrationHeader:
    return CalibrationHeader(**{**header.to_dict(), **changes})


ProgressFactory = Callable[[int, int], Any]


def _tqdm_progress(total: int, initial: int) -> Any:
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    return tqdm(total=total, initial=initial, unit="sample", desc="calibrating", dynamic_ncols=True)


def calibrate(
    backend: Backend,
    sequences: Sequence[Sequence[int]],
    header: CalibrationHeader,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    checkpoint: Path | None = None,
    checkpoint_every: float = DEFAULT_CHECKPOINT_SECONDS,
    resume: bool = True,
    progress: bool | ProgressFactory = True,
    log: Callable[[str], None] = lambda message: None,
) -> CalibrationStats:
    """Measure every feature of ``header.layer``'s SAE (already set on ``backend``) over ``sequences``.

    Sequences are processed longest first in batches of ``batch_size``. Every ``checkpoint_every``
    seconds (and on Ctrl-C) the accumulators and the number of sequences done are saved to
    ``checkpoint``; a later call with the same plan picks up after them, so each sample counts once.
    """
    if batch_size < 1:
        raise CalibrationError(f"--batch-size must be at least 1, not {batch_size}.")
    if not sequences:
        raise CalibrationError(
            "Nothing to calibrate on: the corpus gave no tokens. Use a larger corpus."
        )
    ordered = [list(sequences[i]) for i in batch_order(sequences)]
    identity = {
        k: header.to_dict()[k]
        for k in ("model", "sae_id", "sae_width", "layer", "max_length", "sae_input_norm")
    }
    plan = plan_digest(identity, ordered)

    acc, done = FeatureAccumulator.zeros(header.sae_width), 0
    if checkpoint is not None and checkpoint.is_file():
        if resume:
            try:
                saved = load_checkpoint(checkpoint)
            except CalibrationError as e:
                log(f"Ignoring an unusable checkpoint: {e}")
            else:
                if saved.plan == plan and saved.acc.width == header.sae_width:
                    acc, done = saved.acc, saved.samples_done
                    log(
                        f"Resuming from {checkpoint}: {done} of {len(ordered)} samples already measured."
                    )
                else:
                    log(
                        f"The checkpoint {checkpoint} is for another corpus or setup; starting over."
                    )
        else:
            log(f"Starting over; the old checkpoint {checkpoint} will be replaced.")

    bar = None
    if progress:
        factory = progress if callable(progress) else _tqdm_progress
        bar = factory(len(ordered), done)
    # (accumulator, samples merged into it), replaced as one value so that a Ctrl-C can never pair
    # an accumulator with the wrong count.
    state = (acc, done)
    started, tokens_at_start, last_save = time.perf_counter(), acc.tokens, time.perf_counter()
    try:
        while state[1] < len(ordered):
            batch = ordered[state[1] : state[1] + batch_size]
            merged = state[0].merged(backend.batch_feature_stats(batch, header.layer))
            state = (merged, state[1] + len(batch))
            if bar is not None:
                rate = (merged.tokens - tokens_at_start) / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
                bar.update(len(batch))
            due = time.perf_counter() - last_save >= checkpoint_every
            if checkpoint is not None and due and state[1] < len(ordered):
                save_checkpoint(checkpoint, header, *state, plan)
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        if checkpoint is not None and state[1] > 0:
            save_checkpoint(checkpoint, header, *state, plan)
            log(
                f"Interrupted; {state[1]} samples saved to {checkpoint}. Run the same command to resume."
            )
        raise
    finally:
        if bar is not None:
            bar.close()
    acc = state[0]
    return CalibrationStats(_with(header, tokens=acc.tokens, samples=len(ordered)), acc)


def finish(stats: CalibrationStats, output: Path, checkpoint: Path | None) -> Path:
    """Write the stats file, then drop the checkpoint (in that order: a crash between loses nothing)."""
    path = stats.save(output)
    stats.path = path
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return path


def new_header(
    *,
    model: str,
    sae: Any,
    layer: int,
    corpus: Any,
    max_length: int,
    backend: Backend,
    sae_repo: str | None = None,
    sae_path: str | None = None,
    dtype: str | None = None,
) -> CalibrationHeader:
    """The header of a run about to start (``tokens`` and ``samples`` are filled in at the end)."""
    from neuroscope import __version__

    return CalibrationHeader(
        model=model,
        sae_id=sae.id,
        sae_width=sae.width,
        layer=layer,
        sae_repo=sae_repo,
        sae_path=sae_path,
        d_model=sae.d_model,
        sae_input_norm=sae.input_norm,
        corpus={
            "path": str(corpus.path) if corpus.path else None,
            "source": corpus.describe(),
            "samples": corpus.samples,
            "sha256": corpus.sha256,
        },
        max_length=max_length,
        backend=getattr(backend, "name", type(backend).__name__),
        device=str(getattr(backend, "device", "")),
        dtype=dtype,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        neuroscope_version=__version__,
    )


# ---- reading stats for people --------------------------------------------------------------------------


@dataclass(frozen=True)
class StatsSummary:
    width: int
    tokens: int
    never_fire: int
    fire_over_half: int
    median_rate: float


def summarize(stats: CalibrationStats) -> StatsSummary:
    rate = stats.acc.firing_rate
    return StatsSummary(
        width=stats.width,
        tokens=stats.acc.tokens,
        never_fire=int((stats.acc.fire_count == 0).sum()),
        fire_over_half=int((rate > 0.5).sum()),
        median_rate=float(np.median(rate)) if rate.size else 0.0,
    )


def most_frequent(stats: CalibrationStats, top: int) -> list[dict[str, float | int]]:
    """The ``top`` features by firing rate (ties: lower index first), with their statistics."""
    acc = stats.acc
    order = np.lexsort((np.arange(acc.width), -acc.fire_count))[: max(top, 0)]
    rate, std, mean_all = acc.firing_rate, acc.act_std, acc.mean_all
    return [
        {
            "index": int(i),
            "firing_rate": float(rate[i]),
            "act_mean": float(acc.act_mean[i]),
            "act_std": float(std[i]),
            "mean_all": float(mean_all[i]),
            "act_max": float(acc.act_max[i]),
        }
        for i in order
    ]


# ---- the whole job, from names to a stats file -----------------------------------------------------------


def run_calibration(
    *,
    model: str,
    layer: int,
    sae: str,
    sae_path: str | None = None,
    sae_local_path: str | None = None,
    corpus_path: str | Path | None = None,
    samples: int = DEFAULT_SAMPLES,
    output: str | Path | None = None,
    backend: str = "auto",
    dtype: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    checkpoint_every: float = DEFAULT_CHECKPOINT_SECONDS,
    resume: bool = True,
    load_format: str = "auto",
    progress: bool | ProgressFactory = True,
    log: Callable[[str], None] = lambda message: None,
) -> CalibrationStats:
    """Load the model and SAE as a Session would, measure the corpus, write the stats file.

    The corpus is read (or built) first, so a bad corpus fails before the model loads.
    ``load_format="dummy"`` (random weights at real shapes, a random SAE unless one is given) is
    for measuring throughput without downloads.
    """
    from neuroscope.corpus import ensure_corpus
    from neuroscope.errors import ConfigError
    from neuroscope.sae import resolve_sae_path
    from neuroscope.session import Session

    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, not {samples}.")
    if output is not None:
        check_output_name(Path(output))
    corpus = ensure_corpus(corpus_path, samples)
    if corpus.samples < samples:
        log(
            f"The corpus has {corpus.samples} samples; calibrating on all of them (asked for {samples})."
        )
    session = Session(
        model=model,
        sae=sae,
        sae_path=sae_path,
        sae_local_path=sae_local_path,
        layer=layer,
        backend=backend,
        top_k=1,
        dtype=dtype,
        load_format=load_format,  # type: ignore[arg-type]
    )
    engine, loaded = session.backend, session.saes[layer]
    random_sae = loaded.source == "random"  # dummy weights with no SAE named: nothing to cite
    header = new_header(
        model=session.model_name,
        sae=loaded,
        layer=layer,
        corpus=corpus,
        max_length=max_length,
        backend=engine,
        sae_repo=None if sae_local_path or random_sae else sae,
        sae_path=sae_local_path or (None if random_sae else resolve_sae_path(sae_path, layer, sae)),
        # what the backend chose when not told ("torch.bfloat16" -> "bfloat16")
        dtype=dtype or str(getattr(engine, "dtype", "")).removeprefix("torch.") or None,
    )
    target = (
        Path(output).expanduser() if output else stats_path(session.model_name, loaded.id, layer)
    )
    checkpoint = checkpoint_path(target)
    sequences = tokenize(session.tokenizer.tokenizer, corpus.texts, max_length)
    try:
        stats = calibrate(
            engine,
            sequences,
            header,
            batch_size=batch_size,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            resume=resume,
            progress=progress,
            log=log,
        )
    finally:
        session.close()
    finish(stats, target, checkpoint)
    return stats
