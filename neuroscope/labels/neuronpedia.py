"""Neuronpedia's explanations: our SAE ids mapped to theirs, bulk exports imported, single features
fetched live (only when the user allows network use for labels), everything cached.

The cache keeps three states per feature, because coverage is not total: an explanation, "looked up
and there is none" (``description: null``, so it is not asked again), and absent (never looked up).

Bulk exports are gzip'd JSONL batches published per SAE at
``{EXPORTS_URL}/{modelId}/{saeId}/explanations/batch-{i}.jsonl.gz``; each line is an explanation with
(among others) ``modelId``, ``layer`` (Neuronpedia's SAE id), ``index``, ``description`` and
``explanationModelName``. The live API is ``GET {NEURONPEDIA_URL}/api/feature/{modelId}/{saeId}/{index}``,
whose ``explanations[0].description`` is the label. Both base URLs can be overridden by environment
variables (``NEURONPEDIA_URL``, ``NEURONPEDIA_EXPORTS_URL``), which is how the tests stay offline.
"""

from __future__ import annotations

import gzip
import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroscope.cache import cache_root, slug, write_text_atomic
from neuroscope.errors import ConfigError, NeuroscopeError
from neuroscope.labels.store import LABELS_FILE, NEURONPEDIA_DIR, Journal

NEURONPEDIA_URL = "https://www.neuronpedia.org"
EXPORTS_URL = "https://neuronpedia-datasets.s3.us-east-1.amazonaws.com/v1"
MAX_EXPORT_BATCHES = 10_000  # a safety stop; a 16k SAE has 64


class NeuronpediaError(NeuroscopeError, RuntimeError):
    """Neuronpedia could not be reached or answered something unusable."""


@dataclass(frozen=True)
class NeuronpediaId:
    """Neuronpedia's name for an SAE: a model id and an SAE id, e.g. gemma-2-2b / 20-gemmascope-res-16k."""

    model: str
    sae: str

    def __str__(self) -> str:
        return f"{self.model}/{self.sae}"

    @classmethod
    def parse(cls, text: str) -> NeuronpediaId:
        model, sep, sae = text.strip().strip("/").partition("/")
        if not sep or not model or not sae or "/" in sae:
            raise ConfigError(
                f"A Neuronpedia id is MODEL/SAE, e.g. gemma-2-2b/20-gemmascope-res-16k; got {text!r}."
            )
        return cls(model, sae)


# google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71 -> gemma-2-2b/20-gemmascope-res-16k
_GEMMA_SCOPE = re.compile(
    r"^google/gemma-scope-(?P<size>2b|9b|27b)-(?P<kind>pt|it)-(?P<site>res|mlp|att)"
    r"/layer_(?P<layer>\d+)/width_(?P<width>\d+[km])(?:/|$)"
)


# google/gemma-scope-2-1b-it/resid_post/layer_13_width_16k_l0_medium -> gemma-3-1b-it/13-gemmascope-2-res-16k
_GEMMA_SCOPE_2 = re.compile(
    r"^google/gemma-scope-2-(?P<size>270m|1b|4b|12b|27b)-(?P<kind>pt|it)"
    r"/(?P<site>resid_post|transcoder)(?:_all)?/layer_(?P<layer>\d+)_width_(?P<width>\d+[km])_"
)
_GEMMA_SCOPE_2_SITES = {"resid_post": "res", "transcoder": "transcoder"}


def neuronpedia_id_for(sae_id: str) -> NeuronpediaId | None:
    """Neuronpedia's id for one of our SAE ids, where we know the naming (Gemma Scope).

    Neuronpedia hosts one L0 per layer and width (Gemma Scope's "canonical" one, e.g. average_l0_71
    at layer 20, 16k); for another L0 its labels describe a sibling SAE, so pass --neuronpedia-id
    explicitly if you know better.
    """
    m2 = _GEMMA_SCOPE_2.match(sae_id)
    if m2:  # Neuronpedia hosts Gemma Scope 2's residual SAEs and transcoders
        model = f"gemma-3-{m2['size']}" + ("-it" if m2["kind"] == "it" else "")
        site = _GEMMA_SCOPE_2_SITES[m2["site"]]
        return NeuronpediaId(model, f"{m2['layer']}-gemmascope-2-{site}-{m2['width']}")
    m = _GEMMA_SCOPE.match(sae_id)
    if not m:
        return None
    model = f"gemma-2-{m['size']}" + ("-it" if m["kind"] == "it" else "")
    return NeuronpediaId(model, f"{m['layer']}-gemmascope-{m['site']}-{m['width']}")


