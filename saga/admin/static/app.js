// The saga dashboard: plain JavaScript over the admin API (no build step). Every call sends the
// bearer token kept in this tab's sessionStorage; views refresh every 2 s while visible.
"use strict";

const API = new URL("../api/", window.location.href).toString();
const TERMINAL = new Set(["COMPLETED", "COMPENSATED", "FAILED"]);
const STATUSES = ["RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED", "FAILED"];
const view = document.getElementById("view");
let timer = null;
let busy = false; // a dialog is open: do not redraw under it
// The latest route() call. One still in flight when the page changed (a refresh, a click)
// neither draws nor schedules: it would put the page it started on back over the new one.
let routing = 0;

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function badge(status) {
  return `<span class="badge s-${esc(status)}" data-status="${esc(status)}">${esc(status)}</span>`;
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { hour12: false });
}

function ms(value) {
  if (value === null || value === undefined) return "";
  return value < 1000 ? `${value.toFixed(0)} ms` : `${(value / 1000).toFixed(2)} s`;
}

// status 0: the server did not answer at all (down, restarting, the network)
class ApiError extends Error {
  constructor(status, detail, errors) { super(detail); this.status = status; this.errors = errors || []; }
}

async function api(path, options = {}) {
  const token = sessionStorage.getItem("saga-token");
  if (!token) { askToken(); throw new ApiError(401, "no token"); }
  const headers = { Authorization: `Bearer ${token}`, ...(options.headers || {}) };
  if (options.body) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(API + path, { ...options, headers });
  } catch {
    throw new ApiError(0, "the orchestrator cannot be reached (disconnected)");
  }
  const body = await response.json().catch(() => ({}));
  if (response.status === 401 || response.status === 403) {
    sessionStorage.removeItem("saga-token");
    askToken(body.detail);
    throw new ApiError(response.status, body.detail || "not authorized");
  }
  if (!response.ok) throw new ApiError(response.status, body.detail || response.statusText, body.errors);
  return body;
}

// --- sign in -----------------------------------------------------------------------------

function askToken(why) {
  const dialog = document.getElementById("login");
  const error = document.getElementById("login-error");
  error.hidden = !why;
  error.textContent = why || "";
  document.getElementById("actor").value = localStorage.getItem("saga-actor") || "";
  if (!dialog.open) { busy = true; dialog.showModal(); }
}

document.getElementById("login-form").addEventListener("submit", () => {
  sessionStorage.setItem("saga-token", document.getElementById("token").value.trim());
  const actor = document.getElementById("actor").value.trim();
  if (actor) localStorage.setItem("saga-actor", actor);
  busy = false;
  route();
});

document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem("saga-token");
  askToken();
});

// --- views -------------------------------------------------------------------------------

async function overview(mine) {
  const o = await api("overview");
  const cards = STATUSES.map((s) => `
    <div class="card" data-count="${s}"><div class="muted">${badge(s)}</div>
    <div class="n"><a href="#/sagas?status=${s}">${o.counts[s] || 0}</a></div></div>`).join("");
  const rows = o.by_saga.map((r) => `
    <tr><td>${esc(r.name)}</td><td>${r.finished}</td><td>${r.completed}</td>
    <td>${r.compensated}</td><td>${r.failed}</td><td>${ms(r.p50_ms)}</td><td>${ms(r.p95_ms)}</td></tr>`).join("");
  const oldest = o.oldest_running
    ? `<a class="mono" href="#/saga/${o.oldest_running.saga_id}">${esc(o.oldest_running.saga_id)}</a>
       (${esc(o.oldest_running.name)}, running for ${ms(o.oldest_running.age_s * 1000)})`
    : '<span class="muted">none running</span>';
  const dead = o.dead_letters === null
    ? '<span class="error">unknown: no broker connection</span>'
    : Object.entries(o.dead_letters).map(([q, n]) =>
      `<tr><td class="mono">${esc(q)}</td><td data-dlq="${esc(q)}">${n ?? "?"}</td></tr>`).join("");
  if (mine !== routing) return false; // a later route() owns the view now
  view.innerHTML = `
    <h1>Overview</h1>
    <div class="cards">${cards}
      <div class="card"><div class="muted">finished / min (last 5 min)</div>
      <div class="n" id="throughput">${o.throughput_per_min.toFixed(1)}</div></div>
    </div>
    <h2>By saga (started in the last ${Math.round(o.window_s / 60)} min)</h2>
    <table id="by-saga"><thead><tr><th>saga</th><th>finished</th><th>completed</th><th>compensated</th>
      <th>failed</th><th>p50 duration</th><th>p95 duration</th></tr></thead>
      <tbody>${rows || '<tr><td colspan="7" class="muted">nothing finished yet</td></tr>'}</tbody></table>
    <h2>Oldest running saga</h2><p id="oldest">${oldest}</p>
    <h2>Dead-letter queues</h2>
    ${o.dead_letters === null ? dead : `<table id="dead-letters"><thead><tr><th>queue</th><th>messages</th></tr></thead>
      <tbody>${dead || '<tr><td colspan="2" class="muted">none</td></tr>'}</tbody></table>`}`;
}

function listQuery() {
  const query = new URLSearchParams(window.location.hash.split("?")[1] || "");
  return query;
}

// A filter the API refuses (422) is shown at its field, the form kept as typed; the list is
// not asked again until the filter changes. Times go as typed: the API reads ages (1h, 2d, 1w)
// and ISO times with the same parser as `saga list --since`.
function fieldErrors(e) {
  const errors = {};
  for (const item of e.errors || []) {
    if (item.loc && item.loc[0] === "query") errors[item.loc[1]] = item.msg;
  }
  if (!Object.keys(errors).length) errors._ = e.message;
  return errors;
}

function stepCell(s) {
  // where to look: the step being run, compensated (↩), stuck, or that turned the saga back
  const step = s.at_step || "";
  const text = s.status === "COMPENSATING" && step ? `↩ ${step}` : step;
  return `<td data-col="step">${esc(text)}</td>`;
}

