"""Talking to the labeler: which OpenAI-compatible server, with which key, and how requests are run.

One request per feature, through the ``openai`` client, ``concurrency`` at a time. The client's own
retries are off so that every retry is ours and counted: 429 and 5xx, timeouts, dropped connections
and unusable answers (malformed, empty, refused, cut off) are retried with exponential backoff and
jitter (a server's ``Retry-After`` is honoured), then recorded as failed with a reason; the run goes
on and finishes. Each outcome is handed to ``on_done`` the moment it arrives, so the caller can write
it to disk before anything else happens: an interrupted run loses no answer it paid for.

Any OpenAI-compatible server works, hosted or local (Ollama, LM Studio, llama.cpp, mlx-lm, vLLM,
``neuroscope serve``). They differ in what ``response_format`` they accept, so the output format is
negotiated: a JSON schema, else ``{"type": "json_object"}``, else plain text read by a tolerant
parser. A refusal moves the whole run (and every request already in flight) down one format, and
the format that worked is remembered per endpoint and model, so the next run does not pay for the
refusals again. Every answer is capped (``Job.max_tokens``): a label is a short phrase, and a small
local model left uncapped can ramble to the end of its context.

API keys are read from the environment (and ``./.env``); they are never printed, logged or written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from neuroscope.cache import cache_root, write_json_atomic
from neuroscope.errors import ConfigError, NeuroscopeError

DEFAULT_LABELER = "deepseek/deepseek-v3.2"
DEFAULT_ANTHROPIC_LABELER = "claude-haiku-4-5"
OPENROUTER_URL = "https://openrouter.ai/api/v1"
ANTHROPIC_URL = "https://api.anthropic.com/v1/"
KEY_VARIABLES = ("OPENROUTER_API_KEY", "ANTHROPIC_API_KEY")

# Output formats, best first. A server that refuses one is asked for the next.
FORMATS = ("json_schema", "json_object", "text")
# Caps on each answer, in tokens. A label is a phrase of at most 8 words (~20 tokens, ~30 in its
# JSON object); the rest leaves room for a small model's preamble. A detection answer lists excerpt
# numbers (at most ~20: ~60 tokens).
LABEL_MAX_TOKENS = 128
SCORE_MAX_TOKENS = 256
# Hosted APIs answer in seconds and run many requests at once. A local server usually runs one or two
# at a time, on a CPU perhaps: a request waits behind the others, then prefills a long prompt.
HOSTED_CONCURRENCY, LOCAL_CONCURRENCY = 50, 2
HOSTED_TIMEOUT, LOCAL_TIMEOUT = 90.0, 300.0
ENDPOINTS_FILE = "endpoints.json"  # under autointerp_labels/: which format each endpoint took
FORMAT_MEMORY_DAYS = 7  # then ask for the best format again (servers get upgraded)

T = TypeVar("T")


class LabelerError(NeuroscopeError, RuntimeError):
    """The labeler cannot be used at all (bad key, unknown model): stopping is better than failing 16k times."""


class UnusableAnswer(ValueError):
    """An answer that arrived but cannot be used (malformed, empty, refused); worth a retry."""


# ---- configuration ---------------------------------------------------------------------------------


def load_dotenv(path: str | os.PathLike[str] = ".env") -> list[str]:
    """Set variables from a ``.env`` file that are not already set; return their names (never values).

    Understands ``KEY=value``, ``export KEY=value``, quotes, and ``#`` comments: what people write.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return []
    loaded = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.removeprefix("export ").split("=", 1)
        key, value = key.strip(), value.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        if key not in os.environ:
            os.environ[key] = value
            loaded.append(key)
    return loaded


@dataclass(frozen=True)
class LabelerConfig:
    """Where to send labelling requests. ``repr`` never shows the key."""

    model: str
    base_url: str
    provider: str  # "openrouter", "anthropic" or "custom"
    api_key: str = field(repr=False)
    structured: bool = True  # start by asking for JSON output (a JSON schema), else plain text
    max_tokens: int | None = None  # overrides every job's own cap on its answer

    @property
    def local(self) -> bool:
        """Any server named by URL: likely local, one request at a time, maybe on a CPU."""
        return self.provider == "custom"

    def default_concurrency(self) -> int:
        return LOCAL_CONCURRENCY if self.local else HOSTED_CONCURRENCY

    def default_policy(self) -> RetryPolicy:
        if self.local:
            return RetryPolicy(attempts=3, timeout=LOCAL_TIMEOUT)
        return RetryPolicy()


