// Taskmesh's dashboard: runs, a run's DAG and timeline, its steps' logs, schedules, stored
// workflows, webhook endpoints and their failed deliveries, repository connections, executors,
// secrets, API keys, the audit log.
//
// Everything it shows comes from the REST API with the API key the user gives it, kept in
// this tab's sessionStorage only (gone when the tab closes); the page itself holds no data.
// Text from the API is only ever set as text (textContent), never parsed as HTML.
"use strict";

const KEY = "taskmesh.key";
const TERMINAL = new Set(["succeeded", "failed", "cancelled", "timed_out", "skipped"]);
const main = document.getElementById("main");
const RUN_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
let current = { stopped: true, stop() {} }; // the view on the page, and its refresh
let refused = false; // the key was just refused: say so on the sign-in form
let me = null; // who the key is (GET /v1/whoami), once asked
let asking = null; // that question, while it is under way
let written = null; // { id, seq } of a run this page just started: its first read waits for it

// --- the API --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    super(problem && (problem.detail || problem.title) ? `${problem.title || ""}: ${problem.detail || ""}` : `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({ accept: "application/json" }, options.headers || {});
  headers.authorization = `Bearer ${sessionStorage.getItem(KEY) || ""}`;
  if (options.body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    // What a key reads stays out of the browser's cache, so signing out leaves none of it.
    cache: "no-store",
  });
  const text = await res.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    // Not JSON (a proxy's error page, say): the status says enough.
  }
  if (res.status === 401 && sessionStorage.getItem(KEY)) {
    sessionStorage.removeItem(KEY);
    me = null;
    refused = true;
    route();
  }
  if (!res.ok) throw new ApiError(res.status, body);
  // A write answered without a body says its seq in a header.
  const seq = res.headers.get("taskmesh-seq");
  if (body === null && /^\d{1,16}$/.test(seq || "")) return { seq: Number(seq) };
  return body;
}

const enc = encodeURIComponent;

// --- building the page ----------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// A table with a header row over `body`.
const table = (heads, body) => el("table", {}, el("thead", {}, el("tr", {}, heads.map((h) => el("th", {}, h)))), body);
// A read that waits until the read side holds the write `seq` answered (none: as it is).
const minSeq = (seq) => (seq ? { "taskmesh-min-seq": String(seq) } : {});

const badge = (status) => el("span", { class: `status ${status || ""}` }, status || "?");
const when = (t) => (t ? new Date(t).toLocaleString(undefined, { timeZoneName: "short" }) : "");

