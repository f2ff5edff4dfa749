/**
 * The playground: one page at `/` to try the served model from a browser, through the same
 * /v1/completions stream any client uses (prompt, optional suffix for fill-in-the-middle, the common
 * sampling knobs), showing the text as it arrives and the time to first token and tokens/s the browser saw.
 * A string, not a file beside the code, so that it travels with the compiled server wherever that goes; its
 * script uses no template literals, so the string needs no escapes. The page holds no data: it is served
 * without the API key, which it asks for and sends with its API calls.
 */
export const PLAYGROUND_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>decima playground</title>
<link rel="icon" href="data:,">
<style>
  :root { color-scheme: light dark; font-family: system-ui, sans-serif; }
  body { max-width: 60rem; margin: 1.5rem auto; padding: 0 1rem; }
  header { display: flex; align-items: baseline; gap: 1rem; flex-wrap: wrap; }
  h1 { font-size: 1.3rem; margin: 0 0 0.75rem; }
  textarea, pre { width: 100%; box-sizing: border-box; font: 0.9rem ui-monospace, monospace; }
  textarea { min-height: 8rem; }
  details textarea { min-height: 4rem; }
  .knobs { display: flex; flex-wrap: wrap; gap: 1rem; margin: 0.75rem 0; }
  .knobs label { display: flex; flex-direction: column; font-size: 0.85rem; gap: 0.2rem; }
  .knobs input { width: 8rem; }
  pre { white-space: pre-wrap; border: 1px solid #8886; border-radius: 4px; padding: 0.75rem; min-height: 6rem; }
  .context { opacity: 0.5; }
  #error { color: #d33; }
  #stats, #model { font-size: 0.85rem; opacity: 0.8; }
</style>
</head>
<body>
<header><h1>decima playground</h1><span id="model"></span></header>
<form id="form">
  <label for="prompt">Prompt</label>
  <textarea id="prompt" required spellcheck="false">def fibonacci(n):</textarea>
  <details><summary>Suffix: fill in the middle, between the prompt and this</summary>
    <textarea id="suffix" spellcheck="false"></textarea></details>
  <div class="knobs">
    <label>max tokens <input id="max_tokens" type="number" min="1" value="128" required></label>
    <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.05" value="0" required></label>
    <label>top p <input id="top_p" type="number" min="0.01" max="1" step="0.01" value="1" required></label>
    <label>stop (\\n for a newline) <input id="stop" type="text"></label>
    <label>API key <input id="api_key" type="password" autocomplete="off"></label>
  </div>
  <button id="generate" type="submit" title="Ctrl+Enter">Generate</button>
  <button id="cancel" type="button" disabled>Stop</button>
</form>
<p id="error" role="alert"></p>
<pre id="output" aria-live="polite"></pre>
<p id="stats"></p>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let model = null;
let controller = null;

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.authorization = "Bearer " + key;
  return h;
}

// An error reply is OpenAI's { error: { message } }.
async function failure(res) {
  try {
    return (await res.json()).error.message;
  } catch {
    return res.status + " " + res.statusText;
  }
}

async function loadModel() {
  const res = await fetch("/v1/models", { headers: headers() });
  if (!res.ok) throw new Error(await failure(res));
  const served = (await res.json()).data[0];
  $("model").textContent = served.id + ", a context of " + served.max_model_len + " tokens";
  return served.id;
}

function body() {
  const b = {
    model,
    prompt: $("prompt").value,
    max_tokens: Number($("max_tokens").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  if ($("suffix").value) b.suffix = $("suffix").value;
  const stop = $("stop").value.replaceAll("\\\\n", "\\n").replaceAll("\\\\t", "\\t");
  if (stop) b.stop = stop;
  return b;
}

// The payloads of a server-sent event stream ("data: ..." and a blank line each); a read may end mid-event.
async function* events(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      if (event === "data: [DONE]") return;
      yield JSON.parse(event.slice(6));
    }
  }
}

function span(className, text) {
  const s = document.createElement("span");
  s.className = className;
  s.textContent = text;
  return s;
}

function running(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
}

function stats(started, first, ended, usage, finish) {
  const parts = [];
  if (first !== null) parts.push("first token after " + (first - started).toFixed(0) + " ms");
  if (usage) {
    parts.push(usage.prompt_tokens + " prompt tokens", usage.completion_tokens + " generated");
    if (first !== null && usage.completion_tokens > 1) {
      parts.push(((usage.completion_tokens - 1) * 1000 / (ended - first)).toFixed(1) + " tokens/s after the first");
    }
  }
  if (finish) parts.push("finish reason: " + finish);
  return parts.join(" · ");
}

async function generate(e) {
  e.preventDefault();
  $("error").textContent = "";
  $("stats").textContent = "";
  const text = span("", "");
  $("output").replaceChildren(span("context", $("prompt").value), text, span("context", $("suffix").value));
  controller = new AbortController();
  running(true);
  let started = performance.now(), first = null, usage = null, finish = null;
  try {
    model = model ?? (await loadModel());
    started = performance.now();
    const res = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(body()), signal: controller.signal });
    if (!res.ok) throw new Error(await failure(res));
    for await (const chunk of events(res)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        if (choice.text) {
          first = first ?? performance.now();
          text.textContent += choice.text;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped here";
    else $("error").textContent = err.message;
  } finally {
    running(false);
    controller = null;
  }
  $("stats").textContent = stats(started, first, performance.now(), usage, finish);
}

$("form").addEventListener("submit", generate);
$("form").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !controller) $("form").requestSubmit();
});
$("cancel").addEventListener("click", () => controller && controller.abort());
$("api_key").addEventListener("change", () => {
  model = null;
  loadModel().then((id) => (model = id), () => {});
});
loadModel().then((id) => (model = id), (err) => ($("model").textContent = err.message));
</script>
</body>
</html>
`;
