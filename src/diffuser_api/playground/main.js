// The playground page: pick a model, fill the form for what it can do, watch the work live.
// Generations and edits go over the progress WebSocket (queue position, steps, partial images);
// variations go over HTTP multipart, as OpenAI's API has them. In async mode any of the three is
// submitted as a job and followed through its events; the job's id is kept in local storage, so
// a reload of the page picks it up again.

import { Api, ApiError, apiKey } from "./api.js";
import { MaskEditor } from "./mask.js";

const $ = (id) => document.getElementById(id);
const api = new Api(document);
const form = $("request-form");
const modelSelect = $("model");
const tabs = [...document.querySelectorAll("[role=tab]")];
const SUBMIT_LABELS = { generate: "Generate", edit: "Edit", vary: "Create variations" };
// Form fields sent as they are, when shown and filled in; numbers go as numbers.
const TEXT_FIELDS = ["prompt", "negative_prompt", "size"];
const NUMBER_FIELDS = ["num_inference_steps", "guidance_scale", "true_cfg_scale", "strength", "seed", "n"];
// Where an error whose `param` names something that is not a form field of its own is shown.
const PARAM_FIELDS = { images: "image", api_key: "api_key" };
const ENDPOINTS = { generate: "generations", edit: "edits", vary: "variations" };
const JOB_STORAGE = "diffuser-api.playground.job";

// The async job this page follows: {id, n, prompt}, until it ends.
const followedJob = {
  get() {
    try {
      return JSON.parse(localStorage.getItem(JOB_STORAGE));
    } catch {
      return null;
    }
  },
  set: (job) => localStorage.setItem(JOB_STORAGE, JSON.stringify(job)),
  clear: () => localStorage.removeItem(JOB_STORAGE),
};

const state = { models: [], mode: "generate", inputs: [], running: null, job: null, adapters: [] };
const mask = new MaskEditor({
  canvas: $("mask-canvas"), image: $("mask-image"), cursor: $("mask-cursor"),
  brushSize: $("brush-size"), tools: [...document.querySelectorAll("input[name=mask_tool]")],
});

// ---- the model and what it can do ----

function currentModel() {
  return state.models.find((model) => model.id === modelSelect.value);
}

async function loadModels() {
  clearErrors();
  try {
    state.models = await api.models();
  } catch (error) {
    showError(error);
    return;
  }
  const chosen = modelSelect.value;
  modelSelect.replaceChildren(...state.models.map((model) => new Option(`${model.id} (${model.status})`, model.id)));
  if (state.models.some((model) => model.id === chosen)) modelSelect.value = chosen;
  applyModel();
}

function modesOf(model) {
  const endpoints = model?.endpoints;
  if (!endpoints) return [];
  return [
    endpoints.generations.supported && "generate",
    endpoints.edits.supported && "edit",
    endpoints.variations.supported && "vary",
  ].filter(Boolean);
}

function applyModel() {
  const model = currentModel();
  const modes = modesOf(model);
  for (const tab of tabs) tab.hidden = !modes.includes(tab.dataset.mode);
  $("model-info").textContent = !model ? "No model is served." : !model.endpoints
    ? `${model.status}: ${model.reason || "its checkpoint could not be read"}`
    : `${model.family} (${model.pipeline}), ${model.status}. Sizes: ${model.sizes.rule}.`;
  if (model?.sizes) {
    $("size").placeholder = model.sizes.default;
    $("size-hint").textContent = model.sizes.rule;
    const sides = [256, 512, 768, 1024];
    $("sizes").replaceChildren(...[model.sizes.default, ...sides.map((side) => `${side}x${side}`)]
      .filter((size, index, all) => all.indexOf(size) === index).map((size) => new Option(size)));
  }
  const defaults = model?.defaults ?? {};
  $("num_inference_steps").placeholder = defaults.steps ?? "";
  $("guidance_scale").placeholder = defaults.guidance_scale ?? "";
  $("strength").placeholder = defaults.strength ?? "";
  setMode(modes.includes(state.mode) ? state.mode : modes[0] ?? "generate");
  loadAdapters(model);
}

