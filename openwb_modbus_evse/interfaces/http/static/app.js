// The status page: fetches api/status every few seconds and draws one card per charge point:
// why it does not charge, its measurements, its power over the last 48 h and, with the admin
// token, the owner's controls. No framework and no build step; every text from the service is
// set with textContent. The token is kept in sessionStorage and sent as a bearer header only.
"use strict";

const REFRESH_MS = 3000;
const HISTORY_MS = 60000; // the history changes once a minute
const TOKEN_KEY = "openwb-modbus-evse-admin-token";
const SVG = "http://www.w3.org/2000/svg";
const SVG_TAGS = new Set(["svg", "path", "line", "text", "rect"]);

function el(tag, attrs = {}, ...children) {
  const node = SVG_TAGS.has(tag) ? document.createElementNS(SVG, tag) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

const fixed = (value, digits) => (value === null || value === undefined ? "–" : value.toFixed(digits));
const kwh = (wh) => (wh === null || wh === undefined ? "–" : `${(wh / 1000).toFixed(3)} kWh`);
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds / 3600) % 24;
  const m = Math.floor(seconds / 60) % 60, s = Math.floor(seconds % 60);
  if (d) return `${d} d ${h} h`;
  if (h) return `${h} h ${m} min`;
  if (m) return `${m} min ${s} s`;
  return `${s} s`;
}

function stateOf(cp) {
  if (!cp.connected || !cp.fresh) return ["offline", "offline"];
  if (cp.charging) return ["charging", "charging"];
  if (cp.plugged) return ["plugged", "plugged in"];
  return ["idle", "no vehicle"];
}

// "LP1 · garage"; an unnamed station is just "LP1"; one without an LP says it is not served.
function titleOf(cp) {
  if (!cp.lp) return `${cp.name} (not served)`;
  return cp.name === `LP${cp.lp}` ? cp.name : `LP${cp.lp} · ${cp.name}`;
}

// A card is found again by its LP, or (not served) by its serial number.
const keyOf = (cp) => (cp.lp ? `lp${cp.lp}` : `sn${cp.serial_number}`);

// One row of the card: the value carries its field name, so a test can find it.
function row(dl, label, field, text) {
  dl.append(el("dt", {}, label), el("dd", { "data-field": field }, text));
}

// --- the power chart: time axis, kW, the value under the pointer --------------------------

const CHART = { height: 150, left: 44, bottom: 18, top: 6, step: 60 };

function niceStep(span) {
  const hours = span / 3600;
  for (const h of [0.25, 0.5, 1, 2, 3, 6, 12]) if (hours / h <= 6) return h * 3600;
  return 24 * 3600;
}

