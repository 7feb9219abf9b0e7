// The p2psched dashboard: reads this agent's HTTP API and redraws every 2 s.
// Everything from the API is written with textContent, never as HTML.
"use strict";

const REFRESH_MS = 2000;
const PAGE = 50;
const MAX_LIMIT = 1000; // the API's most jobs per listing
const STATES = [
  "submitted", "queued", "placed", "running", "succeeded", "failed", "cancelled", "timed_out", "rejected",
];
const FINAL = new Set(["succeeded", "failed", "cancelled", "timed_out", "rejected"]);

const $ = (id) => document.getElementById(id);
const view = { paused: false, selected: null, olderPages: 0, timer: null, busy: false };

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, reason, message) {
    super(message);
    this.status = status;
    this.reason = reason;
  }
}

async function api(path, options = {}) {
  let resp;
  try {
    resp = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store", ...options });
  } catch (e) {
    throw new ApiError(0, "unreachable",
      `cannot reach the agent (${e.message}); it may have stopped. Retrying every ${REFRESH_MS / 1000} s.`);
  }
  let body = null;
  try {
    body = await resp.json();
  } catch (e) {
    body = null;
  }
  if (!resp.ok && !(path === "/healthz" && resp.status === 503)) {
    const err = (body && body.error) || {};
    throw new ApiError(resp.status, err.reason || "http_error", err.message || `${resp.status} ${resp.statusText}`);
  }
  return body;
}

// The first MiB of a running job's stream, as text, and why there is none yet.
async function liveOutput(jobId, stream) {
  const path = `/v1/jobs/${encodeURIComponent(jobId)}/output?stream=${stream}`;
  let resp;
  try {
    resp = await fetch(path, { cache: "no-store" });
  } catch (e) {
    return { text: "", note: "" };
  }
  if (!resp.ok) return { text: "", note: "" };
  return { text: await resp.text(), note: resp.headers.get("X-Output-Note") || "" };
}

// ------------------------------------------------------------------ drawing helpers

// Bidi controls and invisible characters in data would reorder or hide what is shown
// around them (a label that reverses the next one, two names that look alike): they
// show as marks such as [U+202E].
const HIDDEN_CHARS = /[\u061C\u200B\u200E\u200F\u202A-\u202E\u2060\u2066-\u2069\uFEFF]/g;

function plain(value) {
  return String(value).replace(HIDDEN_CHARS, (c) => `[U+${c.charCodeAt(0).toString(16).toUpperCase()}]`);
}

function el(tag, text, className) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = plain(text);
  if (className) e.className = className;
  return e;
}

function pill(state, title) {
  const span = el("span", state, `pill s-${state}`);
  if (title) span.title = title;
  return span;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c);
    else td.textContent = c === undefined || c === null ? "" : plain(c);
    tr.appendChild(td);
  }
  return tr;
}

function fmtTime(epochS) {
  if (!epochS) return "";
  const d = new Date(epochS * 1000);
  const time = d.toLocaleTimeString([], { hour12: false });
  return d.toDateString() === new Date().toDateString() ? time : `${d.toISOString().slice(0, 10)} ${time}`;
}

function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 120) return `${s.toFixed(1)} s`;
  return `${Math.round(s / 60)} min`;
}

function fmtMem(mb) {
  return mb >= 1024 ? `${(mb / 1024).toFixed(1)} GiB` : `${mb} MiB`;
}

const DECLARED_TITLE = "Declared with --gpus, not discovered: slots of virtual GPUs (for tests, or hosts "
  + "without NVML) that no hardware backs. Jobs granted them see no device.";

// GPU slots by type, free / total. Those on GPUs declared with --gpus (declared[type]
// of the total) are marked, so that nobody takes them for hardware: once after the
// list when every slot is declared, else after each type that has some.
function gpuSlots(free, total, declared) {
  const span = el("span");
  const kinds = Object.keys(total || {});
  if (!kinds.length) {
    span.textContent = "none";
    return span;
  }
  const d = (k) => Math.min((declared || {})[k] || 0, total[k]);
  const mark = (text) => {
    const m = el("span", text, "declared");
    m.title = DECLARED_TITLE;
    return m;
  };
  const all = kinds.every((k) => d(k) === total[k]);
  kinds.forEach((k, i) => {
    if (i) span.append(", ");
    span.append(`${(free || {})[k] || 0} / ${total[k]} ${k}`);
    if (!all && d(k)) span.append(" ", mark(d(k) === total[k] ? "(declared)" : `(${d(k)} declared)`));
  });
  if (all) span.append(" ", mark("(declared)"));
  return span;
}

