// The Grapevine dashboard: one peer's view of the network, read from its API (docs/http-api.md)
// with the session cookie the login link set. Invariants:
// - Live without reloads: two server-sent-event streams (/v1/events, /v1/tasks/watch) push
//   member and task notes; numbers that have no stream (members' load, totals, agents) are
//   polled every few seconds, and an event makes the parts it touches refresh at once.
// - Read-only: the page sends GET requests only (the cookie authorizes nothing else).
// - Everything from the API is put into the page as text (textContent), never as markup.
// - Histories (trends, plots) live in this page only and start when it opens.
"use strict";

const POLL_MS = 2000;
const TASK_POLL_MS = 5000;
const HISTORY_MS = 10 * 60 * 1000;
const RATE_WINDOW_MS = 30 * 1000;
const FEED_MAX = 60;
const RESULTS_KEPT = 5000;
const STATS = ["tasks", "running", "done", "failed", "duplicates", "takeovers", "fenced"];

const state = {
  self: null,
  members: [],
  stats: [], // [{t, totals}]
  spend: [], // [{t, cost: {model: dollars}}], this peer's model calls
  networkSpend: [], // [[t, dollars]], summed over the alive members' peer states
  networkModels: [], // [{t, cost: {model: dollars}}], the same by model (up to 8 per member)
  resultAt: new Map(), // task id -> unix s when its result was accepted here
  created: new Map(), // task id -> unix s of its creation
  roles: new Set(),
  detail: null,
  signedOut: false,
};

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "onclick") node.addEventListener("click", value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function short(id) { return id ? id.slice(0, 10) : "–"; }
function peerName(id) {
  if (!id) return "–";
  return state.self && id === state.self.id ? `${short(id)} (here)` : short(id);
}
function clock(unix) { return new Date(unix * 1000).toLocaleTimeString(); }
function seconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  return s < 10 ? `${s.toFixed(2)} s` : s < 120 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`;
}
function dollars(micro) { return `$${(micro / 1e6).toFixed(micro >= 1e6 ? 2 : 4)}`; }
function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 3 ? "now" : `${seconds(s)} ago`;
}

class SignedOut extends Error {}

async function api(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
  if (response.status === 401) throw new SignedOut(path);
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

function failed(error) {
  if (error instanceof SignedOut) {
    state.signedOut = true;
    setLive(false, "signed out");
    showBanner("This page is no longer signed in to the peer: open the login link again.");
  } else {
    showBanner(`The peer did not answer: ${error.message}. Retrying…`);
  }
}

function setLive(on, text) {
  const badge = $("live");
  badge.textContent = text;
  badge.className = `badge ${on ? "on" : "off"}`;
}

// ---- repeated work -------------------------------------------------------------------------

function every(ms, job) {
  let timer = null;
  let running = false;
  async function run() {
    clearTimeout(timer);
    if (state.signedOut) return;
    if (running) { timer = setTimeout(run, 200); return; }
    running = true;
    try {
      await job();
      if (!state.signedOut) showBanner("");
    } catch (error) {
      failed(error);
    } finally {
      running = false;
      if (!state.signedOut) timer = setTimeout(run, ms);
    }
  }
  let soon = null;
  run.soon = () => { clearTimeout(soon); soon = setTimeout(run, 250); };
  return run;
}

// ---- fleet ---------------------------------------------------------------------------------

async function loadMembers() {
  const { members } = await api("/v1/members");
  for (const m of members) {
    for (const role of m.roles) state.roles.add(role);
  }
  state.members = members;
  const now = Date.now();
  const alive = members.filter((m) => m.status === "alive");
  state.networkSpend.push([now, alive.reduce((sum, m) => sum + (m.spend_micro || 0), 0) / 1e6]);
  trim(state.networkSpend, now);
  const byModel = {};
  for (const m of alive) {
    for (const u of m.models || []) byModel[u.model] = (byModel[u.model] || 0) + u.spend_micro / 1e6;
  }
  state.networkModels.push({ t: now, cost: byModel });
  trim(state.networkModels, now);
  showTotals(now, networkTotals(members));
  renderFleet();
  renderFilters();
  drawSpend();
}

// One table cell; its content is one element, so a phone's card layout keeps it together.
function cell(label, ...content) { return el("td", { "data-label": label }, el("span", {}, ...content)); }

function renderFleet() {
  const rows = state.members.map((m) => el("tr", { dataset: { member: m.id, status: m.status } },
    cell("peer", el("code", {}, short(m.id)), m.self ? el("span", { class: "muted" }, " (here)") : null),
    cell("status", el("span", { class: `status ${m.status}` }, m.status)),
    cell("address", m.address),
    cell("roles", m.roles.filter((r) => !r.startsWith("grapevine.")).join(", ") || "–"),
    cell("free slots", m.free_slots),
    cell("queue", m.queue_len),
    cell("load", m.load.toFixed(2)),
    // agents and spend_micro: what the member advertises in its signed peer state.
    cell("agents", m.agents ?? 0),
    cell("spend", dollars(m.spend_micro ?? 0)),
    // models: the member's breakers that are not closed (decision 54).
    cell("breakers", breakers(m.models || [])),
    // last_seen: unix s of the last envelope the serving peer received from the member.
    cell("last seen", m.self ? "now" : ago(m.last_seen && m.last_seen * 1000))));
  $("fleet-rows").replaceChildren(...rows);
  const alive = state.members.filter((m) => m.status === "alive");
  const agents = alive.reduce((sum, m) => sum + (m.agents || 0), 0);
  const spend = alive.reduce((sum, m) => sum + (m.spend_micro || 0), 0);
  $("fleet-summary").textContent =
    `${alive.length} of ${state.members.length} alive · ${agents} agents · ${dollars(spend)} model spend`;
  renderNetworkModels(alive);
}

// Per model, summed over the alive members' peer states (decision 59): every peer's own
// counts and breakers, seen from here.
function renderNetworkModels(alive) {
  const byModel = new Map();
  for (const m of alive) {
    for (const u of m.models || []) {
      const row = byModel.get(u.model) || { peers: 0, tokens: 0, spend: 0, waits: 0, waiting: 0, tripped: [] };
      row.peers += 1;
      row.tokens += u.tokens || 0;
      row.spend += u.spend_micro || 0;
      row.waits += u.waits || 0;
      row.waiting += u.waiting || 0;
      if (u.breaker !== "closed") row.tripped.push({ ...u, member: m.id });
      byModel.set(u.model, row);
    }
  }
  const names = [...byModel.keys()].sort((a, b) => byModel.get(b).spend - byModel.get(a).spend || a.localeCompare(b));
  $("network-model-rows").replaceChildren(...names.map((name) => {
    const r = byModel.get(name);
    const tripped = r.tripped.length
      ? el("span", {}, ...r.tripped.map((u) =>
        el("span", { class: `breaker ${u.breaker}` }, `${u.breaker.replace("_", " ")} at ${short(u.member)} `)))
      : "all closed";
    return el("tr", { dataset: { networkModel: name } },
      cell("model", name), cell("peers", r.peers), cell("tokens", r.tokens),
      cell("cost", dollars(r.spend)), cell("rate-limit waits", r.waits), cell("waiting now", r.waiting),
      cell("breakers", tripped));
  }));
}

// A member's open and half-open breakers by model, or a dash.
function breakers(models) {
  const tripped = models.filter((u) => u.breaker !== "closed");
  if (!tripped.length) return "–";
  return el("span", {}, ...tripped.map((u) =>
    el("span", { class: `breaker ${u.breaker}` }, `${u.model} ${u.breaker.replace("_", " ")} `)));
}

// ---- totals and their trend ----------------------------------------------------------------

// Every member's peer state counts its own executions since it started (decision 64): their
// sum over the members this peer knows, dead ones included, is the network's.
function networkTotals(members) {
  const sum = (name) => members.reduce((total, m) => total + ((m.runs || {})[name] || 0), 0);
  const ended = sum("ok") + sum("failed") + sum("fenced") + sum("cancelled");
  return {
    tasks: sum("started"), running: Math.max(0, sum("started") - ended), done: sum("ok"),
    failed: sum("failed"), duplicates: sum("duplicates"), takeovers: sum("takeovers"),
    fenced: sum("fenced"), cancelled: sum("cancelled"),
  };
}

function showTotals(now, totals) {
  state.stats.push({ t: now, totals });
  trim(state.stats, now);
  for (const name of STATS) {
    const box = document.querySelector(`[data-stat="${name}"]`);
    box.querySelector(".value").textContent = totals[name];
    sparkline(box.querySelector("svg"), state.stats.map((s) => [s.t, s.totals[name]]));
  }
  drawThroughput();
}

function trim(series, now) {
  while (series.length && now - (series[0].t ?? series[0][0]) > HISTORY_MS) series.shift();
}

function sparkline(svg, points) {
  svg.replaceChildren();
  if (points.length < 2) return;
  const [x0, x1] = [points[0][0], points[points.length - 1][0]];
  const values = points.map((p) => p[1]);
  const [lo, hi] = [Math.min(...values), Math.max(...values)];
  const line = points.map(([t, v]) =>
    `${(((t - x0) / (x1 - x0 || 1)) * 80).toFixed(1)},${(18 - ((v - lo) / (hi - lo || 1)) * 16).toFixed(1)}`);
  svg.append(svgEl("polyline", { points: line.join(" "), class: "s0" }));
}

// A small line chart: `series` is [{name, points: [[t ms, value], ...]}], drawn over the last
// HISTORY_MS with the y axis from 0 to the largest value.
function chart(svg, series, format, dots) {
  svg.replaceChildren();
  const [w, h, left, bottom] = [320, 120, 44, 16];
  const now = Date.now();
  const x0 = now - HISTORY_MS;
  const all = series.flatMap((s) => s.points.map((p) => p[1]));
  const top = Math.max(...all, 0) || 1;
  const x = (t) => left + ((t - x0) / HISTORY_MS) * (w - left - 4);
  const y = (v) => h - bottom - (v / top) * (h - bottom - 8);
  svg.append(svgEl("line", { x1: left, y1: y(0), x2: w - 4, y2: y(0), class: "axis" }));
  svg.append(svgEl("line", { x1: left, y1: y(top), x2: w - 4, y2: y(top), class: "grid" }));
  for (const [v, yy] of [[top, y(top) + 4], [0, y(0)]]) {
    const label = svgEl("text", { x: left - 4, y: yy, class: "tick", "text-anchor": "end" });
    label.textContent = format(v);
    svg.append(label);
  }
  for (const [t, text, anchor] of [[x0, "−10 min", "start"], [now, "now", "end"]]) {
    const label = svgEl("text", { x: x(t), y: h - 2, class: "tick", "text-anchor": anchor });
    label.textContent = text;
    svg.append(label);
  }
  series.forEach((s, i) => {
    const pts = s.points.filter((p) => p[0] >= x0);
    if (dots) {
      for (const [t, v] of pts) svg.append(svgEl("circle", { cx: x(t), cy: y(v), r: 2, class: `s${i % 5}` }));
    } else if (pts.length) {
      const line = pts.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      svg.append(svgEl("polyline", { points: line, class: `s${i % 5}` }));
    }
  });
  if (!all.length) {
    const empty = svgEl("text", { x: w / 2, y: h / 2, class: "tick", "text-anchor": "middle" });
    empty.textContent = "no data yet";
    svg.append(empty);
  }
}

// Each point is the rate over the RATE_WINDOW_MS before it (or since the page opened), so a
// burst between two polls shows as a rate rather than a spike.
function drawThroughput() {
  const points = [];
  const finished = (s) => s.totals.done + s.totals.failed + s.totals.cancelled;
  let from = 0;
  for (let i = 1; i < state.stats.length; i++) {
    const b = state.stats[i];
    while (from + 1 < i && b.t - state.stats[from + 1].t >= RATE_WINDOW_MS) from++;
    const a = state.stats[from];
    points.push([b.t, Math.max(0, finished(b) - finished(a)) / ((b.t - a.t) / 60000)]);
  }
  chart($("plot-throughput"), [{ name: "finished", points }], (v) => v.toFixed(v < 10 ? 1 : 0));
}

function drawLatency() {
  const since = (Date.now() - HISTORY_MS) / 1000;
  const points = [];
  for (const [id, at] of state.resultAt) {
    const created = state.created.get(id);
    if (at >= since && created) points.push([at * 1000, Math.max(0, at - created)]);
  }
  chart($("plot-latency"), [{ name: "latency", points }], (v) => v.toFixed(v < 10 ? 2 : 0), true);
}

// ---- agents and models ---------------------------------------------------------------------

async function loadAgents() {
  const status = await api("/v1/agents");
  const now = Date.now();
  $("agent-rows").replaceChildren(...status.agents.map((a) => el("tr", { dataset: { agent: a.name } },
    cell("agent", a.name), cell("roles", a.roles.join(", ")), cell("model", a.model),
    cell("running", a.running), cell("suspended", a.suspended), cell("max", a.max_concurrent),
    cell("idle", seconds(a.idle_for)))));
  const models = Object.entries(status.model || {});
  $("model-rows").replaceChildren(...models.map(([name, m]) => el("tr", { dataset: { model: name } },
    cell("model", name), cell("calls", m.calls), cell("errors", m.errors),
    cell("tokens in / out", `${m.prompt_tokens} / ${m.completion_tokens}`),
    cell("cost", dollars(m.cost_micro)),
    cell("rate-limit waits", `${m.waits} (${seconds(m.wait_seconds)})`),
    cell("waiting", m.waiting),
    cell("breaker", el("span", { class: `breaker ${m.breaker}` }, m.breaker.replace("_", " "))))));
  const slots = status.max_running !== undefined ? `, ${status.max_running} execution slots` : "";
  $("agents-summary").textContent = `${status.agents.length} agents${slots}`;
  state.spend.push({ t: now, cost: Object.fromEntries(models.map(([n, m]) => [n, m.cost_micro / 1e6])) });
  trim(state.spend, now);
  drawSpend();
}

// The network's spend, in all and by model (from the members' peer states), then this
// peer's own by model.
function drawSpend() {
  const byModel = (samples, label) => {
    const names = [...new Set(samples.flatMap((s) => Object.keys(s.cost)))].sort();
    return names.map((name) => ({
      name: `${label}: ${name}`,
      points: samples.filter((s) => name in s.cost).map((s) => [s.t, s.cost[name]]),
    }));
  };
  const series = [{ name: "network", points: state.networkSpend },
    ...byModel(state.networkModels, "network"), ...byModel(state.spend, "here")];
  chart($("plot-spend"), series, (v) => `$${v.toFixed(v < 1 ? 4 : 2)}`);
  $("spend-legend").replaceChildren(...series.map((s, i) => el("span", { class: `key s${i % 5}` }, s.name)));
}

// ---- tasks ---------------------------------------------------------------------------------

function duration(task) {
  const end = state.resultAt.get(task.id) ?? task.ended;
  return end !== undefined && end !== null && task.created ? end - task.created : null;
}

async function loadTasks() {
  const scope = $("f-scope").value;
  const query = new URLSearchParams({ limit: scope === "network" ? "200" : "500" });
  if (scope === "network") query.set("scope", "network");
  if ($("f-state").value) query.set("state", $("f-state").value);
  if ($("f-role").value) query.set("role", $("f-role").value);
  // Every filter is applied by the peers, before the row limit: a filter on the page after it
  // would show only the matching rows among the first 500.
  if ($("f-peer").value) query.set("owner", $("f-peer").value);
  const answer = await api(`/v1/tasks?${query}`);
  for (const t of answer.tasks) {
    state.roles.add(t.role);
    state.created.set(t.id, t.created);
  }
  const tasks = answer.tasks;
  $("task-rows").replaceChildren(...tasks.slice(0, 200).map((t) => el("tr", {
    class: "link", dataset: { task: t.id, state: t.state, role: t.role },
    onclick: () => { location.hash = `task/${t.id}`; },
  },
    cell("task", el("code", {}, t.id.slice(0, 12)), t.parent ? null : el("span", { class: "muted" }, " root")),
    cell("role", t.role),
    cell("state", el("span", { class: `state ${t.state}` }, t.state)),
    cell("peer", peerName(t.owner)),
    cell("created", clock(t.created)),
    cell("duration", seconds(duration(t))))));
  const partial = answer.partial ? ` (partial: ${answer.missing.length} members did not answer)` : "";
  $("task-note").textContent = `${tasks.length} shown${tasks.length > 200 ? " (first 200)" : ""}${partial}`;
  renderFilters();
}

function renderFilters() {
  fillSelect($("f-role"), [...state.roles].filter((r) => !r.startsWith("grapevine.")).sort(), (r) => r);
  fillSelect($("f-peer"), state.members.map((m) => m.id), peerName);
}

function fillSelect(select, values, label) {
  const chosen = select.value;
  const have = [...select.options].slice(1).map((o) => o.value);
  if (have.join("\n") === values.join("\n")) return;
  select.replaceChildren(el("option", { value: "" }, "any"), ...values.map((v) => el("option", { value: v }, label(v))));
  select.value = values.includes(chosen) ? chosen : "";
}

// ---- the live feed -------------------------------------------------------------------------

function describe(event) {
  const who = event.owner ? ` on ${peerName(event.owner)}` : "";
  switch (event.type) {
    case "task-claimed": return `claimed${who}, epoch ${event.epoch}`;
    case "task-started": return `started ${event.role ? `(${event.role}) ` : ""}here`;
    case "task-stopped": return `stopped here: ${event.reason}`;
    case "task-result": return `result ${event.outcome}${who}${event.flipped ? " (flipped)" : ""}`;
    case "task-cancelled": return `cancelled: ${event.reason}`;
    case "task-replicated": return `replicated to ${event.holders}`;
    case "event": return `user event ${event.name}`;
    default: return event.type.replace("member-", "member ");
  }
}

function noteTaskEvent(event, live) {
  if (event.type === "task-result" && !state.resultAt.has(event.id)) {
    state.resultAt.set(event.id, event.time);
    if (state.resultAt.size > RESULTS_KEPT) state.resultAt.delete(state.resultAt.keys().next().value);
  }
  addToFeed(event, live);
}

function addToFeed(event, live) {
  const subject = event.type.startsWith("task-")
    ? el("a", { href: `#task/${event.id}` }, event.id.slice(0, 8))
    : el("code", {}, event.short_id || short(event.origin));
  const item = el("li", { class: live ? "fresh" : "", dataset: { type: event.type } },
    el("time", {}, clock(event.time)), " ", subject, " ", describe(event));
  const list = $("feed-items");
  list.prepend(item);
  while (list.children.length > FEED_MAX) list.lastChild.remove();
}