// Drawn in the box's own pixels, so the axis labels stay readable on a phone.
function drawChart(box, history, now) {
  const { height, left, bottom, top, step } = CHART;
  const width = Math.max(280, Math.round(box.clientWidth || 600));
  const values = history.w;
  const start = history.start;
  const first = values.length ? start : now - 3600;
  const span = Math.max(3600, now - first);
  const from = now - span;
  const plotW = width - left, plotH = height - bottom - top;
  const watts = values.filter((w) => w !== null);
  const peak = Math.max(1000, ...watts);
  const kwTop = Math.ceil(peak / 1000 / 2) * 2 || 2;
  const x = (t) => left + ((t - from) / span) * plotW;
  const y = (w) => top + plotH - (w / 1000 / kwTop) * plotH;
  const svg = el("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "power over time" });
  for (let kw = 0; kw <= kwTop; kw += kwTop / 2) {
    svg.append(el("line", { class: "grid", x1: left, x2: width, y1: y(kw * 1000), y2: y(kw * 1000) }));
    svg.append(el("text", { class: "tick", x: left - 4, y: y(kw * 1000) + 4, "text-anchor": "end" }, `${kw} kW`));
  }
  const tick = niceStep(span);
  for (let t = Math.ceil(from / tick) * tick; t <= now; t += tick) {
    svg.append(el("line", { class: "grid", x1: x(t), x2: x(t), y1: top, y2: top + plotH }));
    // A label too close to an edge would be cut off: its grid line is enough.
    if (x(t) > left + 30 && x(t) < width - 32) {
      svg.append(el("text", { class: "tick", x: x(t), y: height - 4, "text-anchor": "middle" }, clock(t)));
    }
  }
  // A gap (no data) ends a segment; each segment is a line over a filled area.
  let segment = [];
  const flush = () => {
    if (segment.length) {
      const pts = segment.map(([t, w]) => `${x(t).toFixed(1)},${y(w).toFixed(1)}`);
      const a = x(segment[0][0]).toFixed(1), b = x(segment[segment.length - 1][0]).toFixed(1);
      const base = (top + plotH).toFixed(1);
      svg.append(el("path", { class: "area", d: `M${a},${base} L${pts.join(" L")} L${b},${base} Z` }));
      svg.append(el("path", { class: "line", d: `M${pts.join(" L")}` }));
    }
    segment = [];
  };
  // Each minute is a step from its start to its end, so even a single minute shows.
  values.forEach((w, i) => {
    if (w === null) flush();
    else segment.push([start + i * step, w], [Math.min(now, start + (i + 1) * step), w]);
  });
  flush();
  const cursor = el("line", { class: "cursor", x1: 0, x2: 0, y1: top, y2: top + plotH, visibility: "hidden" });
  svg.append(cursor);
  const tip = box.querySelector(".tip");
  const show = (event) => {
    const rect = svg.getBoundingClientRect();
    const px = ((event.clientX - rect.left) / rect.width) * width;
    const t = from + ((px - left) / plotW) * span;
    const i = Math.floor((t - start) / step);
    if (px < left || i < 0 || i >= values.length) return hide();
    const w = values[i];
    cursor.setAttribute("x1", px); cursor.setAttribute("x2", px);
    cursor.setAttribute("visibility", "visible");
    tip.textContent = `${clock(start + i * step)}: ${w === null ? "no data" : `${(w / 1000).toFixed(2)} kW`}`;
    tip.hidden = false;
  };
  const hide = () => { cursor.setAttribute("visibility", "hidden"); tip.hidden = true; };
  svg.addEventListener("mousemove", show);
  svg.addEventListener("mouseleave", hide);
  box.querySelector("svg")?.remove();
  box.prepend(svg);
  box.dataset.points = values.length;
}

// --- the admin token and the owner's controls ---------------------------------------------

const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
let stations = new Map(); // card key -> {serial, controller}, from api/stations (token only)
let controllers = [];

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let answer = {};
  try { answer = await response.json(); } catch { /* not JSON: say the status */ }
  if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  return answer;
}

async function loadStations() {
  if (!token()) { stations = new Map(); return; }
  try {
    const answer = await api("GET", "api/stations");
    controllers = answer.controllers;
    stations = new Map(answer.stations.map((s) => [s.lp ? `lp${s.lp}` : `sn${s.serial_number}`, s]));
    setAdminMessage("");
  } catch (err) {
    stations = new Map();
    if (/401|403|token/.test(err.message)) sessionStorage.removeItem(TOKEN_KEY);
    setAdminMessage(`controls off: ${err.message}`);
  }
  renderAdmin();
}

function setAdminMessage(text) { document.getElementById("admin-message").textContent = text; }

function renderAdmin() {
  const on = Boolean(token());
  document.getElementById("token-form").hidden = on;
  document.getElementById("lock").hidden = !on;
  document.body.classList.toggle("admin", on);
}

function say(card, text, ok) {
  const node = card.querySelector("[data-field=message]");
  node.textContent = text;
  node.className = ok ? "message ok" : "message refused";
}

// Runs one action of a card; the answer or the refusal (with its reason) is shown on the card.
async function act(card, what, method, path, body) {
  const station = stations.get(card.dataset.key);
  if (!station) return say(card, `${what}: this station is not in the station list (yet)`, false);
  const title = card.querySelector("h2")?.textContent;
  say(card, `${what}…`, true);
  try {
    await api(method, `api/stations/${station.serial}/${path}`, body);
    say(card, `${what}: done`, true);
  } catch (err) {
    // The service's own text may say "refused" already ("move refused: LP1 is taken ...").
    const text = /refused/.test(err.message) ? err.message : `refused: ${err.message}`;
    say(card, `${what}: ${text}`, false);
  }
  const said = card.querySelector("[data-field=message]").textContent;
  await loadStations();
  await refresh();
  // A moved or forgotten station's card is gone: say it at the top instead.
  if (!card.isConnected) setAdminMessage(`${title}: ${said}`);
}

