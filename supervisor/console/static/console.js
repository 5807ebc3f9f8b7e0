// agent-supervisor web console. Plain DOM, no framework; every text goes in through
// textContent, never as HTML. Every action is a same-origin JSON POST that the console
// forwards to the daemon's control socket as the operator who started it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { agents: [], approvals: [], audit: [], classFilter: "", dialog: null };

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function iso(ts) {
  if (!ts) return "-";
  return new Date(ts * 1000).toISOString().replace(/\.\d+Z$/, "Z");
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function seconds(s) {
  s = Math.max(0, Math.round(s));
  return s < 120 ? s + "s" : Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
}

function badge(value) {
  return el("span", { class: "badge state-" + value, text: value });
}

function showError(err, where) {
  const box = where || $("error");
  box.hidden = false;
  if (box === $("error")) {
    $("error-code").textContent = err.code || "error";
    $("error-message").textContent = err.message || "";
    $("error-hint").textContent = err.detail && err.detail.hint ? "hint: " + err.detail.hint : "";
  } else {
    box.replaceChildren(el("strong", { text: err.code || "error" }), " " + (err.message || ""),
      err.detail && err.detail.hint ? el("div", { class: "hint", text: "hint: " + err.detail.hint }) : "");
  }
}

async function call(method, path, body) {
  const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw { code: "console_unreachable", message: String(e),
            detail: { hint: "is agentctl console still running?" } };
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    throw (data && data.error) || { code: "http_" + response.status, message: response.statusText };
  }
  return data;
}

async function act(verb, scope, extra, errorBox) {
  try {
    const result = await call("POST", "/api/actions/" + verb, { scope, ...(extra || {}) });
    const failed = (result.results || []).filter((r) => r.error);
    if (failed.length) showError(failed[0].error, errorBox);
    return result;
  } catch (err) {
    showError(err, errorBox);
    throw err;
  }
}

// Agents -----------------------------------------------------------------------------------

function agentActions(agent) {
  const name = agent.name;
  const scope = { agent: name };
  const cell = el("td", { class: "actions" });
  if (agent.state === "active") {
    cell.append(el("button", { id: "pause-" + name, text: "Pause",
      onclick: () => act("pause", scope, { reason: "paused from the console" }).catch(() => {}) }));
  }
  if (agent.state === "paused") {
    cell.append(el("button", { id: "resume-" + name, text: "Resume",
      onclick: () => act("resume", scope, { reason: "resumed from the console" }).catch(() => {}) }));
  }
  if (agent.state !== "killed") {
    cell.append(" ", el("button", { id: "kill-" + name, class: "danger", text: "Kill…",
      onclick: () => openDialog({ verb: "kill", kind: "agent", target: name }) }));
  } else {
    cell.append(el("button", { id: "reactivate-" + name, text: "Reactivate…",
      onclick: () => openDialog({ verb: "reactivate", kind: "agent", target: name }) }));
  }
  return cell;
}

function renderAgents() {
  const classes = [...new Set(state.agents.map((a) => a.class))].sort();
  const select = $("class-filter");
  const current = select.value;
  // Rebuilt only when the classes change, so an open list is not pulled from under the user.
  if (select.dataset.classes !== classes.join(",")) {
    select.dataset.classes = classes.join(",");
    select.replaceChildren(el("option", { value: "", text: "all classes" }),
      ...classes.map((c) => el("option", { value: c, text: c })));
    select.value = classes.includes(current) ? current : "";
  }
  state.classFilter = select.value;
  for (const id of ["class-pause", "class-resume", "class-kill"]) $(id).disabled = !state.classFilter;
  // Rows are updated in place, keyed by name, so a button never vanishes under a click
  // because a new CPU figure arrived; only a changed state rebuilds a row's buttons.
  const body = $("agents").tBodies[0];
  const wanted = state.agents.filter((a) => !state.classFilter || a.class === state.classFilter);
  const keep = new Set(wanted.map((a) => "agent-" + a.name));
  for (const row of [...body.rows]) if (!keep.has(row.id)) row.remove();
  let previous = null;
  for (const a of wanted) {
    let row = $("agent-" + a.name);
    if (!row) {
      row = el("tr", { id: "agent-" + a.name },
        el("td", { class: "name", text: a.name }), el("td", { class: "class" }),
        el("td", { class: "state" }), el("td", { class: "num cpu" }), el("td", { class: "num mem" }),
        el("td", { class: "num procs" }), el("td", { class: "muted run" }),
        el("td", { class: "reason" }), el("td", { class: "actions" }));
    }
    const stats = a.stats || {};
    const cells = row.cells;
    cells[1].textContent = a.class;
    cells[3].textContent = a.cpu_percent === null || a.cpu_percent === undefined ? "-" : a.cpu_percent.toFixed(1) + "%";
    cells[4].textContent = bytes(stats.memory_bytes);
    cells[5].textContent = stats.processes === null || stats.processes === undefined ? "-" : String(stats.processes);
    cells[6].textContent = a.run ? a.run.id : "-";
    cells[7].textContent = a.last_reason || "";
    if (row.dataset.state !== a.state) {
      row.dataset.state = a.state;
      cells[2].replaceChildren(badge(a.state));
      row.replaceChild(agentActions(a), cells[8]);
    }
    const after = previous ? previous.nextSibling : body.firstChild;
    if (after !== row) body.insertBefore(row, after);
    previous = row;
  }
  $("agents-empty").hidden = state.agents.length > 0;
}

