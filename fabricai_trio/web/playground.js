// fabricai-trio playground: chat over POST /v1/inference_sse (fetch with a streaming
// body: EventSource cannot POST), sessions from /v1/sessions, status from /v1/status,
// the model picker from /v1/models.
// No dependencies, no build step; every request goes to this page's own server.

const KEY_STORAGE = "fabricai.apiKey"; // sessionStorage: this tab only
const SESSION_STORAGE = "fabricai.session"; // sessionStorage: the conversation to reopen
const TITLES_STORAGE = "fabricai.titles"; // localStorage: first prompt of the page's sessions
const MODEL_STORAGE = "fabricai.model"; // sessionStorage: the model picked for new conversations
// A new conversation on a chat-tuned model (one whose GGUF has its own chat template)
// opens with this system prompt; a base model gets none (it would only continue it).
const SYSTEM_PROMPT = "You are a helpful assistant.";
const STATUS_EVERY_MS = 1000;
const CANCEL_GRACE_MS = 5000; // after Stop, how long to wait for `complete` before aborting
const RESUME_TRIES = 20; // a dropped stream is resumed (Last-Event-ID); tries before giving up
const RESUME_DELAY_MS = 1000; // between two tries

const $ = (id) => document.getElementById(id);
const ui = {
  conn: $("status-conn"), model: $("status-model"), active: $("status-active"),
  queued: $("status-queued"), notice: $("notice"), auth: $("auth"), authWhy: $("auth-why"),
  authForm: $("auth-form"), apiKey: $("api-key"), forgetKey: $("forget-key"),
  session: $("session"), newSession: $("new-session"), deleteSession: $("delete-session"),
  transcript: $("transcript"), composer: $("composer"), prompt: $("prompt"), send: $("send"),
  stop: $("stop"), state: $("state"), settings: $("settings"), maxTokens: $("max-tokens"),
  temperature: $("temperature"), topP: $("top-p"), stopStrings: $("stop-strings"),
  modelPicker: $("model"), modelHint: $("model-hint"),
};
// The API's field names (the `param` of a 422) and the inputs they come from.
const FIELDS = {
  prompt: ui.prompt, max_tokens: ui.maxTokens, temperature: ui.temperature, top_p: ui.topP,
  stop: ui.stopStrings, session_id: ui.session, model: ui.modelPicker,
};

let models = []; // the cards of GET /v1/models, the default first
let conversationModel = null; // the open conversation's model, once it has a reply

let running = null; // {requestId, controller, item, cancelTimer}

// --- requests ---

class Unreachable extends Error {}

/** fetch() against this server, with the API key if there is one. */
async function api(path, { method = "GET", body, signal, lastEventId } = {}) {
  const headers = { Accept: "application/json" };
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  try {
    return await fetch(path, {
      method, headers, signal, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Unreachable(String(error.message || error));
  }
}

/** The error body every route answers with, whatever the response holds. */
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch { /* not JSON */ }
  return { code: String(response.status), message: response.statusText || "error", param: null };
}

/** Say what a refused request means, in the notice; mark the field a 4xx names. */
async function reportRefusal(response) {
  const error = await errorOf(response);
  const retry = response.headers.get("Retry-After");
  if (response.status === 401) {
    showAuth(error.message);
    notify(`This server needs an API key: ${error.message}`);
  } else if (response.status === 429) {
    notify(`The server is busy: every slot and the queue are full. Retry after ${retry || 1} s.`);
  } else if (response.status === 503) {
    notify(`The server is not ready (${error.message}). Retry after ${retry || 1} s.`);
  } else {
    const field = error.param && FIELDS[error.param.split(".")[0]];
    if (field) markInvalid(field, error.message);
    notify(`${response.status} ${error.code}: ${error.message}`, "error");
  }
  return error;
}

function unreachable() {
  setConn("down", "server unreachable");
  notify("Cannot reach the server. Is it running? The page retries by itself.", "unreachable");
}

// --- notices, fields, auth ---

function notify(text, kind = "warn") {
  ui.notice.textContent = text;
  ui.notice.dataset.kind = kind;
  ui.notice.hidden = false;
}

function clearNotice() {
  ui.notice.hidden = true;
  ui.notice.textContent = "";
}

function markInvalid(input, message) {
  input.setAttribute("aria-invalid", "true");
  input.title = message;
  if (input.closest("details")) input.closest("details").open = true;
  input.focus();
}

function clearInvalid() {
  for (const input of Object.values(FIELDS)) {
    input.removeAttribute("aria-invalid");
    input.removeAttribute("title");
  }
}

function showAuth(why) {
  const first = ui.auth.hidden;
  ui.auth.hidden = false;
  ui.authWhy.textContent = why || "This server needs an API key.";
  if (first) ui.apiKey.focus();
}

ui.authForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = ui.apiKey.value.trim();
  if (!key) return markInvalid(ui.apiKey, "enter a key");
  sessionStorage.setItem(KEY_STORAGE, key);
  ui.apiKey.value = "";
  ui.apiKey.removeAttribute("aria-invalid");
  clearNotice();
  if (await pollStatus()) {
    ui.auth.hidden = true;
    await loadModels();
    await loadSessions();
    ui.prompt.focus();
  }
});