// A member's slots are all declared or none: its inventory says which, in the labels it gossips.
function declaredOf(member) {
  const v = member.vector || {};
  return (member.labels || {})["gpu.declared"] === "true" ? v.gpu_total : {};
}

function took(job) {
  const tl = job.timeline || [];
  const start = tl.find((t) => t.state === "running");
  const end = tl.length ? tl[tl.length - 1] : null;
  if (!start || !end || !FINAL.has(job.state)) return "";
  return fmtDuration(end.at - start.at);
}

function jobReason(job) {
  if (job.result && job.result.reason) return job.result.reason;
  return job.wait_reason || "";
}

// ------------------------------------------------------------------ sections

function drawHealth(h) {
  $("node").textContent = plain(`node ${h.node_id} · v${h.version}`);
  const p = $("health");
  const impaired = Object.keys(h.impaired || {});
  if (h.status === "ok" && impaired.length) {
    // It serves and forwards; jobs of these runtimes go to peers for now.
    p.textContent = `accepting jobs · ${impaired.join(", ")} impaired`;
    p.className = "pill s-impaired";
    p.title = impaired.map((rt) => `${rt}: ${h.impaired[rt].failures_in_a_row} in a row failed here `
      + `(last: ${h.impaired[rt].last_error}); trying again in ${h.impaired[rt].retry_in_s} s`).join("\n");
  } else {
    p.textContent = h.status === "ok" ? "accepting jobs" : h.status;
    p.className = `pill s-${h.status}`;
    p.title = "";
  }
  document.title = `p2psched · ${h.node_id}`;
}

function drawCluster(c) {
  const states = Object.entries(c.by_state || {}).map(([s, n]) => `${n} ${s}`).join(", ");
  $("sum-members").textContent = c.members;
  $("sum-members-detail").textContent = states;
  $("sum-cpu").textContent = `${+c.free.cpu.toFixed(2)} / ${+c.total.cpu.toFixed(2)}`;
  $("sum-mem").textContent = `${fmtMem(c.free.mem_mb)} / ${fmtMem(c.total.mem_mb)}`;
  $("sum-gpu").replaceChildren(gpuSlots(c.free.gpu, c.total.gpu, c.total.gpu_declared));
}

function drawCounts(counts) {
  const ul = $("sum-jobs");
  ul.replaceChildren();
  for (const s of STATES) {
    const li = el("li");
    li.dataset.state = s;
    li.appendChild(el("b", counts[s] || 0));
    li.appendChild(el("span", s, `s-${s}`));
    ul.appendChild(li);
  }
}

// A peer's API address as it gossips it is a link only when it is HOST:PORT: no peer
// makes this page link elsewhere (a path, user info, another scheme).
const HOST_PORT = /^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$/;

function drawPeers(peers) {
  const body = $("peers").tBodies[0];
  body.replaceChildren();
  peers.sort((a, b) => (b.self === true) - (a.self === true) || a.node_id.localeCompare(b.node_id));
  for (const p of peers) {
    const v = p.vector || {};
    const name = el("span", p.node_id);
    if (p.self) name.appendChild(el("span", " (this agent)", "muted"));
    const impaired = v.impaired || [];
    let state = v.draining && p.state === "alive" ? "draining" : p.state;
    if (state === "alive" && impaired.length) state = "impaired";
    let apiCell = p.api || "";
    if (HOST_PORT.test(apiCell)) {
      apiCell = el("a", p.api);
      apiCell.href = `http://${p.api}/ui/`;
    }
    const tr = row([
      name, impaired.length ? pill(state, `${impaired.join(", ")} jobs kept failing there; peers send it none`)
        : pill(state), p.position || "",
      v.cpu_total === undefined ? "" : `${+v.cpu_free.toFixed(2)} / ${+v.cpu_total.toFixed(2)}`,
      v.mem_total_mb === undefined ? "" : `${fmtMem(v.mem_free_mb)} / ${fmtMem(v.mem_total_mb)}`,
      gpuSlots(v.gpu_free, v.gpu_total, declaredOf(p)), v.queue_len ?? "", v.running ?? "",
      v.load === undefined ? "" : v.load.toFixed(2), apiCell,
    ]);
    tr.dataset.node = p.node_id;
    tr.dataset.state = state;
    body.appendChild(tr);
  }
}

