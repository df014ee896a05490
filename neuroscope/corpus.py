"""Text corpora for calibration and labelling: built once from a dataset or local files, kept in the cache.

A stored corpus is a folder holding ``samples.jsonl`` (one ``{"text": ...}`` per line, in order) and
``corpus.json`` (a manifest: format version, sample and character counts, the SHA-256 of
``samples.jsonl``, where the text came from). The manifest is written last and carries the hash, so a
folder left half-written by a crash is refused on load instead of silently calibrating on less text.

Sources: a Hugging Face dataset read with ``datasets`` in streaming mode (only the rows needed are
fetched, never the whole dump), or local files: ``.txt`` (one sample per blank-line-separated
paragraph), ``.jsonl`` (one object per line with a text field, or one JSON string per line),
``.parquet`` (a text column; needs pyarrow), or a folder of those, read in sorted path order.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any

from neuroscope.cache import atomic_path, cache_dir, slug, write_json_atomic
from neuroscope.errors import NeuroscopeError

FORMAT = "neuroscope-corpus"
FORMAT_VERSION = 1
SAMPLES_FILE = "samples.jsonl"
MANIFEST_FILE = "corpus.json"

DEFAULT_DATASET = "wikitext"
DEFAULT_CONFIGS = {"wikitext": "wikitext-103-raw-v1", "Salesforce/wikitext": "wikitext-103-raw-v1"}
# The legacy short name now lives under an organisation on the Hub.
DATASET_ALIASES = {"wikitext": "Salesforce/wikitext"}
DEFAULT_SPLIT = "train"
DEFAULT_SAMPLES = 2000
# Shorter rows are mostly headings, list debris and blank lines: too little context to calibrate on.
DEFAULT_MIN_CHARS = 40
SHUFFLE_BUFFER = 10_000
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
TEXT_COLUMNS = ("text", "content", "document", "body")

# Each command names its local-files option differently; errors raised here reach all of them.
LOCAL_FILES_HINT = (
    "local text files instead (`neuroscope corpus build --from PATH`, or `--corpus-path PATH` "
    "on `calibrate run` and `labels generate`)"
)

_HEADING = re.compile(r"^(= )+.*( =)+$")  # wikitext section titles: " = = Gameplay = = "
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


class CorpusError(NeuroscopeError, ValueError):
    """A corpus that cannot be built or read."""


@dataclass(frozen=True)
class Corpus:
    """Text samples in a fixed order, and where they came from."""

    texts: list[str]
    source: dict[str, Any]
    path: Path | None = None
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )

    @property
    def samples(self) -> int:
        return len(self.texts)

    @property
    def characters(self) -> int:
        return sum(len(t) for t in self.texts)

    @property
    def sha256(self) -> str:
        """The hash of ``samples.jsonl`` as this corpus would be stored: its identity in stats files."""
        return hashlib.sha256(_samples_bytes(self.texts)).hexdigest()

    def head(self, n: int) -> Corpus:
        """The first ``n`` samples (all of them if there are fewer)."""
        if n >= self.samples:
            return self
        return Corpus(self.texts[:n], self.source, self.path, self.created)

    def describe(self) -> str:
        """One line naming the source, for headers and messages."""
        src = self.source
        if src.get("kind") == "dataset":
            config = f" ({src['config']})" if src.get("config") else ""
            return f"{src['dataset']}{config} split {src.get('split', '?')}"
        return str(src.get("path", self.path or "?"))


def _samples_bytes(texts: Iterable[str]) -> bytes:
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode(
        "utf-8"
    )


def clean_samples(texts: Iterable[str], min_chars: int = DEFAULT_MIN_CHARS) -> Iterator[str]:
    """Strip each text; drop empty ones, wikitext headings and those shorter than ``min_chars``."""
    for text in texts:
        text = text.strip()
        if len(text) < max(min_chars, 1) or _HEADING.match(text):
            continue
        yield text


# ---- local files ---------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path} is not UTF-8 text (byte {e.start}). Convert it to UTF-8 or leave it out."
        ) from None
    except OSError as e:
        raise CorpusError(f"Cannot read {path}: {e.strerror or e}.") from None


def _pick_column(
    names: list[str], text_column: str | None, path: Path, string_names: list[str]
) -> str:
    if text_column:
        if text_column not in names:
            raise CorpusError(
                f"{path} has no column {text_column!r} (columns: {', '.join(names) or 'none'}). "
                "Pass the right one with --text-column."
            )
        return text_column
    for name in TEXT_COLUMNS:
        if name in names:
            return name
    if len(string_names) == 1:
        return string_names[0]
    raise CorpusError(
        f"{path}: cannot tell which column holds the text (columns: {', '.join(names) or 'none'}). "
        "Pass it with --text-column."
    )


def iter_txt(path: Path) -> Iterator[str]:
    """One sample per paragraph (blocks separated by blank lines)."""
    yield from _PARAGRAPH_BREAK.split(_read_text(path))


def iter_jsonl(path: Path, text_column: str | None = None) -> Iterator[str]:
    """One sample per line: an object's text field, or a bare JSON string."""
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(
                f"{path}:{lineno} is not valid JSON ({e.msg}). Fix or remove that line."
            ) from None
        if isinstance(row, str):
            yield row
            continue
        if not isinstance(row, dict):
            raise CorpusError(
                f"{path}:{lineno}: expected an object or a string, got {type(row).__name__}."
            )
        strings = [k for k, v in row.items() if isinstance(v, str)]
        column = _pick_column(list(row), text_column, Path(f"{path}:{lineno}"), strings)
        value = row[column]
        if value is None:
            continue
        if not isinstance(value, str):
            raise CorpusError(
                f"{path}:{lineno}: field {column!r} is {type(value).__name__}, not text."
            )
        yield value


