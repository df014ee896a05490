"""Markdown tables from the JSON that ``neuroscope bench --json`` and ``benchmarks.peers --json`` write.

    python -m benchmarks.report results/*.json > tables.md

What docs/benchmarks.md shows is this output, so the published figures are the measured ones.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks.common import fmt
from benchmarks.peers import markdown_table


def _short(name: str) -> str:
    """A model or SAE named by a long local path shows as its last two parts."""
    parts = name.split("/")
    return name if not name.startswith("/") or len(parts) < 4 else "…/" + "/".join(parts[-2:])


def _pct(ratio: float | None) -> str:
    return "–" if ratio is None else f"{(ratio - 1) * 100:+.1f}%"


def bench_table(report: dict[str, Any]) -> str:
    """One ``neuroscope bench`` report as a Markdown table with its headline lines."""
    r = report
    names = {
        "plain": "uninstrumented (no SAE, same loop)",
        "sae": "instrumented, 1 SAE",
        "hub": f"instrumented + hub, {r['subscribers']} subscribers",
    }
    ratios = {
        "plain": (1.0, 1.0),
        "sae": (r["overhead_ratio"], r["overhead_ratio_best"]),
        "hub": (r["hub_overhead_ratio"], r["hub_overhead_ratio_best"]),
    }
    lines = [
        f"`{_short(r['model'])}` · {r['backend']} ({r['device']}, {r['dtype']}) · SAE `{_short(r['sae'])}` "
        f"(width {r['sae_width']}) at layer {r['layer']} · prompt {r['prompt_tokens']} tokens · "
        f"{r['decode_tokens']} generated · {r['rounds']} rounds · load average at the end "
        f"{r['machine'].get('load_average')}",
        "",
        "| mode | decode tok/s (median step) | vs plain | decode tok/s (best step) | vs plain "
        "| prefill tok/s | TTFT ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, fig in r["modes"].items():
        typical, best = ratios[mode]
        lines.append(
            f"| {names[mode]} | {fmt(fig['decode_tps'])} | {_pct(typical)} | "
            f"{fmt(fig['decode_tps_best'])} | {_pct(best)} | {fmt(fig['prefill_tps'])} | "
            f"{fmt(fig['ttft_s'] * 1000)} |"
        )
    lines += [
        "",
        f"SAE encode + top-k + copy to host: {r['sae_encode_ms_per_token']:.3g} ms per token · "
        f"peak memory {r['peak_rss_mib']:,.0f} MiB resident"
        + (f", {r['peak_device_mib']:,.0f} MiB on the device" if r.get("peak_device_mib") else "")
        + (f" · hub events lost: {r['hub_dropped']}" if r.get("hub_dropped") else ""),
        "",
        f"`{shlex.join(r['command'])}`",
    ]
    return "\n".join(lines)


def peers_table(result: dict[str, Any]) -> str:
    r = result
    lines = [
        f"`{_short(r['model'])}` · {r['backend']} ({r['device']}, {r['dtype']}) · SAE width "
        f"{r['sae_width']} at layer {r['layer']} · prompt {r['prompt_tokens']} tokens · "
        f"{r['tokens']} generated · {r['rounds']} rounds · load average at the start "
        f"{r['machine'].get('load_average')}",
        "",
        markdown_table(r["contenders"]),
    ]
    if "tl_parity" in r:
        p = r["tl_parity"]
        lines += [
            "",
            f"TransformerLens copy vs transformers, last-position logits: max |diff| "
            f"{p['max_abs_logit_diff']:.1e} (max |logit| {p['max_abs_logit']:.3g}).",
        ]
    agree = [
        f"{c['name']} {c['tokens_agree_with_neuroscope']}/{r['tokens']}"
        for c in r["contenders"]
        if c["name"] != "neuroscope" and "tokens_agree_with_neuroscope" in c
    ]
    lines += ["", "Leading tokens identical to Neuroscope's: " + ", ".join(agree) + "."]
    lines += ["", f"`{shlex.join(r['command'])}`"]
    return "\n".join(lines)


def main(
    paths: Annotated[list[Path], typer.Argument(help="JSON files from bench or peers.")],
) -> None:
    """Print one Markdown section per file."""
    for path in paths:
        data = json.loads(path.read_text())
        typer.echo(f"<!-- {path.name} -->")
        typer.echo(peers_table(data) if "contenders" in data else bench_table(data))
        typer.echo()


if __name__ == "__main__":
    typer.run(main)
