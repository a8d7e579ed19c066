/* jaxpersona playground: plain JS, no dependencies, no network beyond this server's /v1.
 *
 * Two settings panes (A, B) send the same conversation as two concurrent streaming chat requests with the same
 * seed; each chunk's text is coloured by its tokens' mean projection on the readout vector (persona_projection),
 * each turn's mean projection (persona_readout) goes on the drift plot, and the API panel shows the exact JSON
 * body (and an `openai` snippet) of a pane's next or last request. The API key lives in this page's memory only.
 */
"use strict";

const API = location.origin + "/v1";
const PANES = ["A", "B"];
const STANDARD = ["model", "messages", "stream", "seed", "temperature", "max_tokens"];  // the rest go to extra_body
const LIST_LIMIT = 200;

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, text) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
};

const S = {
  info: { n_resid: 0, vectors: [], presets: [], adapters: [], positions: ["all", "prompt", "response", "assistant"],
          max_interventions: 4 },
  base: "",          // the served model id
  models: [],        // ids a request may name as "model" (base first)
  panes: {},         // name -> {enabled, model, capOn, capPreset, cards, filter}
  turns: [],         // {user, A: reply|null, B: reply|null}; reply = {spans, text, readout, error, done, key}
  last: { A: null, B: null },  // the last body sent per pane
  controllers: [],
  busy: false,
  nextCard: 1,
};

function newPane(enabled) {
  return { enabled, model: "", capOn: false, capPreset: "", cards: [], filter: "" };
}
S.panes.A = newPane(true);
S.panes.B = newPane(true);

// --- small helpers -----------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api-key").value;
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function status(text, kind = "info") {
  const s = $("#status");
  s.hidden = !text;
  s.textContent = text || "";
  s.className = "status " + kind;
}

function middle() { return Math.max(0, Math.floor((S.info.n_resid - 1) / 2)); }

function numberOf(id, integer) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const x = Number(raw);
  if (!Number.isFinite(x)) return undefined;
  return integer ? Math.trunc(x) : x;
}

function fillSelect(sel, options, value) {
  sel.textContent = "";
  for (const o of options) {
    const [v, label] = Array.isArray(o) ? o : [o, o];
    sel.append(el("option", { value: String(v) }, String(label)));
  }
  if (value !== undefined && options.some(o => String(Array.isArray(o) ? o[0] : o) === String(value))) {
    sel.value = String(value);
  }
}

function errorText(obj, fallback) {
  if (obj && typeof obj === "object" && obj.error) {
    const e = obj.error;
    return (e.message || JSON.stringify(e)) + (e.param ? ` (${e.param})` : "");
  }
  return fallback;
}

// --- the server's resources ------------------------------------------------------------------------
async function connect() {
  status("loading /v1/models …");
  let res, body;
  try {
    res = await fetch(API + "/models", { headers: headers() });
    body = await res.json().catch(() => null);
  } catch (e) {
    status("cannot reach the server: " + e.message, "error");
    return;
  }
  if (!res.ok) {
    status(`HTTP ${res.status}: ${errorText(body, "cannot list models")}` +
           (res.status === 401 ? " — enter the API key and press connect" : ""), "error");
    return;
  }
  const data = (body && Array.isArray(body.data)) ? body.data : [];
  const served = data.find(m => m && m.jaxpersona) || data[0] || { id: "" };
  S.base = served.id || "";
  S.info = Object.assign({}, S.info, served.jaxpersona || {});
  S.info.vectors = S.info.vectors || [];
  S.info.presets = S.info.presets || [];
  const ids = [S.base];
  for (const m of data) if (m && m.id && !ids.includes(m.id)) ids.push(m.id);
  for (const a of S.info.adapters || []) {
    const name = typeof a === "string" ? a : (a && (a.name || a.id));
    if (name && !ids.includes(name)) ids.push(name);
  }
  S.models = ids;
  for (const P of PANES) {
    const p = S.panes[P];
    if (!S.models.includes(p.model)) p.model = S.base;
    if (!S.info.presets.includes(p.capPreset)) p.capPreset = S.info.presets[0] || "";
  }
  $("#served").textContent = `${S.base} · ${S.info.n_resid} resid points · ${S.info.vectors.length} vectors` +
    (S.info.presets.length ? ` · presets: ${S.info.presets.join(", ")}` : "");
  status("");
  setupReadout();
  for (const P of PANES) renderPaneSettings(P);
  renderAll();
}