def no_key_message() -> str:
    return (
        "No API key for the labeler. Set OPENROUTER_API_KEY (OpenRouter) or ANTHROPIC_API_KEY "
        "(Anthropic), in the environment or in ./.env; or point --labeler-backend at an "
        "OpenAI-compatible server, e.g. --labeler-backend http://localhost:8000/v1 (a local one "
        "needs no key; LABELER_API_KEY is sent if set)."
    )


def resolve_labeler(
    backend: str | None = None, model: str | None = None, env: Mapping[str, str] | None = None
) -> LabelerConfig:
    """The server, key and model for ``--labeler-backend`` (env LABELER_BACKEND, default ``auto``)
    and ``--labeler`` (env LABELER_MODEL).

    ``auto`` is OpenRouter when OPENROUTER_API_KEY is set, else Anthropic's OpenAI-compatible
    endpoint when ANTHROPIC_API_KEY is. A URL is any OpenAI-compatible server.
    """
    env = os.environ if env is None else env
    backend = (backend or env.get("LABELER_BACKEND") or "auto").strip()
    model = model or env.get("LABELER_MODEL") or None
    if backend == "auto":
        if env.get("OPENROUTER_API_KEY"):
            backend = "openrouter"
        elif env.get("ANTHROPIC_API_KEY"):
            backend = "anthropic"
        else:
            raise ConfigError(no_key_message())
    if backend == "openrouter":
        key = env.get("OPENROUTER_API_KEY")
        if not key:
            raise ConfigError(
                "--labeler-backend openrouter needs OPENROUTER_API_KEY (environment or ./.env)."
            )
        return LabelerConfig(model or DEFAULT_LABELER, OPENROUTER_URL, "openrouter", key)
    if backend == "anthropic":
        key = env.get("ANTHROPIC_API_KEY")
        if not key:
            raise ConfigError(
                "--labeler-backend anthropic needs ANTHROPIC_API_KEY (environment or ./.env)."
            )
        # Anthropic's OpenAI-compatible endpoint does not enforce a JSON schema: parse tolerantly.
        return LabelerConfig(
            model or DEFAULT_ANTHROPIC_LABELER, ANTHROPIC_URL, "anthropic", key, structured=False
        )
    if re.match(r"https?://", backend):
        # The openai client insists on some key; a local server ignores it. Without --labeler the
        # model is the one the server serves (see ``discover_model``).
        key = env.get("LABELER_API_KEY") or "not-needed"
        return LabelerConfig(model or "", backend.rstrip("/"), "custom", key)
    raise ConfigError(
        f"--labeler-backend must be auto, openrouter, anthropic or a URL (http://...), not {backend!r}."
    )


def discover_model(config: LabelerConfig, timeout: float = 10.0) -> LabelerConfig:
    """``config`` with its model filled in from the server's ``GET /models`` when none was named.

    A local server usually serves one model (llama.cpp, ``neuroscope serve``, LM Studio with one
    loaded): use it. Several (Ollama, mlx-lm) need ``--labeler``: the error lists them.
    """
    if config.model:
        return config
    import httpx

    url = f"{config.base_url}/models"
    try:
        response = httpx.get(
            url, headers={"Authorization": f"Bearer {config.api_key}"}, timeout=timeout
        )
    except httpx.HTTPError as e:
        raise ConfigError(
            f"Cannot reach the labeler at {config.base_url} ({type(e).__name__}: {e}). "
            "Is the server running? Or name the model with --labeler."
        ) from None
    try:
        response.raise_for_status()
        models = [str(m["id"]) for m in response.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{url} answered {response.status_code} without a list of models; "
            "name the model with --labeler (env LABELER_MODEL)."
        ) from None
    if len(models) != 1:
        listed = ", ".join(models[:20]) + (" ..." if len(models) > 20 else "") or "none"
        raise ConfigError(
            f"The labeler at {config.base_url} serves {len(models)} models ({listed}); "
            "choose one with --labeler (env LABELER_MODEL)."
        )
    return replace(config, model=models[0])


