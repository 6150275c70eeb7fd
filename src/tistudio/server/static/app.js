// tistudio's web page: plain JavaScript, no framework, nothing loaded from the network.
// Every form is generated from the server's option schema (the same dataclasses as the CLI).
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { schema: null, sets: [], embeddings: [], set: "", creatingSet: null, trainJob: null, lastTrainJob: null };

// ---------------------------------------------------------------------------------------------------------------
// Talking to the server

async function api(method, url, body) {
  const options = { method, headers: {} };
  if (body instanceof FormData) {
    options.body = body;
  } else if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { error: text }; }
  if (!response.ok) {
    let message = (data && (data.error || data.detail)) || `${response.status} ${response.statusText}`;
    if (Array.isArray(message)) message = message.map((d) => d.msg || JSON.stringify(d)).join("; ");
    const error = new Error(message);
    error.field = data && data.field;
    throw error;
  }
  return data;
}

function showError(id, error) {
  const element = $(id);
  if (!error) { element.hidden = true; element.textContent = ""; return; }
  element.hidden = false;
  element.textContent = error.message || String(error);
}

function watchJob(job, handlers) {
  // Live events of a job (Server-Sent Events); resolves with the finished job.
  return new Promise((resolve) => {
    const source = new EventSource(`/api/jobs/${job.id}/events`);
    for (const kind of ["progress", "preview", "message", "save", "start", "encode"]) {
      source.addEventListener(kind, (event) => handlers[kind] && handlers[kind](JSON.parse(event.data)));
    }
    source.addEventListener("end", (event) => {
      source.close(); refreshStatus(); resolve(JSON.parse(event.data));
    });
    source.onerror = async () => {
      // The stream broke (server restart): fall back to asking for the job.
      source.close();
      try { resolve(await waitJob(job.id)); } catch (e) { resolve({ ...job, status: "failed", error: e.message }); }
    };
  });
}

async function waitJob(id) {
  for (;;) {
    const job = await api("GET", `/api/jobs/${id}`);
    if (["done", "failed", "stopped", "interrupted"].includes(job.status)) return job;
    await new Promise((r) => setTimeout(r, 500));
  }
}

function setProgress(id, fraction) {
  const bar = $(id);
  bar.hidden = fraction === null;
  if (fraction !== null) bar.firstElementChild.style.width = `${Math.round(Math.min(1, fraction) * 100)}%`;
}

// ---------------------------------------------------------------------------------------------------------------
// Forms generated from the option schema

function humanize(name) { return name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase()); }

function fieldError(field, message) {
  const error = new Error(`${humanize(field.name)}: ${message}`);
  error.field = field.name;
  return error;
}

function number(input, field) {
  const text = input.value.trim();
  if (input.validity && input.validity.badInput) throw fieldError(field, "that is not a number");
  if (text === "") throw fieldError(field, `enter a number (the default is ${field.default})`);
  const value = Number(text);
  if (!Number.isFinite(value)) throw fieldError(field, "that is not a number");
  if (field.type === "int" && !Number.isInteger(value)) throw fieldError(field, "enter a whole number");
  if (field.minimum !== null && field.minimum !== undefined && value < field.minimum) {
    throw fieldError(field, `at least ${field.minimum}`);
  }
  if (field.maximum !== null && field.maximum !== undefined && value > field.maximum) {
    throw fieldError(field, `at most ${field.maximum}`);
  }
  return value;
}