async function sagas(mine) {
  const query = listQuery();
  const params = new URLSearchParams();
  for (const s of query.getAll("status")) params.append("status", s);
  for (const k of ["name", "key", "q", "since", "until", "cursor"]) {
    if (query.get(k)) params.set(k, query.get(k));
  }
  params.set("limit", "50");
  const definitions = await api("definitions");
  let page = null;
  let errors = {};
  try {
    page = await api(`sagas?${params}`);
  } catch (e) {
    if (e.status !== 422) throw e;
    errors = fieldErrors(e);
  }
  const err = (k) => errors[k] ? `<span class="field-error error" data-error-for="${esc(k)}">${esc(errors[k])}</span>` : "";
  const names = [...new Set(definitions.map((d) => d.name))];
  const chosen = new Set(query.getAll("status"));
  const statusBoxes = STATUSES.map((s) => `<label><span>${s.toLowerCase()}</span>
    <input type="checkbox" name="status" value="${s}" ${chosen.has(s) ? "checked" : ""}></label>`).join("");
  const rows = (page ? page.items : []).map((s) => `
    <tr data-saga="${esc(s.saga_id)}"><td class="mono"><a href="#/saga/${esc(s.saga_id)}">${esc(s.saga_id.slice(0, 8))}…</a></td>
    <td>${esc(s.name)}</td><td>${badge(s.status)}</td><td>${esc(s.key || "")}</td>
    ${stepCell(s)}<td>${when(s.created_at)}</td><td>${when(s.updated_at)}</td>
    <td>${esc(why(s).map(([, text]) => text).join("; "))}</td></tr>`).join("");
  const next = page && page.next_cursor
    ? (() => { const q = new URLSearchParams(query); q.set("cursor", page.next_cursor);
      return `<a id="next-page" href="#/sagas?${q}">next page →</a>`; })()
    : "";
  const empty = page
    ? '<tr><td colspan="8" class="muted">no saga matches</td></tr>'
    : '<tr><td colspan="8" class="error">fix the filter above</td></tr>';
  const filtered = Object.keys(batchFilter(query)).length > 0;
  if (mine !== routing) return false; // a later route() owns the view now
  view.innerHTML = `
    <h1>Sagas</h1>
    <form class="filters" id="filters">
      ${statusBoxes}
      <label>saga <select name="name"><option value="">any</option>${names.map((n) =>
        `<option ${query.get("name") === n ? "selected" : ""}>${esc(n)}</option>`).join("")}</select></label>
      <label>key <input name="key" value="${esc(query.get("key") || "")}" size="14">${err("key")}</label>
      <label>id <input name="q" value="${esc(query.get("q") || "")}" placeholder="id or prefix" size="14">${err("q")}</label>
      <label>since <input name="since" value="${esc(query.get("since") || "")}" placeholder="1h or ISO" size="10">${err("since")}</label>
      <label>until <input name="until" value="${esc(query.get("until") || "")}" placeholder="2d or ISO" size="10">${err("until")}</label>
      <button>Filter</button>
      ${err("_")}${err("status")}${err("name")}${err("cursor")}
    </form>
    <div class="actions" id="batch-actions">${BATCH.map(([action, label]) =>
      `<button type="button" class="secondary" data-batch="${action}" ${filtered ? "" : "disabled"}
        title="${filtered ? `${action} every saga this filter matches, after a preview` : "filter the list first"}">${label}</button>`).join("")}
    </div>
    <table id="saga-list"><thead><tr><th>id</th><th>saga</th><th>status</th><th>key</th><th title="where it runs, is stuck, or turned back">step</th>
      <th>started</th><th>updated</th><th>why</th></tr></thead>
      <tbody>${rows || empty}</tbody></table>
    <p>${next}</p>`;
  for (const button of view.querySelectorAll("[data-batch]")) {
    button.addEventListener("click", () => batch(button.dataset.batch, batchFilter(query)));
  }
  document.getElementById("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const q = new URLSearchParams();
    for (const [k, v] of form.entries()) if (v.trim()) q.append(k, v.trim());
    const hash = `#/sagas?${q}`;
    if (window.location.hash === hash) route(); else window.location.hash = hash;
  });
  return page !== null; // refresh only a list the API answered
}

// --- batch actions: every saga the list's filter matches ----------------------------------

const BATCH = [["retry", "Retry all…"], ["abort", "Abort all…"], ["resolve", "Resolve all…"]];
const BATCH_SHOWN = 20; // rows of the preview shown; the count covers them all
const BATCH_LIMIT = 1000; // the API's most per batch

// The list's filter as the batch API takes it (times as typed, like the list).
function batchFilter(query) {
  const filter = {};
  const statuses = query.getAll("status");
  if (statuses.length) filter.status = statuses;
  for (const k of ["name", "key", "q", "since", "until"]) if (query.get(k)) filter[k] = query.get(k);
  return filter;
}

let batchRun = null; // the dialog's state: {action, filter, ids} once previewed, {batchId} once running

// First the dry run (how many, and the first ones, nothing changed), then a reason and the
// confirmation, then the run on exactly the sagas shown, its progress and each outcome.
async function batch(action, filter) {
  const dialog = document.getElementById("batch");
  const verb = action[0].toUpperCase() + action.slice(1);
  batchRun = { action, filter, ids: [] };
  document.getElementById("batch-title").textContent = `${verb} all matching sagas`;
  document.getElementById("batch-help").textContent = HELP[action];
  document.getElementById("batch-filter").textContent = `filter: ${JSON.stringify(filter)}`;
  document.getElementById("batch-summary").textContent = "Looking for the sagas this filter matches…";
  document.querySelector("#batch-preview tbody").innerHTML = "";
  document.getElementById("batch-reason").value = "";
  document.getElementById("batch-reason-label").hidden = false;
  document.getElementById("batch-progress").hidden = true;
  document.getElementById("batch-results").innerHTML = "";
  document.getElementById("batch-error").hidden = true;
  const submit = document.getElementById("batch-submit");
  submit.disabled = true;
  submit.textContent = "Confirm";
  document.getElementById("batch-cancel").textContent = "Cancel";
  busy = true;
  dialog.showModal();
  let preview;
  try {
    preview = await api(`sagas/batch/${action}`, {
      method: "POST", body: JSON.stringify({ filter, dry_run: true, limit: BATCH_LIMIT }),
    });
  } catch (e) {
    batchError(e.message);
    return;
  }
  batchRun.ids = preview.items.map((s) => s.saga_id);
  document.getElementById("batch-summary").textContent = preview.matched
    ? `${preview.matched} sagas match: ${preview.would_apply} accept ${action}, ${preview.would_skip} will be skipped` +
      (preview.truncated ? ` (more match than ${BATCH_LIMIT}: run it again for the rest)` : "")
    : "No saga matches this filter: nothing to do.";
  document.querySelector("#batch-preview tbody").innerHTML = preview.items.slice(0, BATCH_SHOWN).map((s) => `
    <tr data-batch-saga="${esc(s.saga_id)}"><td class="mono">${esc(s.saga_id.slice(0, 8))}…</td><td>${esc(s.name)}</td>
    <td>${badge(s.status)}</td><td>${esc(s.at_step || "")}</td>
    <td class="${s.allowed ? "" : "muted"}">${esc(s.allowed ? (s.why || "") : `skipped: ${s.refusal}`)}</td></tr>`).join("") +
    (preview.items.length > BATCH_SHOWN
      ? `<tr><td colspan="5" class="muted">… and ${preview.items.length - BATCH_SHOWN} more</td></tr>` : "");
  if (preview.matched) {
    submit.disabled = false;
    submit.textContent = `${verb} these ${preview.matched} sagas`;
  }
}