ui.forgetKey.addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  ui.apiKey.value = "";
  pollStatus();
});

// --- status strip ---

function setConn(state, text) {
  ui.conn.dataset.state = state;
  if (ui.conn.textContent !== text) ui.conn.textContent = text;
}

/** Refresh the strip from /v1/status; true if the server answered 200. */
async function pollStatus() {
  let response;
  try {
    response = await api("/v1/status");
  } catch {
    unreachable();
    return false;
  }
  if (response.status === 401) {
    setConn("down", "API key needed");
    showAuth((await errorOf(response)).message);
    return false;
  }
  if (!response.ok) {
    setConn("down", `status ${response.status}`);
    return false;
  }
  const status = await response.json();
  // The picked model's figures (each model has its own slots and queue).
  const shown = (status.models && status.models[ui.modelPicker.value]) || status;
  const { active, max, queued, queue_capacity: capacity } = shown.concurrency;
  const loading = Object.values(status.models || { one: status }).some((m) => !m.model.loaded);
  if (loading) setConn("busy", "model loading");
  else setConn(active >= max ? "busy" : "ok", "connected");
  ui.model.textContent = `model ${shown.model.name}`;
  ui.active.textContent = `active ${active}/${max}`;
  ui.queued.textContent = `queued ${queued}/${capacity}`;
  ui.active.dataset.value = String(active);
  ui.queued.dataset.value = String(queued);
  if (ui.notice.dataset.kind === "unreachable") clearNotice();
  return true;
}

async function statusLoop() {
  for (;;) {
    if (!document.hidden) await pollStatus();
    await new Promise((resolve) => setTimeout(resolve, STATUS_EVERY_MS));
  }
}

// --- models ---

function card(id) {
  return models.find((m) => m.id === id);
}

/** A chat-tuned model: its GGUF carries its own chat template. */
function isInstruct(model) {
  return !!model && !!model.chat_template && model.chat_template.source === "gguf";
}

function describeModel() {
  const model = card(ui.modelPicker.value);
  if (!model) return;
  const kind = isInstruct(model) ? "chat model" : "base model: it continues text";
  const locked = ui.modelPicker.disabled ? " · this conversation's model" : "";
  ui.modelHint.textContent = `${kind} · ${model.context_length} tokens of context${locked}`;
}

/** Fill the picker from GET /v1/models: the default model (the instruct one) unless
 * another was picked in this tab. */
async function loadModels() {
  let response;
  try {
    response = await api("/v1/models");
  } catch {
    unreachable();
    return;
  }
  if (!response.ok) return reportRefusal(response);
  models = (await response.json()).data;
  const picked = ui.modelPicker.value || sessionStorage.getItem(MODEL_STORAGE);
  ui.modelPicker.replaceChildren(...models.map((m) => new Option(
    `${m.id}${isInstruct(m) ? " (chat)" : " (base)"}${m.default ? " · default" : ""}`, m.id)));
  const fallback = (models.find((m) => m.default) || models[0] || {}).id || "";
  ui.modelPicker.value = card(picked) ? picked : fallback;
  describeModel();
}

