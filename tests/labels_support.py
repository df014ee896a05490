"""Test helpers for the labels area: a stand-in backend with known activations, a local
OpenAI-compatible server that misbehaves on purpose, and a static file server. Nothing reaches an
outside host: every server binds 127.0.0.1 on a free port."""

from __future__ import annotations

import json
import re
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from neuroscope.backend import BatchStats
from neuroscope.labels import examples as ex

BOS = 0


class RuleBackend:
    """A backend whose SAE activations follow a known rule, reduced exactly as ``BatchStats`` says.

    Token ``t`` (t >= 1) fires feature ``t % width`` with activation ``strength[t] * (1 + pos / 1000)``,
    and nothing else; BOS (id 0) and padding never count. So a test knows every activation.
    """

    def __init__(self, width: int, vocab: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.width, self.vocab = width, vocab
        self.strength = (1.0 + rng.random(vocab)).astype(np.float32)
        self.calls: list[int] = []  # batch sizes seen

    def activations(self, seq: Sequence[int]) -> np.ndarray:
        """[len(seq), width] activations of one sequence, position 0 zeroed."""
        acts = np.zeros((len(seq), self.width), np.float32)
        for pos, t in enumerate(seq):
            if pos > 0 and t != BOS:
                acts[pos, t % self.width] = self.strength[t] * (1 + pos / 1000)
        return acts

    def batch_feature_stats(
        self, batch: Sequence[Sequence[int]], layer: int, top_n: int = 0
    ) -> BatchStats:
        self.calls.append(len(batch))
        seq_len = max(len(s) for s in batch)
        acts = np.zeros((len(batch) * seq_len, self.width), np.float32)
        for r, seq in enumerate(batch):
            acts[r * seq_len : r * seq_len + len(seq)] = self.activations(seq)
        fired = acts > 0
        count = fired.sum(0).astype(np.int64)
        top_values = top_tokens = None
        if top_n:
            order = np.argsort(-acts, axis=0, kind="stable")[:top_n].T  # [width, n]
            top_values = np.take_along_axis(acts.T, order, axis=1)
            top_tokens = np.where(top_values > 0, order, -1).astype(np.int64)
            if order.shape[1] < top_n:
                pad = top_n - order.shape[1]
                top_values = np.pad(top_values, ((0, 0), (0, pad)))
                top_tokens = np.pad(top_tokens, ((0, 0), (0, pad)), constant_values=-1)
        return BatchStats(
            tokens=int(sum(len(s) - 1 for s in batch)), seq_len=seq_len, fire_count=count,
            act_sum=acts.sum(0).astype(np.float64), act_m2=np.zeros(self.width), act_max=acts.max(0),
            top_values=top_values, top_tokens=top_tokens,
        )  # fmt: skip


def token_text(t: int) -> str:
    return f"t{t} "


def decode(batch: list[list[int]]) -> list[str]:
    """A batch decoder that skips BOS, like ``tokenizer.batch_decode(skip_special_tokens=True)``."""
    return ["".join(token_text(t) for t in ids if t != BOS) for ids in batch]


def random_corpus(n: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[BOS, *rng.integers(1, vocab, size=length - 1).tolist()] for _ in range(n)]


def make_examples(
    folder: Path, width: int = 12, vocab: int = 48, samples: int = 40, top_n: int = 8,
    model: str = "test/model", sae: str = "test/sae", negatives: int = 30,
) -> RuleBackend:  # fmt: skip
    """A finished examples folder from the real corpus pass over a RuleBackend."""
    backend = RuleBackend(width, vocab)
    seqs = random_corpus(samples, 14, vocab)
    top = ex.collect(backend, seqs, 0, width, top_n=top_n, batch_size=4, before=3, after=1)  # type: ignore[arg-type]
    negs = ex.collect_negatives(backend, seqs, 0, count=negatives, length=top.window, bos=BOS)  # type: ignore[arg-type]
    ex.write_examples(folder, top, decode, negs, {"model": model, "sae": sae, "layer": 0})
    return backend


# Word groups for excerpts a language model can read: with the RuleBackend's rule (token t fires
# feature t % width) and width == len(WORD_GROUPS), feature g fires on the words of group g.
WORD_GROUPS = (
    ("Paris", "Berlin", "Rome", "Madrid", "Vienna", "Lisbon", "Prague", "Oslo"),
    ("seven", "twelve", "three", "forty", "nine", "eighty", "two", "sixty"),
    ("red", "blue", "green", "yellow", "purple", "orange", "violet", "brown"),
    ("dog", "cat", "horse", "rabbit", "tiger", "sheep", "mouse", "eagle"),
)


def word_of(t: int) -> str:
    group = WORD_GROUPS[t % len(WORD_GROUPS)]
    return group[(t // len(WORD_GROUPS)) % len(group)]


def decode_words(batch: list[list[int]]) -> list[str]:
    return [" ".join(word_of(t) for t in ids if t != BOS) for ids in batch]


def make_word_examples(folder: Path, samples: int = 30, top_n: int = 5) -> None:
    """A finished examples folder whose excerpts are words; feature g fires on WORD_GROUPS[g]."""
    width = len(WORD_GROUPS)
    vocab = 1 + width * len(WORD_GROUPS[0])
    backend = RuleBackend(width, vocab)
    seqs = random_corpus(samples, 12, vocab)
    top = ex.collect(backend, seqs, 0, width, top_n=top_n, batch_size=8, before=3, after=2)  # type: ignore[arg-type]
    negs = ex.collect_negatives(backend, seqs, 0, count=10, length=top.window, bos=BOS)  # type: ignore[arg-type]
    meta = {"model": "test/words", "sae": "test/word-sae", "layer": 0}
    ex.write_examples(folder, top, decode_words, negs, meta)


def feature_of_text(text: str, width: int) -> set[int]:
    """Features that fire somewhere in a rendered excerpt (by the RuleBackend's rule)."""
    return {int(t) % width for t in re.findall(r"t(\d+)", text)}


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (timeout test) leaves a broken pipe: expected


# ---- a local OpenAI-compatible server ------------------------------------------------------------------


class FakeLabeler:
    """``POST /v1/chat/completions`` on 127.0.0.1, scripted per feature (found from the prompt).

    ``script(feature, attempt)`` returns "ok", "429", "500", "garbage", "refuse", "wrong", "cut"
    (rambles until max_tokens), or a plain-text way of writing the label: "lone" (the phrase alone),
    "prose" (JSON amid prose), "fence" (JSON in a code fence), "colon" (the phrase on the line after
    a colon); the default answers correctly in JSON. Labels are ``label of f<feature>``; detection
    answers use the rule. ``reject_formats`` lists the ``response_format`` types refused with a 400,
    worded as real servers word it (``reject_schema``: every one); ``models`` is what ``GET
    /v1/models`` lists.
    """

    def __init__(self, width: int, script: Callable[[int, int], str] | None = None, *,
                 delay: float = 0.0, slow_seconds: float = 1.0, reject_schema: bool = False,
                 reject_formats: Sequence[str] = (), status_for_all: int | None = None,
                 models: Sequence[str] = ("test/labeler",)):  # fmt: skip
        self.width, self.script, self.delay = width, script or (lambda f, a: "ok"), delay
        self.slow_seconds = slow_seconds
        self.reject_schema, self.status_for_all = reject_schema, status_for_all
        self.reject_formats, self.models = set(reject_formats), list(models)
        self.requests: list[dict[str, Any]] = []
        self.attempts: Counter[tuple[str, int]] = Counter()
        self.lock = threading.Lock()
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeLabeler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def features_requested(self, kind: str = "label") -> Counter[int]:
        return Counter(r["feature"] for r in self.requests if r["kind"] == kind)

    def _answer(self, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        user = body["messages"][-1]["content"]
        if "Label: " in user:
            kind = "detect"
            found = re.search(r"Label: label of f(\d+)", user)
        else:
            kind = "label"
            found = re.search(r"<<t(\d+) >>", user)
        # Excerpts from a real tokenizer carry no feature number: name them by their text.
        feature = int(found.group(1)) % self.width if found else zlib.crc32(user.encode()) % 10**6
        with self.lock:
            self.attempts[(kind, feature)] += 1
            attempt = self.attempts[(kind, feature)]
            self.requests.append(
                {
                    "kind": kind,
                    "feature": feature,
                    "attempt": attempt,
                    "body": body,
                    "time": time.time(),
                }
            )
        if self.status_for_all:
            return (
                self.status_for_all,
                {},
                {"error": {"message": "nope", "type": "invalid_request_error"}},
            )
        if self.reject_schema and "response_format" in body:
            return (
                400,
                {},
                {
                    "error": {
                        "message": "response_format is not supported",
                        "type": "invalid_request_error",
                    }
                },
            )
        fmt = (body.get("response_format") or {}).get("type")
        if fmt in self.reject_formats:
            # As `neuroscope serve` (param named) and LM Studio (message only) refuse.
            error = (
                {"message": f'response_format type "{fmt}" is not supported; only \'text\' is.',
                 "type": "invalid_request_error", "param": "response_format", "code": "unsupported_value"}
                if fmt == "json_schema"
                else {"message": "'response_format.type' must be 'json_schema' or 'text'", "type": "invalid_request_error"}
            )  # fmt: skip
            return 400, {}, {"error": error}
        action = self.script(feature, attempt)
        if action == "slow":  # longer than the client waits: it gives up and retries
            time.sleep(self.slow_seconds)
        if action == "429":
            return (
                429,
                {"Retry-After": "0"},
                {"error": {"message": "slow down", "type": "rate_limit"}},
            )
        if action == "500":
            return 500, {}, {"error": {"message": "boom", "type": "server_error"}}
        if action == "garbage":
            return 200, {}, _completion(body, "Sure! Here are my thoughts about these excerpts.")
        if action == "refuse":
            return 200, {}, _completion(body, None, refusal="I can't help with that.")
        if action == "cut":
            words = " ".join(["the excerpts all share a theme"] * 40)
            return 200, {}, _completion(body, f"Let me think: {words}", finish="length")
        label = f"label of f{feature}"
        plain = {
            "lone": f"{label}\n",
            "prose": f'Looking at the excerpts, my answer is {{"label": "{label}"}}. Hope it helps!',
            "fence": f'```json\n{{"label": "{label}"}}\n```',
            "colon": f"The excerpts share one concept. The feature detects:\n\n**{label}**",
        }
        if kind == "label" and action in plain:
            return 200, {}, _completion(body, plain[action])
        if kind == "label":
            return 200, {}, _completion(body, json.dumps({"label": f"label of f{feature}"}))
        excerpts = re.findall(r"^(\d+)\. (.*)$", user.split("Excerpts:", 1)[1], re.MULTILINE)
        truth = [int(n) for n, text in excerpts if feature in feature_of_text(text, self.width)]
        if action == "wrong":
            truth = [int(n) for n, _ in excerpts if int(n) not in truth]
        return 200, {}, _completion(body, "```json\n" + json.dumps({"activating": truth}) + "\n```")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                data = json.dumps(
                    {"object": "list", "data": [{"id": m, "object": "model"} for m in outer.models]}
                ).encode()
                self.send_response(200 if self.path.rstrip("/") == "/v1/models" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, headers, payload = outer._answer(body)  # recorded on arrival
                if outer.delay:
                    time.sleep(outer.delay)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _completion(
    body: dict[str, Any], content: str | None, refusal: str | None = None, finish: str = "stop"
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": finish,
                     "message": {"role": "assistant", "content": content, "refusal": refusal}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }  # fmt: skip


# ---- a static file server --------------------------------------------------------------------------------


class FileServer:
    """Serves ``routes`` (path -> (status, body bytes)) on 127.0.0.1; records the paths asked for."""

    def __init__(self, routes: dict[str, tuple[int, bytes]]):
        self.routes, self.hits = routes, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer.hits.append(self.path)
                status, data = outer.routes.get(self.path.split("?")[0], (404, b"not found"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