function batchError(message) {
  const error = document.getElementById("batch-error");
  error.hidden = false;
  error.textContent = message;
}

document.getElementById("batch-form").addEventListener("submit", async (event) => {
  const dialog = document.getElementById("batch");
  if (event.submitter && event.submitter.value === "cancel") { busy = false; batchRun = null; route(); return; }
  event.preventDefault();
  const run = batchRun;
  if (!run || run.batchId) return;
  const submit = document.getElementById("batch-submit");
  let progress;
  try {
    progress = await api(`sagas/batch/${run.action}`, {
      method: "POST",
      body: JSON.stringify({ filter: run.filter, saga_ids: run.ids, reason: document.getElementById("batch-reason").value }),
      headers: { "X-Saga-Actor": localStorage.getItem("saga-actor") || "dashboard" },
    });
  } catch (e) {
    batchError(e.message);
    return;
  }
  run.batchId = progress.batch_id;
  submit.disabled = true;
  document.getElementById("batch-error").hidden = true;
  document.getElementById("batch-reason-label").hidden = true;
  document.getElementById("batch-progress").hidden = false;
  document.getElementById("batch-cancel").textContent = "Close";
  while (dialog.open) {
    batchProgress(progress);
    if (progress.state === "finished") break;
    await new Promise((resolve) => setTimeout(resolve, 500));
    try {
      progress = await api(`sagas/batch/${progress.batch_id}`);
    } catch (e) {
      batchError(`${e.message}; the batch goes on in the orchestrator, each saga's history records it`);
    }
  }
});

function batchProgress(p) {
  const bar = document.getElementById("batch-bar");
  bar.max = Math.max(p.total, 1);
  bar.value = p.done;
  const state = p.state === "finished" ? "finished" : "running";
  document.getElementById("batch-count").textContent =
    `${state}: ${p.done}/${p.total} done (applied ${p.applied}, skipped ${p.skipped}, failed ${p.failed})`;
  document.getElementById("batch-count").dataset.state = state;
  document.getElementById("batch-results").innerHTML = p.results.filter((r) => r.outcome === "skipped" || r.outcome === "failed")
    .map((r) => `<li data-outcome="${esc(r.outcome)}" data-batch-result="${esc(r.saga_id)}"><a href="#/saga/${esc(r.saga_id)}">${esc(r.saga_id.slice(0, 8))}…</a>
      ${esc(r.name || "")} ${esc(r.outcome)}: ${esc(r.why || "")}</li>`).join("");
}

// Why the saga went wrong, kept apart from how it ended: [label, text, element id] for the root
// cause (the first failure), the reason a FAILED saga is stuck now, and the operator's fix.
// `failure` alone would name a compensation that failed, then was retried, as the cause of a
// COMPENSATED saga.
function why(s) {
  const cause = s.root_cause, fix = s.resolution, items = [];
  if (cause) items.push(["why", cause.detail, "failure"]);
  if (s.failure && (!cause || (s.status === "FAILED" && s.failure !== cause.detail))) {
    items.push([cause ? "stuck now" : "why", s.failure, cause ? "stuck-why" : "failure"]);
  }
  if (fix) {
    const done = { retry: "retried", resolve: "resolved by hand", abort: "aborted" }[fix.action] || fix.action;
    items.push(["fixed", `${done} by ${fix.actor} (${when(fix.at)}): ${fix.reason}`, "resolution"]);
  }
  return items;
}

function entryClass(h) {
  const classes = [];
  if (h.direction === "compensation" || h.kind.startsWith("compensation") || h.kind === "step_compensated") {
    classes.push("compensation");
  }
  if (["step_failed", "compensation_failed", "step_timed_out", "failed"].includes(h.kind)) classes.push("failure");
  if (["step_succeeded", "step_compensated", "completed", "compensated"].includes(h.kind)) classes.push("done");
  if (h.kind === "operator" || h.kind === "rejected") classes.push("operator");
  if (h.kind === "step_skipped") classes.push("skipped");
  return classes.join(" ");
}

function seconds(value) {
  return value < 1 ? `${(value * 1000).toFixed(0)} ms` : `${value.toFixed(1)} s`;
}

// A run of attempts in one line, as `saga show` prints it: "payment.refund ×10,
// injected_transient, 3.6 s to 8.4 s apart".
function runText(run) {
  const parts = [`${run.command || run.step} ×${run.attempts}`];
  if (run.errors.length) parts.push(run.errors.join(", "));
  if (run.min_interval_s !== null && run.max_interval_s !== null) {
    const low = seconds(run.min_interval_s), high = seconds(run.max_interval_s);
    parts.push(low === high ? `${low} apart` : `${low} to ${high} apart`);
  }
  return parts.join(", ");
}

// runs the reader opened, by saga and first entry: kept while the page refreshes
const openRuns = new Set();

function entryItem(h, start) {
  return `
    <li class="${entryClass(h)}" data-kind="${esc(h.kind)}" data-step="${esc(h.step || "")}" data-direction="${esc(h.direction || "")}">
      <span class="when">+${ms(new Date(h.at).getTime() - start)}</span>
      ${h.direction === "compensation" ? '<span class="dir">↩ compensate</span>' : h.direction ? '<span class="dir">→</span>' : ""}
      <strong>${esc(h.step || "")}</strong> ${h.attempt ? `<span class="muted">attempt ${h.attempt}</span>` : ""}
      <span>${esc(h.kind.replaceAll("_", " "))}</span>: ${esc(h.detail)}
      ${h.actor ? `<span class="muted">by ${esc(h.actor)}</span>` : ""}
    </li>`;
}

