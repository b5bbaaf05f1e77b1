// fluxredux playground. Talks only to the public API; the form is built from the
// input model's JSON schema in /openapi.json, so a new input field appears here by itself.
import { api, ApiError, outputUrls, extensionOf, formatBytes, formatSeconds, el } from "/static/common.js";

const KEY_STORAGE = "fluxredux.apiKey";
const ACCEPTED_TYPES = ["image/jpeg", "image/png", "image/webp", "image/gif"];
const TERMINAL = new Set(["success", "error", "cancelled"]);
// Inputs the "Upscale 2×" button of an output sets (a final from that draft), never the form.
const UPSCALE_ONLY = new Set(["upscale_from", "scale", "upscale_strength"]);
// A custom size: the aspect ratio's "custom" choice, with a number field for each side.
const SIDES = ["width", "height"];
const CUSTOM = "custom";
const UPSCALE_SCALE = 2;

const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  fields: new Map(), // name -> {read, write, error}
  file: null, // a File chosen by drop / picker / paste
  uploadedId: null, // its id on the server once uploaded
  reuseUrl: null, // an earlier prediction's stored input, uploaded again when run
  lastSeed: null,
  current: null, // the prediction being watched
  maxImageBytes: 25 * 1024 * 1024,
  pollTimer: null,
  clockTimer: null,
  shares: [], // the active shares of the prediction shown
};

const $ = (id) => document.getElementById(id);

// --- API key ------------------------------------------------------------------------

function promptKey(message) {
  if (message) $("key-message").textContent = message;
  $("key-input").value = state.key;
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key-input").focus();
}

$("key-form").addEventListener("submit", () => {
  state.key = $("key-input").value.trim();
  localStorage.setItem(KEY_STORAGE, state.key);
  loadHistory();
});
$("change-key").addEventListener("click", () => promptKey());

async function call(path, options = {}) {
  try {
    return await api(path, { ...options, key: state.key });
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      promptKey("The server refused that API key. Enter a valid key.");
    }
    throw error;
  }
}

// --- the form, from the schema -------------------------------------------------------

function labelFor(name, prop) {
  return prop.title || name.replace(/_/g, " ");
}

function fieldShell(name, prop) {
  const wrap = el("div", { class: "field", id: `field-${name}` });
  const error = el("p", { class: "error", id: `error-${name}`, role: "alert" });
  return { wrap, error, hint: prop.description ? el("p", { class: "hint" }, prop.description) : null };
}

function radioGroup(name, prop, frames) {
  const { wrap, error, hint } = fieldShell(name, prop);
  const group = el("fieldset", { class: frames ? "choices frames" : "choices" });
  group.append(el("legend", {}, labelFor(name, prop)));
  for (const option of prop.enum) {
    const input = el("input", { type: "radio", name, value: option });
    if (String(option) === String(prop.default)) input.checked = true;
    const label = el("label", { class: "choice" }, input);
    if (frames && String(option).includes(":")) { // match_input has no shape of its own
      const [w, h] = String(option).split(":").map(Number);
      const scale = 22 / Math.max(w, h);
      label.append(el("span", { class: "frame", style: `width:${w * scale}px;height:${h * scale}px`, "aria-hidden": "true" }));
    }
    label.append(el("span", {}, String(option)));
    group.append(label);
  }
  wrap.append(group);
  if (hint) wrap.append(hint);
  wrap.append(error);
  return {
    wrap,
    error,
    read: () => group.querySelector("input:checked")?.value,
    write: (value) => {
      for (const input of group.querySelectorAll("input")) input.checked = input.value === String(value);
    },
  };
}

function selectField(name, prop) {
  const { wrap, error, hint } = fieldShell(name, prop);
  const select = el("select", { id: `input-${name}`, name });
  for (const option of prop.enum) select.append(el("option", { value: option }, String(option)));
  select.value = String(prop.default);
  wrap.append(el("label", { for: select.id }, labelFor(name, prop)), select);
  if (hint) wrap.append(hint);
  wrap.append(error);
  return { wrap, error, read: () => select.value, write: (v) => (select.value = String(v)) };
}

function sliderField(name, prop) {
  const { wrap, error, hint } = fieldShell(name, prop);
  const input = el("input", {
    type: "range", id: `input-${name}`, name, min: prop.minimum, max: prop.maximum,
    // Whole numbers step by 1; a fraction (0-1) by hundredths.
    step: prop.type === "integer" ? 1 : 0.01, value: prop.default,
  });
  const value = el("output", { for: input.id }, String(prop.default));
  input.addEventListener("input", () => (value.textContent = input.value));
  wrap.append(el("label", { for: input.id }, labelFor(name, prop), " ", value), input);
  if (hint) wrap.append(hint);
  wrap.append(error);
  return {
    wrap,
    error,
    read: () => Number(input.value),
    write: (v) => {
      input.value = v;
      value.textContent = String(v);
    },
  };
}

