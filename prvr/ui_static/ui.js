// prvr ui: one page, plain JS. It talks only to the `prvr ui` server (/api/*), which holds the
// API key and asks TorchServe; nothing here ever sees the key. Data go into the page as text
// (textContent), never as HTML.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const columns = $("#columns");
let current = null;          // the column Enter searches in
let lastSeq = 0;             // answers older than a column's latest request are dropped

function fmt(x, digits = 4) { return Number(x).toFixed(digits); }

function momentText(m) {
  return m.unit === "seconds" ? `${fmt(m.start, 2)}–${fmt(m.end, 2)} s` : `frames ${m.start}–${m.end}`;
}

function durationText(d, unit) {
  if (d === null || d === undefined) return "";
  return unit === "seconds" ? `${fmt(d, 1)} s` : `${d} frames`;
}

function setBar(bar, value, scale) {
  const fill = bar.firstElementChild;
  fill.style.width = `${(100 * Math.abs(value)) / scale}%`;
  fill.classList.toggle("negative", value < 0);
  bar.title = `${bar.classList.contains("clip") ? "clip" : "frame"} score ${value}`;
}

function renderRow(hit, scale, fallbackExtent) {
  const row = $("#row-template").content.firstElementChild.cloneNode(true);
  const m = hit.moment;
  const extent = hit.duration ?? fallbackExtent;
  Object.assign(row.dataset, {
    videoId: hit.video_id, rank: hit.rank, score: hit.score, clipScore: hit.clip_score,
    frameScore: hit.frame_score, start: m.start, end: m.end, unit: m.unit, extent,
  });
  $(".rank", row).textContent = hit.rank;
  $(".video-id", row).textContent = hit.video_id;
  $(".video-id", row).title = hit.video_id;
  if (hit.url) {            // http(s) only: the server validates videos.jsonl
    const link = document.createElement("a");
    Object.assign(link, { href: hit.url, textContent: hit.video_id, target: "_blank", rel: "noopener noreferrer" });
    $(".video-id", row).replaceChildren(link);
  }
  $(".title", row).textContent = hit.title ?? "";
  $(".duration", row).textContent = durationText(hit.duration, m.unit);
  $(".score", row).textContent = fmt(hit.score);
  setBar($(".bar.clip", row), hit.clip_score, scale);
  setBar($(".bar.frame", row), hit.frame_score, scale);
  $(".clip-value", row).textContent = `clip ${fmt(hit.clip_score, 3)}`;
  $(".frame-value", row).textContent = `frame ${fmt(hit.frame_score, 3)}`;
  const moment = $(".moment", row);
  moment.style.left = `${(100 * m.start) / extent}%`;
  moment.style.width = `${(100 * Math.max(0, m.end - m.start)) / extent}%`;
  $(".timeline", row).title = `moment ${momentText(m)} of ${extent} ${m.unit}`;
  $(".moment-label", row).textContent = momentText(m);
  return row;
}

function renderAnswer(col, answer) {
  const hits = answer.results[0].hits;
  const scale = Math.max(1e-9, ...hits.flatMap((h) => [Math.abs(h.clip_score), Math.abs(h.frame_score)]));
  // The video's length, when the answer gives it; else the furthest moment end in this column.
  const furthest = Math.max(1e-9, ...hits.map((h) => h.moment.end));
  const list = $(".results", col);
  list.replaceChildren(...hits.map((h) => renderRow(h, scale, furthest)));
  $(".meta", col).textContent =
    `top-k ${answer.top_k} · alpha ${fmt(answer.alpha, 2)} · model ${answer.model_version}`;
  const unit = hits.length ? hits[0].moment.unit : "frames";
  $(".scale-note", col).textContent = hits.some((h) => h.duration == null)
    ? `Timelines span 0–${furthest} ${unit}, the furthest moment shown: the answer gives no video length.`
    : "";
  renderFooter(answer);
}

function renderFooter(answer) {
  const t = answer.timing;
  const stages = Object.entries(t.stages_ms).map(([k, v]) => `${k} ${fmt(v, 1)}`).join(" / ");
  $("#model").textContent = `model ${answer.model_version}` +
    (answer.data_version ? ` (data ${answer.data_version})` : "");
  $("#corpus").textContent = `corpus ${answer.corpus_size} videos`;
  $("#latency").textContent = `latency ${fmt(t.round_trip_ms, 1)} ms round trip` +
    (stages ? ` · worker ${stages} ms (Server-Timing)` : "");
}

function showError(col, err) {
  const box = $(".error", col);
  const head = [err.status, err.kind].filter((x) => x !== null && x !== undefined).join(" · ");
  box.textContent = head ? `${head}\n${err.message}` : err.message;
  box.hidden = false;
  $(".results", col).replaceChildren();
  $(".scale-note", col).textContent = "";
  $(".meta", col).textContent = "no results";
}

function newColumn() {
  const col = $("#column-template").content.firstElementChild.cloneNode(true);
  $(".close", col).addEventListener("click", () => {
    col.remove();
    if (current === col) setCurrent(columns.lastElementChild);
  });
  col.addEventListener("click", () => setCurrent(col));
  columns.append(col);
  return col;
}

function setCurrent(col) {
  if (current) current.classList.remove("current");
  current = col;
  if (col) col.classList.add("current");
}

function readOptions() {
  const k = $("#top-k").value.trim();
  const alpha = $("#alpha-default").checked ? null : Number($("#alpha").value);
  return { top_k: k === "" ? null : Number(k), alpha };
}

async function search(inNewColumn) {
  const query = $("#query").value;
  const col = inNewColumn || !current ? newColumn() : current;
  setCurrent(col);
  const seq = ++lastSeq;
  col.dataset.seq = seq;
  col.dataset.state = "loading";
  $(".column-query", col).textContent = query.trim() ? query : "(empty query)";
  $(".column-query", col).title = query;
  $(".meta", col).textContent = "searching…";
  $(".error", col).hidden = true;
  let status = 0, body = null;
  try {
    const resp = await fetch("/api/search", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ query, ...readOptions() }),
    });
    status = resp.status;
    body = await resp.json().catch(() => null);
  } catch (e) {
    body = { error: { status: null, kind: "ui_unreachable", message: `the prvr ui server did not answer: ${e}` } };
  }
  if (String(seq) !== col.dataset.seq) return;          // a newer search owns this column
  if (status === 200 && body && body.answer) {
    renderAnswer(col, body.answer);
    col.dataset.state = "done";
  } else {
    showError(col, (body && body.error) || { status, kind: null, message: `the UI server answered ${status}` });
    col.dataset.state = "error";
  }
}

function init() {
  $("#search-form").addEventListener("submit", (e) => { e.preventDefault(); search(false); });
  $("#query").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.shiftKey) { e.preventDefault(); search(true); }
  });
  $("#compare").addEventListener("click", () => search(true));
  const alpha = $("#alpha"), out = $("#alpha-value"), dflt = $("#alpha-default");
  const sync = () => { alpha.disabled = dflt.checked; out.textContent = dflt.checked ? "default" : fmt(alpha.value, 2); };
  alpha.addEventListener("input", sync);
  dflt.addEventListener("change", sync);
  sync();
  fetch("/api/info").then((r) => r.json()).then((info) => {
    $("#endpoint").textContent = `API ${info.endpoint}`;
    $("#top-k").value = info.top_k;
  }).catch(() => {});
}

init();