def iter_parquet(path: Path, text_column: str | None = None) -> Iterator[str]:
    """The text column of a Parquet file, read one row group at a time (pyarrow)."""
    try:
        import pyarrow as pa  # type: ignore[import-untyped]
        import pyarrow.parquet as pq  # type: ignore[import-untyped]
    except ImportError:
        raise CorpusError(
            f"Reading {path} needs pyarrow: pip install pyarrow (or pip install datasets, which brings it)."
        ) from None
    try:
        reader = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{path} is not a readable Parquet file ({e}).") from None
    schema = reader.schema_arrow
    strings = [
        f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
    ]
    column = _pick_column(schema.names, text_column, path, strings)
    if column not in strings:
        raise CorpusError(f"{path}: column {column!r} is {schema.field(column).type}, not text.")
    try:
        for group in range(reader.num_row_groups):
            for value in reader.read_row_group(group, columns=[column]).column(0).to_pylist():
                if value is not None:
                    yield value
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(
            f"{path} could not be read to the end ({e}). The file may be truncated."
        ) from None


def _local_files(folder: Path) -> list[Path]:
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix in LOCAL_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise CorpusError(
            f"{folder} holds no {', '.join(LOCAL_SUFFIXES)} files. Point the path at text files."
        )
    return files


def iter_local(path: Path, text_column: str | None = None) -> Iterator[str]:
    """Raw texts from a local file or folder, before cleaning."""
    if path.is_dir():
        for file in _local_files(path):
            yield from iter_local(file, text_column)
        return
    if not path.exists():
        raise CorpusError(
            f"{path} does not exist. Give a .txt, .jsonl or .parquet file, or a folder of them."
        )
    if path.suffix == ".jsonl":
        yield from iter_jsonl(path, text_column)
    elif path.suffix == ".parquet":
        yield from iter_parquet(path, text_column)
    elif path.suffix == ".txt":
        yield from iter_txt(path)
    else:
        raise CorpusError(
            f"{path}: unknown file type {path.suffix or '(none)'!r}. Use .txt, .jsonl or .parquet."
        )


def _take(texts: Iterable[str], samples: int | None, what: str, min_chars: int) -> list[str]:
    if samples is not None and samples < 1:
        raise CorpusError(f"--samples must be at least 1, not {samples}.")
    taken = list(islice(clean_samples(texts, min_chars), samples))
    if not taken:
        raise CorpusError(
            f"{what} holds no text samples of at least {min_chars} characters. "
            "Use another source, or lower --min-chars."
        )
    return taken


