// The attention explorer: streams a generation from /v2/models/{model}/generate_stream (Server-Sent Events over a
// POST, read with fetch) and fills the heatmap one row per token and the alignment view link by link; the Embeddings
// view calls the encode endpoint.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], steps: [], sourceTokens: [], controller: null, encoder: 0, decoder: 0, heads: 0,
                align: null, alignView: null };

// ------------------------------------------------------------------ colours (viridis, 0 -> 1)
const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function colour(v) {
  const x = Math.max(0, Math.min(1, v)) * (STOPS.length - 1);
  const i = Math.min(Math.floor(x), STOPS.length - 2), f = x - i;
  const c = STOPS[i].map((a, k) => Math.round(a + (STOPS[i + 1][k] - a) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

async function errorOf(resp) {
  try { return (await resp.json()).error || resp.statusText; } catch { return resp.statusText; }
}

function setStatus(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle("error", isError);
}

// ------------------------------------------------------------------ models
async function loadModels() {
  const resp = await fetch("/v2/repository/index", { method: "POST", headers: headers(), body: "{}" });
  if (!resp.ok) { setStatus($("status"), `cannot list models: ${await errorOf(resp)}`, true); return; }
  state.models = await resp.json();
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => new Option(`${m.name} (v${m.version})`, m.name)));
  describeModel();
}

function describeModel() {
  const m = state.models.find((x) => x.name === $("model").value);
  if (!m) return;
  state.encoder = m.layers.encoder; state.decoder = m.layers.decoder; state.heads = m.heads;
  $("model-info").textContent = `${m.layers.encoder}+${m.layers.decoder} layers, ${m.heads} heads` +
    (m.task ? `, task ${m.task}` : "") + (m.state === "READY" ? "" : ` (${m.state})`);
  fillSelect($("layer"), m.layers.decoder, (i) => `layer ${i}`);
  fillSelect($("head"), m.heads, (i) => `head ${i}`, [["mean", "mean of heads"]]);
}

function fillSelect(select, n, label, extra = []) {
  const keep = select.value;
  const options = extra.map(([v, t]) => new Option(t, v));
  for (let i = 0; i < n; i++) options.push(new Option(label(i), String(i)));
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
}

// ------------------------------------------------------------------ generate, streamed
async function generate(event) {
  event.preventDefault();
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  state.steps = []; state.sourceTokens = [];
  $("output").replaceChildren();
  $("output").dataset.done = "false";
  renderHeatmap();
  const wantAlignment = $("want-alignment").checked;
  // offsets are code points: the texts are kept as arrays of them
  state.align = { on: wantAlignment, source: Array.from($("source").value), output: [], links: [], words: null };
  $("align-words").disabled = true;
  renderAlignment();
  $("run").disabled = true; $("stop").disabled = false;
  const wantSelf = $("want-self").checked;
  const kinds = [["cross", "cross (output → source)"]].concat(wantSelf ? [["decoder_self", "decoder self"]] : []);
  const kindSelect = $("kind"), keepKind = kindSelect.value;
  kindSelect.replaceChildren(...kinds.map(([v, t]) => new Option(t, v)));
  if (kinds.some(([v]) => v === keepKind)) kindSelect.value = keepKind;
  setStatus($("status"), "generating…");
  const body = { text_input: $("source").value,
                 parameters: { max_tokens: Number($("max-tokens").value) || 32, attention: wantSelf ? "all" : "cross" } };
  if (wantAlignment) body.parameters.alignment = true;
  try {
    const resp = await fetch(`/v2/models/${encodeURIComponent($("model").value)}/generate_stream`,
                             { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!resp.ok) { setStatus($("status"), `error ${resp.status}: ${await errorOf(resp)}`, true); return; }
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        handleEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
      }
    }
  } catch (err) {
    if (err.name === "AbortError") setStatus($("status"), `stopped after ${state.steps.length} tokens`);
    else setStatus($("status"), `error: ${err.message}`, true);
  } finally {
    if (state.controller === controller) state.controller = null;
    $("run").disabled = false; $("stop").disabled = true;
  }
}

