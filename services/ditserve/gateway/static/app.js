// The live page: GET /v1/model fills the form; Generate POSTs /v1/generate with
// `Accept: text/event-stream` and draws each event as it arrives. EventSource cannot POST,
// so the stream is read with fetch and parsed here (the SSE format: blocks of "event:" and
// "data:" lines separated by a blank line). Cancel aborts the fetch, which closes the
// connection, which cancels the request on the server.
"use strict";

const $ = (id) => document.getElementById(id);
const WORDS = {
  400: "Invalid request", 401: "Not authorized", 403: "Not allowed", 429: "The server is busy",
  499: "Cancelled", 500: "Server error", 501: "Not supported", 503: "The service is unavailable",
  504: "The request took too long",
};
let classes = [];
let samplerSteps = {};  // sampler name → its default steps ("" → the server default's guess)
let picked = false;  // whether the user chose classes in the list (else: the first match)
let controller = null;

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function describe(error) {
  // {status, code, message, retry_after} → one sentence a person can act on.
  let text = `${WORDS[error.status] || `Error ${error.status}`}: ${error.message || error.code}`;
  if (error.retry_after !== undefined) text += ` Try again in ${Math.ceil(error.retry_after)} s.`;
  return text;
}

async function errorOf(response) {
  try {
    return (await response.json()).error;
  } catch {
    return { status: response.status, code: "", message: response.statusText || "no details" };
  }
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---- the form ------------------------------------------------------------------------

async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/model", { headers: authHeaders() });
  } catch (failure) {
    showError(`Cannot reach the gateway: ${failure.message}`);
    return;
  }
  if (!response.ok) {
    showError(describe(await errorOf(response)));
    return;
  }
  clearError();
  const model = await response.json();
  $("model-name").textContent =
    `${model.model} · ${model.image_size} px · ${model.num_classes} classes`;
  classes = model.classes;
  drawClasses();
  const sampler = $("sampler");
  sampler.length = 1;
  for (const s of model.samplers) sampler.add(new Option(`${s.name} (${s.default_steps} steps)`, s.name));
  samplerSteps = Object.fromEntries(model.samplers.map((s) => [s.name, s.default_steps]));
  samplerSteps[""] = Math.max(...model.samplers.map((s) => s.default_steps));
  $("guidance").placeholder = `default ${model.default_guidance_scale}`;
  for (const option of $("preview-mode").options) {
    option.disabled = option.value !== "" && !model.preview_modes.includes(option.value);
  }
  // Decoded previews show the image itself taking shape; without a decoder, approximate.
  $("preview-mode").value = model.preview_modes.includes("decoded") ? "decoded" : "approximate";
}

function drawClasses() {
  // The options that match the search (name or id). Until the user picks, the first match
  // is chosen; what the user picked stays chosen (and listed) whatever the search.
  const list = $("class-list");
  const chosen = new Set(picked ? Array.from(list.selectedOptions, (o) => o.value) : []);
  const query = $("class-search").value.trim().toLowerCase();
  list.replaceChildren();
  for (const c of classes) {
    const id = String(c.id);
    if (query && !c.name.toLowerCase().includes(query) && id !== query && !chosen.has(id)) continue;
    const option = new Option(`${c.name} (${id})`, id);
    option.selected = chosen.has(id);
    list.add(option);
  }
  if (!chosen.size && list.options.length) list.options[0].selected = true;
  drawChosen();
}

function drawChosen() {
  const names = Array.from($("class-list").selectedOptions, (o) => o.text);
  $("class-chosen").textContent = names.length
    ? `${names.length} image${names.length > 1 ? "s" : ""}: ${names.join(", ")}`
    : "pick one or more (Ctrl-click); one image each";
}

function number(text) {
  // A number when the field holds one, else the text itself (the server names the error).
  const trimmed = text.trim();
  return trimmed !== "" && Number.isFinite(Number(trimmed)) ? Number(trimmed) : trimmed;
}

function requestBody() {
  const body = { class_labels: Array.from($("class-list").selectedOptions, (o) => Number(o.value)) };
  const typed = $("class-search").value.trim();
  if (!body.class_labels.length && typed) body.class_labels = [typed];  // a name the server resolves
  const seed = $("seed").value.trim();
  if (seed) body.seed = seed;  // a decimal string: seeds are 64-bit
  if ($("sampler").value) body.sampler = $("sampler").value;
  if ($("steps").value.trim()) body.num_steps = number($("steps").value);
  if ($("guidance").value.trim()) body.guidance_scale = number($("guidance").value);
  if ($("preview-mode").value) body.preview_mode = $("preview-mode").value;
  if (body.preview_mode === "decoded") {
    // A VAE decode per step would queue up behind the denoising (and delay the result)
    // on long runs: about 50 decoded previews per run.
    const steps = Number.isInteger(body.num_steps) && body.num_steps > 0 ? body.num_steps
      : (samplerSteps[body.sampler ?? ""] ?? 250);
    body.preview_every = Math.max(1, Math.round(steps / 50));
  }
  return body;
}

