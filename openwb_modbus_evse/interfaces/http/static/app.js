// The status page: fetches api/status every few seconds and draws one card per charge point.
// No framework and no build step; every text from the service is set with textContent.
"use strict";

const REFRESH_MS = 3000;
const CHART_WINDOW_S = 3600;

function el(tag, attrs = {}, ...children) {
  const node = tag === "svg" || tag === "path" || tag === "line"
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

const fixed = (value, digits) => (value === null || value === undefined ? "–" : value.toFixed(digits));

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

// One row of the card: the value carries its field name, so a test can find it.
function row(dl, label, field, text) {
  dl.append(el("dt", {}, label), el("dd", { "data-field": field }, text));
}

// The last hour, or less while the service has not run that long.
function chart(history, now) {
  const width = 300, height = 80;
  const span = Math.min(CHART_WINDOW_S, Math.max(60, history.length ? now - history[0][0] : 0));
  const svg = el("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none" });
  const watts = history.map(([, w]) => w).filter((w) => w !== null);
  const peak = Math.max(1000, ...watts);
  const top = peak * 1.1;
  const x = (t) => ((t - (now - span)) / span) * width;
  const y = (w) => height - (w / top) * height;
  svg.append(el("line", { class: "grid", x1: 0, x2: width, y1: height - 0.5, y2: height - 0.5 }));
  // A gap (no data) ends a segment; each segment is drawn as a line over a filled area.
  let segment = [];
  const flush = () => {
    if (segment.length) {
      const points = segment.map(([t, w]) => `${x(t).toFixed(1)},${y(w).toFixed(1)}`);
      const first = x(segment[0][0]).toFixed(1), last = x(segment[segment.length - 1][0]).toFixed(1);
      svg.append(el("path", { class: "area", d: `M${first},${height} L${points.join(" L")} L${last},${height} Z` }));
      svg.append(el("path", { class: "line", d: `M${points.join(" L")}` }));
    }
    segment = [];
  };
  for (const [t, w] of history) {
    if (w === null) flush();
    else segment.push([t, w]);
  }
  flush();
  const since = span >= 120 ? `${Math.round(span / 60)} min` : `${Math.round(span)} s`;
  const axis = el("div", { class: "axis" },
    el("span", {}, `−${since}`),
    el("span", {}, `max ${(peak / 1000).toFixed(1)} kW`),
    el("span", {}, "now"));
  return [svg, axis];
}

function card(cp, now) {
  const [kind, label] = stateOf(cp);
  const title = cp.lp ? `LP${cp.lp} · ${cp.name}` : `${cp.name} (not served)`;
  const node = el("section", { class: "card", "data-lp": cp.lp ?? "" },
    el("div", { class: "top" },
      el("h2", { title: cp.serial_number }, title),
      el("span", { class: `badge ${kind}`, "data-field": "state" }, label)));
  node.append(el("div", { class: "power", "data-field": "power_w" },
    cp.power_w === null ? "– W" : `${Math.round(cp.power_w)} W`));
  const dl = el("dl");
  row(dl, "Offered / requested", "currents",
    `${fixed(cp.offered_a, 1)} A / ${fixed(cp.requested_a, 1)} A`);
  if (cp.supply_granted_a !== null) {
    row(dl, "Supply share", "supply_granted_a", `${fixed(cp.supply_granted_a, 1)} A`);
  }
  row(dl, "Phase currents", "currents_a", cp.currents_a.map((a) => fixed(a, 1)).join(" · ") + " A");
  row(dl, "Energy", "energy_wh", `${(cp.energy_wh / 1000).toFixed(3)} kWh`);
  const beat = cp.heartbeat_lapsed ? "heartbeat lapsed"
    : cp.heartbeat_age_s === null ? "no heartbeat yet" : `heartbeat ${fixed(cp.heartbeat_age_s, 0)} s ago`;
  row(dl, "Controller", "controller", `${cp.controller}, ${beat}`);
  if (cp.ocpp !== null) {
    const link = cp.ocpp;
    const state = link.connected ? `connected, ${link.status}` : "not connected";
    const queued = link.queued ? `, ${link.queued} queued` : "";
    const tx = link.transaction === null ? "" : `, transaction ${link.transaction}`;
    row(dl, "OCPP", "ocpp", `${link.id}: ${state}${tx}${queued}`);
  }
  row(dl, "Station uptime", "uptime_s", duration(cp.uptime_s));
  row(dl, "WiFi", "rssi_dbm", cp.rssi_dbm === null ? "–" : `${cp.rssi_dbm} dBm`);
  row(dl, "Firmware", "firmware", cp.firmware === null ? "–" : String(cp.firmware));
  row(dl, "Serial number", "serial_number", cp.serial_number);
  node.append(dl, ...chart(cp.history, now));
  const log = el("pre", { class: "log", "data-field": "log" });
  log.textContent = cp.log.length ? cp.log.slice(-6).join("\n") : "(no log lines yet)";
  node.append(log);
  return node;
}

async function refresh() {
  try {
    const response = await fetch("api/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const status = await response.json();
    document.getElementById("cards").replaceChildren(
      ...status.charge_points.map((cp) => card(cp, status.time)));
    document.getElementById("empty").hidden = status.charge_points.length > 0;
    document.getElementById("updated").textContent =
      `updated ${new Date(status.time * 1000).toLocaleTimeString()}`;
  } catch (err) {
    document.getElementById("updated").textContent = `cannot reach the service (${err.message})`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