// The confirmation dialog: the operator types the name of what they act on, and a reason.

function openDialog(spec) {
  state.dialog = spec;
  const { verb, kind, target } = spec;
  const wide = kind === "class";
  const needsName = verb === "kill" || wide;
  const needsReason = verb === "kill" || wide;
  $("confirm-title").textContent =
    verb.charAt(0).toUpperCase() + verb.slice(1) + " " + kind + " " + target;
  $("confirm-text").textContent = {
    kill: wide ? "Every agent of class " + target + " is killed at once: its processes are SIGKILLed, its network and credentials revoked. The agents stay held until an owner reactivates them."
               : "Agent " + target + " is killed: its processes are SIGKILLed, its network and credentials revoked. It stays held until an owner reactivates it.",
    pause: "Every agent of class " + target + " is frozen and its network link set down.",
    resume: "Every paused agent of class " + target + " is thawed.",
    reactivate: "Lift the kill hold on " + target + " so it may run again.",
  }[verb];
  $("confirm-name").textContent = target;
  $("confirm-name-label").hidden = !needsName;
  $("confirm-input").value = "";
  $("confirm-reason").value = "";
  $("confirm-reason").required = needsReason;
  $("confirm-error").hidden = true;
  $("confirm-go").textContent = verb.charAt(0).toUpperCase() + verb.slice(1) + " " + target;
  $("confirm-go").className = verb === "kill" ? "danger" : "";
  checkDialog();
  $("confirm").showModal();
  (needsName ? $("confirm-input") : $("confirm-reason")).focus();
}

function checkDialog() {
  const spec = state.dialog;
  if (!spec) return;
  const wide = spec.kind === "class";
  const nameOk = !(spec.verb === "kill" || wide) || $("confirm-input").value === spec.target;
  const reasonOk = !$("confirm-reason").required || $("confirm-reason").value.trim() !== "";
  $("confirm-go").disabled = !(nameOk && reasonOk);
}

async function confirmDialog() {
  const spec = state.dialog;
  const scope = spec.kind === "class" ? { class: spec.target } : { agent: spec.target };
  $("confirm-go").disabled = true;
  try {
    const result = await act(spec.verb, scope, { reason: $("confirm-reason").value,
      confirm: $("confirm-input").value }, $("confirm-error"));
    if (!(result.results || []).some((r) => r.error)) {
      $("confirm").close();
      state.dialog = null;
    }
  } catch (err) {
    checkDialog();
  }
}

// Approvals --------------------------------------------------------------------------------