def from_local(
    path: str | Path,
    samples: int | None = None,
    text_column: str | None = None,
    min_chars: int = DEFAULT_MIN_CHARS,
) -> Corpus:
    """A corpus from local ``.txt``/``.jsonl``/``.parquet`` files or a folder of them."""
    path = Path(path).expanduser().resolve()
    texts = _take(iter_local(path, text_column), samples, str(path), min_chars)
    return Corpus(
        texts,
        {"kind": "local", "path": str(path), "text_column": text_column, "min_chars": min_chars},
    )


# ---- Hugging Face datasets -------------------------------------------------------------------------


def from_dataset(
    dataset: str = DEFAULT_DATASET,
    config: str | None = None,
    split: str = DEFAULT_SPLIT,
    samples: int = DEFAULT_SAMPLES,
    text_column: str | None = None,
    min_chars: int = DEFAULT_MIN_CHARS,
    seed: int = 0,
) -> Corpus:
    """A corpus from a dataset on the Hub (or a local dataset folder), streamed and shuffled.

    Streaming reads only as many rows as needed; the shuffle buffer of ``SHUFFLE_BUFFER`` rows mixes
    articles so that a few long ones do not make up the whole corpus.
    """
    try:
        import datasets  # type: ignore[import-untyped]
    except ImportError:
        raise CorpusError(
            "Building a corpus from a dataset needs the datasets package: pip install datasets. "
            f"Or use {LOCAL_FILES_HINT}."
        ) from None
    if config is None:
        config = DEFAULT_CONFIGS.get(dataset)
    repo = DATASET_ALIASES.get(dataset, dataset)
    where = f"dataset {dataset}" + (
        f" (config {config}, split {split})" if config else f" (split {split})"
    )
    try:
        stream = datasets.load_dataset(repo, config, split=split, streaming=True)
        column = text_column or _dataset_text_column(stream, where)
        stream = stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        texts = _take(
            (row[column] for row in stream if isinstance(row.get(column), str)),
            samples,
            where,
            min_chars,
        )
    except CorpusError:
        raise
    # datasets raises many types (network, config, schema): all mean "cannot build".
    except Exception as e:
        raise CorpusError(
            f"Could not read {where}: {type(e).__name__}: {e}. Check the name and config, connect to "
            f"the internet once, or use {LOCAL_FILES_HINT}."
        ) from None
    source = {
        "kind": "dataset",
        "dataset": dataset,
        "config": config,
        "split": split,
        "text_column": column,
        "min_chars": min_chars,
        "seed": seed,
        "shuffle_buffer": SHUFFLE_BUFFER,
    }
    return Corpus(texts, source)


def _dataset_text_column(stream: Any, where: str) -> str:
    features = getattr(stream, "features", None) or {}
    names = list(features)
    strings = [
        n for n, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")
    ]
    for name in TEXT_COLUMNS:
        if name in strings:
            return name
    if len(strings) == 1:
        return strings[0]
    raise CorpusError(
        f"{where}: cannot tell which column holds the text (columns: {', '.join(names) or 'unknown'}). "
        "Pass it with --text-column."
    )


# ---- storage ---------------------------------------------------------------------------------------


def corpus_dir(name: str) -> Path:
    """The cache folder for a corpus called ``name`` (a dataset id, a file name, ...)."""
    return cache_dir("corpus") / slug(name)


def default_corpus_dir() -> Path:
    """Where ``corpus build`` writes, and where calibration and labelling look, when not told."""
    return corpus_dir(f"{DEFAULT_DATASET}-{DEFAULT_CONFIGS[DEFAULT_DATASET]}-{DEFAULT_SPLIT}")


def cached_corpora() -> list[Path]:
    """Every stored corpus folder in the cache, by name."""
    return sorted(p for p in cache_dir("corpus").iterdir() if is_corpus_dir(p))


