// The Glass Brain dashboard: reads /v1/metrics/stream (Server-Sent Events over fetch, so the
// API key can ride in a header) and draws everything on canvases. No libraries, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("gb-key") || "", selected: null, session: null,
                tps: [], batch: [], last: null, frames: 0 };
const m = location.hash.match(/key=([^&]+)/);
if (m) { state.key = decodeURIComponent(m[1]); sessionStorage.setItem("gb-key", state.key); }

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

function bytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(u.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return (n / Math.pow(1024, i)).toPrecision(3) + " " + u[i];
}

function css(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

function setStatus(text, bad) { const s = $("status"); s.textContent = text; s.className = "status" + (bad ? " bad" : ""); }

async function sse(url, onData, signal) {
  // Reads an SSE response body line by line; calls onData(JSON or string) per "data:" line.
  const res = await fetch(url, { headers: headers(), signal });
  if (res.status === 401) { $("keyform").hidden = false; throw new Error("API key needed"); }
  if (!res.ok) { throw new Error("HTTP " + res.status + ": " + (await res.text()).slice(0, 200)); }
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        onData(data === "[DONE]" ? data : JSON.parse(data));
      }
    }
  }
}

// ------------------------------------------------------------------------ charts

function axes(ctx, w, h, pad, ymax, ylabel) {
  ctx.fillStyle = css("--panel"); ctx.fillRect(0, 0, w, h);
  ctx.strokeStyle = css("--line"); ctx.fillStyle = css("--dim"); ctx.font = "11px sans-serif";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = pad + (h - 2 * pad) * i / 4;
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w - 8, y); ctx.stroke();
    ctx.fillText(ylabel(ymax * (1 - i / 4)), 2, y - 2);
  }
}

function line(ctx, pts, color, w, h, pad, xmax, ymax) {
  ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath();
  pts.forEach(([x, y], i) => {
    const px = pad + (w - pad - 8) * x / xmax, py = h - pad - (h - 2 * pad) * y / ymax;
    i ? ctx.lineTo(px, py) : ctx.moveTo(px, py);
  });
  ctx.stroke();
}

function drawThroughput() {
  const c = $("chart-tps"), ctx = c.getContext("2d"), w = c.width, h = c.height, pad = 22;
  const n = 120, tps = state.tps.slice(-n), batch = state.batch.slice(-n);
  const ymax = Math.max(1, ...tps) * 1.15, bmax = Math.max(1, ...batch) * 1.15;
  axes(ctx, w, h, pad, ymax, (v) => v.toFixed(v < 10 ? 1 : 0));
  line(ctx, tps.map((v, i) => [i, v]), css("--a"), w, h, pad, n - 1, ymax);
  line(ctx, batch.map((v, i) => [i, v]), css("--b"), w, h, pad, n - 1, bmax);
  ctx.fillStyle = css("--b"); ctx.fillText("batch max " + bmax.toFixed(0), w - 100, 12);
  c.dataset.draws = String(+c.dataset.draws + 1);
}

function drawMemory(snap) {
  const c = $("chart-mem"), ctx = c.getContext("2d"), w = c.width, h = c.height, pad = 22;
  const per = snap.server.state_bytes_per_session, kvPerTok = 36864;
  const seen = snap.sessions.map((s) => s.tokens_seen);
  const xmax = Math.max(1024, ...seen) * 1.1;
  const ymax = Math.max(per, kvPerTok * xmax) * 1.1;
  axes(ctx, w, h, pad, ymax, bytes);
  line(ctx, [[0, per], [xmax, per]], css("--a"), w, h, pad, xmax, ymax);
  line(ctx, [[0, 0], [xmax, kvPerTok * xmax]], css("--c"), w, h, pad, xmax, ymax);
  const cross = per / kvPerTok;
  ctx.fillStyle = css("--dim");
  ctx.fillText("context (tokens) → " + Math.round(xmax).toLocaleString(), w - 170, h - 6);
  if (cross < xmax) ctx.fillText("KV cache passes the state at " + Math.round(cross).toLocaleString() + " tokens", w / 2 - 60, 12);
  ctx.fillStyle = css("--d");
  for (const s of snap.sessions) {
    const px = pad + (w - pad - 8) * s.tokens_seen / xmax;
    for (const y of [per, s.kv_cache_bytes]) {
      const py = h - pad - (h - 2 * pad) * y / ymax;
      ctx.beginPath(); ctx.arc(px, py, 3, 0, 2 * Math.PI); ctx.fill();
    }
  }
  c.dataset.draws = String(+c.dataset.draws + 1);
}