// The history with each run of retries (the API's retry_runs) as one row that opens to its
// entries: ten attempts of a refund are one line, not thirty.
function timelineItems(s, start) {
  const runs = new Map((s.retry_runs || []).map((r) => [r.first, r]));
  const items = [];
  for (let i = 0; i < s.history.length;) {
    const run = runs.get(i);
    if (!run) { items.push(entryItem(s.history[i], start)); i += 1; continue; }
    const key = `${s.saga_id}:${run.first}`;
    const open = openRuns.has(key);
    const back = run.direction === "compensation";
    const entries = s.history.slice(run.first, run.last + 1).map((h) => entryItem(h, start)).join("");
    items.push(`
    <li class="run failure${back ? " compensation" : ""}" data-kind="retry_run" data-run="${esc(key)}" data-step="${esc(run.step)}" data-direction="${esc(run.direction)}">
      <button type="button" class="run-toggle" aria-expanded="${open}" title="show every entry">${open ? "▾" : "▸"} ${run.attempts} attempts</button>
      <span class="when">+${ms(new Date(run.first_at).getTime() - start)} to +${ms(new Date(run.last_at).getTime() - start)}</span>
      ${back ? '<span class="dir">↩ compensate</span>' : '<span class="dir">→</span>'}
      <strong>${esc(run.step)}</strong> <span class="muted">attempts ${run.first_attempt}–${run.last_attempt}</span>
      <span class="run-summary">${esc(runText(run))}</span>
      <ol class="timeline run-entries"${open ? "" : " hidden"}>${entries}</ol>
    </li>`);
    i = run.last + 1;
  }
  return items.join("");
}

// What the saga waits on: the step, which try of its budget, what went wrong last, and what
// happens next (the retry, the reply's deadline, or an operator), like a pending-activity card.
function pendingCard(s) {
  const p = s.pending;
  if (!p) return "";
  const back = p.direction === "compensation";
  const budget = p.max_attempts === null ? "∞" : p.max_attempts;
  const next = p.next_retry_at
    ? `<dt>next retry</dt><dd id="pending-next">${when(p.next_retry_at)} <span class="muted">(${relative(p.next_retry_at)})</span></dd>`
    : p.reply_deadline
      ? `<dt>reply due by</dt><dd id="pending-next">${when(p.reply_deadline)} <span class="muted">(${relative(p.reply_deadline)})</span></dd>`
      : `<dt>next</dt><dd id="pending-next">waits for an operator</dd>`;
  const allowed = (p.allowed_actions || []).join(", ") || "none";
  const flying = s.in_flight || [];
  const group = flying.length > 1;
  // a FAILED saga under the continue policy: every stuck compensation, newest (p.step) first
  const stuckAll = s.status === "FAILED" && (s.stuck_steps || []).length > 1 ? s.stuck_steps : null;
  const names = group ? flying : stuckAll || [p.step];
  const named = names.map((n) => `<strong data-named="${esc(n)}">${esc(n)}</strong>`).join(", ");
  return `
    <section class="pending${back ? " compensation" : ""}" id="pending" data-step="${esc(p.step)}" data-direction="${esc(p.direction)}">
      <h2>${s.status === "FAILED" ? "Stuck at" : "Waiting on"} ${named}${group ? " in parallel" : ""}
        <span class="dir">${back ? "↩ compensation" : "→ action"}</span></h2>
      ${group ? inFlight(s, flying, back) : ""}
      <dl class="kv">
        ${group ? `<dt>next due</dt><dd>${esc(p.step)}</dd>` : stuckAll ? `<dt>newest</dt><dd>${esc(p.step)}, below; each stuck step needs a retry or a resolve</dd>` : ""}
        <dt>participant</dt><dd>${esc(p.participant || "?")} <span class="mono">${esc(p.command || "")}</span></dd>
        <dt>attempt</dt><dd id="pending-attempt">${p.attempt} of ${budget}${p.attempts_sent !== p.attempt ? ` <span class="muted">(${p.attempts_sent} sent in all)</span>` : ""}</dd>
        <dt>last error</dt><dd id="pending-error" class="${p.last_error ? "error" : "muted"}">${esc(p.last_error || "none")}</dd>
        <dt>last sent</dt><dd>${p.last_sent_at ? `${when(p.last_sent_at)} <span class="muted">(${relative(p.last_sent_at)})</span>` : "—"}</dd>
        ${next}
        <dt>operator</dt><dd id="pending-actions">${esc(allowed)}</dd>
      </dl>
    </section>`;
}

// The saga's own deadline: when, and while it runs forward, the time left.
function expires(s) {
  if (!s.expires_at) return "";
  const left = (new Date(s.expires_at).getTime() - Date.now()) / 1000;
  const forward = s.status === "RUNNING" && s.direction === "action";
  const note = !forward ? "" : left >= 0 ? `${span(left)} left` : `passed ${span(-left)} ago: it compensates`;
  return `<dt>deadline</dt><dd id="expires">${when(s.expires_at)}${note ? ` <span class="muted" id="expires-left">(${note})</span>` : ""}</dd>`;
}

// Every step an operator must look at: with the `continue` policy a FAILED saga can have
// several stuck compensations (newest first), and each needs a retry or a resolve.
function stuck(s) {
  const names = (s.stuck_steps && s.stuck_steps.length) ? s.stuck_steps : s.stuck_step ? [s.stuck_step] : [];
  if (!names.length) return "";
  const title = names.length > 1 ? "compensations stuck, newest first; the older steps were still compensated (continue policy)" : "";
  return `<dt>stuck at</dt><dd id="stuck"${title ? ` title="${title}"` : ""}>${names.map((n) =>
    `<span data-stuck="${esc(n)}">${esc(n)}</span>`).join(", ")}</dd>`;
}

function relative(iso) {
  const delta = (new Date(iso).getTime() - Date.now()) / 1000;
  const text = seconds(Math.abs(delta));
  return delta >= 0 ? `in ${text}` : `${text} ago`;
}