/** LoRA inputs only where the model lists adapters (`GET /v1/models/{id}`); hidden otherwise. */
async function loadAdapters(model) {
  state.adapters = [];
  renderLoras();
  if (!model?.endpoints) return;
  let described;
  try {
    described = await api.model(model.id);
  } catch {
    return; // a model the server cannot describe takes no LoRAs from this page
  }
  if (currentModel()?.id !== model.id) return; // another model was chosen meanwhile
  state.adapters = Array.isArray(described.adapters) ? described.adapters : [];
  renderLoras();
}

function renderLoras() {
  $("loras-field").hidden = !state.adapters.length;
  $("loras").replaceChildren(...state.adapters.flatMap((adapter) => {
    const label = document.createElement("label");
    const use = document.createElement("input");
    use.type = "checkbox";
    use.name = "lora";
    use.value = adapter.name;
    label.append(use, ` ${adapter.name}${adapter.loaded ? " (loaded)" : ""}`);
    const scale = document.createElement("input");
    scale.type = "number";
    scale.step = "0.05";
    scale.placeholder = adapter.scale ?? "";
    scale.dataset.lora = adapter.name;
    scale.setAttribute("aria-label", `Scale of ${adapter.name}`);
    return [label, scale];
  }));
}

function setMode(mode) {
  state.mode = mode;
  for (const tab of tabs) {
    const selected = tab.dataset.mode === mode;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
  }
  $("submit").textContent = SUBMIT_LABELS[mode];
  showFields();
}

/** A field shows when the mode uses it and, for a model-specific extra, the model takes it. */
function showFields() {
  const model = currentModel();
  const extras = new Set(model?.extras ?? []);
  for (const field of form.querySelectorAll("[data-modes], [data-extra]")) {
    const modes = field.dataset.modes?.split(" ");
    const extra = field.dataset.extra;
    field.hidden = (modes && !modes.includes(state.mode)) || (extra && !extras.has(extra));
  }
  const edits = model?.endpoints?.edits;
  const several = state.mode === "edit" && edits?.multiple_images;
  $("image").multiple = Boolean(several);
  $("image-legend").textContent = several ? `Input images (up to ${edits.max_images})` : "Input image";
  $("mask-editor").hidden = !(state.mode === "edit" && edits?.mask && state.inputs.length);
}

function maxInputs() {
  const edits = currentModel()?.endpoints?.edits;
  return state.mode === "edit" && edits?.multiple_images ? edits.max_images : 1;
}

// ---- input images: file picker, drag and drop, paste, "use as input" ----

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  const images = [...files].filter((file) => file.type.startsWith("image/"));
  if (!images.length) return;
  await addInputs(await Promise.all(images.map(async (file) => ({ url: await readFile(file), name: file.name }))));
}

async function addInputs(inputs) {
  setError("image", "");
  state.inputs = [...state.inputs, ...inputs].slice(-maxInputs());
  renderInputs();
  if (state.inputs.length) await mask.load(state.inputs[0].url);
  showFields();
}

function renderInputs() {
  $("inputs").replaceChildren(...state.inputs.map((input, index) => {
    const item = document.createElement("li");
    const image = new Image();
    image.src = input.url;
    image.alt = `Input ${index + 1}: ${input.name}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove input ${index + 1}`);
    remove.addEventListener("click", async () => {
      state.inputs.splice(index, 1);
      renderInputs();
      if (state.inputs.length) await mask.load(state.inputs[0].url);
      showFields();
    });
    item.append(image, remove);
    return item;
  }));
}

// ---- errors: the envelope's message next to the field its param names ----

