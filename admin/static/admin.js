// Behaviour of the admin pages. Loaded from the appliance itself (CSP: script-src 'self');
// the pages hold no inline script and pass their inputs in data- attributes.
"use strict";

(function () {
  const csrf = () => document.body.dataset.csrf || "";

  // -- confirmations and copy buttons -------------------------------------------------------
  document.addEventListener("submit", (event) => {
    const button = event.submitter;
    const message = button && button.dataset ? button.dataset.confirm : null;
    if (message && !window.confirm(message)) event.preventDefault();
  });
  document.addEventListener("click", (event) => {
    const target = event.target.closest("[data-copy]");
    if (!target) return;
    const source = document.getElementById(target.dataset.copy);
    if (source && navigator.clipboard) {
      navigator.clipboard.writeText(source.textContent.trim()).then(() => { target.textContent = "Copied"; });
    }
  });

  // -- charts -----------------------------------------------------------------------------------
  const COLOURS = ["#2563eb", "#dc2626", "#059669", "#d97706"];

  function drawChart(canvas, points, keys, unit) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, left = 44, bottom = 18, top = 8, right = 8;
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px sans-serif";
    ctx.fillStyle = "#64748b";
    let max = 0;
    for (const p of points) for (const k of keys) if (p[k] !== null && p[k] > max) max = p[k];
    max = max > 0 ? max * 1.15 : 1;
    ctx.strokeStyle = "#e2e8f0";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = top + (h - top - bottom) * i / 4;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(w - right, y); ctx.stroke();
      const value = max * (1 - i / 4);
      ctx.fillText(value >= 100 ? value.toFixed(0) : value.toPrecision(2), 2, y + 4);
    }
    if (points.length < 2) {
      ctx.fillText("collecting… (" + unit + ")", left + 8, top + 20);
      return;
    }
    const t0 = points[0].t, t1 = points[points.length - 1].t, span = Math.max(1, t1 - t0);
    keys.forEach((key, index) => {
      ctx.strokeStyle = COLOURS[index % COLOURS.length];
      ctx.lineWidth = 2;
      ctx.beginPath();
      let started = false;
      for (const p of points) {
        if (p[key] === null || p[key] === undefined) { started = false; continue; }
        const x = left + (w - left - right) * (p.t - t0) / span;
        const y = top + (h - top - bottom) * (1 - p[key] / max);
        if (!started) { ctx.moveTo(x, y); started = true; } else { ctx.lineTo(x, y); }
      }
      ctx.stroke();
      ctx.fillStyle = COLOURS[index % COLOURS.length];
      ctx.fillText(key, left + 6 + index * 90, h - 4);
    });
    ctx.fillStyle = "#64748b";
    ctx.fillText(Math.round(span / 60) + " min", w - right - 40, h - 4);
  }

  function fmt(value, digits, suffix) {
    return value === null || value === undefined ? "—" : value.toFixed(digits) + (suffix || "");
  }

  function mib(bytes) {
    return bytes >= 1073741824 ? (bytes / 1073741824).toFixed(1) + " GiB" : (bytes / 1048576).toFixed(1) + " MiB";
  }

  function setText(id, text) {
    const node = document.getElementById(id);
    if (node) node.textContent = text;
  }

  async function refreshDashboard(root) {
    try {
      const response = await fetch(root.dataset.metricsUrl, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) return;
      const data = await response.json();
      const s = data.summary;
      setText("t-rps", fmt(s.requests_per_s, 2));
      setText("t-p50", fmt(s.p50_ms, 1, " ms"));
      setText("t-p95", fmt(s.p95_ms, 1, " ms"));
      setText("t-tps", fmt(s.tokens_per_s, 1));
      setText("t-queue", String(s.queue_depth));
      setText("t-cost", s.cost.per_1k_tokens === null ? "—" : s.cost.per_1k_tokens.toFixed(5) + " " + s.cost.currency);
      if (data.budget) setText("t-budget", mib(data.budget.host_used_bytes) + " of " + mib(data.budget.host_bytes));
      document.querySelectorAll("canvas.chart").forEach((canvas) => {
        drawChart(canvas, data.points, canvas.dataset.series.split(","), canvas.dataset.unit);
      });
      root.dataset.refreshed = String(Date.now());
    } catch (error) {
      setText("t-rps", "offline?");
    }
  }

  const dashboard = document.getElementById("dashboard");
  if (dashboard) {
    const every = Math.max(1, parseFloat(dashboard.dataset.intervalS || "5")) * 1000;
    refreshDashboard(dashboard);
    setInterval(() => refreshDashboard(dashboard), every);
  }

  // -- export progress --------------------------------------------------------------------------
  const progress = document.getElementById("job-progress");
  if (progress) {
    const status = progress.querySelector("[data-role=job-status]");
    const logView = progress.querySelector("[data-role=job-log]");
    const cancel = progress.querySelector("[data-role=job-cancel]");
    const poll = async () => {
      const response = await fetch(progress.dataset.jobUrl, { credentials: "same-origin" });
      if (!response.ok) { status.textContent = "unknown job"; return; }
      const job = await response.json();
      status.textContent = job.status + (job.exit_code !== null ? " (exit " + job.exit_code + ")" : "");
      logView.textContent = job.log;
      logView.scrollTop = logView.scrollHeight;
      if (job.finished) { if (cancel) cancel.disabled = true; progress.dataset.finished = "1"; return; }
      setTimeout(poll, 1000);
    };
    poll();
  }

  // -- playground -------------------------------------------------------------------------------
  const playground = document.getElementById("playground");
  if (playground) {
    const $ = (id) => document.getElementById(id);
    const headers = () => {
      const h = { "Content-Type": "application/json" };
      const key = $("pg-key").value.trim();
      if (key) h.Authorization = "Bearer " + key;
      return h;
    };
    const say = (text) => { $("pg-status").textContent = text; };
    const errorOf = async (response) => {
      try { const body = await response.json(); return (body.error && body.error.message) || JSON.stringify(body); }
      catch (e) { return response.statusText; }
    };

    $("pg-load").addEventListener("click", async () => {
      const response = await fetch("/v1/models", { headers: headers() });
      if (!response.ok) { say(response.status + ": " + await errorOf(response)); return; }
      const list = await response.json();
      const select = $("pg-model");
      select.textContent = "";
      for (const model of list.data) {
        const option = document.createElement("option");
        option.textContent = model.id;
        select.appendChild(option);
      }
      say(list.data.length + " models ready");
    });

    $("pg-send").addEventListener("click", async () => {
      const output = $("pg-output");
      output.textContent = "";
      const model = $("pg-model").value;
      const text = $("pg-input").value;
      const started = performance.now();
      if ($("pg-kind").value === "embeddings") {
        const response = await fetch("/v1/embeddings", { method: "POST", headers: headers(), body: JSON.stringify({ model: model, input: text }) });
        if (!response.ok) { say(response.status + ": " + await errorOf(response)); return; }
        const body = await response.json();
        const vector = body.data[0].embedding;
        output.textContent = "dimension " + vector.length + ": [" + vector.slice(0, 8).map((v) => v.toFixed(4)).join(", ") + ", …]";
        say(body.usage.prompt_tokens + " tokens in " + Math.round(performance.now() - started) + " ms");
        return;
      }
      if ($("pg-kind").value === "rerank") {
        const documents = $("pg-documents").value.split("\n").map((line) => line.trim()).filter((line) => line);
        const response = await fetch("/v1/rerank", { method: "POST", headers: headers(), body: JSON.stringify({ model: model, query: text, documents: documents }) });
        if (!response.ok) { say(response.status + ": " + await errorOf(response)); return; }
        const body = await response.json();
        output.textContent = body.results.map((item) => item.relevance_score.toFixed(4) + "  " + item.document.text).join("\n");
        say(body.results.length + " documents ranked, " + body.usage.total_tokens + " tokens in " + Math.round(performance.now() - started) + " ms"
          + (body.truncated.length ? ", " + body.truncated.length + " cut to fit" : ""));
        return;
      }
      const stream = $("pg-stream").checked;
      const request = { model: model, messages: [{ role: "user", content: text }], stream: stream, max_tokens: parseInt($("pg-max-tokens").value, 10) || 64 };
      // Left empty, temperature and seed are not sent: the model's own generation config decides.
      const temperature = $("pg-temperature").value.trim();
      if (temperature !== "") request.temperature = parseFloat(temperature);
      const seed = $("pg-seed").value.trim();
      if (seed !== "") request.seed = parseInt(seed, 10);
      const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(request) });
      if (!response.ok) { say(response.status + ": " + await errorOf(response)); return; }
      if (!stream) {
        const body = await response.json();
        output.textContent = body.choices[0].message.content;
        say((body.usage ? body.usage.completion_tokens + " tokens in " : "") + Math.round(performance.now() - started) + " ms, finish: " + body.choices[0].finish_reason);
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let pending = "", chunks = 0, first = null, finish = null, failure = null;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        pending += decoder.decode(value, { stream: true });
        const lines = pending.split("\n");
        pending = lines.pop();
        for (const line of lines) {
          if (!line.startsWith("data:")) continue;
          const payload = line.slice(5).trim();
          if (!payload || payload === "[DONE]") continue;
          const chunk = JSON.parse(payload);
          // A failure after the 200 (deadline, engine stopped) arrives as an error frame.
          if (chunk.error) { failure = chunk.error.message || JSON.stringify(chunk.error); continue; }
          const choice = chunk.choices && chunk.choices[0];
          if (choice && choice.finish_reason) finish = choice.finish_reason;
          const piece = choice && choice.delta ? choice.delta.content : null;
          if (piece) {
            if (first === null) first = performance.now() - started;
            chunks += 1;
            output.textContent += piece;
          }
        }
      }
      const total = Math.round(performance.now() - started);
      if (failure !== null) { say(chunks + " chunks, then error: " + failure); return; }
      say(chunks + " chunks, first after " + Math.round(first || 0) + " ms, " + total + " ms total, finish: " + finish);
    });
  }
})();