def neuronpedia_url() -> str:
    return os.environ.get("NEURONPEDIA_URL", NEURONPEDIA_URL).rstrip("/")


def exports_url() -> str:
    return os.environ.get("NEURONPEDIA_EXPORTS_URL", EXPORTS_URL).rstrip("/")


def _headers() -> dict[str, str]:
    key = os.environ.get("NEURONPEDIA_API_KEY")
    return {"x-api-key": key} if key else {}


# ---- the cache ---------------------------------------------------------------------------------------


def cache_path(np_id: NeuronpediaId) -> Path:
    return cache_root() / NEURONPEDIA_DIR / slug(np_id.model) / slug(np_id.sae) / LABELS_FILE


def load_cached(np_id: NeuronpediaId) -> dict[int, str | None]:
    """index -> description (None: Neuronpedia has none) for every feature looked up so far."""
    return {i: r.get("description") for i, r in Journal(cache_path(np_id)).load().items()}


def _record(
    index: int, description: str | None, model_name: str | None, source: str
) -> dict[str, Any]:
    return {"index": index, "description": description, "explanation_model": model_name,
            "source": source, "time": round(time.time(), 3)}  # fmt: skip


# ---- bulk exports ------------------------------------------------------------------------------------


def _export_rows(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError:
                    raise ConfigError(
                        f"{path}:{lineno} is not JSON; is this a Neuronpedia explanations export?"
                    ) from None
                for row in value if isinstance(value, list) else [value]:
                    if isinstance(row, dict):
                        yield row
    except (OSError, EOFError) as e:
        raise ConfigError(f"Cannot read {path} ({e}). Download it again.") from None


def import_exports(
    paths: Iterable[str | os.PathLike[str]], np_id: NeuronpediaId | None = None
) -> dict[NeuronpediaId, int]:
    """Load Neuronpedia explanation exports into the cache; return how many features each SAE got.

    Each row names its SAE (``modelId``, ``layer``); ``np_id`` is needed only for rows that do not, and
    rows naming another SAE than ``np_id`` are refused (a mix-up would put wrong labels on features).
    Within the files the first explanation of a feature wins; imported labels replace cached ones.
    """
    found: dict[NeuronpediaId, dict[int, dict[str, Any]]] = {}
    files = [Path(p).expanduser() for p in paths]
    if not files:
        raise ConfigError("Give export files (batch-*.jsonl.gz) or --download.")
    for path in files:
        for row in _export_rows(path):
            model, sae = row.get("modelId"), row.get("layer")
            if model and sae:
                row_id = NeuronpediaId(str(model), str(sae))
                if np_id is not None and row_id != np_id:
                    raise ConfigError(
                        f"{path} holds explanations of {row_id}, not {np_id}. Import it without "
                        "--neuronpedia-id (rows name their SAE) or pick the right files."
                    )
            elif np_id is not None:
                row_id = np_id
            else:
                raise ConfigError(
                    f"{path}: rows do not name their SAE; pass --neuronpedia-id MODEL/SAE."
                )
            try:
                index = int(row["index"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(
                    f"{path}: a row has no feature index; is this an explanations export?"
                ) from None
            description = row.get("description")
            if not isinstance(description, str) or not description.strip():
                continue
            found.setdefault(row_id, {}).setdefault(
                index,
                _record(index, description.strip(), row.get("explanationModelName"), "export"),
            )
    for row_id, records in found.items():
        journal = Journal(cache_path(row_id))
        merged = journal.load() | records
        write_text_atomic(
            journal.path,
            "".join(json.dumps(merged[i], ensure_ascii=False) + "\n" for i in sorted(merged)),
        )
    return {row_id: len(records) for row_id, records in found.items()}


def download_exports(
    np_id: NeuronpediaId, dest: Path, progress: Callable[[int], None] | None = None
) -> list[Path]:
    """Download every explanations batch of ``np_id`` into ``dest`` (until the first missing batch)."""
    import httpx

    dest.mkdir(parents=True, exist_ok=True)
    base = f"{exports_url()}/{np_id.model}/{np_id.sae}/explanations"
    files = []
    with httpx.Client(timeout=60, follow_redirects=True) as client:
        for i in range(MAX_EXPORT_BATCHES):
            url = f"{base}/batch-{i}.jsonl.gz"
            try:
                with client.stream("GET", url) as response:
                    if response.status_code in (403, 404):  # S3 answers 403 for missing keys too
                        break
                    response.raise_for_status()
                    path = dest / f"batch-{i}.jsonl.gz"
                    with open(path, "wb") as f:
                        for chunk in response.iter_bytes():
                            f.write(chunk)
            except httpx.HTTPError as e:
                raise NeuronpediaError(
                    f"Downloading {url} failed ({e}). Check the connection and try again."
                ) from None
            files.append(path)
            if progress:
                progress(i + 1)
    if not files:
        raise NeuronpediaError(
            f"Neuronpedia publishes no explanations export for {np_id} (nothing at {base}/). "
            "Check --neuronpedia-id."
        )
    return files


# ---- live API ----------------------------------------------------------------------------------------


def fetch_label(
    np_id: NeuronpediaId, index: int, client: Any = None, timeout: float = 10.0
) -> tuple[str | None, str | None]:
    """(description, explanation model) of one feature from the live API; (None, None) if it has none.

    Raises :class:`NeuronpediaError` when Neuronpedia cannot be reached or answers an error.
    """
    import httpx

    url = f"{neuronpedia_url()}/api/feature/{np_id.model}/{np_id.sae}/{index}"
    own = client is None
    client = client or httpx.Client(timeout=timeout, follow_redirects=True)
    try:
        response = client.get(url, headers=_headers())
    except httpx.HTTPError as e:
        raise NeuronpediaError(f"Neuronpedia could not be reached ({type(e).__name__}).") from None
    finally:
        if own:
            client.close()
    if response.status_code == 404:
        return None, None
    if response.status_code != 200:
        raise NeuronpediaError(f"Neuronpedia answered HTTP {response.status_code} for {url}.")
    try:
        data = response.json()
    except ValueError:
        raise NeuronpediaError(f"Neuronpedia's answer for {url} is not JSON.") from None
    explanations = data.get("explanations") if isinstance(data, dict) else None
    if not explanations or not isinstance(explanations[0], dict):
        return None, None
    first = explanations[0]
    description = first.get("description")
    if not isinstance(description, str) or not description.strip():
        return None, None
    return description.strip(), first.get("explanationModelName")


class LiveFetcher:
    """Fetches labels in a background thread so that a lookup on the token path never waits.

    ``request`` queues a feature (once); the answer is journalled in the Neuronpedia cache and handed
    to ``on_result``. After a network failure it pauses ``backoff`` seconds rather than hammering.
    """

    def __init__(self, on_result: Callable[[NeuronpediaId, int, str | None], None], *,
                 max_pending: int = 1000, backoff: float = 60.0, timeout: float = 10.0):  # fmt: skip
        self.on_result, self.backoff, self.timeout = on_result, backoff, timeout
        self._queue: queue.Queue[tuple[NeuronpediaId, int] | None] = queue.Queue(max_pending)
        self._pending: set[tuple[NeuronpediaId, int]] = set()
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._thread: threading.Thread | None = None
        self.errors = 0

    def request(self, np_id: NeuronpediaId, index: int) -> None:
        key = (np_id, index)
        with self._lock:
            if key in self._pending or time.monotonic() < self._paused_until:
                return
            try:
                self._queue.put_nowait(key)
            except queue.Full:
                return
            self._pending.add(key)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="neuronpedia-labels", daemon=True
                )
                self._thread.start()

    def fetch_now(self, np_id: NeuronpediaId, index: int, client: Any = None) -> str | None:
        """Fetch one feature synchronously (for ``labels show``), journal it and return it."""
        description, model_name = fetch_label(np_id, index, client, self.timeout)
        self._store(np_id, index, description, model_name)
        return description

    def _store(
        self, np_id: NeuronpediaId, index: int, description: str | None, model_name: str | None
    ) -> None:
        with self._lock, Journal(cache_path(np_id)) as journal:
            journal.append(_record(index, description, model_name, "api"))
        self.on_result(np_id, index, description)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=self.timeout, follow_redirects=True) as client:
            while True:
                key = self._queue.get()
                if key is None:
                    return
                if time.monotonic() < self._paused_until:  # Neuronpedia failed recently: drop
                    with self._lock:
                        self._pending.discard(key)
                    continue
                try:
                    description, model_name = fetch_label(*key, client=client)
                    self._store(*key, description, model_name)
                except NeuronpediaError:
                    self.errors += 1
                    with self._lock:
                        self._paused_until = time.monotonic() + self.backoff
                finally:
                    with self._lock:
                        self._pending.discard(key)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until nothing is pending (tests, and ``labels show``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=self.timeout)
            except queue.Full:
                return  # the thread is a daemon: it ends with the process
            self._thread.join(timeout=self.timeout + 1)
            self._thread = None