function handleEvent(chunk) {
  let type = "message", data = "";
  for (const line of chunk.split("\n")) {
    if (line.startsWith("event:")) type = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (!data) return;
  const msg = JSON.parse(data);
  if (type === "error") { setStatus($("status"), `error (${msg.code}): ${msg.error}`, true); return; }
  if (msg.source_tokens && !state.sourceTokens.length) state.sourceTokens = msg.source_tokens;
  if (msg.finish_reason) {
    setStatus($("status"), `${msg.generated_tokens} tokens, ended by ${msg.finish_reason}; first token after ` +
      `${msg.time_to_first_token_ms.toFixed(1)} ms, all after ${msg.total_ms.toFixed(1)} ms (model ` +
      `${msg.model_name} v${msg.model_version})`);
    if (state.align) {  // the final list is authoritative: it replaces what streamed
      if (typeof msg.final_text === "string") state.align.output = Array.from(msg.final_text);
      if (msg.alignment) state.align.links = msg.alignment;
      state.align.words = msg.word_alignment || null;
      $("align-words").disabled = !state.align.words;
      renderAlignment();
    }
    $("output").dataset.done = "true";
    return;
  }
  const step = { id: msg.token_id, text: msg.text_output, attention: {} };
  for (const a of msg.attention || []) {
    (step.attention[a.kind] ||= {})[a.layer] = { heads: a.heads, keys: a.shape[2], weights: a.weights };
  }
  state.steps.push(step);
  const span = document.createElement("span");
  span.className = "tok"; span.textContent = msg.text_output || "∅"; span.dataset.index = String(state.steps.length - 1);
  $("output").append(span);
  $("output").dataset.done = "false";
  if (state.align) {
    state.align.output.push(...Array.from(msg.text_output || ""));
    if (msg.alignment && msg.alignment.length) state.align.links.push(...msg.alignment);
    renderAlignment();
  }
  if (selection().kind === "cross") appendRow(state.steps.length - 1);
  else renderHeatmap();  // decoder self-attention: each new token is also a new column
}

// ------------------------------------------------------------------ the heatmap
function selection() { return { kind: $("kind").value, layer: Number($("layer").value), head: $("head").value }; }

function rowWeights(step, sel) {
  const layer = step.attention[sel.kind] && step.attention[sel.kind][sel.layer];
  if (!layer) return [];
  const h = layer.heads.length, k = layer.keys, w = layer.weights;
  const out = new Array(k).fill(0);
  if (sel.head === "mean") {
    for (let i = 0; i < h; i++) for (let j = 0; j < k; j++) out[j] += w[i * k + j] / h;
  } else {
    const i = layer.heads.indexOf(Number(sel.head));
    if (i < 0) return [];
    for (let j = 0; j < k; j++) out[j] = w[i * k + j];
  }
  return out;
}

function columnLabels(sel) {
  if (sel.kind === "cross") return state.sourceTokens;
  return ["<start>"].concat(state.steps.map((s) => s.text || "∅"));  // decoder self: previous outputs as keys
}

function renderHeatmap() {
  const table = $("heatmap"), sel = selection();
  const cols = columnLabels(sel);
  const head = document.createElement("thead"), tr = document.createElement("tr");
  tr.append(document.createElement("th"));
  cols.forEach((c) => { const th = document.createElement("th"); th.scope = "col"; th.textContent = c; tr.append(th); });
  head.append(tr);
  const caption = document.createElement("caption");
  caption.textContent = `${sel.kind === "cross" ? "Cross" : "Decoder self"}-attention, layer ${sel.layer}, ` +
    (sel.head === "mean" ? "mean of heads" : `head ${sel.head}`);
  table.replaceChildren(caption, head, document.createElement("tbody"));
  state.steps.forEach((_, i) => appendRow(i));
}

function appendRow(i) {
  const table = $("heatmap"), sel = selection(), step = state.steps[i];
  if (!table.tHead || (sel.kind === "cross" && table.tHead.rows[0].cells.length - 1 !== state.sourceTokens.length)) {
    renderHeatmap(); return;
  }
  const cols = columnLabels(sel), weights = rowWeights(step, sel);
  const tr = document.createElement("tr");
  const th = document.createElement("th"); th.scope = "row"; th.textContent = step.text || "∅"; tr.append(th);
  for (let j = 0; j < weights.length; j++) {
    const td = document.createElement("td");
    td.style.background = colour(weights[j]);
    td.tabIndex = i === 0 && j === 0 ? 0 : -1;
    td.dataset.row = String(i); td.dataset.col = String(j);
    td.setAttribute("aria-label", `${step.text || "∅"} → ${cols[j] ?? "?"}: ${weights[j].toFixed(3)}`);
    tr.append(td);
  }
  table.tBodies[0].append(tr);
}

// tooltip on hover and on keyboard focus; arrow keys move between cells (one cell in the tab order)
function showTip(td) {
  const tip = $("tooltip");
  tip.textContent = td.getAttribute("aria-label");
  const r = td.getBoundingClientRect();
  tip.style.left = `${r.right + 6}px`; tip.style.top = `${r.top - 4}px`;
  tip.hidden = false;
  document.querySelectorAll(".output .tok").forEach((s) => s.classList.toggle("active", s.dataset.index === td.dataset.row));
}
function hideTip() { $("tooltip").hidden = true; }

function moveFocus(event) {
  const td = event.target.closest("td");
  if (!td) return;
  const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
  if (!moves[event.key]) return;
  event.preventDefault();
  const [dr, dc] = moves[event.key];
  const next = $("heatmap").querySelector(`td[data-row="${Number(td.dataset.row) + dr}"][data-col="${Number(td.dataset.col) + dc}"]`);
  if (next) { td.tabIndex = -1; next.tabIndex = 0; next.focus(); }
}

// ------------------------------------------------------------------ embeddings view
function cosine(a, b) {
  let ab = 0, aa = 0, bb = 0;
  for (let i = 0; i < a.length; i++) { ab += a[i] * b[i]; aa += a[i] * a[i]; bb += b[i] * b[i]; }
  return ab / Math.sqrt(aa * bb || 1);
}

async function encodeOne(text) {
  const resp = await fetch(`/attnserve/v1/models/${encodeURIComponent($("model").value)}/encode`,
                           { method: "POST", headers: headers(), body: JSON.stringify({ text_input: text }) });
  if (!resp.ok) throw new Error(`error ${resp.status}: ${await errorOf(resp)}`);
  return resp.json();
}

function numberTable(table, captionText, columns, rows) {
  const caption = document.createElement("caption"); caption.textContent = captionText;
  const head = document.createElement("thead"), tr = document.createElement("tr");
  tr.append(document.createElement("th"));
  columns.forEach((c) => { const th = document.createElement("th"); th.scope = "col"; th.textContent = c; tr.append(th); });
  head.append(tr);
  const body = document.createElement("tbody");
  for (const [label, values] of rows) {
    const row = document.createElement("tr");
    const th = document.createElement("th"); th.scope = "row"; th.textContent = label; row.append(th);
    for (const v of values) {
      const td = document.createElement("td");
      td.textContent = v.toFixed(3);
      td.style.background = colour(v); td.style.color = v > 0.6 ? "#000" : "#fff";
      row.append(td);
    }
    body.append(row);
  }
  table.replaceChildren(caption, head, body);
}

async function encode(event) {
  event.preventDefault();
  setStatus($("encode-status"), "encoding…");
  try {
    const [a, b] = await Promise.all([encodeOne($("sentence-a").value), encodeOne($("sentence-b").value)]);
    const layers = a.hidden_states.map((_, l) => `layer ${l}`);
    numberTable($("drift-a"), "cos(static embedding, vector after each encoder layer)", layers,
      a.tokens.map((tok, i) => [tok, a.hidden_states.map((h) => cosine(a.embeddings[i], h[i]))]));
    const shared = [];
    a.tokens.forEach((tok, i) => {
      const j = b.tokens.indexOf(tok);
      if (j >= 0 && !shared.some(([t]) => t === tok)) {
        shared.push([tok, [cosine(a.embeddings[i], b.embeddings[j]),
                           ...a.hidden_states.map((h, l) => cosine(h[i], b.hidden_states[l][j]))]]);
      }
    });
    numberTable($("shared"), "cos(token in A, the same token in B): equal as embeddings, apart after attention",
                ["embedding", ...layers], shared);
    setStatus($("encode-status"), `${a.tokens.length} and ${b.tokens.length} tokens, ${shared.length} shared`);
  } catch (err) {
    setStatus($("encode-status"), err.message, true);
  }
}

// ------------------------------------------------------------------ tabs and wiring
function selectTab(tab) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on)); t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  if (!$("view-generate").hidden) drawAlignmentLines();  // the lines need the spans laid out
  tab.focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate-form").addEventListener("submit", generate);
  $("source").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("run").click(); } });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("encode-form").addEventListener("submit", encode);
  $("model").addEventListener("change", () => { describeModel(); renderHeatmap(); });
  for (const id of ["kind", "layer", "head"]) $(id).addEventListener("change", renderHeatmap);
  $("align-words").addEventListener("change", () => state.align && renderAlignment());
  window.addEventListener("resize", drawAlignmentLines);
  $("token").value = sessionStorage.getItem("attnserve-token") || "";
  $("token").addEventListener("change", () => { sessionStorage.setItem("attnserve-token", $("token").value); loadModels(); });
  const heatmap = $("heatmap");
  heatmap.addEventListener("mouseover", (e) => { const td = e.target.closest("td"); if (td) showTip(td); });
  heatmap.addEventListener("mouseleave", hideTip);
  heatmap.addEventListener("focusin", (e) => { const td = e.target.closest("td"); if (td) showTip(td); });
  heatmap.addEventListener("focusout", hideTip);
  heatmap.addEventListener("keydown", moveFocus);
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((t, i) => {
    t.addEventListener("click", () => selectTab(t));
    t.addEventListener("keydown", (e) => {
      if (e.key === "ArrowRight" || e.key === "ArrowLeft") selectTab(tabs[(i + (e.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length]);
    });
  });
  loadModels();
});
