// The page at /: one photo -> POST /v1/attend -> its caption, the n-best, and each word's attention drawn over
// the photo. Plain browser JavaScript: no framework, no build step, nothing fetched from elsewhere.
"use strict";

// Anchor colours of the inferno colormap and the blend of captioner/overlay.py's heatmap_overlay, so the page
// shows what `captioner attend` draws: the brightest colour is the most attended place, the rest is dimmed.
const INFERNO = [[0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85], [227, 89, 51],
  [249, 140, 10], [249, 201, 50], [252, 255, 164]];
const ALPHA = 0.55;
const DIM = 0.3;
const LARGEST_SIDE = 1024; // the photo is drawn at most this big: enough for any screen's column
const TOKEN_KEY = "captioner-token";

const $ = (id) => document.getElementById(id);
const state = { image: null, result: null, active: -1, url: null };

function inferno(v) {
  const at = Math.min(Math.max(v, 0), 1) * (INFERNO.length - 1);
  const i = Math.min(Math.floor(at), INFERNO.length - 2);
  const t = at - i;
  return INFERNO[i].map((c, k) => Math.round(c + (INFERNO[i + 1][k] - c) * t));
}

// ---------------------------------------------------------------------------- talking to the server

function authorization() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authorization(), ...(options.headers || {}) } });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null; // a proxy's HTML error page: fall back to the status line
  }
  if (response.status === 401) $("token-form").hidden = false;
  if (!response.ok) throw new Error(body && body.error ? body.error : `${response.status} ${response.statusText}`);
  return body;
}

async function describeModel() {
  try {
    const m = await api("/v1/model");
    const data = m.data && m.data.source ? m.data.source : "unknown data";
    const scores = Object.entries(m.validation || {})
      .filter(([key]) => !["step", "epoch"].includes(key)).slice(0, 3)
      .map(([key, value]) => `${key} ${Number(value).toFixed(3)}`).join(", ");
    const size = m.parameters >= 1e6 ? `${(m.parameters / 1e6).toFixed(1)}M` : `${Math.round(m.parameters / 1e3)}k`;
    $("model").textContent = `${m.name}: ${m.encoder} encoder, ${size} parameters, ` +
      `trained on ${data}${scores ? ` (${scores})` : ""}`;
    $("token-form").hidden = true;
  } catch (err) {
    $("model").textContent = err.message;
  }
}

function option(id) {
  const value = parseInt($(id).value, 10);
  return Number.isFinite(value) ? Math.min(Math.max(value, 1), 16) : 1;
}

