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
    // An inline message under an editor; empty text hides it.
    const showError = (id, text) => { const node = $(id); node.textContent = text || ""; node.hidden = !text; };
    const parseJson = (text) => {
      try { return { value: JSON.parse(text) }; } catch (e) { return { error: e.message }; }
    };
    const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);

    // The editors are only checked to be JSON of the right shape; the API validates the rest
    // (a bad schema or tool is its 400, shown like any other error).
    const readSchema = () => {
      const parsed = parseJson($("pg-schema").value);
      if ("error" in parsed) return { error: "The schema is not valid JSON: " + parsed.error };
      if (!isObject(parsed.value)) return { error: "The schema must be a JSON object, such as {\"type\": \"object\", \"properties\": {…}}." };
      const name = $("pg-schema-name").value.trim() || "answer";
      return { value: { type: "json_schema", json_schema: { name: name, schema: parsed.value, strict: $("pg-schema-strict").checked } } };
    };
    const readTools = () => {
      const parsed = parseJson($("pg-tools").value);
      if ("error" in parsed) return { error: "The tools are not valid JSON: " + parsed.error };
      const tools = parsed.value;
      if (!Array.isArray(tools) || tools.length === 0) return { error: "The tools must be a non-empty JSON list of {\"type\": \"function\", \"function\": {…}} objects." };
      for (let i = 0; i < tools.length; i++) {
        const fn = isObject(tools[i]) ? tools[i].function : null;
        if (!isObject(fn) || typeof fn.name !== "string" || !fn.name) {
          return { error: "tools[" + i + "].function.name is missing: each tool is {\"type\": \"function\", \"function\": {\"name\": …, \"parameters\": {…}}}." };
        }
      }
      return { value: tools };
    };
    // tool_choice offers auto / required / none and each function the editor names.
    const refreshToolChoice = (tools) => {
      const select = $("pg-tool-choice");
      const chosen = select.value;
      select.querySelectorAll("option[data-function]").forEach((option) => option.remove());
      for (const tool of tools) {
        const option = document.createElement("option");
        option.value = "function:" + tool.function.name;
        option.dataset.function = tool.function.name;
        option.textContent = "function " + tool.function.name;
        select.appendChild(option);
      }
      if (Array.from(select.options).some((option) => option.value === chosen)) select.value = chosen;
    };
    const syncOptions = () => {
      $("pg-chat-options").hidden = $("pg-kind").value !== "chat";
      $("pg-schema-box").hidden = $("pg-format").value !== "json_schema";
      $("pg-tools-box").hidden = !$("pg-tools-on").checked;
    };
    ["pg-kind", "pg-format", "pg-tools-on"].forEach((id) => $(id).addEventListener("change", syncOptions));
    $("pg-schema").addEventListener("input", () => {
      if (!$("pg-schema-error").hidden) showError("pg-schema-error", readSchema().error);
    });
    $("pg-tools").addEventListener("input", () => {
      const tools = readTools();
      if (tools.value) refreshToolChoice(tools.value);
      if (!$("pg-tools-error").hidden) showError("pg-tools-error", tools.error);
    });
    const initialTools = readTools();
    if (initialTools.value) refreshToolChoice(initialTools.value);
    syncOptions();

    // A tool call is shown as a block of its own: the function's name, its id, its arguments.
    const callBlocks = [];
    const callBlock = (index) => {
      if (!callBlocks[index]) {
        const block = document.createElement("div");
        block.className = "tool-call";
        block.dataset.index = String(index);
        const head = document.createElement("div");
        head.className = "tool-call-head";
        head.appendChild(document.createTextNode("Tool call "));
        const name = document.createElement("code");
        name.className = "tool-call-name";
        const id = document.createElement("span");
        id.className = "tool-call-id";
        head.append(name, " ", id);
        const args = document.createElement("pre");
        args.className = "tool-call-arguments";
        const note = document.createElement("p");
        note.className = "tool-call-note warn";
        note.hidden = true;
        block.append(head, args, note);
        $("pg-calls").appendChild(block);
        callBlocks[index] = { block: block, name: name, id: id, args: args, note: note, text: "" };
      }
      return callBlocks[index];
    };
    const addToCall = (index, fragment) => {
      const call = callBlock(index);
      if (fragment.id) call.id.textContent = fragment.id;
      const fn = fragment.function || {};
      if (fn.name) { call.name.textContent = fn.name; call.block.dataset.name = fn.name; }
      if (fn.arguments) { call.text += fn.arguments; call.args.textContent = call.text; }
    };
    // Once complete, arguments are pretty-printed; text that does not parse (cut by max tokens)
    // stays as it came, with a note.
    const finishCalls = () => {
      for (const call of callBlocks) {
        if (!call) continue;
        const parsed = parseJson(call.text);
        if ("error" in parsed) { call.note.textContent = "The arguments are not valid JSON: " + parsed.error; call.note.hidden = false; }
        else call.args.textContent = JSON.stringify(parsed.value, null, 2);
      }
      return callBlocks.filter((call) => call).length;
    };
    const callCount = (n) => n ? n + (n === 1 ? " tool call, " : " tool calls, ") : "";
    // With a JSON response format, say whether the answer parses.
    const checkJson = (format, text) => {
      const check = $("pg-check");
      if (format === "text" || !text) { check.hidden = true; return; }
      const parsed = parseJson(text);
      check.textContent = "error" in parsed ? "The answer is not valid JSON: " + parsed.error : "The answer is valid JSON.";
      check.hidden = false;
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
      $("pg-calls").textContent = "";
      callBlocks.length = 0;
      $("pg-check").hidden = true;
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
      // Response format and tools: editors that are not JSON of the right shape stop the send.
      const format = $("pg-format").value;
      showError("pg-schema-error", "");
      showError("pg-tools-error", "");
      if (format === "json_object") request.response_format = { type: "json_object" };
      if (format === "json_schema") {
        const schema = readSchema();
        if (schema.error) { showError("pg-schema-error", schema.error); say("Not sent: the schema needs fixing."); return; }
        request.response_format = schema.value;
      }
      if ($("pg-tools-on").checked) {
        const tools = readTools();
        if (tools.error) { showError("pg-tools-error", tools.error); say("Not sent: the tools need fixing."); return; }
        refreshToolChoice(tools.value);
        const choice = $("pg-tool-choice").value;
        request.tools = tools.value;
        request.tool_choice = choice.startsWith("function:") ? { type: "function", function: { name: choice.slice("function:".length) } } : choice;
      }
      say("Sending…");
      const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(request) });
      if (!response.ok) { say(response.status + ": " + await errorOf(response)); return; }
      if (!stream) {
        const body = await response.json();
        const message = body.choices[0].message;
        output.textContent = message.content || "";
        (message.tool_calls || []).forEach((call, index) => addToCall(index, call));
        const calls = finishCalls();
        checkJson(format, output.textContent);
        say((body.usage ? body.usage.completion_tokens + " tokens in " : "") + Math.round(performance.now() - started) + " ms, "
          + callCount(calls) + "finish: " + body.choices[0].finish_reason);
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
          const fragments = choice && choice.delta && choice.delta.tool_calls ? choice.delta.tool_calls : [];
          if (piece || fragments.length) {
            if (first === null) first = performance.now() - started;
            chunks += 1;
          }
          if (piece) output.textContent += piece;
          // Tool calls come as fragments: the first of each index names the function, the
          // rest add to its arguments.
          for (const fragment of fragments) addToCall(fragment.index || 0, fragment);
        }
      }
      const total = Math.round(performance.now() - started);
      const calls = finishCalls();
      checkJson(format, output.textContent);
      if (failure !== null) { say(chunks + " chunks, then error: " + failure); return; }
      say(chunks + " chunks, first after " + Math.round(first || 0) + " ms, " + total + " ms total, " + callCount(calls) + "finish: " + finish);
    });
  }
})();
