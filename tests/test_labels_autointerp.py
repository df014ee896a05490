"""Labelling against a local OpenAI-compatible server that rate-limits, fails, times out and talks
nonsense on purpose: labels land, retries happen, failures are recorded, reruns and killed runs
repeat no request that was answered."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from labels_support import FakeLabeler, make_examples

from neuroscope.errors import ConfigError
from neuroscope.labels import examples as ex
from neuroscope.labels import store
from neuroscope.labels.autointerp import generate_labels, label_messages, parse_label
from neuroscope.labels.labeler import (
    DEFAULT_LABELER,
    LABEL_MAX_TOKENS,
    LabelerConfig,
    LabelerError,
    RetryPolicy,
    UnusableAnswer,
    discover_model,
    labeler_name,
    load_dotenv,
    resolve_labeler,
)

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, timeout=5.0)
WIDTH = 12


@pytest.fixture
def examples_folder(tmp_path: Path) -> Path:
    make_examples(tmp_path / "examples", width=WIDTH)
    return tmp_path / "examples"


def config_for(server: FakeLabeler, structured: bool = True) -> LabelerConfig:
    return LabelerConfig("test/labeler", server.url, "custom", "not-needed", structured)


def script(feature: int, attempt: int) -> str:
    if feature == 7:
        return "garbage"  # never usable: recorded as failed
    if attempt == 1:
        return {1: "429", 2: "500", 3: "garbage", 0: "ok"}[feature % 4]
    return "ok"


def test_labels_land_retries_happen_failures_are_recorded(
    examples_folder: Path, tmp_path: Path
) -> None:
    labels_folder = tmp_path / "labels"
    with FakeLabeler(WIDTH, script) as server:
        result = generate_labels(
            examples_folder,
            labels_folder,
            config_for(server),
            concurrency=4,
            policy=FAST,
            progress=False,
        )
    records = store.Journal(labels_folder / store.LABELS_FILE).load()
    assert store.ok_labels(records) == {i: f"label of f{i}" for i in range(WIDTH) if i != 7}
    assert (
        records[7]["status"] == "failed"
        and "unusable" in records[7]["error"]
        and records[7]["attempts"] == 3
    )
    requested = server.features_requested()
    assert requested[7] == 3
    assert all(requested[i] == (1 if i % 4 == 0 else 2) for i in range(WIDTH) if i != 7)
    assert result.summary.done == WIDTH - 1 and result.summary.failed == 1
    assert result.summary.retries == sum(requested.values()) - WIDTH
    assert result.labelled_total == WIDTH - 1
    # Structured output was asked for, and the labeler saw the labelling examples only.
    body = server.requests[0]["body"]
    assert body["model"] == "test/labeler" and body["response_format"]["type"] == "json_schema"
    feature = next(
        f for f in ex.iter_features(examples_folder) if f.index == server.requests[0]["feature"]
    )
    prompt = body["messages"][-1]["content"]
    assert all(e.marked() in prompt for e in feature.for_labeling())
    assert not any(e.marked() in prompt for e in feature.held_out())
    assert store.read_meta(labels_folder)["labeler"] == "test/labeler"


def test_a_rerun_asks_only_for_what_is_missing(examples_folder: Path, tmp_path: Path) -> None:
    labels_folder = tmp_path / "labels"
    with FakeLabeler(WIDTH, script) as server:
        generate_labels(
            examples_folder,
            labels_folder,
            config_for(server),
            concurrency=3,
            policy=FAST,
            progress=False,
        )
    with FakeLabeler(WIDTH) as server:  # now feature 7 gets a usable answer
        result = generate_labels(
            examples_folder,
            labels_folder,
            config_for(server),
            concurrency=3,
            policy=FAST,
            progress=False,
        )
        assert server.features_requested() == {7: 1}
    assert result.skipped_done == WIDTH - 1 and result.labelled_total == WIDTH
    with FakeLabeler(WIDTH) as server:
        generate_labels(
            examples_folder, labels_folder, config_for(server), policy=FAST, progress=False
        )
        assert server.requests == []
    lines = (labels_folder / store.LABELS_FILE).read_text().splitlines()
    assert len(lines) == WIDTH  # compacted: one record per feature


def test_only_the_features_asked_for(examples_folder: Path, tmp_path: Path) -> None:
    with FakeLabeler(WIDTH) as server:
        result = generate_labels(
            examples_folder,
            tmp_path / "l",
            config_for(server),
            features=[2, 5, 500],
            policy=FAST,
            progress=False,
        )
    assert sorted(server.features_requested()) == [2, 5]
    assert result.without_examples == 1


def test_timeouts_and_refusals_are_retried_then_recorded(
    examples_folder: Path, tmp_path: Path
) -> None:
    def slow_or_refusing(feature: int, attempt: int) -> str:
        if feature == 4:
            return "refuse"
        return "slow" if feature == 5 and attempt == 1 else "ok"

    policy = RetryPolicy(attempts=2, base_delay=0.01, timeout=0.5)
    with FakeLabeler(WIDTH, slow_or_refusing, slow_seconds=2.0) as server:
        generate_labels(
            examples_folder,
            tmp_path / "l",
            config_for(server),
            concurrency=4,
            policy=policy,
            progress=False,
        )
        assert server.features_requested()[5] == 2 and server.features_requested()[4] == 2
    records = store.Journal(tmp_path / "l" / store.LABELS_FILE).load()
    assert records[5]["status"] == "ok" and records[5]["attempts"] == 2
    assert records[4]["status"] == "failed" and "refused" in records[4]["error"]


def test_servers_without_json_schema_get_plain_requests(
    examples_folder: Path, tmp_path: Path
) -> None:
    with FakeLabeler(WIDTH, reject_schema=True) as server:
        result = generate_labels(
            examples_folder,
            tmp_path / "l",
            config_for(server),
            concurrency=1,
            policy=FAST,
            progress=False,
        )
    assert result.summary.done == WIDTH and result.summary.failed == 0
    with_format = [
        r["body"]["response_format"]["type"]
        for r in server.requests
        if "response_format" in r["body"]
    ]
    assert with_format == ["json_schema", "json_object"] and len(server.requests) == WIDTH + 2
    assert result.summary.format == "text"


PLAIN = ("lone", "prose", "fence", "colon")


def test_refusals_of_json_schema_then_json_object_still_yield_labels_in_plain_text(
    examples_folder: Path, tmp_path: Path
) -> None:
    """Requests in flight when the refusal arrives do not fail their feature; the next run (same
    endpoint) starts in plain text and pays for no refusal."""
    with FakeLabeler(WIDTH, lambda f, a: PLAIN[f % 4], delay=0.1,
                     reject_formats=("json_schema", "json_object")) as server:  # fmt: skip
        result = generate_labels(examples_folder, tmp_path / "l1", config_for(server),
                                 concurrency=4, policy=FAST, progress=False)  # fmt: skip
        first = list(server.requests)
        assert result.summary.done == WIDTH and result.summary.failed == 0, result.summary
        assert result.summary.format == "text" and result.summary.retries == 0
        labels = store.ok_labels(store.Journal(tmp_path / "l1" / store.LABELS_FILE).load())
        assert labels == {i: f"label of f{i}" for i in range(WIDTH)}
        kinds = Counter((r["body"].get("response_format") or {}).get("type") for r in first)
        # At most one round of the requests in flight pays for each refusal.
        assert 1 <= kinds["json_schema"] <= 4 and 1 <= kinds["json_object"] <= 4
        assert kinds[None] == WIDTH
        assert all(r["body"]["max_tokens"] == LABEL_MAX_TOKENS for r in first)
        again = generate_labels(examples_folder, tmp_path / "l2", config_for(server),
                                concurrency=4, policy=FAST, progress=False)  # fmt: skip
        later = server.requests[len(first) :]
    assert again.summary.done == WIDTH
    assert len(later) == WIDTH and all("response_format" not in r["body"] for r in later)


def test_a_model_that_cannot_follow_instructions_fails_its_feature_not_the_run(
    examples_folder: Path, tmp_path: Path
) -> None:
    def script(feature: int, attempt: int) -> str:
        return {3: "cut", 8: "garbage"}.get(feature, "ok")

    with FakeLabeler(WIDTH, script) as server:
        result = generate_labels(examples_folder, tmp_path / "l", config_for(server),
                                 concurrency=2, policy=FAST, progress=False)  # fmt: skip
        tries = server.features_requested()
        temperatures = [r["body"]["temperature"] for r in server.requests if r["feature"] == 3]
    records = store.Journal(tmp_path / "l" / store.LABELS_FILE).load()
    assert result.summary.done == WIDTH - 2 and result.summary.failed == 2
    assert result.summary.failures == {"unusable answer": 2}
    assert result.summary.describe_failures() == "2 unusable answer"
    assert tries[3] == tries[8] == FAST.attempts  # bounded
    assert "cut off at 128 tokens" in records[3]["error"] and "no label" in records[8]["error"]
    # Greedy first, then sampling: a deterministic local model would repeat its answer.
    assert temperatures == [0.0] + [0.7] * (FAST.attempts - 1)


def test_the_model_is_the_one_the_server_serves(tmp_path: Path) -> None:
    config = resolve_labeler("http://127.0.0.1:9/v1", None, env={})
    assert config.model == "" and config.local
    with FakeLabeler(WIDTH, models=["SmolLM2-135M-Instruct"]) as server:
        found = discover_model(resolve_labeler(server.url, None, env={}))
        assert found.model == "SmolLM2-135M-Instruct"
        assert discover_model(resolve_labeler(server.url, "mine", env={})).model == "mine"
    with (
        FakeLabeler(WIDTH, models=["qwen3:8b", "llama3.2"]) as server,
        pytest.raises(
            ConfigError, match=r"serves 2 models \(qwen3:8b, llama3.2\); choose one with --labeler"
        ),
    ):
        discover_model(resolve_labeler(server.url, None, env={}))
    with pytest.raises(ConfigError, match="Cannot reach the labeler"):
        discover_model(config, timeout=2)


def test_an_unreachable_server_stops_the_run_with_one_clear_error(
    examples_folder: Path, tmp_path: Path
) -> None:
    with FakeLabeler(WIDTH) as server:
        url = server.url  # now closed: nothing listens there
    with pytest.raises(LabelerError, match="Cannot reach the labeler .* Is the server running"):
        generate_labels(examples_folder, tmp_path / "l", LabelerConfig("m", url, "custom", "x"),
                        policy=FAST, progress=False)  # fmt: skip


def test_a_refused_key_stops_the_run_with_a_clear_error(
    examples_folder: Path, tmp_path: Path
) -> None:
    with (
        FakeLabeler(WIDTH, status_for_all=401) as server,
        pytest.raises(LabelerError, match="LABELER_API_KEY"),
    ):
        generate_labels(
            examples_folder,
            tmp_path / "l",
            config_for(server),
            concurrency=2,
            policy=FAST,
            progress=False,
        )
    assert len(server.requests) <= 2
    assert store.Journal(tmp_path / "l" / store.LABELS_FILE).load() == {}


def test_answers_are_parsed_tolerantly() -> None:
    assert parse_label('{"label": "French city names"}') == "French city names"
    assert parse_label('```json\n{"label": " closing  parenthesis "}\n```') == "closing parenthesis"
    assert parse_label('Here you go: {"label": "gratitude"} hope it helps') == "gratitude"
    assert parse_label("**Label:** numbers in lists") == "numbers in lists"
    assert parse_label("French city names") == "French city names"
    assert parse_label("  French city names.\n") == "French city names"
    assert parse_label("<think>hmm, cities?</think>\nFrench city names") == "French city names"
    assert parse_label('{"feature": "dates in May"}') == "dates in May"
    assert parse_label("It detects:\n\n- **dates in May**\n") == "dates in May"
    assert parse_label('I would label this feature "dates in May".') == "dates in May"
    assert parse_label('Excerpt {"x": 1} aside, {"label": "money"}') == "money"
    for bad in (
        "I cannot help with that.",
        "Sure! Here are my thoughts about these excerpts.",
        "The excerpts are about many things, and it is hard to say which one matters most here.",
        "Which excerpts do you mean?",
        '{"label": ":"}',
        '{"label": "4.0"}',
        '{"label": ""}',
        '{"label": 3}',
        '{"label": "' + "x" * 200 + '"}',
    ):
        with pytest.raises(UnusableAnswer):
            parse_label(bad)


def test_prompt_lists_one_excerpt_per_line(examples_folder: Path) -> None:
    feature = next(ex.iter_features(examples_folder))
    messages = label_messages(feature)
    assert messages[0]["role"] == "system" and '{"label"' in messages[0]["content"]
    lines = [line for line in messages[1]["content"].splitlines() if line[:2].rstrip(".").isdigit()]
    assert len(lines) == len(feature.for_labeling())


# ---- configuration -------------------------------------------------------------------------------------


def test_no_key_is_one_message_naming_the_variables() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_labeler(env={})
    message = str(err.value)
    assert (
        "OPENROUTER_API_KEY" in message
        and "ANTHROPIC_API_KEY" in message
        and "--labeler-backend" in message
    )


def test_backend_choice_and_keys_never_shown() -> None:
    openrouter = resolve_labeler(
        env={"OPENROUTER_API_KEY": "sk-or-secret", "ANTHROPIC_API_KEY": "sk-ant"}
    )
    assert (
        openrouter.provider == "openrouter"
        and openrouter.model == DEFAULT_LABELER
        and openrouter.structured
    )
    assert "secret" not in repr(openrouter)
    anthropic = resolve_labeler(env={"ANTHROPIC_API_KEY": "sk-ant"})
    assert anthropic.provider == "anthropic" and anthropic.base_url.startswith(
        "https://api.anthropic.com"
    )
    assert not anthropic.structured and anthropic.model.startswith("claude")
    local = resolve_labeler("http://localhost:8000/v1/", "qwen", env={})
    assert (local.base_url, local.model, local.provider) == (
        "http://localhost:8000/v1",
        "qwen",
        "custom",
    )
    assert (
        resolve_labeler(env={"LABELER_BACKEND": "http://h:1/v1", "LABELER_MODEL": "m"}).model == "m"
    )
    with pytest.raises(ConfigError, match="OPENROUTER_API_KEY"):
        resolve_labeler("openrouter", env={"ANTHROPIC_API_KEY": "x"})
    with pytest.raises(ConfigError, match="URL"):
        resolve_labeler("openai", env={})
    assert labeler_name(env={}) == DEFAULT_LABELER and labeler_name(
        env={"ANTHROPIC_API_KEY": "k"}
    ).startswith("claude")


def test_dotenv_sets_only_what_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# keys\nexport NS_TEST_A=one\nNS_TEST_B='two # not a comment'\nNS_TEST_C=three # a comment\n"
        'NS_TEST_D="four"\nnot a line\nNS_TEST_KEEP=new\n'
    )
    monkeypatch.setenv("NS_TEST_KEEP", "old")
    for name in ("NS_TEST_A", "NS_TEST_B", "NS_TEST_C", "NS_TEST_D"):
        monkeypatch.delenv(name, raising=False)
    assert load_dotenv(env_file) == ["NS_TEST_A", "NS_TEST_B", "NS_TEST_C", "NS_TEST_D"]
    assert [os.environ[f"NS_TEST_{k}"] for k in "ABCD"] == [
        "one",
        "two # not a comment",
        "three",
        "four",
    ]
    assert os.environ["NS_TEST_KEEP"] == "old"
    assert load_dotenv(tmp_path / "missing.env") == []


# ---- the command, killed and resumed -------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from neuroscope.cli import app; app()", *args]


def child_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENROUTER_API_KEY", "ANTHROPIC_API_KEY", "LABELER_BACKEND", "LABELER_MODEL")
    }
    return env | extra


def test_generate_without_a_key_says_which_variables_to_set(tmp_path: Path) -> None:
    run = subprocess.run(
        cli("labels", "generate"),
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "OPENROUTER_API_KEY" in run.stderr and "ANTHROPIC_API_KEY" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_killed_run_resumes_without_repeating_answered_requests(tmp_path: Path) -> None:
    width, sae_file = 40, tmp_path / "sae" / "params.npz"
    sae_id = str(sae_file)
    make_examples(ex.examples_dir("test/model", sae_id), width=width, vocab=160, samples=60, top_n=4,
                  model="test/model", sae=sae_id)  # fmt: skip
    labels_file = store.autointerp_dir("test/labeler", "test/model", sae_id) / store.LABELS_FILE
    args = ("labels", "generate", "--model", "test/model", "--sae-local-path", sae_id, "--sae-layer", "0",
            "--samples", "1", "--examples-per-feature", "1", "--concurrency", "2")  # fmt: skip
    # The key comes from ./.env, as a user would keep it; it must never be printed.
    (tmp_path / ".env").write_text("LABELER_API_KEY=sk-local-secret\nLABELER_MODEL=test/labeler\n")
    with FakeLabeler(width, delay=0.15) as server:
        env = child_env(LABELER_BACKEND=server.url)
        child = subprocess.Popen(
            cli(*args), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (
                labels_file.exists()
                and len(store.ok_labels(store.Journal(labels_file).load())) >= 8
            ):
                break
            time.sleep(0.02)
        child.kill()
        child.wait()
        before_kill = set(store.ok_labels(store.Journal(labels_file).load()))
        answered_first = [r["feature"] for r in server.requests]
        first_count = len(server.requests)
        assert 8 <= len(before_kill) < width

        rerun = subprocess.run(
            cli(*args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert rerun.returncode == 0, rerun.stderr
        second = [r["feature"] for r in server.requests[first_count:]]
    labels = store.ok_labels(store.Journal(labels_file).load())
    assert labels == {i: f"label of f{i}" for i in range(width)}
    assert not set(second) & before_kill  # nothing that had landed was asked again
    assert len(set(answered_first) - before_kill) <= 2  # at most the requests in flight at the kill
    assert len(second) == len(set(second)) == width - len(before_kill), (
        second,
        sorted(before_kill),
        rerun.stderr[-2000:],
    )
    assert "sk-local-secret" not in rerun.stderr + rerun.stdout
    assert all(
        "sk-local-secret" not in p.read_text() for p in labels_file.parent.rglob("*") if p.is_file()
    )
    assert all(r["body"]["model"] == "test/labeler" for r in server.requests)


def test_generate_command_finds_the_model_and_summarises_failures_by_reason(
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from neuroscope.cli import app

    sae_id = str(tmp_path / "sae" / "params.npz")
    make_examples(
        ex.examples_dir("test/model", sae_id), width=WIDTH, model="test/model", sae=sae_id
    )
    args = ["labels", "generate", "--model", "test/model", "--sae-local-path", sae_id,
            "--sae-layer", "0", "--samples", "40", "--examples-per-feature", "8"]  # fmt: skip
    script = lambda f, a: "garbage" if f == 3 else PLAIN[f % 4]  # noqa: E731
    with FakeLabeler(WIDTH, script, reject_formats=("json_schema",), models=["local/m"]) as server:
        result = CliRunner().invoke(app, [*args, "--labeler-backend", server.url])
        assert {r["body"]["model"] for r in server.requests} == {"local/m"}
    out = result.output
    assert result.exit_code == 0, out
    assert "Labeler: local/m at" in out
    assert f"Labelled {WIDTH - 1} features, 1 failed (1 unusable answer)" in out
    assert "json_object output" in out and "s per answer" in out
    assert "#3 failed after 3 tries: unusable answer (no label in the answer" in out
    assert "'label of f5'" in out  # one line per feature against a local server
    labels_file = store.autointerp_dir("local/m", "test/model", sae_id) / store.LABELS_FILE
    assert store.Journal(labels_file).load()[3]["status"] == "failed"
