// The chat page (chat.html): conversations and settings kept in this browser's localStorage,
// answers streamed from this server's /v1/chat/completions (server-sent events) and shown as
// markdown. Model text reaches the page only through render(): marked escapes any HTML in the
// text, DOMPurify then removes what is still unsafe (javascript: links and the like).
"use strict";

const $ = id => document.getElementById(id);
const STORE = {convs: "mpitpi.conversations", current: "mpitpi.current",
               settings: "mpitpi.settings", key: "mpitpi.apiKey"};
const DEFAULTS = {temperature: "0.7", maxTokens: "", system: ""};
const log = $("log"), input = $("input"), send = $("send"), stop = $("stop"), regen = $("regen");

// [{id, title, messages: [{role: "user"|"assistant", content, meta?}]}], most recent first
let convs = load(STORE.convs, []);
let current = localStorage.getItem(STORE.current);  // the open conversation's id; null: a new one
let controller = null;   // the AbortController of the answer being streamed, if any
let model = null;        // the id /v1/models gives (null until it answers)

function load(name, fallback) {
  try {
    return JSON.parse(localStorage.getItem(name)) ?? fallback;
  } catch {
    return fallback;
  }
}

function store() {
  try {
    localStorage.setItem(STORE.convs, JSON.stringify(convs));
    if (current) localStorage.setItem(STORE.current, current);
    else localStorage.removeItem(STORE.current);
  } catch (e) {
    problem(null, "Could not save the conversations in this browser: " + e.message +
            " Delete some conversations to make room.");
  }
}

// ---- markdown

