// tistudio's web page: plain JavaScript, no framework, nothing loaded from the network.
// Every form is generated from the server's option schema (the same dataclasses as the CLI).
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { schema: null, sets: [], embeddings: [], jobs: [], set: "", creatingSet: null, live: null, bound: null,
  resumeJob: null, trainReady: false, tab: "photos", offline: false };
const FINISHED = ["done", "failed", "stopped", "interrupted", "cancelled"];

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
  // Live events of a job (Server-Sent Events); resolves with the finished job. When the stream breaks (the server
  // restarts, the network drops) the browser reconnects by itself and the server sends what was missed
  // (Last-Event-ID); where it cannot, the page asks for the job until the server answers, then watches again.
  return new Promise((resolve) => {
    let seen = 0;
    const open = () => {
      const source = new EventSource(`/api/jobs/${job.id}/events?after=${seen}`);
      for (const kind of ["progress", "preview", "message", "save", "start", "encode", "eval"]) {
        source.addEventListener(kind, (event) => {
          const data = JSON.parse(event.data);
          seen = Math.max(seen, data.seq || 0);
          if (handlers[kind]) handlers[kind](data);
        });
      }
      source.addEventListener("end", (event) => {
        source.close(); refreshStatus(); resolve(JSON.parse(event.data));
      });
      source.onopen = () => handlers.offline && handlers.offline(false);
      source.onerror = async () => {
        if (handlers.offline) handlers.offline(true);
        if (source.readyState !== EventSource.CLOSED) return;  // the browser is reconnecting
        const now = await waitJob(job.id, true);
        if (FINISHED.includes(now.status)) resolve(now); else open();
      };
    };
    open();
  });
}

async function waitJob(id, once = false) {
  // The job once it has finished (or, with once, as soon as the server answers); a server that does not answer
  // is asked again, less and less often, for as long as it takes.
  for (let pause = 500; ; pause = Math.min(5000, pause * 1.5)) {
    try {
      const job = await api("GET", `/api/jobs/${id}`);
      if (once || FINISHED.includes(job.status)) return job;
    } catch (e) {
      if (/does not exist/.test(e.message)) return { id, status: "failed", error: e.message };
    }
    await new Promise((r) => setTimeout(r, pause));
  }
}

function submitOnEnter(container, button) {
  // Enter in a one-line field (Ctrl+Enter or Cmd+Enter in a text area) presses the form's button, as a keyboard user
  // expects; nothing happens while the button is disabled or hidden.
  container.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.isComposing) return;
    const target = event.target;
    const oneLine = target.tagName === "INPUT" && !["checkbox", "radio", "file", "button"].includes(target.type);
    const area = target.tagName === "TEXTAREA" && (event.ctrlKey || event.metaKey);
    if (!oneLine && !area) return;
    event.preventDefault();
    if (!button.disabled && !button.hidden) button.click();
  });
}

function remembered(key, value) {
  // What the page keeps across a reload (the set shown, the prompt): localStorage where the browser allows it.
  try {
    if (value === undefined) return window.localStorage.getItem(`tistudio.${key}`) || "";
    window.localStorage.setItem(`tistudio.${key}`, value);
  } catch (e) { /* private mode: the page simply starts fresh */ }
  return value;
}

const NAME_RULE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;  // config.NAME_PATTERN: a set's or an embedding's name

function setProgress(id, fraction) {
  const bar = $(id);
  bar.hidden = fraction === null;
  if (fraction !== null) bar.firstElementChild.style.width = `${Math.round(Math.min(1, fraction) * 100)}%`;
}

// ---------------------------------------------------------------------------------------------------------------
// Forms generated from the option schema

function humanize(name) { return name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase()); }

function fieldError(field, message) {
  const error = new Error(`${field.label || humanize(field.name)}: ${message}`);
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
    label.htmlFor = id; label.textContent = (field.label || humanize(field.name)) + (field.required ? " *" : "");
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
  state.tab = name;
  for (const section of document.querySelectorAll("main section")) section.hidden = section.id !== name;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.tab === name);
  const load = { photos: loadSets, embeddings: loadEmbeddings, train: refreshTrainChoices, generate: loadGenerate }[name];
  if (load) load().catch((e) => { $("#busy").textContent = `server unreachable: ${e.message}`; });
}

async function refreshStatus() {
  let status;
  try {
    status = await api("GET", "/api/status");
  } catch (e) {
    state.offline = true;
    $("#busy").textContent = "the server does not answer; waiting for it to come back…";
    // the queue is what the server said last: say so, and take away buttons that cannot act now
    for (const item of document.querySelectorAll("#queue li")) {
      item.classList.add("stale");
      for (const button of item.querySelectorAll("button")) button.remove();
      if (!item.dataset.stale) { item.dataset.stale = "1"; item.append(" — last known; the server does not answer"); }
    }
    return;
  }
  if (state.offline) {  // it is back (perhaps restarted): show every tab as it is now
    state.offline = false;
    showTab(state.tab);
  }
  $("#model").textContent = `model: ${status.model.split(/[\\/]/).filter(Boolean).pop() || status.model}`;
  $("#demo-banner").hidden = !status.demo;
  const running = status.running || (status.busy ? [status.busy] : []);
  $("#busy").textContent = running.length ? `working${status.queued ? `, ${status.queued} waiting` : ""}` : "idle";
  await showQueue(running.length > 0 || status.queued > 0, (status.devices || []).length > 1);
}