function renderApprovals() {
  const now = Date.now() / 1000;
  const rows = state.approvals.map((a) => {
    const reason = el("input", { class: "reason-input", id: "approval-reason-" + a.id,
                                 placeholder: "reason (needed to deny)", maxlength: "500" });
    const decide = (decision) => call("POST", "/api/approvals/" + encodeURIComponent(a.id) + "/" + decision,
      { reason: reason.value }).catch((err) => showError(err));
    return el("tr", { id: "approval-" + a.id },
      el("td", { text: a.agent }),
      el("td", {}, el("code", { text: a.method + " " + a.host + a.path })),
      el("td", { text: a.rule }),
      el("td", { class: "num waiting", "data-since": a.requested_at, text: seconds(now - a.requested_at) }),
      el("td", { class: "num expires", "data-until": a.expires_at, text: seconds(a.expires_at - now) }),
      el("td", {}, reason),
      el("td", {},
        el("button", { id: "approve-" + a.id, text: "Approve", onclick: () => decide("approve") }), " ",
        el("button", { id: "deny-" + a.id, class: "danger", text: "Deny", onclick: () => decide("deny") })));
  });
  // Keep what the operator is typing: rebuild only when the set of requests changed.
  const ids = state.approvals.map((a) => a.id).join(",");
  if ($("approvals").dataset.ids !== ids) {
    $("approvals").tBodies[0].replaceChildren(...rows);
    $("approvals").dataset.ids = ids;
  }
  $("approvals-empty").hidden = state.approvals.length > 0;
  $("approvals-count").textContent = state.approvals.length ? String(state.approvals.length) : "";
}

function tickApprovals() {
  const now = Date.now() / 1000;
  for (const cell of document.querySelectorAll("#approvals td.waiting")) cell.textContent = seconds(now - Number(cell.dataset.since));
  for (const cell of document.querySelectorAll("#approvals td.expires")) cell.textContent = seconds(Number(cell.dataset.until) - now);
}

// Audit ------------------------------------------------------------------------------------

const AUDIT_ROWS = 200;

function auditRow(e) {
  const change = e.previous_state || e.new_state ? (e.previous_state || "-") + " → " + (e.new_state || "-") : "";
  return el("tr", { id: "audit-" + e.seq, "data-verb": e.verb },
    el("td", { class: "num", text: String(e.seq) }),
    el("td", { text: iso(e.ts) }),
    el("td", { class: "actor", text: e.actor }),
    el("td", { text: e.verb }),
    el("td", { text: e.target || e.scope }),
    el("td", { text: change }),
    el("td", { class: "outcome", text: e.outcome }),
    el("td", { class: "reason", text: e.reason }));
}

function onAudit(data) {
  if (data.error) showError(data.error, $("audit-error"));
  else $("audit-error").hidden = true;
  const body = $("audit").tBodies[0];
  if (data.reset) body.replaceChildren();
  for (const entry of data.entries) body.prepend(auditRow(entry));
  while (body.rows.length > AUDIT_ROWS) body.deleteRow(-1);
}

async function verify() {
  const out = $("verify-result");
  out.className = "";
  out.textContent = "verifying…";
  try {
    const r = await call("GET", "/api/audit/verify");
    out.className = r.ok ? "verify-ok" : "verify-bad";
    out.textContent = r.ok
      ? "✓ chain intact: " + r.rows + " rows, head #" + r.head_seq + (r.checkpoints ? ", " + r.checkpoints + " signed checkpoints" : "")
      : "✗ tampering found at #" + r.first_bad_seq + ": " + r.problem;
  } catch (err) {
    out.textContent = "";
    showError(err);
  }
}

// Drills -----------------------------------------------------------------------------------

function drillRow(d) {
  const checks = Object.entries(d.checks || {}).map(([k, v]) => k + ": " + v).join("; ");
  return el("tr", { id: "drill-" + d.id },
    el("td", { text: d.id }),
    el("td", { text: iso(d.ts) }),
    el("td", { text: d.actor }),
    el("td", {}, badge(d.passed ? "ok" : "failed")),
    el("td", { class: "num", text: d.time_to_halt_ms === null ? "-" : d.time_to_halt_ms.toFixed(1) + " ms" }),
    el("td", { class: "reason", text: (d.error ? d.error + "; " : "") + checks }));
}

async function loadDrills() {
  try {
    const r = await call("GET", "/api/drills");
    $("drills").tBodies[0].replaceChildren(...r.drills.map(drillRow));
  } catch (err) {
    showError(err);
  }
}