function switchField(name, prop) {
  const { wrap, error, hint } = fieldShell(name, prop);
  const input = el("input", { type: "checkbox", role: "switch", id: `input-${name}`, name });
  input.checked = Boolean(prop.default);
  wrap.append(el("label", { class: "switch", for: input.id }, input, el("span", {}, labelFor(name, prop))));
  if (hint) wrap.append(hint);
  wrap.append(error);
  return { wrap, error, read: () => input.checked, write: (v) => (input.checked = Boolean(v)) };
}

function seedField(name, prop, numeric) {
  const { wrap, error, hint } = fieldShell(name, prop);
  const input = el("input", {
    type: "number", id: `input-${name}`, name, min: numeric.minimum ?? 0, step: 1, inputmode: "numeric", disabled: "",
  });
  const random = el("input", { type: "checkbox", id: `random-${name}`, checked: "" });
  const reuse = el("button", { type: "button", class: "ghost" }, "Reuse last seed");
  random.addEventListener("change", () => {
    input.disabled = random.checked;
    if (!random.checked) input.focus();
  });
  reuse.addEventListener("click", () => {
    if (state.lastSeed === null) return;
    random.checked = false;
    input.disabled = false;
    input.value = state.lastSeed;
  });
  wrap.append(
    el("label", { for: input.id }, labelFor(name, prop)),
    el("div", { class: "row" }, input, el("label", { class: "switch", for: random.id }, random, el("span", {}, "Random")), reuse),
  );
  if (hint) wrap.append(hint);
  wrap.append(error);
  return {
    wrap,
    error,
    read: () => (random.checked || input.value === "" ? null : Number(input.value)),
    write: (v) => {
      random.checked = v === null || v === undefined;
      input.disabled = random.checked;
      input.value = random.checked ? "" : v;
    },
  };
}

function textField(name, prop, text) {
  // Optional text (a prompt): empty means "not given", so the field is left out.
  const { wrap, error, hint } = fieldShell(name, prop);
  const input = el("textarea", { id: `input-${name}`, name, rows: 3, maxlength: text.maxLength || 2000 });
  wrap.append(el("label", { for: input.id }, labelFor(name, prop)), input);
  if (hint) wrap.append(hint);
  wrap.append(error);
  return {
    wrap,
    error,
    read: () => input.value.trim() || undefined,
    write: (v) => (input.value = v ?? ""),
  };
}

function referencesField(name, prop) {
  // More references, mixed with the main one by weight. Sent as redux_images (the main
  // reference first) only when at least one is given; otherwise the request keeps the
  // hosted API's one redux_image.
  const { wrap, error, hint } = fieldShell(name, prop);
  const list = prop.anyOf?.find((p) => p.type === "array") || {};
  const most = list.maxItems || 4;
  const slider = (label, id) => {
    const input = el("input", { type: "range", min: 0, max: 1, step: 0.05, value: 1, id, "aria-label": label });
    const shown = el("output", { for: id }, "1");
    input.addEventListener("input", () => (shown.textContent = input.value));
    // Named by aria-label: a wrapping <label> would name the <output> too.
    return { input, row: el("div", { class: "weight" }, el("span", {}, label, " "), shown, input) };
  };
  const main = slider("Weight of the main reference", "weight-main");
  const rows = [];
  const container = el("div", { class: "extra-references" });
  const add = el("button", { type: "button", id: "add-reference" }, "Add a reference");
  add.addEventListener("click", () => {
    const n = rows.length + 2;
    const file = el("input", { type: "file", accept: ACCEPTED_TYPES.join(","), "aria-label": `Reference ${n} file` });
    const url = el("input", { type: "url", placeholder: "…or an image URL", "aria-label": `Reference ${n} URL` });
    const weight = slider(`Weight of reference ${n}`, `weight-${n}`);
    const remove = el("button", { type: "button" }, "Remove");
    const entry = { file, url, weight: weight.input, row: el("div", { class: "extra-reference" }, file, url, weight.row, remove) };
    remove.addEventListener("click", () => {
      rows.splice(rows.indexOf(entry), 1);
      entry.row.remove();
      add.disabled = rows.length >= most - 1;
    });
    rows.push(entry);
    container.append(entry.row);
    add.disabled = rows.length >= most - 1;
  });
  wrap.append(el("span", { class: "label" }, labelFor(name, prop)));
  if (hint) wrap.append(hint);
  wrap.append(main.row, container, add, error);
  return {
    wrap,
    error,
    read: () => undefined, // assembled in run(): files are uploaded first
    write: () => {},
    mainWeight: () => Number(main.input.value),
    extras: () => rows.filter((r) => r.file.files[0] || r.url.value.trim()),
  };
}

