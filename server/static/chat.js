// Sparkler's chat page: plain JavaScript against the server's own /v1 API (no build step, nothing from outside).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], key: sessionStorage.getItem("sparkler-key"), asked: false, abort: null };
const NUMBERS = ["temperature", "max_tokens", "top_p", "top_k", "min_p", "typical_p", "frequency_penalty",
                 "presence_penalty", "repetition_penalty", "seed", "mirostat_target", "mirostat_lr", "n"];

// fetch with the API key; a 401 asks for the key once and tries again
async function api(path, init = {}) {
  for (;;) {
    const headers = { "Content-Type": "application/json", ...(init.headers || {}) };
    if (state.key) headers.Authorization = `Bearer ${state.key}`;
    const resp = await fetch(path, { ...init, headers });
    if (resp.status !== 401 || state.asked) return resp;
    state.asked = true;
    const key = window.prompt("This server needs an API key (its --api-key):");
    if (!key) return resp;
    state.key = key;
    sessionStorage.setItem("sparkler-key", key);
  }
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return `${resp.status}: ${(body.error && body.error.message) || JSON.stringify(body)}`;
  } catch (e) {
    return `HTTP ${resp.status}`;
  }
}

async function connect() {
  const resp = await api("/v1/models");
  if (!resp.ok) {
    $("model").textContent = `cannot list models (${await errorText(resp)})`;
    return;
  }
  const cards = (await resp.json()).data;
  const card = cards[0];
  state.model = card.id;
  if (cards.length > 1) {  // LoRA adapters beside the model: a request names the one it runs with
    const pick = $("adapter");
    pick.replaceChildren(...cards.map((c) => new Option(c.parent ? `${c.id} (LoRA)` : c.id, c.id)));
    pick.hidden = false;
    pick.onchange = () => { state.model = pick.value; };
  }
  $("attach").hidden = !(card.input_modalities || []).includes("image");  // a model that reads pictures
  const method = card.quantization && card.quantization.method;
  const q = method ? ` · ${card.dtype}, ${method === "none" ? "full-precision" : method} weights` : "";
  $("model").textContent = `${card.id}${q} · context ${card.max_model_len}`;
  $("model").title = card.quantization ? card.quantization.why : "";
}

// the request's sampling fields from the panel; throws on a malformed JSON field
function settings() {
  const body = {};
  for (const name of NUMBERS) {
    const v = $(name).value.trim();
    if (v !== "") body[name] = Number(v);
  }
  if (body.n === 1) delete body.n;
  if ($("logprobs").checked) {
    body.logprobs = true;
    body.top_logprobs = Number($("top_logprobs").value || 0);
  }
  const bias = $("logit_bias").value.trim();
  if (bias) {
    try { body.logit_bias = JSON.parse(bias); } catch (e) { throw new Error(`logit_bias is not JSON: ${e.message}`); }
  }
  const format = $("format").value;
  if (format === "json_object") body.response_format = { type: "json_object" };
  if (format === "json_schema") {
    let schema;
    try { schema = JSON.parse($("schema").value); } catch (e) { throw new Error(`the schema is not JSON: ${e.message}`); }
    body.response_format = { type: "json_schema", json_schema: { name: "page", schema } };
  }
  return body;
}

