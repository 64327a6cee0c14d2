// The attention explorer's alignment view: the source and the output cut into the spans the links join, and a
// line for each link; loaded before explorer.js, whose `state` and `$` it uses when called.

// ------------------------------------------------------------------ the alignment view
// Each link [source_start, source_end, target_start, target_end] (code points) says which source characters an
// output piece comes from. Both texts are cut at every link boundary; the pieces a link covers are joined by a line.
function shownLinks() {
  const a = state.align;
  return $("align-words").checked && a.words ? a.words : a.links;
}

function cutText(chars, ranges) {
  const cuts = new Set([0, chars.length]);
  for (const [start, end] of ranges) { cuts.add(Math.min(start, chars.length)); cuts.add(Math.min(end, chars.length)); }
  const at = [...cuts].sort((x, y) => x - y);
  return at.slice(0, -1).map((start, i) => ({ start, end: at[i + 1], text: chars.slice(start, at[i + 1]).join(""),
                                               links: [] }));
}

function quoted(chars, start, end) { return `“${chars.slice(start, end).join("")}”`; }

function alignLine(el, pieces, describe) {
  el.replaceChildren(...pieces.map((p) => {
    const span = document.createElement("span");
    span.textContent = p.text;
    if (!p.links.length) { span.className = "gap"; return span; }
    span.className = "aspan"; span.tabIndex = 0;
    span.dataset.start = String(p.start); span.dataset.end = String(p.end);
    span.setAttribute("aria-label", describe(p));
    for (const on of ["mouseenter", "focus"]) span.addEventListener(on, () => highlightAlignment(span, p.links));
    for (const off of ["mouseleave", "blur"]) span.addEventListener(off, () => highlightAlignment(null, []));
    p.el = span;
    return span;
  }));
}

function renderAlignment() {
  const a = state.align, words = $("align-words").checked && a && a.words;
  const src = a ? a.source : [], out = a ? a.output : [];
  const links = (a ? shownLinks() : []).filter(([s0, s1, t0, t1]) => s0 >= 0 && s1 > s0 && s1 <= src.length
                                                                       && t0 >= 0 && t1 > t0 && t1 <= out.length);
  const sources = cutText(src, links.map((x) => x.slice(0, 2))), targets = cutText(out, links.map((x) => x.slice(2)));
  const view = links.map(() => ({ sources: [], targets: [], path: null }));
  links.forEach(([s0, s1, t0, t1], k) => {
    for (const p of sources) if (p.start >= s0 && p.end <= s1) { p.links.push(k); view[k].sources.push(p); }
    for (const p of targets) if (p.start >= t0 && p.end <= t1) { p.links.push(k); view[k].targets.push(p); }
  });
  const others = (p, side) => [...new Set(p.links.map((k) => side === "source"
    ? quoted(out, links[k][2], links[k][3]) : quoted(src, links[k][0], links[k][1])))].join(", ");
  alignLine($("align-source"), sources, (p) => `source “${p.text}”, linked to output ${others(p, "source")}`);
  alignLine($("align-output"), targets, (p) => `output “${p.text}”, from source ${others(p, "output")}`);
  state.alignView = view.map((v) => ({ sources: v.sources.map((p) => p.el), targets: v.targets.map((p) => p.el) }));
  drawAlignmentLines();
  $("alignment").dataset.mode = words ? "words" : "tokens";
  $("alignment-info").textContent = !a ? "" : !a.on ? "not asked for this generation" :
    `${links.length} ${words ? "word" : "token"} link${links.length === 1 ? "" : "s"}`;
}

function drawAlignmentLines() {
  const svg = $("align-lines"), box = $("alignment").getBoundingClientRect();
  const scroll = $("alignment").scrollLeft;
  svg.setAttribute("width", String($("alignment").scrollWidth)); svg.setAttribute("height", String(box.height));
  const union = (els) => els.map((e) => e.getBoundingClientRect()).reduce((r, q) => ({
    left: Math.min(r.left, q.left), right: Math.max(r.right, q.right), top: Math.min(r.top, q.top),
    bottom: Math.max(r.bottom, q.bottom) }));
  const paths = (state.alignView || []).map((v) => {
    const s = union(v.sources), t = union(v.targets);
    const x1 = (s.left + s.right) / 2 - box.left + scroll, y1 = s.bottom - box.top;
    const x2 = (t.left + t.right) / 2 - box.left + scroll, y2 = t.top - box.top, ym = (y1 + y2) / 2;
    const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("class", "link");
    path.setAttribute("d", `M${x1.toFixed(1)} ${y1.toFixed(1)} C${x1.toFixed(1)} ${ym.toFixed(1)} ` +
                           `${x2.toFixed(1)} ${ym.toFixed(1)} ${x2.toFixed(1)} ${y2.toFixed(1)}`);
    v.path = path;
    return path;
  });
  svg.replaceChildren(...paths);
}

// a span, every span its links join it to, and those links' lines; null clears
function highlightAlignment(span, links) {
  document.querySelectorAll("#alignment .highlight").forEach((e) => e.classList.remove("highlight"));
  if (!span) return;
  span.classList.add("highlight");
  for (const k of links) {
    const v = state.alignView[k];
    for (const e of [...v.sources, ...v.targets, v.path]) e.classList.add("highlight");
    v.path.parentNode.append(v.path);  // on top of the other lines
  }
}
