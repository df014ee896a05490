"""Fuzzing the chat API from its own OpenAPI document with schemathesis, against a real server.

schemathesis reads ``/openapi.json`` and sends valid and invalid requests to every operation. Bounded
(a fixed number of examples per operation, a short context so no reply is long): no answer may be
a 5xx, none may hang past the request timeout, and the server must answer a normal request after.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import httpx
import pytest
from conftest import requires_torch
from serve_support import start_server

pytestmark = [pytest.mark.torch, requires_torch, pytest.mark.slow]

KEY = "sk-neuroscope-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_EXAMPLES = 40  # fuzzing cases per operation; with the coverage phase ~450 requests
REQUEST_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def server(tiny_model, tiny_sae):
    # A short context keeps every generated reply short, so the run is bounded in time.
    server = start_server(tiny_model, tiny_sae["npz"], api_key=KEY, max_model_len=32)
    yield server
    server.stop()


def test_the_published_schema_describes_the_chat_api(server) -> None:
    chat = server.listening.chat_url
    assert httpx.get(chat + "/openapi.json").status_code == 401
    doc = httpx.get(chat + "/openapi.json", headers=AUTH).json()
    assert doc["openapi"].startswith("3.")
    post = doc["paths"]["/v1/chat/completions"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["messages"] and "temperature" in body["properties"]
    assert {"/v1/models", "/health"} <= set(doc["paths"])


def test_schemathesis_finds_no_server_error_and_no_hang(server) -> None:
    st = shutil.which("st", path=str(__import__("pathlib").Path(sys.executable).parent))
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    chat = server.listening.chat_url
    started = time.monotonic()
    run = subprocess.run(
        [
            st,
            "run",
            chat + "/openapi.json",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--request-timeout",
            str(REQUEST_TIMEOUT_S),
            "--seed",
            "20261201",
            "--generation-deterministic",
            "--workers",
            "1",
            "--phases",
            "coverage,fuzzing",
            "--no-color",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,  # a hang shows as this timeout; the run itself takes 1-3 min on a free CPU
    )
    took = time.monotonic() - started
    report = run.stdout[-6000:] + run.stderr[-2000:]
    print(f"schemathesis: {took:.0f} s\n{report}")
    assert run.returncode == 0, report
    assert "No issues found" in run.stdout or "passed" in run.stdout, report
    # Alive afterwards: health and a real completion.
    assert httpx.get(chat + "/health").status_code == 200
    reply = httpx.post(
        chat + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        headers=AUTH,
        timeout=30,
    )
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None