// --- readout -------------------------------------------------------------------------------------------
function setupReadout() {
  const vecs = S.info.vectors;
  const sel = $("#readout-vector");
  const keep = sel.value;
  const first = vecs.includes("assistant_axis") ? "assistant_axis" : (vecs[0] || "");
  fillSelect(sel, [["", "(none)"], ...vecs], vecs.includes(keep) ? keep : first);
  const layers = [...Array(S.info.n_resid).keys()];
  const lsel = $("#readout-layer");
  const lkeep = lsel.value;
  fillSelect(lsel, layers, lkeep !== "" && Number(lkeep) < S.info.n_resid ? lkeep : middle());
}

function readoutSpec() {
  const v = $("#readout-vector").value;
  if (!v) return null;
  return { name: v, vector: v, layer: Number($("#readout-layer").value) };
}

function readoutKey() {
  const r = readoutSpec();
  return r ? `${r.name}@${r.layer}` : "";
}

// --- pane settings ---------------------------------------------------------------------------------------
function renderPaneSettings(P) {
  const box = $("#settings-" + P);
  const p = S.panes[P];
  box.textContent = "";
  box.append($("#pane-settings-template").content.cloneNode(true));
  $(".pane-name", box).textContent = P;
  const enabled = $(".enabled", box);
  enabled.checked = p.enabled;
  enabled.closest("label").hidden = P === "A";  // A always runs; B is the comparison
  enabled.addEventListener("change", () => { p.enabled = enabled.checked; renderAll(); });

  const model = $(".model", box);
  fillSelect(model, S.models.map(id => [id, id === S.base ? `base (${id})` : id]), p.model);
  model.addEventListener("change", () => { p.model = model.value; renderAll(); });

  const capOn = $(".cap-on", box), capPreset = $(".cap-preset", box);
  fillSelect(capPreset, S.info.presets.length ? S.info.presets.map(n => [n, `${n} (calibrated threshold)`])
                                             : [["", "(the server has no presets)"]], p.capPreset);
  capOn.checked = p.capOn;
  capOn.disabled = capPreset.disabled = !S.info.presets.length;
  capOn.addEventListener("change", () => { p.capOn = capOn.checked; renderAll(); });
  capPreset.addEventListener("change", () => { p.capPreset = capPreset.value; renderAll(); });

  const filter = $(".filter", box);
  filter.value = p.filter;
  filter.addEventListener("input", () => { p.filter = filter.value; renderVectorList(P); });
  filter.addEventListener("keydown", ev => {
    if (ev.key === "Enter") {
      ev.preventDefault();
      const first = matches(p.filter)[0];
      if (first) addCard(P, first);
    }
  });
  renderVectorList(P);

  const other = P === "A" ? "B" : "A";
  const copy = $(".copy-other", box);
  copy.textContent = `same as ${other}`;
  copy.addEventListener("click", () => {
    const o = S.panes[other];
    Object.assign(p, { model: o.model, capOn: o.capOn, capPreset: o.capPreset,
                       cards: o.cards.map(c => Object.assign({}, c, { id: S.nextCard++ })) });
    renderPaneSettings(P);
    renderAll();
  });
  $(".reset", box).addEventListener("click", () => {
    p.cards = [];
    p.capOn = false;
    renderPaneSettings(P);
    renderAll();
  });
  for (const c of p.cards) $(".cards", box).append(cardElement(P, c));
}

function matches(filter) {
  const f = filter.trim().toLowerCase();
  return S.info.vectors.filter(v => !f || v.toLowerCase().includes(f));
}