function took(start, end) {
  if (!start) return "";
  // The browser's clock may be behind the server's: a running step never took less than nothing.
  const ms = Math.max(0, (end ? new Date(end) : new Date()) - new Date(start));
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

function show(...nodes) {
  main.replaceChildren(...nodes);
}

function failure(e) {
  return el("p", { class: "error" }, e instanceof Error ? e.message : String(e));
}

// A destructive button: its first click arms it (saying `ask`), its second does `action` and
// disables it (so a third does not do it again). The view's next look draws it afresh, unarmed.
function twice(button, ask, action) {
  if (button.dataset.armed !== "yes") {
    button.dataset.armed = "yes";
    button.textContent = ask;
    return;
  }
  button.disabled = true;
  action();
}

// A list row's destructive button for an admin: once `key` (the row's id or name) is being
// removed, `doing` until the list no longer shows it; else `verb`, which a second click
// confirms, doing `remove()`. Nothing for anyone else.
function removal(changes, key, admin, remove, verb = "Delete", doing = "deleting…") {
  if (!admin) return null;
  if (changes.gone.has(key)) return el("span", { class: "muted" }, doing);
  return el("button", { type: "button", class: "delete", onclick: (ev) => twice(ev.currentTarget, `${verb}? Click again`, remove) }, verb);
}

// An admin's form on a list's page (hidden until the view shows it to an admin): `fields` and
// a button saying `label`, which does `submit()` and says in `problem` what went wrong.
function adminForm(problem, label, fields, submit) {
  const onsubmit = async (ev) => {
    ev.preventDefault();
    try {
      await submit();
      problem.replaceChildren();
    } catch (e) {
      problem.replaceChildren(failure(e));
    }
  };
  return el("form", { class: "inline", hidden: true, onsubmit }, fields, el("button", { type: "submit" }, label));
}

// The paging a list's address may carry, as the API's query: `limit` (digits) and `cursor`
// (a `next_cursor` the API gave: digits, an id or a name; the API refuses one not of the
// list's kind).
function pageParams(params) {
  const page = new URLSearchParams();
  if (/^\d{1,3}$/.test(params.get("limit") || "")) page.set("limit", params.get("limit"));
  if (/^\S{1,256}$/.test(params.get("cursor") || "")) page.set("cursor", params.get("cursor"));
  return page;
}

// A list's link to its next page: `at` (a page's address, `#/…`) with `params` and the
// answer's `next_cursor`, or nothing on the last page.
function olderLink(more, at, params, cursor, label) {
  if (!cursor) return more.replaceChildren();
  const older = new URLSearchParams(params);
  older.set("cursor", cursor);
  more.replaceChildren(el("a", { href: `${at}?${older}` }, label));
}

// Runs `load(view)` now and again every `ms` while this view stays: a new view stops it, and
// so does `view.stop()` (this view's own, so a late answer cannot stop the next view's); an
// answer that comes once `view.stopped` must be dropped. A look still under way when the next
// is due lets that one pass, so two never overlap.
function every(ms, load) {
  current.stop();
  let busy = false;
  let again = false; // `now()` asked while a look was under way
  const view = {
    stopped: false,
    stop() {
      view.stopped = true;
      clearInterval(id);
    },
  };
  const tick = async () => {
    if (busy || view.stopped) return;
    busy = true;
    try {
      await load(view);
    } finally {
      busy = false;
    }
    if (again && !view.stopped) {
      again = false;
      tick();
    }
  };
  const id = setInterval(tick, ms);
  current = view;
  // Looks again at once, or, if a look is under way, as soon as it ends (it may have asked
  // before the change it must show).
  view.now = () => {
    if (busy) again = true;
    else tick();
  };
  tick();
  return view;
}

// Most log lines kept on the page; older ones make way.
const MAX_LOG_LINES = 5000;

// --- views ----------------------------------------------------------------------------------

function signIn() {
  current.stop();
  const why = refused ? el("p", { class: "error" }, "That key was refused (401): it is unknown, revoked, or of another deployment.") : null;
  refused = false;
  const input = el("input", { type: "password", name: "key", placeholder: "tm_…", size: 48, autocomplete: "off", required: true });
  const form = el(
    "form",
    {
      class: "inline",
      onsubmit: (ev) => {
        ev.preventDefault();
        sessionStorage.setItem(KEY, input.value.trim());
        // A link to a run (from a commit status, from Slack) opens that run once signed in.
        if (location.hash.length > 1) route();
        else location.hash = "#/runs"; // the hashchange routes
      },
    },
    el("label", {}, "API key ", input),
    el("button", { class: "primary", type: "submit" }, "Sign in"),
  );
  show(
    el("h1", {}, "Sign in"),
    why,
    el("p", { class: "muted" }, "Paste an API key of your tenant. The page keeps it in this tab only, and every request carries it."),
    form,
  );
}

function runsView(query) {
  const params = new URLSearchParams(query);
  const status = el("select", { name: "status" }, ["", "queued", "running", "succeeded", "failed", "cancelled", "timed_out"].map((s) => el("option", { value: s, selected: params.get("status") === s }, s || "any status")));
  const workflow = el("input", { name: "workflow", placeholder: "workflow", value: params.get("workflow") || "" });
  const filter = el(
    "form",
    {
      class: "inline",
      onsubmit: (ev) => {
        ev.preventDefault();
        const q = new URLSearchParams();
        if (status.value) q.set("status", status.value);
        if (workflow.value.trim()) q.set("workflow", workflow.value.trim());
        location.hash = `#/runs?${q}`;
      },
    },
    status,
    workflow,
    el("button", { type: "submit" }, "Filter"),
  );
  const body = el("tbody");
  const problem = el("div");
  const list = table(["Run", "Workflow", "Status", "Trigger", "Created", "Took"], body);
  const more = el("p");
  show(el("h1", {}, "Runs"), filter, problem, list, more);
  every(3000, async (view) => {
    try {
      const q = new URLSearchParams(params);
      q.set("limit", pageParams(params).get("limit") || "50");
      const page = await api(`/v1/runs?${q}`);
      if (view.stopped) return;
      problem.replaceChildren();
      olderLink(more, "#/runs", params, page.next_cursor, "Older runs →");
      body.replaceChildren(
        ...page.items.map((r) =>
          el(
            "tr",
            { class: "link", onclick: () => (location.hash = `#/runs/${r.id}`) },
            // A link too, to open the run in a new tab.
            el("td", { class: "mono" }, el("a", { href: `#/runs/${r.id}`, onclick: (ev) => ev.stopPropagation() }, r.id)),
            el("td", {}, r.workflow),
            el("td", {}, badge(r.status)),
            el("td", {}, r.trigger),
            el("td", {}, when(r.created_at)),
            el("td", {}, r.finished_at ? took(r.created_at, r.finished_at) : ""),
          ),
        ),
      );
      if (page.items.length === 0) body.append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No runs.")));
    } catch (e) {
      problem.replaceChildren(failure(e));
    }
  });
}

// Each step's column: the length of the longest chain of needs leading to it.
function layers(steps) {
  const byId = new Map(steps.map((s) => [s.id, s]));
  const depth = new Map();
  const visit = (s, seen) => {
    if (depth.has(s.id)) return depth.get(s.id);
    if (seen.has(s.id)) return 0; // not a DAG: cannot happen, validated on submission
    seen.add(s.id);
    const d = Math.max(-1, ...(s.needs || []).filter((n) => byId.has(n)).map((n) => visit(byId.get(n), seen))) + 1;
    depth.set(s.id, d);
    return d;
  };
  steps.forEach((s) => visit(s, new Set()));
  return depth;
}

const COLORS = { succeeded: "#1a7f37", failed: "#cf222e", timed_out: "#cf222e", running: "#0969da", queued: "#9a6700" };

function dag(run, selected, pick) {
  const depth = layers(run.steps);
  const rows = new Map();
  const place = new Map();
  for (const s of run.steps) {
    const d = depth.get(s.id);
    const row = rows.get(d) || 0;
    rows.set(d, row + 1);
    place.set(s.id, { x: 16 + d * 190, y: 16 + row * 52 });
  }
  const width = 16 + (Math.max(0, ...depth.values()) + 1) * 190;
  const height = 16 + Math.max(1, ...rows.values()) * 52;
  const edges = run.steps.flatMap((s) =>
    (s.needs || [])
      .filter((n) => place.has(n))
      .map((n) => {
        const a = place.get(n);
        const b = place.get(s.id);
        const [x1, y1, x2, y2] = [a.x + 160, a.y + 18, b.x, b.y + 18];
        return svg("path", { d: `M${x1},${y1} C${x1 + 15},${y1} ${x2 - 15},${y2} ${x2},${y2}` });
      }),
  );
  const nodes = run.steps.map((s) => {
    const p = place.get(s.id);
    const label = s.id.length > 20 ? `${s.id.slice(0, 19)}…` : s.id;
    return svg(
      "g",
      { class: `node${s.id === selected ? " selected" : ""}`, transform: `translate(${p.x},${p.y})`, onclick: () => pick(s.id) },
      svg("rect", { width: 160, height: 36, rx: 6, stroke: COLORS[s.status] || "#8c959f" }),
      svg("text", { x: 10, y: 15 }, label),
      svg("text", { x: 10, y: 29, fill: "#667085" }, s.status),
      svg("title", {}, `${s.id}: ${s.status}`),
    );
  });
  return svg("svg", { class: "dag", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "the run's steps and their needs" }, edges, nodes);
}

// A bar per step over the run's span, from its start to its end (or now).
function timeline(run, step) {
  const start = new Date(run.started_at || run.created_at).getTime();
  const end = run.finished_at ? new Date(run.finished_at).getTime() : Date.now();
  const span = Math.max(1, end - start);
  const bar = el("div", { class: "timeline" });
  if (step.started_at) {
    const a = new Date(step.started_at).getTime();
    const b = step.finished_at ? new Date(step.finished_at).getTime() : end;
    const left = (100 * (a - start)) / span;
    const width = Math.max(0.5, (100 * (b - a)) / span);
    const part = el("span");
    part.style.left = `${left}%`;
    part.style.width = `${width}%`;
    part.style.background = COLORS[step.status] || "#8c959f";
    bar.append(part);
  }
  return bar;
}

function runView(id, stepId) {
  const problem = el("div");
  const head = el("div");
  const picture = el("div");
  const steps = el("tbody");
  // The step's facts and attempts are drawn anew each second; its log is only appended to, so
  // a reader's scroll position and selection stay.
  const facts = el("div");
  const log = el("pre", { "aria-label": "log" });
  const logNote = el("p", { class: "muted" });
  const attempts = el("div");
  const detail = el("div", {}, el("p", { class: "muted" }, "Pick a step to see its output and attempts."));
  if (stepId) detail.replaceChildren(facts, el("h2", {}, "Log"), logNote, log, el("h2", {}, "Attempts"), attempts);
  let after = 0;
  let logDone = false;
  let shown = 0;
  let lastAttempt = null; // the attempt of the last log line shown
  let drawn = ""; // what the DAG was last drawn from: it is drawn again only when that changes
  show(el("p", {}, el("a", { href: "#/runs" }, "← Runs")), problem, head, picture, el("h2", {}, "Steps"),
    table(["Step", "Kind", "Status", "Attempts", "Took", "Timeline"], steps),
    detail);
  const pick = (s) => (location.hash = `#/runs/${id}/steps/${enc(s)}`);

  const act = async (path, body) => {
    try {
      const r = await api(path, { method: "POST", body });
      if (r && r.id && r.id !== id) {
        // The new run's page reads it once the read side has it (not a 404 meanwhile).
        written = { id: r.id, seq: r.seq };
        location.hash = `#/runs/${r.id}`;
      }
    } catch (e) {
      problem.replaceChildren(failure(e));
    }
  };

  // Reads what the step's log has after what is shown (20 pages at most a look: a long log
  // comes in over several looks). True once a page came back short: all there is was read.
  async function readLog(view, step) {
    for (let pages = 0; pages < 20; pages++) {
      const page = await api(`/v1/runs/${id}/steps/${enc(step.id)}/logs?after=${after}&limit=1000`);
      if (view.stopped) return false;
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      for (const l of page.lines) {
        // A retried step's attempts each write their own lines: each begins under its number.
        if (lastAttempt !== null && l.attempt !== lastAttempt) log.append(el("span", { class: "attempt" }, `── attempt ${l.attempt} ──\n`));
        lastAttempt = l.attempt;
        log.append(el("span", { class: l.stream }, `${l.line}\n`));
      }
      shown += page.lines.length;
      if (page.next !== null && page.next !== undefined) after = page.next;
      else if (page.lines.length) after = page.lines[page.lines.length - 1].seq;
      while (log.childElementCount > MAX_LOG_LINES) log.firstElementChild.remove();
      logNote.textContent = shown > MAX_LOG_LINES ? `${shown} lines; the last ${MAX_LOG_LINES} read are shown (the API has them all).` : "";
      if (atEnd) log.scrollTop = log.scrollHeight;
      if (page.lines.length < 1000) return true;
    }
    return false;
  }

  every(1000, async (view) => {
    try {
      await whoami();
      const run = await api(`/v1/runs/${id}`, { headers: minSeq(written && written.id === id && written.seq) });
      if (view.stopped) return;
      if (written && written.id === id) written = null;
      problem.replaceChildren();
      const ended = TERMINAL.has(run.status);
      head.replaceChildren(
        el("h1", {}, `${run.workflow} `, badge(run.status)),
        el("dl", { class: "facts" },
          el("dt", {}, "Run"), el("dd", { class: "mono" }, run.id),
          el("dt", {}, "Trigger"), el("dd", {}, triggerText(run.trigger)),
          el("dt", {}, "Created"), el("dd", {}, when(run.created_at)),
          el("dt", {}, "Took"), el("dd", {}, took(run.started_at || run.created_at, run.finished_at)),
          run.wait_reason ? [el("dt", {}, "Waiting"), el("dd", {}, run.wait_reason)] : null,
          run.refresh_cache ? [el("dt", {}, "Cache"), el("dd", {}, "refreshed: its cache: steps ran, and their outcomes are kept")] : null,
          Object.keys(run.inputs || {}).length ? [el("dt", {}, "Inputs"), el("dd", { class: "mono" }, JSON.stringify(run.inputs))] : null),
        mayAct() && el("div", { class: "actions" },
          ended ? null : el("button", { type: "button", onclick: () => confirm("Cancel this run?") && act(`/v1/runs/${id}/cancel`) }, "Cancel"),
          ended && run.status !== "succeeded" ? el("button", { type: "button", onclick: () => act(`/v1/runs/${id}/rerun`, { from: "failed" }) }, "Rerun failed steps") : null),
      );
      // A DAG of hundreds of steps is not redrawn every second unless a step's state changed.
      const state = JSON.stringify([stepId, run.steps.map((s) => [s.id, s.status])]);
      if (state !== drawn) {
        picture.replaceChildren(dag(run, stepId, pick));
        drawn = state;
      }
      steps.replaceChildren(
        ...run.steps.map((s) =>
          el("tr", { class: "link", onclick: () => pick(s.id) },
            el("td", {}, s.id), el("td", {}, s.kind), el("td", {}, badge(s.status)), el("td", {}, s.attempts),
            el("td", {}, took(s.started_at, s.finished_at)), el("td", {}, timeline(run, s))),
        ),
      );
      const step = run.steps.find((s) => s.id === stepId);
      if (!step) {
        // An ended run changes no more: this was the last look.
        if (ended) view.stop();
        return;
      }
      facts.replaceChildren(
        el("h2", {}, `Step ${step.id} `, badge(step.status)),
        el("dl", { class: "facts" },
          step.exit_code !== null && step.exit_code !== undefined ? [el("dt", {}, "Exit code"), el("dd", {}, step.exit_code)] : null,
          step.error ? [el("dt", {}, "Error"), el("dd", { class: "error" }, step.error)] : null,
          step.reason ? [el("dt", {}, "Reason"), el("dd", {}, step.reason)] : null,
          step.wait_reason ? [el("dt", {}, "Waiting"), el("dd", {}, step.wait_reason)] : null,
          Object.keys(step.outputs || {}).length ? [el("dt", {}, "Outputs"), el("dd", { class: "mono" }, JSON.stringify(step.outputs))] : null),
      );
      attempts.replaceChildren(
        table(["#", "Executor", "Status", "Exit", "Error", "Took"],
          el("tbody", {}, (step.attempt_history || []).map((a) =>
            el("tr", {}, el("td", {}, a.attempt), el("td", {}, a.executor || ""), el("td", {}, badge(a.status)),
              el("td", {}, a.exit_code ?? ""), el("td", {}, a.error || ""), el("td", {}, took(a.started_at, a.finished_at)))))),
      );
      if (!logDone) {
        const all = await readLog(view, step);
        // Once the step has ended and its whole log is read, nothing more will come.
        logDone = all && TERMINAL.has(step.status);
      }
      if (ended && logDone) view.stop();
    } catch (e) {
      if (view.stopped) return;
      problem.replaceChildren(failure(e));
      // A run that is not there (or not this tenant's) will not appear by asking again.
      if (e instanceof ApiError && e.status === 404) view.stop();
    }
  });
}

function triggerText(t) {
  if (!t) return "";
  switch (t.kind) {
    case "webhook":
      if (t.pull_request != null) {
        return `${t.forge} pull request #${t.pull_request} to ${t.repository} (${t.branch} into ${t.target_branch})${t.commit ? ` at ${t.commit.slice(0, 12)}` : ""}`;
      }
      return `${t.forge} push to ${t.repository}${t.branch ? ` (${t.branch})` : t.tag ? ` (tag ${t.tag})` : ""}${t.commit ? ` at ${t.commit.slice(0, 12)}` : ""}`;
    case "schedule": return `schedule ${t.schedule_id} (${t.manual ? "run by hand " : ""}${when(t.tick)})`;
    case "rerun": return `rerun of ${t.run_id} from ${t.from}`;
    case "event": return `event ${t.type} from ${t.source}`;
    default: return "API";
  }
}

function executorsView() {
  const problem = el("div");
  const live = el("tbody");
  const queues = el("tbody");
  show(el("h1", {}, "Executors"), problem,
    table(["Executor", "Labels", "Slots in use", "Last heartbeat", ""], live),
    el("h2", {}, "Queues"),
    table(["Labels", "Your steps queued", "Executors"], queues));
  every(3000, async (view) => {
    try {
      const answer = await api("/v1/executors");
      if (view.stopped) return;
      problem.replaceChildren();
      const labels = (l) => Object.entries(l || {}).map(([k, v]) => `${k}=${v}`).join(", ");
      live.replaceChildren(...(answer.items || []).map((x) =>
        el("tr", {}, el("td", { class: "mono" }, x.id), el("td", {}, labels(x.labels)), el("td", {}, `${x.slots_in_use} / ${x.slots}`),
          el("td", {}, when(x.last_heartbeat)), el("td", {}, x.stopping ? "draining" : ""))));
      if (!live.children.length) live.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No executor is running.")));
      queues.replaceChildren(...(answer.pools || []).map((q) =>
        el("tr", {}, el("td", {}, labels(q.runs_on) || "(no labels)"), el("td", {}, q.queued), el("td", {}, q.executors))));
    } catch (e) {
      problem.replaceChildren(failure(e));
    }
  });
}

// What a view and its buttons share: `act` POSTs a change and has the view (`shown`, an
// `every`) look again at once; the view's `api` read then asks the read side to hold the change
// first (`fresh`, the change's seq, sent as Taskmesh-Min-Seq). Only the change a read asked for
// is done with: a later one waits for the next look.
function changing(problem) {
  const changes = { fresh: null, shown: null };
  // A change made (the API's answer, with its seq if it has one): the view looks again after it.
  changes.wrote = (r) => {
    changes.fresh = r && r.seq ? r.seq : null;
    if (changes.shown) changes.shown.now();
  };
  changes.act = async (path) => {
    try {
      changes.wrote(await api(path, { method: "POST" }));
    } catch (e) {
      problem.replaceChildren(failure(e));
    }
  };
  // Deletes what `path` names (`id`); `gone` keeps its row marked (by the delete's seq) until
  // a look that waited for that seq has the change (the row dropped, or revoked).
  changes.gone = new Map();
  // Answers whether it was deleted.
  changes.remove = async (path, id) => {
    try {
      const r = await api(path, { method: "DELETE" });
      changes.gone.set(id, (r && r.seq) || 0);
      changes.wrote(r);
      return true;
    } catch (e) {
      problem.replaceChildren(failure(e));
      return false;
    }
  };
  changes.api = async (path) => {
    const asked = changes.fresh;
    const answer = await api(path, { headers: minSeq(asked) });
    if (changes.fresh === asked) changes.fresh = null;
    for (const [id, seq] of changes.gone) if (seq <= (asked || 0)) changes.gone.delete(id);
    return answer;
  };
  return changes;
}

function isObject(v) {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

// The JSON merge patch (RFC 7396) that makes `from` into `to`: keys gone are null, objects in
// both are patched in turn, other values given whole. (A value cannot be made null by one.)
function mergePatch(from, to) {
  const patch = {};
  for (const k of Object.keys(from)) if (!(k in to)) patch[k] = null;
  for (const [k, v] of Object.entries(to)) {
    if (isObject(v) && isObject(from[k])) {
      const inner = mergePatch(from[k], v);
      if (Object.keys(inner).length) patch[k] = inner;
    } else if (JSON.stringify(v) !== JSON.stringify(from[k])) {
      patch[k] = v;
    }
  }
  return patch;
}

// The tenant's schedules, newest first, a page at a time (the page's address may carry
// `cursor` and `limit`, as the API takes them), as the lists below are.
function schedulesView(query) {
  const page = pageParams(new URLSearchParams(query));
  const problem = el("div");
  const body = el("tbody");
  const more = el("p");
  const changes = changing(problem);
  // Changing one schedule (Edit on its row): its expression, time zone, overlap and catch-up
  // policies and inputs, sent as a merge patch of what it had. Above the list, which is drawn
  // afresh every few seconds.
  // Saved only if the schedule is still as it was when Edit was clicked (its version, sent as
  // If-Match), or only ticked, paused or ran since: another change since is refused.
  const editing = { id: null, inputs: {}, version: null, spec: null };
  const cron = el("input", { name: "cron", placeholder: "cron", size: 18, required: true, class: "mono" });
  const timezone = el("input", { name: "timezone", placeholder: "time zone (UTC)", size: 16 });
  const inputs = el("input", { name: "inputs", placeholder: '{"inputs": "as JSON"}', size: 40, class: "mono" });
  // Each policy's values, the default first (as the API has them).
  const choice = (name, title, values) => el("select", { name, title },
    ...values.map((v) => el("option", { value: v }, `${name.replace("_", " ")}: ${v}`)));
  const overlap = choice("overlap", "What a tick does while the previous run still runs", ["skip", "allow", "cancel_previous"]);
  const catchUp = choice("catch_up", "Which ticks missed while no scheduler ran are fired", ["none", "last", "all"]);
  // The form's own: the list's refresh clears the page's problem every few seconds.
  const refusal = el("div", { class: "refusal" });
  const edit = el("form", {
    class: "inline", id: "schedule-edit", hidden: true,
    onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const given = inputs.value.trim() ? JSON.parse(inputs.value) : {};
        if (!isObject(given)) throw new Error("inputs: a JSON object");
        const body = {
          cron: cron.value.trim(),
          timezone: timezone.value.trim() || null,
          overlap: overlap.value,
          catch_up: catchUp.value,
          inputs: mergePatch(editing.inputs, given),
        };
        const save = () => api(`/v1/schedules/${editing.id}`, {
          method: "PATCH",
          headers: editing.version === null ? {} : { "if-match": `"${editing.version}"` },
          body,
        });
        let r;
        try {
          r = await save();
        } catch (e) {
          if (e.status !== 412) throw e;
          // Its version moved: saved all the same if only a tick, a pause or a run by hand
          // moved it (its spec is still the one Edit showed), else refused.
          const now = await api(`/v1/schedules/${editing.id}`);
          if (JSON.stringify(now.spec) !== editing.spec || !Number.isSafeInteger(now.version)) throw e;
          editing.version = now.version;
          r = await save();
        }
        edit.hidden = true;
        refusal.replaceChildren();
        changes.wrote(r);
      } catch (e) {
        refusal.replaceChildren(e.status === 412
          ? failure("The schedule was changed since Edit was clicked: click Edit to see it as it is now, and make your change again.")
          : failure(e));
      }
    },
  }, el("span", { class: "mono" }), cron, timezone, overlap, catchUp, inputs,
  el("button", { type: "submit" }, "Save"),
  el("button", { type: "button", onclick: () => { edit.hidden = true; } }, "Cancel"), refusal);
  const editOf = (id, spec, version) => {
    refusal.replaceChildren();
    editing.id = id;
    editing.version = Number.isSafeInteger(version) ? version : null;
    editing.spec = JSON.stringify(spec);
    editing.inputs = spec.inputs || {};
    edit.firstChild.textContent = id;
    cron.value = spec.cron || "";
    timezone.value = spec.timezone || "";
    overlap.value = spec.overlap || "skip";
    catchUp.value = spec.catch_up || "none";
    inputs.value = Object.keys(editing.inputs).length ? JSON.stringify(editing.inputs) : "";
    edit.hidden = false;
    cron.focus();
  };
  show(el("h1", {}, "Schedules"), edit, problem,
    table(["Workflow", "Cron", "State", "Next tick", "Last tick", "Last run", "Ticks", ""], body), more);
  changes.shown = every(3000, async (view) => {
    try {
      await whoami();
      const answer = await changes.api(`/v1/schedules?${page}`);
      if (view.stopped) return;
      problem.replaceChildren();
      olderLink(more, "#/schedules", page, answer.next_cursor, "Older schedules →");
      body.replaceChildren(...(answer.items || []).map((x) => {
        const spec = x.spec || {};
        const workflow = typeof spec.workflow === "string" ? spec.workflow : (spec.workflow && spec.workflow.name) || "";
        // Only a schedule's id goes into the API's paths.
        const id = RUN_ID.test(x.id) ? x.id : null;
        const button = mayAct() && id
          ? el("span", {},
            el("button", { type: "button", onclick: () => (x.paused ? changes.act(`/v1/schedules/${id}/resume`) : changes.act(`/v1/schedules/${id}/pause`)) }, x.paused ? "Resume" : "Pause"),
            " ",
            el("button", { type: "button", title: "Start a run of its workflow now", onclick: () => changes.act(`/v1/schedules/${id}/trigger`) }, "Run now"),
            " ",
            el("button", { type: "button", class: "edit", title: "Change its expression, time zone, policies or inputs", onclick: () => editOf(id, spec, x.version) }, "Edit"))
          : null;
        return el("tr", {},
          el("td", {}, workflow),
          el("td", { class: "mono" }, `${spec.cron || ""}${spec.timezone ? ` (${spec.timezone})` : ""}`),
          el("td", {}, x.paused ? badge("paused") : badge("active")),
          el("td", {}, when(x.next_tick)),
          el("td", {}, when(x.last_tick)),
          el("td", { class: "mono" }, x.last_run_id && RUN_ID.test(x.last_run_id) ? el("a", { href: `#/runs/${x.last_run_id}` }, x.last_run_id) : ""),
          el("td", {}, x.ticks),
          el("td", {}, button));
      }));
      if (!body.children.length) body.append(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "No schedules.")));
    } catch (e) {
      problem.replaceChildren(failure(e));
    }
  });
}

