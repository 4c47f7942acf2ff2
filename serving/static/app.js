// The shopguide storefront: a single page over the HTTP API, plain JavaScript, no build step.
//
// Routes live in the URL hash (#/, #/search?q=..., #/photo, #/product/ID), so moving around never
// reloads the page. Every view and click is posted as an event under a visitor id kept in
// localStorage (with the token GET /visitor signed for it; the page never holds the API key), and the
// "for you" strip is re-fetched after each event: the feed reads the history per request.
"use strict";

const FILTER_FIELDS = ["gender", "masterCategory", "subCategory", "baseColour", "min_price", "max_price", "in_stock"];
const FACET_FIELDS = ["gender", "masterCategory", "subCategory", "baseColour"];
const FILTER_LABELS = {
  baseColour: "colour",
  articleType: "type",
  subCategory: "category",
  masterCategory: "category",
  gender: "gender",
};
const ATTRIBUTES = [
  ["gender", "Gender"],
  ["masterCategory", "Category"],
  ["subCategory", "Subcategory"],
  ["articleType", "Type"],
  ["baseColour", "Colour"],
  ["season", "Season"],
  ["year", "Year"],
  ["usage", "Usage"],
];
const SIMILAR_MODES = ["fused", "image", "text", "behavior"];
const VISITOR_KEY = "shopguide.visitor";
const GRID_SIZE = 24;
const STRIP_SIZE = 8;

const state = {
  visitor: null, // {visitor_id, token}
  render: 0, // bumped per route render: an older render that finishes late must not draw
  path: null, // the path last drawn: a new one starts at the top of the page
  strip: 0, // bumped per "for you" render: an older feed response must not overwrite a newer one
  photo: null, // the File of the last photo search (#/photo)
  // product id -> request_id of the response it was clicked in: the product page's view and cart
  // events carry it, so engagement is credited to the module (or search, feed) that showed it.
  attribution: new Map(),
};
let eventQueue = Promise.resolve(); // events are posted one after another, in the order they happened

// ---- small helpers -------------------------------------------------------------------------------
const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  // Text goes in as text nodes, never as HTML: titles and reasons come from the catalog and shoppers.
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

class ApiError extends Error {
  constructor(status, error, detail) {
    const text = Array.isArray(detail) ? detail.join("; ") : detail || error || `HTTP ${status}`;
    super(text);
    this.status = status;
    this.error = error;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { Accept: "application/json", ...(options.headers || {}) } });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) throw new ApiError(response.status, body && body.error, body && body.detail);
  return body;
}

function showStatus(message) {
  const status = $("#status");
  status.textContent = message || "";
  status.hidden = !message;
}

function formatPrice(price) {
  return typeof price === "number" ? price.toFixed(2) : "";
}

function randomId() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = raw.split("?");
  return { path, params: new URLSearchParams(query) };
}

function go(path, params) {
  const query = params && params.toString();
  location.hash = `#${path}${query ? `?${query}` : ""}`;
}

// ---- the visitor and its events ------------------------------------------------------------------
async function visitor() {
  if (state.visitor) return state.visitor;
  try {
    const stored = JSON.parse(localStorage.getItem(VISITOR_KEY) || "null");
    if (stored && stored.visitor_id && stored.token) return (state.visitor = stored);
  } catch {
    // unreadable storage: start a new visitor
  }
  const fresh = await api("/visitor");
  localStorage.setItem(VISITOR_KEY, JSON.stringify(fresh));
  return (state.visitor = fresh);
}

async function sendEvent(type, fields, retried = false) {
  const me = await visitor();
  const event = { event_id: `${me.visitor_id}-${randomId()}`, user_id: me.visitor_id, type, ...fields };
  try {
    await api("/events", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Visitor-Token": `${me.visitor_id}.${me.token}` },
      body: JSON.stringify({ events: [event] }),
    });
  } catch (error) {
    // A server whose secret changed (no API key, restarted) no longer knows our token: start over
    // as a new visitor, once.
    if (!retried && error instanceof ApiError && error.status === 403 && /GET \/visitor/.test(error.message)) {
      localStorage.removeItem(VISITOR_KEY);
      state.visitor = null;
      return sendEvent(type, fields, true);
    }
    throw error;
  }
}