function lorasField(name, prop) {
  // Style adapters: a row per adapter (one the server offers, GET /v1/loras, and its
  // scale). Sent only when a row is there: without one the request is the hosted API's.
  const { wrap, error, hint } = fieldShell(name, prop);
  const list = prop.anyOf?.find((p) => p.type === "array") || {};
  const most = list.maxItems || 3;
  const rows = [];
  const container = el("div", { class: "loras" });
  const add = el("button", { type: "button", id: "add-lora" }, "Add a style adapter");
  let offered = null; // the adapters' names, asked for once, when the first row is added
  const addRow = async (chosen = null, scale = 1) => {
    if (offered === null) {
      try {
        // A hub pattern (owner/*) is not a name: the page offers the names it can send.
        offered = (await call("/v1/loras")).adapters.map((a) => a.name).filter((a) => !a.includes("*"));
      } catch {
        offered = [];
      }
    }
    const n = rows.length + 1;
    const names = chosen && !offered.includes(chosen) ? [chosen, ...offered] : offered;
    const select = el("select", { "aria-label": `Adapter ${n}` }, ...names.map((a) => el("option", { value: a }, a)));
    if (chosen) select.value = chosen;
    const slider = el("input", { type: "range", min: -2, max: 2, step: 0.05, value: scale, "aria-label": `Scale of adapter ${n}` });
    const shown = el("output", {}, String(scale));
    slider.addEventListener("input", () => (shown.textContent = slider.value));
    const remove = el("button", { type: "button" }, "Remove");
    const entry = { select, slider, row: el("div", { class: "lora" }, select, shown, slider, remove) };
    remove.addEventListener("click", () => {
      rows.splice(rows.indexOf(entry), 1);
      entry.row.remove();
      add.disabled = rows.length >= most;
    });
    rows.push(entry);
    container.append(entry.row);
    add.disabled = rows.length >= most;
    if (!names.length) error.textContent = "This server offers no style adapters yet (its operator adds them with `fluxredux loras add`).";
  };
  add.addEventListener("click", () => addRow());
  wrap.append(el("span", { class: "label" }, labelFor(name, prop)));
  if (hint) wrap.append(hint);
  wrap.append(container, add, error);
  return {
    wrap,
    error,
    read: () => {
      const chosen = rows.filter((r) => r.select.value).map((r) => ({ name: r.select.value, scale: Number(r.slider.value) }));
      return chosen.length ? chosen : undefined;
    },
    write: async (value) => {
      for (const row of [...rows]) row.row.remove();
      rows.length = 0;
      for (const lora of value || []) await addRow(lora.name, lora.scale ?? 1);
    },
  };
}

function buildField(name, prop) {
  const nullable = Array.isArray(prop.anyOf) && prop.anyOf.some((p) => p.type === "null");
  const numeric = nullable ? prop.anyOf.find((p) => p.type === "integer") : null;
  if (numeric) return seedField(name, prop, numeric);
  if (prop["x-fluxredux-kind"] === "images") return referencesField(name, prop);
  if (prop["x-fluxredux-kind"] === "loras") return lorasField(name, prop);
  const text = nullable ? prop.anyOf.find((p) => p.type === "string") : null;
  if (text) return textField(name, prop, text);
  if (prop.enum) {
    if (name === "aspect_ratio") return radioGroup(name, prop, true);
    return prop.enum.length <= 4 ? radioGroup(name, prop, false) : selectField(name, prop);
  }
  if (prop.type === "boolean") return switchField(name, prop);
  if (prop.type === "integer" && prop.maximum - prop.minimum <= 100) return sliderField(name, prop);
  if (prop.type === "number" && prop.maximum !== undefined && prop.minimum !== undefined) return sliderField(name, prop);
  return null;
}

async function buildForm() {
  const spec = await (await fetch("/openapi.json")).json();
  const schema = spec.components.schemas.PredictionInput;
  const container = $("schema-fields");
  // Controls beyond the hosted API wait, folded, under "Advanced".
  const advanced = el("details", { id: "advanced" }, el("summary", {}, "Advanced"));
  for (const [name, prop] of Object.entries(schema.properties)) {
    if (prop["x-fluxredux-kind"] === "image") continue; // the reference image has its own panel
    if (UPSCALE_ONLY.has(name) || SIDES.includes(name)) continue; // the Upscale button's; the custom size's
    const field = buildField(name, prop);
    if (!field) continue;
    state.fields.set(name, field);
    (prop["x-fluxredux-advanced"] ? advanced : container).append(field.wrap);
  }
  if (advanced.childElementCount > 1) container.append(advanced);
  if (SIDES.every((name) => schema.properties[name])) addCustomSize(schema.properties);
  $("input-prompt")?.addEventListener("input", showReferenceNeed);
}

