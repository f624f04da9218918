// The swarmota operator console: one page over the tracker's admin API.
//
// No framework and no build step: the DOM is built with createElement and text nodes
// only. Strings from the tracker (device ids, report messages, log tails, audit
// details) are never parsed as HTML; the page's Content-Security-Policy requires
// Trusted Types, so the HTML sinks would throw anyway. The admin token lives in this tab's
// sessionStorage and goes out as an Authorization header; the tracker checks the role
// of every request and audits every action, whatever this page shows.
"use strict";

(() => {
  const TOKEN_KEY = "swarmota-console-token";
  const ROLES = ["viewer", "operator", "admin"];
  // The role each rollout action needs: tracker/admin.py ACTION_ROLES (a test keeps
  // the two equal). The tracker enforces it; the page only hides what a role cannot do.
  const ACTION_ROLES = {
    pause: "operator", resume: "operator", advance: "operator", abort: "operator",
    force: "operator", revoke: "admin",
  };
  const ACTION_HINTS = {
    pause: "Admit nobody new; devices in flight finish.",
    resume: "Go on from the current stage (overrides a halt).",
    advance: "Open the next stage now, whatever soak and successes say.",
    abort: "Stop for good; a new rollout of the release is the next generation.",
    force: "Offer the release to every device now: no stages, no cap, no halt rules.",
    revoke: "Withdraw the release for good.",
  };
  const CONFIRM = {
    abort: "Abort this rollout? Nobody new will be offered the release.",
    force: "Force this rollout? Every device will be offered the release now, and the " +
      "halt rules stop protecting the fleet.",
    revoke: "Revoke this release? It is withdrawn for good.",
  };
  const RESTARTABLE = ["none", "halted", "aborted"];
  const POLL_ROLLOUT_MS = 2000;
  const POLL_LIST_MS = 5000;
  const API_BASE = new URL("../v1/admin/", document.baseURI);
  const OPENAPI_URL = new URL("../v1/openapi.json", document.baseURI);

  let token = sessionStorage.getItem(TOKEN_KEY);
  let me = null; // {name, role} of the token, from GET whoami
  let pollTimer = null;
  let renderCount = 0; // a newer page makes the older one's late answers moot

  const $ = (id) => document.getElementById(id);

  // --- the admin API ---------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { authorization: "Bearer " + token };
    const init = { method, headers, credentials: "omit", cache: "no-store",
                   redirect: "error" };
    if (body !== undefined) {
      headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(new URL(path, API_BASE), init);
    } catch (err) {
      throw new ApiError(0, "the tracker cannot be reached (" + err.message + ")");
    }
    let answer = null;
    try {
      answer = await response.json();
    } catch (err) {
      answer = null;
    }
    if (!response.ok) {
      const message = answer && typeof answer.error === "string"
        ? answer.error : "HTTP " + response.status;
      if (response.status === 401) signOut("The tracker refused the token: " + message);
      throw new ApiError(response.status, message);
    }
    return answer;
  }

  const seg = (s) => encodeURIComponent(s);
  const releasePath = (product, version) => seg(product) + "/" + seg(version);

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) {
      if (v !== null && v !== undefined && v !== "") q.set(k, String(v));
    }
    const s = q.toString();
    return s ? "?" + s : "";
  }

  // --- building the DOM (text only) -------------------------------------------------

  function add(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "on") {
        for (const [event, handler] of Object.entries(value)) {
          node.addEventListener(event, handler);
        }
      } else {
        node.setAttribute(name, value === true ? "" : String(value));
      }
    }
    return add(node, children);
  }

  const SVG_NS = "http://www.w3.org/2000/svg";

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      node.setAttribute(name, String(value));
    }
    return add(node, children);
  }

  // An in-page link: the route is always built here, never taken from the tracker.
  function link(route, ...text) {
    return el("a", { href: "#/" + route.map(seg).join("/") }, ...text);
  }

  function table(columns, rows, empty) {
    if (!rows.length) return el("p", { class: "empty" }, empty || "Nothing yet.");
    return el("table", {},
      el("thead", {}, el("tr", {}, columns.map((c) => el("th", { class: c.class }, c.title)))),
      el("tbody", {}, rows.map((row) => el("tr", { class: row._class },
        columns.map((c) => el("td", { class: c.class }, c.cell(row)))))));
  }

  function facts(pairs) {
    return el("dl", { class: "facts" }, pairs.filter((p) => p).map(([k, v]) => [
      el("dt", {}, k), el("dd", {}, v === null || v === undefined || v === "" ? "-" : v)]));
  }

  const badge = (text, kind) => el("span", { class: "badge " + (kind || text) }, text);

  function card(label, value, detail, kind) {
    return el("div", { class: "card " + (kind || "") },
      el("div", { class: "card-value" }, value), el("div", { class: "card-label" }, label),
      detail ? el("div", { class: "card-detail" }, detail) : null);
  }

  // --- formatting -------------------------------------------------------------------

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return (i ? v.toFixed(v < 10 ? 2 : 1) : String(v)) + " " + units[i];
  }

  const percent = (share) => (100 * share).toFixed(share > 0 && share < 0.01 ? 2 : 0) + "%";

  function when(epochS) {
    if (epochS === null || epochS === undefined) return "-";
    return new Date(epochS * 1000).toLocaleString();
  }

  function ago(epochS) {
    const s = Math.max(0, Date.now() / 1000 - epochS);
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 2 * 86400) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " days ago";
  }

  function duration(s) {
    if (s < 120) return s + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(s % 3600 ? 1 : 0) + " h";
  }

  const short = (hex) => (hex ? hex.slice(0, 12) : "");
  const sum = (values) => values.reduce((a, b) => a + b, 0);

  // --- session ----------------------------------------------------------------------

  const may = (role) => me !== null && ROLES.indexOf(me.role) >= ROLES.indexOf(role);

  function flash(message, kind) {
    const node = $("flash");
    node.textContent = message || "";
    node.className = kind || "";
    node.hidden = !message;
  }

  function stopPolling() {
    if (pollTimer !== null) clearTimeout(pollTimer);
    pollTimer = null;
  }

  function showSignIn(message) {
    $("sign-in").hidden = false;
    $("page").hidden = true;
    $("nav").hidden = true;
    $("sign-out").hidden = true;
    $("who").textContent = "";
    $("sign-in-error").textContent = message || "";
    flash("");
    $("token").focus();
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    token = null;
    me = null;
    renderCount += 1;
    stopPolling();
    $("page").replaceChildren();
    showSignIn(message);
  }

  async function start() {
    try {
      me = await api("GET", "whoami");
    } catch (err) {
      if (err.status !== 401) showSignIn(err.message);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("sign-in").hidden = true;
    $("page").hidden = false;
    $("nav").hidden = false;
    $("sign-out").hidden = false;
    $("who").textContent = me.name + " (" + me.role + ")";
    for (const a of document.querySelectorAll("#nav a[data-role]")) {
      a.hidden = !may(a.dataset.role);
    }
    route();
  }

  // --- routing: #/page/arg/arg?query --------------------------------------------------

  const PAGES = {
    fleet: fleetPage, devices: devicesPage, device: devicePage, releases: releasesPage,
    rollouts: rolloutsPage, rollout: rolloutPage, audit: auditPage,
  };

  function route() {
    if (me === null) return;
    stopPolling();
    flash("");
    const raw = location.hash.replace(/^#\/?/, "");
    const cut = raw.indexOf("?");
    let parts;
    try {
      parts = (cut < 0 ? raw : raw.slice(0, cut)).split("/").filter(Boolean)
        .map(decodeURIComponent);
    } catch (err) {
      parts = ["?"];
    }
    const name = parts[0] || "fleet";
    const count = ++renderCount;
    const root = $("page");
    root.replaceChildren();
    for (const a of document.querySelectorAll("#nav a")) {
      a.classList.toggle("current", a.dataset.page === name);
    }
    const ctx = {
      root, args: parts.slice(1),
      params: new URLSearchParams(cut < 0 ? "" : raw.slice(cut + 1)),
      alive: () => count === renderCount,
    };
    const page = PAGES[name];
    if (!page) {
      root.append(el("h1", {}, "Not found"), el("p", {}, link(["fleet"], "Back to the fleet")));
      return;
    }
    page(ctx).catch((err) => {
      if (ctx.alive() && err.status !== 401) {
        root.append(el("p", { class: "error", role: "alert" }, err.message));
      }
    });
  }

  // Run refresh() every ms while the page is shown (not while the tab is hidden); a
  // failure is shown on the page and the polling goes on.
  function poll(ctx, refresh, ms, problem) {
    const tick = async () => {
      if (!ctx.alive()) return;
      if (!document.hidden) {
        try {
          await refresh();
          problem.textContent = "";
        } catch (err) {
          if (err.status === 401) return;
          problem.textContent = "Live update failed: " + err.message;
        }
      }
      if (ctx.alive()) pollTimer = setTimeout(tick, ms);
    };
    pollTimer = setTimeout(tick, ms);
  }

  const problemLine = () => el("p", { class: "error", role: "alert" });

  // --- fleet --------------------------------------------------------------------------

  async function fleetPage(ctx) {
    const view = el("div");
    const problem = problemLine();
    const find = el("input", { id: "find-device", type: "search", placeholder: "device id",
                               "aria-label": "Find devices by id" });
    ctx.root.append(
      el("div", { class: "title" }, el("h1", {}, "Fleet"),
        el("form", { class: "inline", on: { submit: (e) => {
          e.preventDefault();
          location.hash = "#/devices" + query({ search: find.value.trim() });
        } } }, find, el("button", { type: "submit" }, "Find"))),
      problem, view);
    const refresh = async () => {
      const fleet = await api("GET", "fleet");
      if (ctx.alive()) view.replaceChildren(...renderFleet(fleet));
    };
    await refresh();
    poll(ctx, refresh, POLL_LIST_MS, problem);
  }

  function renderFleet(f) {
    const rows = [];
    for (const [product, versions] of Object.entries(f.versions)) {
      for (const [version, devices] of Object.entries(versions)) {
        const stale = (f.stale[product] || {})[version] || 0;
        rows.push({ product, version, devices, stale, online: devices - stale });
      }
    }
    const stale = sum(rows.map((r) => r.stale));
    const failures = sum(Object.values(f.failures_last_day));
    const recent = Object.entries(f.reports_last_day).map(([product, byStatus]) => ({
      product, byStatus, failures: f.failures_last_day[product] || 0,
      _class: f.failures_last_day[product] ? "bad" : "" }));
    const live = f.rollouts.filter((r) => ["active", "paused", "halted", "forced",
                                           "scheduled"].includes(r.phase));
    return [
      el("div", { class: "cards" },
        card("devices", f.devices),
        card("online", f.devices - stale, "heard of in the last " + duration(f.stale_s)),
        card("stale", stale, "silent for " + duration(f.stale_s) + " or more",
             stale ? "warn" : ""),
        card("failures in the last day", failures, "download, verify, install, health",
             failures ? "bad" : ""),
        card("origin bandwidth saved", percent(f.bandwidth_saved),
             bytes(f.bytes_peers) + " from peers, " + bytes(f.bytes_origin) + " from the origin")),
      el("h2", {}, "Devices per product and version"),
      table([
        { title: "Product", cell: (r) => r.product },
        { title: "Version", cell: (r) => r.version },
        { title: "Devices", class: "num", cell: (r) => r.devices },
        { title: "Online", class: "num", cell: (r) => r.online },
        { title: "Stale", class: "num", cell: (r) => (r.stale ? badge(String(r.stale), "warn") : "0") },
        { title: "", cell: (r) => el("a", { href: "#/devices" + query({ product: r.product,
                                                                          version: r.version }) },
                                      "list") },
      ], rows, "No device has checked in yet."),
      el("h2", {}, "Reports in the last day"),
      table([
        { title: "Product", cell: (r) => r.product },
        { title: "Failures", class: "num", cell: (r) => r.failures },
        { title: "Reports by status", cell: (r) => Object.entries(r.byStatus)
          .map(([name, n]) => name + " " + n).join(", ") },
      ], recent, "No report in the last day."),
      el("h2", {}, "Rollouts under way"),
      rolloutTable(live, "No rollout is under way."),
    ];
  }

  function rolloutTable(rollouts, empty) {
    return table([
      { title: "Release", cell: (r) => link(["rollout", r.product, r.version],
                                            r.product + " " + r.version) },
      { title: "Generation", class: "num", cell: (r) => r.generation },
      { title: "Phase", cell: (r) => badge(r.phase) },
      { title: "Stage", cell: (r) => r.stage },
    ], rollouts, empty);
  }

  // --- devices ------------------------------------------------------------------------

  async function devicesPage(ctx) {
    const p = ctx.params;
    const field = (name, label, placeholder) => el("label", {}, label,
      el("input", { name, value: p.get(name) || "", placeholder: placeholder || "" }));
    const seen = el("select", { name: "seen" },
      ["all", "online", "stale"].map((v) => el("option", { value: v,
                                                           selected: (p.get("seen") || "all") === v }, v)));
    const form = el("form", { class: "filters", on: { submit: (e) => {
      e.preventDefault();
      const values = Object.fromEntries(new FormData(form).entries());
      if (values.seen === "all") delete values.seen;
      location.hash = "#/devices" + query(values);
    } } },
    field("search", "Device id contains", "device-0"), field("product", "Product"),
    field("version", "Version"), field("group", "Label or tag"),
    el("label", {}, "Seen", seen), el("button", { type: "submit" }, "Filter"));
    const list = el("div");
    ctx.root.append(el("h1", {}, "Devices"), form, list);
    const filter = {};
    for (const name of ["search", "product", "version", "group"]) filter[name] = p.get(name);
    if (p.get("seen") === "online" || p.get("seen") === "stale") {
      const fleet = await api("GET", "fleet");
      filter[p.get("seen") === "stale" ? "stale_s" : "seen_within_s"] = fleet.stale_s;
    }
    const rows = [];
    const more = async (after) => {
      const page = await api("GET", "devices" + query({ ...filter, after, limit: 100 }));
      if (!ctx.alive()) return;
      rows.push(...page.devices);
      list.replaceChildren(deviceTable(rows),
        page.next ? el("button", { type: "button", on: { click: () => more(page.next) } },
                       "More devices") : null);
    };
    await more(null);
  }

  function deviceTable(devices) {
    return table([
      { title: "Device", cell: (d) => link(["device", d.device_id], d.device_id) },
      { title: "Product", cell: (d) => d.product },
      { title: "Version", cell: (d) => d.version },
      { title: "Last heard of", cell: (d) => el("span", { title: when(d.last_seen) }, ago(d.last_seen)) },
      { title: "Labels and tags", cell: (d) => [...d.labels, ...d.tags].join(" ") },
      { title: "Latest rollout", cell: (d) => (d.rollout
        ? [d.rollout.version + " ", badge(d.rollout.state, d.rollout.state.replace(" ", "-"))]
        : "-") },
    ], devices, "No device matches.");
  }

  async function devicePage(ctx) {
    const id = ctx.args[0] || "";
    const view = el("div");
    ctx.root.append(el("h1", {}, "Device ", el("code", {}, id)), view);
    const refresh = async () => {
      const d = await api("GET", "devices/" + seg(id) + "?limit=20");
      if (ctx.alive()) view.replaceChildren(...renderDevice(d, refresh));
    };
    await refresh();
  }

  function renderDevice(d, refresh) {
    const out = [facts([
      ["Product", d.product], ["Hardware", d.hardware_id],
      ["Version", d.version + " (counter " + d.release_counter + ")"],
      ["Last heard of", ago(d.last_seen) + ", " + when(d.last_seen)],
      ["Network", d.network_id], ["Region", d.region],
      ["Labels (declared)", d.labels.join(" ")],
      ["Components", d.components ? d.components.map((c) => c.name + " " + c.version).join(", ") : ""],
    ])];
    out.push(el("h2", {}, "Tags"), tagEditor(d, refresh));
    out.push(el("h2", {}, "Rollouts"), table([
      { title: "Release", cell: (r) => link(["rollout", r.product, r.version], r.version) },
      { title: "Generation", class: "num", cell: (r) => r.generation },
      { title: "Stage", cell: (r) => String(r.stage) },
      { title: "State", cell: (r) => badge(r.state, r.state.replace(" ", "-")) },
      { title: "Status", cell: (r) => (r.status === null ? "-" : r.status + " " + r.status_name) },
      { title: "Message", class: "message", cell: (r) => r.message },
      { title: "Updated", cell: (r) => when(r.updated_at) },
    ], d.rollouts, "Never admitted to a rollout."));
    out.push(el("h2", {}, "Reports"), d.reports.length
      ? el("ol", { class: "reports" }, d.reports.map(reportItem))
      : el("p", { class: "empty" }, "No report."));
    out.push(el("h2", {}, "Certificates"), d.certificates.length
      ? el("ul", {}, d.certificates.map((c) => el("li", {}, el("code", {}, "sha256:" + c))))
      : el("p", { class: "empty" }, "No certificate seen."));
    if (may("admin")) out.push(el("h2", {}, "Revoke"), revokeDeviceForm(d, refresh));
    return out;
  }

  function reportItem(r) {
    const ok = r.status === 0;
    return el("li", { class: "report " + (ok ? "ok" : "bad") },
      el("div", { class: "report-head" },
        badge(r.status + " " + r.status_name, ok ? "ok" : "bad"), " ",
        r.from_version + " \u2192 " + r.to_version, " \u00b7 ", when(r.received_at),
        " \u00b7 ", bytes(r.bytes_origin) + " from the origin, " + bytes(r.bytes_peers) +
        " from peers"),
      r.message ? el("p", { class: "message" }, r.message) : null,
      r.log_tail ? el("details", {}, el("summary", {}, "Log tail"),
                      el("pre", { class: "log" }, r.log_tail)) : null);
  }

  function tagEditor(d, refresh) {
    const chips = el("span", { class: "tags" }, d.tags.length ? d.tags.map((tag) => el("span", { class: "tag" }, tag,
      may("operator") ? el("button", { type: "button", class: "link", "aria-label": "remove tag " + tag,
                                       on: { click: () => tagAction(d, { remove: [tag] }, refresh) } }, "\u00d7") : null))
      : el("span", { class: "empty" }, "No tag."));
    if (!may("operator")) return el("div", {}, chips);
    const input = el("input", { name: "tags", placeholder: "canary-eu lab" });
    return el("div", {}, chips, el("form", { class: "inline tag-form", on: { submit: (e) => {
      e.preventDefault();
      const tags = input.value.split(/[\s,]+/).filter(Boolean);
      if (tags.length) tagAction(d, { add: tags }, refresh);
    } } }, el("label", {}, "Add tags ", input), el("button", { type: "submit" }, "Add")));
  }

  async function tagAction(d, body, refresh) {
    try {
      const answer = await api("POST", "devices/" + seg(d.device_id) + "/tags", body);
      flash("Tags of " + d.device_id + ": " + (answer.tags.join(" ") || "none"), "ok");
      await refresh();
    } catch (err) {
      flash("Tagging refused: " + err.message, "error");
    }
  }

  function revokeDeviceForm(d, refresh) {
    const reason = el("input", { name: "reason", placeholder: "stolen, decommissioned, ..." });
    return el("form", { class: "inline", on: { submit: async (e) => {
      e.preventDefault();
      if (!confirm("Revoke every certificate of " + d.device_id + "? The tracker will refuse it from now on.")) return;
      try {
        const answer = await api("POST", "devices/" + seg(d.device_id) + "/revoke",
                                 { reason: reason.value });
        flash("Revoked " + answer.revoked.length + " certificate(s) of " + d.device_id, "ok");
        await refresh();
      } catch (err) {
        flash("Revocation refused: " + err.message, "error");
      }
    } } }, el("label", {}, "Reason ", reason),
    el("button", { type: "submit", class: "danger" }, "Revoke the device's certificates"));
  }

  // --- releases and new rollouts -------------------------------------------------------

  async function releasesPage(ctx) {
    const view = el("div");
    ctx.root.append(el("h1", {}, "Releases"), view);
    const [answer, defaults] = await Promise.all([api("GET", "releases"),
                                                  may("operator") ? planDefaults() : null]);
    if (!ctx.alive()) return;
    const releases = answer.releases.slice().reverse(); // the newest first
    view.replaceChildren(...(releases.length ? releases.map((r) => releaseCard(r, defaults))
      : [el("p", { class: "empty" }, "No release is registered.")]));
  }

  function releaseCard(r, defaults) {
    const box = el("article", { class: "release", id: "release-" + r.product + "-" + r.version });
    const rollout = r.rollout
      ? [badge(r.phase), " ", link(["rollout", r.product, r.version],
                                   "rollout (generation " + r.generation + ")")]
      : [badge("none"), " offered to nobody"];
    add(box, [el("h2", {}, r.product + " " + r.version),
      facts([["Counter", r.release_counter],
             ["Kind", r.update_type + (r.component ? " " + r.component : "")],
             ["Registered", when(r.added_at)], ["Rollout", rollout]]),
      table([
        { title: "Payload", cell: (p) => p.kind },
        { title: "Encoding", cell: (p) => p.encoding },
        { title: "Size", class: "num", cell: (p) => el("span", { title: p.size + " bytes" }, bytes(p.size)) },
        { title: "From (base image)", cell: (p) => (p.base_sha256 ? el("code", {}, short(p.base_sha256)) : "-") },
        { title: "SHA-256", cell: (p) => el("code", {}, short(p.sha256)) },
      ], r.payloads, "No payload.")]);
    if (defaults && RESTARTABLE.includes(r.phase)) {
      const form = planForm(r, defaults);
      form.hidden = true;
      box.append(el("button", { type: "button", class: "new-rollout", on: { click: () => {
        form.hidden = !form.hidden;
      } } }, r.phase === "none" ? "New rollout\u2026" : "New rollout (next generation)\u2026"), form);
    }
    return box;
  }

  let planDefaultsCache = null;

  async function planDefaults() {
    // The plan's defaults come from the tracker's own OpenAPI document.
    if (planDefaultsCache === null) {
      const response = await fetch(OPENAPI_URL, { credentials: "omit", cache: "no-store" });
      const doc = await response.json();
      const plan = doc.components.schemas.Plan.oneOf[1].properties;
      planDefaultsCache = Object.fromEntries(Object.entries(plan).map(([k, v]) => [k, v.default]));
    }
    return planDefaultsCache;
  }

  // Fields of the plan form: [plan field, label, kind, hint]. Kinds: list (device ids),
  // text, percents (a list), int, share (shown in percent), seconds, bool.
  const PLAN_FIELDS = [
    ["canary_devices", "Canary devices", "list", "device ids, stage 0"],
    ["canary_label", "Canary label or tag", "text", "devices with it are canaries too"],
    ["stages_percent", "Stages (percent of the fleet)", "percents", "the last is 100"],
    ["soak_s", "Soak per stage (seconds)", "seconds", "before a stage may advance"],
    ["min_successes", "Successes to advance", "int", "per stage"],
    ["min_success_rate", "Success rate to advance (%)", "share", ""],
    ["canary_halt_failure_count", "Halt after canary failures", "int", "1: any failing canary"],
    ["halt_failure_rate", "Halt at failure rate over (%)", "share", "in a stage"],
    ["halt_min_sample", "\u2026once a stage has reports", "int", "before the rate counts"],
    ["halt_failure_count", "Halt after failures in all", "int", "over every stage"],
    ["max_in_flight", "Devices in flight at most", "int", "0: no cap"],
    ["retry_rolled_back", "Offer again to devices that rolled back", "bool", ""],
  ];

  function planForm(r, defaults) {
    const inputs = {};
    const rows = PLAN_FIELDS.map(([name, label, kind, hint]) => {
      const value = defaults[name];
      let input;
      if (kind === "bool") {
        input = el("input", { type: "checkbox", name, checked: Boolean(value) });
      } else {
        let shown = value === null || value === undefined ? "" : value;
        if (kind === "list" || kind === "percents") shown = (value || []).join(", ");
        if (kind === "share") shown = String(Math.round(value * 10000) / 100);
        input = el("input", { name, value: shown,
                              inputmode: kind === "int" || kind === "seconds" ? "numeric" : null });
      }
      inputs[name] = [input, kind];
      return el("label", {}, el("span", {}, label), input, hint ? el("small", {}, hint) : null);
    });
    const problem = el("p", { class: "error", role: "alert" });
    const form = el("form", { class: "plan", on: { submit: async (e) => {
      e.preventDefault();
      const plan = {};
      for (const [name, [input, kind]] of Object.entries(inputs)) {
        const text = kind === "bool" ? "" : input.value.trim();
        if (kind === "bool") plan[name] = input.checked;
        else if (kind === "list") plan[name] = text.split(/[\s,]+/).filter(Boolean);
        else if (kind === "percents") plan[name] = text.split(/[\s,]+/).filter(Boolean).map(Number);
        else if (kind === "text") plan[name] = text || null;
        else if (kind === "share") plan[name] = Number(text) / 100;
        else plan[name] = Number(text);
      }
      try {
        await api("POST", "rollouts", { product: r.product, version: r.version, plan });
        location.hash = "#/rollout/" + releasePath(r.product, r.version);
      } catch (err) {
        problem.textContent = "The tracker refused the rollout: " + err.message;
      }
    } } }, el("h3", {}, "Rollout plan for " + r.product + " " + r.version), rows,
    el("button", { type: "submit" }, "Start the rollout"), problem);
    return form;
  }

  // --- rollouts -------------------------------------------------------------------------

  async function rolloutsPage(ctx) {
    const history = ctx.params.get("history") === "1";
    const view = el("div");
    const problem = problemLine();
    ctx.root.append(el("div", { class: "title" }, el("h1", {}, "Rollouts"),
      history ? el("a", { href: "#/rollouts" }, "latest generations only")
        : el("a", { href: "#/rollouts?history=1" }, "every generation")), problem, view);
    const refresh = async () => {
      const answer = await api("GET", "rollouts" + (history ? "?history=1" : ""));
      if (ctx.alive()) view.replaceChildren(rolloutTable(answer.rollouts.slice().reverse(),
                                                         "No rollout yet."));
    };
    await refresh();
    poll(ctx, refresh, POLL_LIST_MS, problem);
  }

  async function rolloutPage(ctx) {
    const [product, version] = ctx.args;
    const path = "rollouts/" + releasePath(product || "", version || "");
    const actions = el("div", { class: "actions" });
    const problem = problemLine();
    const view = el("div");
    ctx.root.append(el("div", { class: "title" }, el("h1", {}, "Rollout of " + product + " " + version),
                       el("span", { class: "live" }, "live")), actions, problem, view);
    const refresh = async () => {
      const [r, devices] = await Promise.all([api("GET", path),
                                              api("GET", path + "/devices?limit=200")]);
      if (!ctx.alive()) return;
      view.replaceChildren(...renderRollout(r, devices.devices));
      actions.replaceChildren(...actionButtons(r, path, refresh));
    };
    await refresh();
    poll(ctx, refresh, POLL_ROLLOUT_MS, problem);
  }

  function actionButtons(r, path, refresh) {
    return r.actions.filter((a) => may(ACTION_ROLES[a])).map((action) => el("button", {
      type: "button", "data-action": action, title: ACTION_HINTS[action],
      class: ["abort", "force", "revoke"].includes(action) ? "danger" : null,
      on: { click: async (e) => {
        if (CONFIRM[action] && !confirm(CONFIRM[action])) return;
        e.target.disabled = true;
        try {
          const answer = await api("POST", path + "/" + action);
          flash(action + ": the rollout is " + answer.phase, "ok");
        } catch (err) {
          flash(action + " refused: " + err.message, "error");
        }
        await refresh().catch(() => {});
      } } }, action[0].toUpperCase() + action.slice(1)));
  }

  function renderRollout(r, devices) {
    const plan = r.plan;
    const out = [facts([
      ["Phase", el("span", { id: "phase" }, badge(r.phase))],
      ["Stage", r.stage + " since " + when(r.stage_started_at)],
      ["Generation", r.generation], ["Started", when(r.created_at)],
      ["Bandwidth saved", percent(r.totals.bandwidth_saved) + " (" + bytes(r.totals.bytes_peers) +
        " from peers, " + bytes(r.totals.bytes_origin) + " from the origin)"],
    ])];
    if (r.halt_reason) {
      out.push(el("section", { class: "halt", role: "alert" },
        el("h2", {}, r.phase === "halted" ? "Halted" : "Halted earlier"),
        el("p", { class: "halt-reason" }, r.halt_reason)));
    }
    if (r.failures.length) {
      out.push(el("section", { id: "failures" }, el("h2", {}, "Latest failures"), table([
        { title: "Device", cell: (f) => link(["device", f.device_id], f.device_id) },
        { title: "Stage", cell: (f) => f.stage },
        { title: "Status", cell: (f) => badge(f.status + " " + f.status_name, "bad") },
        { title: "Message", class: "message", cell: (f) => f.message },
        { title: "When", cell: (f) => when(f.at) },
      ], r.failures.slice().reverse())));
    }
    out.push(el("h2", {}, "Stages"), timeline(r));
    out.push(el("h2", {}, "Bytes per stage: origin vs peers"), bytesChart(r.stages));
    out.push(el("section", { id: "rollout-devices" }, el("h2", {}, "Devices"), table([
      { title: "Device", cell: (a) => link(["device", a.device_id], a.device_id) },
      { title: "Stage", cell: (a) => a.stage },
      { title: "State", cell: (a) => badge(a.state, a.state.replace(" ", "-")) },
      { title: "Status", cell: (a) => (a.status === null ? "-" : a.status + " " + a.status_name) },
      { title: "Message", class: "message", cell: (a) => a.message },
      { title: "Updated", cell: (a) => when(a.updated_at) },
    ], devices, "No device admitted yet.")));
    out.push(el("h2", {}, "Plan"), facts([
      ["Canaries", [...plan.canary_devices, plan.canary_label ? "label " + plan.canary_label : ""]
        .filter(Boolean).join(", ")],
      ["Stages", plan.stages_percent.map((p) => p + "%").join(" \u2192 ")],
      ["Advance", "after " + duration(plan.soak_s) + ", " + plan.min_successes + " successes, " +
        percent(plan.min_success_rate) + " success rate"],
      ["Halt", "canary failures \u2265 " + plan.canary_halt_failure_count + "; stage failure rate > " +
        percent(plan.halt_failure_rate) + " after " + plan.halt_min_sample + " reports; " +
        plan.halt_failure_count + " failures in all"],
      ["In flight at most", plan.max_in_flight || "no cap"],
    ]));
    return out;
  }

  function timeline(r) {
    const closed = ["completed", "aborted", "revoked"].includes(r.phase);
    return el("ol", { class: "timeline" }, r.stages.map((s, i) => {
      let state = "pending";
      if (i < r.stage_index || (r.phase === "completed" && i === r.stage_index)) state = "done";
      else if (i === r.stage_index) state = closed ? r.phase : r.phase === "active" ? "current" : r.phase;
      return el("li", { class: "stage " + state, "data-stage": s.name },
        el("div", { class: "stage-name" }, s.name),
        el("div", { class: "stage-state" }, state,
          i === r.stage_index && !closed ? ", since " + when(r.stage_started_at) : ""),
        el("dl", { class: "counts" },
          [["admitted", s.offered], ["succeeded", s.succeeded], ["failed", s.failed],
           ["rolled back", s.rolled_back], ["in flight", s.in_flight]].map(([k, v]) => [
            el("dt", {}, k), el("dd", { class: v && (k === "failed" || k === "rolled back") ? "bad" : null }, v)])));
    }));
  }

  function bytesChart(stages) {
    const width = 760;
    const barHeight = 22;
    const gap = 14;
    const labelWidth = 90;
    const max = Math.max(1, ...stages.map((s) => s.bytes_origin + s.bytes_peers));
    const height = stages.length * (barHeight + gap) + 26;
    const scale = (n) => ((width - labelWidth - 240) * n) / max;
    const chart = svg("svg", { class: "chart", viewBox: "0 0 " + width + " " + height,
                               width, height, role: "img",
                               "aria-label": "bytes from the origin and from peers per stage" });
    stages.forEach((s, i) => {
      const y = i * (barHeight + gap);
      const origin = scale(s.bytes_origin);
      const peers = scale(s.bytes_peers);
      chart.append(
        svg("text", { x: 0, y: y + 15, class: "chart-label" }, s.name),
        svg("rect", { x: labelWidth, y, width: origin, height: barHeight, class: "origin" },
            svg("title", {}, s.name + ": " + bytes(s.bytes_origin) + " from the origin")),
        svg("rect", { x: labelWidth + origin, y, width: peers, height: barHeight, class: "peers" },
            svg("title", {}, s.name + ": " + bytes(s.bytes_peers) + " from peers")),
        svg("text", { x: labelWidth + origin + peers + 6, y: y + 15, class: "chart-value" },
            s.bytes_origin + s.bytes_peers
              ? bytes(s.bytes_origin + s.bytes_peers) + ", " + percent(s.bandwidth_saved) + " from peers"
              : "nothing yet"));
    });
    const y = stages.length * (barHeight + gap) + 8;
    chart.append(
      svg("rect", { x: labelWidth, y, width: 12, height: 12, class: "origin" }),
      svg("text", { x: labelWidth + 18, y: y + 11, class: "chart-label" }, "from the origin"),
      svg("rect", { x: labelWidth + 150, y, width: 12, height: 12, class: "peers" }),
      svg("text", { x: labelWidth + 168, y: y + 11, class: "chart-label" }, "from peers"));
    return chart;
  }

  // --- audit log ------------------------------------------------------------------------

  async function auditPage(ctx) {
    const days = Number(ctx.params.get("days") || "7");
    const text = ctx.params.get("q") || "";
    const q = el("input", { name: "q", value: text, placeholder: "actor, action, target..." });
    const range = el("select", { name: "days" }, [1, 7, 30, 365].map((d) => el("option", {
      value: d, selected: d === days }, d === 1 ? "last day" : "last " + d + " days")));
    const view = el("div");
    const problem = problemLine();
    ctx.root.append(el("h1", {}, "Audit log"),
      el("form", { class: "filters", on: { submit: (e) => {
        e.preventDefault();
        location.hash = "#/audit" + query({ days: range.value, q: q.value.trim() });
      } } }, el("label", {}, "Since", range), el("label", {}, "Containing", q),
      el("button", { type: "submit" }, "Show")), problem, view);
    const since = Math.floor(Date.now() / 1000 - days * 86400);
    const refresh = async () => {
      const answer = await api("GET", "audit" + query({ since, limit: 10000 }));
      if (!ctx.alive()) return;
      const needle = text.toLowerCase();
      const rows = answer.audit.filter((a) => !needle || [a.actor, a.action, a.target, a.outcome, a.detail]
        .some((f) => f.toLowerCase().includes(needle))).reverse();
      rows.forEach((a) => { a._class = a.outcome === "refused" ? "bad" : ""; });
      view.replaceChildren(table([
        { title: "When", cell: (a) => when(a.at) },
        { title: "Actor", cell: (a) => a.actor },
        { title: "Action", cell: (a) => a.action },
        { title: "Target", cell: (a) => a.target },
        { title: "Outcome", cell: (a) => badge(a.outcome) },
        { title: "Detail", class: "message", cell: (a) => a.detail },
      ], rows, "Nothing in the audit log for this range."));
    };
    await refresh();
    poll(ctx, refresh, POLL_LIST_MS, problem);
  }

  // --- wiring -----------------------------------------------------------------------------

  $("sign-in-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const candidate = $("token").value.trim();
    $("token").value = "";
    if (!candidate) return;
    token = candidate;
    start();
  });
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  window.addEventListener("hashchange", route);
  if (token) start();
  else showSignIn("");
})();