// Posts one event after the ones before it; then (unless told not to) refreshes the "for you" strip.
// Resolves to whether it worked; a failure is shown, never thrown: browsing goes on without it.
function track(type, fields, { refresh = true } = {}) {
  const clean = Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined && v !== null));
  eventQueue = eventQueue
    .then(() => sendEvent(type, clean))
    .then(() => (refresh ? refreshForYou() : undefined))
    .then(
      () => true,
      (error) => {
        showStatus(`could not record your ${type}: ${error.message}`);
        return false;
      },
    );
  return eventQueue;
}

// ---- cards and strips ----------------------------------------------------------------------------
function card(item, requestId) {
  const reason = (item.reasons && item.reasons[0]) || "";
  return el(
    "a",
    {
      class: "card",
      href: `#/product/${encodeURIComponent(item.product_id)}`,
      "data-product-id": item.product_id,
      "data-request-id": requestId,
    },
    el("img", { src: item.image_url, alt: item.title || "", loading: "lazy", width: 96, height: 128 }),
    el("span", { class: "title", text: item.title || item.product_id }),
    el("span", { class: "price", text: formatPrice(item.price) }),
    el("span", { class: "reason", text: reason }),
  );
}

function renderCards(container, items, requestId, emptyText = "Nothing to show yet.") {
  if (!items.length) {
    container.replaceChildren(el("p", { class: "note", text: emptyText }));
    return;
  }
  container.replaceChildren(...items.map((item) => card(item, requestId)));
}

function drawForYou(body, title) {
  const strip = $("#for-you");
  state.strip += 1;
  if (title) $("#for-you-title").textContent = title;
  renderCards($("[data-role=items]", strip), body.items, body.request_id);
  strip.dataset.requestId = body.request_id;
  strip.dataset.version = String(state.strip);
}

async function refreshForYou() {
  const ticket = ++state.strip;
  const me = await visitor();
  const body = await api(`/users/${encodeURIComponent(me.visitor_id)}/feed?k=${STRIP_SIZE}`);
  if (ticket !== state.strip) return; // something newer was drawn meanwhile
  drawForYou(body);
}

// The strip sits above the page, except on a product page where it is the page's "for you" module.
function parkForYou(onTop) {
  const slot = $("#for-you-slot");
  const strip = $("#for-you");
  if (strip.parentElement !== slot) slot.append(strip);
  $("#for-you-title").textContent = "For you";
  slot.hidden = !onTop;
}

// ---- filters ---------------------------------------------------------------------------------------
async function loadFacets() {
  const facets = await api("/catalog/facets");
  const form = $("#filters");
  for (const field of FACET_FIELDS) {
    const select = form.elements[field];
    for (const value of facets[field] || []) select.append(el("option", { value, text: value }));
  }
}

function filtersFromForm() {
  const form = $("#filters");
  const params = new URLSearchParams();
  for (const field of FILTER_FIELDS) {
    const input = form.elements[field];
    if (input.type === "checkbox") {
      if (input.checked) params.set(field, "true");
    } else if (input.value !== "") {
      params.set(field, input.value);
    }
  }
  return params;
}

function setFormFromParams(params) {
  const form = $("#filters");
  for (const field of FILTER_FIELDS) {
    const input = form.elements[field];
    if (input.type === "checkbox") input.checked = params.get(field) === "true";
    else input.value = params.get(field) || "";
  }
}

function describeFilter(key, value) {
  if (key === "min_price") return `price from ${value}`;
  if (key === "max_price") return `price up to ${value}`;
  if (key === "in_stock") return value ? "in stock" : "out of stock";
  return `${FILTER_LABELS[key] || key} ${[].concat(value).join(", ")}`;
}

function understoodLine(understood) {
  if (!understood) return null;
  const parts = Object.entries(understood.filters || {}).map(([key, value]) => describeFilter(key, value));
  const fixes = Object.entries(understood.corrections || {}).map(([typed, meant]) => `“${typed}” as ${meant}`);
  let text = parts.length ? `understood: ${parts.join(", ")}` : `searching for “${understood.query}”`;
  if (fixes.length) text += ` (read ${fixes.join(", ")})`;
  return el("p", { class: "understood", text });
}

