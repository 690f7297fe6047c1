// Keeps the server-rendered status page current from /v1/status and
// /v1/events, without a reload. Elements carry data-k="path.in.status" and
// an optional data-fmt; the VRAM bar, the queue and the events are redrawn.
"use strict";
(function () {
  const POLL_MS = 1500;
  const live = document.getElementById("live");
  const list = document.getElementById("event-list");
  let lastEvent = Number(list.dataset.last || 0);

  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const get = (obj, path) => path.split(".").reduce((o, k) => (o == null ? o : o[k]), obj);
  const ago = (iso) => {
    if (!iso) return "never";
    const s = (Date.now() - Date.parse(iso)) / 1000;
    return s < 1 ? "just now" : s < 90 ? `${s.toFixed(0)} s ago` :
      s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
  };
  const FORMATS = {
    mib: (v) => v == null ? "—" : `${v.toLocaleString("en")} MiB`,
    ms: (v) => v == null ? "—" : `${Math.round(v)} ms`,
    secs: (v) => v == null ? "—" : `${v.toFixed(1)} s`,
    age: (v) => v == null ? "—" : `${v.toFixed(1)} s`,
    dur: (v) => v < 120 ? `${Math.round(v)} s` : v < 7200 ? `${Math.round(v / 60)} min` : `${(v / 3600).toFixed(1)} h`,
    ago: ago,
    loaded: (v) => v === true ? "loaded" : v === false ? "not loaded" : "unknown",
    health: (v, el) => {
      el.className = "dot " + (v === true ? "ok" : v === false ? "bad" : "unknown");
      return v === true ? "healthy" : v === false ? "unhealthy" : "probing";
    },
  };

  function fill(status) {
    for (const el of document.querySelectorAll("[data-k]")) {
      const v = get(status, el.dataset.k);
      const fmt = FORMATS[el.dataset.fmt];
      el.textContent = fmt ? fmt(v, el) : (v == null ? "" : v);
    }
    const order = Object.keys(status.consumers);   // a consumer keeps its colour
    status.gpus.forEach((gpu, i) => {
      const total = gpu.total_mib || 1;
      let bar = gpu.holders.map((h) =>
        `<div class="seg c${order.indexOf(h.consumer) % 6}${h.loaded ? "" : " maybe"}" style="width:${(100 * h.mib / total).toFixed(2)}%"` +
        ` title="${esc(h.consumer)}: ${h.mib} MiB${h.loaded ? "" : " (state unknown: maybe resident)"}"><span>${esc(h.consumer)}</span></div>`).join("");
      if (gpu.other_mib) {
        bar += `<div class="seg other" style="width:${(100 * gpu.other_mib / total).toFixed(2)}%" title="other / unknown: ${gpu.other_mib} MiB"><span>other</span></div>`;
      }
      const barEl = document.getElementById(`vram-bar-${i}`);
      if (!barEl) return;              // a card added by a reload: the next page load shows it
      barEl.innerHTML = bar;
      const run = gpu.queue.running;
      document.getElementById(`running-${i}`).innerHTML = !run ? "idle"
        : run.kind === "lease" ? `GPU lease <b>${esc(run.label)}</b> for ${run.running_s.toFixed(1)} s`
        : `running <b>${esc(run.consumer)}</b> ${esc(run.kind || "")} for ${run.running_s.toFixed(1)} s`;
      document.getElementById(`waiting-${i}`).innerHTML =
        gpu.queue.waiting_jobs.map((w) => `<li>${esc(w.label)}` +
          (w.bypassed ? ` <span class="passed">passed ${w.bypassed}×</span>` : "") + "</li>").join("");
    });
  }

  function addEvents(events) {
    for (const e of events) {
      const li = document.createElement("li");
      li.className = "ev-" + e.type;
      li.innerHTML = `<time datetime="${esc(e.at)}">${esc(e.at.slice(11, 19))}</time> ` +
        `<span class="tag">${esc(e.type)}</span> ${esc(e.message)}`;
      list.prepend(li);
      lastEvent = Math.max(lastEvent, e.id);
    }
    while (list.children.length > 200) list.lastElementChild.remove();
  }

  async function tick() {
    try {
      const [st, ev] = await Promise.all([
        fetch("v1/status", { cache: "no-store" }).then((r) => r.json()),
        fetch(`v1/events?since=${lastEvent}`, { cache: "no-store" }).then((r) => r.json()),
      ]);
      fill(st);
      addEvents(ev.events);
      live.textContent = "live";
      live.className = "live on";
    } catch (err) {
      live.textContent = "broker unreachable";
      live.className = "live stale";
    }
    setTimeout(tick, POLL_MS);
  }
  tick();
})();