// The aspect ratio's "custom" choice: two number fields (the schema's range and step), sent
// as width and height in place of aspect_ratio and megapixels, which it hides.
function addCustomSize(properties) {
  const ratio = state.fields.get("aspect_ratio");
  if (!ratio) return;
  const megapixels = state.fields.get("megapixels");
  const group = ratio.wrap.querySelector("fieldset");
  const custom = el("input", { type: "radio", name: "aspect_ratio", value: CUSTOM });
  group.append(el("label", { class: "choice" }, custom, el("span", {}, CUSTOM)));
  const sides = el("div", { class: "row custom-size", id: "custom-size", hidden: "" });
  const isCustom = () => custom.checked;
  const update = () => {
    sides.hidden = !isCustom();
    if (megapixels) megapixels.wrap.hidden = isCustom(); // the size is the sides' alone
  };
  let range = "";
  for (const name of SIDES) {
    const prop = properties[name];
    const number = prop.anyOf?.find((p) => p.type === "integer") || prop;
    const input = el("input", {
      type: "number", id: `input-${name}`, name, min: number.minimum, max: number.maximum,
      step: number.multipleOf || 1, value: 1024, inputmode: "numeric",
    });
    const error = el("p", { class: "error", id: `error-${name}`, role: "alert" });
    const wrap = el("div", { class: "side", id: `field-${name}` }, el("label", { for: input.id }, labelFor(name, prop)), input, error);
    sides.append(wrap);
    range = `${number.minimum}–${number.maximum} pixels a side, in steps of ${number.multipleOf || 1}.`;
    state.fields.set(name, {
      wrap,
      error,
      read: () => (isCustom() && input.value !== "" ? Number(input.value) : undefined),
      write: (value) => {
        if (value === null || value === undefined) return; // a size from the aspect ratio
        input.value = value;
        custom.checked = true;
        update();
      },
    });
  }
  sides.append(el("p", { class: "hint" }, range));
  group.after(sides);
  group.addEventListener("change", update);
  const { read: readRatio, write: writeRatio } = ratio;
  ratio.read = () => (isCustom() ? undefined : readRatio());
  ratio.write = (value) => {
    writeRatio(value);
    update();
  };
  if (megapixels) {
    const readMegapixels = megapixels.read;
    megapixels.read = () => (isCustom() ? undefined : readMegapixels());
  }
}

function promptGiven() {
  return Boolean($("input-prompt")?.value.trim());
}

// With a prompt the reference may be left out: the prompt alone makes the image.
function showReferenceNeed() {
  $("reference-label").textContent = promptGiven() ? "Reference image (optional with a prompt)" : "Reference image";
}

// --- the reference image ---------------------------------------------------------------

function setReferenceError(message) {
  $("error-redux_image").textContent = message || "";
}

function chooseFile(file) {
  setReferenceError("");
  if (!file) return;
  if (!ACCEPTED_TYPES.includes(file.type)) {
    setReferenceError(`“${file.name}” is not a JPEG, PNG, WEBP or GIF image.`);
    return;
  }
  if (file.size > state.maxImageBytes) {
    setReferenceError(`“${file.name}” is ${formatBytes(file.size)}; the limit is ${formatBytes(state.maxImageBytes)}.`);
    return;
  }
  state.file = file;
  state.uploadedId = null;
  state.reuseUrl = null;
  $("url-input").value = "";
  showThumbnail(URL.createObjectURL(file), `${file.name} — ${formatBytes(file.size)}`);
}

function showThumbnail(src, caption) {
  const thumb = $("reference-thumb");
  thumb.onload = () => {
    $("reference-info").textContent = `${caption}, ${thumb.naturalWidth}×${thumb.naturalHeight}`;
  };
  thumb.src = src;
  thumb.hidden = false;
  $("dropzone-hint").hidden = true;
}

function clearReference() {
  state.file = null;
  state.uploadedId = null;
  state.reuseUrl = null;
  $("reference-thumb").hidden = true;
  $("dropzone-hint").hidden = false;
  $("reference-info").textContent = "";
}

const dropzone = $("dropzone");
dropzone.addEventListener("click", () => $("file-input").click());
dropzone.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    $("file-input").click();
  }
});
dropzone.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropzone.classList.add("over");
});
dropzone.addEventListener("dragleave", () => dropzone.classList.remove("over"));
dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropzone.classList.remove("over");
  chooseFile(event.dataTransfer.files[0]);
});
$("file-input").addEventListener("change", (event) => chooseFile(event.target.files[0]));
document.addEventListener("paste", (event) => {
  const file = [...(event.clipboardData?.files || [])][0];
  if (file) chooseFile(file);
});
$("url-input").addEventListener("change", () => {
  const url = $("url-input").value.trim();
  if (!url) return;
  clearReference();
  showThumbnail(url, "from URL");
});

// --- running --------------------------------------------------------------------------

function clearErrors() {
  for (const node of document.querySelectorAll(".error")) node.textContent = "";
}

// Each field's error under its field; the rest at ``fallback`` (the form's, or the
// output panel's for an upscale).
function showApiError(error, fallback = "error-form") {
  if (!(error instanceof ApiError)) {
    $(fallback).textContent = `Could not reach the server: ${error.message}`;
    return;
  }
  const body = error.body;
  let placed = false;
  for (const item of body.fields || []) {
    const name = String(item.field).replace(/^input\./, "");
    // redux_images.1.weight: shown under the field it belongs to.
    const target = $(`error-${name}`) || $(`error-${name.split(".")[0]}`);
    if (target) {
      target.textContent = item.message;
      placed = true;
    }
  }
  if (/^(image_|url_)/.test(body.code || "")) {
    setReferenceError(body.error);
    placed = true;
  }
  if (!placed) $(fallback).textContent = body.error || `The server answered ${error.status}.`;
}