function renderVectorList(P) {
  const box = $("#settings-" + P);
  const list = $(".vector-list", box);
  const found = matches(S.panes[P].filter);
  list.textContent = "";
  for (const v of found.slice(0, LIST_LIMIT)) {
    const li = el("li", { role: "option", tabindex: "0", "data-vector": v, title: `add a steering card for ${v}` }, v);
    li.addEventListener("click", () => addCard(P, v));
    li.addEventListener("keydown", ev => { if (ev.key === "Enter") addCard(P, v); });
    list.append(li);
  }
  const note = $(".list-note", box);
  if (!S.info.vectors.length) note.textContent = "this server has no bank vectors (start it with --bank)";
  else if (found.length > LIST_LIMIT) note.textContent = `${found.length} match; showing ${LIST_LIMIT} — refine the filter`;
  else note.textContent = `${found.length} of ${S.info.vectors.length} vectors — click to add a slider`;
}

function addCard(P, vector) {
  const c = { id: S.nextCard++, vector, coeff: 0, layer: middle(), positions: "response" };
  if (!S.info.positions.includes(c.positions)) c.positions = S.info.positions[0] || "all";
  S.panes[P].cards.push(c);
  $(".cards", $("#settings-" + P)).append(cardElement(P, c));
  renderAll();
}

function cardElement(P, c) {
  const node = $("#card-template").content.firstElementChild.cloneNode(true);
  node.dataset.vector = c.vector;
  node.dataset.card = String(c.id);
  $(".vec", node).textContent = c.vector;
  const range = $(".coeff", node), num = $(".coeff-num", node);
  range.value = String(c.coeff);
  num.value = String(c.coeff);
  range.addEventListener("input", () => { c.coeff = Number(range.value); num.value = range.value; renderAll(); });
  num.addEventListener("input", () => {
    const x = Number(num.value);
    if (num.value.trim() === "" || !Number.isFinite(x)) return;
    c.coeff = x;
    range.value = String(x);
    renderAll();
  });
  const layer = $(".layer", node);
  fillSelect(layer, [...Array(S.info.n_resid).keys()], c.layer);
  layer.addEventListener("change", () => { c.layer = Number(layer.value); renderAll(); });
  const pos = $(".positions", node);
  fillSelect(pos, S.info.positions, c.positions);
  pos.addEventListener("change", () => { c.positions = pos.value; renderAll(); });
  $(".remove", node).addEventListener("click", () => {
    const cards = S.panes[P].cards;
    cards.splice(cards.indexOf(c), 1);
    node.remove();
    renderAll();
  });
  return node;
}

function interventions(P) {
  const p = S.panes[P];
  const out = [];
  if (p.capOn && p.capPreset) out.push(p.capPreset);
  for (const c of p.cards) {
    out.push({ kind: "steer", vector: c.vector, layers: c.layer, coeff: c.coeff, units: "relative",
               positions: c.positions });
  }
  return out;
}

function summary(P) {
  const p = S.panes[P];
  if (P === "B" && !p.enabled) return "off";
  const parts = [p.model === S.base ? "base" : p.model];
  if (p.capOn && p.capPreset) parts.push("cap " + p.capPreset);
  for (const c of p.cards) parts.push(`${c.vector} ${c.coeff >= 0 ? "+" : ""}${c.coeff}@${c.layer}`);
  if (parts.length === 1) parts.push("no interventions");
  return parts.join(" · ");
}

// --- requests ----------------------------------------------------------------------------------------
function messagesFor(P, pending) {
  const msgs = [];
  const system = $("#system").value;
  if (system.trim()) msgs.push({ role: "system", content: system });
  for (const t of S.turns) {
    const r = t[P];
    if (!r || r.error || !r.done) continue;  // failed or missing replies leave their turn out
    msgs.push({ role: "user", content: t.user }, { role: "assistant", content: r.text });
  }
  if (pending !== null) msgs.push({ role: "user", content: pending });
  return msgs;
}

