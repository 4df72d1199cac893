"""The attribution-graph viewer: one self-contained, offline HTML page per graph (both wings).

The page draws the pruned graph as SVG with no library and no network: rows are layers (inputs at the bottom,
logits at the top), columns are positions (a prompt's tokens; a CNN's receptive-field centre columns), edges are
blue (positive) or red (negative) with their width by weight; the row labels stay at the frame's left edge when it
scrolls (it opens scrolled to the logits), and each logit's box carries its token. Hovering a node lights its edges
and names it with its own influence (``influence_raw``) and its cumulative share (``influence``, lower is more
influential); hovering an edge shows its weight. Clicking a node opens its card: its numbers, its strongest inputs
and outputs, and its dashboard (top text contexts or top image patches) when the graph carries one. Nodes can be
pinned and pinned nodes grouped into labelled supernodes; the annotated graph downloads as mechscope's graph JSON (which
``AttributionGraph.load`` and the CLI's ``--view`` read back) or as circuit-tracer's graph JSON, and a saved JSON's
annotations load back into the page.

Scripts find their elements with ``document.getElementById("…")`` only (notebook fragments rename ids), expose
``window.mechscopeGraph`` (``pin``, ``group``, ``select``, ``state``, ``download``) for tests, and keep the state in
``<pre id="agv-state">``.
"""

from __future__ import annotations

import html as H

from mechscope.core.render.html import counted, script_json

STYLE = """
body { font-family: system-ui, sans-serif; color: #222; margin: 1em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.2em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
td, th { border: 1px solid #ddd; padding: .2em .5em; text-align: right; } th { background: #f4f4f4; }
td.l, th.l { text-align: left; }
.agv-bar { display: flex; flex-wrap: wrap; gap: .6em; align-items: center; margin: .4em 0; font-size: .9em; }
.agv-bar button, .agv-pins button { font-size: .85em; }
.agv-main { display: flex; gap: 1em; align-items: flex-start; }
.agv-canvas { overflow: auto; max-width: 72vw; max-height: 80vh; border: 1px solid #eee; }
.agv-side { flex: 1; min-width: 280px; max-width: 460px; font-size: .85em; }
.agv-side .card { border: 1px solid #ddd; padding: .5em; margin-bottom: .5em; border-radius: 4px; }
.agv-side .muted, .muted { color: #777; }
.agv-node { cursor: pointer; }
.agv-node.pinned > :first-child { stroke: #000; stroke-width: 2.5px; }
.agv-edge { fill: none; }
.agv-svg.hovering .agv-edge { opacity: .05; }
.agv-svg.hovering .agv-edge.lit { opacity: .95; }
.agv-svg.hovering .agv-node { opacity: .35; }
.agv-svg.hovering .agv-node.lit { opacity: 1; }
.agv-tok { white-space: pre; padding: 0 1px; }
.agv-pins { font-size: .85em; margin-top: .5em; }
.agv-pins li { list-style: none; }
.agv-sn { display: inline-block; padding: 0 .4em; border-radius: 3px; color: #fff; margin-right: .3em; }
.agv-err { color: #b00; }
"""  # noqa: E501