// ---- views ---------------------------------------------------------------------------------------
function gridSection(title, body, extra = []) {
  const grid = el("div", { class: "grid", "data-role": "results" });
  renderCards(grid, body.items, body.request_id, "No products match; try fewer filters.");
  return [el("h1", { text: title }), ...extra, grid];
}

async function renderHome(params) {
  parkForYou(true);
  $("#search-input").value = "";
  refreshForYou().catch((error) => showStatus(error.message));
  const body = await api(`/catalog/popular?k=${GRID_SIZE}&${filtersFromForm()}`);
  return gridSection("Popular now", body);
}

async function renderSearch(params) {
  parkForYou(true);
  const q = params.get("q") || "";
  $("#search-input").value = q;
  refreshForYou().catch((error) => showStatus(error.message));
  const query = new URLSearchParams(filtersFromForm());
  query.set("q", q);
  query.set("k", String(GRID_SIZE));
  const body = await api(`/search?${query}`);
  return gridSection(`Results for “${q}”`, body, [understoodLine(body.understood)]);
}

async function renderPhoto() {
  parkForYou(true);
  if (!state.photo) {
    go("/");
    return null;
  }
  const form = new FormData();
  form.append("image", state.photo);
  // The image space: a shopper with a photo asks for that look (colour and shape), not its description.
  const query = `k=${GRID_SIZE}&mode=image&${filtersFromForm()}`;
  const body = await api(`/search/image?${query}`, { method: "POST", body: form });
  const preview = el("img", { class: "photo-preview", src: URL.createObjectURL(state.photo), alt: "your photo" });
  return gridSection("Looks like your photo", body, [preview]);
}

function productHeader(product) {
  const attributes = el("dl", { class: "attributes" });
  for (const [key, label] of ATTRIBUTES) {
    if (product[key] !== undefined && product[key] !== null && product[key] !== "") {
      attributes.append(el("dt", { text: label }), el("dd", { text: String(product[key]) }));
    }
  }
  const cart = el("button", { type: "button", class: "add-to-cart", text: "Add to cart" });
  cart.addEventListener("click", () => {
    const id = product.product_id;
    track("cart", { product_id: id, request_id: state.attribution.get(id) }).then((done) => {
      if (done) cart.textContent = "In your cart";
    });
  });
  return el(
    "article",
    { class: "product", "data-product-id": product.product_id },
    el("img", { src: `/products/${encodeURIComponent(product.product_id)}/image`, alt: product.title || "" }),
    el(
      "div",
      { class: "product-info" },
      el("h1", { text: product.title || product.product_id }),
      el("p", { class: "price", text: formatPrice(product.price) }),
      el("p", { class: "stock", text: product.in_stock ? "In stock" : "Out of stock" }),
      attributes,
      cart,
    ),
  );
}

function similarModule(productId, module) {
  const items = el("div", { class: "cards", "data-role": "items" });
  const section = el(
    "section",
    { class: "module", "data-module": module.name, "data-request-id": module.request_id, "data-mode": "fused" },
  );
  const modes = el("div", { class: "modes", role: "group", "aria-label": "Similar by" });
  for (const mode of SIMILAR_MODES) {
    const button = el("button", { type: "button", "data-mode": mode, "aria-pressed": mode === "fused" ? "true" : "false", text: mode });
    button.addEventListener("click", async () => {
      section.dataset.state = "loading";
      try {
        const body = await api(`/products/${encodeURIComponent(productId)}/similar?k=${module.items.length || 8}&mode=${mode}`);
        // Clicks stay credited to the page's "similar" module (its request_id): the mode is how the
        // shopper looked at the module, and module interest is what the page order learns.
        renderCards(items, body.items, module.request_id);
        for (const other of modes.children) other.setAttribute("aria-pressed", other === button ? "true" : "false");
        section.dataset.mode = mode;
        section.dataset.state = "ready";
      } catch (error) {
        section.dataset.state = "error";
        showStatus(error.message);
      }
    });
    modes.append(button);
  }
  renderCards(items, module.items, module.request_id);
  section.dataset.state = "ready";
  section.append(el("div", { class: "module-head" }, el("h2", { text: module.title }), modes), items);
  return section;
}

function plainModule(module) {
  const items = el("div", { class: "cards", "data-role": "items" });
  renderCards(items, module.items, module.request_id);
  return el(
    "section",
    { class: "module", "data-module": module.name, "data-request-id": module.request_id },
    el("h2", { text: module.title }),
    items,
  );
}