function workflowsView(query) {
  const page = pageParams(new URLSearchParams(query));
  const problem = el("div");
  const body = el("tbody");
  const more = el("p");
  show(el("h1", {}, "Workflows"), problem,
    table(["Workflow", "Version", "Steps", "Stored", ""], body), more);
  every(10000, async (view) => {
    try {
      const answer = await api(`/v1/workflows?${page}`);
      if (view.stopped) return;
      problem.replaceChildren();
      olderLink(more, "#/workflows", page, answer.next_cursor, "More workflows →");
      body.replaceChildren(...(answer.items || []).map((w) => {
        const steps = (w.definition && Array.isArray(w.definition.steps)) ? w.definition.steps.length : "";
        const runs = new URLSearchParams({ workflow: w.name });
        return el("tr", {}, el("td", {}, w.name), el("td", {}, w.version), el("td", {}, steps), el("td", {}, when(w.created_at)),
          el("td", {}, el("a", { href: `#/runs?${runs}` }, "Runs →")));
      }));
      if (!body.children.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No stored workflows.")));
    } catch (e) {
      problem.replaceChildren(failure(e));
    }
  });
}

// The tenant's webhook endpoints: their state (a disabled one says why, and an admin may
// enable it), each linking to its failed deliveries. An admin may add one (its signing secret
// is shown once, as the API answers it once) and delete one (a second click confirms).
function webhooksView(query) {
  const page = pageParams(new URLSearchParams(query));
  const more = el("p");
  const problem = el("div");
  const body = el("tbody");
  const made = el("div");
  const url = el("input", { name: "url", placeholder: "https://… or mailto:…", size: 40, required: true });
  const format = el("select", { name: "format" }, ["standard_webhooks", "slack", "email"].map((f) => el("option", { value: f }, f)));
  const events = el("select", { name: "events" }, [["", "every run's end"], ["run.succeeded", "run.succeeded"], ["run.failed", "run.failed"]].map(([v, t]) => el("option", { value: v }, t)));
  const changes = changing(problem);
  const add = adminForm(problem, "Add endpoint", [url, format, events], async () => {
    const r = await api("/v1/webhook-endpoints", {
      method: "POST",
      body: { url: url.value.trim(), format: format.value, event_types: events.value ? [events.value] : [] },
    });
    url.value = "";
    made.replaceChildren(el("p", {}, "Added. Its signing secret, shown this once: ", el("code", { class: "secret" }, r.secret)));
    changes.wrote(r);
  });
  show(el("h1", {}, "Webhooks"), add, made, problem, table(["Endpoint", "Format", "Events", "State", "", "", ""], body), more);
  changes.shown = every(5000, async (view) => {
    try {
      await whoami();
      const answer = await changes.api(`/v1/webhook-endpoints?${page}`);
      if (view.stopped) return;
      problem.replaceChildren();
      olderLink(more, "#/webhooks", page, answer.next_cursor, "More endpoints →");
      const admin = isAdmin();
      add.hidden = !admin;
      body.replaceChildren(...(answer.items || []).map((x) => {
        // Only an endpoint's id goes into the API's paths and the page's links.
        const id = RUN_ID.test(x.id) ? x.id : null;
        const state = x.disabled_at ? el("span", { title: x.disabled_reason || "" }, badge("disabled"), ` ${when(x.disabled_at)}`) : badge("active");
        const button = x.disabled_at && id && admin
          ? el("button", { type: "button", onclick: () => changes.act(`/v1/webhook-endpoints/${id}/enable`) }, "Enable")
          : null;
        const del = id && removal(changes, id, admin, () => changes.remove(`/v1/webhook-endpoints/${id}`, id));
        return el("tr", {},
          el("td", { class: "mono" }, x.url),
          el("td", {}, x.format),
          el("td", {}, (x.event_types || []).join(", ") || "all"),
          el("td", {}, state),
          el("td", {}, button),
          el("td", {}, id ? el("a", { href: `#/webhooks/${id}` }, "Failed deliveries →") : ""),
          el("td", {}, del));
      }));
      if (!body.children.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No webhook endpoints.")));
    } catch (e) {
      problem.replaceChildren(failure(e));
    }
  });
}

// The tenant's repository connections, oldest first: the forge and repository, which pushes
// start which workflow, the path the forge posts to, and whether its runs report commit
// statuses, with the last one given up (when, the run, why) until one goes through again. An
// admin may delete one (a second click confirms); connecting one takes its secrets, so that
// is left to the API and the CLI.
function repositoriesView(query) {
  const page = pageParams(new URLSearchParams(query));
  const more = el("p");
  const problem = el("div");
  const body = el("tbody");
  const changes = changing(problem);
  show(el("h1", {}, "Repositories"), problem,
    table(["Repository", "Pushes", "Workflow", "Webhook path", "Commit statuses", ""], body), more);
  changes.shown = every(5000, async (view) => {
    try {
      await whoami();
      const answer = await changes.api(`/v1/repo-connections?${page}`);
      if (view.stopped) return;
      problem.replaceChildren();
      olderLink(more, "#/repositories", page, answer.next_cursor, "More repositories →");
      const admin = isAdmin();
      body.replaceChildren(...(answer.items || []).map((x) => {
        // Only a connection's id goes into the API's paths, only a run id into links.
        const id = RUN_ID.test(x.id) ? x.id : null;
        // (No branches named: every branch's pushes, as git-integration judges them.)
        const pushes = [
          (x.branches || []).length ? `branches ${x.branches.join(", ")}` : "every branch",
          (x.tags || []).length ? `tags ${x.tags.join(", ")}` : "",
          (x.paths || []).length ? `changing ${x.paths.join(", ")}` : "",
        ].filter(Boolean).join("; ");
        const f = x.status_failure;
        const statuses = !x.reports_status ? el("span", { class: "muted" }, "not reported")
          : !f ? badge("active")
          : el("span", {},
            badge("failed"), ` ${when(f.at)} `,
            RUN_ID.test(f.run_id || "") ? el("a", { href: `#/runs/${f.run_id}` }, "its run") : "",
            el("div", { class: "muted" }, `${f.state || ""}: ${f.error || ""}`));
        const del = id && removal(changes, id, admin, () => changes.remove(`/v1/repo-connections/${id}`, id));
        return el("tr", {},
          el("td", { class: "mono" }, `${x.forge}: ${x.repository}`),
          el("td", {}, pushes),
          el("td", { class: x.workflow ? "" : "mono" }, x.workflow || (x.pipeline_file ? `from ${x.pipeline_file}` : "")),
          el("td", { class: "mono" }, x.webhook_path),
          el("td", {}, statuses),
          el("td", {}, del));
      }));
      if (!body.children.length) body.append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No repositories connected.")));
    } catch (e) {
      problem.replaceChildren(failure(e));
    }
  });
}

// An endpoint's deliveries given up, newest first, a page at a time (the page's address may
// carry `cursor` and `limit`); each may be sent again, or all not yet sent again at once.
function failedDeliveriesView(id, query) {
  const page = pageParams(new URLSearchParams(query));
  const problem = el("div");
  const body = el("tbody");
  const more = el("p");
  const sent = el("span", { class: "muted" });
  const changes = changing(problem);
  // The API sends at most 100 a request and says whether more are left: ask again while it
  // does, up to 1,000 a click, each time after the read side holds the last request's sends
  // (else it would pick the same ones again). What was sent is said even when a request fails.
  const sendAll = async () => {
    all.disabled = true;
    let count = 0;
    let left = false;
    try {
      // After a change made from this page (a row's "Send again"), the first asks after it too.
      let seq = changes.fresh;
      for (let i = 0; i < 10; i++) {
        const r = await api(`/v1/webhook-endpoints/${id}/failed-deliveries/retry`, { method: "POST", headers: minSeq(seq) });
        count += r.retried;
        if (r.seq) seq = changes.fresh = r.seq;
        left = r.more;
        if (!left || (changes.shown && changes.shown.stopped)) break;
      }
    } catch (e) {
      problem.replaceChildren(failure(e));
      left = true;
    } finally {
      all.disabled = false;
      sent.textContent = ` ${count} sent again${left ? "; more may be left: send again" : "."}`;
      if (changes.shown) changes.shown.now();
    }
  };
  const all = el("button", { type: "button", class: "send-all", hidden: true, onclick: sendAll }, "Send all again");
  show(el("p", {}, el("a", { href: "#/webhooks" }, "← Webhooks")), el("h1", {}, "Failed deliveries"), problem,
    el("p", {}, all, sent),
    table(["Message", "Failed", "Attempts", "Error", "Sent again", ""], body), more);
  changes.shown = every(5000, async (view) => {
    try {
      await whoami();
      const answer = await changes.api(`/v1/webhook-endpoints/${id}/failed-deliveries?${page}`);
      if (view.stopped) return;
      problem.replaceChildren();
      all.hidden = !mayAct();
      olderLink(more, `#/webhooks/${id}`, page, answer.next_cursor, "Older failures →");
      body.replaceChildren(...(answer.items || []).map((x) => {
        const data = (x.payload && x.payload.data) || {};
        const run = typeof data.run_id === "string" && RUN_ID.test(data.run_id) ? el("a", { href: `#/runs/${data.run_id}` }, "run") : "";
        // Message ids are event ids: only such a one goes into the API's paths.
        const button = x.expired
          ? el("span", { class: "muted", title: "Its event has aged out of the log: it can no longer be sent again." }, "expired")
          : mayAct() && RUN_ID.test(x.message_id)
            ? el("button", { type: "button", onclick: () => changes.act(`/v1/webhook-endpoints/${id}/failed-deliveries/${x.message_id}/retry`) }, "Send again")
            : null;
        return el("tr", {},
          el("td", { class: "mono" }, x.message_id, " ", run),
          el("td", {}, when(x.failed_at)),
          el("td", {}, x.attempts),
          el("td", {}, x.error),
          el("td", {}, when(x.retried_at)),
          el("td", {}, button));
      }));
      if (!body.children.length) body.append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No failed deliveries.")));
    } catch (e) {
      problem.replaceChildren(failure(e));
    }
  });
}

// The tenant's secrets: names and when each was last set, never a value. An admin sets one
// (the value goes to the API and is not kept on the page) and deletes one (a second click
// confirms; the row shows "deleting…" until the list shows it gone). The list looks again after
// either, read after its seq. Only such a name goes into the API's paths.
const SECRET_NAME = /^[A-Z_][A-Z0-9_]{0,63}$/;

function secretsView(query) {
  const page = pageParams(new URLSearchParams(query));
  const more = el("p");
  const problem = el("div");
  const body = el("tbody");
  const said = el("p", { class: "muted" });
  const name = el("input", { name: "name", placeholder: "NAME", pattern: "[A-Z_][A-Z0-9_]*", required: true });
  const value = el("input", { name: "value", type: "password", placeholder: "value", autocomplete: "off", required: true });
  const changes = changing(problem);
  const set = adminForm(problem, "Set secret", [name, value], async () => {
    const n = name.value.trim();
    if (!SECRET_NAME.test(n)) throw new Error("A secret's name is A-Z, 0-9 and _, not starting with a digit, at most 64.");
    const r = await api(`/v1/secrets/${enc(n)}`, { method: "PUT", body: { value: value.value } });
    value.value = "";
    said.textContent = `${n} is set: steps that list it under secrets get it, masked in their output.`;
    changes.wrote(r);
  });
  show(el("h1", {}, "Secrets"), set, said, problem, table(["Name", "Set", ""], body), more);
  const remove = async (n) => {
    if (await changes.remove(`/v1/secrets/${enc(n)}`, n)) said.textContent = `${n} is deleted.`;
  };
  changes.shown = every(5000, async (v) => {
    try {
      await whoami();
      const answer = await changes.api(`/v1/secrets?${page}`);
      if (v.stopped) return;
      problem.replaceChildren();
      olderLink(more, "#/secrets", page, answer.next_cursor, "More secrets →");
      const admin = isAdmin();
      set.hidden = !admin;
      const action = (n) => SECRET_NAME.test(n) && removal(changes, n, admin, () => remove(n));
      body.replaceChildren(...(answer.items || []).map((x) =>
        el("tr", {},
          el("td", { class: "mono" }, x.name),
          el("td", {}, when(x.updated_at)),
          el("td", {}, action(x.name)))));
      if (!body.children.length) body.append(el("tr", {}, el("td", { colspan: 3, class: "muted" }, "No secrets.")));
    } catch (e) {
      problem.replaceChildren(failure(e));
    }
  });
}

// The tenant's API keys (admins): name, role, prefix, when each was made, last used and
// revoked, never a key. An admin issues one (shown once, as the API answers it once) and
// revokes one (a second click confirms; not the key this page is signed in with).
function keysView(query) {
  const page = pageParams(new URLSearchParams(query));
  const more = el("p");
  const problem = el("div");
  const body = el("tbody");
  const made = el("div");
  const name = el("input", { name: "name", placeholder: "name (what uses it)", maxlength: 200 });
  const role = el("select", { name: "role" }, ["viewer", "operator", "admin"].map((r) => el("option", { value: r }, r)));
  const changes = changing(problem);
  const add = adminForm(problem, "Issue key", [name, role], async () => {
    const n = name.value.trim();
    const r = await api("/v1/keys", { method: "POST", body: { role: role.value, name: n || null } });
    name.value = "";
    made.replaceChildren(el("p", {}, `Issued ${r.role} key${n ? ` ${n}` : ""}, shown this once: `, el("code", { class: "secret" }, r.key)));
    changes.wrote(r);
  });
  show(el("h1", {}, "API keys"), add, made, problem,
    table(["Name", "Role", "Prefix", "Created", "Last used", "Revoked", ""], body), more);
  changes.shown = every(5000, async (view) => {
    try {
      await whoami();
      const answer = await changes.api(`/v1/keys?${page}`);
      if (view.stopped) return;
      problem.replaceChildren();
      olderLink(more, "#/keys", page, answer.next_cursor, "More keys →");
      const admin = isAdmin();
      add.hidden = !admin;
      // Revoke only when the page knows its own key (else it might offer to revoke that).
      const known = Boolean(me && RUN_ID.test(me.key_id || ""));
      body.replaceChildren(...(answer.items || []).map((x) => {
        // Only a key's id goes into the API's paths.
        const id = RUN_ID.test(x.id) ? x.id : null;
        const action = x.revoked_at || !known || !admin ? null
          : me.key_id === id ? el("span", { class: "muted" }, "this page's key")
          : id && removal(changes, id, true, () => changes.remove(`/v1/keys/${id}`, id), "Revoke", "revoking…");
        return el("tr", { class: x.revoked_at ? "muted" : "" },
          el("td", {}, x.name || ""),
          el("td", {}, x.role),
          el("td", { class: "mono" }, x.prefix),
          el("td", {}, when(x.created_at)),
          el("td", {}, when(x.last_used_at)),
          el("td", {}, when(x.revoked_at)),
          el("td", {}, action));
      }));
      if (!body.children.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No keys.")));
    } catch (e) {
      problem.replaceChildren(failure(e));
    }
  });
}

// The tenant's audit log (admins): every mutating call, newest first, a page at a time (the
// page's address may carry `cursor`, `limit` and `key_id`, as the API takes them).
function auditView(query) {
  const params = new URLSearchParams(query);
  const page = pageParams(params);
  if (RUN_ID.test(params.get("key_id") || "")) page.set("key_id", params.get("key_id"));
  const problem = el("div");
  const body = el("tbody");
  const more = el("p");
  const filtered = page.has("key_id") ? el("p", { class: "muted" }, "Calls of one key only. ", el("a", { href: "#/audit" }, "All calls")) : null;
  show(el("h1", {}, "Audit log"), filtered, problem,
    table(["When", "Who", "Call", "Answered", "From"], body), more);
  every(10000, async (view) => {
    try {
      const answer = await api(`/v1/audit?${page}`);
      if (view.stopped) return;
      problem.replaceChildren();
      olderLink(more, "#/audit", page, answer.next_cursor, "Older calls →");
      body.replaceChildren(...(answer.items || []).map((x) => {
        // A key's calls, linked when its id is one.
        const who = x.key_id && RUN_ID.test(x.key_id)
          ? el("a", { href: `#/audit?${new URLSearchParams({ key_id: x.key_id })}`, title: "This key's calls" }, x.actor)
          : x.actor;
        return el("tr", {},
          el("td", {}, when(x.at)),
          el("td", { class: "mono" }, who),
          el("td", { class: "mono" }, `${x.method} ${x.path}`),
          el("td", {}, x.status),
          el("td", { class: "mono", title: x.user_agent || "" }, x.ip || ""));
      }));
      if (!body.children.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No calls recorded.")));
    } catch (e) {
      problem.replaceChildren(failure(e));
    }
  });
}

// --- routing --------------------------------------------------------------------------------

function route() {
  const signedIn = Boolean(sessionStorage.getItem(KEY));
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("sign-out").hidden = !signedIn;
  if (!signedIn) {
    document.getElementById("who").textContent = "";
    return signIn();
  }
  whoami();
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "runs" && parts[1]) {
    // Only a run id goes into the API's paths: a crafted link cannot aim the key elsewhere.
    if (!RUN_ID.test(parts[1])) {
      current.stop();
      return show(el("p", {}, el("a", { href: "#/runs" }, "← Runs")), el("p", { class: "error" }, "That is not a run id."));
    }
    return runView(parts[1], parts[2] === "steps" ? parts[3] : null);
  }
  if (parts[0] === "executors") return executorsView();
  if (parts[0] === "schedules") return schedulesView(query);
  if (parts[0] === "workflows") return workflowsView(query);
  if (parts[0] === "webhooks" && parts[1]) {
    if (!RUN_ID.test(parts[1])) {
      current.stop();
      return show(el("p", {}, el("a", { href: "#/webhooks" }, "← Webhooks")), el("p", { class: "error" }, "That is not an endpoint id."));
    }
    return failedDeliveriesView(parts[1], query);
  }
  if (parts[0] === "webhooks") return webhooksView(query);
  if (parts[0] === "repositories") return repositoriesView(query);
  if (parts[0] === "audit") return auditView(query);
  if (parts[0] === "secrets") return secretsView(query);
  if (parts[0] === "keys") return keysView(query);
  return runsView(query || "");
}

// Asks who the key is, once (callers meanwhile share the one request): its tenant and role
// show in the header, and a viewer's pages offer no actions. (A gateway too old to answer
// leaves the buttons; the API judges them.)
function whoami() {
  if (me) return Promise.resolve(me);
  if (!asking) {
    const key = sessionStorage.getItem(KEY);
    asking = api("/v1/whoami")
      .then((who) => {
        // Signed out, or in with another key, meanwhile: this answer is not about the key now.
        if (sessionStorage.getItem(KEY) !== key) return;
        me = who;
        document.getElementById("who").textContent = `${who.tenant} · ${who.role}`;
        // The audit log and the keys are an admin's to read: no links for other keys.
        for (const link of document.querySelectorAll('#nav a.admin')) link.hidden = !isAdmin();
      })
      .catch(() => {
        // Shown nowhere: the views say what is wrong with the key.
      })
      .finally(() => {
        asking = null;
      });
  }
  return asking;
}

// A viewer's key may not cancel, rerun, pause, resume or send a delivery again: no buttons for
// it (the API refuses them anyway). Enabling an endpoint is an admin's.
const mayAct = () => !me || me.role !== "viewer";
// Keys, secrets, endpoints (enabling one too), deleting a repository connection and the audit
// log are an admin's.
const isAdmin = () => Boolean(me && me.role === "admin");

document.getElementById("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  me = null;
  location.hash = "";
  route();
});
window.addEventListener("hashchange", route);
route();
