"""`neuroscope serve` as a user runs it: a subprocess that loads, says where it listens, serves,
and shuts down cleanly on SIGINT and SIGTERM, even with streams open."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import requires_torch
from serve_support import TINY_LAYER, FeatureStream, build_long_context_model
from typer.testing import CliRunner

from neuroscope.cli import app

HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


class ServeProcess:
    """``neuroscope serve ...`` in a subprocess; its output is collected line by line."""

    def __init__(self, args: list[str], env_extra: dict[str, str], tmp: Path):
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "NEUROSCOPE_CACHE": str(tmp / "cache"),
            **env_extra,
        }
        env.pop("NEUROSCOPE_API_KEY", None)
        env.pop("LABELER_MODEL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from neuroscope.cli import app; app()", "serve", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if found := re.search(pattern, line):
                        return found
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, f"no {pattern!r} in:\n" + "\n".join(
                    self.lines
                )
                self._changed.wait(min(left, 0.5))

    def urls(self) -> tuple[str, str]:
        chat = self.wait_for(r"Chat API \(OpenAI\):\s+(http://\S+)/v1$").group(1)
        features = self.wait_for(r"Feature stream:\s+(http://\S+)/v1/features/stream$").group(1)
        return chat, features

    def stop(self, sig: signal.Signals, timeout: float = 20.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def serve_args(model: Path, sae: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--sae-local-path", str(sae), "--sae-layer", str(TINY_LAYER),
        "--backend", "torch", "--top-k", "3", "--port", "0", "--features-port", "0", *extra,
    ]  # fmt: skip


@pytest.mark.torch
@requires_torch
def test_serve_reports_options_caps_the_context_and_stops_on_sigint(
    tiny_model, tiny_sae, tmp_path
) -> None:
    args = serve_args(
        tiny_model, tiny_sae["npz"], "--max-model-len", "64", "--labeler", "some/model"
    )
    server = ServeProcess(args, {}, tmp_path)
    try:
        chat, features = server.urls()
        server.wait_for(r"No calibration stats .* feature filter 'combined' is off")
        server.wait_for(r"Labels for layer 2: 0 of 128 features")
        server.wait_for(r"Loaded .* SAE at layer 2 .* top-k 3")
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", chat) and chat != features

        too_long = httpx.post(
            chat + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hello " * 20}]},
        )
        assert (
            too_long.status_code == 400
            and too_long.json()["error"]["code"] == "context_length_exceeded"
        )
        capped = httpx.post(
            chat + "/v1/chat/completions",
            json={"messages": HELLO, "max_tokens": 1000, "temperature": 0},
            timeout=60,
        ).json()
        assert capped["choices"][0]["finish_reason"] == "length"
        assert capped["usage"]["total_tokens"] == 64  # the reply fills what the prompt leaves

        assert server.stop(signal.SIGINT) == 0
        server.wait_for("Shutting down")
        server.wait_for("^Stopped.$")
        assert not any("Traceback" in line for line in server.lines)
    finally:
        server.kill()


CORPUS = [
    "The capital of France is Paris. Paris is a city on the Seine, known for art and food.",
    "Language models read tokens and write tokens.",
    "Sparse autoencoders find features in the residual stream of a language model.",
    "Hello! How are you today? I am fine, thank you. Please tell me a story about a cat and a dog.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of Germany is Berlin; Rome is the capital of Italy.",
] * 2


def calibrate(model: Path, sae: Path, tmp: Path) -> Path:
    from neuroscope.calibration import run_calibration
    from neuroscope.sae import DEFAULT_SAE_REPO

    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(f"{text} ({i})" for i, text in enumerate(CORPUS)))
    stats = run_calibration(
        model=str(model), layer=TINY_LAYER, sae=DEFAULT_SAE_REPO, sae_local_path=str(sae),
        corpus_path=corpus, samples=len(CORPUS), output=tmp / "stats.safetensors", backend="torch",
        batch_size=4, max_length=24, checkpoint_every=0, progress=False,
    )  # fmt: skip
    assert stats.path is not None
    return stats.path


@pytest.mark.torch
@requires_torch
def test_sigterm_with_open_streams_ends_them_and_exits_cleanly(tiny_sae, tmp_path) -> None:
    model = build_long_context_model(tmp_path / "long")
    stats = calibrate(model, tiny_sae["npz"], tmp_path)
    args = serve_args(model, tiny_sae["npz"], "--calibration-path", str(stats))
    server = ServeProcess(args, {}, tmp_path)
    try:
        chat, features = server.urls()
        server.wait_for(r"^Feature filter 'combined' \(threshold 0\.5\)\.$")
        with FeatureStream(features) as stream:
            body = {"messages": HELLO, "max_tokens": 3000, "temperature": 0, "stream": True}
            with httpx.stream(
                "POST", chat + "/v1/chat/completions", json=body, timeout=60
            ) as reply:
                rid = reply.headers["x-request-id"]
                lines = reply.iter_lines()
                for line in lines:
                    if '"content":"' in line and '"role"' not in line:
                        break  # generating
                started = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
            assert server.proc.wait(20) == 0
            assert time.monotonic() - started < 15
        errors = [json.loads(line[6:]) for line in rest if line.startswith('data: {"error"')]
        assert (
            errors and errors[0]["error"]["code"] == "shutting_down" and rest[-1] == "data: [DONE]"
        )
        assert stream.ended
        # The calibrated filter ran: surprise-ranked features and a filtered count on every record.
        records = stream.records(rid)
        assert records and all("filtered_count" in r for r in records)
        assert all("surprise" in f for r in records for f in r["top_features"])
        server.wait_for("^Stopped.$")
        assert not any("Traceback" in line for line in server.lines)
    finally:
        server.kill()


def test_a_port_in_use_fails_fast_before_loading(tmp_path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        args = [
            "--model",
            str(tmp_path / "not-loaded"),
            "--port",
            str(port),
            "--features-port",
            "0",
        ]
        server = ServeProcess(args, {}, tmp_path)
        assert server.proc.wait(60) == 1
        output = "\n".join(server.lines)
        assert f"Port {port} on 127.0.0.1 is in use" in output and "--port" in output
        assert "Loading" not in output
    finally:
        taken.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--feature-filter", "loud"],
            "--feature-filter must be one of none, frequency, surprise, combined",
        ),
        (["--filter-threshold", "1.5"], "--filter-threshold is a firing rate between 0 and 1"),
        (["--header-timeout", "0"], "--header-timeout must be positive"),
        (["--max-connections", "0"], "--max-connections must be at least 1"),
    ],
)
def test_bad_filter_options_fail_before_anything_loads(args, message) -> None:
    result = CliRunner().invoke(app, ["serve", "--model", "/nonexistent", *args])
    assert result.exit_code == 1 and message in result.output and "Loading" not in result.output


@pytest.mark.torch
@requires_torch
def test_max_model_len_beyond_the_model_is_refused(tiny_model, tiny_sae) -> None:
    args = ["serve", *serve_args(tiny_model, tiny_sae["npz"], "--max-model-len", "100000")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "--max-model-len 100000 exceeds the model's context of 256 tokens" in result.output