function jobTitle(job) {
  const what = { train: "training", generate: "generating", prepare: "preparing", create: "creating" }[job.kind];
  const subject = job.kind === "generate" ? `“${(job.request.prompt || "").slice(0, 40)}”`
    : job.request.embedding || job.request.name || job.request.set || "";
  return `${what || job.kind} ${subject}`.trim();
}

async function showQueue(busy, manyDevices) {
  // The jobs running and waiting, each with its Stop or Cancel: nothing waits out of sight.
  const list = $("#queue");
  if (!busy) { list.hidden = true; list.innerHTML = ""; return; }
  let jobs;
  try { jobs = await loadJobs(); } catch (e) { return; }
  const open = jobs.filter((j) => TRAINING.includes(j.status)).sort((a, b) => a.created - b.created);
  list.hidden = open.length === 0;
  list.innerHTML = "";
  let place = 0;
  for (const job of open) {
    const item = document.createElement("li");
    const progress = job.progress && job.progress.total ? ` — step ${job.progress.step} of ${job.progress.total}` : "";
    const where = manyDevices && job.device ? ` on ${job.device}` : "";
    item.textContent = job.status === "running" ? `Running: ${jobTitle(job)}${where}${progress}`
      : `Waiting (${++place}): ${jobTitle(job)}`;
    const button = document.createElement("button");
    button.className = "secondary";
    button.textContent = job.status === "running" ? "Stop" : "Cancel";
    button.onclick = async () => {
      button.disabled = true;
      try { await api("POST", `/api/jobs/${job.id}/stop`); } catch (e) { item.append(` (${e.message})`); }
      refreshStatus();
      if (state.tab === "train" && fileRun.name) { await loadJobs(); bindTrain(fileRun.name); }
    };
    item.append(" ", button);
    list.append(item);
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
  $("#rename-set-button").hidden = $("#delete-set-button").hidden = state.sets.length === 0;
  // the set asked for, else the one shown (or shown before a reload), else one with photos (a prepared one first)
  const known = (name) => name && state.sets.some((s) => s.name === name);
  const likely = state.sets.find((s) => s.prepared) || state.sets.find((s) => s.photos > 0) || state.sets[0];
  state.set = [select, state.set, remembered("set")].find(known) || (likely ? likely.name : "");
  if (state.set) remembered("set", state.set);
  picker.value = state.set;
  if (state.set) await loadSet();
}

async function loadSet() {
  const set = await api("GET", `/api/photosets/${state.set}`);
  const grid = $("#photo-grid");
  grid.innerHTML = "";
  for (const photo of set.photos) {
    const figure = document.createElement("figure");
    figure.innerHTML = `<img alt="" loading="lazy"><figcaption></figcaption><input class="caption"
      placeholder="caption (Enter saves)"><button class="danger">Remove</button>`;
    figure.querySelector("img").src = `${photo.url}?thumb=264`;
    figure.querySelector("figcaption").textContent = photo.file;
    const caption = figure.querySelector("input.caption");
    caption.value = photo.caption || "";
    caption.setAttribute("aria-label", `caption of ${photo.file}`);
    const save = async () => {
      if (caption.value === (caption.dataset.saved ?? (photo.caption || ""))) return;
      try {
        const answer = await api("PUT", `${photo.url}/caption`, { text: caption.value });
        caption.value = answer.caption; caption.dataset.saved = answer.caption;
        caption.classList.remove("invalid"); caption.title = "saved";
      } catch (e) { caption.classList.add("invalid"); caption.title = e.message; showError("#upload-error", e); }
    };
    caption.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); save(); } });
    caption.addEventListener("change", save);
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
  const note = $("#upload-note");
  note.hidden = false;
  note.textContent = `Uploading ${files.length} file${files.length === 1 ? "" : "s"} to ${state.set}…`;
  $("#dropzone").classList.add("busy");
  try {
    const answer = await api("POST", `/api/photosets/${state.set}/photos`, data);
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
    const added = plural(answer.photos, "photo") + (answer.captions ? ` and ${plural(answer.captions, "caption")}` : "");
    note.textContent = `Added ${added}.` + (answer.captions ? " Captions are used when Prepare's “Existing " +
      "captions” copies, prepends or appends them; with “ignore” they stay unused." : "");
    if (answer.refused && answer.refused.length) {
      const which = answer.refused.map((r) => `${r.file}: ${r.reason}`).join("; ");
      note.hidden = true;
      showError("#upload-error", new Error(`Added ${added}. Not added: ${which}`));
    }
  } catch (e) {
    note.hidden = true;
    showError("#upload-error", e);
  } finally {
    $("#dropzone").classList.remove("busy");
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
      const shape = item.bucket ? `${item.bucket[0]}×${item.bucket[1]}, ` : "";  // its aspect-ratio bucket
      figure.querySelector("figcaption").textContent = `${item.source}: ${shape}${face}, sharpness ` +
        `${Math.round(item.sharpness)}` + (item.notes.length ? ` — ${item.notes.join("; ")}` : "");
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
  $("#set-select").onchange = (e) => {
    state.set = remembered("set", e.target.value);
    showError("#upload-error", null);  // a message about another set's upload does not belong here
    loadSet();
  };
  $("#new-set-button").onclick = () => {
    showError("#set-error", null);
    const name = $("#new-set").value.trim();
    if (!name) {
      showError("#set-error", new Error("Give the set a name first, e.g. tomtut."));
      return null;
    }
    if (!NAME_RULE.test(name)) {
      showError("#set-error", new Error("A set's name is one word of letters, digits, '_' or '-' (at most 64 " +
        "characters, starting with a letter or digit), e.g. tomtut."));
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
  zone.onkeydown = (e) => {  // the drop zone is a button for the keyboard: Enter or Space opens the file chooser
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("#file-input").click(); }
  };
  $("#choose-files").onclick = (e) => { e.preventDefault(); $("#file-input").click(); };
  $("#rename-set-button").onclick = async () => {
    showError("#set-error", null);
    const to = window.prompt(`Rename the photo set ${state.set} to:`, state.set);
    if (!to || to === state.set) return;
    try {
      const answer = await api("POST", `/api/photosets/${state.set}/rename`, { to: to.trim() });
      await loadSets(remembered("set", answer.name));
    } catch (e) { showError("#set-error", e); }
  };
  $("#delete-set-button").onclick = async () => {
    showError("#set-error", null);
    if (!window.confirm(`Delete the photo set ${state.set} and its prepared set? Embeddings trained on it stay.`)) {
      return;
    }
    try {
      await api("DELETE", `/api/photosets/${state.set}`);
      state.set = ""; remembered("set", "");
      await loadSets();
    } catch (e) { showError("#set-error", e); }
  };
  submitOnEnter($("#new-set"), $("#new-set-button"));
  zone.ondragover = (e) => { e.preventDefault(); zone.classList.add("over"); };
  zone.ondragleave = () => zone.classList.remove("over");
  zone.ondrop = (e) => { e.preventDefault(); zone.classList.remove("over"); upload(e.dataTransfer.files); };
  $("#file-input").onchange = (e) => {
    const files = [...e.target.files];  // the live list empties when the input is cleared for the next choice
    e.target.value = "";
    upload(files);
  };
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
    // each cell names its column, which a phone-width page shows beside it once the cells stack (style.css)
    $("#embedding-table thead tr").querySelectorAll("th").forEach((th, i) => { cells[i].dataset.label = th.textContent; });
    cells[0].textContent = item.name;
    cells[1].textContent = item.error ? "-" : `${item.vectors} × ${item.width}` + (item.lora
      ? ` + LoRA rank ${item.lora.rank}${item.lora.present ? "" : " (its file is missing)"}` : "");
    cells[2].textContent = item.error ? "-" : item.step;
    cells[3].textContent = item.error || item.fits;
    cells[4].textContent = item.ti_hash || "";
    const actions = [["Inspect", "secondary", () => inspect(item.name)],
      ["Download", "secondary", () => { window.location = `/api/embeddings/${item.name}/file`; }],
      ...(item.lora && item.lora.present ? [["Download LoRA", "secondary",
        () => { window.location = `/api/loras/${item.lora.name}/file`; }]] : []),
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
  details.innerHTML = "<h3></h3><table><tbody></tbody></table>";
  details.querySelector("h3").textContent = `About ${name}`;
  const body = details.querySelector("tbody");
  for (const [key, value] of Object.entries(info)) {
    if (value === null || value === "" || (typeof value === "object" && !Object.keys(value).length)) continue;
    const row = document.createElement("tr");
    row.innerHTML = "<th></th><td></td>";
    row.firstChild.textContent = humanize(key);
    row.lastChild.textContent = typeof value === "object" ? Object.entries(value).map(([k, v]) =>
      `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join("; ") : String(value);
    body.append(row);
  }
}

function setupEmbeddings() {
  createForm = renderForm($("#create-form"), state.schema.create);
  submitOnEnter($("#create-form"), $("#create-button"));
  submitOnEnter($("#embedding-upload-name"), $("#embedding-upload-button"));
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
//
// The tab shows one embedding's run: what its files say (loss, fixed-batch evaluations, previews, saved copies:
// /api/runs/NAME), merged with what the job training it streams now (state.live), and the job bound to it - the
// running or queued one (Stop, Cancel), else the latest (its end in words, and Resume where it can go on). All of
// it comes from the server, so a reload, a second tab or a restarted server show the same.

let trainForm = null;
const TRAINING = ["running", "queued"];
const fileRun = { name: "", loss: [], eval: [], previews: [], copies: [], kept: null, report: null };

function trainJobs(name) {
  return state.jobs.filter((j) => j.kind === "train" && (name === undefined || j.request.embedding === name));
}

async function loadJobs() {
  state.jobs = await api("GET", "/api/jobs");
  return state.jobs;
}

async function refreshTrainChoices() {
  const [embeddings, sets] = await Promise.all([api("GET", "/api/embeddings"), api("GET", "/api/photosets"),
    loadJobs()]);
  state.embeddings = embeddings; state.sets = sets;
  const names = embeddings.filter((e) => !e.error).map((e) => e.name);
  const setNames = sets.map((s) => s.name);
  const trains = trainJobs();
  const active = trains.find((j) => j.status === "running") || trains.find((j) => j.status === "queued");
  const keep = trainForm ? trainForm.values(false) : null;
  // an embedding's Train button, else what this page showed, else what trains now, else the last trained
  const trained = trains.find((j) => j.started);
  const chosen = [state.trainEmbedding, keep && keep.embedding, active && active.request.embedding,
    trained && trained.request.embedding, names[0]].find((n) => n && names.includes(n)) || "";
  state.trainEmbedding = null;
  trainForm = renderForm($("#train-form"), [{ name: "set", label: "Photo set", type: "str", default: "",
    required: true, help: "the photo set to train on (prepared if you prepared it)",
    choices: setNames.length ? setNames : [""] }, ...state.schema.train], {
    embedding: { choices: names.length ? names : [""], value: chosen },
  });
  if (keep && keep.embedding === chosen) {
    for (const [key, value] of Object.entries(keep)) if (key !== "embedding") trainForm.set(key, value);
  } else {
    fillFromLastRun(chosen);
  }
  trainForm.inputs.continue_from.input.addEventListener("change", showStartHint);
  trainForm.inputs.embedding.input.onchange = () => {
    const name = trainForm.values(false).embedding;
    fillFromLastRun(name);
    showRun(name);
  };
  state.trainReady = names.length > 0 && setNames.length > 0;
  showError("#train-error", state.trainReady ? null : new Error(!names.length
    ? "Create an embedding first (2 · Embeddings)." : "Add a photo set first (1 · Photos)."));
  await showRun(chosen);
}

function fillFromLastRun(name) {
  // The form shows what the embedding's latest training used (its set, steps and options), so that Start and
  // Resume go on with the same; an embedding never trained gets the set of its name, if there is one.
  const job = trainJobs(name)[0];
  if (job) {
    // where to continue from is chosen each time: a branch from the kept step is never repeated unasked
    for (const [key, value] of Object.entries(job.request)) {
      if (key !== "embedding" && key !== "continue_from") trainForm.set(key, value);
    }
  } else if (state.sets.some((s) => s.name === name && s.photos > 0)) {
    trainForm.set("set", name);
  } else {  // never an empty set: a prepared one, else one with photos
    const likely = state.sets.find((s) => s.prepared) || state.sets.find((s) => s.photos > 0);
    if (likely) trainForm.set("set", likely.name);
  }
}

async function showRun(name) {
  await loadRun(name);
  const active = trainJobs(name).find((j) => TRAINING.includes(j.status));
  if (active && (!state.live || state.live.job.id !== active.id)) follow(active);
  bindTrain(name);
}

async function loadRun(name) {
  Object.assign(fileRun, { name, loss: [], eval: [], previews: [], copies: [], kept: null, report: null,
    resolved: null });
  if (name) {
    try {
      const run = await api("GET", `/api/runs/${name}`);
      Object.assign(fileRun, { loss: run.loss.map((r) => [r.step, r.loss]), eval: run.eval || [],
        previews: run.previews, copies: run.copies, kept: run.kept, report: run.report, resolved: run.resolved });
    } catch (e) {
      if (!/does not exist/.test(e.message)) showError("#train-error", e);
    }
  }
  drawLoss();
  drawTimeline();
}

function shownRun() {
  // The files' run with the live job's steps over it: a job's stream starts at the step it continues from, and
  // what the files hold past that step belongs to an earlier sitting.
  const live = state.live && state.live.name === fileRun.name ? state.live : null;
  if (!live) return { ...fileRun, training: false };
  const upTo = (step) => live.from === null || step <= live.from;
  const loss = new Map(fileRun.loss.filter(([s]) => upTo(s)));
  for (const [step, value] of live.loss) loss.set(step, value);
  const evals = new Map(fileRun.eval.filter((r) => upTo(r.step)).map((r) => [r.step, r]));
  for (const [step, row] of live.eval) evals.set(step, row);
  const previews = new Map(fileRun.previews.filter((p) => upTo(p.step)).map((p) => [p.step, p.url]));
  for (const [step, url] of live.previews) previews.set(step, url);
  const byStep = (a, b) => a[0] - b[0];
  return { ...fileRun, training: true, loss: [...loss].sort(byStep),
    eval: [...evals.values()].sort((a, b) => a.step - b.step),
    previews: [...previews].sort(byStep).map(([step, url]) => ({ step, url })) };
}

function bindTrain(name) {
  // The buttons and the status line belong to this embedding's job: the one training it now, else its latest.
  const jobs = trainJobs(name);
  const active = jobs.find((j) => TRAINING.includes(j.status));
  const latest = jobs[0];
  const other = trainJobs().find((j) => TRAINING.includes(j.status) && j.request.embedding !== name);
  state.bound = active || null;
  $("#train-button").disabled = Boolean(active) || !state.trainReady;
  $("#train-button").textContent = other ? "Queue training" : "Start training";
  $("#stop-button").hidden = !active;
  $("#stop-button").textContent = active && active.status === "queued" ? "Cancel" : "Stop and save";
  const trained = fileRun.kept ? fileRun.kept.last_step : 0;
  const last = latest ? Number(latest.request.max_steps) || 0 : 0;
  state.resumeJob = !active && latest && ["stopped", "interrupted", "failed"].includes(latest.status) &&
    trained < last ? latest : null;
  $("#resume-button").hidden = !state.resumeJob;
  if (state.resumeJob) $("#resume-button").textContent = `Resume from step ${trained} of ${last}`;
  showStartHint();
  if (active && active.status === "queued") {
    $("#train-status").textContent = `${name} waits for its turn` + (other && other.status === "running"
      ? ` (${other.request.embedding} is training now)` : "") + "; Cancel takes it out of the queue.";
  } else if (!active) {
    $("#train-status").textContent = [jobSummary(latest, trained),
      other ? `${other.request.embedding} is training now; a start here waits for it.` : ""].filter(Boolean).join(" ");
  }
  // a run that failed, was interrupted or was stopped by the workspace cap needs the user: the error colour, not grey
  $("#train-status").classList.toggle("error", !active && Boolean(latest) && (["failed", "interrupted"]
    .includes(latest.status) || Boolean(latest.result && latest.result.stopped_because)));
  if (!active) setProgress("#train-progress", null);
  drawTimeline();
}

function showStartHint() {
  // Called when the job bound to the tab or the run's kept step changes (a "Use this step" reloads the latter).
  const kept = fileRun.kept, trained = kept ? kept.last_step : 0;
  const last = state.resumeJob ? Number(state.resumeJob.request.max_steps) || 0 : 0;
  $("#train-hint").textContent = state.bound ? "" : startHint(kept, trained, last);
  $("#train-hint").hidden = !$("#train-hint").textContent;
}

function startHint(kept, trained, last) {
  // What Start will do, said before it does it: where it continues from, and what happens to a chosen step.
  const parts = [];
  if (state.resumeJob) {
    parts.push(`Resume runs the interrupted training again with its own settings, to step ${last}; Start training ` +
      "uses the settings above.");
  }
  const from = trainForm ? trainForm.values(false).continue_from : "last";
  if (kept && trained > kept.step && from === "kept") {
    parts.push(`Start training continues from step ${kept.step}, the step the embedding holds, with a fresh ` +
      `optimizer; what the run saved after it (steps ${kept.step + 1}–${trained}) is moved into the run folder's ` +
      `after-${kept.step}-… folder first (named for the time).`);
  } else if (kept && trained > kept.step) {
    parts.push(`Start training continues from step ${trained}, the last step trained, not from step ${kept.step} ` +
      `that ${kept.by.startsWith("you") ? "you chose" : "the run kept"}; step ${kept.step} stays the embedding until ` +
      "the run ends, when the step it keeps replaces it (it stays in the run folder as its copy). To go on from " +
      `step ${kept.step} instead, set Continue from to kept.`);
  } else if (trained > 0) {
    parts.push(`Start training continues from step ${trained}, where the embedding's training stopped.`);
  }
  return parts.join(" ");
}

function jobSummary(job, trained) {
  if (!job) return "";
  const name = job.request.embedding, last = job.request.max_steps;
  const at = (job.result && job.result.step) || (job.progress && job.progress.step) || trained;
  const more = trained < last ? ` Resume continues from step ${trained}, the last save.` : "";
  switch (job.status) {
    case "done": return (job.result && job.result.message) || `Trained ${name} to step ${at}.`;
    case "stopped": return (job.result && job.result.stopped_because ? `${job.result.stopped_because} ` : "") +
      `Stopped at step ${at} of ${last}; everything up to it is saved.${more}`;
    case "interrupted": return `The training of ${name} was interrupted at step ${at} of ${last}: ${job.error}.${more}`;
    case "failed": return `The training of ${name} failed: ${job.error}`;
    case "cancelled": return `The training of ${name} was cancelled while it waited; it never started.`;
    default: return "";
  }
}

function drawLoss() {
  const run = shownRun();
  const chart = $("#loss-chart");
  const points = run.loss.filter(([, loss]) => Number.isFinite(loss));
  if (points.length < 2) {
    chart.innerHTML = `<p class='empty'>${run.training ? "Training has started; the loss appears after its first " +
      "steps." : "No training yet for this embedding."}</p>`;
    drawKept(run);
    return;
  }
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
    ${line(values, "#9ecae1", 1)}${line(smooth, "#08519c", 2)}${evaluationMarks(run, x, y, s0, s1, v0, v1, height)}</svg>
    <p class="legend"><span class="key" style="background:#9ecae1"></span>each step's loss
      <span class="key" style="background:#08519c"></span>its running mean${run.eval.length
      ? "<span class='key' style='background:#e6550d'></span>the fixed-batch loss" : ""}${
      run.eval.some((r) => r.likeness !== null) ? "<span class='key' style='background:#31a354'></span>the " +
      "likeness (right axis, 0–100%)" : ""}</p>
    <p class="muted">${points.length} steps, last loss ${values[values.length - 1].toFixed(4)}</p>`;
  drawKept(run);
}

// The evaluations on the loss chart: the fixed-batch loss (same axis, clipped to it), the likeness (right axis)
// and the kept step.
function evaluationMarks(run, x, y, s0, s1, v0, v1, height) {
  const rows = run.eval.filter((r) => r.step >= s0 && r.step <= s1);
  const clip = (v) => Math.min(v1, Math.max(v0, v));
  const evalLine = rows.length > 1 ? `<polyline fill="none" stroke="#e6550d" stroke-width="2" points="${
    rows.map((r) => `${x(r.step).toFixed(1)},${y(clip(r.loss)).toFixed(1)}`).join(" ")}"/>` : "";
  const liked = rows.filter((r) => r.likeness !== null && r.likeness !== undefined);
  const ly = (v) => 10 + (1 - v) * (height - 40);
  const likeLine = liked.length ? `<polyline fill="none" stroke="#31a354" stroke-width="2" stroke-dasharray="5 3"
    points="${liked.map((r) => `${x(r.step).toFixed(1)},${ly(r.likeness).toFixed(1)}`).join(" ")}"/>` +
    liked.map((r) => `<circle cx="${x(r.step).toFixed(1)}" cy="${ly(r.likeness).toFixed(1)}" r="3"
      fill="#31a354"><title>step ${r.step}: likeness ${(100 * r.likeness).toFixed(0)}%</title></circle>`).join("")
    : "";
  const kept = run.training ? null : run.kept;
  const keptMark = kept && kept.step >= s0 && kept.step <= s1 && kept.step !== kept.last_step
    ? `<line x1="${x(kept.step)}" x2="${x(kept.step)}" y1="10" y2="${height - 30}" stroke="#756bb1"
        stroke-dasharray="3 3"/><text x="${x(kept.step) + 4}" y="22" font-size="11" fill="#756bb1">kept</text>` : "";
  return evalLine + likeLine + keptMark;
}

function drawKept(run) {
  showStartHint();
  const kept = run.kept, note = $("#kept-step");
  if (!kept || run.training || !run.loss.length) { note.hidden = true; return; }
  const best = kept.step !== kept.last_step;
  const liked = run.eval.find((r) => r.step === kept.step && r.likeness !== null);
  const faces = (run.resolved || {}).likeness === "face identity";
  note.hidden = false;
  note.textContent = (best ? `The embedding keeps step ${kept.step}, chosen by ${kept.by}` +
    (liked ? (faces ? ` (face identity ${(100 * liked.likeness).toFixed(0)}% of the training photos'; 50% is ` +
      "dlib's same-person line)" : ` (likeness ${(100 * liked.likeness).toFixed(0)}%)`) : "") +
    `; the last step, ${kept.last_step}, is ` +
    "kept beside it." : `The embedding holds step ${kept.step}, the last step trained.`);
  const judged = String((run.resolved || {}).likeness || "");
  const why = judged.startsWith("none:") && judged.match(/\((.*)\)$/);
  if (why) note.textContent += ` Pictures were not judged by likeness: ${why[1]}.`;  // not only in the server's log
  if (run.report) {
    const link = document.createElement("a");
    link.href = run.report;
    link.target = "_blank";
    link.rel = "noopener";
    link.textContent = "Open the run's report";
    note.append(" ", link);  // the space before the link, not underlined as part of it
  }
}

function drawTimeline() {
  // The previews of the shown run; "Use this step" where a copy was saved and the run is not training.
  const run = shownRun();
  const timeline = $("#preview-timeline");
  const drawn = [...timeline.children].map((f) => `${f.dataset.step}:${f.dataset.url}:${f.dataset.use}`).join(" ");
  const wanted = run.previews.map((p) => `${p.step}:${p.url}:${!run.training && run.copies.includes(p.step)}`);
  if (drawn === wanted.join(" ")) return;  // unchanged: keep the images as they are
  timeline.innerHTML = "";
  $("#previews-empty").hidden = run.previews.length > 0;
  for (const preview of run.previews) {
    const figure = document.createElement("figure");
    const usable = !run.training && run.copies.includes(preview.step);
    Object.assign(figure.dataset, { step: preview.step, url: preview.url, use: usable });
    figure.innerHTML = `<img alt="step ${preview.step}"><figcaption>step ${preview.step}</figcaption>`;
    figure.querySelector("img").src = preview.url;
    for (const [index, url] of (preview.more || []).entries()) {  // the further preview prompts' pictures
      const extra = document.createElement("img");
      extra.className = "more"; extra.src = url; extra.alt = `step ${preview.step}, preview prompt ${index + 2}`;
      figure.querySelector("figcaption").before(extra);
    }
    if (usable) {
      const button = document.createElement("button");
      button.textContent = "Use this step";
      button.onclick = () => useStep(run.name, preview.step);
      figure.append(button);
    }
    timeline.append(figure);
  }
}

async function useStep(name, step) {
  showError("#use-step-error", null);
  try {
    await api("POST", `/api/runs/${name}/use-step`, { step });
    await loadRun(name);
    $("#train-status").textContent = `${name} is now the embedding saved at step ${step}.`;
  } catch (e) { showError("#use-step-error", e); }
}

function follow(job) {
  // Watch a training job; its steps, evaluations and previews go to state.live and show while its run is shown.
  const name = job.request.embedding;
  const live = { job, name, from: null, loss: new Map(), eval: new Map(), previews: new Map() };
  state.live = live;
  const shown = () => state.live === live && fileRun.name === name;
  const running = () => {
    if (job.status !== "queued") return;
    job.status = "running";
    if (shown()) bindTrain(name);
  };
  const say = (text) => { running(); if (shown()) $("#train-status").textContent = text; };
  watchJob(job, {
    message: (e) => say(e.text),
    encode: (e) => {
      live.from = e.step;
      say(e.text || "encoding images");
      if (shown()) { drawLoss(); drawTimeline(); }
    },
    progress: (e) => {
      live.loss.set(e.step, e.loss);
      const eta = e.eta_s ? `, ${Math.round(e.eta_s)} s left` : "";
      say(`step ${e.step} of ${e.total}, loss ${e.loss === null ? "…" : e.loss.toFixed(4)}, lr ${
        e.lr.toPrecision(2)}${eta}`);
      if (shown()) {
        setProgress("#train-progress", e.step / e.total);
        if (e.step % 5 === 0 || e.step === e.total) drawLoss();
      }
    },
    eval: (e) => { live.eval.set(e.step, { step: e.step, loss: e.loss, likeness: e.likeness }); },
    preview: (e) => { running(); live.previews.set(e.step, e.url); if (shown()) drawTimeline(); },
    offline: (down) => { if (shown() && down) $("#train-status").textContent = "the server does not answer; " +
      "waiting for it to come back…"; },
  }).then(async (done) => {
    if (state.live === live) state.live = null;
    try { await loadJobs(); } catch (e) { /* the server went away again: the next look will tell */ }
    if (fileRun.name === name) {
      await loadRun(name);
      if (done.status === "failed") showError("#train-error", new Error(done.error));
    }
    bindTrain(fileRun.name);
  });
  bindTrain(fileRun.name);
}

// Training presets: the Train form's settings (all but the embedding and the set) under a name, kept in this
// browser (localStorage), as A1111 and kohya_ss GUI users keep theirs.
function presets() {
  try { return JSON.parse(remembered("presets") || "{}"); } catch (e) { return {}; }
}

function showPresets(selected = "") {
  const picker = $("#preset-select");
  picker.innerHTML = "<option value=''>(none)</option>";
  for (const name of Object.keys(presets()).sort()) {
    const option = document.createElement("option");
    option.value = name; option.textContent = name; picker.append(option);
  }
  picker.value = selected;
  $("#preset-delete").hidden = !selected;
}

function setupPresets() {
  showPresets();
  $("#preset-save").onclick = () => {
    const name = (window.prompt("Save these training settings as the preset:", $("#preset-select").value) || "").trim();
    if (!name) return;
    const values = trainForm.values(false);
    delete values.embedding; delete values.set;
    remembered("presets", JSON.stringify({ ...presets(), [name.slice(0, 64)]: values }));
    showPresets(name.slice(0, 64));
  };
  $("#preset-select").onchange = (e) => {
    const chosen = presets()[e.target.value];
    if (chosen) for (const [key, value] of Object.entries(chosen)) if (trainForm.inputs[key]) trainForm.set(key, value);
    $("#preset-delete").hidden = !e.target.value;
  };
  $("#preset-delete").onclick = () => {
    const all = presets();
    delete all[$("#preset-select").value];
    remembered("presets", JSON.stringify(all));
    showPresets();
  };
}

function setupTrain() {
  setupPresets();
  submitOnEnter($("#train-form"), $("#train-button"));
  $("#train-button").onclick = async () => {
    showError("#train-error", null); trainForm.mark(null);
    try {
      const values = trainForm.values();
      const job = await api("POST", "/api/train", values);
      state.jobs.unshift(job);
      trainForm.set("continue_from", "last");  // a branch from the kept step is taken once, never again unasked
      if (fileRun.name !== values.embedding) await loadRun(values.embedding);
      follow(job);
    } catch (e) { showError("#train-error", e); trainForm.mark(e); }
  };
  $("#stop-button").onclick = async () => {
    const job = state.bound;
    if (!job) return;
    try {
      await api("POST", `/api/jobs/${job.id}/stop`);
      if (job.status === "running") $("#train-status").textContent = "stopping after this step and saving…";
    } catch (e) { showError("#train-error", e); }
  };
  $("#resume-button").onclick = async () => {
    showError("#train-error", null);
    if (!state.resumeJob) return;
    try {
      const job = await api("POST", `/api/jobs/${state.resumeJob.id}/resume`);
      state.jobs.unshift(job);
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
  const link = document.createElement("a");
  link.href = item.url; link.download = item.url.split("/").pop(); link.textContent = "Download";
  link.className = "button secondary";
  figure.querySelector(".row").append(link);
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

async function loadGenerate() {
  await Promise.all([loadGallery(), api("GET", "/api/embeddings").then((list) => { state.embeddings = list; })]);
  showPromptWords();
}

function editDistance(a, b) {
  let row = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    const next = [i];
    for (let j = 1; j <= b.length; j++) {
      next[j] = Math.min(row[j] + 1, next[j - 1] + 1, row[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    row = next;
  }
  return row[b.length];
}

function promptWords(text) {
  // Which words of a prompt are embeddings (as the generator finds them: a file's name as a word, any case), and
  // which look like a misspelt one.
  const names = state.embeddings.filter((e) => !e.error);
  const byName = new Map(names.map((e) => [e.name.toLowerCase(), e]));
  const used = new Map(), nearly = new Map();
  for (const word of (text || "").match(/[A-Za-z0-9][A-Za-z0-9_-]*/g) || []) {
    const lower = word.toLowerCase();
    if (byName.has(lower)) { used.set(lower, byName.get(lower)); continue; }
    if (lower.length < 4) continue;
    const close = names.find((e) => editDistance(lower, e.name.toLowerCase()) <= (lower.length >= 8 ? 2 : 1));
    if (close) nearly.set(word, close.name);
  }
  return { used: [...used.values()], nearly, any: names.length > 0 };
}

function showPromptWords() {
  const note = $("#prompt-words");
  if (!generateForm) return;
  const values = generateForm.values(false);
  const { used, nearly, any } = promptWords(`${values.prompt} ${values.negative_prompt || ""}`);
  const parts = [];
  if (used.length) parts.push(`Embeddings in this prompt: ${used.map((e) => `${e.name} (step ${e.step})`).join(", ")}.`);
  for (const [word, name] of nearly) parts.push(`“${word}” is not an embedding; did you mean ${name}?`);
  if (!used.length && !nearly.size && values.prompt.trim()) {
    parts.push(any ? `No embedding in this prompt; yours: ${state.embeddings.filter((e) => !e.error)
      .map((e) => e.name).join(", ")}.` : "No embeddings yet: create and train one first (2 · Embeddings).");
  }
  note.textContent = parts.join(" ");
  note.hidden = parts.length === 0;
  note.classList.toggle("warning", nearly.size > 0 || (!used.length && any));
}

async function loadGallery() {
  const items = await api("GET", "/api/outputs?limit=60");
  $("#gallery").innerHTML = "";
  for (const item of items) addImage(item, false);
  $("#gallery-empty").hidden = items.length > 0;
}

function setupGenerate() {
  generateForm = renderForm($("#generate-form"), state.schema.generate);
  for (const name of ["prompt", "negative_prompt"]) {
    const input = generateForm.inputs[name] && generateForm.inputs[name].input;
    if (!input) continue;
    if (remembered(name)) input.value = remembered(name);  // a reload keeps what was written
    input.addEventListener("input", () => { remembered(name, input.value); showPromptWords(); });
  }
  submitOnEnter($("#generate-form"), $("#generate-button"));
  const promptField = generateForm.inputs.prompt && generateForm.inputs.prompt.input.closest(".field");
  if (promptField) promptField.append($("#prompt-words"));
  $("#generate-button").onclick = async () => {
    showError("#generate-error", null); generateForm.mark(null); $("#generate-note").hidden = true;
    $("#generate-button").disabled = true;
    try {
      const job = await api("POST", "/api/generate", generateForm.values());
      setProgress("#generate-progress", 0);
      const done = await watchJob(job, { progress: (e) => setProgress("#generate-progress", e.step / e.total) });
      if (done.status === "cancelled" || done.status === "stopped") {
        const kept = (done.result && done.result.images) || [];
        for (const image of kept.slice().reverse()) addImage(image, true);
        $("#generate-note").hidden = false;  // the user's own choice: a note, not an error
        $("#generate-note").textContent = done.status === "cancelled" ? "Cancelled before it started."
          : `Stopped; ${kept.length} finished image${kept.length === 1 ? " was" : "s were"} kept.`;
      } else if (done.status !== "done") {
        throw new Error(done.error || `generation ${done.status}`);
      } else {
        for (const image of done.result.images.slice().reverse()) addImage(image, true);
        if (done.result.images.length > 1) {  // the whole batch in one file
          const names = done.result.images.map((image) => image.url.split("/").pop()).join(",");
          const note = $("#generate-note");
          note.hidden = false;
          note.innerHTML = `${done.result.images.length} pictures. <a download href="/api/outputs.zip?files=${
            encodeURIComponent(names)}">Download them all (zip)</a>`;
        }
      }
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
