// Neuroscope live page: the chat, the token strip, the layer x token heatmap, sparklines, the
// co-activation graph, the feature panel and steering, fed by the feature stream (SSE over fetch).
//
// Rules this file keeps:
// - every string from the model, a label or the user goes into the DOM as text (textContent,
//   createTextNode, setAttribute on non-URL attributes), never as HTML;
// - the API key travels only in the Authorization header (fetch, since EventSource cannot send
//   headers); it lives in memory and sessionStorage, never in a URL;
// - incoming events only go on a queue; all DOM work happens once per animation frame, and every
//   collection is bounded (ring of tokens, feature table, edges, DOM chips).
"use strict";

(() => {
  const RING = 600; // tokens kept in memory; older ones are folded into a summary
  const STRIP_MAX = 160; // token chips in the DOM
  const STRIP_FEATURES = 3; // features shown on each chip (all of them in the token panel)
  const HEAT_COLS = 160; // tokens (columns) in the heatmap
  const HEAT_FEATURE_ROWS = 12; // feature rows below the per-layer rows
  const ROW_PX = 14; // heatmap row height; the row labels use the same (style.css)
  const FEATURES_MAX = 4000; // feature table size before the least recent are forgotten
  const EDGES_MAX = 6000;
  const EDGE_TOP = 8; // a token links its EDGE_TOP strongest features (all layers) pairwise
  const GRAPH_NODES = 40;
  const GRAPH_LABELS = 12;
  const BACKLOG_MAX = 20000; // events waiting for frames; beyond it the oldest are skipped, counted
  const INGEST_BUDGET_MS = 8; // per frame, so that a flood never freezes the page
  const SLOW_VIEW_MS = 100; // heatmap, sparklines and graph links redraw at most this often
  const SUMMARY_TOP = 5;
  const GLOW_HALF_LIFE_S = 1.0; // graph brightness fades with this half-life
  const SCORE_HALF_LIFE_S = 8.0; // which features are "of interest" (heatmap rows, graph nodes)
  const KEY_STORE = "neuroscope.api_key";

  const $ = (id) => document.getElementById(id);
  const SVG_NS = "http://www.w3.org/2000/svg";

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  const fmt = (x) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(2));
  const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(3)}%`);
  const fkey = (layer, index) => `${layer}:${index}`;

  // ---- state -------------------------------------------------------------------------------------

  const state = {
    config: null,
    key: null,
    chatOrigin: null,
    featuresOrigin: null,
    paused: false,
    skipped: 0, // events skipped while paused
    dropped: 0, // events the server dropped because this page fell behind
    queueDropped: 0,
    filter: "all",
    showPrompt: true,
    layerView: "all",
    mine: new Set(), // request ids this page sent
    queue: [],
    queueHead: 0, // events before this index are done
    frameRequested: false,
    slowViewsAt: 0,
    tokens: [], // the ring, oldest first
    byKey: new Map(), // request_id|position -> token
    open: new Set(), // tokens whose co-activation edges are not counted yet
    seq: 0,
    summary: { tokens: 0, counts: new Map() },
    features: new Map(), // "layer:index" -> stats
    edges: new Map(), // "a|b" -> {a, b, w}
    pinned: [],
    selectedToken: null,
    selectedFeature: null,
    whyAsk: null, // the attribution asked last (an older answer arriving late is dropped)
    stripDirty: new Set(),
    stripRebuild: false,
    viewsDirty: false,
    graphKeys: [],
    graphEdges: [],
    graphChosenAt: 0,
    lastFrame: performance.now(),
    labelsByLayer: new Map(),
    stream: null, // AbortController of the feature stream
    lastEventId: null,
    chatAbort: null,
    perf: { frames: 0, events: 0, frameMsMax: 0, frameMsTotal: 0, gapMsMax: 0 },
  };

  // ---- SSE ---------------------------------------------------------------------------------------

  // A small parser for text/event-stream (the WHATWG rules that matter here): fields event, data
  // (joined by newlines), id; comment lines ignored; a blank line dispatches.
  class SSEParser {
    constructor(onEvent) {
      this.onEvent = onEvent;
      this.buffer = "";
      this.reset();
    }
    reset() {
      this.event = "";
      this.data = [];
      this.id = null;
    }
    feed(text) {
      this.buffer += text;
      let start = 0;
      for (;;) {
        const nl = this.buffer.indexOf("\n", start);
        if (nl < 0) break;
        let line = this.buffer.slice(start, nl);
        start = nl + 1;
        if (line.endsWith("\r")) line = line.slice(0, -1);
        this.line(line);
      }
      this.buffer = this.buffer.slice(start);
    }
    line(line) {
      if (line === "") {
        if (this.data.length) this.onEvent(this.event || "message", this.data.join("\n"), this.id);
        this.reset();
        return;
      }
      if (line.startsWith(":")) return;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") this.event = value;
      else if (field === "data") this.data.push(value);
      else if (field === "id") this.id = value;
    }
  }

  async function readSSE(response, onEvent) {
    const parser = new SSEParser(onEvent);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.feed(value);
    }
    parser.feed("\n\n");
  }

  // ---- configuration and access --------------------------------------------------------------------

  function siblingOrigin(port) {
    return `${location.protocol}//${location.hostname}:${port}`;
  }

  async function loadConfig() {
    let config = {};
    try {
      const response = await fetch("page.json", { cache: "no-store" });
      if (response.ok) config = await response.json();
    } catch (e) {
      config = {};
    }
    const here = Number(location.port || (location.protocol === "https:" ? 443 : 80));
    // Without page.json: the default ports, features = chat + 1.
    const featuresPort = config.features_port || here;
    const chatPort = config.chat_port || featuresPort - 1;
    state.config = config;
    state.featuresOrigin = featuresPort === here ? location.origin : siblingOrigin(featuresPort);
    state.chatOrigin = chatPort === here ? location.origin : siblingOrigin(chatPort);
    const model = config.model ? `model ${config.model}` : "";
    const saes = Object.entries(config.sae_ids || {}).map(([l, s]) => `layer ${l}: ${s}`);
    $("model").textContent = [model, saes.join(", ")].filter(Boolean).join(" · ");
    const layers = (config.layers || []).map(Number);
    for (const layer of layers) {
      $("layer-select").append(new Option(`layer ${layer}`, String(layer)));
      $("steer-layer").append(new Option(String(layer), String(layer)));
    }
  }

  function authHeaders() {
    return state.key ? { Authorization: `Bearer ${state.key}` } : {};
  }

  function askForKey(message) {
    $("key-form").hidden = false;
    $("key-error").textContent = message || "";
    setStatus("API key needed", false);
    $("api-key").focus();
  }

  function useKey(key) {
    state.key = key || null;
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (e) {
      /* storage disabled: the key stays in memory */
    }
  }

  function setStatus(text, ok) {
    const status = $("status");
    status.textContent = text;
    status.className = `status ${ok === true ? "ok" : ok === false ? "bad" : ""}`;
  }

  // ---- the feature stream ----------------------------------------------------------------------------

  async function connect(attempt = 0) {
    if (state.stream) state.stream.abort();
    const controller = new AbortController();
    state.stream = controller;
    const headers = authHeaders();
    if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
    const url = `${state.featuresOrigin}/v1/features/stream?phase=all`;
    let response;
    try {
      response = await fetch(url, { headers, signal: controller.signal, cache: "no-store" });
    } catch (e) {
      if (controller.signal.aborted) return;
      return retry(attempt, "cannot reach the feature stream");
    }
    if (response.status === 401) {
      const refused = state.key !== null;
      useKey(null);
      askForKey(refused ? "The server refused this key." : "");
      return;
    }
    if (response.status === 400 && state.lastEventId) {
      state.lastEventId = null; // an id of another server's stream (it restarted): start afresh
      return retry(0, "stream restarted");
    }
    if (!response.ok) return retry(attempt, `feature stream answered ${response.status}`);
    $("key-form").hidden = true;
    $("key-error").textContent = "";
    setStatus("listening", true);
    try {
      await readSSE(response, onStreamEvent);
    } catch (e) {
      if (controller.signal.aborted) return;
    }
    if (!controller.signal.aborted) retry(0, "stream ended");
  }

  function retry(attempt, why) {
    const delay = Math.min(10000, 500 * 2 ** attempt);
    setStatus(`${why}; retrying in ${Math.round(delay / 1000)} s`, false);
    setTimeout(() => connect(attempt + 1), delay);
  }

  function onStreamEvent(name, data, id) {
    if (id) state.lastEventId = id;
    if (state.paused) {
      state.skipped += 1;
      return;
    }
    state.queue.push([name, data]);
    if (state.queue.length - state.queueHead > BACKLOG_MAX) {
      // Fell behind by more than the backlog allows: skip the oldest half, and say so.
      const skip = Math.floor(BACKLOG_MAX / 2);
      state.queueHead += skip;
      state.queueDropped += skip;
    }
    if (!state.frameRequested) {
      state.frameRequested = true;
      requestAnimationFrame(frame);
    }
  }

  // ---- ingest (no DOM) -----------------------------------------------------------------------------

  function ingest(name, raw) {
    let data;
    try {
      data = JSON.parse(raw);
    } catch (e) {
      return;
    }
    state.perf.events += 1;
    if (name === "feature_activation") ingestRecord(data);
    else if (name === "generation_complete") closeRequest(data.request_id);
    else if (name === "dropped") state.dropped += Number(data.dropped) || 0;
  }

  function wanted(requestId) {
    return state.filter === "all" || state.mine.has(requestId);
  }

  function ingestRecord(r) {
    if (!wanted(r.request_id) || !Array.isArray(r.top_features)) return;
    const key = `${r.request_id}|${r.position}`;
    let token = state.byKey.get(key);
    if (!token) {
      const prev = state.tokens[state.tokens.length - 1];
      token = {
        key,
        requestId: String(r.request_id),
        position: r.position,
        phase: r.phase,
        text: String(r.token ?? ""),
        tokenIndex: r.token_index,
        next: r.next_token,
        first: !prev || prev.requestId !== r.request_id,
        seq: state.seq++,
        layers: new Map(),
        best: [], // the EDGE_TOP strongest features over all layers
      };
      state.tokens.push(token);
      state.byKey.set(key, token);
      evict();
    }
    // Records of another site than the residual stream (attn_out, mlp_out, ...) get a layer key of
    // their own ("12 attn_out"), so they never overwrite the residual stream's at the same layer.
    const layer = r.site && r.site !== "resid_post" ? `${r.layer} ${r.site}` : Number(r.layer);
    const features = [];
    let sorted = true;
    for (const f of r.top_features) {
      const activation = Number(f.activation) || 0;
      if (features.length && activation > features[features.length - 1].activation) sorted = false;
      features.push({
        layer,
        index: Number(f.index),
        label: String(f.label ?? `feature_${f.index}`),
        activation,
        surprise: f.surprise === undefined || f.surprise === null ? null : Number(f.surprise),
      });
    }
    if (!sorted) features.sort(byActivation); // the server sends them strongest first
    token.layers.set(layer, features);
    token.best = token.best.concat(features.slice(0, EDGE_TOP)).sort(byActivation).slice(0, EDGE_TOP);
    const now = performance.now();
    for (const f of features) touchFeature(layer, f, now);
    state.open.add(token);
    state.stripDirty.add(token);
    state.viewsDirty = true;
  }

  function touchFeature(layer, f, now) {
    const key = fkey(layer, f.index);
    let s = state.features.get(key);
    if (s) state.features.delete(key); // re-inserted below: the Map's order is least recent first
    else {
      s = { key, layer, index: f.index, label: f.label, count: 0, max: 0, sum: 0, glow: 0, score: 0, at: now };
      s.x = 240 + (Math.random() - 0.5) * 200;
      s.y = 180 + (Math.random() - 0.5) * 160;
      s.vx = 0;
      s.vy = 0;
    }
    state.features.set(key, s);
    decay(s, now);
    s.label = f.label;
    s.count += 1;
    s.sum += f.activation;
    s.max = Math.max(s.max, f.activation);
    s.last = state.seq;
    s.score += f.activation;
    s.glow = Math.max(s.glow, f.activation);
  }

  // Glow and score decay exponentially with time; applied lazily when a feature is read or touched.
  function decay(s, now) {
    const dt = (now - s.at) / 1000;
    if (dt > 0) {
      s.glow *= 0.5 ** (dt / GLOW_HALF_LIFE_S);
      s.score *= 0.5 ** (dt / SCORE_HALF_LIFE_S);
      s.at = now;
    }
  }

  function evict() {
    if (state.tokens.length <= RING + 50) return; // evict in batches of 50
    const gone = state.tokens.splice(0, state.tokens.length - RING);
    for (const token of gone) {
      state.byKey.delete(token.key);
      state.open.delete(token);
      state.summary.tokens += 1;
      const best = strongest(token, 1)[0];
      if (best) {
        const k = fkey(best.layer, best.index);
        const c = state.summary.counts.get(k) || { label: best.label, n: 0 };
        c.n += 1;
        state.summary.counts.set(k, c);
      }
    }
    if (state.summary.counts.size > 500) {
      const keep = [...state.summary.counts.entries()].sort((a, b) => b[1].n - a[1].n).slice(0, 100);
      state.summary.counts = new Map(keep);
    }
    state.stripRebuild = true;
  }

  function closeRequest(requestId) {
    for (const token of state.open) if (token.requestId === requestId) countEdges(token);
    state.viewsDirty = true;
  }

  // A token's strongest features over the layers shown ("all" or one layer).
  function strongest(token, n, layerView = "all") {
    if (layerView === "all") return token.best.slice(0, n);
    return (token.layers.get(Number(layerView)) || []).slice(0, n);
  }

  function byLayer(a, b) {
    return parseFloat(a) - parseFloat(b) || String(a).localeCompare(String(b));
  }

  function byActivation(a, b) {
    return b.activation - a.activation;
  }

  function countEdges(token) {
    state.open.delete(token);
    const top = strongest(token, EDGE_TOP);
    for (let i = 0; i < top.length; i++) {
      for (let j = i + 1; j < top.length; j++) {
        let a = fkey(top[i].layer, top[i].index);
        let b = fkey(top[j].layer, top[j].index);
        if (a > b) [a, b] = [b, a];
        const k = `${a}|${b}`;
        const e = state.edges.get(k);
        if (e) {
          e.w += 1;
          e.last = token.seq;
          state.edges.delete(k); // re-inserted: least recent first
          state.edges.set(k, e);
        } else state.edges.set(k, { a, b, w: 1, last: token.seq });
      }
    }
  }

  // Both maps keep least recently touched first: forgetting the oldest is a walk from the front.
  function prune() {
    if (state.edges.size > EDGES_MAX) {
      for (const k of state.edges.keys()) {
        state.edges.delete(k);
        if (state.edges.size <= EDGES_MAX * 0.8) break;
      }
    }
    if (state.features.size > FEATURES_MAX) {
      // What is on screen stays: pinned features, graph nodes and heatmap rows.
      const shown = new Set([...state.pinned, ...state.graphKeys]);
      for (const r of heatRowCache.rows) if (r.kind === "feature") shown.add(r.s.key);
      for (const k of state.features.keys()) {
        if (!shown.has(k)) state.features.delete(k);
        if (state.features.size <= FEATURES_MAX * 0.8) break;
      }
    }
  }

  // ---- the frame ----------------------------------------------------------------------------------

  function frame(now) {
    state.frameRequested = false;
    const t0 = performance.now();
    if (state.scrollStrip) {
      // Layout is still clean from the last paint here, so reading scrollWidth forces none.
      state.scrollStrip = false;
      const strip = $("strip");
      strip.scrollLeft = strip.scrollWidth;
    }
    const p = state.perf;
    const queue = state.queue;
    while (state.queueHead < queue.length) {
      const [name, data] = queue[state.queueHead++];
      ingest(name, data);
      if ((state.queueHead & 63) === 0 && performance.now() - t0 > INGEST_BUDGET_MS) break;
    }
    if (state.queueHead === queue.length) {
      state.queue = [];
      state.queueHead = 0;
    } else if (state.queueHead > 4096) {
      state.queue = queue.slice(state.queueHead);
      state.queueHead = 0;
    }
    const t1 = performance.now();
    // Tokens no longer growing (none of their layers arrived this frame) get their edges counted.
    const fresh = state.stripDirty;
    for (const token of [...state.open]) if (!fresh.has(token)) countEdges(token);
    prune();
    const t2 = performance.now();
    render(now);
    const ms = performance.now() - t0;
    p.ingestMs = (p.ingestMs || 0) + t1 - t0;
    p.edgesMs = (p.edgesMs || 0) + t2 - t1;
    p.frames += 1;
    p.frameMsTotal += ms;
    p.frameMsMax = Math.max(p.frameMsMax, ms);
    p.gapMsMax = Math.max(p.gapMsMax, now - state.lastFrame);
    state.lastFrame = now;
    // Keep animating while the graph still glows, or more events wait.
    const more = state.queue.length > state.queueHead || state.open.size || state.viewsDirty;
    if (more || alpha >= 0.02 || glowing()) {
      state.frameRequested = true;
      requestAnimationFrame(frame);
    }
  }

  function glowing() {
    const now = performance.now();
    return state.graphKeys.some((k) => {
      const s = state.features.get(k);
      if (!s) return false;
      decay(s, now);
      return s.glow > 0.02;
    });
  }

  function requestFrame() {
    if (!state.frameRequested) {
      state.frameRequested = true;
      requestAnimationFrame(frame);
    }
  }

  function visibleTokens(limit) {
    const out = [];
    for (let i = state.tokens.length - 1; i >= 0 && out.length < limit; i--) {
      const t = state.tokens[i];
      if (state.showPrompt || t.phase !== "prompt") out.push(t);
    }
    return out.reverse();
  }

  function render(now) {
    const p = state.perf;
    const t0 = performance.now();
    if (state.stripRebuild || state.stripDirty.size) renderStrip();
    const t1 = performance.now();
    if (state.viewsDirty && now - state.slowViewsAt >= SLOW_VIEW_MS) {
      state.slowViewsAt = now;
      renderHeatmap();
      renderSparklines();
      state.viewsDirty = false;
    }
    const t2 = performance.now();
    renderGraph(now);
    renderCounts();
    const t3 = performance.now();
    p.stripMs = (p.stripMs || 0) + t1 - t0;
    p.heatMs = (p.heatMs || 0) + t2 - t1;
    p.graphMs = (p.graphMs || 0) + t3 - t2;
  }

  // ---- token strip ----------------------------------------------------------------------------------

  const chips = new Map(); // token -> chip element

  function renderStrip() {
    const strip = $("strip");
    const shown = visibleTokens(STRIP_MAX);
    const shownSet = new Set(shown);
    for (const [token, chip] of chips) {
      if (!shownSet.has(token)) {
        chip.remove();
        chips.delete(token);
      }
    }
    const fragment = document.createDocumentFragment();
    let appended = false;
    for (const token of shown) {
      let chip = chips.get(token);
      if (!chip) {
        chip = el("div", "tok");
        chip.tokenRef = token;
        chips.set(token, chip);
        fillChip(chip, token);
        fragment.append(chip);
        appended = true;
      } else if (state.stripDirty.has(token) || state.stripRebuild) fillChip(chip, token);
    }
    if (appended) strip.append(fragment);
    renderSummary(strip);
    state.stripDirty = new Set();
    state.stripRebuild = false;
    $("strip-note").textContent = `${shown.length} shown, ${state.tokens.length} kept`;
    if (appended && !state.paused) state.scrollStrip = true; // done at the next frame's start
  }

  function renderSummary(strip) {
    let box = $("strip-summary");
    if (!state.summary.tokens) {
      if (box) box.remove();
      return;
    }
    if (!box) {
      box = el("div", "summary");
      box.id = "strip-summary";
    }
    if (strip.firstChild !== box) strip.prepend(box);
    const top = [...state.summary.counts.values()].sort((a, b) => b.n - a.n).slice(0, SUMMARY_TOP);
    box.replaceChildren(el("div", null, `${state.summary.tokens} older tokens; most often strongest:`));
    for (const c of top) box.append(el("div", null, `${c.label} ×${c.n}`));
  }

  function fillChip(chip, token) {
    chip.className = `tok ${token.phase === "prompt" ? "prompt" : ""} ${token.first ? "first" : ""}`;
    if (state.selectedToken === token) chip.classList.add("selected");
    chip.dataset.requestId = token.requestId;
    chip.dataset.position = String(token.position);
    const text = el("div", "tok-text", JSON.stringify(token.text).slice(1, -1));
    const where = token.phase === "prompt" ? `prompt @${token.position}` : `#${token.tokenIndex} @${token.position}`;
    const meta = el("div", "tok-meta", where);
    const parts = [text, meta];
    for (const f of strongest(token, STRIP_FEATURES, state.layerView)) parts.push(featureRow(f, token));
    chip.replaceChildren(...parts);
  }

  function featureRow(f, token) {
    const row = el("div", "feat");
    row.dataset.layer = String(f.layer);
    row.dataset.index = String(f.index);
    const label = el("span", "feat-label", f.label);
    label.title = `layer ${f.layer}, feature ${f.index}: ${f.label}`;
    const num = el("span", "feat-num", fmt(f.activation));
    if (f.surprise !== null && f.surprise !== undefined) {
      num.append(" ", el("span", "surprise", `s ${fmt(f.surprise)}`));
    }
    const bar = el("div", "bar");
    const fill = el("span");
    const max = state.features.get(fkey(f.layer, f.index))?.max || f.activation || 1;
    fill.style.width = `${Math.max(2, Math.min(100, (100 * f.activation) / max))}%`;
    bar.append(fill);
    row.append(label, num, bar);
    row.featureRef = { layer: f.layer, index: f.index };
    row.tokenRef = token;
    return row;
  }

  // ---- heatmap and sparklines ------------------------------------------------------------------------

  let heatRowKeys = "";

  let heatRowCache = { at: -1e9, rows: [] };

  function heatRows() {
    const now = performance.now();
    if (now - heatRowCache.at < 500 && heatRowCache.pinned === state.pinned.join()) {
      return heatRowCache.rows.filter((r) => r.kind === "layer" || state.features.has(r.s.key));
    }
    heatRowCache = { at: now, rows: computeHeatRows(now), pinned: state.pinned.join() };
    return heatRowCache.rows;
  }

  function computeHeatRows(now) {
    const rows = (state.config.layers || []).map((layer) => ({ kind: "layer", layer: Number(layer) }));
    if (!rows.length) {
      const seen = new Set();
      for (const t of state.tokens) for (const l of t.layers.keys()) seen.add(l);
      for (const l of [...seen].sort(byLayer)) rows.push({ kind: "layer", layer: l });
    }
    const chosen = new Set(state.pinned);
    for (const k of state.pinned) {
      const s = state.features.get(k);
      if (s) rows.push({ kind: "feature", s });
    }
    const ranked = [...state.features.values()]
      .filter((s) => !chosen.has(s.key))
      .map((s) => (decay(s, now), s))
      .sort((a, b) => b.score - a.score)
      .slice(0, HEAT_FEATURE_ROWS);
    for (const s of ranked) rows.push({ kind: "feature", s });
    return rows;
  }

  function valueAt(token, layer, index) {
    const features = token.layers.get(layer);
    if (!features) return 0;
    for (const f of features) if (f.index === index) return f.activation;
    return 0;
  }

  function renderHeatmap() {
    const rows = heatRows();
    const tokens = visibleTokens(HEAT_COLS);
    const keys = rows.map((r) => (r.kind === "layer" ? `L${r.layer}` : r.s.key)).join(",");
    const labels = $("heatmap-rows");
    if (keys !== heatRowKeys) {
      heatRowKeys = keys;
      labels.replaceChildren(
        ...rows.map((r) => {
          if (r.kind === "layer") {
            const d = el("div", "layer-row", `layer ${r.layer} (strongest)`);
            d.dataset.layer = String(r.layer);
            return d;
          }
          const d = el("div", null, `L${r.s.layer} #${r.s.index} ${r.s.label}`);
          d.title = d.textContent;
          d.featureRef = { layer: r.s.layer, index: r.s.index };
          d.dataset.layer = String(r.s.layer);
          d.dataset.index = String(r.s.index);
          return d;
        }),
      );
    }
    // One pixel per cell, scaled up by CSS (image-rendering: pixelated): one putImageData a redraw.
    const canvas = $("heatmap");
    const cols = Math.max(tokens.length, 1);
    const height = Math.max(rows.length, 1);
    if (canvas.width !== cols) canvas.width = cols;
    if (canvas.height !== height) canvas.height = height;
    const cssHeight = `${height * ROW_PX}px`;
    const cssWidth = `${Math.min(100, (100 * cols) / HEAT_COLS).toFixed(1)}%`;
    if (canvas.style.height !== cssHeight) canvas.style.height = cssHeight;
    if (canvas.style.width !== cssWidth) canvas.style.width = cssWidth;
    const image = new ImageData(cols, height);
    const px = image.data;
    const values = new Float32Array(cols);
    rows.forEach((r, y) => {
      let max = 1e-6;
      for (let x = 0; x < tokens.length; x++) {
        const t = tokens[x];
        let v = 0;
        if (r.kind === "feature") v = valueAt(t, r.s.layer, r.s.index);
        else {
          const features = t.layers.get(r.layer);
          v = features && features.length ? features[0].activation : 0;
        }
        values[x] = v;
        if (v > max) max = v;
      }
      for (let x = 0; x < tokens.length; x++) {
        const o = 4 * (y * cols + x);
        if (values[x] <= 0) {
          px[o] = 251;
          px[o + 1] = 251;
          px[o + 2] = 253;
        } else {
          const colour = HEAT_LUT[Math.min(255, Math.round((255 * values[x]) / max))];
          px[o] = colour[0];
          px[o + 1] = colour[1];
          px[o + 2] = colour[2];
        }
        px[o + 3] = 255;
      }
    });
    canvas.getContext("2d").putImageData(image, 0, 0);
    canvas.dataset.rows = String(rows.length);
    canvas.dataset.cols = String(tokens.length);
  }

  // pale yellow -> orange -> dark red, 256 steps
  const HEAT_LUT = Array.from({ length: 256 }, (_, i) => {
    const x = i / 255;
    return [Math.round(255 - 80 * x * x), Math.round(240 - 200 * x), Math.round(200 - 190 * Math.sqrt(x))];
  });

  const sparks = new Map(); // feature key -> {box, canvas}

  function renderSparklines() {
    const holder = $("sparklines");
    $("no-pins").hidden = state.pinned.length > 0;
    for (const [k, spark] of sparks) {
      if (!state.pinned.includes(k)) {
        spark.box.remove();
        sparks.delete(k);
      }
    }
    const tokens = visibleTokens(HEAT_COLS);
    for (const k of state.pinned) {
      const s = state.features.get(k);
      if (!s) continue;
      let spark = sparks.get(k);
      if (!spark) {
        const box = el("div", "spark");
        const unpin = el("button", null, "unpin");
        unpin.type = "button";
        unpin.addEventListener("click", () => togglePin(k));
        const title = el("span", null, `L${s.layer} #${s.index} ${s.label}`);
        title.featureRef = { layer: s.layer, index: s.index };
        const canvas = el("canvas");
        canvas.width = 320;
        canvas.height = 36;
        box.append(unpin, title, canvas);
        holder.append(box);
        spark = { box, canvas, title };
        sparks.set(k, spark);
      }
      spark.title.textContent = `L${s.layer} #${s.index} ${s.label} (max ${fmt(s.max)})`;
      const values = tokens.map((t) => valueAt(t, s.layer, s.index));
      const ctx = spark.canvas.getContext("2d");
      const { width, height } = spark.canvas;
      ctx.clearRect(0, 0, width, height);
      const max = Math.max(...values, 1e-6);
      ctx.strokeStyle = "#e8590c";
      ctx.beginPath();
      values.forEach((v, i) => {
        const x = values.length > 1 ? (i * (width - 2)) / (values.length - 1) + 1 : 1;
        const y = height - 2 - (v / max) * (height - 4);
        if (i) ctx.lineTo(x, y);
        else ctx.moveTo(x, y);
      });
      ctx.stroke();
    }
  }

  // ---- co-activation graph -------------------------------------------------------------------------

  const graphNodes = new Map(); // key -> {g, circle, text}
  let graphLines = [];

  function chooseGraph(now) {
    if (now - state.graphChosenAt < 400 && state.graphKeys.length) return;
    state.graphChosenAt = now;
    const pinned = new Set(state.pinned);
    const ranked = [...state.features.values()]
      .map((s) => (decay(s, now), s))
      .sort((a, b) => (pinned.has(b.key) ? 1e9 : b.score) - (pinned.has(a.key) ? 1e9 : a.score))
      .slice(0, GRAPH_NODES);
    const keys = ranked.map((s) => s.key);
    if (keys.join() !== state.graphKeys.join()) alpha = Math.max(alpha, 0.5);
    state.graphKeys = keys;
    const chosen = new Set(keys);
    const edges = [];
    for (const e of state.edges.values()) if (chosen.has(e.a) && chosen.has(e.b)) edges.push(e);
    edges.sort((x, y) => y.w - x.w);
    edges.length = Math.min(edges.length, GRAPH_NODES * 2);
    state.graphEdges = edges;
  }

  function renderGraph(now) {
    chooseGraph(now);
    const root = $("graph");
    const keys = new Set(state.graphKeys);
    for (const [k, node] of graphNodes) {
      if (!keys.has(k)) {
        node.g.remove();
        graphNodes.delete(k);
      }
    }
    const nodes = state.graphKeys.map((k) => state.features.get(k)).filter(Boolean);
    const edges = state.graphEdges.filter((e) => state.features.has(e.a) && state.features.has(e.b));
    layout(nodes, edges);
    // Lines: a small pool, reused.
    while (graphLines.length < edges.length) {
      const line = svg("line");
      root.prepend(line);
      graphLines.push(line);
    }
    while (graphLines.length > edges.length) graphLines.pop().remove();
    const wmax = edges.length ? edges[0].w : 1;
    edges.forEach((e, i) => {
      const a = state.features.get(e.a);
      const b = state.features.get(e.b);
      const line = graphLines[i];
      line.setAttribute("x1", a.x.toFixed(1));
      line.setAttribute("y1", a.y.toFixed(1));
      line.setAttribute("x2", b.x.toFixed(1));
      line.setAttribute("y2", b.y.toFixed(1));
      line.setAttribute("stroke-opacity", (0.15 + (0.6 * e.w) / wmax).toFixed(2));
      line.setAttribute("stroke-width", (0.5 + (2 * e.w) / wmax).toFixed(1));
    });
    let gmax = 1e-6;
    for (const s of nodes) gmax = Math.max(gmax, s.max);
    // Labels on the GRAPH_LABELS most active nodes and on any that glows now; the rest in a tooltip.
    nodes.forEach((s, rank) => {
      let node = graphNodes.get(s.key);
      if (!node) {
        const g = svg("g", { class: "node" });
        const circle = svg("circle", { r: 6 });
        const text = svg("text", { dx: 8, dy: 3 });
        const title = svg("title");
        circle.append(title);
        g.append(circle, text);
        g.featureRef = { layer: s.layer, index: s.index };
        g.dataset.key = s.key;
        root.append(g);
        node = { g, circle, text, title };
        graphNodes.set(s.key, node);
      }
      decay(s, now);
      const glow = Math.min(1, s.glow / gmax);
      node.g.setAttribute("transform", `translate(${s.x.toFixed(1)},${s.y.toFixed(1)})`);
      node.circle.setAttribute("r", (4 + 4 * Math.min(1, s.count / 50)).toFixed(1));
      node.circle.setAttribute("fill", `hsl(${28 - 28 * glow}, 95%, ${(18 + 52 * glow).toFixed(0)}%)`);
      const short = s.label.length > 28 ? `${s.label.slice(0, 27)}…` : s.label;
      const label = rank < GRAPH_LABELS || glow > 0.6 ? short : "";
      if (node.text.textContent !== label) node.text.textContent = label;
      node.title.textContent = `layer ${s.layer} #${s.index}: ${s.label}`;
    });
  }

  // A plain force layout, a few steps per frame: repulsion between nodes, springs on edges, a pull
  // to the centre, damping. It cools down (alpha) and warms up again when the node set changes;
  // positions live on the feature stats, so a node keeps its place while it stays in the graph.
  let alpha = 1;

  function layout(nodes, edges) {
    const W = 480;
    const H = 360;
    if (alpha < 0.02) return;
    alpha *= 0.985;
    for (let i = 0; i < nodes.length; i++) {
      const a = nodes[i];
      for (let j = i + 1; j < nodes.length; j++) {
        const b = nodes[j];
        let dx = a.x - b.x;
        let dy = a.y - b.y;
        let d2 = dx * dx + dy * dy;
        if (d2 < 1) {
          dx = Math.random() - 0.5;
          dy = Math.random() - 0.5;
          d2 = 1;
        }
        const f = d2 < 22500 ? (80 * alpha) / d2 : 0; // no push beyond 150 px
        a.vx += dx * f;
        a.vy += dy * f;
        b.vx -= dx * f;
        b.vy -= dy * f;
      }
    }
    for (const e of edges) {
      const a = state.features.get(e.a);
      const b = state.features.get(e.b);
      const dx = b.x - a.x;
      const dy = b.y - a.y;
      const d = Math.sqrt(dx * dx + dy * dy) || 1;
      const f = (0.02 * alpha * (d - 50)) / d;
      a.vx += dx * f;
      a.vy += dy * f;
      b.vx -= dx * f;
      b.vy -= dy * f;
    }
    for (const s of nodes) {
      s.vx += (W / 2 - s.x) * 0.012 * alpha;
      s.vy += (H / 2 - s.y) * 0.012 * alpha;
      s.vx *= 0.7;
      s.vy *= 0.7;
      s.x = Math.max(12, Math.min(W - 12, s.x + Math.max(-6, Math.min(6, s.vx))));
      s.y = Math.max(12, Math.min(H - 12, s.y + Math.max(-6, Math.min(6, s.vy))));
    }
  }

  function renderCounts() {
    const bits = [`${state.features.size} features`, `${state.edges.size} links`];
    if (state.paused) bits.push(`paused, ${state.skipped} events skipped`);
    if (state.dropped) bits.push(`server dropped ${state.dropped} (page fell behind)`);
    if (state.queueDropped) bits.push(`${state.queueDropped} dropped in the page`);
    const text = bits.join(" · ");
    if ($("counts").textContent !== text) $("counts").textContent = text;
  }

  // ---- feature and token panels ----------------------------------------------------------------------

  function facts(pairs) {
    const dl = el("dl", "facts");
    for (const [k, v] of pairs) {
      if (v === undefined) continue;
      dl.append(el("dt", null, k));
      const dd = el("dd");
      if (v instanceof Node) dd.append(v);
      else dd.textContent = v === null ? "–" : String(v);
      dl.append(dd);
    }
    return dl;
  }

  function neuronpediaUrl(layer, index, info) {
    let url = info && typeof info.neuronpedia === "string" ? info.neuronpedia : null;
    const ids = state.config.neuronpedia_ids || {};
    if (!url && ids[layer]) url = `https://www.neuronpedia.org/${ids[layer]}/${index}`;
    // Only plain https links to Neuronpedia become links (no javascript: or other schemes).
    return url && /^https:\/\/(www\.)?neuronpedia\.org\//.test(url) ? url : null;
  }

  async function showFeature(layer, index) {
    state.selectedFeature = fkey(layer, index);
    renderFeature(layer, index, null, "");
    // Details are served per hooked layer of the residual stream (a number); other sites have none.
    if (!state.config.feature_info || typeof layer !== "number") return;
    try {
      const url = `${state.featuresOrigin}/v1/features/info?layer=${layer}&index=${index}`;
      const response = await fetch(url, { headers: authHeaders() });
      const body = await response.json();
      if (state.selectedFeature !== fkey(layer, index)) return;
      if (!response.ok) renderFeature(layer, index, null, body?.error?.message || `HTTP ${response.status}`);
      else renderFeature(layer, index, body, "");
    } catch (e) {
      renderFeature(layer, index, null, "feature details unavailable");
    }
  }

  function renderFeature(layer, index, info, error) {
    const key = fkey(layer, index);
    const s = state.features.get(key);
    const label = info?.label ?? s?.label ?? `feature_${index}`;
    const box = $("feature");
    box.className = "";
    const title = el("h3", null, label);
    const link = neuronpediaUrl(layer, index, info);
    let linkNode = null;
    if (link) {
      linkNode = el("a", null, "open on Neuronpedia");
      linkNode.href = link;
      linkNode.target = "_blank";
      linkNode.rel = "noopener noreferrer";
    }
    const body = facts([
      ["feature", `#${index} at layer ${layer}`],
      ["SAE", (state.config.sae_ids || {})[layer] ?? undefined],
      ["label source", info ? info.label_source ?? "–" : "feature stream"],
      ["firing rate", info ? pct(info.firing_rate) : "– (no calibration served)"],
      ["mean activation", info ? fmt(info.mean_activation) : undefined],
      ["max activation (calibration)", info ? fmt(info.max_activation) : undefined],
      ["seen here", s ? `${s.count} tokens, max ${fmt(s.max)}, mean ${fmt(s.sum / s.count)}` : "not yet"],
      ["Neuronpedia", linkNode ?? "no Neuronpedia id for this SAE"],
    ]);
    const pin = el("button", null, state.pinned.includes(key) ? "Unpin" : "Pin");
    pin.type = "button";
    pin.addEventListener("click", () => {
      togglePin(key);
      renderFeature(layer, index, info, error);
    });
    const steer = el("button", null, "Steer with it");
    steer.type = "button";
    steer.addEventListener("click", () => pickSteer(layer, index));
    const parts = [title, body, pin, " ", steer];
    const examples = info && Array.isArray(info.examples) ? info.examples : [];
    if (examples.length) {
      parts.push(el("h3", null, "Top examples"));
      const list = el("ol", "examples");
      for (const ex of examples.slice(0, 10)) {
        const li = el("li");
        li.append(String(ex.before ?? ""), el("mark", null, ex.token ?? ""), String(ex.after ?? ""));
        li.append(el("span", "muted", `  ${fmt(ex.activation)}`));
        list.append(li);
      }
      parts.push(list);
    } else if (info) parts.push(el("p", "muted", "No top examples (run the corpus pass for them)."));
    if (error) parts.push(el("p", "error", error));
    box.replaceChildren(...parts);
  }

  // ---- why did it fire (POST /v1/features/attribute by request id and position) ----------------------

  const WHY_SOURCES = 10;

  async function showWhy(token, layer, index) {
    const box = $("why");
    // Attribution reads the residual stream's SAEs (a layer number); other sites have none.
    if (typeof layer !== "number") {
      box.className = "muted";
      box.replaceChildren(el("p", null, `No attribution for ${layer} features (residual stream only).`));
      return;
    }
    const ask = `${token.requestId}|${token.position}|${layer}|${index}`;
    state.whyAsk = ask;
    box.className = "muted";
    const what = `feature #${index} at layer ${layer} on ${JSON.stringify(token.text)} (position ${token.position})`;
    box.replaceChildren(el("p", null, `Explaining ${what}…`));
    let message = "";
    try {
      const response = await fetch(`${state.featuresOrigin}/v1/features/attribute`, {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify({
          request_id: token.requestId,
          position: token.position,
          layer,
          feature: index,
          top: 12,
        }),
      });
      const body = await response.json();
      if (state.whyAsk !== ask) return;
      if (response.ok) {
        renderWhy(body, what, token, layer);
        return;
      }
      message = body?.error?.message || `HTTP ${response.status}`;
    } catch (e) {
      message = "attribution unavailable";
    }
    if (state.whyAsk !== ask) return;
    box.className = "";
    box.replaceChildren(el("h3", null, `Why: ${what}`), el("p", "error", message));
  }

  // One labelled number with a bar: its length is |value| against the largest in its group,
  // its colour the sign (raised: hot, lowered: accent).
  function whyRow(name, value, max) {
    const row = el("div", "why-row");
    const bar = el("div", "bar");
    const fill = el("span", value < 0 ? "neg" : null);
    fill.style.width = `${Math.max(1, Math.min(100, (100 * Math.abs(value)) / (max || 1)))}%`;
    bar.append(fill);
    row.append(el("span", "why-name", name), el("span", "feat-num", fmt(value)), bar);
    return row;
  }

  function whyGroup(title, pairs) {
    const max = Math.max(0, ...pairs.map(([, v]) => Math.abs(v)));
    const block = el("div", "why-group");
    block.append(el("h4", null, title));
    for (const [name, value] of pairs) block.append(whyRow(name, value, max));
    return block;
  }

  // Ablation effects (POST /v1/features/ablation): the strongest features at this token, each
  // removed in turn, and how the next-token distribution moved (one forward pass per feature).
  async function showAblation(token, layer, out) {
    out.replaceChildren(el("p", "muted", "Ablating the strongest features…"));
    try {
      const response = await fetch(`${state.featuresOrigin}/v1/features/ablation`, {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify({ request_id: token.requestId, position: token.position, layer, top: 5 }),
      });
      const body = await response.json();
      if (!response.ok) {
        out.replaceChildren(el("p", "error", body?.error?.message || `HTTP ${response.status}`));
        return;
      }
      const effects = Array.isArray(body.effects) ? body.effects : [];
      const max = Math.max(0, ...effects.map((e) => Number(e.kl) || 0));
      const block = el("div", "why-group ablation");
      block.append(el("h4", null, "Ablation effects on the next token (KL, nats)"));
      for (const e of effects) {
        const tokenText = JSON.stringify(String(e.top_token_text ?? ""));
        const name = `${String(e.label ?? `feature_${e.feature}`)} #${e.feature}: p(${tokenText}) ${fmt(e.top_prob_before)} → ${fmt(e.top_prob_after)}`;
        block.append(whyRow(name, Number(e.kl) || 0, max));
      }
      if (!effects.length) block.append(el("p", "muted", "No feature is active here."));
      out.replaceChildren(block);
    } catch (e) {
      out.replaceChildren(el("p", "error", "ablation effects unavailable"));
    }
  }

  function renderWhy(body, what, token, layer) {
    const box = $("why");
    box.className = "";
    const num = (x) => Number(x) || 0;
    const components = Object.entries(body.by_component || {}).map(([k, v]) => [String(k), num(v)]);
    const blocks = (Array.isArray(body.by_layer) ? body.by_layer : []).map((x) => [
      `block ${x.layer}`,
      num(x.value),
    ]);
    const sources = (Array.isArray(body.by_source) ? body.by_source : [])
      .map((x) => [`${JSON.stringify(String(x.token ?? ""))} @${x.position}`, num(x.value)])
      .sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]))
      .slice(0, WHY_SOURCES);
    box.replaceChildren(
      el("h3", null, `Why: ${String(body.label ?? "")}, ${what}`),
      facts([
        ["pre-activation (total)", fmt(body.total)],
        ["activation", fmt(body.activation)],
        ["SAE error part", fmt(body.residual_error)],
      ]),
      whyGroup("Top source tokens", sources),
      whyGroup("By component", components),
      whyGroup("By block", blocks),
    );
    const out = el("div");
    const ablate = el("button", null, "Ablation effects at this token");
    ablate.type = "button";
    ablate.addEventListener("click", () => showAblation(token, layer, out));
    box.append(ablate, out);
  }

  function togglePin(key) {
    const i = state.pinned.indexOf(key);
    if (i >= 0) state.pinned.splice(i, 1);
    else state.pinned.push(key);
    heatRowKeys = "";
    state.viewsDirty = true;
    requestFrame();
  }

  function showToken(token) {
    const previous = state.selectedToken;
    state.selectedToken = token;
    if (previous && chips.get(previous)) chips.get(previous).classList.remove("selected");
    if (chips.get(token)) chips.get(token).classList.add("selected");
    const box = $("token-detail");
    box.className = "";
    const parts = [
      facts([
        ["token", JSON.stringify(token.text)],
        ["next token", token.next === null || token.next === undefined ? "–" : JSON.stringify(token.next)],
        ["phase", token.phase],
        ["position", token.position],
        ["request", token.requestId],
      ]),
    ];
    const layers = [...token.layers.keys()].sort(byLayer);
    for (const layer of layers) {
      const block = el("div", "layer-block");
      block.append(el("h4", null, `layer ${layer}`));
      for (const f of token.layers.get(layer)) block.append(featureRow({ layer, ...f }, token));
      parts.push(block);
    }
    box.replaceChildren(...parts);
  }

  // One listener for every feature row, heatmap label, graph node and token chip (delegation).
  function onClick(event) {
    let node = event.target;
    while (node && node !== document.body) {
      if (node.featureRef) {
        showFeature(node.featureRef.layer, node.featureRef.index);
        if (node.tokenRef && node.closest && node.closest("#strip")) showToken(node.tokenRef);
        if (node.tokenRef) showWhy(node.tokenRef, node.featureRef.layer, node.featureRef.index);
        return;
      }
      if (node.tokenRef) {
        showToken(node.tokenRef);
        return;
      }
      node = node.parentNode;
    }
  }

  // ---- chat ------------------------------------------------------------------------------------------

  function newRequestId() {
    const bytes = new Uint8Array(8);
    crypto.getRandomValues(bytes);
    return `page-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
  }

  // Streams one chat completion; calls onText with each piece of the reply. Returns the request id.
  async function chat(prompt, extra, onText, signal) {
    const clientId = newRequestId();
    const requestId = `chatcmpl-${clientId}`;
    state.mine.add(requestId);
    const body = {
      messages: [{ role: "user", content: prompt }],
      stream: true,
      max_tokens: Number($("max-tokens").value) || 48,
      temperature: Number($("temperature").value) || 0,
      ...extra,
    };
    const response = await fetch(`${state.chatOrigin}/v1/chat/completions`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Request-Id": clientId, ...authHeaders() },
      body: JSON.stringify(body),
      signal,
    });
    if (!response.ok) {
      let message = `the chat API answered ${response.status}`;
      try {
        message = (await response.json()).error.message || message;
      } catch (e) {
        /* not JSON */
      }
      if (response.status === 401) askForKey("The chat API refused the key.");
      throw new Error(message);
    }
    let failure = null;
    await readSSE(response, (name, data) => {
      if (data === "[DONE]") return;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch (e) {
        return;
      }
      if (chunk.error) failure = chunk.error.message || "the generation failed";
      for (const choice of chunk.choices || []) {
        const text = choice.delta && choice.delta.content;
        if (text) onText(text);
      }
    });
    if (failure) throw new Error(failure);
    return requestId;
  }

  async function sendChat(event) {
    event.preventDefault();
    const prompt = $("prompt").value;
    if (!prompt.trim()) return;
    const reply = $("reply");
    reply.textContent = "";
    $("chat-error").textContent = "";
    const controller = new AbortController();
    state.chatAbort = controller;
    $("send").disabled = true;
    $("stop").disabled = false;
    try {
      await chat(prompt, {}, (text) => reply.append(text), controller.signal);
      reply.dataset.done = "true";
    } catch (e) {
      if (!controller.signal.aborted) $("chat-error").textContent = String(e.message || e);
    } finally {
      $("send").disabled = false;
      $("stop").disabled = true;
      state.chatAbort = null;
    }
  }

  // ---- steering --------------------------------------------------------------------------------------

  async function labelFor(layer, index) {
    const s = state.features.get(fkey(layer, index));
    if (s) return s.label;
    if (!state.labelsByLayer.has(layer)) {
      try {
        const response = await fetch(`${state.featuresOrigin}/v1/features/labels?layer=${layer}`, {
          headers: authHeaders(),
        });
        state.labelsByLayer.set(layer, response.ok ? await response.json() : {});
      } catch (e) {
        state.labelsByLayer.set(layer, {});
      }
    }
    return state.labelsByLayer.get(layer)[String(index)] ?? "";
  }

  function pickSteer(layer, index) {
    if (typeof layer !== "number") return; // steering acts on the residual stream's layers
    $("steer-layer").value = String(layer);
    $("steer-feature").value = String(index);
    updateSteerLabel();
    $("steer-panel").scrollIntoView({ block: "nearest" });
  }

  async function updateSteerLabel(lookUp = true) {
    const layer = Number($("steer-layer").value);
    const index = Number($("steer-feature").value);
    const mode = $("steer-mode").value;
    $("steer-strength-label").firstChild.textContent = mode === "clamp" ? "value " : "strength ";
    $("steer-strength").disabled = mode === "ablate";
    if (!lookUp || Number.isNaN(layer) || Number.isNaN(index)) return;
    $("steer-label").textContent = await labelFor(layer, index);
  }

  function steeringSpec() {
    const layer = Number($("steer-layer").value);
    const feature = Number($("steer-feature").value);
    const mode = $("steer-mode").value;
    const amount = Number($("steer-strength").value);
    if (mode === "ablate") return { layer, feature, mode };
    if (mode === "clamp") return { layer, feature, mode, value: amount };
    return { layer, feature, strength: amount };
  }

  async function sendSteered(event) {
    event.preventDefault();
    const prompt = $("prompt").value;
    const plain = $("reply-plain");
    const steered = $("reply-steered");
    plain.textContent = "";
    steered.textContent = "";
    $("steer-error").textContent = "";
    $("steer-send").disabled = true;
    const spec = steeringSpec();
    const results = await Promise.allSettled([
      chat(prompt, {}, (t) => plain.append(t)),
      chat(prompt, { neuroscope: { steering: [spec] } }, (t) => steered.append(t)),
    ]);
    const errors = results.filter((r) => r.status === "rejected").map((r) => String(r.reason.message || r.reason));
    $("steer-error").textContent = errors.join("\n");
    $("steer-send").disabled = false;
  }

  // ---- controls --------------------------------------------------------------------------------------

  function clearAll() {
    state.queue = [];
    state.queueHead = 0;
    state.tokens = [];
    state.byKey = new Map();
    state.open = new Set();
    state.summary = { tokens: 0, counts: new Map() };
    const keepPinned = new Map();
    for (const k of state.pinned) if (state.features.has(k)) keepPinned.set(k, state.features.get(k));
    state.features = keepPinned;
    state.edges = new Map();
    state.skipped = 0;
    state.dropped = 0;
    state.queueDropped = 0;
    state.selectedToken = null;
    state.stripRebuild = true;
    state.viewsDirty = true;
    state.graphKeys = [];
    state.graphEdges = [];
    heatRowKeys = "";
    heatRowCache = { at: -1e9, rows: [] };
    $("token-detail").textContent = "Click a token for every layer's features.";
    $("token-detail").className = "muted";
    requestFrame();
  }

  function setFilter(value) {
    state.filter = value;
    if (value === "mine") {
      // Forget other requests' tokens already kept, so every view shows this page's only.
      const keep = state.tokens.filter((t) => state.mine.has(t.requestId));
      state.tokens = keep;
      state.byKey = new Map(keep.map((t) => [t.key, t]));
      state.stripRebuild = true;
      state.viewsDirty = true;
      requestFrame();
    }
  }

  function wire() {
    document.body.addEventListener("click", onClick);
    $("chat-form").addEventListener("submit", sendChat);
    $("stop").addEventListener("click", () => state.chatAbort && state.chatAbort.abort());
    $("steer-form").addEventListener("submit", sendSteered);
    for (const id of ["steer-layer", "steer-feature", "steer-mode"]) {
      $(id).addEventListener("change", updateSteerLabel);
    }
    $("filter").addEventListener("change", (e) => setFilter(e.target.value));
    $("show-prompt").addEventListener("change", (e) => {
      state.showPrompt = e.target.checked;
      state.stripRebuild = true;
      state.viewsDirty = true;
      requestFrame();
    });
    $("layer-select").addEventListener("change", (e) => {
      state.layerView = e.target.value;
      state.stripRebuild = true;
      requestFrame();
    });
    $("pause").addEventListener("click", () => {
      state.paused = !state.paused;
      $("pause").textContent = state.paused ? "Resume" : "Pause";
      $("pause").setAttribute("aria-pressed", String(state.paused));
      requestFrame();
    });
    $("clear").addEventListener("click", clearAll);
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("api-key").value.trim();
      $("api-key").value = "";
      if (!key) return;
      useKey(key);
      $("key-error").textContent = "";
      connect();
    });
  }

  // For the browser tests and the throughput measurement: feed SSE text through the same parser and
  // pipeline as the network stream, and read counters. Nothing here reaches the network.
  const replayParser = new SSEParser(onStreamEvent);
  window.neuroscope = {
    replay: (text) => replayParser.feed(text),
    stats: () => ({
      tokens: state.tokens.length,
      queued: state.queue.length - state.queueHead,
      features: state.features.size,
      edges: state.edges.size,
      chips: chips.size,
      graphNodes: graphNodes.size,
      heatRows: Number($("heatmap").dataset.rows || 0),
      summarised: state.summary.tokens,
      skipped: state.queueDropped,
      ...state.perf,
    }),
    resetPerf: () => {
      state.perf = { frames: 0, events: 0, frameMsMax: 0, frameMsTotal: 0, gapMsMax: 0 };
    },
  };

  async function start() {
    wire();
    await loadConfig();
    try {
      state.key = sessionStorage.getItem(KEY_STORE);
    } catch (e) {
      state.key = null;
    }
    updateSteerLabel(false);
    if (state.config.api_key && !state.key) {
      askForKey("");
      return;
    }
    connect();
  }

  start();
})();