async function referenceValue() {
  if (state.uploadedId) return state.uploadedId;
  if (state.reuseUrl) {
    const response = await fetch(state.reuseUrl);
    if (!response.ok) {
      throw new ApiError(response.status, { error: "The earlier input image is no longer stored; choose the image again.", code: "image_file_not_found", field: "redux_image" });
    }
    const blob = await response.blob();
    state.file = new File([blob], state.reuseUrl.split("/").pop(), { type: blob.type });
    state.reuseUrl = null;
  }
  if (state.file) {
    const form = new FormData();
    form.append("file", state.file, state.file.name);
    const uploaded = await call("/v1/files", { method: "POST", body: form });
    state.uploadedId = uploaded.id;
    return uploaded.id;
  }
  const url = $("url-input").value.trim();
  return url || null;
}

async function extraReference(extra) {
  const file = extra.file.files[0];
  if (!file) return extra.url.value.trim();
  const form = new FormData();
  form.append("file", file, file.name);
  return (await call("/v1/files", { method: "POST", body: form })).id;
}

async function run(event) {
  event?.preventDefault();
  if ($("run").disabled) return;
  clearErrors();
  if (!state.key) {
    promptKey("Enter your API key to run predictions.");
    return;
  }
  $("run").disabled = true;
  setStatus("Creating the prediction…");
  try {
    const input = {};
    for (const [name, field] of state.fields) {
      const value = field.read();
      if (value !== undefined) input[name] = value;
    }
    const reference = await referenceValue();
    const mix = state.fields.get("redux_images");
    const extras = mix ? mix.extras() : [];
    if (!reference && (extras.length || input.prompt === undefined)) {
      setReferenceError("Choose a reference image first: drop one, paste one, pick a file or give a URL (or type a prompt, under Advanced, to make an image from the text alone).");
      setStatus("Ready.");
      return;
    }
    if (extras.length) {
      input.redux_images = [{ image: reference, weight: mix.mainWeight() }];
      for (const extra of extras) {
        input.redux_images.push({ image: await extraReference(extra), weight: Number(extra.weight.value) });
      }
    } else if (reference) {
      input.redux_image = reference;
    } // else a prompt alone: text to image, no reference sent
    const created = await call("/v1/prediction/", {
      method: "POST",
      body: JSON.stringify({ model: "flux-redux-schnell", version: "0.0.1", input }),
    });
    watch(created.predictionID);
  } catch (error) {
    setStatus("Not started.");
    showApiError(error);
  } finally {
    $("run").disabled = false;
  }
}

function setStatus(text, progress) {
  $("status-text").textContent = text;
  const bar = $("progress");
  bar.hidden = progress === undefined;
  if (progress !== undefined) {
    bar.max = progress.total || 1;
    bar.value = progress.step;
  }
}

// What a running prediction does after its last step (progress.phase), in words.
const PHASES = {
  decoding: "Decoding the images…",
  "safety check": "Running the safety check…",
  encoding: "Encoding the images…",
  storing: "Storing the images…",
};

function runningText(progress) {
  if (progress.phase) return PHASES[progress.phase] || `${progress.phase}…`;
  return `Step ${progress.step} of ${progress.total}`;
}

// The elapsed clock: the prediction's own time, from its created_at (not from when this
// page began to watch it: a reload or a run opened from the history started earlier).
function startClock(createdAt) {
  clearInterval(state.clockTimer);
  const created = Date.parse(createdAt);
  const tick = () => ($("elapsed").textContent = formatSeconds(Math.max(0, Date.now() - created) / 1000));
  tick();
  state.clockTimer = setInterval(tick, 100);
}

// Stopped at its end, showing the server's own count from created to completed.
function stopClock(prediction) {
  clearInterval(state.clockTimer);
  state.clockTimer = null;
  const total = prediction.metrics?.total_time;
  $("elapsed").textContent = total === null || total === undefined ? "" : formatSeconds(total);
}