function follow(path, onEvent) {
  const source = new EventSource(path);
  source.onopen = () => setLive(true, "live");
  source.onmessage = (message) => onEvent(JSON.parse(message.data));
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      // Refused (401 after a sign-out, or the peer went away): try again a while later.
      setLive(false, "offline");
      setTimeout(() => { if (!state.signedOut) follow(path, onEvent); }, 5000);
    } else {
      setLive(false, "reconnecting");
    }
  };
  return source;
}

// ---- one task: detail and delegation tree --------------------------------------------------

async function showTask(id) {
  const section = $("task-detail");
  section.hidden = false;
  $("detail-id").textContent = id.slice(0, 16);
  const [task, tree] = await Promise.all([api(`/v1/tasks/${id}`), api(`/v1/tasks/${id}/tree`)]);
  if (!location.hash.endsWith(id)) return; // another task was chosen meanwhile
  state.created.set(task.id, task.created);
  const result = task.result;
  const fields = [
    ["id", task.id], ["role", task.role], ["state", task.state],
    ["peer", peerName(task.owner)], ["origin", peerName(task.origin)], ["epoch", task.epoch],
    ["created", clock(task.created)], ["duration", seconds(duration(task))],
    ["parent", task.parent ? el("a", { href: `#task/${task.parent}` }, task.parent.slice(0, 12)) : "none (a root)"],
    ["executions", task.executions.filter((e) => e.phase === "start").length],
    ["duplicates", task.duplicates],
    ["outcome", result ? result.outcome : "–"],
  ];
  $("detail-fields").replaceChildren(...fields.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  $("detail-input").textContent = task.input.slice(0, 4000);
  $("detail-output").textContent = result ? readableOutput(result.output).slice(0, 8000) : "";
  const totals = tree.totals;
  $("tree-totals").textContent = `${totals.tasks} tasks, ${totals.executions} executions, ` +
    `${totals.duplicates} duplicates, ${totals.prompt_tokens + totals.completion_tokens} tokens, ` +
    `${dollars(totals.cost_microdollars)}, ${totals.model_calls} model calls ` +
    `(${totals.model_calls_repeated} repeated after a takeover)${tree.truncated ? " (truncated)" : ""}`;
  $("tree").replaceChildren(treeNode(tree));
}

function readableOutput(output) {
  try {
    const parsed = JSON.parse(output);
    if (parsed && typeof parsed.answer === "string") return `${parsed.agent}: ${parsed.answer}`;
  } catch (_) { /* not an agent's output */ }
  return output;
}

function treeNode(node) {
  const usage = node.usage;
  const tokens = usage ? usage.prompt_tokens + usage.completion_tokens : null;
  const row = el("div", { class: "node-row" },
    el("a", { href: `#task/${node.id}`, class: "role" }, node.role || "?"),
    el("span", { class: `state ${node.state}` }, node.state),
    el("span", { class: "peer", title: "peer" }, `peer ${peerName(node.peer)}`),
    el("span", { class: "agent", title: "agent" }, `agent ${node.agent || "–"}`),
    el("span", { class: "tokens" }, tokens === null ? "– tokens" : `${tokens} tokens`),
    el("span", { class: "cost" }, usage ? dollars(usage.cost_microdollars) : "–"),
    node.model_calls ? el("span", { class: "calls", title: "model calls of every run" },
      `${node.model_calls} model call${node.model_calls === 1 ? "" : "s"}`) : null,
    node.model_calls_repeated ? el("span", { class: "warn", title: "calls that redid a step an earlier run had started" },
      `${node.model_calls_repeated} repeated after a takeover`) : null,
    el("span", { class: "duration", title: "submit → result, as seen here" },
      seconds(duration({ id: node.id, created: node.created ?? state.created.get(node.id), ended: node.ended }))),
    node.duplicates ? el("span", { class: "warn" }, `${node.duplicates} duplicates`) : null);
  const children = node.children.length ? el("ul", {}, ...node.children.map(treeNode)) : null;
  return el("li", { class: "node", dataset: { task: node.id, state: node.state } }, row, children);
}

function route() {
  const match = location.hash.match(/^#task\/([0-9a-f]{6,64})$/);
  if (!match) return;
  showTask(match[1]).catch(failed);
  $("task-detail").scrollIntoView({ block: "start" });
}

// ---- start ---------------------------------------------------------------------------------

async function start() {
  try {
    state.self = await api("/v1/self");
  } catch (error) {
    failed(error);
    return;
  }
  $("peer").textContent = `peer ${state.self.short_id} · ${state.self.api} · v${state.self.version}`;
  document.title = `Grapevine · ${state.self.short_id}`;
  const members = every(POLL_MS, loadMembers);
  const agents = every(3000, loadAgents);
  const tasks = every(TASK_POLL_MS, loadTasks);
  const latency = every(POLL_MS, async () => drawLatency());
  await Promise.allSettled([members(), tasks()]);
  try {
    const recent = await api("/v1/tasks/watch");
    for (const event of recent.events) noteTaskEvent(event, false);
  } catch (error) { failed(error); }
  agents(); latency();
  follow("/v1/tasks/watch?follow=1", (event) => {
    noteTaskEvent(event, true);
    members.soon(); tasks.soon();
    if (state.detail === event.id) showTask(event.id).catch(failed);
  });
  follow("/v1/events?follow=1", (event) => {
    addToFeed(event, true);
    members.soon();
  });
  for (const id of ["f-scope", "f-state", "f-role", "f-peer"]) $(id).addEventListener("change", () => tasks());
  $("detail-close").addEventListener("click", () => {
    $("task-detail").hidden = true;
    state.detail = null;
    history.replaceState(null, "", location.pathname);
  });
  window.addEventListener("hashchange", () => {
    const match = location.hash.match(/^#task\/([0-9a-f]+)$/);
    state.detail = match ? match[1] : state.detail;
    route();
  });
  const initial = location.hash.match(/^#task\/([0-9a-f]+)$/);
  if (initial) { state.detail = initial[1]; route(); }
}

document.addEventListener("DOMContentLoaded", start);
