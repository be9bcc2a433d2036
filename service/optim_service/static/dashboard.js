// The dashboard: the caller's sessions, and per session live charts of its history (polled).
const $ = (sel) => document.querySelector(sel);
const PALETTE = ["#3b6fe0", "#e0543b", "#2a9d5c", "#b35ce0", "#e0a93b", "#3bb8e0", "#7a7a7a", "#e03b8f"];
let key = sessionStorage.getItem("optim-key") || "";
let selected = new URLSearchParams(location.search).get("session");
let charts = null, data = null, lastStep = 0, tensors = [], groups = 1;

async function api(path, accept = "application/json") {
  const headers = { Accept: accept };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { headers });
  if (response.status === 401) {
    $("#key-form").hidden = false;
    throw new Error("an API key is needed");
  }
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("#key").value.trim();
  sessionStorage.setItem("optim-key", key);
  $("#key-form").hidden = true;
  refresh();
});

function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }

async function refreshSessions() {
  const page = await api("/v1/sessions?limit=50");
  const rows = await Promise.all(page.sessions.map(async (s) => {
    const [meta, diagnosis] = await Promise.all([api(`/v1/sessions/${s.id}`), api(`/v1/sessions/${s.id}/diagnosis`)]);
    let round = "";
    if (s.aggregation?.mode === "sync") {
      const r = await api(`/v1/sessions/${s.id}/round`);
      round = `${r.received}/${r.needed} (round ${r.round})`;
    }
    return { s, meta, diagnosis, round };
  }));
  const body = $("#sessions tbody");
  body.replaceChildren(...rows.map(({ s, meta, diagnosis, round }) => {
    const tr = document.createElement("tr");
    tr.dataset.id = s.id;
    if (s.id === selected) tr.className = "selected";
    const badge = document.createElement("span");
    badge.className = `badge ${diagnosis.verdict}`;
    badge.textContent = diagnosis.verdict;
    const verdictCell = document.createElement("td");
    verdictCell.append(badge);
    tr.append(cell(s.id), cell(s.optimizer.type), cell(s.step), cell(s.loss === null ? "" : s.loss.toPrecision(5)),
              cell(meta.next_lr ? meta.next_lr.map((x) => x.toPrecision(3)).join(", ") : ""), verdictCell, cell(round));
    tr.addEventListener("click", () => select(s.id));
    return tr;
  }));
}

function chart(el, series, log) {
  const opts = {
    width: Math.max(420, el.clientWidth || 460), height: 220,
    scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
    axes: [{ label: "step" }, log ? { values: (u, ticks) => ticks.map((v) => (v == null ? "" : Number(v).toExponential(0))) } : {}],
    series: [{ label: "step" }, ...series.map((label, i) => ({ label, stroke: PALETTE[i % PALETTE.length], width: 1.5 }))],
  };
  return new uPlot(opts, [[], ...series.map(() => [])], el);
}

function positive(x) { return x !== null && x !== undefined && x > 0 ? x : null; }

function build(history) {
  tensors = [...new Set(history.flatMap((h) => Object.keys(h.ratio || {})))];
  groups = Math.max(1, ...history.map((h) => h.lr.length));
  for (const id of ["#chart-loss", "#chart-lr", "#chart-grad", "#chart-ratio"]) $(id).replaceChildren();
  charts = {
    loss: chart($("#chart-loss"), ["loss"], true),
    lr: chart($("#chart-lr"), Array.from({ length: groups }, (_, i) => (i ? `group ${i}` : "lr")), false),
    grad: chart($("#chart-grad"), ["grad norm"], false),
    ratio: chart($("#chart-ratio"), tensors.map((t) => t || "params"), true),
  };
  data = { step: [], loss: [], lr: Array.from({ length: groups }, () => []), grad: [], ratio: tensors.map(() => []) };
}

function append(history) {
  for (const h of history) {
    data.step.push(h.step);
    data.loss.push(positive(h.loss));
    for (let i = 0; i < groups; i++) data.lr[i].push(h.lr[i] ?? null);
    data.grad.push(h.grad_norm);
    tensors.forEach((t, i) => data.ratio[i].push(positive(h.ratio?.[t])));
    lastStep = Math.max(lastStep, h.step);
  }
  charts.loss.setData([data.step, data.loss]);
  charts.lr.setData([data.step, ...data.lr]);
  charts.grad.setData([data.step, data.grad]);
  charts.ratio.setData([data.step, ...data.ratio]);
  $("#steps").textContent = String(data.step.length);
}

async function select(id) {
  selected = id;
  history.replaceState(null, "", `?session=${encodeURIComponent(id)}`);
  for (const tr of document.querySelectorAll("#sessions tbody tr")) tr.className = tr.dataset.id === id ? "selected" : "";
  $("#detail").hidden = false;
  $("#detail-id").textContent = id;
  lastStep = 0;
  const steps = (await api(`/v1/sessions/${id}/history`)).history;
  build(steps);
  append(steps);
  await refreshDiagnosis();
}

async function refreshDiagnosis() {
  const d = await api(`/v1/sessions/${selected}/diagnosis`);
  $("#verdict").className = `badge ${d.verdict}`;
  $("#verdict").textContent = d.verdict;
  $("#suggestion").textContent = d.suggestion;
}

async function follow() {
  if (!selected || !charts) return;
  const steps = (await api(`/v1/sessions/${selected}/history?since=${lastStep + 1}`)).history;
  if (steps.length) {
    const wider = steps.some((h) => h.lr.length > groups || Object.keys(h.ratio || {}).some((t) => !tensors.includes(t)));
    if (wider) return select(selected);
    append(steps);
    await refreshDiagnosis();
  }
}

async function refresh() {
  try {
    await refreshSessions();
    if (selected && !charts) await select(selected);
    $("#status").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    $("#status").textContent = error.message;
  }
}

await refresh();
setInterval(() => follow().catch((e) => { $("#status").textContent = e.message; }), 1000);
setInterval(refresh, 5000);