function watch(id) {
  clearTimeout(state.pollTimer);
  clearInterval(state.clockTimer);
  state.clockTimer = null;
  state.current = id;
  $("elapsed").textContent = "";
  $("cancel").hidden = false;
  $("gallery").replaceChildren();
  $("summary").textContent = "";
  hideShares();
  setStatus("Queued…", { step: 0, total: 1 });
  // On a phone the output panel sits below the form: bring the progress into view.
  const panel = $("results-title").getBoundingClientRect();
  if (panel.top > window.innerHeight) $("results-title").scrollIntoView({ behavior: "smooth", block: "start" });
  $("preview").hidden = true;
  let streamTried = false;
  const poll = async () => {
    if (state.current !== id) return;
    let prediction;
    try {
      prediction = await call(`/v1/prediction/${id}`);
    } catch (error) {
      showApiError(error);
      state.pollTimer = setTimeout(poll, 1000);
      return;
    }
    if (state.current !== id) return; // another prediction was opened during the request
    if (!TERMINAL.has(prediction.status) && state.clockTimer === null) startClock(prediction.created_at);
    if (prediction.status === "starting") {
      const ahead = prediction.queue_position;
      const place = ahead === null || ahead === undefined ? "" : ahead === 0 ? " (next)" : ` (${ahead} ahead)`;
      setStatus(`Queued${place}…`, { step: 0, total: prediction.progress.total });
    }
    if (prediction.status === "processing") {
      setStatus(runningText(prediction.progress), prediction.progress);
      showPreview(prediction.progress.preview);
    }
    if (TERMINAL.has(prediction.status)) {
      ended(prediction);
      return;
    }
    // Then its event stream, to the end; polling again only if the stream fails.
    if (!streamTried) {
      streamTried = true;
      if (await follow(id, prediction.progress.total)) return;
    }
    state.pollTimer = setTimeout(poll, 200);
  };
  poll();
}

function ended(prediction) {
  $("cancel").hidden = true;
  $("preview").hidden = true;
  showPrediction(prediction);
  loadHistory();
}

function showPreview(image) {
  if (!image) return;
  $("preview").src = image;
  $("preview").hidden = false;
}

// The prediction's event stream (GET .../stream), read with fetch: EventSource cannot send
// the API key header. True once it has shown the end; false if the stream failed (the
// caller polls instead), or another prediction was opened meanwhile (nothing to do).
async function follow(id, total) {
  let reader;
  try {
    const response = await fetch(`/v1/prediction/${encodeURIComponent(id)}/stream`, {
      headers: { "X-API-Key": state.key, Accept: "text/event-stream" },
    });
    if (!response.ok || !response.body) return false;
    reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let name = "message";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done || state.current !== id) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line === "") {
          if (data.length && onStreamEvent(name, JSON.parse(data.join("\n")), total)) {
            reader.cancel();
            return true;
          }
          name = "message";
          data = [];
        } else if (line.startsWith("event:")) {
          name = line.slice(6).trim();
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        }
      }
    }
  } catch {
    // a proxy that buffers or cuts streams, a lost connection: polling takes over
  }
  reader?.cancel().catch(() => {});
  return state.current !== id;
}

// One event: the progress line and the preview; true at the end (the prediction shown).
function onStreamEvent(name, data, total) {
  if (name === "queued") {
    const ahead = data.queue_position;
    setStatus(`Queued${ahead ? ` (${ahead} ahead)` : " (next)"}…`, { step: 0, total });
  } else if (name === "step") {
    setStatus(runningText(data), data);
  } else if (name === "phase") {
    setStatus(runningText({ phase: data.phase }), { step: total, total });
  } else if (name === "preview") {
    showPreview(data.image);
  } else if (name === "done" || name === "failed" || name === "canceled") {
    ended(data);
    return true;
  }
  return false;
}

$("cancel").addEventListener("click", async () => {
  if (!state.current) return;
  try {
    await call(`/v1/prediction/${state.current}/cancel`, { method: "POST" });
  } catch (error) {
    showApiError(error);
  }
});

// --- results ----------------------------------------------------------------------------

function showPrediction(prediction) {
  const urls = outputUrls(prediction);
  stopClock(prediction);
  if (prediction.status === "success") {
    setStatus("Done.");
  } else if (prediction.status === "cancelled") {
    setStatus("Cancelled.");
  } else if (prediction.status === "error") {
    setStatus(`Failed: ${prediction.error}`);
  }
  if (prediction.seed !== null && prediction.seed !== undefined) state.lastSeed = prediction.seed;
  const parts = [];
  const draft = draftOf(prediction);
  if (draft) parts.push(`${finalLabel(prediction)} ${draft.prediction}`);
  if (prediction.seed !== null && prediction.seed !== undefined) parts.push(`seed ${prediction.seed}`);
  // Labelled, as they measure different things: total from created to completed (the
  // wait in the queue included), model the worker's own time on it (metrics.predict_time).
  const { total_time: total, predict_time: model } = prediction.metrics;
  if (total !== null && total !== undefined) parts.push(`total ${formatSeconds(total)}`);
  if (model) parts.push(`model ${formatSeconds(model)}`);
  if (prediction.status === "success") parts.push(safetySummary(prediction));
  $("summary").textContent = parts.join(" · ");
  const gallery = $("gallery");
  gallery.replaceChildren();
  urls.forEach((url, index) => gallery.append(outputCard(prediction, url, index, urls.length)));
  if (prediction.status === "success") showShares(prediction.id);
  else hideShares();
}