function drawJobs(jobs, hasMore) {
  const body = $("jobs").tBodies[0];
  body.replaceChildren();
  for (const j of jobs) {
    const tr = row([
      el("code", j.id), pill(j.state), j.tenant, j.runtime, j.executor || "", j.attempts,
      fmtTime(j.created_at), took(j), "",
    ]);
    tr.lastChild.className = "reason";
    tr.lastChild.textContent = plain(jobReason(j));
    tr.dataset.jobId = j.id;
    tr.dataset.state = j.state;
    if (j.id === view.selected) tr.classList.add("selected");
    tr.addEventListener("click", () => select(j.id));
    body.appendChild(tr);
  }
  $("jobs-empty").hidden = jobs.length > 0 || $("state-filter").value !== "" || $("label-filter").value.trim() !== "";
  $("more").hidden = !hasMore || shownLimit() >= MAX_LIMIT;
}

function field(dl, name, value) {
  if (value === undefined || value === null || value === "") return;
  dl.appendChild(el("dt", name));
  dl.appendChild(el("dd", value));
}

function drawDetail(job) {
  $("detail").hidden = false;
  $("detail-id").textContent = plain(job.id);
  const st = $("detail-state");
  st.textContent = job.state;
  st.className = `pill s-${job.state}`;
  const enc = encodeURIComponent(job.id);
  $("detail-json").href = `/v1/jobs/${enc}`;
  $("detail-json").hidden = false;
  $("detail-result").href = `/v1/jobs/${enc}/result`;
  $("detail-result").hidden = !FINAL.has(job.state);
  $("detail-cancel").hidden = FINAL.has(job.state);
  const dl = $("detail-fields");
  dl.replaceChildren();
  field(dl, "tenant", job.tenant);
  field(dl, "runtime", job.runtime);
  field(dl, "priority", job.priority);
  if (job.labels) field(dl, "labels", Object.entries(job.labels).map(([k, v]) => `${k}=${v}`).join(" "));
  field(dl, "origin", job.origin);
  field(dl, "executor", job.executor);
  if (job.route && job.route.length) {
    const hops = `${job.hops} hop${job.hops === 1 ? "" : "s"}`;
    field(dl, "route", `${job.route.join(" → ")} (cost ${job.cost}, ${hops})`);
  }
  field(dl, "attempts", job.attempts);
  field(dl, "waiting", job.wait_reason);
  const r = job.result;
  if (r) {
    field(dl, "reason", r.reason);
    field(dl, "exit code", r.exit_code);
    field(dl, "CPU time", `${r.cpu_ms} ms`);
    field(dl, "peak memory", `${r.peak_mem_bytes} bytes`);
    field(dl, "output sha256", r.output_sha256);
    if (r.warnings && r.warnings.length) field(dl, "warnings", r.warnings.join("; "));
    if (r.attestation) {
      const key = String(r.attestation.node_pubkey).slice(0, 16);
      field(dl, "attestation", `signed by node ${r.attestation.node_id} (key ${key}…)`);
    }
  }
  $("detail-timeline").hidden = false;
  const body = $("timeline").tBodies[0];
  body.replaceChildren();
  let prev = null;
  for (const t of job.timeline || []) {
    const at = prev === null ? fmtTime(t.at) : `${fmtTime(t.at)} (+${fmtDuration(t.at - prev)})`;
    const tr = row([pill(t.state), at, t.node, ""]);
    tr.lastChild.className = "detail";
    tr.lastChild.textContent = plain(t.detail);
    tr.dataset.state = t.state;
    body.appendChild(tr);
    prev = t.at;
  }
  $("detail-output").hidden = !r && job.state !== "running";
  if (r) {
    $("detail-stdout").textContent = shown(r.stdout, "output (raw)",
      cutHere("stdout", r.stdout_in_record_truncated, r.stdout_truncated, "output (raw)"));
    $("detail-stderr").textContent = shown(r.stderr, null,
      cutHere("stderr", r.stderr_in_record_truncated, r.stderr_truncated, `p2psched logs --stderr ${job.id}`));
  }
}

// Why a job's detail cannot be shown, by the agent's reason: it holds no such job (never,
// or no longer: see --job-retention-h), or the job is another tenant's.
const UNSHOWN = { unknown_job: "not found", forbidden: "forbidden" };

