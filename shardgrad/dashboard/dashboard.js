// The shardgrad dashboard: polls the coordinator's read-only JSON API once a second and
// draws plain SVG charts. No library and no network access beyond the coordinator itself.
// Every text from the server goes in through textContent (job names and hosts are user data).
"use strict";

const POLL_MS = 1000;
const MAX_POINTS = 1500; // per series drawn: more only costs the browser time
const SVG = "http://www.w3.org/2000/svg";
const COLORS = { compute: "#2f6fd6", transfer: "#e07b1a", reduce: "#7b4fc4", step: "#2a9d55" };

const state = { selected: null, followed: null, metrics: new Map(), failures: 0 };

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

function fmt(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "-";
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString("en");
  const s = Number(v).toPrecision(digits);
  // Trailing zeros of a fraction only: "0.2500" -> "0.25", but "100" stays "100".
  return s.includes(".") && !s.includes("e") ? s.replace(/0+$/, "").replace(/\.$/, "") : s;
}

function fmtDuration(s) {
  if (s === null || !Number.isFinite(s)) return "-";
  if (s < 60) return `${s.toFixed(0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

// ---- jobs ---------------------------------------------------------------------------------
function evalText(job) {
  // A running job evaluates at epoch ends: its latest evaluation is in its metrics rows.
  const rows = state.metrics.get(job.id) || [];
  const lastEval = rows.findLast((r) => typeof r.accuracy === "number" || typeof r.mse === "number");
  const ev = Object.assign({}, lastEval || {}, job.last || {}, job.eval || {});
  if (ev.accuracy !== undefined && ev.accuracy !== null) return `acc ${(ev.accuracy * 100).toFixed(2)}%`;
  if (ev.mse !== undefined && ev.mse !== null) return `mse ${fmt(ev.mse)}`;
  return "-";
}

// What a round cost the job (engine.row_seconds): its pace where it has one, else its span.
// Ahead on a lease a round's own span can be the coordinator's part alone, and its steps
// come in bursts.
function rowSeconds(r) {
  return r.pace_s ?? r.round_s;
}

function eta(job) {
  // Remaining rounds times the mean of the last rounds' cost: what the user would estimate.
  if (!["running", "paused"].includes(job.state)) return null;
  const rows = state.metrics.get(job.id) || [];
  const recent = rows.slice(-20).map(rowSeconds).filter((x) => typeof x === "number");
  if (!recent.length) return null;
  const mean = recent.reduce((a, b) => a + b, 0) / recent.length;
  return Math.max(0, job.total_rounds - job.round) * mean;
}

function renderJobs(jobs) {
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren();
  for (const job of jobs.slice().reverse()) {
    const tr = el("tr", { "data-job": job.id, "data-state": job.state });
    if (job.id === state.selected) tr.classList.add("selected");
    tr.addEventListener("click", () => {
      state.selected = job.id;
      state.followed = null; // the user chose: stop following the running job
      refresh();
    });
    tr.append(el("td", {}, job.id), el("td", {}, job.name));
    const st = el("td");
    st.append(el("span", { class: `state state-${job.state}` }, job.state));
    if (job.error) st.title = job.error;
    if (job.placement === "coordinator") {
      const why = "its whole round computes faster here than a round trip to a worker takes";
      st.append(el("span", { class: "placement", title: why }, " on the coordinator"));
    }
    tr.append(st);
    const prog = el("td");
    const bar = el("span", { class: "bar" });
    const frac = job.total_rounds ? Math.min(1, job.round / job.total_rounds) : 0;
    bar.append(el("span", { style: `width:${(frac * 100).toFixed(1)}%` }));
    prog.append(bar, document.createTextNode(`${job.round} / ${job.total_rounds}`));
    tr.append(prog);
    tr.append(el("td", {}, fmtDuration(eta(job))));
    tr.append(el("td", {}, fmt(job.last ? job.last.loss : null)));
    tr.append(el("td", {}, evalText(job)));
    body.append(tr);
  }
}

function pickJob(jobs) {
  // Follow the running job unless the user clicked one; else the most recent job.
  const live = jobs.find((j) => ["running", "paused"].includes(j.state));
  if (state.selected && state.followed === null && jobs.some((j) => j.id === state.selected)) {
    return state.selected;
  }
  const pick = live || jobs[jobs.length - 1];
  state.followed = pick ? pick.id : null;
  return pick ? pick.id : null;
}

// ---- workers and counters -----------------------------------------------------------------
function renderWorkers(workers) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  const live = workers.filter((w) => w.state === "alive" || w.state === "suspect").length;
  document.getElementById("workers-title").textContent = `${live} live of ${workers.length}`;
  for (const w of workers) {
    const tr = el("tr", { "data-worker": w.id, "data-state": w.state });
    const st = el("td");
    st.append(el("span", { class: `state state-${w.state}` }, w.state));
    tr.append(el("td", {}, w.id), el("td", {}, w.host || "-"), el("td", {}, w.pid ?? "-"), st);
    tr.append(el("td", {}, `${Number(w.last_heartbeat_s).toFixed(1)} s ago`));
    tr.append(el("td", {}, String(w.blocks_done)));
    body.append(tr);
  }
}

function renderCounters(counters) {
  const body = document.querySelector("#counters tbody");
  body.replaceChildren();
  const names = Object.keys(counters).sort();
  if (!names.length) {
    const tr = el("tr");
    tr.append(el("td", {}, "nothing counted yet"));
    body.append(tr);
  }
  for (const name of names) {
    const tr = el("tr", { "data-counter": name });
    tr.append(el("td", {}, name), el("td", {}, String(counters[name])));
    body.append(tr);
  }
}

// ---- charts -------------------------------------------------------------------------------
function thin(points) {
  if (points.length <= MAX_POINTS) return points;
  const step = points.length / MAX_POINTS;
  const out = [];
  for (let i = 0; i < MAX_POINTS; i++) out.push(points[Math.floor(i * step)]);
  out.push(points[points.length - 1]);
  return out;
}

function niceTicks(lo, hi, n = 4) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

// series: [{name, color, points: [[x, y], ...]}]; stacked: fill areas on top of each other.
function drawChart(svg, series, { logY = false, stacked = false, yLabel = "" } = {}) {
  svg.replaceChildren();
  const W = 600, H = 240, L = 58, R = 12, T = 22, B = 30;
  const total = series.reduce((n, s) => n + s.points.length, 0);
  svg.dataset.points = String(series.length ? series[0].points.length : 0);
  if (!total) {
    svg.append(el("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" },
      "no rounds yet"));
    return;
  }
  let drawn = series.map((s) => ({ ...s, points: thin(s.points) }));
  if (stacked) {
    // Running sums by index: every series of a stacked chart has the same x values.
    const base = drawn[0].points.map(() => 0);
    drawn = drawn.map((s) => {
      const lower = base.slice();
      const pts = s.points.map(([x, y], i) => [x, (base[i] += Math.max(0, y || 0))]);
      return { ...s, points: pts, lower };
    });
  }
  const f = (y) => (logY ? Math.log10(Math.max(y, 1e-12)) : y);
  const xs = drawn.flatMap((s) => s.points.map((p) => p[0]));
  const ys = drawn.flatMap((s) => s.points.map((p) => f(p[1])));
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (stacked) y0 = 0;
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += Math.abs(y1) * 0.1 || 1; y0 -= stacked ? 0 : Math.abs(y0) * 0.1 || 1; }
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (f(y) - y0) / (y1 - y0)) * (H - T - B);
  const pyRaw = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  // axes and ticks
  for (const t of niceTicks(y0, y1)) {
    svg.append(el("svg:line", { x1: L, x2: W - R, y1: pyRaw(t), y2: pyRaw(t), class: "axis" }));
    const label = logY ? fmt(Math.pow(10, t), 2) : fmt(t, 3);
    svg.append(el("svg:text", { x: L - 6, y: pyRaw(t) + 4, "text-anchor": "end" }, label));
  }
  for (const t of niceTicks(x0, x1, 6)) {
    svg.append(el("svg:text", { x: px(t), y: H - B + 16, "text-anchor": "middle" }, fmt(t, 4)));
  }
  svg.append(el("svg:text", { x: W - R, y: H - 4, "text-anchor": "end" }, "round"));
  svg.append(el("svg:text", { x: 4, y: 12 }, yLabel));
  // series, last on top; a legend along the top edge, after the axis label
  let lx = Math.max(L, 16 + 6.5 * yLabel.length);
  for (const s of drawn) {
    const line = s.points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ");
    if (stacked) {
      const lower = s.points
        .map(([x], i) => `${px(x).toFixed(1)},${pyRaw(s.lower[i]).toFixed(1)}`)
        .reverse()
        .join(" ");
      svg.append(el("svg:polygon", { points: `${line} ${lower}`, fill: s.color,
        "fill-opacity": 0.55, stroke: "none" }));
    } else if (s.dots) {
      for (const [x, y] of s.points) {
        svg.append(el("svg:circle", { cx: px(x), cy: py(y), r: 3, fill: s.color }));
      }
    }
    svg.append(el("svg:polyline", { points: line, fill: "none", stroke: s.color,
      "stroke-width": s.width || 1.5, "stroke-opacity": s.opacity || 1 }));
    svg.append(el("svg:rect", { x: lx, y: 6, width: 10, height: 10, fill: s.color }));
    svg.append(el("svg:text", { x: lx + 14, y: 15 }, s.name));
    lx += 24 + 7 * s.name.length;
  }
}

function movingMean(points, window) {
  const out = [];
  let sum = 0;
  for (let i = 0; i < points.length; i++) {
    sum += points[i][1];
    if (i >= window) sum -= points[i - window][1];
    if (i >= window - 1) out.push([points[i][0], sum / window]);
  }
  return out;
}

function movingRate(timed, window) {
  // [round, samples/s, seconds] -> [round, samples over seconds of the last `window`]
  const out = [];
  let samples = 0, seconds = 0;
  for (let i = 0; i < timed.length; i++) {
    samples += timed[i][1] * timed[i][2];
    seconds += timed[i][2];
    if (i >= window) {
      samples -= timed[i - window][1] * timed[i - window][2];
      seconds -= timed[i - window][2];
    }
    if (i >= window - 1 && seconds > 0) out.push([timed[i][0], samples / seconds]);
  }
  return out;
}

function renderCharts(jobId) {
  const rows = (jobId && state.metrics.get(jobId)) || [];
  const title = jobId ? `${jobId}, ${rows.length} rounds` : "";
  const loss = rows.filter((r) => typeof r.loss === "number").map((r) => [r.round, r.loss]);
  const window = Math.min(loss.length, 25);
  const lossSeries = [{ name: "loss per step", color: "#2f6fd6", points: loss, width: 1,
    opacity: 0.45 }];
  if (window > 1) {
    lossSeries.push({ name: `mean of ${window}`, color: "#1c3f80",
      points: movingMean(loss, window), width: 2 });
  }
  document.getElementById("loss-title").textContent = title;
  drawChart(document.getElementById("loss-chart"), lossSeries, { logY: true,
    yLabel: "training loss (log)" });

  const acc = rows.filter((r) => typeof r.accuracy === "number").map((r) => [r.round, r.accuracy]);
  const mse = rows.filter((r) => typeof r.mse === "number").map((r) => [r.round, r.mse]);
  const evalSeries = acc.length
    ? [{ name: "accuracy", color: "#e07b1a", points: acc, dots: true }]
    : [{ name: "mse", color: "#e07b1a", points: mse, dots: true }];
  const last = acc.length ? acc[acc.length - 1][1] : mse.length ? mse[mse.length - 1][1] : null;
  document.getElementById("eval-title").textContent =
    last === null ? "(at each epoch end)" : `last ${acc.length ? (last * 100).toFixed(2) + "%" : fmt(last)}`;
  drawChart(document.getElementById("eval-chart"), evalSeries, {
    yLabel: acc.length ? "held-out accuracy" : "held-out mse" });

  // Each round weighs what it cost (rowSeconds): a plain mean of per-round rates would be
  // ruled by the bursts' tiny paces.
  const timed = rows.filter((r) => typeof r.samples_per_s === "number")
    .map((r) => [r.round, r.samples_per_s, rowSeconds(r) ?? 0]);
  const rate = timed.map(([round, sps]) => [round, sps]);
  const rateMean = movingRate(timed, Math.min(timed.length, 10));
  document.getElementById("rate-title").textContent = rateMean.length
    ? `${fmt(rateMean[rateMean.length - 1][1])} samples/s` : "";
  drawChart(document.getElementById("rate-chart"), [
    { name: "samples/s", color: "#2a9d55", points: rate, width: 1, opacity: 0.5 },
    { name: "last 10", color: "#1b6b3a", points: rateMean, width: 2 },
  ], { yLabel: "samples / s" });

  // The last 200 rounds: the breakdown of one round is what an operator compares.
  const recent = rows.slice(-200);
  const phases = ["compute", "transfer", "reduce", "step"].map((p) => ({
    name: p, color: COLORS[p],
    points: recent.map((r) => [r.round, 1000 * (r[`${p}_s`] || 0)]),
    width: 1,
  }));
  const meanRound = recent.length
    ? (1000 * recent.reduce((a, r) => a + (rowSeconds(r) ?? 0), 0)) / recent.length : null;
  document.getElementById("time-title").textContent =
    meanRound === null ? "" : `mean ${fmt(meanRound, 3)} ms over the last ${recent.length}`;
  drawChart(document.getElementById("time-chart"), phases, { stacked: true, yLabel: "ms" });
}

// ---- the poll loop ------------------------------------------------------------------------
async function loadMetrics(jobId, job) {
  let have = state.metrics.get(jobId) || [];
  // One row per round done: more rows here than rounds there means the job rolled back
  // (a worker caught lying) and its later rows were dropped; start again from round 0.
  if (job && job.round < have.length) have = [];
  const got = await getJSON(`/api/jobs/${encodeURIComponent(jobId)}/metrics?since=${have.length}`);
  state.metrics.set(jobId, got.metrics.length ? have.concat(got.metrics) : have);
}

async function refresh() {
  const conn = document.getElementById("conn");
  try {
    const status = await getJSON("/api/status");
    const jobs = status.jobs || [];
    const jobId = pickJob(jobs);
    state.selected = jobId;
    if (jobId) await loadMetrics(jobId, jobs.find((j) => j.id === jobId));
    renderJobs(jobs);
    renderWorkers(status.workers || []);
    renderCounters(status.counters || {});
    renderCharts(jobId);
    state.failures = 0;
    conn.dataset.state = "live";
    conn.textContent = `live · ${new Date(status.time * 1000).toLocaleTimeString()}`;
  } catch (e) {
    state.failures += 1;
    conn.dataset.state = "lost";
    conn.textContent = `no answer from the coordinator (${e.message})`;
  }
}

let busy = false;
async function tick() {
  if (busy) return; // a slow answer must not pile requests up
  busy = true;
  try { await refresh(); } finally { busy = false; }
}

tick();
setInterval(tick, POLL_MS);