function uploadFirmware(card, file) {
  const station = stations.get(card.dataset.key);
  if (!station || !file) return say(card, "firmware: choose an image first", false);
  const bar = card.querySelector("progress");
  bar.hidden = false; bar.value = 0;
  const xhr = new XMLHttpRequest();
  xhr.open("POST", `api/stations/${station.serial}/firmware`);
  xhr.setRequestHeader("Authorization", `Bearer ${token()}`);
  xhr.setRequestHeader("Content-Type", "application/octet-stream");
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable) bar.value = e.loaded / e.total;
    say(card, `firmware: sending ${Math.round((e.loaded / (e.total || 1)) * 100)} %…`, true);
  };
  xhr.upload.onload = () => say(card, "firmware: sent; the station flashes and restarts…", true);
  xhr.onload = () => {
    bar.hidden = true;
    let answer = {};
    try { answer = JSON.parse(xhr.responseText); } catch { /* keep {} */ }
    if (xhr.status === 200) say(card, `firmware: ${answer.firmware_before} → ${answer.firmware_after}, done`, true);
    else say(card, `firmware refused: ${answer.error || `HTTP ${xhr.status}`}`, false);
  };
  xhr.onerror = () => { bar.hidden = true; say(card, "firmware: the connection failed", false); };
  xhr.send(file);
}

function controls(card) {
  const box = el("div", { class: "controls" });
  const number = (name, attrs) => el("input", { type: "number", name, ...attrs });
  const button = (label, action) => {
    const b = el("button", { type: "button", "data-action": action }, label);
    return b;
  };
  const amps = number("amps", { min: 6, max: 32, step: 1, value: 16, "aria-label": "current in A" });
  const seconds = number("seconds", { min: 1, max: 60, step: 1, value: 3, "aria-label": "seconds" });
  const lp = number("lp", { min: 1, max: 9, step: 1, "aria-label": "LP" });
  const select = el("select", { name: "controller", "aria-label": "controller" });
  const file = el("input", { type: "file", name: "firmware", "aria-label": "firmware image" });
  box.append(
    // A device claims this station's ID from elsewhere (see the reasons): the owner decides.
    el("div", { class: "ctl wide", "data-field": "claim", hidden: true },
      el("span", { class: "muted" }, "Identity"),
      button("Confirm: that device is this station", "confirm")),
    el("div", { class: "ctl" }, el("span", { class: "muted" }, "Controller"), select,
      button("Switch", "controller")),
    el("div", { class: "ctl" }, el("span", { class: "muted" }, "Manual"), amps, el("span", {}, "A"),
      button("Set current", "current"), button("Stop", "stop")),
    el("div", { class: "ctl" }, el("span", { class: "muted" }, "Pilot"), seconds, el("span", {}, "s"),
      button("Interrupt", "cp-interruption")),
    el("div", { class: "ctl" }, el("span", { class: "muted" }, "LP"), lp, button("Move", "move"),
      button("Forget", "forget")),
    el("div", { class: "ctl wide" }, el("span", { class: "muted" }, "Firmware"), file,
      button("Upload", "firmware"), el("progress", { max: 1, value: 0, hidden: true })),
    el("p", { class: "message", "data-field": "message", role: "status" }));
  // The owner's choice stays in the list until it is sent, whatever the refreshes show meanwhile.
  select.addEventListener("change", () => { select.dataset.chosen = "1"; });
  box.addEventListener("click", (event) => {
    const action = event.target.closest("button")?.dataset.action;
    if (!action) return;
    if (action === "controller") {
      act(card, `switch to ${select.value}`, "POST", "controller", { controller: select.value })
        .then(() => { delete select.dataset.chosen; });
    }
    if (action === "current") act(card, `set ${amps.value} A`, "POST", "current", { amps: Number(amps.value) });
    if (action === "stop") act(card, "stop", "POST", "stop");
    if (action === "cp-interruption") act(card, `pilot interruption ${seconds.value} s`, "POST", "cp-interruption", { seconds: Number(seconds.value) });
    if (action === "move") act(card, `move to LP${lp.value}`, "POST", "move", { lp: Number(lp.value) });
    if (action === "forget") act(card, "forget", "POST", "forget");
    if (action === "confirm") act(card, "confirm", "POST", "confirm");
    if (action === "firmware") uploadFirmware(card, file.files[0]);
  });
  return box;
}