// Why the job cannot be shown, in place of its detail.
function drawUnshown(jobId, e) {
  $("detail").hidden = false;
  $("detail-id").textContent = plain(jobId);
  const st = $("detail-state");
  st.textContent = UNSHOWN[e.reason];
  st.className = "pill muted";
  for (const id of ["detail-json", "detail-result", "detail-cancel"]) $(id).hidden = true;
  const dl = $("detail-fields");
  dl.replaceChildren();
  field(dl, "error", e.message);
  $("detail-timeline").hidden = true;
  $("detail-output").hidden = true;
}

// A running job's output so far (process jobs write it as they go), redrawn with
// each refresh while its detail is open.
async function drawLive(job) {
  if (job.state !== "running") return;
  const [out, err] = await Promise.all([liveOutput(job.id, "stdout"), liveOutput(job.id, "stderr")]);
  if (view.selected !== job.id) return;
  $("detail-stdout").textContent = plain(out.text || (out.note ? `[${out.note}]` : ""));
  $("detail-stderr").textContent = plain(err.text);
}

// The record holds output as UTF-8 text with replacement characters: binary output
// (a model's logits, say) is not worth reading that way.
function shown(text, whereAll, cut) {
  const odd = (text.match(/[\uFFFD\u0000-\u0008\u000E-\u001F]/g) || []).length;
  if (odd > 4 && odd > text.length / 20) {
    const where = whereAll ? `: see ${whereAll}, or p2psched result JOB_ID > out.bin` : "";
    return `[binary output, ${text.length} characters as text${where}]`;
  }
  return plain(cut ? `${text}\n${cut}` : text);
}

// Why a stream's text ends short: the record holds its first 64 KiB (the rest is
// elsewhere), or the job's own limit kept no more (the rest is nowhere).
// stderr_truncated is also set for the first, so it is asked second.
function cutHere(stream, inRecord, truncated, whereAll) {
  if (inRecord) return `[cut here: ${whereAll} has the rest]`;
  if (truncated) return `[cut here: the job's ${stream}_bytes limit kept only this much]`;
  return "";
}

// ------------------------------------------------------------------ banner

function showError(e) {
  const b = $("banner");
  let text = e.message;
  if (e.status === 401 || e.status === 403) {
    text = `${e.message} — this agent answers only signed requests (it has a tenant registry). ` +
      "Open the dashboard through `p2psched dashboard --agent URL --tenant NAME --key FILE`, " +
      "which signs them with the tenant's key.";
  }
  b.textContent = plain(text);
  b.hidden = false;
  if (e.reason === "unreachable" || e.reason === "agent_unreachable") {  // the page's, or the proxy's
    $("health").textContent = "unreachable";  // not the last health it read
    $("health").className = "pill s-unreachable";
    $("health").title = "";
  }
}

function clearError() {
  $("banner").hidden = true;
}

// ------------------------------------------------------------------ refresh

function shownLimit() {
  return Math.min(MAX_LIMIT, PAGE * (1 + view.olderPages));
}

// The label filter as the agent's labels object, or null when it is empty.
function filterLabels() {
  const labels = {};
  for (const item of $("label-filter").value.split(/\s+/)) {
    if (!item) continue;
    const eq = item.indexOf("=");
    if (eq < 1) throw new ApiError(400, "invalid_label", `label ${item} must be KEY=VALUE, e.g. sweep=lr`);
    labels[item.slice(0, eq)] = item.slice(eq + 1);
  }
  return Object.keys(labels).length ? labels : null;
}

function jobsQuery() {
  const q = new URLSearchParams({ order: "newest", limit: String(shownLimit()) });
  const s = $("state-filter").value;
  if (s) q.set("state", s);
  for (const label of $("label-filter").value.split(/\s+/)) {
    if (label) q.append("label", label);  // the agent says what is wrong with one that is not KEY=VALUE
  }
  return `/v1/jobs?${q}`;
}