async function runDrill() {
  $("drill-run").disabled = true;
  $("drill-status").textContent = "drill running…";
  try {
    const d = await call("POST", "/api/drills", { processes: Number($("drill-processes").value) });
    $("drill-status").textContent = (d.passed ? "passed" : "FAILED") + ": time to halt " +
      (d.time_to_halt_ms === null ? "-" : d.time_to_halt_ms.toFixed(1) + " ms");
    await loadDrills();
  } catch (err) {
    $("drill-status").textContent = "";
    showError(err);
  } finally {
    $("drill-run").disabled = false;
  }
}

// Fleet ------------------------------------------------------------------------------------

function onFleet(data) {
  if (data.error) showError(data.error, $("fleet-error"));
  else $("fleet-error").hidden = true;
  const rows = data.hosts.map((h) => el("tr", { id: "host-" + h.host },
    el("td", { class: "name", text: h.host }),
    el("td", {}, badge(h.alive ? "alive" : "down"), h.held ? " " : "", h.held ? badge("held") : ""),
    el("td", { text: h.version || "-" }),
    el("td", { text: Object.entries(h.labels || {}).map(([k, v]) => k + "=" + v).join(", ") }),
    el("td", { class: "num", text: h.updated_s_ago === null || h.updated_s_ago === undefined ? "-" : seconds(h.updated_s_ago) + " ago" }),
    el("td", {}, ...(h.agents || []).map((a) => el("span", { class: "fleet-agent", "data-agent": a.name },
      a.name + " ", badge(a.state))))));
  $("fleet").tBodies[0].replaceChildren(...rows);
  $("fleet-holds").replaceChildren(...(data.holds.length ? data.holds.map((h) =>
    el("li", { text: h.id + ": " + h.verb + " by " + h.operator + ": " + h.reason })) :
    [el("li", { class: "muted", text: "none" })]));
}

// Wiring -----------------------------------------------------------------------------------

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== "view-" + name;
  if (name === "drills") loadDrills();
}

function connect() {
  const source = new EventSource("/api/events");
  source.onopen = () => { $("link").className = "link up"; $("link").textContent = "live"; };
  source.onerror = () => { $("link").className = "link down"; $("link").textContent = "reconnecting"; };
  source.addEventListener("agents", (ev) => {
    const data = JSON.parse(ev.data);
    if (data.error) showError(data.error);
    state.agents = data.agents;
    renderAgents();
  });
  source.addEventListener("approvals", (ev) => {
    const data = JSON.parse(ev.data);
    state.approvals = data.approvals;
    renderApprovals();
  });
  source.addEventListener("audit", (ev) => onAudit(JSON.parse(ev.data)));
  source.addEventListener("fleet", (ev) => onFleet(JSON.parse(ev.data)));
  source.addEventListener("health", (ev) => {
    const h = JSON.parse(ev.data);
    $("daemon").textContent = h.error ? "daemon: " + h.error.code
      : "daemon " + h.version + " · " + h.status + " · " + h.agents + " agents, " + h.active_runs + " running";
    $("global-halt").hidden = !h.global_halt;
  });
}

document.addEventListener("DOMContentLoaded", async () => {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  $("error-close").addEventListener("click", () => { $("error").hidden = true; });
  $("class-filter").addEventListener("change", () => renderAgents());
  $("class-pause").addEventListener("click", () => openDialog({ verb: "pause", kind: "class", target: state.classFilter }));
  $("class-resume").addEventListener("click", () => openDialog({ verb: "resume", kind: "class", target: state.classFilter }));
  $("class-kill").addEventListener("click", () => openDialog({ verb: "kill", kind: "class", target: state.classFilter }));
  $("confirm-input").addEventListener("input", checkDialog);
  $("confirm-reason").addEventListener("input", checkDialog);
  $("confirm-cancel").addEventListener("click", () => { $("confirm").close(); state.dialog = null; });
  $("confirm-go").addEventListener("click", confirmDialog);
  $("verify").addEventListener("click", verify);
  $("drill-run").addEventListener("click", runDrill);
  setInterval(tickApprovals, 1000);
  try {
    const s = await call("GET", "/api/session");
    $("operator").textContent = "acting as " + s.operator.user + " (uid " + s.operator.uid + ")";
    $("tab-fleet").hidden = !s.fleet;
  } catch (err) {
    showError(err);
  }
  connect();
});