// ------------------------------------------------------------------------ glass brain

function heat(v) {           // 0..255 → a dark-to-bright colour ramp
  const t = v / 255;
  return [Math.round(255 * Math.min(1, 2.2 * t)), Math.round(255 * Math.max(0, Math.min(1, 2.2 * t - 0.6))),
          Math.round(80 + 175 * Math.max(0, t - 0.55) / 0.45)];
}

function layerCanvases(n, cls, w, h) {
  const box = $("brain");
  if (box.children.length !== n || box.dataset.kind !== cls) {
    box.innerHTML = ""; box.dataset.kind = cls;
    for (let i = 0; i < n; i++) {
      const d = document.createElement("div"); d.className = "layer " + cls;
      const c = document.createElement("canvas"); c.width = w; c.height = h;
      const l = document.createElement("div"); l.className = "cap";
      d.appendChild(c); d.appendChild(l); box.appendChild(d);
    }
  }
  return Array.from(box.children);
}

function drawNeurons(b) {
  const raw = atob(b.grid), side = Math.round(Math.sqrt(b.cells));
  const divs = layerCanvases(b.layers, "neurons", side, side);
  divs.forEach((d, L) => {
    const c = d.querySelector("canvas"), ctx = c.getContext("2d");
    const img = ctx.createImageData(side, side);
    for (let i = 0; i < b.cells; i++) {
      const [r, g, bl] = heat(raw.charCodeAt(L * b.cells + i));
      img.data.set([r, g, bl, 255], 4 * i);
    }
    ctx.putImageData(img, 0, 0);
    const [xs, ys, xy] = b.density[L];
    d.querySelector(".cap").textContent = `layer ${L}: xs ${(100 * xs).toFixed(1)}%  ys ${(100 * ys).toFixed(1)}%  xy ${(100 * xy).toFixed(1)}%`;
  });
  $("brain-note").textContent = `Each square is one layer: ${b.cells} cells, each the fraction of its neurons where xy = xs·ys fired for the token just generated.`;
}

function drawBank(b) {
  const divs = layerCanvases(b.bank.length, "bank", 260, 120);
  const colors = ["#4fc3f7", "#81c784", "#ffb74d", "#ef5350", "#ba68c8"];
  divs.forEach((d, L) => {
    const layer = b.bank[L], c = d.querySelector("canvas"), ctx = c.getContext("2d");
    ctx.fillStyle = css("--panel"); ctx.fillRect(0, 0, c.width, c.height);
    const n = Math.max(1, layer.salience.length), smax = Math.max(1e-6, ...layer.salience);
    layer.salience.forEach((s, i) => {
      const bw = c.width / n, bh = (c.height - 14) * s / smax;
      ctx.fillStyle = colors[layer.levels[i] % colors.length];
      ctx.fillRect(i * bw + 1, c.height - bh, bw - 2, bh);
    });
    d.querySelector(".cap").textContent = `layer ${L}: ${layer.levels.length} slots, levels ${layer.levels.join(",")}`;
  });
  $("brain-note").textContent = "BSBR's state bank per layer: one bar per slot, height = salience (routing weight received), colour = level (blue raw chunks, green 2×, orange 4×, red archive).";
}

function drawBrain(b) {
  if (!b) return;
  if (state.lastBrain === b.time) return;
  state.lastBrain = b.time;
  $("brain-title").textContent = `session ${b.session.slice(0, 8)}…  ${b.tokens_per_s || 0} tokens/s`;
  if (b.kind === "neurons") drawNeurons(b); else if (b.kind === "bank") drawBank(b);
  state.frames += 1;
  $("brain").dataset.frames = String(state.frames);
}