def save_corpus(corpus: Corpus, folder: str | Path) -> Corpus:
    """Write ``samples.jsonl`` then ``corpus.json`` (each atomically); return the corpus with its path."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CorpusError(f"{folder} is a file; --output must be a folder.")
    data = _samples_bytes(corpus.texts)
    # The old manifest goes first: a crash between the two writes must not pair it with new samples.
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
    with atomic_path(folder / SAMPLES_FILE) as tmp:
        tmp.write_bytes(data)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "samples": corpus.samples,
        "characters": corpus.characters,
        "sha256": hashlib.sha256(data).hexdigest(),
        "created": corpus.created,
        "source": corpus.source,
    }
    write_json_atomic(folder / MANIFEST_FILE, manifest)
    return Corpus(corpus.texts, corpus.source, folder, corpus.created)


def is_corpus_dir(path: str | Path) -> bool:
    return (Path(path).expanduser() / MANIFEST_FILE).is_file()


def load_corpus(path: str | Path) -> Corpus:
    """A corpus folder written by :func:`save_corpus`, checked against its manifest."""
    folder = Path(path).expanduser()
    manifest_path, samples_path = folder / MANIFEST_FILE, folder / SAMPLES_FILE
    if not manifest_path.is_file():
        raise CorpusError(
            f"{folder} is not a corpus folder (no {MANIFEST_FILE}). Build one with `neuroscope corpus build`."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusError(f"{manifest_path} is unreadable ({e}). Rebuild the corpus.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusError(
            f"{manifest_path} is not a Neuroscope corpus manifest. Rebuild the corpus."
        )
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise CorpusError(
            f"{folder} was written by a newer Neuroscope (corpus format {manifest['format_version']}); upgrade."
        )
    try:
        data = samples_path.read_bytes()
    except OSError as e:
        raise CorpusError(
            f"Cannot read {samples_path} ({e.strerror or e}). Rebuild the corpus."
        ) from None
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise CorpusError(
            f"{samples_path} does not match its manifest (changed or cut short). Rebuild the corpus with "
            f"`neuroscope corpus build --output {folder}`."
        )
    # split("\n"), not splitlines(): a sample may hold U+2028 or \x85, which json.dumps leaves raw
    texts = [json.loads(line)["text"] for line in data.decode("utf-8").split("\n") if line]
    if len(texts) != manifest.get("samples") or not texts:
        raise CorpusError(
            f"{folder}: {len(texts)} samples where the manifest says {manifest.get('samples')}. Rebuild it."
        )
    return Corpus(
        texts, dict(manifest.get("source") or {}), folder, str(manifest.get("created", ""))
    )


def open_corpus(path: str | Path, samples: int | None = None) -> Corpus:
    """A stored corpus folder, or local source files read on the fly; at most ``samples`` samples."""
    path = Path(path).expanduser()
    corpus = load_corpus(path) if is_corpus_dir(path) else from_local(path, samples)
    return corpus.head(samples) if samples else corpus


def ensure_corpus(path: str | Path | None, samples: int) -> Corpus:
    """The corpus to calibrate or label on: ``path`` if given, else the default one, built if needed.

    The default corpus is (re)built from the default dataset when missing, damaged or smaller than
    asked: nobody chose that folder, so nothing of value is lost by replacing it.
    """
    if path is not None:
        return open_corpus(path, samples)
    folder = default_corpus_dir()
    if is_corpus_dir(folder):
        try:
            corpus = load_corpus(folder)
        except CorpusError:
            corpus = None
        if corpus is not None and corpus.samples >= samples:
            return corpus.head(samples)
    built = save_corpus(from_dataset(samples=max(samples, DEFAULT_SAMPLES)), folder)
    return built.head(samples)


def summary(corpus: Corpus) -> dict[str, Any]:
    """What ``corpus show`` prints."""
    lengths = sorted(len(t) for t in corpus.texts)
    return {
        "path": str(corpus.path) if corpus.path else None,
        "source": corpus.describe(),
        "samples": corpus.samples,
        "characters": corpus.characters,
        "median_characters": lengths[len(lengths) // 2] if lengths else 0,
        "sha256": corpus.sha256,
        "created": corpus.created,
    }