function renderForm(form, fields, overrides = {}) {
  form.innerHTML = "";
  const inputs = {};
  const advanced = document.createElement("details");
  advanced.innerHTML = "<summary>More options</summary><div class='inner'></div>";
  for (const field of fields) {
    if (overrides[field.name] === null) continue;
    const wrapper = document.createElement("div");
    wrapper.className = "field" + (field.widget ? " wide" : "");
    wrapper.dataset.field = field.name;
    const id = `${form.id}-${field.name}`;
    let input;
    const choices = (overrides[field.name] && overrides[field.name].choices) || field.choices;
    if (choices) {
      input = document.createElement("select");
      for (const choice of choices) {
        const option = document.createElement("option");
        option.value = choice; option.textContent = choice; input.append(option);
      }
    } else if (field.type === "bool") {
      input = document.createElement("input"); input.type = "checkbox";
    } else if (field.widget === "textarea") {
      input = document.createElement("textarea");
    } else {
      input = document.createElement("input");
      input.type = field.type === "int" || field.type === "float" ? "number" : "text";
      if (field.type === "float") input.step = "any";
      if (field.minimum !== null && field.minimum !== undefined) input.min = field.minimum;
      if (field.maximum !== null && field.maximum !== undefined) input.max = field.maximum;
    }
    input.id = id; input.name = field.name;
    const value = overrides[field.name] && "value" in overrides[field.name] ? overrides[field.name].value
      : field.default;
    if (field.type === "bool") input.checked = Boolean(value);
    else if (choices && !choices.includes(value)) input.value = choices[0];
    else input.value = value;
    const label = document.createElement("label");
    label.htmlFor = id; label.textContent = humanize(field.name) + (field.required ? " *" : "");
    const hint = document.createElement("span");
    hint.className = "hint"; hint.textContent = field.help;
    wrapper.append(label, input, hint);
    (field.advanced ? advanced.querySelector(".inner") : form).append(wrapper);
    inputs[field.name] = { input, field };
  }
  if (advanced.querySelector(".inner").children.length) form.append(advanced);
  form.addEventListener("submit", (event) => event.preventDefault());
  return {
    values(strict = true) {
      // strict (what is sent): a number field that holds no number is an error at that field, never the default.
      // Not strict (reading the form to redraw it): number fields as typed.
      const out = {};
      for (const [name, { input, field }] of Object.entries(inputs)) {
        if (field.type === "bool") out[name] = input.checked;
        else if (field.type === "int" || field.type === "float") out[name] = strict ? number(input, field) : input.value;
        else out[name] = input.value;
      }
      return out;
    },
    set(name, value) {
      const entry = inputs[name];
      if (!entry) return;
      if (entry.field.type === "bool") entry.input.checked = Boolean(value); else entry.input.value = value;
    },
    mark(error) {
      form.querySelectorAll(".invalid").forEach((e) => e.classList.remove("invalid"));
      if (error && error.field && inputs[error.field]) {
        inputs[error.field].input.closest(".field").classList.add("invalid");
        inputs[error.field].input.focus();
      }
    },
    inputs,
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Tabs and status

function showTab(name) {
  for (const section of document.querySelectorAll("main section")) section.hidden = section.id !== name;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.tab === name);
  if (name === "photos") loadSets();
  if (name === "embeddings") loadEmbeddings();
  if (name === "train") refreshTrainChoices();
  if (name === "generate") loadGallery();
}

async function refreshStatus() {
  try {
    const status = await api("GET", "/api/status");
    $("#model").textContent = `model: ${status.model.split(/[\\/]/).filter(Boolean).pop() || status.model}`;
    $("#demo-banner").hidden = !status.demo;
    const running = status.running || (status.busy ? [status.busy] : []);
    const where = (job) => (status.devices || []).length > 1 && job.device ? ` on ${job.device}` : "";
    $("#busy").textContent = running.length ? "working: " + running.map((job) =>
      `${job.kind} ${job.request.embedding || job.request.name || job.request.set || ""}`.trim() + where(job))
      .join(", ") + (status.queued ? `; ${status.queued} waiting` : "") : "idle";
  } catch (e) {
    $("#busy").textContent = `server unreachable: ${e.message}`;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Photos

let prepareForm = null;

async function loadSets(select) {
  state.sets = await api("GET", "/api/photosets");
  const picker = $("#set-select");
  picker.innerHTML = "";
  for (const set of state.sets) {
    const option = document.createElement("option");
    option.value = set.name; option.textContent = `${set.name} (${set.photos} photos${set.prepared ? ", prepared" : ""})`;
    picker.append(option);
  }
  $("#sets-empty").hidden = state.sets.length > 0;
  $("#set-panel").hidden = state.sets.length === 0;
  state.set = select || state.set || (state.sets[0] && state.sets[0].name) || "";
  if (state.set && !state.sets.some((s) => s.name === state.set)) state.set = state.sets[0] ? state.sets[0].name : "";
  picker.value = state.set;
  if (state.set) await loadSet();
}

async function loadSet() {
  const set = await api("GET", `/api/photosets/${state.set}`);
  const grid = $("#photo-grid");
  grid.innerHTML = "";
  for (const photo of set.photos) {
    const figure = document.createElement("figure");
    figure.innerHTML = `<img alt="" loading="lazy"><figcaption></figcaption><button class="danger">Remove</button>`;
    figure.querySelector("img").src = `${photo.url}?thumb=264`;
    figure.querySelector("figcaption").textContent = photo.file;
    figure.querySelector("button").onclick = async () => {
      await api("DELETE", photo.url); loadSet();
    };
    figure.querySelector("img").onerror = () => { figure.classList.add("bad"); };
    grid.append(figure);
  }
  $("#photos-empty").hidden = set.photos.length > 0;
  $("#prepare-button").disabled = set.photos.length === 0;
  const prepared = state.sets.find((s) => s.name === state.set);
  if (prepared && prepared.prepared) await showReport(); else $("#report").hidden = true;
}

async function upload(files) {
  showError("#upload-error", null);
  // Photos chosen while a new set is still being created belong to that set, not to the one shown before it.
  if (state.creatingSet) await state.creatingSet;
  if (!state.set) {
    showError("#upload-error", new Error("Create a photo set first: give your subject a name above."));
    return;
  }
  const data = new FormData();
  for (const file of files) data.append("files", file, file.name);
  try {
    const answer = await api("POST", `/api/photosets/${state.set}/photos`, data);
    if (answer.refused && answer.refused.length) {
      const which = answer.refused.map((r) => `${r.file}: ${r.reason}`).join("; ");
      showError("#upload-error", new Error(`Added ${answer.saved.length}; not added: ${which}`));
    }
  } catch (e) {
    showError("#upload-error", e);
  }
  await loadSets(state.set);
}

async function showReport() {
  const report = await api("GET", `/api/datasets/${state.set}`);
  $("#report").hidden = false;
  const verdict = $("#verdict");
  verdict.innerHTML = "";
  for (const line of report.verdict) {
    const item = document.createElement("li"); item.textContent = line; verdict.append(item);
  }
  const grid = $("#prepared-grid");
  grid.innerHTML = "";
  for (const item of report.items) {
    const figure = document.createElement("figure");
    figure.innerHTML = "<img alt=''><figcaption></figcaption>";
    if (item.status === "ok") {
      figure.querySelector("img").src = item.images[0];
      const face = item.faces ? `face ${Math.round(item.face_fraction * 100)}%, ${item.yaw}` : item.framing;
      figure.querySelector("figcaption").textContent =
        `${item.source}: ${face}, sharpness ${Math.round(item.sharpness)}` + (item.notes.length ? ` — ${item.notes.join("; ")}` : "");
    } else {
      figure.classList.add("bad");
      figure.querySelector("figcaption").textContent = `${item.source}: left out, ${item.reason}`;
    }
    grid.append(figure);
  }
}

async function runPrepare() {
  showError("#prepare-error", null);
  prepareForm.mark(null);
  $("#prepare-button").disabled = true;
  try {
    const job = await api("POST", `/api/photosets/${state.set}/prepare`, prepareForm.values());
    setProgress("#prepare-progress", 0);
    const done = await watchJob(job, { progress: (e) => setProgress("#prepare-progress", e.step / e.total) });
    if (done.status !== "done") throw new Error(done.error || `preparing ${done.status}`);
    await loadSets(state.set);
  } catch (e) {
    showError("#prepare-error", e); prepareForm.mark(e);
  } finally {
    setProgress("#prepare-progress", null);
    $("#prepare-button").disabled = false;
  }
}

function setupPhotos() {
  prepareForm = renderForm($("#prepare-form"), state.schema.prepare);
  $("#set-select").onchange = (e) => { state.set = e.target.value; loadSet(); };
  $("#new-set-button").onclick = () => {
    showError("#set-error", null);
    const name = $("#new-set").value.trim();
    if (!name) {
      showError("#set-error", new Error("Give the set a name first, e.g. tomtut."));
      return null;
    }
    const creating = (async () => {
      try {
        await api("POST", `/api/photosets/${encodeURIComponent(name)}`);
        $("#new-set").value = "";
        await loadSets(name);
      } catch (e) { showError("#set-error", e); }
    })();
    state.creatingSet = creating;
    creating.finally(() => { if (state.creatingSet === creating) state.creatingSet = null; });
    return creating;
  };
  const zone = $("#dropzone");
  zone.ondragover = (e) => { e.preventDefault(); zone.classList.add("over"); };
  zone.ondragleave = () => zone.classList.remove("over");
  zone.ondrop = (e) => { e.preventDefault(); zone.classList.remove("over"); upload(e.dataTransfer.files); };
  $("#file-input").onchange = (e) => upload(e.target.files);
  $("#prepare-button").onclick = runPrepare;
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Embeddings

let createForm = null;

async function loadEmbeddings() {
  state.embeddings = await api("GET", "/api/embeddings");
  const body = $("#embedding-table tbody");
  body.innerHTML = "";
  for (const item of state.embeddings) {
    const row = document.createElement("tr");
    row.innerHTML = "<td></td><td></td><td></td><td></td><td></td><td></td>";
    const cells = row.children;
    cells[0].textContent = item.name;
    cells[1].textContent = item.error ? "-" : `${item.vectors} × ${item.width}`;
    cells[2].textContent = item.error ? "-" : item.step;
    cells[3].textContent = item.error || item.fits;
    cells[4].textContent = item.ti_hash || "";
    const actions = [["Inspect", "secondary", () => inspect(item.name)],
      ["Download", "secondary", () => { window.location = `/api/embeddings/${item.name}/file`; }],
      ["Train", "", () => { state.trainEmbedding = item.name; window.location.hash = "#train"; }],
      ["Delete", "danger", async () => {
        if (!window.confirm(`Delete the embedding ${item.name}? Its training run stays.`)) return;
        await api("DELETE", `/api/embeddings/${item.name}`); loadEmbeddings();
      }]];
    for (const [label, kind, handler] of actions) {
      const button = document.createElement("button");
      button.textContent = label; button.className = kind; button.onclick = handler;
      cells[5].append(button);
    }
    body.append(row);
  }
  $("#embeddings-empty").hidden = state.embeddings.length > 0;
  $("#embedding-table").hidden = state.embeddings.length === 0;
}

async function inspect(name) {
  const info = await api("GET", `/api/embeddings/${name}`);
  const details = $("#embedding-details");
  details.hidden = false;
  details.textContent = JSON.stringify(info, null, 2);
}

function setupEmbeddings() {
  createForm = renderForm($("#create-form"), state.schema.create);
  $("#create-button").onclick = async () => {
    showError("#create-error", null); createForm.mark(null);
    $("#create-button").disabled = true;
    try {
      const job = await api("POST", "/api/embeddings", createForm.values());
      const done = await watchJob(job, {});
      if (done.status !== "done") throw Object.assign(new Error(done.error || done.status), { field: "name" });
      await loadEmbeddings();
    } catch (e) { showError("#create-error", e); createForm.mark(e); }
    $("#create-button").disabled = false;
  };
  $("#embedding-upload-button").onclick = async () => {
    showError("#embedding-upload-error", null);
    const file = $("#embedding-file").files[0];
    if (!file) { showError("#embedding-upload-error", new Error("choose an embedding file first")); return; }
    const data = new FormData();
    data.append("file", file, file.name);
    data.append("name", $("#embedding-upload-name").value.trim());
    try { await api("POST", "/api/embeddings/upload", data); await loadEmbeddings(); }
    catch (e) { showError("#embedding-upload-error", e); }
  };
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Train

let trainForm = null;
const losses = [];
const evaluations = { rows: [], kept: null, report: null };  // the run's fixed-batch losses, likeness, kept step

async function refreshTrainChoices() {
  const [embeddings, sets] = await Promise.all([api("GET", "/api/embeddings"), api("GET", "/api/photosets")]);
  state.embeddings = embeddings; state.sets = sets;
  const names = embeddings.filter((e) => !e.error).map((e) => e.name);
  const setNames = sets.map((s) => s.name);
  const keep = trainForm ? trainForm.values(false) : {};
  trainForm = renderForm($("#train-form"), [{ name: "set", type: "str", default: "", required: true,
    help: "the photo set to train on (prepared if you prepared it)", choices: setNames.length ? setNames : [""] },
  ...state.schema.train], {
    embedding: { choices: names.length ? names : [""], value: state.trainEmbedding || keep.embedding || names[0] || "" },
  });
  for (const [key, value] of Object.entries(keep)) if (key !== "embedding") trainForm.set(key, value);
  if (state.trainEmbedding && setNames.includes(state.trainEmbedding)) trainForm.set("set", state.trainEmbedding);
  trainForm.inputs.embedding.input.onchange = () => loadRun(trainForm.values(false).embedding);
  $("#train-button").disabled = !names.length || !setNames.length;
  if (!names.length || !setNames.length) {
    showError("#train-error", new Error(!names.length ? "Create an embedding first (2 · Embeddings)."
      : "Add a photo set first (1 · Photos)."));
  } else {
    showError("#train-error", null);
  }
  const jobs = await api("GET", "/api/jobs");
  const running = jobs.find((j) => j.kind === "train" && ["running", "queued"].includes(j.status));
  state.lastTrainJob = jobs.find((j) => j.kind === "train");
  $("#resume-button").hidden = !(state.lastTrainJob && ["stopped", "interrupted", "failed"]
    .includes(state.lastTrainJob.status));
  if (running && (!state.trainJob || state.trainJob.id !== running.id)) follow(running);
  const current = trainForm.values(false).embedding;
  if (current) loadRun(current);
}

async function loadRun(name) {
  losses.length = 0;
  Object.assign(evaluations, { rows: [], kept: null, report: null });
  $("#preview-timeline").innerHTML = "";
  try {
    const run = await api("GET", `/api/runs/${name}`);
    for (const row of run.loss) losses.push([row.step, row.loss]);
    Object.assign(evaluations, { rows: run.eval || [], kept: run.kept, report: run.report });
    drawLoss();
    for (const preview of run.previews) addPreview(name, preview.step, preview.url, run.copies.includes(preview.step));
    state.copies = run.copies;
  } catch (e) {
    drawLoss();
  }
}

function drawLoss() {
  const chart = $("#loss-chart");
  const points = losses.filter(([, loss]) => Number.isFinite(loss));
  if (points.length < 2) { chart.innerHTML = "<p class='empty'>No training yet for this embedding.</p>"; return; }
  const width = 760, height = 220, pad = 40;
  const steps = points.map((p) => p[0]), values = points.map((p) => p[1]);
  const [s0, s1] = [Math.min(...steps), Math.max(...steps)];
  const [v0, v1] = [Math.min(...values), Math.max(...values)];
  const x = (s) => pad + (s - s0) / ((s1 - s0) || 1) * (width - pad - 10);
  const y = (v) => 10 + (v1 - v) / ((v1 - v0) || 1) * (height - 40);
  const window = Math.max(1, Math.round(points.length / 20));
  const smooth = values.map((_, i) => {
    const part = values.slice(Math.max(0, i - window + 1), i + 1);
    return part.reduce((a, b) => a + b, 0) / part.length;
  });
  const line = (vals, color, w) => `<polyline fill="none" stroke="${color}" stroke-width="${w}" points="${
    vals.map((v, i) => `${x(steps[i]).toFixed(1)},${y(v).toFixed(1)}`).join(" ")}"/>`;
  chart.innerHTML = `<svg viewBox="0 0 ${width} ${height}" role="img" aria-label="loss curve">
    <text x="4" y="16" font-size="11">${v1.toFixed(3)}</text><text x="4" y="${height - 30}" font-size="11">${v0.toFixed(3)}</text>
    <text x="${pad}" y="${height - 8}" font-size="11">step ${s0}</text>
    <text x="${width - 10}" y="${height - 8}" font-size="11" text-anchor="end">step ${s1}</text>
    ${line(values, "#9ecae1", 1)}${line(smooth, "#08519c", 2)}${evaluationMarks(x, y, s0, s1, v0, v1, height)}</svg>
    <p class="muted">${points.length} steps, last loss ${values[values.length - 1].toFixed(4)}${
      evaluations.rows.length ? "; orange: the fixed-batch loss" : ""}${
      evaluations.rows.some((r) => r.likeness !== null) ? "; green, right axis: the likeness (0–100%)" : ""}</p>`;
  drawKept();
}

// The evaluations on the loss chart: the fixed-batch loss (same axis, clipped to it), the likeness (right axis)
// and the kept step.
function evaluationMarks(x, y, s0, s1, v0, v1, height) {
  const rows = evaluations.rows.filter((r) => r.step >= s0 && r.step <= s1);
  const clip = (v) => Math.min(v1, Math.max(v0, v));
  const evalLine = rows.length > 1 ? `<polyline fill="none" stroke="#e6550d" stroke-width="2" points="${
    rows.map((r) => `${x(r.step).toFixed(1)},${y(clip(r.loss)).toFixed(1)}`).join(" ")}"/>` : "";
  const liked = rows.filter((r) => r.likeness !== null);
  const ly = (v) => 10 + (1 - v) * (height - 40);
  const likeLine = liked.length ? `<polyline fill="none" stroke="#31a354" stroke-width="2" stroke-dasharray="5 3"
    points="${liked.map((r) => `${x(r.step).toFixed(1)},${ly(r.likeness).toFixed(1)}`).join(" ")}"/>` +
    liked.map((r) => `<circle cx="${x(r.step).toFixed(1)}" cy="${ly(r.likeness).toFixed(1)}" r="3"
      fill="#31a354"><title>step ${r.step}: likeness ${(100 * r.likeness).toFixed(0)}%</title></circle>`).join("")
    : "";
  const kept = evaluations.kept;
  const keptMark = kept && kept.step >= s0 && kept.step <= s1 && kept.step !== kept.last_step
    ? `<line x1="${x(kept.step)}" x2="${x(kept.step)}" y1="10" y2="${height - 30}" stroke="#756bb1"
        stroke-dasharray="3 3"/><text x="${x(kept.step) + 4}" y="22" font-size="11" fill="#756bb1">kept</text>` : "";
  return evalLine + likeLine + keptMark;
}

function drawKept() {
  const kept = evaluations.kept, note = $("#kept-step");
  if (!kept || !losses.length) { note.hidden = true; return; }
  const best = kept.step !== kept.last_step;
  const liked = evaluations.rows.find((r) => r.step === kept.step && r.likeness !== null);
  note.hidden = false;
  note.textContent = (best ? `The embedding keeps step ${kept.step}, chosen by ${kept.by}` +
    (liked ? ` (likeness ${(100 * liked.likeness).toFixed(0)}%)` : "") + `; the last step, ${kept.last_step}, is ` +
    "kept beside it." : `The embedding holds step ${kept.step}, the last step trained.`);
  if (evaluations.report) {
    const link = document.createElement("a");
    link.href = evaluations.report;
    link.target = "_blank";
    link.rel = "noopener";
    link.textContent = " Open the run's report";
    note.append(link);
  }
}

function addPreview(name, step, url, hasCopy) {
  const timeline = $("#preview-timeline");
  const existing = timeline.querySelector(`[data-step="${step}"]`);
  if (existing) existing.remove();
  const figure = document.createElement("figure");
  figure.dataset.step = step;
  figure.innerHTML = `<img alt="step ${step}"><figcaption>step ${step}</figcaption>`;
  figure.querySelector("img").src = `${url}?t=${Date.now()}`;
  if (hasCopy) {
    const button = document.createElement("button");
    button.textContent = "Use this step";
    button.onclick = async () => {
      showError("#use-step-error", null);
      try {
        await api("POST", `/api/runs/${name}/use-step`, { step });
        $("#train-status").textContent = `${name} is now the embedding saved at step ${step}.`;
        const run = await api("GET", `/api/runs/${name}`);
        evaluations.kept = run.kept;
        drawLoss();
      } catch (e) { showError("#use-step-error", e); }
    };
    figure.append(button);
  }
  const after = [...timeline.children].find((f) => Number(f.dataset.step) > step);
  timeline.insertBefore(figure, after || null);
}

function follow(job) {
  state.trainJob = job;
  const name = job.request.embedding;
  $("#stop-button").hidden = false;
  $("#train-button").disabled = true;
  setProgress("#train-progress", 0);
  watchJob(job, {
    message: (e) => { $("#train-status").textContent = e.text; },
    encode: (e) => { $("#train-status").textContent = e.text || "encoding images"; },
    progress: (e) => {
      losses.push([e.step, e.loss]);
      if (e.step % 5 === 0 || e.step === e.total) drawLoss();
      setProgress("#train-progress", e.step / e.total);
      const eta = e.eta_s ? `, ${Math.round(e.eta_s)} s left` : "";
      $("#train-status").textContent = `step ${e.step} of ${e.total}, loss ${e.loss === null ? "…" :
        e.loss.toFixed(4)}, lr ${e.lr.toPrecision(2)}${eta}`;
    },
    preview: (e) => addPreview(name, e.step, e.url, (e.step % (job.request.save_every || 0)) === 0 ||
      e.step === job.request.max_steps),
  }).then(async (done) => {
    $("#stop-button").hidden = true;
    $("#train-button").disabled = false;
    setProgress("#train-progress", null);
    state.trainJob = null;
    $("#train-status").textContent = done.status === "done" ? (done.result && done.result.message) || "done"
      : `${done.status}${done.error ? ": " + done.error : ""}`;
    if (done.status === "failed") showError("#train-error", new Error(done.error));
    await loadRun(name);
    state.lastTrainJob = done;
    $("#resume-button").hidden = !["stopped", "interrupted", "failed"].includes(done.status);
  });
}

function setupTrain() {
  $("#train-button").onclick = async () => {
    showError("#train-error", null); trainForm.mark(null);
    try {
      const values = trainForm.values();
      const job = await api("POST", "/api/train", values);
      losses.length = 0;
      await loadRun(values.embedding);
      follow(job);
    } catch (e) { showError("#train-error", e); trainForm.mark(e); }
  };
  $("#stop-button").onclick = async () => {
    if (state.trainJob) await api("POST", `/api/jobs/${state.trainJob.id}/stop`);
    $("#train-status").textContent = "stopping after this step and saving…";
  };
  $("#resume-button").onclick = async () => {
    showError("#train-error", null);
    try {
      const job = await api("POST", `/api/jobs/${state.lastTrainJob.id}/resume`);
      $("#resume-button").hidden = true;
      follow(job);
    } catch (e) { showError("#train-error", e); }
  };
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Generate

let generateForm = null;

function addImage(item, first) {
  const gallery = $("#gallery");
  const figure = document.createElement("figure");
  figure.innerHTML = "<img alt=''><pre></pre><div class='row'></div>";
  figure.querySelector("img").src = item.url;
  figure.querySelector("pre").textContent = item.infotext;
  const seed = (item.infotext.match(/Seed: (\d+)/) || [])[1];
  if (seed) {
    const button = document.createElement("button");
    button.className = "secondary"; button.textContent = "Reuse seed";
    button.onclick = () => { generateForm.set("seed", Number(seed)); generateForm.inputs.seed.input.closest("details").open = true; };
    figure.querySelector(".row").append(button);
  }
  if (first) gallery.prepend(figure); else gallery.append(figure);
  $("#gallery-empty").hidden = true;
}

async function loadGallery() {
  const items = await api("GET", "/api/outputs?limit=60");
  $("#gallery").innerHTML = "";
  for (const item of items) addImage(item, false);
  $("#gallery-empty").hidden = items.length > 0;
}

function setupGenerate() {
  generateForm = renderForm($("#generate-form"), state.schema.generate);
  $("#generate-button").onclick = async () => {
    showError("#generate-error", null); generateForm.mark(null);
    $("#generate-button").disabled = true;
    try {
      const job = await api("POST", "/api/generate", generateForm.values());
      setProgress("#generate-progress", 0);
      const done = await watchJob(job, { progress: (e) => setProgress("#generate-progress", e.step / e.total) });
      if (done.status !== "done") throw new Error(done.error || `generation ${done.status}`);
      for (const image of done.result.images.slice().reverse()) addImage(image, true);
    } catch (e) { showError("#generate-error", e); generateForm.mark(e); }
    setProgress("#generate-progress", null);
    $("#generate-button").disabled = false;
  };
}

// ---------------------------------------------------------------------------------------------------------------

async function start() {
  state.schema = await api("GET", "/api/schema");
  setupPhotos(); setupEmbeddings(); setupTrain(); setupGenerate();
  const route = () => showTab((window.location.hash || "#photos").slice(1));
  window.addEventListener("hashchange", route);
  route();
  refreshStatus();
  setInterval(refreshStatus, 3000);
}

start().catch((e) => {
  document.querySelector("main").innerHTML = `<p class="error"></p>`;
  document.querySelector("main .error").textContent = `tistudio could not start: ${e.message}`;
});