function safetySummary(prediction) {
  const verdicts = prediction.safety || [];
  if (!verdicts.length) return "safety checker off";
  const withheld = verdicts.filter((v) => v.unsafe).length;
  return withheld ? `safety: ${withheld} of ${verdicts.length} withheld` : "safety: all passed";
}

function outputCard(prediction, url, index, count) {
  const ext = extensionOf(url);
  const alt = `Output ${index + 1} of ${count}${prediction.demo ? " (demo model: noise)" : ""}, seed ${prediction.seed}`;
  const image = el("img", { src: url, alt, loading: "lazy" });
  const open = el("button", { type: "button", class: "image-button", "aria-label": `View output ${index + 1} large` }, image);
  open.addEventListener("click", () => {
    $("viewer-image").src = url;
    $("viewer-image").alt = alt;
    $("viewer").showModal();
  });
  const download = el("a", { href: url, download: `fluxredux-${prediction.id}-${index + 1}.${ext}`, class: "button" }, "Download");
  // Named with its visible text first, then which output it makes a final of.
  const upscale = el("button", { type: "button", class: "upscale", "aria-label": `Upscale ${UPSCALE_SCALE}×: output ${index + 1}` }, `Upscale ${UPSCALE_SCALE}×`);
  upscale.addEventListener("click", () => upscaleOutput(prediction.id, index, upscale));
  const verdicts = (prediction.safety || []).filter((v) => !v.unsafe);
  const safety = verdicts[index] ? "safety: passed" : prediction.safety?.length ? "" : "safety: not checked";
  return el("figure", { class: "card" }, open, el("figcaption", {}, el("span", { class: "hint" }, `${ext.toUpperCase()} · ${safety}`), el("span", { class: "row" }, upscale, download)));
}

// A final from output ``index`` of the draft ``id`` (the shortcut route for a create with
// upscale_from: the draft's references, prompt and seed), followed as a new run is.
async function upscaleOutput(id, index, button) {
  if (!state.key) {
    promptKey("Enter your API key to run predictions.");
    return;
  }
  clearErrors();
  button.disabled = true;
  setStatus(`Creating a ${UPSCALE_SCALE}× final…`);
  try {
    const created = await call(`/v1/prediction/${encodeURIComponent(id)}/upscale`, {
      method: "POST",
      body: JSON.stringify({ index, scale: UPSCALE_SCALE }),
    });
    watch(created.predictionID);
  } catch (error) {
    button.disabled = false;
    setStatus("Not started.");
    showApiError(error, "error-upscale_from");
  }
}

// The draft a final was made from ({prediction, index}), or null for any other prediction.
function draftOf(prediction) {
  return prediction.upscaled_from || prediction.input?.upscale_from || null;
}

// "final 2× of output 1 of": what made a final, before its draft's id. (2×, as the button
// says it: "×2" in the history is a number of outputs.)
function finalLabel(prediction) {
  const { scale, width, height } = prediction.input;
  const size = scale ? `${scale}×` : width ? `${width}×${height}` : "";
  return ["final", size, `of output ${draftOf(prediction).index + 1} of`].filter(Boolean).join(" ");
}

// --- sharing ----------------------------------------------------------------------------
// A share is made on purpose, through the API: its link carries its own random token, not
// the prediction id (which is no secret), and "Stop sharing" revokes it on the server.

function hideShares() {
  state.shares = [];
  $("share-box").hidden = true;
  $("share-note").textContent = "";
  $("share-list").replaceChildren();
  $("share-reference").checked = false; // every prediction starts with the private choice
}

async function showShares(id) {
  hideShares();
  $("share-box").hidden = false;
  let page;
  try {
    page = await call(`/v1/prediction/${id}/shares`);
  } catch {
    return; // the Share button still works
  }
  if (state.current !== id) return; // another prediction was opened meanwhile
  state.shares = page.items;
  renderShares();
}

function renderShares() {
  $("share-list").replaceChildren(...state.shares.map(shareRow));
}

function shareRow(share) {
  const what = share.include_reference ? "outputs and reference image" : "outputs only";
  const link = el("a", { href: share.url, class: "share-link", target: "_blank", rel: "noopener" }, share.url);
  const stop = el("button", { type: "button", class: "ghost", "aria-label": `Stop sharing (${what})` }, "Stop sharing");
  stop.addEventListener("click", () => stopSharing(share, stop));
  return el("li", {}, link, el("span", { class: "hint" }, what), stop);
}

async function stopSharing(share, button) {
  button.disabled = true;
  try {
    await call(`/v1/share/${encodeURIComponent(share.token)}`, { method: "DELETE" });
  } catch (error) {
    // 404: already revoked (or expired), which is what was asked for.
    if (!(error instanceof ApiError && error.status === 404)) {
      button.disabled = false;
      $("share-note").textContent = `Could not stop sharing: ${error.message}`;
      return;
    }
  }
  state.shares = state.shares.filter((s) => s.token !== share.token);
  renderShares();
  $("share-note").textContent = "Sharing stopped: that link opens nothing now.";
}

