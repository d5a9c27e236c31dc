// The "Dead letters" page: what the deployment's dead-letter queues hold, and replaying or
// discarding a message behind a confirmation with a reason. Kept apart from app.js: it
// registers its page in window.sagaPages, and uses app.js's api() and esc() when it runs.
// Reading the queues holds them for a moment, so the page does not refresh by itself.
"use strict";

(() => {
  const filters = ["queue", "reason", "saga_id", "since"];
  let last = null; // the page's answer, for the dialog's title
  let note = ""; // what the last action did, shown above the list
  let opened = null; // the id of the message shown below the list, kept open across refreshes

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "?";
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
      if (seconds >= size) return `${Math.round(seconds / size)}${unit}`;
    }
    return `${Math.round(seconds)}s`;
  }

  function query() {
    return new URLSearchParams(window.location.hash.split("?")[1] || "");
  }

  async function page() {
    const q = query();
    const params = new URLSearchParams();
    for (const k of filters) if (q.get(k)) params.set(k, q.get(k));
    const since = params.get("since");
    if (since && /^\d+[smhd]$/.test(since)) {
      const unit = { s: 1, m: 60, h: 3600, d: 86400 }[since.slice(-1)];
      params.set("since", new Date(Date.now() - Number(since.slice(0, -1)) * unit * 1000).toISOString());
    }
    last = await api(`dead-letters?${params}`);
    const queues = last.queues.map((x) => `<tr data-dlq="${esc(x.dead_letter_queue)}">
      <td class="mono">${esc(x.dead_letter_queue)}</td><td class="mono">${esc(x.queue)}</td>
      <td>${x.error ? `<span class="error">${esc(x.error)}</span>` : x.depth}</td></tr>`).join("");
    const rows = last.items.map((d) => `<tr data-dead-letter="${esc(d.id)}" data-reason="${esc(d.reason)}">
      <td class="mono" title="${esc(d.id)}">${esc(d.id.length > 14 ? `${d.id.slice(0, 13)}…` : d.id)}</td>
      <td class="mono">${esc(d.queue)}</td><td><strong>${esc(d.reason)}</strong></td>
      <td>${esc(d.detail)}</td>
      <td class="mono">${d.saga_id ? `<a href="#/saga/${esc(d.saga_id)}">${esc(d.saga_id.slice(0, 8))}…</a>` : "—"}</td>
      <td>${age(d.age_s)}</td><td>${d.replays}${d.copies > 1 ? ` (${d.copies} copies)` : ""}</td>
      <td class="dlq-buttons"><button class="secondary" data-dlq-show>Show</button>
        <button data-dlq-act="replay">Replay</button>
        <button class="secondary" data-dlq-act="discard">Discard</button></td></tr>`).join("");
    const options = last.queues.map((x) => `<option value="${esc(x.queue)}" ${q.get("queue") === x.queue ? "selected" : ""}>${esc(x.queue)}</option>`).join("");
    view.innerHTML = `
      <h1>Dead letters</h1>
      <p class="muted">Messages that could not be applied, with why. They stay in their queues, in
        order, until replayed to the queue they came from or discarded.</p>
      ${note ? `<p id="dlq-result" class="dlq-note">${esc(note)}</p>` : ""}
      <form class="filters" id="dlq-filters">
        <label>queue <select name="queue"><option value="">any</option>${options}</select></label>
        <label>reason <input name="reason" value="${esc(q.get("reason") || "")}" placeholder="invalid_json" size="14"></label>
        <label>saga <input name="saga_id" value="${esc(q.get("saga_id") || "")}" placeholder="saga id" size="14"></label>
        <label>since <input name="since" value="${esc(q.get("since") || "")}" placeholder="1h or ISO" size="10"></label>
        <button>Filter</button> <button type="button" class="secondary" id="dlq-refresh">Refresh</button>
      </form>
      <table id="dlq-list"><thead><tr><th>id</th><th>queue</th><th>reason</th><th>detail</th><th>saga</th>
        <th>age</th><th>replays</th><th></th></tr></thead>
        <tbody>${rows || '<tr><td colspan="8" class="muted">no dead letters</td></tr>'}</tbody></table>
      ${last.truncated ? '<p class="muted" id="dlq-more">More match: narrow the filters.</p>' : ""}
      <div id="dlq-detail"></div>
      <h2>Dead-letter queues</h2>
      <table id="dlq-queues"><thead><tr><th>dead-letter queue</th><th>holds the rejects of</th><th>messages</th></tr></thead>
        <tbody>${queues}</tbody></table>`;
    document.getElementById("dlq-filters").addEventListener("submit", (event) => {
      event.preventDefault();
      const form = new FormData(event.target);
      const next = new URLSearchParams();
      for (const [k, v] of form.entries()) if (v) next.set(k, v);
      note = "";
      window.location.hash = `#/dead-letters?${next}`;
    });
    document.getElementById("dlq-refresh").addEventListener("click", () => { note = ""; route(); });
    for (const row of view.querySelectorAll("tr[data-dead-letter]")) {
      const letter = last.items.find((d) => d.id === row.dataset.deadLetter);
      row.querySelector("[data-dlq-show]").addEventListener("click", () => show(letter));
      for (const button of row.querySelectorAll("[data-dlq-act]")) {
        button.addEventListener("click", () => confirmAction(letter, button.dataset.dlqAct));
      }
    }
    // a refresh that lands after a click on Show keeps that message open
    const open = opened && last.items.find((d) => d.id === opened);
    if (open) await show(open);
    return false; // no automatic refresh: each read holds the queues for a moment
  }

  function path(letter) {
    return `dead-letters/${encodeURIComponent(letter.dead_letter_queue)}/${encodeURIComponent(letter.id)}`;
  }

  async function show(letter) {
    opened = letter.id;
    const box = document.getElementById("dlq-detail");
    try {
      const d = await api(path(letter));
      const headers = Object.entries(d.headers).map(([k, v]) =>
        `<dt class="mono">${esc(k)}</dt><dd class="mono">${esc(typeof v === "string" ? v : JSON.stringify(v))}</dd>`).join("");
      box.innerHTML = `<h2>Message <span class="mono">${esc(d.id)}</span></h2>
        <dl class="kv"><dt>queue</dt><dd class="mono">${esc(d.queue)}</dd><dt>reason</dt><dd>${esc(d.reason)}</dd>
        <dt>detail</dt><dd>${esc(d.detail)}</dd><dt>type</dt><dd>${esc(d.message_type || "—")}</dd>
        <dt>size</dt><dd>${d.size} bytes</dd>${headers}</dl>
        <h2>Body <span class="muted">(${esc(d.body_format)}${d.body_truncated ? ", first 64 KiB" : ""})</span></h2>
        <pre id="dlq-body">${esc(d.body)}</pre>`;
    } catch (e) {
      box.innerHTML = `<p class="error">${esc(e.message)}</p>`;
    }
  }

  const HELP = {
    replay: "Sends it back to the queue it came from (confirmed), then removes it here. "
      + "Receivers skip what they applied already; if its cause is not fixed, it comes back.",
    discard: "Removes it for good. Nothing is sent anywhere.",
  };

  function dialog() {
    let d = document.getElementById("dlq-act");
    if (d) return d;
    d = document.createElement("dialog");
    d.id = "dlq-act";
    d.innerHTML = `<form method="dialog" id="dlq-act-form">
      <h2 id="dlq-act-title">Dead letter</h2><p id="dlq-act-help" class="muted"></p>
      <label>Reason (goes into the audit log) <textarea id="dlq-act-reason" rows="3" required></textarea></label>
      <p id="dlq-act-error" class="error" hidden></p>
      <menu><button value="cancel" formnovalidate>Cancel</button>
        <button id="dlq-act-submit" value="ok">Confirm</button></menu></form>`;
    document.body.appendChild(d);
    d.addEventListener("close", () => { busy = false; });
    d.querySelector("form").addEventListener("submit", submit);
    return d;
  }

  function confirmAction(letter, action) {
    const d = dialog();
    d.querySelector("#dlq-act-title").textContent =
      `${action === "replay" ? "Replay" : "Discard"} ${letter.reason} from ${letter.queue}`;
    d.querySelector("#dlq-act-help").textContent = HELP[action];
    d.querySelector("#dlq-act-reason").value = "";
    d.querySelector("#dlq-act-error").hidden = true;
    d.dataset.action = action;
    d.dataset.path = path(letter);
    busy = true;
    d.showModal();
  }

  async function submit(event) {
    const d = dialog();
    if (event.submitter && event.submitter.value === "cancel") { busy = false; return; }
    event.preventDefault();
    const error = d.querySelector("#dlq-act-error");
    try {
      const result = await api(`${d.dataset.path}/${d.dataset.action}`, {
        method: "POST",
        body: JSON.stringify({ reason: d.querySelector("#dlq-act-reason").value }),
        headers: { "X-Saga-Actor": localStorage.getItem("saga-actor") || "dashboard" },
      });
      note = result.messages.map((m) => `${m.outcome} ${m.id}${m.why ? `: ${m.why}` : ""}`).join("; ")
        + ` (by ${result.actor})`;
    } catch (e) {
      error.hidden = false;
      error.textContent = e.message;
      return;
    }
    d.close();
    busy = false;
    route();
  }

  window.sagaPages = { ...(window.sagaPages || {}), "/dead-letters": page };
})();