function requestBody(P, pending) {
  const body = { model: S.panes[P].model || S.base, messages: messagesFor(P, pending), stream: true };
  const seed = numberOf("#seed", true), temperature = numberOf("#temperature"), maxTokens = numberOf("#max-tokens", true);
  if (seed !== undefined) body.seed = seed;
  if (temperature !== undefined) body.temperature = temperature;
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  const iv = interventions(P);
  if (iv.length) body.interventions = iv;
  const ro = readoutSpec();
  if (ro) body.persona_readout = [ro];
  return body;
}

async function send(text) {
  if (S.busy || !text.trim()) return;
  const run = PANES.filter(P => S.panes[P].enabled);
  const bodies = {};
  for (const P of run) bodies[P] = requestBody(P, text);
  const turn = { user: text, A: null, B: null };
  const key = readoutKey();
  for (const P of run) turn[P] = { spans: [], text: "", readout: null, error: null, done: false, key, pending: [] };
  S.turns.push(turn);
  for (const P of run) S.last[P] = bodies[P];
  $("#message").value = "";
  setBusy(true);
  renderTranscripts();
  renderApi();
  await Promise.all(run.map(P => streamInto(P, bodies[P], turn[P])));
  setBusy(false);
  renderAll();
}

function setBusy(busy) {
  S.busy = busy;
  $("#send").disabled = busy;
  $("#stop").disabled = !busy;
  if (!busy) S.controllers = [];
}

async function streamInto(P, body, reply) {
  const ctrl = new AbortController();
  S.controllers.push(ctrl);
  let res;
  try {
    res = await fetch(API + "/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                   signal: ctrl.signal });
  } catch (e) {
    return fail(P, reply, e.name === "AbortError" ? "stopped" : "network error: " + e.message);
  }
  if (!res.ok) {
    const raw = await res.text().catch(() => "");
    let obj = null;
    try { obj = JSON.parse(raw); } catch (_) { /* not JSON */ }
    return fail(P, reply, `HTTP ${res.status}: ${errorText(obj, raw || res.statusText)}`);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") { finish(P, reply); return; }
        let obj;
        try { obj = JSON.parse(data); } catch (_) { continue; }
        if (obj && obj.error) { fail(P, reply, errorText(obj, "stream error")); continue; }
        onChunk(P, reply, obj);
      }
    }
  } catch (e) {
    return fail(P, reply, e.name === "AbortError" ? "stopped" : "stream broken: " + e.message);
  }
  if (!reply.error) fail(P, reply, "the stream ended without [DONE]");
}

function mean(xs) {
  const ok = xs.filter(x => typeof x === "number" && Number.isFinite(x));
  return ok.length ? ok.reduce((a, b) => a + b, 0) / ok.length : null;
}

function onChunk(P, reply, chunk) {
  const name = reply.key ? reply.key.split("@")[0] : "";
  for (const ch of chunk.choices || []) {
    if (ch.index !== undefined && ch.index !== 0) continue;
    const proj = ch.persona_projection && name ? ch.persona_projection[name] : null;
    if (Array.isArray(proj)) reply.pending.push(...proj);
    const text = ch.delta && typeof ch.delta.content === "string" ? ch.delta.content : "";
    if (text) {
      const span = { text, proj: mean(reply.pending), n: reply.pending.length };
      reply.pending = [];
      reply.spans.push(span);
      reply.text += text;
      appendSpan(P, reply, span);
    }
    const ro = ch.persona_readout && name ? ch.persona_readout[name] : null;
    if (ro && typeof ro === "object") reply.readout = ro;
    if (ch.finish_reason) reply.finish = ch.finish_reason;
  }
}

function finish(P, reply) {
  reply.done = true;
  const node = replyNode(P, reply);
  if (node) node.classList.remove("streaming");
  renderDrift();
  recolour();
}

function fail(P, reply, message) {
  reply.error = message;
  reply.done = true;
  renderTranscripts();
  renderApi();
}

function stop() {
  for (const c of S.controllers) c.abort();
}