SCRIPT = r"""
(function () {
const DATA = __DATA__;
const CT = __CT__;
const svg = document.getElementById("agv-svg");
const side = document.getElementById("agv-side");
const pinsEl = document.getElementById("agv-pins");
const stateEl = document.getElementById("agv-state");
const msgEl = document.getElementById("agv-msg");
const labelIn = document.getElementById("agv-label");
const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#7b3294", "#008837", "#e66101", "#0571b0", "#ca0020", "#5e3c99", "#1b7837", "#b35806"];
let pinned = (DATA.pinned || []).slice();
let supernodes = (DATA.supernodes || []).map(s => ({label: s.label, members: s.members.slice()}));
let selected = null;
const nodes = DATA.nodes, edges = DATA.edges;
const byId = {}; nodes.forEach((n, i) => { byId[n.id] = i; });
const ins = nodes.map(() => []), outs = nodes.map(() => []);
edges.forEach((e, k) => { outs[e[0]].push(k); ins[e[1]].push(k); });
const esc = (s) => String(s == null ? "" : s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
// a node's own influence on the logits and, labelled, the share of the total held by nodes at least as influential
const influenceText = (n) => n.kind === "logit" ? `probability ${fmt(n.probability)}` : (n.influence_raw != null ? `influence ${fmt(n.influence_raw)}, ` : "") + `cumulative influence share ${fmt(n.influence)} (lower: more influential)`;
const fmt = (x) => (x == null ? "—" : (Math.abs(x) >= 100 ? x.toFixed(0) : Math.abs(x) >= 1 ? x.toFixed(2) : x.toPrecision(3)));

// ---- layout: rows by layer, columns by position ----
const L = DATA.layer_names.length;
const rowOf = (n) => n.kind === "input" ? 0 : n.kind === "logit" ? L + 1 : n.layer + 1;
const ctxs = [...new Set(nodes.map(n => n.ctx))].sort((a, b) => a - b);
const colOf = {}; ctxs.forEach((c, i) => { colOf[c] = i; });
const cells = {};
nodes.forEach((n, i) => { const key = rowOf(n) + ":" + n.ctx; (cells[key] = cells[key] || []).push(i); });
const perCol = Math.max(1, ...ctxs.map(c => Math.max(...Object.keys(cells).filter(k => k.endsWith(":" + c)).map(k => cells[k].length))));
const colW = Math.max(56, Math.min(160, 14 * perCol + 16)), rowH = L > 16 ? 26 : 44;
const left = 70, topM = 64, W = left + colW * ctxs.length + 20, Hh = topM + rowH * (L + 2) + 60;
const pos = nodes.map(() => [0, 0]);
Object.entries(cells).forEach(([key, list]) => {
  const [r, c] = key.split(":");
  list.sort((a, b) => nodes[a].influence - nodes[b].influence);
  const x0 = left + colOf[c] * colW + colW / 2, step = Math.min(14, (colW - 10) / Math.max(1, list.length));
  list.forEach((i, k) => { pos[i] = [x0 + (k - (list.length - 1) / 2) * step, topM + (L + 1 - Number(r)) * rowH + rowH / 2]; });
});
svg.setAttribute("width", W); svg.setAttribute("height", Hh);
function el(tag, attrs, parent) { const e = document.createElementNS(NS, tag); for (const k in attrs) e.setAttribute(k, attrs[k]); (parent || svg).appendChild(e); return e; }
const rowNames = ["inputs", ...DATA.layer_names.map(String), "logits"];
const rowY = (r) => topM + (L + 1 - r) * rowH + rowH / 2;
rowNames.forEach((name, r) => el("line", {x1: left - 5, x2: W, y1: rowY(r), y2: rowY(r), stroke: "#f0f0f0"}));
ctxs.forEach((c) => {
  const any = nodes.find(n => n.ctx === c && (n.kind === "input" || n.kind === "feature" || n.kind === "error"));
  const lab = any ? (any.kind === "input" && DATA.kind === "lm" ? any.label : (DATA.kind === "lm" ? any.ctx_label : Number(c).toFixed(1) + " px")) : (nodes.some(n => n.ctx === c && n.kind === "logit") ? "logits" : String(c));
  const t = el("text", {x: left + colOf[c] * colW + colW / 2, y: Hh - 30, "font-size": 11, "text-anchor": "middle", fill: "#444"});
  t.textContent = (lab || "").slice(0, 14);
});
const gE = el("g", {}), gN = el("g", {});
const maxW = Math.max(1e-12, ...edges.map(e => Math.abs(e[2])));
const edgeEls = edges.map((e, k) => {
  const [x1, y1] = pos[e[0]], [x2, y2] = pos[e[1]];
  const p = el("path", {d: `M${x1},${y1} C${x1},${(y1 + y2) / 2} ${x2},${(y1 + y2) / 2} ${x2},${y2}`, class: "agv-edge",
    stroke: e[2] >= 0 ? "#2166ac" : "#b2182b", "stroke-width": 0.4 + 3.6 * Math.abs(e[2]) / maxW,
    opacity: 0.15 + 0.6 * Math.abs(e[2]) / maxW, "data-k": k}, gE);
  el("title", {}, p).textContent = `${nodes[e[0]].id} → ${nodes[e[1]].id}: weight ${fmt(e[2])}`;
  return p;
});
const nodeEls = nodes.map((n, i) => {
  const g = el("g", {class: "agv-node", "data-id": n.id, transform: `translate(${pos[i][0]},${pos[i][1]})`}, gN);
  const shade = Math.round(220 * Math.min(1, Math.max(0, n.influence)));
  if (n.kind === "feature") el("circle", {r: 5.5, fill: `rgb(${shade},${shade},255)`, stroke: "#335"}, g);
  else if (n.kind === "error") el("rect", {x: -5, y: -5, width: 10, height: 10, fill: "#ccc", stroke: "#666"}, g);
  else if (n.kind === "input") el("rect", {x: -5, y: -4, width: 10, height: 8, rx: 2, fill: "#ffe9a8", stroke: "#a80"}, g);
  else el("rect", {x: -7, y: -6, width: 14, height: 12, fill: "#b8e0b8", stroke: "#383"}, g);
  el("title", {}, g).textContent = `${n.label || n.id} [${n.id}] ${influenceText(n)}` + (n.activation != null ? `, activation ${fmt(n.activation)}` : "");
  if (n.kind === "logit") {  // the logit's token above its box, slanted so that neighbours do not overlap
    const lab = JSON.stringify(String(n.label == null ? n.id : n.label)), [x, y] = pos[i];
    el("text", {x: x - 2, y: y - 9, "font-size": 11, fill: "#252", transform: `rotate(-60 ${x - 2} ${y - 9})`, class: "agv-logit-label"}, gN).textContent = lab.length > 10 ? lab.slice(0, 9) + "…" : lab;
  }
  g.addEventListener("mouseenter", () => light(i));
  g.addEventListener("mouseleave", () => light(null));
  g.addEventListener("click", () => select(n.id));
  return g;
});
// the row labels stay at the frame's left edge however far it scrolls (drawn last: over the nodes)
const gRows = el("g", {class: "agv-rowlabels", "pointer-events": "none"});
rowNames.forEach((name, r) => {
  el("rect", {x: 0, y: rowY(r) - 8, width: left - 8, height: 16, fill: "#fff", opacity: 0.85}, gRows);
  el("text", {x: 4, y: rowY(r) + 4, "font-size": 11, fill: "#666"}, gRows).textContent = name;
});
const box = svg.parentElement, stick = () => gRows.setAttribute("transform", `translate(${box.scrollLeft},0)`);
box.addEventListener("scroll", stick);
// open on the output: a graph wider than its frame scrolls so that the attributed logits are in view
(() => {
  const xs = nodes.map((n, i) => n.kind === "logit" ? pos[i][0] : null).filter(x => x !== null);
  if (xs.length && W > box.clientWidth) box.scrollLeft = Math.max(0, (Math.min(...xs) + Math.max(...xs)) / 2 - box.clientWidth / 2);
  stick();
})();
function light(i) {
  svg.classList.toggle("hovering", i !== null);
  edgeEls.forEach(p => p.classList.remove("lit")); nodeEls.forEach(g => g.classList.remove("lit"));
  if (i === null) return;
  nodeEls[i].classList.add("lit");
  [...ins[i], ...outs[i]].forEach(k => { edgeEls[k].classList.add("lit"); nodeEls[edges[k][0]].classList.add("lit"); nodeEls[edges[k][1]].classList.add("lit"); });
}

// ---- the card of a node ----
function dashboard(n) {
  const d = (DATA.dashboards || {})[n.layer + "_" + n.feature];
  if (!d || n.kind !== "feature") return "";
  const list = Array.isArray(d) ? d : (d.examples || []);
  let h = `<div class="card"><b>Top examples</b>` + (d.note ? `<div class="muted">${esc(d.note)}</div>` : "");
  list.forEach((ex, j) => {
    if (ex.tokens) {
      const m = Math.max(1e-9, ...ex.acts);
      h += "<div>" + ex.tokens.map((t, k) => `<span class="agv-tok" title="${fmt(ex.acts[k])}" style="background:rgba(255,140,0,${(Math.max(0, ex.acts[k]) / m).toFixed(2)})">${esc(t)}</span>`).join("") + ` <span class="muted">${fmt(ex.max)}</span></div>`;
    } else if (ex.pixels) {
      h += `<canvas class="agv-crop" data-j="${j}" width="${4 * (ex.pixels[0] || []).length}" height="${4 * ex.pixels.length}" title="image ${ex.image}, activation ${fmt(ex.activation)}" style="margin:2px;border:1px solid #ccc"></canvas>`;
    }
  });
  return h + "</div>";
}
function drawCrops(n) {
  const d = (DATA.dashboards || {})[n.layer + "_" + n.feature];
  if (!d) return;
  const list = Array.isArray(d) ? d : (d.examples || []);
  side.querySelectorAll("canvas.agv-crop").forEach(cv => {
    const ex = list[Number(cv.dataset.j)], ctx = cv.getContext("2d");
    ex.pixels.forEach((row, y) => row.forEach((v, x) => { ctx.fillStyle = `rgb(${v},${v},${v})`; ctx.fillRect(4 * x, 4 * y, 4, 4); }));
  });
}
function select(id) {
  if (!(id in byId)) throw new Error("no node " + id);
  selected = id;
  const i = byId[id], n = nodes[i];
  const list = (ks, end) => ks.slice().sort((a, b) => Math.abs(edges[b][2]) - Math.abs(edges[a][2])).slice(0, 8)
    .map(k => `<tr><td class="l">${esc(nodes[edges[k][end]].label || nodes[edges[k][end]].id)}</td><td>${fmt(edges[k][2])}</td></tr>`).join("");
  const isPinned = pinned.includes(id);
  side.innerHTML = `<div class="card"><b>${esc(n.label || n.id)}</b><div class="muted">${esc(n.id)} · ${n.kind} · layer ${esc(n.kind === "input" ? "inputs" : n.kind === "logit" ? "logits" : DATA.layer_names[n.layer])} · position ${esc(n.ctx_label || n.pos)}</div>
    <table><tr><th class="l">activation</th><td>${fmt(n.activation)}</td></tr>${n.kind === "logit" ? "" : (n.influence_raw != null ? `<tr><th class="l">influence</th><td>${fmt(n.influence_raw)}</td></tr>` : "") + `<tr><th class="l">cumulative influence share (lower: more influential)</th><td>${fmt(n.influence)}</td></tr>`}
    ${n.probability != null ? `<tr><th class="l">probability</th><td>${fmt(n.probability)}</td></tr>` : ""}</table>
    <button id="agv-pinbtn">${isPinned ? "Unpin" : "Pin"}</button></div>
    <div class="card"><b>Strongest inputs</b><table>${list(ins[i], 0) || "<tr><td class='l muted'>none kept</td></tr>"}</table>
    <b>Strongest outputs</b><table>${list(outs[i], 1) || "<tr><td class='l muted'>none kept</td></tr>"}</table></div>` + dashboard(n);
  document.getElementById("agv-pinbtn").addEventListener("click", () => { pin(id, !pinned.includes(id)); select(id); });
  drawCrops(n);
  sync();
}

// ---- pins and supernodes ----
function pin(id, on = true) {
  if (!(id in byId)) throw new Error("no node " + id);
  if (on && !pinned.includes(id)) pinned.push(id);
  if (!on) pinned = pinned.filter(p => p !== id);
  sync();
}
function group(label, members) {
  members = (members || [...pinsEl.querySelectorAll("input.agv-check:checked")].map(c => c.value)).filter(m => m in byId);
  label = (label == null ? labelIn.value : label).trim();
  if (!label || members.length === 0) { msgEl.textContent = "choose pinned nodes and give the supernode a label"; return null; }
  supernodes = supernodes.map(s => ({label: s.label, members: s.members.filter(m => !members.includes(m))})).filter(s => s.members.length);
  supernodes.push({label, members});
  members.forEach(m => { if (!pinned.includes(m)) pinned.push(m); });
  labelIn.value = ""; msgEl.textContent = "";
  sync();
  return supernodes[supernodes.length - 1];
}
function ungroup(k) { supernodes.splice(k, 1); sync(); }
function sync() {
  nodeEls.forEach((g, i) => {
    g.classList.toggle("pinned", pinned.includes(nodes[i].id));
    const old = g.querySelector(".agv-ring"); if (old) old.remove();
  });
  supernodes.forEach((s, k) => s.members.forEach(m => {
    const g = nodeEls[byId[m]]; if (!g) return;
    el("circle", {r: 9, fill: "none", stroke: COLORS[k % COLORS.length], "stroke-width": 2.5, class: "agv-ring"}, g);
  }));
  const inGroup = new Set(supernodes.flatMap(s => s.members));
  pinsEl.innerHTML = `<b>Pinned</b> (${pinned.length})<ul>` + pinned.map(id => `<li><label><input type="checkbox" class="agv-check" value="${esc(id)}"> ${esc(nodes[byId[id]].label || id)} <span class="muted">${esc(id)}</span>${inGroup.has(id) ? " ·" : ""}</label></li>`).join("") + "</ul>"
    + `<b>Supernodes</b> (${supernodes.length})<ul>` + supernodes.map((s, k) => `<li><span class="agv-sn" style="background:${COLORS[k % COLORS.length]}">${esc(s.label)}</span>${s.members.map(esc).join(", ")} <button data-k="${k}" class="agv-ungroup">ungroup</button></li>`).join("") + "</ul>";
  pinsEl.querySelectorAll("button.agv-ungroup").forEach(b => b.addEventListener("click", () => ungroup(Number(b.dataset.k))));
  stateEl.textContent = JSON.stringify(state());
}
function state() { return {pinned: pinned.slice(), supernodes: supernodes.map(s => ({label: s.label, members: s.members.slice()})), selected}; }
function annotated() { return Object.assign({}, DATA, {pinned: pinned.slice(), supernodes: state().supernodes}); }
function circuitTracer() {
  return Object.assign({}, CT, {qParams: Object.assign({}, CT.qParams, {pinnedIds: pinned.slice(), supernodes: supernodes.map(s => [s.label, ...s.members]), clickedId: selected || ""})});
}
function download(which) {
  const obj = which === "circuit-tracer" ? circuitTracer() : annotated();
  const blob = new Blob([JSON.stringify(obj, null, 1)], {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = which === "circuit-tracer" ? "graph-circuit-tracer.json" : "graph.json";
  document.body.appendChild(a); a.click(); a.remove();
  return obj;
}
function load(obj) {
  let p, s;
  if (obj && obj.qParams) { p = obj.qParams.pinnedIds || []; s = (obj.qParams.supernodes || []).map(x => ({label: x[0], members: x.slice(1)})); }
  else if (obj && Array.isArray(obj.nodes)) { p = obj.pinned || []; s = obj.supernodes || []; }
  else throw new Error("not a graph JSON (mechscope's or circuit-tracer's)");
  const bad = [...p, ...s.flatMap(x => x.members || [])].filter(id => !(id in byId));
  if (bad.length) throw new Error("names nodes this graph does not have: " + bad.slice(0, 3).join(", "));
  pinned = p.slice(); supernodes = s.map(x => ({label: String(x.label), members: x.members.slice()}));
  sync();
}
document.getElementById("agv-save").addEventListener("click", () => download("mechscope"));
document.getElementById("agv-save-ct").addEventListener("click", () => download("circuit-tracer"));
document.getElementById("agv-group").addEventListener("click", () => group());
document.getElementById("agv-file").addEventListener("change", (ev) => {
  const f = ev.target.files[0]; if (!f) return;
  f.text().then(t => { try { load(JSON.parse(t)); msgEl.textContent = "annotations loaded"; } catch (e) { msgEl.textContent = "not loaded: " + e.message; } });
});
window.mechscopeGraph = {pin, group, ungroup, select, state, annotated, circuitTracer, download, load, light, nodes, edges};
sync();
})();
"""  # noqa: E501