// Each member of a parallel group in flight with its own attempt of its budget, when it was
// sent, and its own next event (the reply's deadline, or the retry after a backoff).
function inFlight(s, names, back) {
  const byName = new Map(s.steps.map((st) => [st.name, st]));
  const members = new Map(((s.pending && s.pending.members) || []).map((m) => [m.step, m]));
  return `<ul class="in-flight" id="in-flight">${names.map((n) => {
    const st = byName.get(n) || { name: n, attempts: 0, compensation_attempts: 0 };
    const m = members.get(n);
    if (m) {
      const budget = m.max_attempts === null ? "∞" : m.max_attempts;
      const next = m.next_retry_at
        ? `next retry ${relative(m.next_retry_at)}`
        : m.reply_deadline ? `reply due ${relative(m.reply_deadline)}` : "";
      return `<li data-in-flight="${esc(n)}" data-phase="${esc(m.phase)}"><strong>${esc(n)}</strong> <span class="muted">${esc(st.participant || "?")}</span>
        <span data-member-attempt>attempt ${m.attempt} of ${budget}</span>${m.last_sent_at ? `, sent ${relative(m.last_sent_at)}` : ""}${next ? `, <span data-member-next title="${esc(when(m.next_retry_at || m.reply_deadline))}">${next}</span>` : ""}${m.last_error ? `, last error <span class="error">${esc(m.last_error)}</span>` : ""}</li>`;
    }
    const sent = back ? st.compensation : st.action;
    const tries = back ? st.compensation_attempts : st.attempts;
    return `<li data-in-flight="${esc(n)}"><strong>${esc(n)}</strong> <span class="muted">${esc(st.participant || "?")}</span>
      attempt ${tries}${sent ? `, sent ${relative(sent.last_sent_at)}` : ""}${st.error ? `, last error <span class="error">${esc(st.error)}</span>` : ""}</li>`;
  }).join("")}</ul>`;
}

// One bar per (step, direction) from its first send to its finish (or now, while it runs),
// on one row per step, scaled to the saga's whole run: CSS percentages, so it fits any width.
function gantt(s) {
  const spans = [];
  for (const st of s.steps) {
    if (st.action) spans.push([st, "action", st.action]);
    if (st.compensation) spans.push([st, "compensation", st.compensation]);
  }
  if (!spans.length) return "";
  const start = new Date(s.created_at).getTime();
  const running = !TERMINAL.has(s.status);
  const end = (span) => span.finished_at ? new Date(span.finished_at).getTime()
    : running ? Math.max(Date.now(), new Date(s.updated_at).getTime()) : new Date(s.updated_at).getTime();
  const total = Math.max(...spans.map(([, , span]) => end(span)), new Date(s.updated_at).getTime()) - start || 1;
  const pct = (t) => Math.min(100, Math.max(0, ((t - start) / total) * 100));
  const rows = s.steps.filter((st) => st.action || st.compensation || st.status === "SKIPPED").map((st) => {
    if (st.status === "SKIPPED") {
      return `<div class="gantt-row skipped" data-skipped="${esc(st.name)}"><span class="gantt-label" title="${esc(st.name)}: its condition was false">${esc(st.name)}</span>
        <span class="gantt-track"><span class="gantt-note">skipped</span></span></div>`;
    }
    const bars = spans.filter(([x]) => x === st).map(([, direction, span]) => {
      const from = new Date(span.first_sent_at).getTime(), to = end(span);
      const failed = direction === "action" && ["FAILED", "TIMED_OUT"].includes(st.status);
      const open = span.finished_at === null;
      const tries = direction === "action" ? st.attempts : st.compensation_attempts;
      const title = `${st.name} ${direction === "action" ? "→ action" : "↩ compensation"}: +${ms(from - start)} to `
        + `${open ? "now (running)" : `+${ms(to - start)} (${ms(to - from)})`}, ${tries} attempt${tries === 1 ? "" : "s"}`;
      return `<span class="bar ${direction}${failed ? " failed" : ""}${open ? " open" : ""}" data-bar data-step="${esc(st.name)}"
        data-direction="${direction}" style="left: ${pct(from).toFixed(2)}%; width: ${Math.max(pct(to) - pct(from), 0).toFixed(2)}%"
        title="${esc(title)}"></span>`;
    }).join("");
    return `<div class="gantt-row"><span class="gantt-label" title="${esc(st.name)}">${esc(st.name)}</span><span class="gantt-track">${bars}</span></div>`;
  }).join("");
  return `<div class="gantt" id="gantt" role="img" aria-label="when each step and compensation ran">${rows}
    <div class="gantt-row gantt-axis"><span></span><span class="gantt-track"><span>0</span><span>${ms(total)}</span></span></div></div>`;
}

