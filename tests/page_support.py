"""Helpers for the page tests: a server whose labels, calibration and examples the test wrote,
Debian's chromium driven by playwright, a console log, a page on a second origin, and a synthetic
feature stream generated inside the page."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_LAYER
from serve_support import start_server

from neuroscope.calibration import (
    CalibrationHeader,
    CalibrationStats,
    FeatureAccumulator,
    stats_path,
)
from neuroscope.labels import store
from neuroscope.labels.examples import EXAMPLES_FILE, FORMAT, META_FILE, examples_dir
from neuroscope.labels.sources import LabelResolver
from neuroscope.server.run import BackgroundServer

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
INSTALL_HINT = "apt-get update && apt-get install -y chromium"
LABELER = "test/page-labeler"
HOSTILE = "<img src=x onerror=\"window.__pwned=1;alert('label')\">"
WIDTH = 128  # the tiny SAE's


def label_for(index: int) -> str:
    # Every third feature carries markup: it must show as these characters, never as an element.
    return HOSTILE if index % 3 == 0 else f"concept {index}"


def write_feature_facts(model: str, sae: str, width: int = WIDTH) -> None:
    """Calibration stats and corpus-pass examples for the tiny SAE, with values the test knows:
    feature i fired on 5i of 1000 tokens, mean i/10, max i/5; one example whose token is markup."""
    index = np.arange(width)
    acc = FeatureAccumulator(
        tokens=1000,
        fire_count=(index * 5).astype(np.int64),
        act_mean=index / 10.0,
        act_m2=np.zeros(width),
        act_max=(index / 5.0).astype(np.float32),
    )
    header = CalibrationHeader(model=model, sae_id=sae, sae_width=width, layer=TINY_LAYER)
    CalibrationStats(header, acc).save(stats_path(model, sae, TINY_LAYER))
    folder = examples_dir(model, sae)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / EXAMPLES_FILE, "w", encoding="utf-8") as f:
        for i in range(width):
            example = {"activation": 9.5, "sample": i, "position": 3, "before": "text before ",
                       "token": f"<b>tok{i}</b>", "after": " and after"}  # fmt: skip
            f.write(json.dumps({"index": i, "fires": 3, "examples": [example]}) + "\n")
    (folder / META_FILE).write_text(json.dumps({"format": FORMAT, "tokens": 1000}))


@contextmanager
def labelled_server(tiny_model: Path, tiny_sae: dict[str, Path], cache: Path) -> Iterator[Any]:
    """A server on the tiny model whose cache (its own) holds auto-interp labels (``label_for``),
    calibration stats and examples (``write_feature_facts``)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("NEUROSCOPE_CACHE", str(cache))
    server: BackgroundServer | None = None
    try:
        sae_id = str(Path(tiny_sae["npz"]).resolve())
        folder = store.autointerp_dir(LABELER, str(tiny_model), sae_id)
        folder.mkdir(parents=True, exist_ok=True)
        store.write_meta(folder, labeler=LABELER, model=str(tiny_model), sae=sae_id)
        with store.Journal(folder / store.LABELS_FILE) as journal:
            journal.extend({"index": i, "label": label_for(i)} for i in range(WIDTH))
        resolver = LabelResolver(str(tiny_model), {TINY_LAYER: sae_id}, labeler=LABELER)
        server = start_server(tiny_model, tiny_sae["npz"], session={"labels": resolver})
        # Before anyone asks: the server reads a layer's calibration once.
        info = server.engine.info
        write_feature_facts(info.model_name, info.sae_ids[TINY_LAYER])
        yield server
    finally:
        if server is not None:
            server.stop()
        patch.undo()