// --- transcripts and colours ---------------------------------------------------------------------
function replyNode(P, reply) {
  const t = S.turns.findIndex(x => x[P] === reply);
  return t < 0 ? null : document.querySelector(`#transcript-${P} .assistant[data-turn="${t}"]`);
}

function spanElement(span, key) {
  const s = el("span", { class: "tok" }, span.text);
  if (span.proj !== null && key) {
    s.dataset.proj = String(span.proj);
    s.dataset.key = key;
    s.title = `${key}: ${span.proj.toFixed(3)} (mean of ${span.n} token${span.n === 1 ? "" : "s"})`;
  }
  return s;
}

function appendSpan(P, reply, span) {
  const node = replyNode(P, reply);
  if (!node) return;
  $(".text", node).append(spanElement(span, reply.key));
  scheduleRecolour();
  node.closest(".transcript").scrollTop = 1e9;
}

function renderTranscripts() {
  for (const P of PANES) {
    const box = $("#transcript-" + P);
    box.textContent = "";
    $("#pane-" + P).classList.toggle("off", !S.panes[P].enabled);
    S.turns.forEach((t, i) => {
      box.append(el("div", { class: "msg user" }, t.user));
      const r = t[P];
      if (!r) {
        box.append(el("div", { class: "msg assistant skipped", "data-turn": String(i) }, "(pane off for this turn)"));
        return;
      }
      const node = el("div", { class: "msg assistant" + (r.done ? "" : " streaming"), "data-turn": String(i) });
      const text = el("div", { class: "text" });
      for (const sp of r.spans) text.append(spanElement(sp, r.key));
      node.append(text);
      if (r.error) node.append(el("div", { class: "error" }, r.error));
      if (r.done && !r.error && !r.text) node.append(el("div", { class: "meta" }, "(empty reply)"));
      if (r.readout && typeof r.readout.mean_projection === "number") {
        node.append(el("div", { class: "meta" },
          `${r.key}: mean ${r.readout.mean_projection.toFixed(3)} over ${r.readout.tokens} tokens` +
          (r.finish ? ` · ${r.finish}` : "")));
      } else if (r.finish) {
        node.append(el("div", { class: "meta" }, r.finish));
      }
      box.append(node);
    });
    box.scrollTop = 1e9;
    $("#summary-" + P).textContent = summary(P);
  }
  recolour();
}

let recolourQueued = false;
function scheduleRecolour() {
  if (recolourQueued) return;
  recolourQueued = true;
  requestAnimationFrame(() => { recolourQueued = false; recolour(); });
}

function recolour() {
  const key = readoutKey();
  const spans = [...document.querySelectorAll(".transcript .tok[data-proj]")];
  const vals = spans.filter(s => s.dataset.key === key).map(s => Number(s.dataset.proj));
  const centre = vals.length ? vals.reduce((a, b) => a + b, 0) / vals.length : 0;
  // the scale: the 95th percentile of |projection - centre| (one outlier does not wash the rest out)
  const devs = vals.map(v => Math.abs(v - centre)).sort((a, b) => a - b);
  const scale = devs.length ? Math.max(1e-6, devs[Math.floor(0.95 * (devs.length - 1))]) : 1;
  for (const s of spans) {
    if (s.dataset.key !== key) { s.style.backgroundColor = ""; continue; }
    const t = Math.max(-1, Math.min(1, (Number(s.dataset.proj) - centre) / scale));
    s.style.backgroundColor = t >= 0 ? `rgba(214, 39, 40, ${(0.7 * t).toFixed(3)})`
                                     : `rgba(31, 119, 180, ${(-0.7 * t).toFixed(3)})`;
  }
  $("#legend-lo").textContent = vals.length ? (centre - scale).toFixed(2) : "–";
  $("#legend-hi").textContent = vals.length ? (centre + scale).toFixed(2) : "–";
  $("#legend").title = vals.length ? `centre ${centre.toFixed(3)}, ${vals.length} coloured chunks` : "";
  $("#legend-note").textContent = !key ? "choose a readout vector to colour tokens" : vals.length
    ? `${key}: each chunk coloured by its tokens' mean projection, centred on this conversation's mean ` +
      `(${centre.toFixed(2)}); colours saturate at the ends of the scale`
    : `${key}: no per-token projections yet (send a message)`;
}

