"""``neuroscope bench`` end to end on the tiny model: the JSON report is complete and its figures sane.

No speed is asserted (CI machines vary); what is asserted is that every mode really ran the way it
claims: the uninstrumented runs built no record, the instrumented ones one per position, and every
hub subscriber received every event.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from neuroscope.cli import app
from tests.conftest import TINY_LAYER, requires_torch

TOKENS = 4
ROUNDS = 2
SUBSCRIBERS = 3


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tiny_model, tiny_sae, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "report.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(tiny_model),
            "--sae-local-path",
            str(tiny_sae["npz"]),
            "--sae-layer",
            str(TINY_LAYER),
            "--backend",
            "torch",
            "--tokens",
            str(TOKENS),
            "--rounds",
            str(ROUNDS),
            "--subscribers",
            str(SUBSCRIBERS),
            "--json",
            str(out),
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "instrumentation overhead" in result.stdout
    assert "µs per record" in result.stdout
    return json.loads(out.read_text())


@requires_torch
def test_summary_has_every_figure(report: dict) -> None:
    summary = report["summary"]
    for key in (
        "decode_tps_plain", "decode_tps_sae", "decode_tps_hub", "prefill_tps_plain",
        "prefill_tps_sae", "ttft_s_plain", "ttft_s_sae", "sae_encode_ms_per_token", "peak_rss_mib",
        "record_us", "record_us_best",
    ):  # fmt: skip
        assert _positive(summary[key]), (key, summary[key])
    assert summary["decode_tps_plain_best"] >= summary["decode_tps_plain"]
    assert summary["decode_tps_sae_best"] >= summary["decode_tps_sae"]
    for key in ("overhead_pct", "hub_overhead_pct", "overhead_pct_best"):
        assert math.isfinite(summary[key]) and summary[key] > -100, (key, summary[key])
    assert summary["overhead_pct"] == pytest.approx((report["overhead_ratio"] - 1) * 100)
    # Decode rates are inverse median steps; the overhead is the median of per-round ratios.
    for mode in report["modes"].values():
        assert mode["decode_tps"] == pytest.approx(1000 / mode["decode_step_ms"])
    by_round = sorted(report["overhead_ratios_by_round"])
    assert report["overhead_ratio"] == pytest.approx((by_round[0] + by_round[-1]) / 2)  # 2 rounds


@requires_torch
def test_modes_ran_as_described(report: dict, tiny_model) -> None:
    assert report["backend"] == "torch" and report["layer"] == TINY_LAYER
    assert report["decode_tokens"] == TOKENS and report["rounds"] == ROUNDS
    assert report["sae_width"] == 128 and report["top_k"] == 10
    modes = report["modes"]
    assert set(modes) == {"plain", "sae", "hub"}
    for mode in modes.values():
        assert len(mode["runs"]) == ROUNDS
        for run in mode["runs"]:
            assert len(run["step_s"]) == TOKENS and all(_positive(v) for v in run["step_s"])
            assert _positive(run["prefill_s"]) and run["ttft_s"] >= run["prefill_s"]
    # No SAE, no record; with it, one per position after BOS (prompt) and per generated token.
    assert modes["plain"]["records_per_run"] == 0
    expected = report["prompt_tokens"] - 1 + TOKENS
    assert modes["sae"]["records_per_run"] == modes["hub"]["records_per_run"] == expected
    assert report["records_timed"] == report["prompt_tokens"] - 1  # the prompt's, after BOS
    assert (
        len(report["overhead_ratios_by_round"])
        == len(report["hub_overhead_ratios_by_round"])
        == ROUNDS
    )
    assert all(
        _positive(r)
        for r in report["overhead_ratios_by_round"] + report["hub_overhead_ratios_by_round"]
    )


@requires_torch
def test_hub_delivered_every_event(report: dict) -> None:
    # Warm-up (8-token cap, so TOKENS here) and timed hub runs: records + one completion each.
    per_run = report["modes"]["hub"]["records_per_run"] + 1
    assert report["hub_dropped"] == 0
    assert report["hub_events_per_subscriber"] == per_run * (ROUNDS + 1)


@requires_torch
def test_machine_and_versions_recorded(report: dict) -> None:
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["python"]
    assert {"neuroscope", "torch", "transformers"} <= set(machine["versions"])
    command = report["command"]
    assert command[:2] == ["neuroscope", "bench"]
    assert command[command.index("--tokens") + 1] == str(TOKENS)
    assert "--rounds" in command and "--prompt" not in command  # defaults are left out


def test_bad_arguments_are_refused_with_a_reason(tiny_model, tiny_sae) -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(tiny_model),
            "--sae-local-path",
            str(tiny_sae["npz"]),
            "--sae-layer",
            str(TINY_LAYER),
            "--backend",
            "torch",
            "--tokens",
            "1",
        ],  # fmt: skip
    )
    assert result.exit_code == 1
    assert "--tokens must be at least 2" in result.output
    assert "Loading" not in result.output  # refused before any model is loaded


@requires_torch
def test_random_sae_and_no_hub(tiny_model, tmp_path) -> None:
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(tiny_model),
            "--random-sae",
            "--random-sae-width",
            "256",
            "--sae-layer",
            str(TINY_LAYER),
            "--backend",
            "torch",
            "--tokens",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--subscribers",
            "0",
            "--json",
            str(out),
            "--quiet",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["sae_width"] == 256 and "random-jumprelu-256" in report["sae"]
    assert set(report["modes"]) == {"plain", "sae"}
    assert report["summary"]["decode_tps_hub"] is None and report["hub_overhead_ratio"] is None
    assert "instrumented + hub" not in result.stdout
    assert "round 1/1" not in result.output  # --quiet