def labeler_name(
    backend: str | None = None, model: str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """The labeler model that labels are filed under, without needing a key (for reading labels)."""
    env = os.environ if env is None else env
    model = model or env.get("LABELER_MODEL")
    if model:
        return model
    backend = backend or env.get("LABELER_BACKEND") or "auto"
    if backend == "anthropic" or (
        backend == "auto" and not env.get("OPENROUTER_API_KEY") and env.get("ANTHROPIC_API_KEY")
    ):
        return DEFAULT_ANTHROPIC_LABELER
    return DEFAULT_LABELER


# ---- answers ---------------------------------------------------------------------------------------


_THINKING = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)


def without_thinking(text: str) -> str:
    """The answer without a reasoning model's ``<think>...</think>`` block (cut off or not)."""
    return _THINKING.sub("", text).strip()


def json_object_in(text: str, key: str | None = None) -> dict[str, Any]:
    """The first JSON object in ``text`` (bare, fenced in ```json, or amid prose); with ``key``, the
    first one that has that key (a model may quote the excerpts' JSON before its answer)."""
    text = without_thinking(text)
    try:
        value = json.loads(text)
        if isinstance(value, dict) and (key is None or key in value):
            return value
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict) and (key is None or key in value):
            return value
    raise UnusableAnswer(f"no JSON object in the answer: {text[:80]!r}")


def response_format(fmt: str, name: str, schema: dict[str, Any]) -> dict[str, Any] | None:
    """The ``response_format`` field for one of :data:`FORMATS` (None: plain text, no field)."""
    if fmt == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": name, "strict": True, "schema": schema},
        }
    if fmt == "json_object":
        return {"type": "json_object"}
    return None


# ---- which format an endpoint takes, remembered between runs ----------------------------------------


class FormatMemory:
    """The best output format each endpoint (base URL and model) took, in a small JSON file.

    Only a refusal moves an endpoint down, and the entry expires after a week, so a server that
    learns JSON schemas gets asked for them again.
    """

    def __init__(self, path: Path | None = None):
        from neuroscope.labels.store import AUTOINTERP_DIR

        self.path = path or cache_root() / AUTOINTERP_DIR / ENDPOINTS_FILE

    @staticmethod
    def key(config: LabelerConfig) -> str:
        return f"{config.base_url} {config.model}"

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, config: LabelerConfig) -> str | None:
        entry = self._read().get(self.key(config))
        if not isinstance(entry, dict) or entry.get("format") not in FORMATS:
            return None
        if time.time() - float(entry.get("time", 0)) > FORMAT_MEMORY_DAYS * 86400:
            return None
        return str(entry["format"])

    def set(self, config: LabelerConfig, fmt: str) -> None:
        data = self._read()
        data[self.key(config)] = {"format": fmt, "time": round(time.time())}
        # A read-only cache costs the next run a refusal, nothing more.
        with contextlib.suppress(OSError):
            write_json_atomic(self.path, data)


# ---- running requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job(Generic[T]):
    """One request: ``parse`` turns the answer's text into a result or raises :class:`UnusableAnswer`."""

    key: int
    messages: list[dict[str, str]]
    schema_name: str
    schema: dict[str, Any]
    parse: Callable[[str], T]
    max_tokens: int = LABEL_MAX_TOKENS