async function renderProduct(productId) {
  parkForYou(false);
  const me = await visitor();
  // The view first (awaited), so the page's "for you" already knows this visit.
  await track("view", { product_id: productId, request_id: state.attribution.get(productId) }, { refresh: false });
  const page = await api(`/products/${encodeURIComponent(productId)}/page?user_id=${encodeURIComponent(me.visitor_id)}&k=8`);
  return () => {
    // Modules in the order the server ranked them for this shopper (predicted interest).
    const modules = el("div", { class: "modules", "data-role": "modules" });
    for (const module of page.modules) {
      if (module.name === "for_you") {
        drawForYou(module, module.title);
        modules.append($("#for-you"));
      } else if (module.name === "similar") {
        modules.append(similarModule(productId, module));
      } else {
        modules.append(plainModule(module));
      }
    }
    return [productHeader(page.product), modules];
  };
}

async function render() {
  const ticket = ++state.render;
  const { path, params } = parseHash();
  const view = $("#view");
  const route = path.startsWith("/product/") ? "product" : path.replace(/^\//, "") || "home";
  view.dataset.route = route;
  view.dataset.state = "loading";
  view.setAttribute("aria-busy", "true");
  showStatus("");
  if (route === "home" || route === "search") setFormFromParams(params);
  try {
    let content;
    if (route === "home") content = await renderHome(params);
    else if (route === "search") content = await renderSearch(params);
    else if (route === "photo") content = await renderPhoto();
    else if (route === "product") content = await renderProduct(decodeURIComponent(path.slice("/product/".length)));
    else content = [el("h1", { text: "Not found" }), el("p", { text: "This page does not exist." })];
    if (ticket !== state.render || content === null) return; // the shopper has moved on
    const nodes = typeof content === "function" ? content() : content;
    view.replaceChildren(...nodes.filter(Boolean));
    view.dataset.productId = route === "product" ? decodeURIComponent(path.slice("/product/".length)) : "";
    if (path !== state.path) window.scrollTo(0, 0); // a filter change keeps the place; a new page does not
    state.path = path;
    view.dataset.state = "ready";
  } catch (error) {
    if (ticket !== state.render) return;
    view.replaceChildren(el("h1", { text: "Something went wrong" }));
    view.dataset.state = "error";
    showStatus(error.message);
  } finally {
    if (ticket === state.render) view.setAttribute("aria-busy", "false");
  }
}

// ---- wiring --------------------------------------------------------------------------------------
function onCardClick(event) {
  const target = event.target.closest("a.card");
  if (!target || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) return;
  event.preventDefault();
  const productId = target.dataset.productId;
  const requestId = target.dataset.requestId;
  if (requestId) state.attribution.set(productId, requestId);
  track("click", { product_id: productId, request_id: requestId });
  go(`/product/${encodeURIComponent(productId)}`);
}

function onSearch(event) {
  event.preventDefault();
  const q = $("#search-input").value.trim();
  if (!q) return;
  track("search", { query: q }, { refresh: false });
  const params = filtersFromForm();
  params.set("q", q);
  go("/search", params);
}

function onFiltersChanged() {
  const { path, params } = parseHash();
  if (path === "/photo") {
    render();
    return;
  }
  const next = filtersFromForm();
  if (path === "/search" && params.get("q")) next.set("q", params.get("q"));
  go(path === "/search" ? "/search" : "/", next);
}

function onPhoto(event) {
  const file = event.target.files && event.target.files[0];
  if (!file) return;
  state.photo = file;
  event.target.value = ""; // the same file chosen again is a new search
  if (parseHash().path === "/photo") render();
  else go("/photo");
}

async function boot() {
  document.addEventListener("click", onCardClick);
  $("#search-form").addEventListener("submit", onSearch);
  $("#photo-input").addEventListener("change", onPhoto);
  const filters = $("#filters");
  filters.addEventListener("change", onFiltersChanged);
  filters.addEventListener("reset", () => setTimeout(onFiltersChanged)); // after the form has cleared
  window.addEventListener("hashchange", render);
  try {
    await loadFacets();
  } catch (error) {
    showStatus(`filters unavailable: ${error.message}`);
  }
  await render();
}

boot();