/** A conversation keeps the model it started with: show it, and lock the picker. */
function showConversationModel(model) {
  conversationModel = model && card(model) ? model : null;
  if (conversationModel) {
    ui.modelPicker.value = model;
    ui.modelPicker.disabled = true;
  } else {
    ui.modelPicker.disabled = false;
    const picked = sessionStorage.getItem(MODEL_STORAGE);
    if (card(picked)) ui.modelPicker.value = picked;
  }
  describeModel();
}

ui.modelPicker.addEventListener("change", () => {
  sessionStorage.setItem(MODEL_STORAGE, ui.modelPicker.value);
  describeModel();
  pollStatus();
});

// --- sessions ---

function titles() {
  try {
    return JSON.parse(localStorage.getItem(TITLES_STORAGE) || "{}");
  } catch {
    return {};
  }
}

function remember(id, title) {
  const all = titles();
  all[id] = title.slice(0, 60);
  localStorage.setItem(TITLES_STORAGE, JSON.stringify(all));
}

function sessionLabel(info) {
  const when = new Date(info.updated_at * 1000).toLocaleString([], {
    month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
  });
  const title = titles()[info.id] || `Session ${info.id.slice(0, 8)}`;
  return `${title} · ${info.message_count} messages · ${when}`;
}

/** Fill the picker with the caller's sessions (GET /v1/sessions), keeping the choice. */
async function loadSessions() {
  let response;
  try {
    response = await api("/v1/sessions");
  } catch {
    unreachable();
    return "";
  }
  if (!response.ok) {
    await reportRefusal(response);
    return "";
  }
  const { data } = await response.json();
  const chosen = ui.session.value || sessionStorage.getItem(SESSION_STORAGE) || "";
  ui.session.replaceChildren(new Option("New conversation", ""));
  for (const info of data) ui.session.append(new Option(sessionLabel(info), info.id));
  const still = data.some((info) => info.id === chosen);
  ui.session.value = still ? chosen : "";
  ui.deleteSession.disabled = !ui.session.value;
  return still ? chosen : "";
}

/** Show a session's stored turns (GET /v1/sessions/{id}/messages). */
async function openSession(id) {
  ui.transcript.replaceChildren();
  ui.deleteSession.disabled = !id;
  if (id) sessionStorage.setItem(SESSION_STORAGE, id);
  else sessionStorage.removeItem(SESSION_STORAGE);
  showConversationModel(null);
  if (!id) return;
  let response;
  try {
    response = await api(`/v1/sessions/${encodeURIComponent(id)}/messages`);
  } catch {
    return unreachable();
  }
  if (!response.ok) {
    await reportRefusal(response);
    if (response.status === 404) await loadSessions();
    return;
  }
  const { data } = await response.json();
  for (const message of data) {
    if (message.role === "system") continue; // set by the page, not typed
    const item = addMessage(message.role, message.content);
    if (message.role === "assistant") finish(item, message.finish_reason, message);
  }
  showConversationModel((data.find((m) => m.model) || {}).model);
}

ui.session.addEventListener("change", () => {
  clearNotice();
  openSession(ui.session.value);
});

ui.newSession.addEventListener("click", () => {
  ui.session.value = "";
  openSession("");
  clearNotice();
  ui.prompt.focus();
});