@dataclass(frozen=True)
class Outcome(Generic[T]):
    key: int
    result: T | None
    error: str | None
    attempts: int
    reason: str | None = None  # the kind of failure, for the summary ("unusable answer", "timeout")
    seconds: float = 0.0  # of the request that answered
    tokens: int = 0  # completion tokens of that answer, when the server says
    format: str | None = None  # the output format of that answer

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RunSummary:
    done: int = 0
    failed: int = 0
    retries: int = 0
    seconds: float = 0.0
    failures: Counter[str] = field(default_factory=Counter)  # reason -> count
    tokens: int = 0  # completion tokens of the answers used
    request_seconds: float = 0.0  # time spent in the requests that answered
    format: str = FORMATS[0]  # the output format the run ended with

    @property
    def per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def seconds_per_answer(self) -> float:
        return self.seconds / self.done if self.done else 0.0

    @property
    def tokens_per_second(self) -> float:
        """The endpoint's generation speed, one request's view (completion tokens / its time)."""
        return self.tokens / self.request_seconds if self.request_seconds > 0 else 0.0

    def describe_failures(self) -> str:
        """'2 unusable answer, 1 timeout' (most common first), or '' when none failed."""
        return ", ".join(f"{n} {reason}" for reason, n in self.failures.most_common())


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base_delay: float = 1.0
    max_delay: float = 30.0
    timeout: float = HOSTED_TIMEOUT

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay)
        return min(self.base_delay * 2 ** (attempt - 1), self.max_delay) * (
            0.5 + random.random() / 2
        )


