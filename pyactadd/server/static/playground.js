// pyactadd playground: the same prompt, unsteered and steered, streamed side by side.
// Plain JS against the server's own OpenAI-compatible API; no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const el = {
  form: $("controls"), prompt: $("prompt"), vector: $("vector"), coeff: $("coeff"),
  coeffValue: $("coeff-value"), align: $("align"), offset: $("offset"), offsetField: $("offset-field"),
  maxTokens: $("max-tokens"), temperature: $("temperature"), topP: $("top-p"), seed: $("seed"),
  apiKey: $("api-key"), keyField: $("key-field"), generate: $("generate"), stop: $("stop"),
  notice: $("notice"), steerLabel: $("steer-label"), modelName: $("model-name"), dot: $("status-dot"),
  uploadRow: $("upload-row"), uploadFile: $("upload-file"), upload: $("upload"), uploadStatus: $("upload-status"),
  panes: { unsteered: $("pane-unsteered"), steered: $("pane-steered") },
};

const running = { unsteered: null, steered: null };  // AbortControllers
let lastRun = null;  // settings of the last generation, to re-run the steered side

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = el.apiKey.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function notice(text) {
  el.notice.textContent = text || "";
  el.notice.hidden = !text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

async function loadVectors() {
  const response = await fetch("/v1/steering/vectors", { headers: headers() });
  if (!response.ok) {
    notice("Cannot list steering vectors: " + (await errorText(response)));
    return;
  }
  const { data } = await response.json();
  const chosen = el.vector.value;
  el.vector.replaceChildren();
  for (const v of data) {
    const option = document.createElement("option");
    option.value = v.id;
    option.disabled = !v.usable;
    option.textContent = v.usable
      ? `${v.id}${v.positive != null ? ` (${v.positive} − ${v.negative})` : ""}`
      : `${v.id} (unusable)`;
    option.title = v.usable
      ? `layers ${v.layers.join(", ")} · ${v.n_positions} position(s) · ${v.alignment}`
      : v.error;
    el.vector.append(option);
  }
  const usable = data.filter((v) => v.usable);
  if (usable.some((v) => v.id === chosen)) el.vector.value = chosen;
  else if (usable.length) el.vector.value = usable[0].id;
  notice(usable.length ? "" : "No usable steering vector: start the server with --vectors DIR, or upload a .gguf below.");
  el.generate.disabled = false;
}

async function loadHealth() {
  try {
    const response = await fetch("/health");
    const health = await response.json();
    el.modelName.textContent = health.model;
    el.dot.classList.add("ok");
    el.keyField.hidden = !health.auth;
    el.uploadRow.hidden = !health.upload;
    if (health.auth && !el.apiKey.value) el.apiKey.value = localStorage.getItem("pyactadd-api-key") || "";
  } catch (_) {
    el.modelName.textContent = "server unreachable";
    el.dot.classList.add("bad");
  }
}

function settings() {
  const align = el.align.value === "offset" ? Number(el.offset.value) : el.align.value;
  const item = { vector: el.vector.value, coeff: Number(el.coeff.value) };
  if (align !== "") item.align = align;
  return {
    chat: document.querySelector('input[name="mode"]:checked').value === "chat",
    prompt: el.prompt.value,
    max_tokens: Number(el.maxTokens.value),
    temperature: Number(el.temperature.value),
    top_p: Number(el.topP.value),
    seed: Number(el.seed.value),
    steering: [item],
  };
}

function requestFor(run, steered) {
  const body = {
    max_tokens: run.max_tokens, temperature: run.temperature, top_p: run.top_p, seed: run.seed,
    stream: true, stream_options: { include_usage: true },
  };
  if (steered) body.steering = run.steering;
  if (run.chat) {
    body.messages = [{ role: "user", content: run.prompt }];
    return ["/v1/chat/completions", body];
  }
  body.prompt = run.prompt;
  return ["/v1/completions", body];
}

// Server-sent events from a fetch() response: yields each `data:` JSON payload until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function stream(side, run) {
  const pane = el.panes[side];
  const out = pane.querySelector(".completion");
  const meta = pane.querySelector(".meta");
  pane.querySelector(".prompt-echo").textContent = run.chat ? "" : run.prompt;
  out.textContent = "";
  meta.textContent = "waiting…";
  pane.dataset.state = "waiting";
  if (running[side]) running[side].abort();
  const controller = new AbortController();
  running[side] = controller;
  const started = performance.now();
  const [url, body] = requestFor(run, side === "steered");
  let tokens = null;
  let firstAt = null;
  let finish = null;
  try {
    const response = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    pane.dataset.state = "streaming";
    meta.textContent = "streaming…";
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const text = run.chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
      if (text) {
        if (firstAt === null) firstAt = performance.now();
        out.textContent += text;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    const now = performance.now();
    const wait = ((firstAt ?? now) - started) / 1000;
    const gen = (now - (firstAt ?? now)) / 1000;
    const rate = tokens && gen > 0 ? ` (${(tokens / gen).toFixed(1)} tok/s)` : "";
    meta.textContent = `${tokens ?? "?"} tokens · first after ${wait.toFixed(1)} s · ${gen.toFixed(1)} s${rate} · finish: ${finish || "?"}`;
    pane.dataset.state = "done";
  } catch (error) {
    if (error.name === "AbortError") {
      meta.textContent = "stopped";
      pane.dataset.state = "stopped";
    } else {
      meta.textContent = "error: " + error.message;
      pane.dataset.state = "error";
    }
  } finally {
    if (running[side] === controller) running[side] = null;
    el.stop.disabled = !running.unsteered && !running.steered;
  }
}

function label(run) {
  const item = run.steering[0];
  const align = item.align === undefined ? "own alignment" : item.align;
  return `${item.vector} × ${item.coeff} · ${align}`;
}

async function generate(sides) {
  if (!el.prompt.value.trim()) { el.prompt.focus(); return; }
  if (!el.vector.value) { notice("Pick a steering vector first."); return; }
  notice("");
  if (el.apiKey.value) localStorage.setItem("pyactadd-api-key", el.apiKey.value);
  const run = settings();
  lastRun = run;
  el.steerLabel.textContent = label(run);
  el.stop.disabled = false;
  // Both requests go out at once; the server runs them one after the other.
  await Promise.all(sides.map((side) => stream(side, run)));
}

el.form.addEventListener("submit", (event) => { event.preventDefault(); generate(["unsteered", "steered"]); });
el.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); generate(["unsteered", "steered"]); }
});
el.coeff.addEventListener("input", () => { el.coeffValue.textContent = el.coeff.value; });
el.coeff.addEventListener("change", () => {
  // Releasing the slider re-runs only the steered side of the last generation.
  if (lastRun && lastRun.prompt === el.prompt.value) generate(["steered"]);
});
el.align.addEventListener("change", () => { el.offsetField.hidden = el.align.value !== "offset"; });
el.stop.addEventListener("click", () => {
  for (const side of ["unsteered", "steered"]) if (running[side]) running[side].abort();
});
el.apiKey.addEventListener("change", loadVectors);
el.upload.addEventListener("click", async () => {
  const file = el.uploadFile.files[0];
  if (!file) { el.uploadStatus.textContent = "choose a .gguf file first"; return; }
  const name = file.name.replace(/\.gguf$/i, "").replace(/[^A-Za-z0-9_.-]/g, "-").replace(/^[.-]+/, "").slice(0, 64) || "vector";
  const h = headers();
  h["Content-Type"] = "application/octet-stream";
  const response = await fetch(`/v1/steering/vectors/${encodeURIComponent(name)}`, { method: "PUT", headers: h, body: file });
  el.uploadStatus.textContent = response.ok ? `added "${name}"` : "refused: " + (await errorText(response));
  if (response.ok) { await loadVectors(); el.vector.value = name; }
});

el.generate.disabled = true;
el.coeffValue.textContent = el.coeff.value;
loadHealth().then(loadVectors);