// --- drift plot -----------------------------------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function renderDrift() {
  const box = $("#drift-plot");
  box.textContent = "";
  const key = readoutKey();
  const W = 560, H = 200, L = 52, R = 40, T = 24, B = 30;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", class: "drift",
                            "aria-label": "mean projection per assistant turn" });
  const series = {};
  for (const P of PANES) {
    series[P] = [];
    S.turns.forEach((t, i) => {
      const r = t[P];
      if (r && !r.error && r.key === key && r.readout && typeof r.readout.mean_projection === "number") {
        series[P].push([i + 1, r.readout.mean_projection]);
      }
    });
  }
  const all = [...series.A, ...series.B];
  if (!key || !all.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" },
                    key ? `${key}: no finished turns yet` : "choose a readout vector"));
    box.append(root);
    return;
  }
  const n = Math.max(2, S.turns.length);
  let lo = Math.min(...all.map(p => p[1])), hi = Math.max(...all.map(p => p[1]));
  if (hi - lo < 1e-6) { lo -= 0.5; hi += 0.5; }
  const pad = 0.08 * (hi - lo);
  lo -= pad; hi += pad;
  const x = i => L + (i - 1) / (n - 1) * (W - L - R);
  const y = v => T + (hi - v) / (hi - lo) * (H - T - B);
  root.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
              svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (const v of [lo + pad, (lo + hi) / 2, hi - pad]) {
    root.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, v.toFixed(2)),
                svg("line", { x1: L, y1: y(v), x2: W - R, y2: y(v), class: "grid" }));
  }
  const step = Math.max(1, Math.ceil(n / 12));
  for (let i = 1; i <= n; i += step) {
    root.append(svg("text", { x: x(i), y: H - B + 16, "text-anchor": "middle", class: "tick" }, String(i)));
  }
  root.append(svg("text", { x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle", class: "label" }, "assistant turn"));
  for (const P of PANES) {
    const pts = series[P];
    if (!pts.length) continue;
    const g = svg("g", { class: `series line-${P}`, "data-pane": P });
    g.append(svg("polyline", { points: pts.map(([i, v]) => `${x(i)},${y(v)}`).join(" "), class: `ln-${P}` }));
    for (const [i, v] of pts) {
      const c = svg("circle", { cx: x(i), cy: y(v), r: 4, class: `pt pt-${P}` });
      c.append(svg("title", {}, `${P}, turn ${i}: ${v.toFixed(3)}`));
      g.append(c);
    }
    const [li, lv] = pts[pts.length - 1];
    g.append(svg("text", { x: x(li) + 8, y: y(lv) + 4, class: `tag-${P}` }, P));
    root.append(g);
  }
  root.append(svg("text", { x: L, y: 12, class: "label" }, `readout ${key}`));
  box.append(root);
}

// --- API panel ------------------------------------------------------------------------------------
function py(v, indent = 0) {
  const pad = "    ".repeat(indent + 1), end = "    ".repeat(indent);
  if (v === null || v === undefined) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v === "number" || typeof v === "string") return JSON.stringify(v);
  if (Array.isArray(v)) {
    if (!v.length) return "[]";
    const flat = "[" + v.map(x => py(x, 0)).join(", ") + "]";
    if (flat.length < 72 && !flat.includes("\n")) return flat;
    return "[\n" + v.map(x => pad + py(x, indent + 1)).join(",\n") + ",\n" + end + "]";
  }
  const keys = Object.keys(v);
  if (!keys.length) return "{}";
  const flat = "{" + keys.map(k => JSON.stringify(k) + ": " + py(v[k], 0)).join(", ") + "}";
  if (flat.length < 88 && !flat.includes("\n")) return flat;
  return "{\n" + keys.map(k => pad + JSON.stringify(k) + ": " + py(v[k], indent + 1)).join(",\n") + ",\n" + end + "}";
}

function pythonSnippet(body) {
  const lines = ["import os", "", "from openai import OpenAI", "",
    `client = OpenAI(base_url=${JSON.stringify(API)},`,
    `                api_key=os.environ.get("JAXPERSONA_API_KEY", "none"))  # the server's --api-key, if any`,
    "stream = client.chat.completions.create("];
  for (const k of STANDARD) if (k in body) lines.push(`    ${k}=${py(body[k], 1)},`);
  const extra = {};
  for (const k of Object.keys(body)) if (!STANDARD.includes(k)) extra[k] = body[k];
  if (Object.keys(extra).length) lines.push(`    extra_body=${py(extra, 1)},`);
  lines.push(")");
  if (body.stream) {
    lines.push("for chunk in stream:", "    if chunk.choices and chunk.choices[0].delta.content:",
               "        print(chunk.choices[0].delta.content, end=\"\", flush=True)", "print()");
  } else {
    lines.push("print(stream.choices[0].message.content)");
  }
  return lines.join("\n");
}

function renderApi() {
  const P = $("#api-pane").value, which = $("#api-which").value;
  const body = which === "last" ? S.last[P] : requestBody(P, $("#message").value);
  const pre = $("#api-body"), code = $("#api-python");
  if (!body) {
    pre.textContent = `(pane ${P} has sent nothing yet)`;
    code.textContent = "";
    return;
  }
  pre.textContent = JSON.stringify(body, null, 2);
  code.textContent = pythonSnippet(body);
}

async function copyText(id, button) {
  const text = $("#" + id).textContent;
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      ok = true;
    }
  } catch (_) { /* fall back below */ }
  if (!ok) {
    const ta = el("textarea");
    ta.value = text;
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.append(ta);
    ta.select();
    try { ok = document.execCommand("copy"); } catch (_) { ok = false; }
    ta.remove();
  }
  const old = button.dataset.label || button.textContent;
  button.dataset.label = old;
  button.textContent = ok ? "copied" : "select and copy";
  setTimeout(() => { button.textContent = old; }, 1200);
}