def _retry_after(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


_ABOUT_FORMAT = re.compile(r"response_format|json_schema|json_object|json.?schema|structured", re.I)


def _about_format(error: Exception) -> bool:
    """Does a refusal name the output format (rather than, say, a prompt too long)?"""
    body = getattr(error, "body", None)
    if isinstance(body, dict) and str(body.get("param", "")).startswith("response_format"):
        return True
    return bool(_ABOUT_FORMAT.search(_short(error, 400)))


def _about_model(error: Exception) -> bool:
    body = getattr(error, "body", None)
    if isinstance(body, dict) and (
        body.get("param") == "model" or body.get("code") == "model_not_found"
    ):
        return True
    return bool(re.search(r"\bmodel\b", _short(error, 400), re.I)) and not _about_format(error)


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    tokens: int


def rate(tokens: float, seconds: float) -> str:
    """Tokens per second for people: '38', '2.4', '0.35' (a loaded CPU is that slow)."""
    value = tokens / seconds if seconds > 0 else 0.0
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


class Progress:
    """A bar with the endpoint's speed, and a line per feature where there are few or they are slow.

    Lines go through ``tqdm.write`` so they never tear the bar; failures are always shown, with why.
    """

    def __init__(self, total: int, desc: str, *, enabled: bool, per_feature: bool):
        self.per_feature = per_feature
        self.bar: Any = None
        self.count = 0
        self.total = total
        if enabled and total:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]

            self.bar = tqdm(total=total, desc=desc, unit="feature", dynamic_ncols=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)

    def feature(self, outcome: Outcome[Any], summary: RunSummary) -> None:
        self.count += 1
        if self.bar is None:
            return
        self.bar.update(1)
        self.bar.set_postfix(failed=summary.failed, s_per_feature=f"{summary.seconds_per_answer:.1f}",
                             tok_s=rate(summary.tokens, summary.request_seconds), refresh=False)  # fmt: skip
        where = f"[{self.count}/{self.total}] #{outcome.key}"
        if not outcome.ok:
            self.note(f"{where} failed after {outcome.attempts} tries: {outcome.error}")
        elif self.per_feature:
            speed = f"{rate(outcome.tokens, outcome.seconds)} tok/s, " if outcome.tokens else ""
            shown = outcome.result if isinstance(outcome.result, str) else "ok"
            self.note(f"{where} {shown!r} ({speed}{outcome.seconds:.1f} s, {outcome.format})")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Runner:
    def __init__(
        self,
        config: LabelerConfig,
        policy: RetryPolicy,
        on_done: Callable[[Outcome[Any]], None],
        progress: Progress,
        memory: FormatMemory | None,
    ):
        import openai

        self.openai = openai
        self.config, self.policy, self.on_done, self.progress = config, policy, on_done, progress
        self.client = openai.AsyncOpenAI(
            base_url=config.base_url, api_key=config.api_key, max_retries=0, timeout=policy.timeout
        )
        self.memory = memory
        first = FORMATS.index("json_schema" if config.structured else "text")
        remembered = memory.get(config) if memory is not None and config.structured else None
        self.format = max(first, FORMATS.index(remembered)) if remembered else first
        self.remembered = remembered
        self.summary = RunSummary(format=FORMATS[self.format])
        self.answered = 0  # requests that got any HTTP answer: the server is there
        self.fatal: LabelerError | None = None

    # -- the format -------------------------------------------------------------------------------

    def _move_down(self, fmt: int, why: str) -> None:
        """The server refused format ``fmt - 1``: from now on every request asks for ``fmt``."""
        if fmt <= self.format:
            return
        self.format = fmt
        self.summary.format = FORMATS[fmt]
        self.progress.note(f"The labeler refused that output format ({why}); asking for "
                           f"{FORMATS[fmt]} from now on.")  # fmt: skip
        self._remember()

    def _worked(self, fmt: int) -> None:
        if fmt > self.format:  # a lower format worked where a higher one was refused
            self._move_down(fmt, "an answer came in a lower format")
        elif self.remembered != FORMATS[self.format] and self.config.structured:
            self._remember()

    def _remember(self) -> None:
        if self.memory is not None:
            self.memory.set(self.config, FORMATS[self.format])
            self.remembered = FORMATS[self.format]

    # -- one request ------------------------------------------------------------------------------

    async def ask(self, job: Job[Any], fmt: str, retry: bool) -> Answer:
        kwargs: dict[str, Any] = {
            "model": self.config.model,
            "messages": job.messages,
            "max_tokens": self.config.max_tokens or job.max_tokens,
        }
        if self.config.local:
            # Greedy first; a retry after an unusable answer samples, or it would get the same one.
            kwargs["temperature"] = 0.7 if retry else 0.0
        rf = response_format(fmt, job.schema_name, job.schema)
        if rf is not None:
            kwargs["response_format"] = rf
        completion = await self.client.chat.completions.create(**kwargs)
        self.answered += 1
        if not completion.choices:
            raise UnusableAnswer("the answer has no choices")
        choice = completion.choices[0]
        message = choice.message
        if getattr(message, "refusal", None):
            raise UnusableAnswer(f"refused: {str(message.refusal)[:80]}")
        if not message.content or not without_thinking(message.content):
            raise UnusableAnswer("empty answer")
        usage = getattr(completion, "usage", None)
        tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        return Answer(message.content, choice.finish_reason, tokens)

    async def run_one(self, job: Job[Any]) -> Outcome[Any]:
        o = self.openai
        error, reason = "not tried", "not tried"
        fmt = self.format
        attempt = 0
        retry = False
        unreachable = True  # every try so far failed to connect at all
        cap = self.config.max_tokens or job.max_tokens
        while attempt < self.policy.attempts:
            attempt += 1
            fmt = max(fmt, self.format)  # another request may have learnt of a refusal meanwhile
            retry_after = None
            try:
                started = time.monotonic()
                answer = await self.ask(job, FORMATS[fmt], retry)
                seconds = time.monotonic() - started
                try:
                    result = job.parse(answer.text)
                except UnusableAnswer as e:
                    if answer.finish_reason == "length":
                        raise UnusableAnswer(f"cut off at {cap} tokens: {e}") from None
                    raise
                self._worked(fmt)
                return Outcome(job.key, result, None, attempt, seconds=seconds,
                               tokens=answer.tokens, format=FORMATS[fmt])  # fmt: skip
            except UnusableAnswer as e:
                unreachable, retry = False, True
                error, reason = f"unusable answer ({e})", "unusable answer"
            except o.RateLimitError as e:
                unreachable = False
                error, reason, retry_after = "rate limited (429)", "rate limited", _retry_after(e)
            except o.InternalServerError as e:
                unreachable = False
                error, reason = f"server error ({e.status_code}): {_short(e)}", "server error"
                retry_after = _retry_after(e)
            except o.APITimeoutError:
                unreachable = False
                error = f"no answer within {self.policy.timeout:g} s (raise --timeout for a slow server)"
                reason = "timeout"
            except o.APIConnectionError as e:
                error, reason = f"cannot connect: {e}", "connection"
            except (o.BadRequestError, o.NotFoundError, o.UnprocessableEntityError) as e:
                unreachable = False
                if isinstance(e, o.NotFoundError) and (_about_model(e) or fmt == len(FORMATS) - 1):
                    raise LabelerError(
                        f"The labeler server at {self.config.base_url} does not know model "
                        f"{self.config.model!r} ({e.status_code}: {_short(e)}). Check --labeler."
                    ) from None
                if fmt < len(FORMATS) - 1:
                    # Refused: ask this request again, one format down (not a try of its own). A
                    # refusal that names the format moves every request down at once.
                    fmt = max(fmt + 1, self.format)
                    if _about_format(e):
                        self._move_down(fmt, _short(e))
                    attempt -= 1
                    continue
                error, reason = f"bad request ({e.status_code}): {_short(e)}", "bad request"
                break
            except (o.AuthenticationError, o.PermissionDeniedError) as e:
                raise LabelerError(
                    f"The labeler server at {self.config.base_url} refused the API key "
                    f"({e.status_code}). Check {_key_variable(self.config)}."
                ) from None
            except o.APIStatusError as e:
                unreachable = False
                error, reason = f"HTTP {e.status_code}: {_short(e)}", f"HTTP {e.status_code}"
                if e.status_code < 500 and e.status_code not in (408, 409):
                    break
            if attempt < self.policy.attempts:
                self.summary.retries += 1
                await asyncio.sleep(self.policy.delay(attempt, retry_after))
        if unreachable and self.answered == 0:
            raise LabelerError(
                f"Cannot reach the labeler at {self.config.base_url} ({error}). Is the server running?"
            )
        return Outcome(job.key, None, error, attempt, reason=reason)

    async def worker(self, jobs: Iterable[Job[Any]]) -> None:
        # All workers pull from one iterator: jobs (and their prompts) are built only as needed.
        for job in jobs:
            if self.fatal is not None:
                return
            try:
                outcome = await self.run_one(job)
            except LabelerError as e:
                self.fatal = e
                return
            self.on_done(outcome)
            if outcome.ok:
                self.summary.done += 1
                self.summary.tokens += outcome.tokens
                self.summary.request_seconds += outcome.seconds if outcome.tokens else 0.0
            else:
                self.summary.failed += 1
                self.summary.failures[outcome.reason or "failed"] += 1
            self.summary.seconds = time.monotonic() - self.started
            self.progress.feature(outcome, self.summary)

    async def run(self, jobs: Iterable[Job[Any]], concurrency: int) -> RunSummary:
        self.started = time.monotonic()
        shared = iter(jobs)
        try:
            await asyncio.gather(*(self.worker(shared) for _ in range(concurrency)))
        finally:
            self.summary.seconds = time.monotonic() - self.started
            await self.client.close()
        if self.fatal is not None:
            raise self.fatal
        return self.summary