async function caption(file) {
  showError("");
  $("busy").hidden = false;
  const form = new FormData();
  form.append("image", file, file.name || "pasted image");
  const beam = option("beam");
  const nBest = Math.min(option("n-best"), beam);
  try {
    const answer = await api(`/v1/attend?beam=${beam}&n_best=${nBest}`, { method: "POST", body: form });
    show(answer.results[0], await loadImage(file));
  } catch (err) {
    $("result").hidden = true;
    showError(err.message);
  } finally {
    $("busy").hidden = true;
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// The browser draws the photo itself (EXIF-upright, as the server reads it). A format it cannot show (TIFF in
// most browsers) still gets its caption and maps, drawn on a grey field of the image's proportions.
function loadImage(file) {
  if (state.url) URL.revokeObjectURL(state.url);
  state.url = URL.createObjectURL(file);
  return new Promise((resolve) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => resolve(null);
    image.src = state.url;
  });
}

// ---------------------------------------------------------------------------- drawing

// One (h, w) map -> two tiny canvases, a shade (unattended places dimmed) and the heat colours, which the
// browser stretches smoothly over the photo. Min-max normalised like overlay.upsample_map.
function layers(map) {
  const rows = map.length;
  const cols = map[0].length;
  const values = map.flat();
  const lo = Math.min(...values);
  const span = Math.max(...values) - lo;
  const shade = document.createElement("canvas");
  const heat = document.createElement("canvas");
  for (const c of [shade, heat]) [c.width, c.height] = [cols, rows];
  const shadePixels = shade.getContext("2d").createImageData(cols, rows);
  const heatPixels = heat.getContext("2d").createImageData(cols, rows);
  values.forEach((value, i) => {
    const v = span > 1e-12 ? (value - lo) / span : 0;
    shadePixels.data[4 * i + 3] = Math.round(255 * DIM * (1 - v));
    heatPixels.data.set([...inferno(v), Math.round(255 * ALPHA * v)], 4 * i);
  });
  shade.getContext("2d").putImageData(shadePixels, 0, 0);
  heat.getContext("2d").putImageData(heatPixels, 0, 0);
  return [shade, heat];
}

function draw(canvas, image, map, largest = LARGEST_SIDE) {
  const [w0, h0] = image ? [image.naturalWidth, image.naturalHeight] : [4, 3];
  const scale = Math.min(1, largest / Math.max(w0, h0)) || 1;
  canvas.width = Math.max(1, Math.round(w0 * scale));
  canvas.height = Math.max(1, Math.round(h0 * scale));
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#777";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (image) ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  if (!map) return;
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  for (const layer of layers(map)) ctx.drawImage(layer, 0, 0, canvas.width, canvas.height);
}

// ---------------------------------------------------------------------------- the result

function show(result, image) {
  state.result = result;
  state.image = image;
  $("result").hidden = false;
  const line = $("caption");
  line.replaceChildren(...result.words.map((word, i) => wordButton(word, i)));
  $("score").textContent = `log-probability ${result.logprob.toFixed(2)}, score ${result.score.toFixed(2)}`;
  const others = result.n_best.slice(1);
  $("n-best-list").replaceChildren(...(others.length ? others.map(nBestItem) : [noneItem()]));
  $("grid").replaceChildren(...result.words.map((word, i) => gridItem(word, result.maps[i])));
  select(-1);
}

function wordButton(word, i) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "word";
  button.textContent = word;
  button.setAttribute("aria-pressed", "false");
  button.addEventListener("pointerenter", () => select(i));
  button.addEventListener("focus", () => select(i));
  button.addEventListener("click", () => select(i));
  button.addEventListener("keydown", (event) => moveFocus(event, i));
  return button;
}

// Arrow keys walk the words, Home/End jump, Escape shows the plain photo.
function moveFocus(event, i) {
  const buttons = [...$("caption").children];
  const to = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0,
    End: buttons.length - 1 }[event.key];
  if (event.key === "Escape") {
    select(-1);
  } else if (to !== undefined && buttons[to]) {
    event.preventDefault();
    buttons[to].focus();
  }
}

function nBestItem(c) {
  const item = document.createElement("li");
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = `log p ${c.logprob.toFixed(2)}`;
  item.append(c.caption, score);
  return item;
}

function noneItem() {
  const item = document.createElement("li");
  item.textContent = "none: raise the beam and N-best to see more";
  return item;
}

function gridItem(word, map) {
  const item = document.createElement("li");
  const canvas = document.createElement("canvas");
  draw(canvas, state.image, map, 256);
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `Where the model looked for “${word}”`);
  const label = document.createElement("div");
  label.textContent = word;
  item.append(canvas, label);
  return item;
}

function select(i) {
  state.active = i;
  const word = i >= 0 ? state.result.words[i] : null;
  [...$("caption").children].forEach((button, k) => {
    button.classList.toggle("active", k === i);
    button.setAttribute("aria-pressed", String(k === i));
  });
  const photo = $("photo");
  draw(photo, state.image, word === null ? null : state.result.maps[i]);
  photo.dataset.word = String(i);
  photo.setAttribute("aria-label", word === null ? "The photo" : `The photo, where the model looked for “${word}”`);
}

// ---------------------------------------------------------------------------- choosing a photo

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", () => $("file").files[0] && caption($("file").files[0]));
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("file").click();
    }
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) caption(file);
  });
  document.addEventListener("paste", (event) => {
    const file = [...event.clipboardData.files][0];
    if (file) caption(file);
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    describeModel();
  });
}

wire();
describeModel();