function fieldFor(param) {
  const name = String(param ?? "").split(/[.[]/)[0];
  const target = $(`${PARAM_FIELDS[name] ?? name}-error`);
  return target && !target.closest("[hidden]") ? target : $("form-error");
}

function setError(name, message) {
  const target = $(`${name}-error`);
  target.textContent = message;
  document.getElementById(name)?.setAttribute("aria-invalid", String(Boolean(message)));
}

function clearErrors() {
  for (const target of document.querySelectorAll(".field-error")) target.textContent = "";
  for (const field of document.querySelectorAll("[aria-invalid]")) field.removeAttribute("aria-invalid");
}

function showError(error) {
  if (!(error instanceof ApiError)) throw error;
  const param = error.status === 401 ? "api_key" : error.param;
  const target = fieldFor(param);
  const name = target.id.replace(/-error$/, "");
  setError(name, error.message);
  target.title = error.requestId ? `request id ${error.requestId}` : "";
  document.getElementById(name)?.focus();
  $("status").textContent = "";
}

// ---- the request ----

function collect() {
  const body = { model: modelSelect.value || undefined };
  const shown = (element) => element && !element.closest("[hidden]");
  for (const name of TEXT_FIELDS) {
    const field = $(name);
    if (shown(field) && field.value.trim()) body[name] = field.value.trim();
  }
  for (const name of NUMBER_FIELDS) {
    const field = $(name);
    if (!shown(field)) continue;
    if (field.validity.badInput) throw new ApiError(0, { message: `${name} must be a number`, param: name });
    if (field.value !== "") body[name] = Number(field.value);
  }
  if (state.mode !== "vary") body.partial_images = Number($("partial_images").value);
  const loras = [...$("loras").querySelectorAll("input[name=lora]:checked")].map((use) => {
    const scale = $("loras").querySelector(`input[data-lora="${CSS.escape(use.value)}"]`).value;
    return scale === "" ? { name: use.value } : { name: use.value, scale: Number(scale) };
  });
  if (shown($("loras-field")) && loras.length) body.loras = loras;
  return body;
}

async function submit(event) {
  event.preventDefault();
  if (state.running) return;
  clearErrors();
  let body;
  try {
    body = collect();
    if (state.mode !== "generate" && !state.inputs.length) {
      throw new ApiError(0, { message: "Add an image first.", param: "image" });
    }
  } catch (error) {
    showError(error);
    return;
  }
  const asJob = $("async").checked;
  await running(body.n ?? 1, (live, signal) => {
    if (asJob) return submitJob(body, live, signal);
    return state.mode === "vary" ? vary(body, live) : stream(body, live, signal);
  });
}

/** One piece of work at a time: the form is locked, Cancel shown, a bar per image meanwhile. */
async function running(count, work) {
  const controller = new AbortController();
  state.running = controller;
  $("submit").disabled = true;
  $("cancel").hidden = false;
  const started = performance.now();
  const live = new LiveImages(count);
  try {
    await work(live, controller.signal);
    $("status").textContent = `Done in ${((performance.now() - started) / 1000).toFixed(1)} s.`;
  } catch (error) {
    showError(error);
  } finally {
    live.remove();
    state.running = null;
    state.job = null;
    $("submit").disabled = false;
    $("cancel").hidden = true;
  }
}

async function submitJob(body, live, signal) {
  let payload;
  if (state.mode === "vary") payload = await variationForm(body);
  else {
    payload = { ...body, response_format: "b64_json" };
    if (state.mode === "edit") Object.assign(payload, editImages());
  }
  $("status").textContent = "Submitting the job…";
  const job = await api.submitJob(ENDPOINTS[state.mode], payload);
  const followed = { id: job.id, n: body.n ?? 1, prompt: body.prompt };
  followedJob.set(followed);
  await watchJob(followed, live, signal);
}

/**
 * Follow a job to its end and show its images; the stored id goes once the job has ended. The
 * images come in the `…completed` events, just before the final event (whose job names them by url).
 */
async function watchJob(followed, live, signal) {
  state.job = followed.id;
  $("status").textContent = `Job ${followed.id}: waiting for the server…`;
  const received = new Map();
  let job;
  try {
    job = await api.followJob(followed.id, (event) => showJobEvent(followed.id, event, live, received), signal);
  } catch (error) {
    // Gone (404) or expired (410): nothing to come back to. Otherwise a reload tries again.
    if (error instanceof ApiError && [404, 410].includes(error.status)) followedJob.clear();
    throw error;
  }
  followedJob.clear();
  if (job.status !== "completed") throw new ApiError(0, job.error ?? { message: `The job ended ${job.status}.` });
  job.result.data.forEach((image, index) => {
    live.completed(index);
    addResult({ b64: received.get(index), seed: image.seed, revisedPrompt: image.revised_prompt, prompt: followed.prompt });
  });
}

function showJobEvent(id, event, live, received) {
  if (event.type === "image.job.progress") {
    if (event.status === "queued") {
      $("status").textContent = event.queue_position
        ? `Job ${id}: queued, ${event.queue_position} ahead of it.` : `Job ${id}: queued, next.`;
    } else if (event.step) {
      $("status").textContent = `Job ${id}: step ${event.step} of ${event.total_steps}`;
      live.progress(event.step / event.total_steps);
    } else $("status").textContent = `Job ${id}: running.`;
  } else if (event.type.endsWith(".partial_image")) live.partial(event);
  else if (event.type.endsWith(".completed")) {
    received.set(event.image_index ?? 0, event.b64_json);
    live.completed(event.image_index);
  }
}

function editImages() {
  const images = { images: state.inputs.map((input) => ({ image_url: input.url })) };
  if (!$("mask-editor").hidden && mask.painted) images.mask = { image_url: mask.toDataURL() };
  return images;
}

async function stream(body, live, signal) {
  const message = { ...body, endpoint: ENDPOINTS[state.mode] };
  if (state.mode === "edit") Object.assign(message, editImages());
  $("status").textContent = "Sending…";
  await api.stream(message, (event) => {
    if (event.type === "loading") $("status").textContent = "Loading the model…";
    else if (event.type === "queued") {
      $("status").textContent = event.position ? `Queued: ${event.position} ahead of this request.` : "Queued: next.";
    } else if (event.type === "progress") {
      $("status").textContent = `Step ${event.step} of ${event.total_steps}`;
      live.progress(event.step / event.total_steps);
    } else if (event.type === "partial_image") live.partial(event);
    else if (event.type === "completed") {
      live.completed(event.image_index);
      addResult({ b64: event.b64_json, seed: event.seed, revisedPrompt: event.revised_prompt, prompt: body.prompt });
    }
  }, signal);
}

/** Multipart carries text: numbers as they are, lists (loras) as their JSON. */
async function variationForm(body) {
  const form = new FormData();
  for (const [name, value] of Object.entries(body)) {
    if (value !== undefined) form.set(name, typeof value === "object" ? JSON.stringify(value) : String(value));
  }
  form.set("response_format", "b64_json");
  form.set("image", await (await fetch(state.inputs[0].url)).blob(), state.inputs[0].name);
  return form;
}

async function vary(body, live) {
  const form = await variationForm(body);
  $("status").textContent = "Working…";
  const answer = await api.variations(form);
  answer.data.forEach((image, index) => {
    live.completed(index);
    addResult({ b64: image.b64_json, seed: image.seed, revisedPrompt: image.revised_prompt });
  });
}

/** One progress bar and one preview per image of the running request. */
class LiveImages {
  constructor(count) {
    this.items = Array.from({ length: count }, (_, index) => {
      const figure = document.createElement("figure");
      const preview = new Image();
      preview.alt = `Preview of image ${index + 1}`;
      preview.hidden = true;
      const bar = document.createElement("progress");
      bar.max = 1;
      bar.setAttribute("aria-label", `Image ${index + 1} progress`);
      const caption = document.createElement("figcaption");
      caption.textContent = `Image ${index + 1}`;
      figure.append(preview, bar, caption);
      $("live").append(figure);
      return { figure, preview, bar, done: false };
    });
  }

  progress(fraction) {
    for (const item of this.items) if (!item.done) item.bar.value = fraction;
  }

  partial(event) {
    const item = this.items[event.image_index ?? 0];
    if (!item) return;
    item.preview.src = `data:image/png;base64,${event.b64_json}`;
    item.preview.dataset.partialIndex = event.partial_image_index;
    item.preview.hidden = false;
  }

  completed(index) {
    const item = this.items[index ?? 0];
    if (!item) return;
    item.done = true;
    item.bar.value = 1;
    item.figure.hidden = true;
  }

  remove() {
    for (const item of this.items) item.figure.remove();
  }
}

// ---- results ----

function addResult({ b64, seed, revisedPrompt, prompt }) {
  const url = `data:image/png;base64,${b64}`;
  const figure = document.createElement("figure");
  const image = new Image();
  image.src = url;
  image.alt = revisedPrompt || prompt || "A variation";
  const caption = document.createElement("figcaption");
  const seedLine = document.createElement("span");
  seedLine.textContent = seed === undefined || seed === null ? "" : `seed ${seed}`;
  seedLine.className = "seed";
  const revised = document.createElement("span");
  revised.textContent = revisedPrompt || "";
  revised.className = "revised-prompt";
  const download = document.createElement("a");
  download.href = url;
  download.download = `diffuser-${seed ?? "image"}.png`;
  download.textContent = "Download";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.textContent = "Use as input";
  reuse.addEventListener("click", async () => {
    const modes = modesOf(currentModel());
    const mode = modes.includes("edit") ? "edit" : modes.includes("vary") ? "vary" : state.mode;
    setMode(mode);
    state.inputs = [];
    await addInputs([{ url, name: download.download }]);
    $(mode === "edit" ? "prompt" : "image").focus();
  });
  caption.append(seedLine, revised, download, reuse);
  figure.append(image, caption);
  $("results").prepend(figure);
}

// ---- wiring ----

function saveKey() {
  apiKey.set($("api_key").value.trim());
  loadModels();
}

$("api_key").value = apiKey.get();
$("save-key").addEventListener("click", saveKey);
// Enter in the key field submits its own small form (the page's one submit button is the request's).
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  saveKey();
});
modelSelect.addEventListener("change", applyModel);
tabs.forEach((tab) => tab.addEventListener("click", () => setMode(tab.dataset.mode)));
document.querySelector("[role=tablist]").addEventListener("keydown", (event) => {
  const shown = tabs.filter((tab) => !tab.hidden);
  const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
  if (!step) return;
  const next = shown[(shown.indexOf(document.activeElement) + step + shown.length) % shown.length];
  setMode(next.dataset.mode);
  next.focus();
});
form.addEventListener("submit", submit);
// A job is cancelled on the server (its events then say so); other work by closing its connection.
$("cancel").addEventListener("click", () => {
  if (state.job) api.cancelJob(state.job).catch(showError);
  else state.running?.abort();
});
$("image").addEventListener("change", async (event) => {
  await addFiles(event.target.files);
  event.target.value = "";
});
const dropzone = $("dropzone");
dropzone.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropzone.classList.add("over");
});
dropzone.addEventListener("dragleave", () => dropzone.classList.remove("over"));
dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropzone.classList.remove("over");
  addFiles(event.dataTransfer.files);
});
document.addEventListener("paste", (event) => {
  const files = [...event.clipboardData.files].filter((file) => file.type.startsWith("image/"));
  if (!files.length) return;
  event.preventDefault();
  if (state.mode === "generate") {
    const modes = modesOf(currentModel());
    if (modes.includes("edit")) setMode("edit");
  }
  addFiles(files);
});
$("mask-clear").addEventListener("click", () => mask.clear());
$("mask-invert").addEventListener("click", () => mask.invert());
loadModels();
const followed = followedJob.get();
if (followed?.id) {
  $("async").checked = true;
  running(followed.n ?? 1, (live, signal) => watchJob(followed, live, signal));
}