def chromium_path() -> str:
    """Debian's chromium, or a skip that says how to get it (playwright never downloads one here)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip(f"the page tests need a chromium: {INSTALL_HINT}")
    return path


@contextmanager
def launch_browser() -> Iterator[Any]:
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (in the [dev] extra)"
    )
    executable = chromium_path()
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_until(page: Any, js: str, arg: Any = None, timeout: float = 20.0) -> Any:
    """Poll ``page.evaluate(js, arg)`` until it is truthy. (playwright's wait_for_function evaluates
    its predicate with eval inside the page, which the page's CSP rightly forbids.)"""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(js, arg)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {js}")
        time.sleep(0.05)


@dataclass
class Console:
    """Everything a page reported: console errors, uncaught exceptions and dialogs (alert & co.)."""

    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> Console:
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

        def dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", dialog)
        return self


class _Blank(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = b"<!doctype html><title>another site</title><p>another origin</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def other_origin() -> Iterator[str]:
    """A blank page on another loopback port: a site that is not the Neuroscope page."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Blank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# Reads the feature stream with fetch from whatever origin the page is on; resolves with the names
# of the first events (or the error, e.g. a CORS refusal, as text).
READ_STREAM_JS = """
async ([url, wanted, ms]) => {
  const names = [];
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), ms);
  try {
    const response = await fetch(url, {signal: controller.signal});
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let text = "";
    while (names.length < wanted) {
      const {value, done} = await reader.read();
      if (done) break;
      text += value;
      for (const m of text.matchAll(/^event: (.*)$/gm)) names.push(m[1]);
      text = text.slice(text.lastIndexOf("\\n") + 1);
    }
    controller.abort();
    return {ok: true, status: response.status, names};
  } catch (e) {
    return {ok: false, names, error: String(e)};
  } finally {
    clearTimeout(timer);
  }
}
"""

# Replays a synthetic stream into the page through window.neuroscope.replay (the same SSE parser and
# frame pipeline as the network path): `rate` tokens a second for `seconds`, `layers` records of
# `top_k` features per token, delivered every 20 ms as the server coalesces them. Resolves with the
# page's counters, the frame gaps seen, and how long the page took to drain what it was given.
REPLAY_JS = """
async ([rate, seconds, layers, topK, width]) => {
  const ns = window.neuroscope;
  ns.resetPerf();
  const skipped0 = ns.stats().skipped;
  let seed = 7;
  const rand = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648; };
  const record = (t, layer) => {
    const feats = [];
    for (let k = 0; k < topK; k++) {
      const index = Math.floor(rand() * width);
      feats.push({index, label: `synthetic concept ${index % 997}`, activation: 10 * rand() / (k + 1)});
    }
    return JSON.stringify({request_id: "chatcmpl-synthetic", token_index: t, position: 20 + t,
      phase: "generation", token: ` tok${t}`, token_id: t % 500, next_token: " next", layer,
      sae: "synthetic", top_features: feats});
  };
  const gaps = [];
  let last = performance.now();
  let running = true;
  const watch = (now) => { gaps.push(now - last); last = now; if (running) requestAnimationFrame(watch); };
  requestAnimationFrame(watch);
  const total = Math.round(rate * seconds);
  const start = performance.now();
  let sent = 0;
  let heap0 = performance.memory ? performance.memory.usedJSHeapSize : null;
  let genMs = 0; // time spent making the synthetic text, not the page's work
  await new Promise((resolve) => {
    const tick = () => {
      const due = Math.min(total, Math.round(((performance.now() - start) / 1000) * rate));
      const g0 = performance.now();
      let text = "";
      for (; sent < due; sent++) {
        for (let l = 0; l < layers; l++) text += `event: feature_activation\\ndata: ${record(sent, l)}\\n\\n`;
      }
      genMs += performance.now() - g0;
      if (text) ns.replay(text);
      if (sent >= total) resolve(); else setTimeout(tick, 20);
    };
    tick();
  });
  const fed = performance.now();
  while (ns.stats().queued > 0) {
    await new Promise((r) => setTimeout(r, 10));
    if (performance.now() - fed > 60000) break;
  }
  const drained = performance.now();
  running = false;
  gaps.sort((a, b) => a - b);
  const stats = ns.stats();
  const processed = stats.events / layers; // tokens the page took in (the rest it skipped, counted)
  return {
    processed, skipped: stats.skipped - skipped0,
    tokens: total, seconds: (fed - start) / 1000, genMs, drainMs: drained - fed,
    frames: gaps.length, gapMedian: gaps[Math.floor(gaps.length / 2)] || 0,
    gapP95: gaps[Math.floor(gaps.length * 0.95)] || 0, gapMax: gaps[gaps.length - 1] || 0,
    heapBefore: heap0, heapAfter: performance.memory ? performance.memory.usedJSHeapSize : null,
    stats,
  };
}
"""