const escapeHtml = s => s.replace(/[&<>"']/g, c =>
  ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
// raw HTML in model text is shown as text, never parsed (block and inline HTML both come here);
// a markdown image becomes a link: model text must not make the browser fetch any address
marked.use({gfm: true, breaks: true, headerIds: false, mangle: false,
            renderer: {html: escapeHtml,
                       image: (href, title, text) =>
                         `<a href="${escapeHtml(href || "")}">${escapeHtml(text || href || "")}</a>`}});
DOMPurify.addHook("afterSanitizeAttributes", node => {
  if (node.tagName === "A") {   // links open beside the chat, never in place of it
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});
// + "\n": marked 4 shows a code block whose fence is still open (as while it streams) only
// when the text ends with a newline
const render = text => DOMPurify.sanitize(marked.parse(text + "\n"));

// ---- the server

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(more) {
  const key = localStorage.getItem(STORE.key);
  return key ? {...more, Authorization: "Bearer " + key} : more;
}

async function failure(resp) {   // an HttpError from an answer that is not 2xx
  let message = `${resp.status} ${resp.statusText}`;
  try {
    message = (await resp.json()).error.message;
  } catch { /* not the API's JSON error: keep the status line */ }
  if (resp.status === 401) message += " Set the API key in Settings.";
  return new HttpError(resp.status, message);
}

async function* events(resp) {   // the JSON objects of a server-sent event stream, in order
  const reader = resp.body.getReader(), decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {done, value} = await reader.read();
    buf += decoder.decode(value, {stream: !done});
    const blocks = buf.split(/\r?\n\r?\n/);
    buf = done ? "" : blocks.pop();
    for (const block of blocks) {
      const data = block.split(/\r?\n/).filter(l => l.startsWith("data:"))
        .map(l => l.slice(5).replace(/^ /, "")).join("\n");
      if (data && data !== "[DONE]") yield JSON.parse(data);
    }
    if (done) return;
  }
}

async function loadModel() {
  const shown = $("model");
  try {
    const resp = await fetch("/v1/models", {headers: headers({})});
    if (!resp.ok) throw await failure(resp);
    model = (await resp.json()).data[0].id;
    shown.textContent = model;
    shown.classList.remove("error");
  } catch (e) {
    model = null;
    shown.textContent = e.status === 401 ? "API key needed (Settings)" : "no model: " + e.message;
    shown.classList.add("error");
  }
}

function request(conv) {   // the /v1/chat/completions body that answers ``conv``
  const s = settings();
  const messages = conv.messages.map(({role, content}) => ({role, content}));
  if (s.system.trim()) messages.unshift({role: "system", content: s.system});
  const body = {messages, stream: true, stream_options: {include_usage: true}};
  if (model) body.model = model;
  if (s.temperature.trim() !== "") body.temperature = Number(s.temperature);
  if (s.maxTokens.trim() !== "") body.max_tokens = Number(s.maxTokens);
  return body;
}

// ---- settings

const FIELDS = {temperature: $("temperature"), maxTokens: $("max-tokens"), system: $("system")};

function settings() {
  return {...DEFAULTS, ...load(STORE.settings, {})};
}

function showSettings(open) {
  $("settings").hidden = !open;
  $("gear").setAttribute("aria-expanded", String(open));
}

// ---- the page

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function conv() {
  return convs.find(c => c.id === current) || null;
}

function bubble(role, content, meta) {   // a message's element, added to the log
  const div = element("div", "msg " + role), body = element("div", "body");
  if (role === "assistant") body.innerHTML = render(content);
  else body.textContent = content;
  div.append(body);
  if (meta) div.append(element("div", "meta", meta));
  log.append(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function keepAtEnd(change) {   // run change(); a log scrolled to its end stays there
  const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 60;
  change();
  if (atEnd) log.scrollTop = log.scrollHeight;
}

function problem(div, message) {   // an error shown in ``div`` (null: a new one); not kept
  div = div || log.appendChild(element("div", "msg assistant"));
  div.classList.add("error");
  div.append(element("div", "problem", message));
  div.scrollIntoView({block: "end"});
}

function showList() {
  $("convs").replaceChildren(...convs.map(c => {
    const li = element("li", c.id === current ? "current" : "");
    const open = element("button", "open", c.title || "New chat");
    const del = element("button", "delete", "×");
    open.type = del.type = "button";
    open.title = c.title;
    del.title = "Delete this conversation";
    open.addEventListener("click", () => openConv(c.id));
    del.addEventListener("click", () => deleteConv(c.id));
    li.append(open, del);
    return li;
  }));
}

function showLog() {
  log.replaceChildren();
  for (const m of conv()?.messages || []) bubble(m.role, m.content, m.meta);
  buttons();
}

function buttons() {
  send.disabled = !!controller;
  stop.disabled = !controller;
  regen.disabled = !!controller || !conv()?.messages.some(m => m.role === "user");
}

function openConv(id) {
  if (controller) controller.abort();
  current = id;
  store();
  showList();
  showLog();
}

function deleteConv(id) {
  const c = convs.find(c => c.id === id);
  if (!c || !confirm(`Delete the conversation "${c.title || "New chat"}"?`)) return;
  convs = convs.filter(c => c.id !== id);
  openConv(current === id ? null : current);
}

function ask(text) {
  let c = conv();
  if (!c) {
    c = {id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8), title: "",
         messages: []};
    current = c.id;
  }
  c.title = c.title || text.slice(0, 80);
  c.messages.push({role: "user", content: text});
  convs = [c, ...convs.filter(x => x !== c)];
  store();
  showList();
  bubble("user", text);
  answer(c);
}

async function answer(c) {   // stream the answer to ``c``'s last user message into the log
  const div = bubble("assistant", ""), body = div.querySelector(".body");
  const spinner = body.appendChild(element("div", "spinner"));
  spinner.setAttribute("role", "status");
  spinner.setAttribute("aria-label", "waiting for the first token");
  const mine = controller = new AbortController();
  buttons();
  const t0 = performance.now();
  let first = null, n = 0, text = "", error = null, painting = false;
  const paint = () => {   // at most once a frame: the text so far, as markdown
    if (painting) return;
    painting = true;
    requestAnimationFrame(() => {
      painting = false;
      keepAtEnd(() => { body.innerHTML = render(text); });
    });
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", signal: mine.signal, headers: headers({"Content-Type": "application/json"}),
      body: JSON.stringify(request(c))});
    if (!resp.ok) throw await failure(resp);
    for await (const ev of events(resp)) {
      if (ev.error) throw new Error(ev.error.message);
      if (ev.usage) n = ev.usage.completion_tokens;
      const piece = ev.choices?.[0]?.delta?.content;
      if (piece) {
        if (first === null) first = performance.now();
        spinner.remove();
        text += piece;
        paint();
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") error = e;
  }
  spinner.remove();
  const stopped = mine.signal.aborted, total = (performance.now() - t0) / 1000;
  const meta = (first ? `first token ${((first - t0) / 1000).toFixed(2)} s, ` : "") +
    `${total.toFixed(2)} s` + (n ? `, ${n} tokens, ${(n / total).toFixed(1)} tokens/s` : "") +
    (stopped ? ", stopped" : "");
  if (controller === mine) controller = null;
  if (error) {
    problem(div, error.message);
    if (error.status === 401) {
      showSettings(true);
      $("key").focus();
    }
  } else if (text || !stopped) {
    c.messages.push({role: "assistant", content: text, meta});
    store();
    keepAtEnd(() => {
      body.innerHTML = render(text);
      div.append(element("div", "meta", meta));
    });
  } else {
    div.remove();   // stopped before its first token: nothing to keep
  }
  buttons();
}

// ---- wiring

$("form").addEventListener("submit", e => {
  e.preventDefault();
  const text = input.value.trim();
  if (text && !controller) {
    input.value = "";
    ask(text);
  }
});
input.addEventListener("keydown", e => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send.click();
  }
});
stop.addEventListener("click", () => controller && controller.abort());
regen.addEventListener("click", () => {
  const c = conv();
  if (!c || controller) return;
  while (c.messages.length && c.messages.at(-1).role === "assistant") c.messages.pop();
  if (!c.messages.length) return;
  store();
  showLog();
  answer(c);
});
$("new").addEventListener("click", () => {
  openConv(null);
  input.focus();
});
$("gear").addEventListener("click", () => showSettings($("settings").hidden));

const s = settings();
for (const [name, field] of Object.entries(FIELDS)) {
  field.value = s[name];
  field.addEventListener("input", () => {
    localStorage.setItem(STORE.settings, JSON.stringify({...settings(), [name]: field.value}));
  });
}
$("key").value = localStorage.getItem(STORE.key) || "";
$("key").addEventListener("input", () => {
  const key = $("key").value.trim();
  if (key) localStorage.setItem(STORE.key, key);
  else localStorage.removeItem(STORE.key);
});
$("key").addEventListener("change", loadModel);
window.addEventListener("storage", e => {   // another tab changed the conversations
  if (e.key === STORE.convs && !controller) {
    convs = load(STORE.convs, []);
    if (!conv()) current = null;
    showList();
    showLog();
  }
});

if (current && !conv()) current = null;
showList();
showLog();
loadModel();
// a link like /?q=Hello puts its question in the input of a new conversation; the user sends
// it (a link from another site must not ask with this browser's key); the address is cleaned
const asked = new URLSearchParams(location.search).get("q");
if (asked) {
  history.replaceState(null, "", location.pathname);
  current = null;
  showList();
  showLog();
  input.value = asked;
  input.focus();
}