function updateControls(card, cp) {
  card.querySelector("[data-field=claim]").hidden = !cp.claim;
  const select = card.querySelector("select[name=controller]");
  if (document.activeElement !== select && !select.dataset.chosen) {
    const names = controllers.length ? controllers : [cp.controller];
    if ([...select.options].map((o) => o.value).join() !== names.join()) {
      select.replaceChildren(...names.map((name) => el("option", { value: name }, name)));
    }
    select.value = cp.controller;
  }
}

// --- the cards ------------------------------------------------------------------------------

const cards = new Map(); // key -> section, kept between refreshes (inputs keep their values)
let histories = new Map(); // key -> {start, w}, from api/history

async function loadHistory() {
  try {
    const response = await fetch("api/history", { cache: "no-store" });
    if (!response.ok) return;
    const answer = await response.json();
    histories = new Map(answer.charge_points.map((h) => [keyOf(h), h]));
  } catch { /* the next refresh says that the service cannot be reached */ }
}

function newCard(key) {
  const card = el("section", { class: "card", "data-key": key });
  const info = el("div", { class: "info" });
  const chart = el("div", { class: "chartbox" }, el("div", { class: "tip", hidden: true }));
  card.append(el("div", { class: "top" }), el("div", { class: "body" }, info, chart));
  card.append(controls(card));
  return card;
}

function reasonsList(cp) {
  const list = el("ul", { class: "reasons", "data-field": "reasons" });
  for (const r of cp.reasons) {
    list.append(el("li", { class: r.blocking ? "blocking" : "limit", "data-code": r.code }, r.text));
  }
  return list;
}

function controllerText(cp) {
  if (cp.controller === "manual") {
    const choice = cp.requested_a ? `${fixed(cp.requested_a, 1)} A` : "stopped";
    return `manual (the owner): ${choice}, kept until changed`;
  }
  const beat = cp.heartbeat_lapsed ? "heartbeat lapsed"
    : cp.heartbeat_age_s === null ? "no heartbeat yet"
      : `heartbeat ${fixed(cp.heartbeat_age_s, 0)} s ago${cp.heartbeat_source ? ` from ${cp.heartbeat_source}` : ""}`;
  return `${cp.controller}, ${beat}`;
}

