"""The model's name in the chat API: ``--served-model-name``, the default for a file (its stem) and
for a repo id or folder (as given), and the given name still accepted in requests."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import requires_torch
from serve_support import start_server
from typer.testing import CliRunner

from neuroscope.cli import app
from neuroscope.server.chat import default_served_name

HELLO = [{"role": "user", "content": "Hello"}]


def test_the_default_name_is_a_files_stem_or_the_name_given(tmp_path: Path) -> None:
    gguf = tmp_path / "SmolLM2-135M-Instruct-Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert default_served_name(str(gguf)) == "SmolLM2-135M-Instruct-Q8_0"
    assert default_served_name("google/gemma-2-2b-it") == "google/gemma-2-2b-it"
    assert default_served_name(str(tmp_path)) == str(tmp_path)  # a folder: as given
    assert default_served_name("x" * 5000) == "x" * 5000  # not a path at all


def test_serve_takes_layer_like_the_other_commands() -> None:
    # --layer is parsed (an unknown option would fail first); the bad threshold is then reported.
    result = CliRunner().invoke(
        app, ["serve", "--model", "/nonexistent", "--layer", "3", "--filter-threshold", "2"]
    )
    assert "No such option" not in result.output
    assert result.exit_code == 1 and "--filter-threshold is a firing rate" in result.output


@pytest.mark.torch
@requires_torch
def test_served_model_name_is_listed_and_the_given_name_still_works(tiny_model, tiny_sae) -> None:
    server = start_server(tiny_model, tiny_sae["npz"], served_model_name="tiny-gemma")
    try:
        chat = server.listening.chat_url
        assert [m["id"] for m in httpx.get(chat + "/v1/models").json()["data"]] == ["tiny-gemma"]
        assert httpx.get(chat + "/v1/models/tiny-gemma").status_code == 200
        assert httpx.get(chat + "/health").json()["model"] == "tiny-gemma"
        for url in (chat, server.listening.features_url):  # the page sends this name in its chats
            assert httpx.get(url + "/page.json").json()["model"] == "tiny-gemma"
        for name, status in (("tiny-gemma", 200), (str(tiny_model), 200), ("gpt-4o", 404)):
            r = httpx.post(
                chat + "/v1/chat/completions",
                json={"model": name, "messages": HELLO, "max_tokens": 2},
                timeout=60,
            )
            assert r.status_code == status, (name, r.text)
            if status == 200:
                assert r.json()["model"] == "tiny-gemma"
            else:
                assert r.json()["error"]["code"] == "model_not_found"
                assert "tiny-gemma" in r.json()["error"]["message"]
    finally:
        server.stop()