// ------------------------------------------------------------------------ page

function render(snap) {
  const s = snap.server;
  state.last = snap;
  $("model").textContent = `${s.model.name} · ${s.model.kind} · ${s.model.params.toLocaleString()} parameters · codec ${s.codec}`;
  $("tps").textContent = s.tokens_per_s.toFixed(1);
  $("batch").textContent = s.batch_size;
  $("active").textContent = s.active_calls;
  $("nsessions").textContent = s.sessions;
  $("statebytes").textContent = bytes(s.state_bytes_per_session);
  $("resident").textContent = `${s.resident.device} / ${s.resident.host}`;
  $("kvformula").textContent = snap.kv_formula + "; the recurrent state is the same size at any context.";
  state.tps.push(s.tokens_per_s); state.batch.push(s.active_calls ? s.batch_size : 0);
  if (state.tps.length > 600) { state.tps.shift(); state.batch.shift(); }
  drawThroughput(); drawMemory(snap); drawBrain(snap.brain);
  const tb = $("sessions").querySelector("tbody");
  tb.innerHTML = "";
  for (const r of snap.sessions) {
    const tr = document.createElement("tr");
    if (r.id === state.selected) tr.className = "sel";
    const cells = [r.id.slice(0, 12) + "…", r.tokens_seen.toLocaleString(), r.calls, bytes(r.state_bytes),
                   bytes(r.stored_bytes), bytes(r.kv_cache_bytes), r.tokens_per_s.toFixed(1), r.resident,
                   r.busy ? "generating" : ""];
    cells.forEach((v, i) => { const td = document.createElement("td"); td.textContent = v;
                              if (i === 8) td.className = "busy"; tr.appendChild(td); });
    tr.onclick = () => { state.selected = r.id; state.session = r.id; restart(); };
    tb.appendChild(tr);
  }
}

let controller = null;
async function run() {
  controller = new AbortController();
  const q = state.selected ? "?session=" + state.selected : "";
  try {
    setStatus("live");
    await sse("/v1/metrics/stream" + q, (d) => { if (d !== "[DONE]") render(d); }, controller.signal);
  } catch (e) {
    if (e.name === "AbortError") return;
    setStatus("disconnected: " + e.message + " (retrying)", true);
  }
  setTimeout(run, 1000);
}
function restart() { if (controller) controller.abort(); run(); }

$("keyform").onsubmit = (e) => {
  e.preventDefault(); state.key = $("key").value; sessionStorage.setItem("gb-key", state.key);
  $("keyform").hidden = true; restart();
};

async function newSession() {
  const r = await fetch("/v1/sessions", { method: "POST", headers: headers() });
  if (!r.ok) { $("out").textContent = "could not create a session: HTTP " + r.status; return null; }
  state.session = (await r.json()).id; state.selected = state.session; $("out").textContent = "";
  restart();
  return state.session;
}

$("newsession").onclick = newSession;
$("go").onclick = async () => {
  const sid = state.session || await newSession();
  if (!sid) return;
  const body = JSON.stringify({ prompt: $("prompt").value, max_tokens: +$("ntok").value, temperature: 0.8, top_k: 8 });
  const res = await fetch(`/v1/sessions/${sid}/generate`, { method: "POST", body,
                           headers: headers({ "Content-Type": "application/json" }) });
  if (!res.ok) { $("out").textContent += "\n[HTTP " + res.status + "] " + (await res.text()); return; }
  const reader = res.body.getReader(), dec = new TextDecoder();
  let buf = "";
  $("out").textContent += $("prompt").value;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, cut); buf = buf.slice(cut + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const ev = JSON.parse(line.slice(6));
      if (ev.type === "token" || ev.type === "done") $("out").textContent += ev.text || "";
      if (ev.error) $("out").textContent += "\n[" + ev.error.message + "]";
    }
  }
};

run();