def _short(error: Exception, limit: int = 160) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        text = body["message"]
    elif isinstance(body, dict):
        text = json.dumps(body)
    else:
        text = str(getattr(error, "message", error))
    return text[:limit]


def _key_variable(config: LabelerConfig) -> str:
    return {"openrouter": "OPENROUTER_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}.get(
        config.provider, "LABELER_API_KEY"
    )


def run_jobs(
    config: LabelerConfig,
    jobs: Iterable[Job[T]],
    on_done: Callable[[Outcome[T]], None],
    *,
    total: int,
    concurrency: int | None = None,
    policy: RetryPolicy | None = None,
    progress: bool = True,
    desc: str = "labelling",
    memory: FormatMemory | None | bool = True,
) -> RunSummary:
    """Run ``jobs`` against the labeler, at most ``concurrency`` at once (default: 50 for a hosted API,
    2 for a server named by URL); ``on_done`` gets each outcome as it completes. ``memory`` remembers
    per endpoint which output format worked (True: in the cache; False: not at all).
    Raises :class:`LabelerError` if the server refuses the key or the model, or cannot be reached."""
    concurrency = config.default_concurrency() if concurrency is None else concurrency
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, not {concurrency}.")
    if not config.model:
        raise ConfigError("No labeler model named; pass --labeler (or call discover_model).")
    if memory is True:
        memory = FormatMemory()
    bar = Progress(total, desc, enabled=progress, per_feature=config.local or total <= 50)
    runner = _Runner(config, policy or config.default_policy(), on_done, bar, memory or None)
    try:
        return asyncio.run(runner.run(jobs, min(concurrency, max(total, 1))))
    finally:
        bar.close()
