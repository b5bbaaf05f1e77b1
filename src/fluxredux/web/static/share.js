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
  const inputs = $("inputs");
  for (const [name, value] of Object.entries(prediction.input)) {
    if (name === "redux_image" || name === "redux_images") continue;
    inputs.append(el("dt", {}, name.replace(/_/g, " ")), el("dd", {}, value === null ? "random" : String(value)));
  }
  inputs.append(el("dt", {}, "seed used"), el("dd", {}, String(prediction.seed ?? "—")));
  const labels = { success: "Done", error: `Failed: ${prediction.error}`, cancelled: "Cancelled", starting: "Queued", processing: "Running" };
  const time = prediction.metrics.total_time ? ` in ${formatSeconds(prediction.metrics.total_time)}` : "";
  $("status").textContent = `${labels[prediction.status] || prediction.status}${prediction.status === "success" ? time : ""}.`;
  const urls = outputUrls(prediction);
  urls.forEach((url, index) => {
    const alt = `Output ${index + 1} of ${urls.length}${prediction.demo ? " (demo model: noise)" : ""}`;
    const download = el("a", { href: url, download: `fluxredux-shared-${index + 1}.${extensionOf(url)}`, class: "button" }, "Download");
    $("gallery").append(el("figure", { class: "card" }, el("img", { src: url, alt }), el("figcaption", {}, download)));
  });
  if (!["success", "error", "cancelled"].includes(prediction.status)) setTimeout(() => location.reload(), 2000);
}

show();