AXES = {  # what the drawing's rows and columns are, under it
    "lm": "Rows: layers (token embeddings at the bottom, logits at the top); columns: token positions. Nodes in a "
    "cell are ordered by influence, the most influential on the left; hover a node for its influence, click it for "
    "its card.",
    "cnn": "Rows: stages (pixels at the bottom, the logit at the top); columns: the x of each node's receptive-field "
    "centre, in pixels of the input image (px). Nodes in a cell are ordered by influence, the most influential on the "
    "left; hover a node for its influence, click it for its card.",
}


def graph_page(data: dict, circuit_tracer: dict, title: str, summary_html: str = "", sections_html: str = "") -> str:
    """The whole viewer page for a graph record ``data`` (mechscope's graph JSON) and its circuit-tracer export.
    ``summary_html`` goes above the drawing, ``sections_html`` (``<h2>`` sections: scores, checks...) below it."""

    script = SCRIPT.replace("__DATA__", script_json(data, allow_nan=False)).replace(
        "__CT__", script_json(circuit_tracer, allow_nan=False)
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{H.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{H.escape(title)}</h1>
{summary_html}
<div id="agv">
<div class="agv-bar">
<button id="agv-save" title="mechscope's graph JSON with your pins and supernodes">Download graph JSON</button>
<button id="agv-save-ct" title="circuit-tracer's graph JSON">Download circuit-tracer JSON</button>
<label>Load annotations <input type="file" id="agv-file" accept=".json,application/json"></label>
<span class="muted">hover: edges and weights · click: the node's card · pin, tick, label, group</span>
</div>
<div class="agv-main">
<div class="agv-canvas"><svg id="agv-svg" class="agv-svg" xmlns="http://www.w3.org/2000/svg"></svg></div>
<div class="agv-side"><div id="agv-side"><div class="card muted">Click a node.</div></div>
<div class="agv-pins"><div id="agv-pins"></div>
<input id="agv-label" placeholder="supernode label"> <button id="agv-group">Group ticked nodes</button>
<div id="agv-msg" class="agv-err"></div></div></div>
</div>
<p class="muted">{AXES.get(data.get("kind"), "")}</p>
<pre id="agv-state" hidden></pre>
</div>
{sections_html}
<script>{script}</script>
</body></html>
"""


# ---- the sections around the drawing (both wings) -------------------------------------------------------


def number_text(x, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if x != x:
            return "—"
        return f"{x:.{digits}g}"
    return H.escape(str(x))


def table_html(cols: list[str], rows: list[list], left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{H.escape(c)}</th>' for i, c in enumerate(cols))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{number_text(v)}</td>' for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def summary_html(d: dict, lead: str = "") -> str:
    """Scores, sizes and exactness of a graph record, in a few lines and one table."""
    s, c, e = d["scores"], d["counts"], d.get("exactness", {})
    targets = [n for n in d["nodes"] if n["kind"] == "logit"]
    kept_errors = sum(n["kind"] == "error" for n in d["nodes"])
    tl = ", ".join(f"{H.escape(repr(n.get('label', '')))} (p={n.get('probability', 0):.3f})" for n in targets)
    rows = [
        ["replacement score", s.get("replacement"), s.get("replacement_pruned")],
        ["completeness score", s.get("completeness"), s.get("completeness_pruned")],
    ]
    exact = []
    if "logits_max_abs_diff" in e:
        exact.append(
            f"replacement model's logits vs the model's: max |difference| {number_text(e['logits_max_abs_diff'], 3)} "
            f"(largest |logit| {number_text(e.get('logit_scale'), 3)})"
        )
    if "edges_max_abs_error" in e:
        exact.append(
            f"{e['edges_sources_checked']} sources scaled by 2 in the frozen model: every computed target "
            f"moved by its edge to {number_text(e['edges_max_abs_error'], 3)} (the largest of those sources' edges "
            f"{number_text(e['edges_largest'], 3)})"
        )
    return (
        f"{lead}<p><b>Attributed logits:</b> {tl}.</p>"
        f"<p>{counted(c['active_features'], 'active feature')}, {c['feature_nodes']:,} with rows "
        f"({counted(c['rows'], 'row')} in {counted(c['backward_passes'], 'backward pass', 'backward passes')}), "
        f"{counted(c['error_nodes'], 'error node')} ({kept_errors:,} kept by the pruning), "
        f"{counted(c['input_nodes'], 'input')}; pruned to {counted(c['nodes_pruned'], 'node')} and "
        f"{counted(c['edges_pruned'], 'edge')} (node threshold "
        f"{number_text(d['settings'].get('node_threshold'))}, edge threshold "
        f"{number_text(d['settings'].get('edge_threshold'))}).</p>"
        + table_html(["score", "whole graph", "pruned graph"], rows)
        + f"<p class='muted'>{SCOPE.get(d.get('kind'), '')}</p>"
        + ("<p class='muted'>" + "; ".join(exact) + ".</p>" if exact else "")
    )


# what a graph holds fixed, so what its scores cannot show (the completeness score counts error nodes, not this)
SCOPE = {
    "lm": "The graph is linear in its sources because the prompt's attention patterns and normalisation scales are "
    "frozen, the error nodes fixed and each transcoder's active set (which of its features are active on the prompt) "
    "held fixed: an intervention that switches features downstream on or off, moves where heads attend or changes "
    "the error nodes can move the model less (or more, or the other way) than the graph predicts (the Interventions "
    "section measures each in turn). The graph traces what flows through the heads (OV), not what set their patterns "
    "(QK). The completeness score measures the influence that error nodes do not carry, not whether the "
    "pattern-setting computation is here; lm graph --qk attributes a head's pattern.",
    "cnn": "The graph is linear in its sources because the image's ReLU and max-pool gates are frozen, the error nodes "
    "fixed and each dictionary's active set (which of its features are active on the image) held fixed: an "
    "intervention that opens or closes gates, switches features downstream on or off or changes the error nodes can "
    "move the model less (or more, or the other way) than the graph predicts (the Interventions section measures "
    "each in turn).",
}