async function detail(id, mine) {
  const s = await api(`sagas/${encodeURIComponent(id)}`);
  const start = new Date(s.created_at).getTime();
  const timeline = timelineItems(s, start);
  const steps = s.steps.map((st) => `
    <tr data-step-row="${esc(st.name)}"${st.status === "SKIPPED" ? ' class="skipped"' : ""}><td>${esc(st.name)}</td><td>${esc(st.participant || "")}</td>
    <td>${st.status === "SKIPPED" ? "skipped" : esc(st.status)}</td>
    <td>${st.attempts}</td><td>${st.compensation_attempts}</td>
    <td>${st.action ? ms(st.action.duration_ms) : ""}</td><td>${st.compensation ? ms(st.compensation.duration_ms) : ""}</td>
    <td>${esc(st.error || "")}</td></tr>`).join("");
  const terminal = TERMINAL.has(s.status);
  if (mine !== routing) return false; // a later route() owns the view now
  view.innerHTML = `
    <h1>${esc(s.name)} <span class="mono">${esc(s.saga_id)}</span> ${badge(s.status)}</h1>
    <dl class="kv">
      <dt>key</dt><dd>${esc(s.key || "—")}</dd>
      <dt>definition</dt><dd>${esc(s.name)} v${s.definition_version}</dd>
      <dt>started</dt><dd>${when(s.created_at)}</dd><dt>updated</dt><dd>${when(s.updated_at)}</dd>
      <dt>now</dt><dd>${(s.in_flight || []).length > 1
        ? `${esc(s.in_flight.join(", "))} in parallel`
        : esc(s.current_step || "—")} (${esc(s.direction)}, ${esc(s.phase)})</dd>
      ${expires(s)}
      ${why(s).map(([label, text, id]) => `<dt>${label}</dt><dd id="${id}" class="error">${esc(text)}</dd>`).join("")}
      ${stuck(s)}
    </dl>
    <div class="actions" id="actions">${actions(s)}</div>
    ${pendingCard(s)}
    <h2>Steps over time</h2>
    <p class="legend"><span style="color: var(--run)">▬ action</span><span style="color: var(--comp)">▬ compensation</span><span style="color: var(--fail)">▬ failed</span></p>
    ${gantt(s)}
    <h2>Timeline</h2>
    <p class="legend"><span>→ action</span><span style="color: var(--comp)">↩ compensation (newest first)</span></p>
    <ol class="timeline" id="timeline">${timeline}</ol>
    <h2>Steps</h2>
    <table id="steps"><thead><tr><th>step</th><th>participant</th><th>status</th><th>attempts</th>
      <th>compensation attempts</th><th>action took</th><th>compensation took</th><th>last error</th></tr></thead>
      <tbody>${steps}</tbody></table>
    <h2>Input and outputs</h2>
    <pre>${esc(JSON.stringify({ input: s.input, outputs: s.outputs }, null, 2))}</pre>`;
  for (const button of view.querySelectorAll("[data-action]")) {
    button.addEventListener("click", () => act(s, button.dataset.action));
  }
  for (const button of view.querySelectorAll(".run-toggle")) {
    button.addEventListener("click", () => {
      const run = button.closest("[data-run]");
      const entries = run.querySelector(".run-entries");
      entries.hidden = !entries.hidden;
      if (entries.hidden) openRuns.delete(run.dataset.run); else openRuns.add(run.dataset.run);
      button.setAttribute("aria-expanded", String(!entries.hidden));
      button.textContent = `${entries.hidden ? "▸" : "▾"} ${button.textContent.slice(2)}`;
    });
  }
  return terminal;
}

// The buttons: only the actions the saga's state accepts (the API's allowed_actions, which the
// engine's own rules produce), so a button is never one the server would refuse.
const BUTTONS = [
  ["retry", "Retry", ""],
  ["abort", "Abort (compensate now)", "secondary"],
  ["resolve", "Mark resolved", "secondary"],
];

function actions(s) {
  const allowed = new Set(s.allowed_actions || []);
  const buttons = BUTTONS.filter(([action]) => allowed.has(action)).map(([action, label, cls]) =>
    `<button id="${action}" data-action="${action}" class="${cls}">${label}</button>`).join("");
  return buttons || `<span class="muted">no operator action applies to a ${esc(s.status)} saga</span>`;
}

const HELP = {
  retry: "Runs the stuck step again with a fresh retry budget (a failed compensation, usually).",
  abort: "Stops the saga going forward and compensates the steps that ran, newest first.",
  resolve: "Records that you fixed the stuck step by hand; the saga carries on from there.",
};

function act(saga, action) {
  const dialog = document.getElementById("act");
  document.getElementById("act-title").textContent = `${action[0].toUpperCase()}${action.slice(1)} ${saga.name} ${saga.saga_id.slice(0, 8)}…`;
  document.getElementById("act-help").textContent = HELP[action];
  document.getElementById("act-reason").value = "";
  document.getElementById("act-data").value = "";
  document.getElementById("act-data-label").hidden = action !== "resolve";
  document.getElementById("act-error").hidden = true;
  dialog.dataset.action = action;
  dialog.dataset.saga = saga.saga_id;
  busy = true;
  dialog.showModal();
}

document.getElementById("act-form").addEventListener("submit", async (event) => {
  const dialog = document.getElementById("act");
  if (event.submitter && event.submitter.value === "cancel") { busy = false; return; }
  event.preventDefault();
  const error = document.getElementById("act-error");
  const body = { reason: document.getElementById("act-reason").value };
  const data = document.getElementById("act-data").value.trim();
  if (dialog.dataset.action === "resolve" && data) {
    try { body.data = JSON.parse(data); } catch (e) {
      error.hidden = false; error.textContent = `not JSON: ${e.message}`; return;
    }
  }
  try {
    await api(`sagas/${dialog.dataset.saga}/${dialog.dataset.action}`, {
      method: "POST",
      body: JSON.stringify(body),
      headers: { "X-Saga-Actor": localStorage.getItem("saga-actor") || "dashboard" },
    });
  } catch (e) {
    error.hidden = false;
    error.textContent = e.message;
    return;
  }
  dialog.close();
  busy = false;
  route();
});

// The definition's units (a step, or a parallel group's members) as columns, left to right.
function units(d) {
  const out = [];
  d.steps.forEach((st, i) => {
    const last = out[out.length - 1];
    if (st.group !== null && last && last.group === st.group) last.members.push([st, i]);
    else out.push({ group: st.group, members: [[st, i]] });
  });
  return out;
}

// A duration in seconds as people say it: "90 s", "10 min", "2 h".
function span(seconds) {
  const trim = (n) => String(Number(n.toFixed(1)));
  if (seconds < 120) return `${trim(seconds)} s`;
  if (seconds < 7200) return `${trim(seconds / 60)} min`;
  return `${trim(seconds / 3600)} h`;
}

const POLICY = {
  halt: "halt: a compensation that fails for good stops the compensation there",
  continue: "continue: the older steps are still compensated, and the saga ends FAILED naming every stuck one",
};
const CONDITIONAL = "runs only when its condition holds; skipped (nothing sent, nothing to undo) otherwise";