async function refresh() {
  // A page in a hidden tab asks nothing: it catches up when shown again.
  if (view.busy || document.hidden) return;
  view.busy = true;
  try {
    const health = await api("/healthz");
    drawHealth(health);
    const [cluster, peers, counts, jobs] = await Promise.all([
      api("/v1/cluster"), api("/v1/peers"), api("/v1/jobs:counts"), api(jobsQuery()),
    ]);
    drawCluster(cluster);
    drawPeers(peers.peers);
    drawCounts(counts.counts);
    drawJobs(jobs.jobs, jobs.next_cursor !== null);
    if (view.selected) await loadDetail(view.selected);
    clearError();
    $("updated").textContent = `updated ${new Date().toLocaleTimeString([], { hour12: false })}`;
  } catch (e) {
    showError(e);
  } finally {
    view.busy = false;
  }
}

function schedule() {
  clearInterval(view.timer);
  view.timer = view.paused ? null : setInterval(refresh, REFRESH_MS);
}

// The selected job's detail. Why one cannot be shown (it is not there, or not yours) is
// said there, once: it is not asked for again, and the rest of the page goes on refreshing.
async function loadDetail(jobId) {
  let job;
  try {
    job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
  } catch (e) {
    if (!Object.hasOwn(UNSHOWN, e.reason)) throw e;
    if (view.selected === jobId) {
      view.selected = null;
      drawUnshown(jobId, e);
    }
    return;
  }
  if (view.selected !== jobId) return;  // another was chosen meanwhile
  drawDetail(job);
  await drawLive(job);
}

async function select(jobId) {
  view.selected = jobId;
  try {
    await loadDetail(jobId);
    clearError();
  } catch (e) {
    showError(e);
  }
  for (const tr of $("jobs").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.jobId === jobId);
}

// Every unfinished job with the filter's labels, a page of them a request (waiting
// ones first, so that none starts in a slot a stopped one frees).
async function cancelLabelled() {
  const done = $("label-cancel-done");
  try {
    const labels = filterLabels();
    const text = $("label-filter").value.trim();
    if (!labels || !window.confirm(`Cancel every unfinished job labelled ${text}?`)) return;
    let cancelled = 0;
    const seen = new Set();
    for (;;) {
      const answer = await api("/v1/jobs:cancel", {
        method: "POST", headers: { Accept: "application/json", "Content-Type": "application/json" },
        body: JSON.stringify({ labels, limit: 1000 }),
      });
      let fresh = 0;
      for (const item of answer.results) {
        if (!item.job || seen.has(item.job.id)) continue;
        seen.add(item.job.id);
        fresh += 1;
        if (item.job.state === "cancelled") cancelled += 1;
      }
      if (!answer.more || !fresh) break;  // none new: those left are still stopping
    }
    done.textContent = `${cancelled} cancelled`;
    done.hidden = false;
    clearError();
  } catch (e) {
    showError(e);
  }
  refresh();
}

async function cancelSelected() {
  const id = view.selected;
  if (!id || !window.confirm(`Cancel job ${id}?`)) return;
  try {
    drawDetail(await api(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" }));
    clearError();
  } catch (e) {
    showError(e);
  }
  refresh();
}

// The job a link names as /ui/#JOB_ID; none for a fragment that is not valid
// percent-encoding (no job id needs any).
function hashJob() {
  try {
    return decodeURIComponent(location.hash.slice(1));
  } catch (e) {
    return "";
  }
}

function init() {
  const filter = $("state-filter");
  for (const s of STATES) filter.appendChild(new Option(s, s));
  filter.addEventListener("change", () => { view.olderPages = 0; refresh(); });
  $("label-filter").addEventListener("change", () => {
    view.olderPages = 0;
    $("label-cancel").hidden = $("label-filter").value.trim() === "";
    $("label-cancel-done").hidden = true;
    refresh();
  });
  $("label-cancel").addEventListener("click", cancelLabelled);
  $("more").addEventListener("click", () => { view.olderPages += 1; refresh(); });
  $("pause").addEventListener("click", () => {
    view.paused = !view.paused;
    $("pause").textContent = view.paused ? "Resume" : "Pause";
    schedule();
    if (!view.paused) refresh();
  });
  $("detail-close").addEventListener("click", () => {
    view.selected = null;
    $("detail").hidden = true;
    refresh();
  });
  $("detail-cancel").addEventListener("click", cancelSelected);
  if (hashJob()) select(hashJob());
  window.addEventListener("hashchange", () => {
    if (hashJob()) select(hashJob());
  });
  document.addEventListener("visibilitychange", () => { if (!view.paused) refresh(); });
  refresh();
  schedule();
}

document.addEventListener("DOMContentLoaded", init);
