// The read-only share page: /p/{token}. No key: the share's own random token is the
// capability, and the owner can revoke it. The prediction id is never shown here.
import { api, el, outputUrls, extensionOf, formatSeconds } from "/static/common.js";

const token = location.pathname.split("/").pop();
const $ = (name) => document.getElementById(name);

async function show() {
  let prediction;
  try {
    prediction = await api(`/v1/share/${encodeURIComponent(token)}`);
  } catch (error) {
    $("status").textContent =
      error.status === 404 ? "Nothing is shared at this link: it was never made, was revoked or has expired." : error.message;
    return;
  }
  $("demo-banner").hidden = !prediction.demo;
  // The reference image is in the answer only when the sharer chose to include it.
  const reference = $("reference");
  // One reference, or the first of several (redux_images).
  const shown = prediction.input.redux_image || prediction.input.redux_images?.[0]?.image || "";
  if (String(shown).startsWith("http")) {
    reference.src = shown;
    reference.hidden = false;
  } else {
    $("reference-title").textContent = "Settings";
  }
  $("inputs").append(...settingRows(prediction).flatMap(([label, value]) => [el("dt", {}, label), el("dd", {}, value)]));
  const labels = { success: "Done", error: `Failed: ${prediction.error}`, cancelled: "Cancelled", starting: "Queued", processing: "Running" };
  $("status").textContent = `${labels[prediction.status] || prediction.status}${prediction.status === "success" ? times(prediction.metrics) : ""}.`;
  const urls = outputUrls(prediction);
  urls.forEach((url, index) => {
    const alt = `Output ${index + 1} of ${urls.length}${prediction.demo ? " (demo model: noise)" : ""}`;
    const download = el("a", { href: url, download: `fluxredux-shared-${index + 1}.${extensionOf(url)}`, class: "button" }, "Download");
    $("gallery").append(el("figure", { class: "card" }, el("img", { src: url, alt }), el("figcaption", {}, download)));
  });
  if (!["success", "error", "cancelled"].includes(prediction.status)) setTimeout(() => location.reload(), 2000);
}

// Whether a field echoed with its default took part: the upscale settings only in a final,
// the aspect ratio and megapixels not when a custom width and height (or a draft) set the size.
function applies(name, input) {
  if (name === "upscale_strength") return Boolean(input.upscale_from);
  if (name === "aspect_ratio" || name === "megapixels") return !input.width && !input.upscale_from;
  return true;
}

// Labelled as the playground labels them: total from created to completed, model the
// worker's own time (metrics.predict_time).
function times(metrics) {
  const parts = [];
  if (metrics.total_time !== null && metrics.total_time !== undefined) parts.push(`total ${formatSeconds(metrics.total_time)}`);
  if (metrics.predict_time) parts.push(`model ${formatSeconds(metrics.predict_time)}`);
  return parts.length ? ` (${parts.join(" · ")})` : "";
}

// The settings the prediction ran with, as [label, value] rows: only what was set. A field
// given as none shows nothing ("prompt: random" would claim a prompt that never was), and a
// seed left random shows the seed that was used, labelled so.
function settingRows(prediction) {
  const input = prediction.input;
  const rows = [];
  for (const [name, value] of Object.entries(input)) {
    if (value === null || value === undefined || value === "") continue;
    if (name === "redux_image" || name === "redux_images" || name === "seed") continue; // below
    if (name === "output_quality" && input.output_format === "png") continue; // ignored for PNG
    if (!applies(name, input)) continue;
    if (name === "disable_safety_checker") rows.push(["safety checker", value ? "off" : "on"]);
    // Which output of which draft, without the draft's id: a share never names a prediction.
    else if (name === "upscale_from") rows.push(["upscaled from", `output ${Number(value.index ?? 0) + 1} of a draft`]);
    else rows.push([name.replace(/_/g, " "), String(value)]);
  }
  const mix = input.redux_images;
  if (Array.isArray(mix) && mix.length > 1) rows.push(["reference weights", mix.map((item) => String(item.weight)).join(" · ")]);
  if (input.seed !== null && input.seed !== undefined) rows.push(["seed", String(input.seed)]);
  else if (prediction.seed !== null && prediction.seed !== undefined) rows.push(["seed used (random)", String(prediction.seed)]);
  return rows;
}

show();