// The steps left to right; a parallel group is one column with its members one above the
// other, a fork before them and a join after; a conditional step has a dashed border and
// "if …". Below, each compensation, run newest first (right to left).
function diagram(d) {
  const w = 210, gap = 64, h = 46, vgap = 14, pad = 16, top = 30;
  const cols = units(d);
  const rows = Math.max(...cols.map((u) => u.members.length));
  const band = rows * h + (rows - 1) * vgap; // the height of the tallest column
  const cy = top + band / 2; // every column is centred on this line
  const compTop = top + band + 44;
  const height = compTop + band + 20;
  const width = pad * 2 + cols.length * w + (cols.length - 1) * gap;
  const parts = [];
  const ports = []; // per column: [in x, out x] on the line cy
  const compBoxes = []; // per column: the left and right x of its compensations, if any
  cols.forEach((u, c) => {
    const x = pad + c * (w + gap);
    const n = u.members.length;
    const y0 = cy - (n * h + (n - 1) * vgap) / 2;
    const grouped = u.group !== null;
    if (grouped) {
      parts.push(`<g data-group="${u.group}"><rect x="${x - 8}" y="${y0 - 22}" width="${w + 16}" height="${n * h + (n - 1) * vgap + 30}"
        rx="10" fill="none" stroke="#94a3b8" stroke-dasharray="2 3"/>
        <text x="${x - 2}" y="${y0 - 8}" fill="#475569">in parallel: ${n} steps, all must succeed</text>
        <circle data-fork cx="${x - 22}" cy="${cy}" r="5" fill="#1f7a3f"/><circle data-join cx="${x + w + 22}" cy="${cy}" r="5" fill="#1f7a3f"/></g>`);
      ports.push([x - 27, x + w + 27]);
    } else {
      ports.push([x - 4, x + w]);
    }
    let comps = 0;
    u.members.forEach(([st], m) => {
      const y = y0 + m * (h + vgap);
      const cond = st.conditional;
      parts.push(`<g data-step="${esc(st.name)}"${grouped ? ` data-member="${u.group}"` : ""}${cond ? ' data-conditional="true"' : ""}>
        ${cond ? `<title>${esc(st.name)} ${CONDITIONAL}</title>` : ""}<rect x="${x}" y="${y}" width="${w}" height="${h}" rx="8"
        fill="${st.pivot ? "#e0e7ff" : "#ecfdf3"}" stroke="${st.pivot ? "#4338ca" : "#1f7a3f"}"${cond ? ' stroke-dasharray="6 4" stroke-width="1.5"' : ""}/>
        <text x="${x + 10}" y="${y + 18}" font-weight="600">${esc(st.name)}${st.pivot ? " (pivot)" : ""}${cond ? '<tspan font-weight="400" fill="#7c3aed"> if …</tspan>' : ""}</text>
        <text x="${x + 10}" y="${y + 36}" fill="#555">${esc(st.action)} → ${esc(st.participant)}</text></g>`);
      if (grouped) {
        parts.push(`<line x1="${x - 22}" y1="${cy}" x2="${x - 4}" y2="${y + h / 2}" stroke="#1f7a3f" stroke-width="2" marker-end="url(#fwd)"/>
          <line x1="${x + w}" y1="${y + h / 2}" x2="${x + w + 22}" y2="${cy}" stroke="#1f7a3f" stroke-width="2"/>`);
      }
      const cy2 = compTop + comps * (h + vgap);
      if (st.compensated) {
        parts.push(`<g data-compensation="${esc(st.name)}"><rect x="${x}" y="${cy2}" width="${w}" height="${h}" rx="8"
          fill="#fff8f1" stroke="#b4530a" stroke-dasharray="5 3"/>
          <text x="${x + 10}" y="${cy2 + 18}" font-weight="600" fill="#b4530a">↩ ${esc(st.compensation)}</text>
          <text x="${x + 10}" y="${cy2 + 36}" fill="#555">undoes ${esc(st.name)}${cond ? " (if it ran)" : ""}</text></g>`);
        if (comps === 0) {
          parts.push(`<line x1="${x + w / 2}" y1="${y0 + n * h + (n - 1) * vgap + (grouped ? 8 : 0)}" x2="${x + w / 2}" y2="${compTop - 4}" stroke="#b4530a" stroke-dasharray="4 3"/>`);
        }
        comps += 1;
      } else if (!grouped || m === n - 1 && comps === 0) {
        parts.push(`<text x="${x + 10}" y="${compTop + 22}" fill="#888">${st.compensation ? "forward only" : "nothing to undo"}</text>`);
      }
    });
    compBoxes.push(comps ? [x, x + w] : null);
    if (c > 0) {
      parts.push(`<line x1="${ports[c - 1][1]}" y1="${cy}" x2="${ports[c][0]}" y2="${cy}" stroke="#1f7a3f" stroke-width="2" marker-end="url(#fwd)"/>`);
    }
  });
  // compensation order: right to left between the columns that have compensations
  const comp = compBoxes.filter(Boolean);
  for (let k = comp.length - 1; k > 0; k--) {
    parts.push(`<line x1="${comp[k][0]}" y1="${compTop + h / 2}" x2="${comp[k - 1][1] + 4}" y2="${compTop + h / 2}" stroke="#b4530a" stroke-width="2"
      stroke-dasharray="6 3" marker-end="url(#back)"/>`);
  }
  return `<div class="flow"><svg width="${width}" height="${height}" role="img" aria-label="${esc(d.name)} steps and compensations">
    <defs><marker id="fwd" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#1f7a3f"/></marker>
    <marker id="back" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#b4530a"/></marker></defs>
    ${parts.join("")}</svg></div>`;
}

// How a step runs, for the definition's table: in which parallel group, on which condition.
function runs(st, groups) {
  const said = [];
  if (st.group !== null) said.push(`in parallel (group ${groups.indexOf(st.group) + 1})`);
  if (st.conditional) said.push("if …");
  return said.join(", ") || "in order";
}

async function definitions(mine) {
  const defs = await api("definitions");
  if (mine !== routing) return false; // a later route() owns the view now
  view.innerHTML = `<h1>Definitions</h1>
    <p class="legend"><span style="color: var(--ok)">→ actions, in order; a fork and a join around steps run in parallel</span>
    <span style="color: #7c3aed">dashed, "if …": runs only when its condition holds</span>
    <span style="color: var(--comp)">↩ compensations, run newest first when a step fails</span></p>
    ${defs.map((d) => {
      const groups = [...new Set(d.steps.map((st) => st.group).filter((g) => g !== null))];
      return `<section data-definition="${esc(d.name)}"><h2>${esc(d.name)} v${d.version}</h2>
      <dl class="kv def-facts">
        <dt>deadline</dt><dd data-fact="deadline">${d.deadline_s === null ? "none: the saga runs as long as its steps take"
          : `${span(d.deadline_s)} from the start; past it, the saga compensates`}</dd>
        <dt>if a compensation fails</dt><dd data-fact="policy">${esc(POLICY[d.on_compensation_failure] || d.on_compensation_failure)}</dd>
      </dl>
      ${diagram(d)}
      <table><thead><tr><th>step</th><th>runs</th><th>participant</th><th>action</th><th>compensation</th><th>timeout</th><th>retries</th></tr></thead>
      <tbody>${d.steps.map((st) => `<tr data-step-def="${esc(st.name)}"><td>${esc(st.name)}</td>
      <td${st.conditional ? ` title="${CONDITIONAL}"` : ""}>${esc(runs(st, groups))}</td><td>${esc(st.participant)}</td><td>${esc(st.action)}</td>
      <td>${esc(st.compensation || "—")}</td><td>${st.timeout_s} s</td><td>${st.retry.max_attempts ?? "∞"}</td></tr>`).join("")}</tbody></table>
    </section>`;
    }).join("")}`;
}

