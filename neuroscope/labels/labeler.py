"""Talking to the labeler: which OpenAI-compatible server, with which key, and how requests are run.

One request per feature, through the ``openai`` client, ``concurrency`` at a time. The client's own
retries are off so that every retry is ours and counted: 429 and 5xx, timeouts, dropped connections
and unusable answers (malformed, empty, refused) are retried with exponential backoff and jitter
(a server's ``Retry-After`` is honoured), then recorded as failed; the run goes on and finishes.
Each outcome is handed to ``on_done`` the moment it arrives, so the caller can write it to disk before
anything else happens: an interrupted run loses no answer it paid for.

API keys are read from the environment (and ``./.env``); they are never printed, logged or written.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from neuroscope.errors import ConfigError, NeuroscopeError

DEFAULT_LABELER = "deepseek/deepseek-v3.2"
DEFAULT_ANTHROPIC_LABELER = "claude-haiku-4-5"
OPENROUTER_URL = "https://openrouter.ai/api/v1"
ANTHROPIC_URL = "https://api.anthropic.com/v1/"
KEY_VARIABLES = ("OPENROUTER_API_KEY", "ANTHROPIC_API_KEY")

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
    structured: bool = True  # ask for JSON-schema output (turned off where unsupported)


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
        # The openai client insists on some key; a local server ignores it.
        key = env.get("LABELER_API_KEY") or "not-needed"
        return LabelerConfig(model or DEFAULT_LABELER, backend.rstrip("/"), "custom", key)
    raise ConfigError(
        f"--labeler-backend must be auto, openrouter, anthropic or a URL (http://...), not {backend!r}."
    )


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


def json_object_in(text: str) -> dict[str, Any]:
    """The first JSON object in ``text`` (bare, fenced in ```json, or amid prose)."""
    text = text.strip()
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            return value
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise UnusableAnswer(f"no JSON object in the answer: {text[:80]!r}")


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}


# ---- running requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job(Generic[T]):
    """One request: ``parse`` turns the answer's text into a result or raises :class:`UnusableAnswer`."""

    key: int
    messages: list[dict[str, str]]
    schema_name: str
    schema: dict[str, Any]
    parse: Callable[[str], T]


@dataclass(frozen=True)
class Outcome(Generic[T]):
    key: int
    result: T | None
    error: str | None
    attempts: int

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RunSummary:
    done: int = 0
    failed: int = 0
    retries: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base_delay: float = 1.0
    max_delay: float = 30.0
    timeout: float = 90.0

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


class _Runner:
    def __init__(
        self,
        config: LabelerConfig,
        policy: RetryPolicy,
        on_done: Callable[[Outcome[Any]], None],
        progress: Any,
    ):
        import openai

        self.openai = openai
        self.config, self.policy, self.on_done, self.progress = config, policy, on_done, progress
        self.client = openai.AsyncOpenAI(
            base_url=config.base_url, api_key=config.api_key, max_retries=0, timeout=policy.timeout
        )
        self.structured = config.structured
        self.summary = RunSummary()
        self.fatal: LabelerError | None = None

    async def ask(self, job: Job[Any]) -> str:
        kwargs: dict[str, Any] = {"model": self.config.model, "messages": job.messages}
        if self.structured:
            kwargs["response_format"] = response_format(job.schema_name, job.schema)
        completion = await self.client.chat.completions.create(**kwargs)
        if not completion.choices:
            raise UnusableAnswer("the answer has no choices")
        message = completion.choices[0].message
        if getattr(message, "refusal", None):
            raise UnusableAnswer(f"refused: {str(message.refusal)[:80]}")
        if not message.content or not message.content.strip():
            raise UnusableAnswer("empty answer")
        return message.content

    async def run_one(self, job: Job[Any]) -> Outcome[Any]:
        o = self.openai
        error = "not tried"
        attempt = 0
        while attempt < self.policy.attempts:
            attempt += 1
            retry_after = None
            try:
                return Outcome(job.key, job.parse(await self.ask(job)), None, attempt)
            except UnusableAnswer as e:
                error = f"unusable answer ({e})"
            except o.RateLimitError as e:
                error, retry_after = "rate limited (429)", _retry_after(e)
            except o.InternalServerError as e:
                error, retry_after = f"server error ({e.status_code})", _retry_after(e)
            except (o.APITimeoutError, o.APIConnectionError) as e:
                error = f"{type(e).__name__}: {e}"
            except (o.BadRequestError, o.NotFoundError, o.UnprocessableEntityError) as e:
                if self.structured:
                    # Some servers (or OpenRouter's routing, with a 404) reject JSON-schema output:
                    # ask in plain text from now on; the prompt asks for JSON anyway.
                    self.structured = False
                    attempt -= 1
                    continue
                if isinstance(e, o.NotFoundError):
                    raise LabelerError(
                        f"The labeler server at {self.config.base_url} does not know model "
                        f"{self.config.model!r} (404). Check --labeler."
                    ) from None
                error = f"bad request ({e.status_code}): {_short(e)}"
                break
            except (o.AuthenticationError, o.PermissionDeniedError) as e:
                raise LabelerError(
                    f"The labeler server at {self.config.base_url} refused the API key "
                    f"({e.status_code}). Check {_key_variable(self.config)}."
                ) from None
            except o.APIStatusError as e:
                error = f"HTTP {e.status_code}: {_short(e)}"
                if e.status_code < 500 and e.status_code not in (408, 409):
                    break
            if attempt < self.policy.attempts:
                self.summary.retries += 1
                await asyncio.sleep(self.policy.delay(attempt, retry_after))
        return Outcome(job.key, None, error, attempt)

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
            else:
                self.summary.failed += 1
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix(failed=self.summary.failed, refresh=False)

    async def run(self, jobs: Iterable[Job[Any]], concurrency: int) -> RunSummary:
        started = time.monotonic()
        shared = iter(jobs)
        try:
            await asyncio.gather(*(self.worker(shared) for _ in range(concurrency)))
        finally:
            self.summary.seconds = time.monotonic() - started
            await self.client.close()
        if self.fatal is not None:
            raise self.fatal
        return self.summary


def _short(error: Exception) -> str:
    body = getattr(error, "body", None)
    text = json.dumps(body) if isinstance(body, dict) else str(getattr(error, "message", error))
    return text[:120]


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
    concurrency: int = 50,
    policy: RetryPolicy | None = None,
    progress: bool = True,
    desc: str = "labelling",
) -> RunSummary:
    """Run ``jobs`` against the labeler, at most ``concurrency`` at once; ``on_done`` gets each outcome
    as it completes. Raises :class:`LabelerError` if the server refuses the key or the model."""
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, not {concurrency}.")
    bar = None
    if progress and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="label", dynamic_ncols=True)
    runner = _Runner(config, policy or RetryPolicy(), on_done, bar)
    try:
        return asyncio.run(runner.run(jobs, min(concurrency, max(total, 1))))
    finally:
        if bar is not None:
            bar.close()