async function share() {
  const id = state.current;
  if (!id) return;
  const includeReference = $("share-reference").checked;
  // The same choice shared twice gives the same link, not a pile of links to revoke.
  let created = state.shares.find((s) => s.include_reference === includeReference);
  if (!created) {
    $("share").disabled = true;
    try {
      created = await call(`/v1/prediction/${id}/share`, {
        method: "POST",
        body: JSON.stringify({ include_reference: includeReference }),
      });
    } catch (error) {
      $("share-note").textContent = `Could not share: ${error.message}`;
      return;
    } finally {
      $("share").disabled = false;
    }
    if (state.current !== id) return;
    state.shares.push(created);
    renderShares();
  }
  let copied = false;
  try {
    await navigator.clipboard.writeText(created.url);
    copied = true;
  } catch {
    copied = false;
  }
  $("share-note").replaceChildren(copied ? "Link copied: " : "Share this link: ", el("a", { href: created.url, id: "share-link" }, created.url));
}

$("share").addEventListener("click", share);

// --- history ----------------------------------------------------------------------------

async function loadHistory() {
  if (!state.key) return;
  let page;
  try {
    page = await call("/v1/prediction/?limit=20");
  } catch {
    return;
  }
  // A final is listed under its draft, when the draft is on this page too.
  const listed = new Set(page.items.map((prediction) => prediction.id));
  const finals = new Map(); // draft id -> its finals on this page
  const top = [];
  for (const prediction of page.items) {
    const draft = draftOf(prediction)?.prediction;
    if (draft && listed.has(draft)) finals.set(draft, [...(finals.get(draft) || []), prediction]);
    else top.push(prediction);
  }
  $("history-list").replaceChildren(...top.map((prediction) => historyEntry(prediction, finals)));
}

function historyEntry(prediction, finals) {
  const entry = el("li", {}, historyButton(prediction));
  const made = finals.get(prediction.id) || [];
  if (made.length) {
    entry.append(el("ol", { class: "finals", "aria-label": "Finals made from it" }, ...made.map((final) => historyEntry(final, finals))));
  }
  return entry;
}

function historyButton(prediction) {
  const first = outputUrls(prediction)[0];
  const thumb = first ? el("img", { src: first, alt: "", loading: "lazy" }) : el("span", { class: "thumb-empty", "aria-hidden": "true" });
  const when = new Date(prediction.created_at).toLocaleTimeString();
  const label = `${prediction.status} · ${historySettings(prediction)} · ${when}`;
  const button = el("button", { type: "button", class: "history-item", "aria-label": `Open prediction: ${label}` }, thumb, el("span", {}, label));
  button.addEventListener("click", () => loadPrediction(prediction));
  return button;
}

// What sets a prediction apart in the list: a final's draft, else its size and count.
function historySettings(prediction) {
  const input = prediction.input;
  const draft = draftOf(prediction);
  if (draft) return `${finalLabel(prediction)} ${draft.prediction}`;
  const size = input.width ? `${input.width}×${input.height}` : input.aspect_ratio;
  return `${size} · ×${input.num_outputs}`;
}

function loadPrediction(prediction) {
  clearTimeout(state.pollTimer);
  clearInterval(state.clockTimer);
  state.clockTimer = null;
  state.current = prediction.id;
  $("cancel").hidden = TERMINAL.has(prediction.status);
  for (const [name, field] of state.fields) {
    if (name in prediction.input) field.write(prediction.input[name]);
  }
  showReferenceNeed();
  const reference = String(prediction.input.redux_image || "");
  clearReference();
  const ownFile = reference.match(new RegExp(`^${location.origin}/files/([A-Za-z0-9_-]{22})\\.`));
  if (ownFile) {
    // Re-sent as a new upload when run: only uploads are accepted by id, and an input
    // that came as a URL or data: URI was stored for its own prediction alone.
    state.reuseUrl = reference;
    showThumbnail(reference, "earlier input");
  } else if (reference) {
    $("url-input").value = reference;
    showThumbnail(reference, "from URL");
  }
  if (TERMINAL.has(prediction.status)) showPrediction(prediction);
  else watch(prediction.id);
}

$("refresh-history").addEventListener("click", loadHistory);

// --- start ------------------------------------------------------------------------------

$("predict-form").addEventListener("submit", run);
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) run(event);
});

async function start() {
  try {
    const health = await (await fetch("/health")).json();
    $("demo-banner").hidden = !health.model?.demo;
    const footer = $("model-footer");
    footer.textContent = health.model?.description ? `Model: ${health.model.description}` : "";
    footer.hidden = !footer.textContent;
    if (health.limits?.max_image_bytes) state.maxImageBytes = health.limits.max_image_bytes;
  } catch {
    // the form still works; the banner simply stays hidden
  }
  await buildForm();
  if (!state.key) promptKey();
  else loadHistory();
}

start();
