// Helpers shared by the playground and the share page.

export class ApiError extends Error {
  constructor(status, body) {
    super(body.error || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

export async function api(path, { key, body, method = "GET" } = {}) {
  const headers = {};
  if (key) headers["X-API-Key"] = key;
  if (typeof body === "string") headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body });
  let data = {};
  try {
    data = await response.json();
  } catch {
    data = { error: `The server answered ${response.status} without JSON.` };
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// Build an element: el("a", {href: "/x", class: "button"}, "text", child, ...)
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

export function outputUrls(prediction) {
  if (!prediction.output) return [];
  return Array.isArray(prediction.output) ? prediction.output : [prediction.output];
}

export function extensionOf(url) {
  return url.split(".").pop().toLowerCase();
}

export function formatBytes(size) {
  if (size < 1024) return `${size} B`;
  if (size < 1024 * 1024) return `${(size / 1024).toFixed(0)} KB`;
  return `${(size / 1024 / 1024).toFixed(1)} MB`;
}

export function formatSeconds(seconds) {
  return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
}