// the picture attached, as a data: URL (null: none)
function attached() {
  const file = $("picture").files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function bubble(role, text = "", picture = null) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : role;
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text;
  div.append(who, body);
  if (picture) {
    const img = document.createElement("img");
    img.className = "picture";
    img.src = picture;
    div.append(img);
  }
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

// one streamed choice: its text (or its tokens, with logprobs), and reasoning when the model thinks
function choiceView(container, index, n) {
  const div = bubble(n > 1 ? `assistant · choice ${index}` : "assistant");
  container.append(div);
  const view = { div, text: "", reasoning: null, body: div.querySelector(".body") };
  view.addReasoning = (piece) => {
    if (!view.reasoning) {
      view.reasoning = document.createElement("div");
      view.reasoning.className = "reasoning";
      div.insertBefore(view.reasoning, view.body);
    }
    view.reasoning.textContent += piece;
  };
  view.addText = (piece, logprobs) => {
    view.text += piece;
    if (!logprobs || !logprobs.length) {
      view.body.append(document.createTextNode(piece));
      return;
    }
    for (const lp of logprobs) {
      const span = document.createElement("span");
      span.className = "tok";
      span.textContent = lp.token;
      const p = Math.exp(lp.logprob);
      span.style.background = `rgba(217, 72, 15, ${(0.45 * (1 - p)).toFixed(3)})`;
      const tops = (lp.top_logprobs || []).map((t) => `${JSON.stringify(t.token)} ${t.logprob.toFixed(3)}`);
      span.title = [`logprob ${lp.logprob.toFixed(4)} (p ${p.toFixed(3)})`, ...tops].join("\n");
      view.body.append(span);
    }
  };
  return view;
}

async function send(text) {
  let sampling;
  try {
    sampling = settings();
    $("settings-error").hidden = true;
  } catch (e) {
    $("settings-error").textContent = e.message;
    $("settings-error").hidden = false;
    return;
  }
  let picture;
  try {
    picture = await attached();
  } catch (e) {
    bubble("error", `could not read the picture: ${e.message || e}`);
    return;
  }
  $("picture").value = "";
  const content = picture ? [{ type: "text", text }, { type: "image_url", image_url: { url: picture } }] : text;
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history,
                    { role: "user", content }];
  bubble("user", text, picture);
  const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true }, ...sampling };
  const container = document.createElement("div");
  container.className = "choices";
  $("messages").append(container);
  const views = {};
  const n = sampling.n || 1;
  for (let i = 0; i < n; i++) views[i] = choiceView(container, i, n);
  state.abort = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  $("stats").textContent = "waiting for the first token…";
  const start = performance.now();
  let first = null;
  let usage = null;
  let finish = "";
  try {
    const resp = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body),
                                                     signal: state.abort.signal });
    if (!resp.ok) throw new Error(await errorText(resp));
    const options = resp.headers.get("fireworks-sampling-options");
    if (options) $("options").textContent = JSON.stringify(JSON.parse(options), null, 1);
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices || []) {
          const view = views[c.index] || (views[c.index] = choiceView(container, c.index, n));
          const delta = c.delta || {};
          if (delta.reasoning_content) view.addReasoning(delta.reasoning_content);
          if (delta.content) {
            if (first === null) first = performance.now();
            view.addText(delta.content, c.logprobs && c.logprobs.content);
          }
          if (c.finish_reason) finish = c.finish_reason;
        }
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
    state.history.push({ role: "user", content }, { role: "assistant", content: views[0].text });
  } catch (e) {
    if (e.name !== "AbortError") bubble("error", String(e.message || e));
    finish = e.name === "AbortError" ? "stopped" : "error";
  } finally {
    state.abort = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  showStats(start, first, performance.now(), usage, finish);
}

function showStats(start, first, end, usage, finish) {
  const parts = [];
  if (first !== null) parts.push(`first token ${((first - start) / 1000).toFixed(2)} s`);
  if (usage) {
    const gen = usage.completion_tokens;
    if (first !== null && end > first && gen > 1) parts.push(`${((gen - 1) / ((end - first) / 1000)).toFixed(1)} tok/s`);
    parts.push(`${usage.prompt_tokens} prompt tokens`);
    const cached = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
    parts.push(`${cached} cached`);
    parts.push(`${gen} generated`);
  }
  if (finish) parts.push(`finish: ${finish}`);
  $("stats").textContent = parts.join(" · ");
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if ((!text && !$("picture").files.length) || state.abort) return;  // a picture alone may be sent
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.abort && state.abort.abort());
$("new-chat").addEventListener("click", () => {
  state.history = [];
  $("messages").replaceChildren();
  $("stats").textContent = "";
});
$("format").addEventListener("change", () => { $("schema").hidden = $("format").value !== "json_schema"; });
// After the page has loaded: a key prompt opened while it loads would hold its load event (and a browser driver
// waiting for it) until answered.
window.addEventListener("load", connect);
