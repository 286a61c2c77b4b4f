// fedapp-board: pages drawn from the JSON API, refreshed by polling (no framework, no CDN).
// Everything from the API is written with textContent (never parsed as HTML).
"use strict";
(function () {
  const body = document.body;
  const view = body.dataset.view;
  const args = body.dataset.args ? JSON.parse(body.dataset.args) : {};
  const content = document.getElementById("content");
  const POLL_MS = 1000;

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "text") e.textContent = v;
      else if (k === "on") for (const [ev, fn] of Object.entries(v)) e.addEventListener(ev, fn);
      else e.setAttribute(k, v);
    }
    for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid);
    return e;
  }
  function svgEl(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  async function api(path, opts) {
    const r = await fetch(path, Object.assign({ headers: { Accept: "application/json" } }, opts || {}));
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(data.error || r.status + " " + r.statusText);
    return data;
  }
  const fmt = (v, d = 4) => (v === null || v === undefined ? "–" : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(d)) : String(v));
  const when = (t) => (t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z" : "–");
  function dur(s) {
    if (s === null || s === undefined) return "–";
    s = Math.round(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }
  function table(cols, rows, cls) {
    const t = el("table", { class: cls || "grid" });
    t.append(el("thead", {}, el("tr", {}, ...cols.map((c) => el("th", { text: c[0] })))));
    const tb = el("tbody");
    for (const r of rows) tb.append(el("tr", {}, ...cols.map((c) => { const v = c[1](r); return v instanceof Node ? el("td", {}, v) : el("td", { text: fmt(v) }); })));
    t.append(tb);
    return t;
  }
  // a long reason (a traceback) shows its first line; the whole of it on hover
  function short(text) {
    if (!text) return "–";
    const first = String(text).split(/\n| Traceback /)[0];
    const cut = first.length > 220 ? first.slice(0, 220) + "…" : first;
    return el("span", { title: String(text).slice(0, 4000), text: cut === String(text) ? cut : cut + " …" });
  }
  function badge(status) { return el("span", { class: "badge " + String(status || "").split(" ")[0], text: status || "–" }); }
  function pager(data, onPage) {
    const p = el("div", { class: "pager" });
    const pages = Math.max(1, Math.ceil(data.total / data.limit));
    const cur = Math.floor(data.offset / data.limit);
    p.append(el("span", { text: `${data.total} rows · page ${cur + 1}/${pages} ` }));
    if (cur > 0) p.append(el("button", { text: "‹ prev", on: { click: () => onPage(data.offset - data.limit) } }));
    if (cur + 1 < pages) p.append(el("button", { text: "next ›", on: { click: () => onPage(data.offset + data.limit) } }));
    return p;
  }
  function token() { return sessionStorage.getItem("fedapp-board-token") || ""; }
  async function mode() {
    const m = document.getElementById("mode");
    const who = await api("/api/whoami", { headers: { Authorization: "Bearer " + token() } }).catch(() => ({}));
    m.textContent = who.operator ? "operator" : who.writable ? "read-only (no token given)" : "read-only";
    return who;
  }

  // --------------------------------------------------------------- line chart (inline SVG)
  function chart(title, series, opts) {
    const W = 460, H = 200, L = 48, B = 26, T = 20, R = 10;
    const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
    const pts = series.flatMap((s) => s.points.filter((p) => p[1] !== null));
    const text = (x, y, s, a) => { const t = svgEl("text", Object.assign({ x, y }, a || {})); t.textContent = s; svg.append(t); };
    text(L, 13, title, { class: "title" });
    if (!pts.length) { text(W / 2, H / 2, "no data yet", { "text-anchor": "middle" }); return svg; }
    let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
    let y0 = Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
    if (opts && opts.zero) y0 = Math.min(0, y0);
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) y1 = y0 + 1;
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - B - T);
    svg.append(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
    svg.append(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
    for (const y of [y0, (y0 + y1) / 2, y1]) text(L - 4, sy(y) + 4, y.toFixed(3), { "text-anchor": "end", class: "tick" });
    for (const x of [x0, Math.round((x0 + x1) / 2), x1]) text(sx(x), H - 8, String(x), { "text-anchor": "middle", class: "tick" });
    series.forEach((s, i) => {
      const d = s.points.filter((p) => p[1] !== null).map((p, k) => (k ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
      svg.append(svgEl("path", { d, class: "line s" + i }));
      text(W - R - 4, T + 12 + i * 13, s.name, { "text-anchor": "end", class: "legend s" + i });
    });
    return svg;
  }
  function spark(series, target) {
    const W = 140, H = 28;
    const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "spark" });
    if (!series.length) return svg;
    const xs = series.map((p) => p[0]), top = Math.max(target || 0, ...series.map((p) => p[1])) || 1;
    const x0 = Math.min(...xs), x1 = Math.max(...xs) === x0 ? x0 + 1 : Math.max(...xs);
    const sx = (x) => 2 + ((x - x0) / (x1 - x0)) * (W - 4), sy = (y) => H - 2 - (y / top) * (H - 4);
    if (target) svg.append(svgEl("line", { x1: 0, x2: W, y1: sy(target), y2: sy(target), class: "target" }));
    svg.append(svgEl("path", { d: series.map((p, k) => (k ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" "), class: "line s0" }));
    return svg;
  }

  // --------------------------------------------------------------- runs list
  const filters = { status: "", task: "", strategy: "", privacy: "" };
  let runsOffset = 0;
  async function viewRuns() {
    const q = new URLSearchParams(Object.entries(filters).filter(([, v]) => v));
    q.set("offset", runsOffset); q.set("limit", 50);
    const data = await api("/api/runs?" + q);
    const bar = el("form", { class: "filters", id: "filters" });
    for (const key of Object.keys(filters)) {
      const s = el("select", { name: key, id: "filter-" + key, on: { change: (e) => { filters[key] = e.target.value; runsOffset = 0; refresh(); } } });
      s.append(el("option", { value: "", text: key + ": all" }));
      for (const v of data.facets[key] || []) { const o = el("option", { value: v, text: v }); if (v === filters[key]) o.selected = true; s.append(o); }
      bar.append(s);
    }
    const groups = new Map();
    for (const r of data.items) { const g = r.sweep || ""; if (!groups.has(g)) groups.set(g, []); groups.get(g).push(r); }
    const cols = [
      ["run", (r) => el("a", { href: "/runs/" + r.id, class: "run-link", "data-run": r.id, text: r.name })],
      ["status", (r) => badge(r.status)],
      ["task", (r) => r.task], ["strategy", (r) => r.strategy], ["privacy", (r) => r.privacy],
      ["round", (r) => `${r.rounds_done ?? 0}/${r.rounds_total ?? "?"}`],
      ["ETA", (r) => (r.status === "running" ? dur(r.eta_s) : "–")],
      ["test acc", (r) => r.test_accuracy], ["best", (r) => r.best_test_accuracy],
      ["clients", (r) => r.num_clients], ["started", (r) => r.started],
    ];
    const out = [bar];
    for (const [g, rows] of groups) {
      if (g) out.push(el("h2", { class: "sweep", text: "sweep " + g }));
      out.push(table(cols, rows, "grid runs"));
    }
    if (!data.items.length) out.push(el("p", { text: "No runs yet: start one (fedapp-inline, fedapp-run …) or point --root at a folder of runs." }));
    out.push(pager(data, (o) => { runsOffset = o; refresh(); }));
    content.replaceChildren(...out);
    return true;
  }

  // --------------------------------------------------------------- one run
  const runState = { clientsOffset: 0, clientsRound: null, ledgerOffset: 0, rounds: [] };
  async function allRounds(id) {
    const have = runState.rounds.length;
    let offset = have;
    for (;;) {
      const d = await api(`/api/runs/${id}/rounds?offset=${offset}&limit=1000`);
      runState.rounds.push(...d.items);
      offset += d.items.length;
      if (!d.items.length || offset >= d.total) break;
    }
    return runState.rounds;
  }
  async function viewRun(who) {
    const id = args.run_id;
    const r = await api(`/api/runs/${id}`);
    const rounds = await allRounds(id);
    const fed = rounds.filter((x) => x.round > 0);
    const pct = r.progress === null ? 0 : Math.round(r.progress * 100);
    const head = el("section", { class: "summary" },
      el("div", {}, el("span", { class: "label", text: "status " }), el("span", { id: "run-status", class: "badge " + r.status, text: r.status })),
      el("div", {}, el("span", { class: "label", text: "round " }), el("span", { id: "run-round", text: String(r.rounds_done ?? 0) }), el("span", { text: " / " + (r.rounds_total ?? "?") })),
      el("div", { class: "progress" }, el("div", { class: "bar", style: null, id: "run-bar", "data-pct": pct })),
      el("div", {}, el("span", { class: "label", text: "ETA " }), el("span", { id: "run-eta", text: r.status === "running" ? dur(r.eta_s) : "–" })),
      el("div", {}, el("span", { class: "label", text: "elapsed " }), el("span", { text: dur(r.elapsed_s) })),
      el("div", {}, el("span", { class: "label", text: "test accuracy " }), el("span", { id: "run-acc", text: fmt(r.test_accuracy) })),
      el("div", {}, el("span", { class: "label", text: "best " }), el("span", { text: `${fmt(r.best_test_accuracy)} (round ${fmt(r.best_round)})` })),
    );
    const facts = table([["key", (x) => x[0]], ["value", (x) => x[1]]], [
      ["task / strategy / privacy", `${r.task} / ${r.strategy} / ${r.privacy}`], ["clients", r.num_clients],
      ["folder", r.output_dir], ["config hash", (r.config_hash || "").slice(0, 16)], ["code version", r.code_version],
      ["launched by", r.launched_by ? `${r.launched_by} on ${r.launched_on}` : "– (imported)"],
      ["status detail", r.status_detail && Object.keys(r.status_detail).length ? JSON.stringify(r.status_detail) : "–"],
    ], "grid facts");
    const pts = (k) => fed.map((x) => [x.round, x[k]]);
    const charts = el("section", { class: "charts" },
      chart("accuracy", [{ name: "test", points: rounds.map((x) => [x.round, x.test_accuracy]) }, { name: "clients", points: pts("client_accuracy") }]),
      chart("loss", [{ name: "test", points: rounds.map((x) => [x.round, x.test_loss]) }, { name: "train", points: pts("train_loss") }]),
      chart("replies / failures", [{ name: "replies", points: pts("num_replies") }, { name: "failures", points: pts("num_failures") }], { zero: true }),
    );
    // per-client table
    const cq = new URLSearchParams({ offset: runState.clientsOffset, limit: 50 });
    if (runState.clientsRound !== null) cq.set("round", runState.clientsRound);
    const cl = await api(`/api/runs/${id}/clients?` + cq);
    const roundPick = el("input", { type: "number", min: 0, value: cl.round ?? "", id: "client-round", on: { change: (e) => { runState.clientsRound = e.target.value === "" ? null : Number(e.target.value); runState.clientsOffset = 0; refresh(); } } });
    const clientTable = table([
      ["client", (c) => c.partition_id], ["phase", (c) => c.phase], ["status", (c) => badge(c.status)], ["reason", (c) => short(c.reason)],
      ["examples", (c) => c.num_examples], ["weight", (c) => c.weight], ["trust", (c) => c.trust], ["tier", (c) => c.tier],
      ["contribution", (c) => c.contribution], ["ε spent", (c) => c.dp_epsilon], ["ε target", (c) => c.dp_target_epsilon], ["train s", (c) => c.train_time_s],
    ], cl.items, "grid clients");
    // privacy ledger
    const led = await api(`/api/runs/${id}/ledger?offset=${runState.ledgerOffset}&limit=50`);
    const ledger = led.total
      ? [table([["client", (x) => x.partition_id], ["ε spent", (x) => x.spent_epsilon], ["ε target", (x) => x.target_epsilon], ["rounds trained", (x) => x.series.length], ["ε over rounds", (x) => spark(x.series, x.target_epsilon)]], led.items, "grid ledger"), pager(led, (o) => { runState.ledgerOffset = o; refresh(); })]
      : [el("p", { text: r.privacy === "none" ? "No differential privacy in this run (privacy=none)." : "No client has reported a DP ledger yet." })];
    // rejections and failures
    const bad = await api(`/api/runs/${id}/audit?limit=50`);
    const nodes = await api(`/api/runs/${id}/nodes?kind=!joined&limit=50`);
    const joined = nodes.by_kind.joined || 0;
    const vers = await api(`/api/runs/${id}/versions?limit=20`);
    content.replaceChildren(
      head, charts,
      el("h2", { text: "Clients " }), el("label", { text: "round " }, roundPick), clientTable, pager(cl, (o) => { runState.clientsOffset = o; refresh(); }),
      el("h2", { text: "Privacy ledger (per client, over rounds)" }), ...ledger,
      el("h2", { text: `Rejected updates, failures and refusals (${bad.total})` }),
      bad.total ? table([["round", (a) => a.round], ["kind", (a) => badge(a.kind)], ["client", (a) => a.partition_id], ["node", (a) => a.node_id], ["reason", (a) => short(a.reason)]], bad.items, "grid audit") : el("p", { text: "None." }),
      el("h2", { text: `Node events: ${joined} joined, ${nodes.total} other` }),
      nodes.total ? table([["kind", (n) => badge(n.kind)], ["client", (n) => n.partition_id], ["node", (n) => n.node_id], ["at (s)", (n) => n.at_s], ["detail", (n) => short(n.detail)]], nodes.items, "grid nodes") : el("p", { text: "No failures, rejoins or refusals." }),
      el("h2", { text: "Model versions" }), versionTable(vers.items, who),
      el("h2", { text: "Run" }), facts,
    );
    document.querySelectorAll("[data-pct]").forEach((b) => { b.style.width = b.dataset.pct + "%"; });
    return r.status === "running";
  }

  // --------------------------------------------------------------- versions
  function versionTable(items, who) {
    return table([
      ["version", (v) => "v" + v.id], ["run", (v) => el("a", { href: "/runs/" + v.run_id, text: v.run_name })],
      ["kind", (v) => v.kind], ["round", (v) => v.round],
      ["test acc", (v) => (v.metrics || {}).test_accuracy], ["parent", (v) => (v.parent_id ? "v" + v.parent_id : "–")],
      ["sha256", (v) => el("code", { text: (v.sha256 || "–").slice(0, 12) })], ["size", (v) => v.size],
      ["file", (v) => (v.file ? el("a", { href: `/api/versions/${v.id}/download`, text: "download" }) : "–")],
      ["released", (v) => (v.released_by ? el("span", { class: "released", "data-version": v.id, text: `by ${v.released_by} at ${when(v.released_unix)}` }) : who && who.operator ? el("button", { class: "release", "data-version": v.id, text: "release", on: { click: () => release(v.id) } }) : "–")],
    ], items, "grid versions");
  }
  async function release(id) {
    const by = document.getElementById("release-by");
    try {
      await api(`/api/versions/${id}/release`, { method: "POST", headers: { "Content-Type": "application/json", Authorization: "Bearer " + token() }, body: JSON.stringify({ by: by ? by.value : "operator" }) });
    } catch (e) { alert(e.message); }
    refresh();
  }
  let versOffset = 0;
  async function viewVersions(who) {
    const data = await api(`/api/versions?offset=${versOffset}&limit=50`);
    const login = el("form", { class: "filters", id: "token-form", on: { submit: (e) => { e.preventDefault(); sessionStorage.setItem("fedapp-board-token", document.getElementById("token").value); start(); } } },
      el("input", { type: "password", id: "token", placeholder: "operator token", autocomplete: "off" }),
      el("input", { type: "text", id: "release-by", placeholder: "your name (recorded)", value: sessionStorage.getItem("fedapp-board-by") || "" }),
      el("button", { type: "submit", text: "use token" }));
    content.replaceChildren(who.writable ? login : el("p", { text: "Read-only board (started without an operator token): releasing is off." }),
      versionTable(data.items, who), pager(data, (o) => { versOffset = o; refresh(); }));
    return false;
  }

  // --------------------------------------------------------------- audit trail
  const auditF = { kind: "", q: "", run_id: "" };
  let auditOffset = 0;
  async function viewAudit() {
    const q = new URLSearchParams(Object.entries(auditF).filter(([, v]) => v));
    q.set("offset", auditOffset); q.set("limit", 100);
    const data = await api("/api/audit?" + q);
    const kind = el("select", { id: "audit-kind", on: { change: (e) => { auditF.kind = e.target.value; auditOffset = 0; refresh(); } } }, el("option", { value: "", text: "kind: all" }));
    for (const k of data.kinds) { const o = el("option", { value: k, text: k }); if (k === auditF.kind) o.selected = true; kind.append(o); }
    const text = el("input", { type: "search", id: "audit-q", placeholder: "reason contains…", value: auditF.q, on: { change: (e) => { auditF.q = e.target.value; auditOffset = 0; refresh(); } } });
    content.replaceChildren(el("form", { class: "filters", on: { submit: (e) => e.preventDefault() } }, kind, text),
      table([["when", (a) => when(a.at_unix)], ["run", (a) => (a.run_id ? el("a", { href: "/runs/" + a.run_id, text: a.run_name || a.run_id }) : "–")], ["round", (a) => a.round], ["kind", (a) => badge(a.kind)], ["client", (a) => a.partition_id], ["node", (a) => a.node_id], ["by", (a) => a.actor], ["reason", (a) => short(a.reason)]], data.items, "grid audit"),
      pager(data, (o) => { auditOffset = o; refresh(); }));
    return true;
  }

  const views = { runs: viewRuns, run: viewRun, versions: viewVersions, audit: viewAudit };
  let who = {}, timer = null, busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    clearTimeout(timer);
    let again = false;
    try { again = await views[view](who); body.dataset.loaded = String(Date.now()); }
    catch (e) { content.replaceChildren(el("p", { class: "error", text: "Could not load: " + e.message })); again = true; }
    finally { busy = false; }
    if (again) timer = setTimeout(refresh, POLL_MS);
  }
  async function start() {
    const by = document.getElementById("release-by");
    if (by) sessionStorage.setItem("fedapp-board-by", by.value);
    who = await mode();
    refresh();
  }
  start();
})();