// --- wiring -----------------------------------------------------------------------------------------
function renderAll() {
  renderTranscripts();
  renderDrift();
  renderApi();
  for (const P of PANES) {
    const box = $("#settings-" + P);
    const count = $(".count", box);
    if (count) {
      const n = interventions(P).length;
      count.textContent = `${n} intervention${n === 1 ? "" : "s"} (server max ${S.info.max_interventions}` +
                          `${S.panes[P].capOn ? "; a preset may count for several" : ""})`;
    }
    box.classList.toggle("off", !S.panes[P].enabled);
  }
}

function init() {
  $("#composer").addEventListener("submit", ev => { ev.preventDefault(); send($("#message").value); });
  $("#message").addEventListener("keydown", ev => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send($("#message").value);
    }
  });
  $("#message").addEventListener("input", renderApi);
  for (const id of ["#seed", "#temperature", "#max-tokens", "#system"]) $(id).addEventListener("input", renderApi);
  for (const id of ["#readout-vector", "#readout-layer"]) {
    $(id).addEventListener("change", () => { renderApi(); renderDrift(); recolour(); });
  }
  $("#api-pane").addEventListener("change", renderApi);
  $("#api-which").addEventListener("change", renderApi);
  $("#stop").addEventListener("click", stop);
  $("#clear").addEventListener("click", () => {
    if (S.busy) return;
    S.turns = [];
    renderAll();
  });
  $("#reconnect").addEventListener("click", connect);
  $("#api-key").addEventListener("keydown", ev => { if (ev.key === "Enter") connect(); });
  for (const b of document.querySelectorAll("button.copy")) {
    b.addEventListener("click", () => copyText(b.dataset.copy, b));
  }
  for (const P of PANES) renderPaneSettings(P);
  renderAll();
  connect();
}

init();