ui.deleteSession.addEventListener("click", async () => {
  const id = ui.session.value;
  if (!id || !confirm("Delete this conversation?")) return;
  let response;
  try {
    response = await api(`/v1/sessions/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch {
    return unreachable();
  }
  if (!response.ok && response.status !== 404) return reportRefusal(response);
  const all = titles();
  delete all[id];
  localStorage.setItem(TITLES_STORAGE, JSON.stringify(all));
  ui.session.value = "";
  await openSession("");
  await loadSessions();
  notify("Conversation deleted.");
});

async function createSession(title, model) {
  const body = isInstruct(card(model)) ? { system_prompt: SYSTEM_PROMPT } : {};
  const response = await api("/v1/sessions", { method: "POST", body });
  if (!response.ok) {
    await reportRefusal(response);
    return null;
  }
  const { id } = await response.json();
  remember(id, title);
  return id;
}

// --- transcript ---

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "assistant" ? "model" : role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(who, body);
  ui.transcript.append(item);
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function finish(item, reason, details = {}) {
  item.dataset.state = "done";
  item.dataset.finish = reason || "stop";
  const meta = document.createElement("span");
  meta.className = "meta";
  const parts = [reason === "cancelled" ? "cancelled" : `finish: ${reason || "stop"}`];
  const tokens = details.usage ? details.usage.completion_tokens : details.completion_tokens;
  if (tokens != null) parts.push(`${tokens} tokens`);
  const rate = details.timings && details.timings.tokens_per_second;
  if (rate) parts.push(`${rate} tok/s`);
  meta.textContent = parts.join(" · ");
  item.append(meta);
}

// --- settings ---

/** The sampling fields as the API wants them, or null after marking what is wrong. */
function readSettings() {
  const maxTokens = Number(ui.maxTokens.value);
  if (!Number.isInteger(maxTokens) || maxTokens < 1) {
    markInvalid(ui.maxTokens, "a whole number, at least 1");
    notify("Max tokens must be a whole number, at least 1.", "error");
    return null;
  }
  const temperature = Number(ui.temperature.value);
  if (ui.temperature.value === "" || !(temperature >= 0 && temperature <= 2)) {
    markInvalid(ui.temperature, "from 0 to 2");
    notify("Temperature must be from 0 to 2.", "error");
    return null;
  }
  const topP = Number(ui.topP.value);
  if (ui.topP.value === "" || !(topP > 0 && topP <= 1)) {
    markInvalid(ui.topP, "above 0, at most 1");
    notify("Top p must be above 0 and at most 1.", "error");
    return null;
  }
  const stop = ui.stopStrings.value.split("\n").filter((line) => line !== "");
  if (stop.length > 8 || stop.some((line) => line.length > 256)) {
    markInvalid(ui.stopStrings, "at most 8 lines of at most 256 characters");
    notify("Stop strings: at most 8, one per line, each at most 256 characters.", "error");
    return null;
  }
  return { max_tokens: maxTokens, temperature, top_p: topP, stop };
}

// --- generation ---

function newRequestId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12)); // works without HTTPS too
  return "pg-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** SSE events ({event, data, id}) from a fetch() response body. */
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        let id = null;
        const data = [];
        for (const line of block.split("\n")) {
          if (line === "" || line.startsWith(":")) continue; // `: keepalive`
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "event") name = value;
          else if (field === "id") id = value;
          else if (field === "data") data.push(value);
        }
        if (data.length) yield { event: name, data: JSON.parse(data.join("\n")), id };
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function setRunning(on) {
  ui.send.disabled = on;
  ui.stop.disabled = !on;
  ui.session.disabled = on;
  ui.newSession.disabled = on;
  ui.modelPicker.disabled = on || !!conversationModel;
  ui.deleteSession.disabled = on || !ui.session.value;
  ui.transcript.setAttribute("aria-busy", on ? "true" : "false");
}

function setState(text) {
  ui.state.textContent = text;
}

async function send() {
  if (running) return;
  clearInvalid();
  const prompt = ui.prompt.value;
  if (!prompt.trim()) {
    markInvalid(ui.prompt, "write a prompt first");
    return;
  }
  const settings = readSettings();
  if (!settings) return;
  clearNotice();
  const requestId = newRequestId();
  running = { requestId, controller: new AbortController(), item: null, cancelTimer: null };
  setRunning(true);
  setState("Sending…");
  try {
    await generate(prompt, settings);
  } finally {
    clearTimeout(running.cancelTimer);
    running = null;
    setRunning(false);
    pollStatus();
  }
}

async function generate(prompt, settings) {
  const run = running;
  let sessionId = ui.session.value;
  const model = ui.modelPicker.value;
  let created = false;
  let response;
  try {
    if (!sessionId) {
      sessionId = await createSession(prompt.trim(), model);
      if (!sessionId) return setState("Not sent");
      created = true;
    }
    response = await api("/v1/inference_sse", {
      method: "POST", signal: run.controller.signal,
      body: {
        prompt, session_id: sessionId, request_id: run.requestId, resumable: true, ...settings,
        ...(model ? { model } : {}),
      },
    });
  } catch (error) {
    if (error.name === "AbortError") return setState("Cancelled before it started");
    setState("Not sent");
    return unreachable();
  }
  if (!response.ok) {
    setState("Not sent");
    await reportRefusal(response);
    // A conversation opened just for this prompt would stay empty: take it back.
    if (created) {
      api(`/v1/sessions/${encodeURIComponent(sessionId)}`, { method: "DELETE" }).catch(() => {});
    }
    return;
  }
  if (created) {
    ui.session.add(new Option(titles()[sessionId] || sessionId, sessionId), 1);
    ui.session.value = sessionId;
    sessionStorage.setItem(SESSION_STORAGE, sessionId);
  }
  if (model) showConversationModel(model);
  ui.prompt.value = "";
  addMessage("user", prompt);
  const item = addMessage("assistant", "");
  item.dataset.state = "queued";
  run.item = item;
  const text = item.querySelector(".text");
  let ended = false;
  let lastEventId = null;
  let resumed = 0;
  for (let tries = 0; !ended; ) {
    try {
      await readStream(response.body);
    } catch (error) {
      if (error.name === "AbortError") break;
    }
    if (ended || run.controller.signal.aborted || tries >= RESUME_TRIES || !lastEventId) break;
    // The connection dropped mid-reply: the generation goes on on the server, and the
    // stream resumes after the last event seen (on any replica), never starting over.
    setState("Connection lost: resuming…");
    response = null;
    while (!response && tries < RESUME_TRIES && !run.controller.signal.aborted) {
      tries += 1;
      await new Promise((resolve) => setTimeout(resolve, RESUME_DELAY_MS));
      try {
        const answer = await api("/v1/inference_sse", {
          method: "POST", signal: run.controller.signal, lastEventId,
        });
        if (answer.status === 200) response = answer;
        else if (answer.status !== 503) break; // 204: it ended; 404: it expired
      } catch (error) {
        if (error.name === "AbortError") break;
      }
    }
    if (!response) break;
    resumed += 1;
    notify("The connection dropped; the reply was resumed where it stopped.", "info");
  }

  async function readStream(body) {
    for await (const { event, data, id } of sseEvents(body)) {
      if (id) lastEventId = id;
      if (event === "queued") {
        setState(data.position > 0 ? `Queued: ${data.position} ahead` : "Waiting for a slot…");
      } else if (event === "token") {
        if (item.dataset.state !== "streaming") setState("Generating…");
        item.dataset.state = "streaming";
        text.textContent += data.text;
      } else if (event === "complete") {
        ended = true;
        finish(item, data.finish_reason, data);
        setState(data.finish_reason === "cancelled" ? "Cancelled" : `Done (${data.finish_reason})`);
      } else if (event === "error") {
        ended = true;
        finish(item, "error");
        notify(`The generation failed: ${data.message}`, "error");
        setState("Failed");
      }
    }
  }

  if (ended && resumed) item.dataset.resumed = String(resumed);
  if (!ended && !run.controller.signal.aborted) {
    notify("The connection was lost mid-reply.", "error");
  }
  if (!ended) {
    const aborted = run.controller.signal.aborted;
    finish(item, aborted ? "cancelled" : "error");
    setState(aborted ? "Cancelled" : "Connection lost");
  }
  await loadSessions(); // message counts and times changed
}

/** Stop: ask the server to cancel (the stream then ends with `complete`, cancelled); if
 * it does not know the stream yet, or it stays silent, drop the connection instead. */
async function stop() {
  const run = running;
  if (!run) return;
  ui.stop.disabled = true;
  setState("Stopping…");
  const abort = () => run.controller.abort();
  let response = null;
  try {
    response = await api(`/v1/inference_sse/${encodeURIComponent(run.requestId)}/cancel`,
      { method: "POST" });
  } catch {
    /* unreachable: abort below */
  }
  if (running !== run) return; // it ended meanwhile
  if (response && response.ok) run.cancelTimer = setTimeout(abort, CANCEL_GRACE_MS);
  else abort();
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || event.isComposing) return;
  if (event.shiftKey && !(event.ctrlKey || event.metaKey)) return; // a new line
  event.preventDefault();
  send();
});

ui.stop.addEventListener("click", stop);

for (const input of Object.values(FIELDS)) {
  input.addEventListener("input", () => input.removeAttribute("aria-invalid"));
}

// --- start ---

async function start() {
  if (await pollStatus()) {
    await loadModels();
    const id = await loadSessions();
    if (id) await openSession(id);
  }
  if (ui.auth.hidden) ui.prompt.focus();
  statusLoop();
}

start();