// A readable line for a message's payload schema: the envelope, then what each part adds
// (a $ref'd model, the alternatives of an anyOf/oneOf, a part that applies only on a condition).
function schemaText(p, ref) {
  if (!p || typeof p !== "object") return "";
  if (p.$ref) return ref(p.$ref);
  if (p.type === "null") return "null";
  const parts = [];
  if (p.allOf) parts.push(...p.allOf.map((q) => schemaText(q, ref)));
  const alternatives = p.anyOf || p.oneOf;
  if (alternatives) {
    const texts = alternatives.map((q) => schemaText(q, ref)).filter(Boolean);
    parts.push(texts.length > 1 ? `one of (${texts.join(" | ")})` : texts.join(""));
  }
  if (p.properties) {
    parts.push(Object.entries(p.properties).map(([k, v]) => {
      const text = v.const === undefined ? schemaText(v, ref) : "";
      return text ? `${k}: ${text}` : "";
    }).filter(Boolean).join(", "));
  }
  if (p.if && p.then) {
    const when = Object.entries(p.if.properties || {}).map(([k, v]) =>
      v.const === undefined ? k : `${k} is ${JSON.stringify(v.const)}`).join(" and ");
    const then = schemaText(p.then, ref);
    if (then) parts.push(when ? `${then} when ${when}` : then);
  }
  return parts.filter(Boolean).join(" + ");
}

async function contracts(mine) {
  const doc = await api("asyncapi.json");
  const messages = doc.components.messages;
  const ref = (r) => r.split("/").pop();
  const channels = Object.entries(doc.channels).map(([id, ch]) => `
    <section data-channel="${esc(id)}"><h2>${esc(ch.title || id)} <span class="mono muted">${esc(ch.address)}</span></h2>
    <p class="muted">${esc(ch.description || "")}</p>
    <table><thead><tr><th>message (AMQP type)</th><th>summary</th><th>payload</th></tr></thead><tbody>
    ${Object.values(ch.messages).map((m) => { const msg = messages[ref(m.$ref)]; return `<tr data-message="${esc(msg.name)}">
      <td class="mono">${esc(msg.name)}</td><td>${esc(msg.summary || "")}</td>
      <td class="mono payload">${esc(schemaText(msg.payload, ref))}</td>
    </tr>`; }).join("")}</tbody></table></section>`).join("");
  if (mine !== routing) return false; // a later route() owns the view now
  view.innerHTML = `<h1>Contracts <span class="muted">AsyncAPI ${esc(doc.asyncapi)}</span></h1>
    <p>${esc(doc.info.description).replaceAll("\n\n", "<br><br>")}</p>
    <p><a id="asyncapi-download" href="#" download="asyncapi.json">Download asyncapi.json</a>
    · JSON Schemas: <span class="mono">saga schema export DIR</span></p>${channels}`;
  document.getElementById("asyncapi-download").href =
    URL.createObjectURL(new Blob([JSON.stringify(doc, null, 2)], { type: "application/json" }));
}

// --- routing and live refresh --------------------------------------------------------------

// The connection marker: live, or (when the server does not answer or fails) the last data
// kept on screen marked stale while the page keeps trying, and live again once it answers.
function connection(state, why) {
  const live = document.getElementById("live");
  live.dataset.state = state;
  live.textContent = { live: "● live", disconnected: "● disconnected", error: "● server error" }[state];
  live.title = why || "refreshes every 2 seconds";
  if (state === "live") view.removeAttribute("data-stale");
  else view.dataset.stale = "true";
}

let shown = false; // the view holds data of the current page (kept, stale, while disconnected)

async function route(event) {
  clearTimeout(timer);
  const mine = ++routing;
  if (event && event.type === "hashchange") shown = false;
  const hash = window.location.hash || "#/";
  const path = hash.slice(1).split("?")[0];
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("active", hash.startsWith(a.getAttribute("href")) && a.getAttribute("href") !== "#/" || (path === "/" && a.dataset.nav === "overview"));
  }
  document.getElementById("logout").hidden = !sessionStorage.getItem("saga-token");
  let again = true;
  let state = "live";
  try {
    const typing = view.contains(document.activeElement) && document.activeElement.matches("input, select, textarea");
    if (busy || typing) { /* a dialog is open, or someone is typing a filter */ }
    else if (path === "/" || path === "") await overview(mine);
    else if (path === "/sagas") again = await sagas(mine);
    else if (path.startsWith("/saga/")) again = !(await detail(decodeURIComponent(path.slice(6)), mine));
    else if (path === "/definitions") { await definitions(mine); again = false; }
    else if (path === "/contracts") { await contracts(mine); again = false; }
    else if (window.sagaPages && window.sagaPages[path]) again = (await window.sagaPages[path](mine)) !== false;
    else view.innerHTML = '<p class="error">No such page.</p>';
    if (mine !== routing) return;
    if (!busy && !typing) shown = true;
    connection("live");
  } catch (e) {
    if (mine !== routing) return;
    if (e.status === 404) { view.innerHTML = `<p class="error" id="not-found">${esc(e.message)}</p>`; again = false; }
    else if (e.status === 401 || e.status === 403) { /* the sign-in dialog asks again */ }
    else {
      // the server is down or failing: keep what is shown, marked stale, and try again
      state = e.status === 0 ? "disconnected" : "error";
      connection(state, e.message);
      if (!shown) view.innerHTML = `<p class="error" id="unreachable">${esc(e.message)}; trying again every 2 s</p>`;
    }
  }
  if (mine !== routing) return;
  document.getElementById("live").hidden = !again && state === "live";
  if (again || state !== "live") timer = setTimeout(route, 2000);
}

for (const dialog of document.querySelectorAll("dialog")) {
  dialog.addEventListener("close", () => { busy = false; });
}
window.addEventListener("hashchange", route);
route();