// ---- a generation ---------------------------------------------------------------------

async function generate(event) {
  event.preventDefault();
  clearError();
  const body = requestBody();
  if (!body.class_labels.length) {
    showError("Pick at least one class.");
    return;
  }
  setBusy(true);
  $("previews").replaceChildren();
  $("previews").dataset.updates = "0";
  $("results").replaceChildren();
  $("progress").value = 0;
  $("status").textContent = "sending…";
  controller = new AbortController();
  let ended = false;
  try {
    const response = await fetch("/v1/generate", {
      method: "POST", body: JSON.stringify(body), signal: controller.signal,
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
    });
    if (!response.ok) {
      showError(describe(await errorOf(response)));
      $("status").textContent = "failed";
      return;
    }
    await readEvents(response.body, (name, data) => {
      if (name === "result" || name === "error") ended = true;
      HANDLERS[name]?.(data);
    });
    if (!ended) showError("The connection closed before the result arrived.");
  } catch (failure) {
    if (failure.name === "AbortError") $("status").textContent = "cancelled";
    else showError(`The connection failed: ${failure.message}`);
  } finally {
    setBusy(false);
    controller = null;
  }
}

async function readEvents(stream, onEvent) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    for (let cut = buffer.indexOf("\n\n"); cut >= 0; cut = buffer.indexOf("\n\n")) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(name, JSON.parse(data));  // comment lines (heartbeats) carry no data
    }
  }
}

let seedInUse = "";

const HANDLERS = {
  accepted(a) {
    seedInUse = a.seed;
    $("progress").max = a.num_steps;
    $("status").textContent =
      `accepted: ${a.sampler}, ${a.num_steps} steps, guidance ${a.guidance_scale}, seed ${a.seed}` +
      (a.queue_position ? ` (${a.queue_position} ahead in the queue)` : "");
  },
  progress(p) {
    if (p.waiting_on) {  // a notice: the request is stalled on a peer, not a step
      $("status").textContent =
        `waiting on the ${p.waiting_on} for ${p.waiting_seconds.toFixed(0)} s: ${p.waiting_reason}`;
      return;
    }
    $("progress").max = p.total_steps;
    $("progress").value = p.step;
    $("status").textContent =
      `step ${p.step} / ${p.total_steps} · ${p.elapsed_seconds.toFixed(1)} s, about ${p.eta_seconds.toFixed(1)} s left`;
    if (!p.previews.length) return;
    const box = $("previews");
    p.previews.forEach((url, i) => {
      let img = box.children[i];
      if (!img) {
        img = document.createElement("img");
        img.alt = `preview ${i + 1}`;
        box.append(img);
      }
      img.src = url;
    });
    box.dataset.updates = String(Number(box.dataset.updates) + 1);
  },
  result(r) {
    const t = r.timings;
    $("status").textContent =
      `done: seed ${r.seed} · queued ${t.queued_seconds.toFixed(2)} s, denoised ${t.denoising_seconds.toFixed(2)} s, decoded ${t.decoding_seconds.toFixed(2)} s`;
    $("progress").value = $("progress").max;
    for (const image of r.images) {
      const url = `data:${image.media_type};base64,${image.data}`;
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = url;
      const name = classes[image.label]?.name ?? String(image.label);
      img.alt = name;
      const link = document.createElement("a");
      link.href = url;
      link.download = `ditserve-${image.label}-seed${r.seed || seedInUse}.${image.media_type.split("/")[1]}`;
      link.textContent = `download ${name}`;
      figure.append(img, link);
      $("results").append(figure);
    }
    if (!r.images.length) $("results").textContent = "no images (latents only)";
  },
  error(e) {
    showError(describe(e.error));
    $("status").textContent = "failed";
  },
};

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => controller?.abort());
  $("class-search").addEventListener("input", drawClasses);
  $("class-list").addEventListener("change", () => {
    picked = $("class-list").selectedOptions.length > 0;
    drawChosen();
  });
  $("token").addEventListener("change", loadModel);
  loadModel();
});