function fill(card, cp, now) {
  const [kind, label] = stateOf(cp);
  card.dataset.lp = cp.lp ?? "";
  card.querySelector(".top").replaceChildren(
    el("h2", { title: cp.serial_number }, titleOf(cp)),
    el("span", { class: `badge ${kind}`, "data-field": "state" }, label));
  const info = card.querySelector(".info");
  const power = el("div", { class: "power" },
    el("span", { "data-field": "power_w" }, cp.power_w === null ? "– W" : `${Math.round(cp.power_w)} W`),
    el("span", { class: "muted", "data-field": "session_wh" },
      cp.session_wh === null ? "" : ` · this session ${kwh(cp.session_wh)}`));
  const blocking = cp.reasons.some((r) => r.blocking);
  const why = cp.reasons.length
    ? el("div", { class: blocking ? "why blocking" : "why" },
      el("strong", {}, blocking ? "Why not charging" : "Charging, limited"), reasonsList(cp))
    : el("div", { class: "why ok" }, el("ul", { class: "reasons", "data-field": "reasons" }));
  const dl = el("dl");
  const pilot = cp.pilot === null ? "–" : `${cp.pilot} · contactor ${cp.contactor ? "closed" : "open"}`;
  row(dl, "Pilot", "pilot", pilot);
  row(dl, "Offered / requested", "currents",
    `${fixed(cp.offered_a, 1)} A / ${fixed(cp.requested_a, 1)} A`);
  if (cp.supply_granted_a !== null) {
    row(dl, "Supply share", "supply_granted_a", `${fixed(cp.supply_granted_a, 1)} A`);
  }
  row(dl, "Phase currents", "currents_a", cp.currents_a.map((a) => fixed(a, 1)).join(" · ") + " A");
  row(dl, "Voltages", "voltages_v", cp.voltages_v.map((v) => fixed(v, 0)).join(" · ") + " V");
  row(dl, "Phases in use", "phases_in_use", String(cp.phases_in_use));
  row(dl, "Energy (lifetime)", "energy_wh", kwh(cp.energy_wh));
  const controller = el("p", { class: "line" }, el("span", { class: "muted" }, "Controller "),
    el("span", { "data-field": "controller" }, controllerText(cp)));
  const meta = (label, field, text) => [el("span", { class: "muted" }, ` ${label} `),
    el("span", { "data-field": field }, text)];
  const station = el("p", { class: "line muted" },
    ...meta("Serial", "serial_number", cp.serial_number),
    ...meta("· firmware", "firmware", cp.firmware === null ? "–" : String(cp.firmware)),
    ...meta("· WiFi", "rssi_dbm", cp.rssi_dbm === null ? "–" : `${cp.rssi_dbm} dBm`),
    ...meta("· up", "uptime_s", duration(cp.uptime_s)));
  if (cp.ocpp) {
    const link = cp.ocpp;
    const state = link.connected ? `connected, ${link.status}` : "not connected";
    const queued = link.queued ? `, ${link.queued} queued` : "";
    const tx = link.transaction === null ? "" : `, transaction ${link.transaction}`;
    station.append(...meta("· OCPP", "ocpp", `${link.id}: ${state}${tx}${queued}`));
  }
  const log = el("pre", { class: "log", "data-field": "log" });
  log.textContent = cp.log.length ? cp.log.slice(-6).join("\n") : "(no log lines yet)";
  info.replaceChildren(power, why, dl, controller, station);
  const chart = card.querySelector(".chartbox");
  drawChart(chart, histories.get(keyOf(cp)) || { start: now, w: [] }, now);
  chart.querySelector("pre")?.remove();
  chart.append(log);
  updateControls(card, cp);
}

async function refresh() {
  try {
    const response = await fetch("api/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const status = await response.json();
    const main = document.getElementById("cards");
    const shown = [];
    for (const cp of status.charge_points) {
      const key = keyOf(cp);
      let card = cards.get(key);
      if (!card) cards.set(key, (card = newCard(key)));
      fill(card, cp, status.time);
      shown.push(card);
    }
    for (const [key, card] of cards) if (!shown.includes(card)) { cards.delete(key); card.remove(); }
    shown.forEach((card, i) => { if (main.children[i] !== card) main.insertBefore(card, main.children[i] || null); });
    document.getElementById("empty").hidden = status.charge_points.length > 0;
    const limit = status.supply_limit_a === null ? "" : ` · supply limit ${status.supply_limit_a} A per phase`;
    document.getElementById("total").textContent = `Total ${(status.total_power_w / 1000).toFixed(2)} kW${limit}`;
    document.getElementById("updated").textContent = `updated ${new Date(status.time * 1000).toLocaleTimeString()}`;
  } catch (err) {
    document.getElementById("updated").textContent = `cannot reach the service (${err.message})`;
  }
}

document.getElementById("token-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  await loadStations();
  await refresh();
});
document.getElementById("lock").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  stations = new Map();
  renderAdmin();
});

renderAdmin();
Promise.all([loadStations(), loadHistory()]).then(refresh);
setInterval(refresh, REFRESH_MS);
setInterval(() => loadHistory().then(refresh), HISTORY_MS);
setInterval(loadStations, REFRESH_MS * 5);
