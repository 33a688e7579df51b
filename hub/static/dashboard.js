// gpu-fleet SRE dashboard: polls the admin JSON API with the token kept in sessionStorage.
// Every value from the API is written with textContent or as an SVG attribute, never as HTML.
"use strict";

const TOKEN_KEY = "fleetAdminToken";
const REFRESH_MS = 3000;
// One page of each listing per refresh: what a refresh costs the hub (and the client requests it serves meanwhile)
// stays bounded however large the fleet grows. The CLI lists everything.
const WORKER_PAGE = 500;
const SESSION_PAGE = 200;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const state = { workers: [], moreWorkers: false, sort: { key: "worker_id", dir: 1 }, timer: null, busy: new Set(),
                land: null, filter: { region: "", state: "" }, regions: new Set(), refreshes: 0,
                drawn: 0 };

class AuthError extends Error {}

async function api(path, method = "GET") {
  const resp = await fetch(path, { method, headers: { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY)}` } });
  if (resp.status === 401) throw new AuthError("the hub refused this token");
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(`${resp.status} ${body.error || ""}: ${body.message || ""}`);
  return body;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

const project = (lat, lon) => [lon + 180, 85 - lat];  // equirectangular, viewBox 360 x 170
const status = (w) => (w.alive ? w.state : "stale");
const load = (w) => (w.max_streams ? w.used_streams / w.max_streams : 0);
const gpu = (w) => (w.gpus.length ? `${w.gpus.length > 1 ? w.gpus.length + " x " : ""}${w.gpus[0].name}` : "—");
const age = (s) => (s === null || s === undefined ? "—" : `${s.toFixed(1)} s`);

// --- map ------------------------------------------------------------------------------------------------

async function drawLand() {
  if (state.land) return;
  const topo = await (await fetch("/dashboard/static/vendor/land-110m.json")).json();
  const land = topojson.feature(topo, topo.objects.land);
  const parts = [];
  const polygons = land.features.flatMap((f) => (f.geometry.type === "Polygon" ? [f.geometry.coordinates]
                                                                              : f.geometry.coordinates));
  for (const polygon of polygons) {
    for (const ring of polygon) {
      // Unwrap longitudes so rings crossing the antimeridian stay continuous; the copies shifted by ±360 below
      // draw the part that leaves the 0..360 view.
      let shift = 0;
      let prev = ring[0][0];
      const points = ring.map(([lon, lat]) => {
        if (lon - prev > 180) shift -= 360;
        else if (prev - lon > 180) shift += 360;
        prev = lon;
        return project(lat, lon + shift).map((v) => v.toFixed(2)).join(",");
      });
      parts.push("M" + points.join("L") + "Z");
    }
  }
  const d = parts.join("");
  state.land = [-360, 0, 360].map((dx) => svg("path", { d, transform: `translate(${dx} 0)` }));
  $("land").replaceChildren(...state.land);
}

function drawMap(workers, sessions, livekit) {
  const byId = new Map(workers.map((w) => [w.worker_id, w]));
  $("livekit").replaceChildren(...livekit.map((r) => {
    const [x, y] = project(r.lat, r.lon);
    const mark = svg("rect", { x: x - 2.6, y: y - 2.6, width: 5.2, height: 5.2 });
    mark.appendChild(svg("title", {})).textContent = `LiveKit ${r.region}`;
    return mark;
  }));
  $("workers-layer").replaceChildren(...workers.map((w) => {
    const [x, y] = project(w.location.lat, w.location.lon);
    const dot = svg("circle", { cx: x, cy: y, r: 1.6 + 1.2 * load(w), class: `w-${status(w)}`,
                                "data-worker": w.worker_id });
    dot.appendChild(svg("title", {})).textContent =
      `${w.worker_id} (${w.region}) ${status(w)} ${w.used_streams}/${w.max_streams}`;
    return dot;
  }));
  const located = sessions.filter((s) => s.location);
  $("links").replaceChildren(...located.filter((s) => byId.has(s.worker_id)).map((s) => {
    const [x1, y1] = project(s.location.lat, s.location.lon);
    const w = byId.get(s.worker_id);
    const [x2, y2] = project(w.location.lat, w.location.lon);
    return svg("line", { x1, y1, x2, y2 });
  }));
  $("sessions-layer").replaceChildren(...located.map((s) => {
    const [x, y] = project(s.location.lat, s.location.lon);
    const dot = svg("circle", { cx: x, cy: y, r: 0.9, "data-session": s.session_id });
    dot.appendChild(svg("title", {})).textContent = `session ${s.session_id} -> ${s.worker_id}`;
    return dot;
  }));
}

// --- tables -----------------------------------------------------------------------------------------------

function sortValue(w, key) {
  if (key === "status") return status(w);
  if (key === "load") return load(w);
  if (key === "gpu") return gpu(w);
  const v = w[key];
  return v === null || v === undefined ? Infinity : v;
}

function drawWorkers() {
  const { key, dir } = state.sort;
  const rows = [...state.workers].sort((a, b) => {
    const x = sortValue(a, key), y = sortValue(b, key);
    return (x < y ? -1 : x > y ? 1 : 0) * dir || a.worker_id.localeCompare(b.worker_id);
  });
  for (const th of document.querySelectorAll("#workers th[data-key]")) {
    th.classList.toggle("asc", th.dataset.key === key && dir === 1);
    th.classList.toggle("desc", th.dataset.key === key && dir === -1);
  }
  $("workers").tBodies[0].replaceChildren(...rows.map((w) => {
    const tr = el("tr");
    tr.dataset.worker = w.worker_id;
    const st = status(w);
    tr.append(el("td", w.worker_id), el("td", w.region), el("td", gpu(w)), el("td", st, `state state-${st}`),
              el("td", `${w.used_streams}/${w.max_streams}`), el("td", `${Math.round(load(w) * 100)}%`),
              el("td", `${Math.round(w.gpu_utilization)}%`), el("td", `${Math.round(w.latency_ms)} ms`),
              el("td", age(w.heartbeat_age_s)));
    // Resume lifts an SRE's drain only; a worker draining on its own account is leaving and cannot be resumed.
    // A stale worker (its instance is gone) can only be forgotten; the hub refuses that while it is live.
    const resumable = w.drain_requested;
    const leaving = w.state === "draining" && !resumable;
    const action = !w.alive ? "forget" : resumable ? "resume" : "drain";
    const label = { forget: "Forget", resume: "Resume", drain: leaving ? "Leaving" : "Drain" }[action];
    const button = el("button", label, action);
    button.type = "button";
    button.disabled = (leaving && action === "drain") || state.busy.has(w.worker_id);
    button.addEventListener("click", () => {
      if (action in ASK_FIRST && !window.confirm(ASK_FIRST[action](w.worker_id))) return;
      steer(w.worker_id, action);
    });
    const cell = el("td");
    cell.append(button);
    tr.append(cell);
    return tr;
  }));
  const only = [state.filter.region, state.filter.state].filter(Boolean).join(", ");
  const listed = state.moreWorkers
    ? `the first ${rows.length} by region (fleet workers lists all)` : `${rows.length} registered`;
  $("worker-count").textContent = only ? `${listed}: ${only}` : listed;
}

function drawCapacity(fleet) {
  $("capacity").replaceChildren(...[...fleet.regions, fleet.total].map((r) => {
    const box = el("div", null, "region");
    box.dataset.region = r.region;
    box.title = r === fleet.total ? "show every region" : `show ${r.region} only`;
    box.addEventListener("click", () => setFilter({ region: r === fleet.total ? "" : r.region }));
    const pct = r.max_streams ? r.used_streams / r.max_streams : 0;
    box.append(el("b", r.region),
               el("span", `${r.used_streams}/${r.max_streams} streams used, ${r.free_streams} free`),
               el("div", `${r.ready_workers}/${r.workers} workers ready`, "muted"));
    const bar = el("div", null, "bar");
    const fill = el("span", null, pct >= 0.9 ? "full" : pct >= 0.7 ? "hot" : "");
    fill.style.width = `${Math.round(pct * 100)}%`;
    bar.append(fill);
    box.append(bar);
    return box;
  }));
}

function drawSessions(sessions, more, inUse) {
  const now = Date.now() / 1000;
  $("sessions").tBodies[0].replaceChildren(...[...sessions].reverse().map((s) => {
    const tr = el("tr");
    tr.append(el("td", s.session_id), el("td", s.worker_id), el("td", s.worker_region), el("td", s.livekit_region),
              el("td", s.status), el("td", age(Math.max(0, now - s.created_at))));
    return tr;
  }));
  $("session-count").textContent =
    more ? `${sessions.length} shown of ${inUse} streams in use` : `${sessions.length} held`;
}

// --- filters ----------------------------------------------------------------------------------------------

// The listings' own filters: the hub picks the page from the workers that match, so a region or the stale workers
// of a fleet larger than a page are found, not just hidden in the page.
function listingQuery(limit, filters) {
  const query = new URLSearchParams({ limit: String(limit) });
  for (const [name, value] of Object.entries(filters)) if (value) query.set(name, value);
  return query.toString();
}

function drawRegionChoices(fleet) {
  for (const r of fleet.regions) state.regions.add(r.region);  // a region all of whose workers went stale stays
  if (state.filter.region) state.regions.add(state.filter.region);
  const select = $("filter-region");
  select.replaceChildren(el("option", "all"), ...[...state.regions].sort().map((region) => el("option", region)));
  select.options[0].value = "";
  select.value = state.filter.region;
}

function showFilter(change) {
  Object.assign(state.filter, change);
  $("filter-region").value = state.filter.region;
  $("filter-state").value = state.filter.state;
}

function setFilter(change) {
  showFilter(change);
  refresh();
}

// --- flow -------------------------------------------------------------------------------------------------

async function refresh() {
  const asked = ++state.refreshes;
  try {
    const [workers, fleet, sessions, livekit] = await Promise.all([
      api(`/api/v1/workers?${listingQuery(WORKER_PAGE, state.filter)}`), api("/api/v1/fleet"),
      api(`/api/v1/sessions?${listingQuery(SESSION_PAGE, { region: state.filter.region })}`),
      api("/dashboard/api/livekit")]);
    if (!sessionStorage.getItem(TOKEN_KEY)) return;  // signed out while this read was on the wire
    if (asked < state.drawn) return;  // a later read (after a filter changed) has drawn already
    state.drawn = asked;
    state.workers = workers.workers;
    state.moreWorkers = workers.next_cursor !== null;
    drawWorkers();
    drawCapacity(fleet);
    drawRegionChoices(fleet);
    drawSessions(sessions.sessions, sessions.next_cursor !== null, fleet.total.used_streams);
    drawMap(state.workers, sessions.sessions, livekit.regions);
    $("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    $("status").className = "muted";
  } catch (err) {
    if (err instanceof AuthError) return signOut(err.message);
    $("status").textContent = `refresh failed: ${err.message}`;
    $("status").className = "error";
  }
}

// A drain or a forget changes what the fleet does: a click on the wrong row must not be enough. A resume only
// undoes a drain.
const ASK_FIRST = {
  drain: (id) => `Drain ${id}? It takes no new session until it is resumed; its sessions run on.`,
  forget: (id) => `Forget ${id}? Its registration and the sessions it held are removed.`,
};

async function steer(workerId, action) {
  state.busy.add(workerId);
  drawWorkers();
  let failure = null;
  try {
    await api(`/api/v1/workers/${encodeURIComponent(workerId)}/${action}`, "POST");
  } catch (err) {
    failure = `${action} ${workerId} failed: ${err.message}`;
  } finally {
    state.busy.delete(workerId);
  }
  await refresh();
  // After the refresh, which would otherwise replace it with "updated ..." at once.
  if (failure && sessionStorage.getItem(TOKEN_KEY)) {
    $("status").textContent = failure;
    $("status").className = "error";
  }
}

function showApp(signedIn) {
  $("login").hidden = signedIn;
  $("app").hidden = !signedIn;
  $("logout").hidden = !signedIn;
  clearInterval(state.timer);
  if (signedIn) {
    drawLand().catch((err) => console.error("world map", err));
    refresh();
    state.timer = setInterval(refresh, REFRESH_MS);
  }
}

function forgetFleet() {
  state.workers = [];
  state.regions.clear();
  $("filter-region").replaceChildren(el("option", "all"));
  $("filter-region").options[0].value = "";
  showFilter({ region: "", state: "" });
  for (const id of ["capacity", "links", "livekit", "workers-layer", "sessions-layer", "worker-count", "session-count"]) {
    $(id).replaceChildren();
  }
  $("workers").tBodies[0].replaceChildren();
  $("sessions").tBodies[0].replaceChildren();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  forgetFleet();  // nothing of the fleet stays on a shared screen, or looks live under a refused token
  $("login-error").textContent = message || "";
  $("status").textContent = "not signed in";
  showApp(false);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    try {
      await api("/api/v1/fleet");
      $("login-error").textContent = "";
      showApp(true);
    } catch (err) {
      signOut(err.message);
    }
  });
  $("logout").addEventListener("click", () => signOut());
  $("filter-region").addEventListener("change", (event) => setFilter({ region: event.target.value }));
  $("filter-state").addEventListener("change", (event) => setFilter({ state: event.target.value }));
  for (const th of document.querySelectorAll("#workers th[data-key]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
      drawWorkers();
    });
  }
  showApp(Boolean(sessionStorage.getItem(TOKEN_KEY)));
});
