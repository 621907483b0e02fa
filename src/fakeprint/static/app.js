// fakeprint web page: pick or drop images, POST them to /v1/predict?cam=1, show label, bars and heat map.
"use strict";

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const state = { model: null, queue: [], active: 0, done: 0, failed: 0, totalMs: 0 };
  const PARALLEL = 2;

  const displayName = (cls) => (/^\d+$/.test(cls) ? `Generator ${cls}` : cls);
  const pct = (p) => `${(p * 100).toFixed(p >= 0.995 || p < 0.0005 ? 0 : 1)}%`;
  // why an answer is flagged uncertain (the API's uncertain_reasons): a short label and a tooltip each
  const REASON_SHORT = { low_confidence: "low confidence", flat_image: "flat image", far_from_training: "unlike training images" };
  const REASON_TEXT = {
    low_confidence: "below the confidence its calibration on held-out images trusts",
    flat_image: "one flat colour: no generator's output",
    far_from_training: "its image statistics are far from every training image's",
  };

  function el(tag, props = {}, text) {
    const node = document.createElement(tag);
    Object.assign(node, props);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Every API call: the API token (when the service needs one, asked for once and kept for this tab), and a
  // polite retry when the upload queue is full (503 with Retry-After).
  async function api(url, opts = {}, tries = 3) {
    const token = sessionStorage.getItem("fakeprint-token");
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const res = await fetch(url, { ...opts, headers });
    if (res.status === 401 && tries > 0) {
      const given = window.prompt("This service needs an API token (ask whoever runs it):");
      if (!given) return res;
      sessionStorage.setItem("fakeprint-token", given.trim());
      return api(url, opts, tries - 1);
    }
    if (res.status === 503 && tries > 0 && res.headers.get("Retry-After")) {
      const wait = Math.min(10, Number(res.headers.get("Retry-After")) || 1);
      await new Promise((r) => setTimeout(r, wait * 1000));
      return api(url, opts, tries - 1);
    }
    return res;
  }

  async function loadModel() {
    const box = $("#model");
    try {
      const res = await api("/v1/model");
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const m = await res.json();
      state.model = m;
      box.replaceChildren();
      box.append(el("span", { className: "chip strong" }, m.name));
      box.append(el("span", { className: "chip" }, `${m.backend} backend`));
      const h = m.held_out;
      if (m.members) {  // an ensemble: its own figure is not stored; each member's is, and says so
        const chip = el("span", { className: "chip" }, `ensemble of ${m.members.length}: mean probabilities`);
        chip.title = m.members.map((x) => {
          const a = x.held_out && typeof x.held_out.accuracy === "number"
            ? `${(x.held_out.accuracy * 100).toFixed(1)}% alone (${x.held_out.split})` : "no held-out figure";
          return `${x.name}: ${a}`;
        }).join("\n");
        box.append(chip);
      } else if (h && typeof h.accuracy === "number") {
        const chip = el("span", { className: "chip" }, `held-out accuracy ${(h.accuracy * 100).toFixed(1)}%`);
        chip.title = `${h.split}; ${h.how}; ${h.selection}; test-time augmentation ${h.tta}`;
        box.append(chip);
      } else {
        box.append(el("span", { className: "chip" }, "no held-out accuracy recorded"));
      }
      if (m.tta && m.tta !== "none") box.append(el("span", { className: "chip" }, `TTA: ${m.tta}`));
      box.append(el("span", { className: "chip" }, `${m.num_classes} classes`));
      if (!m.gradcam.available) {
        document.body.classList.add("no-cam");
        $(".controls .switch").title = $(".controls .slider").title =
          m.gradcam.note || "Grad-CAM is not available for this model";
        $("#cam-toggle").disabled = $("#cam-opacity").disabled = true;
      }
      const mb = (m.limits.max_file_bytes / 1048576).toFixed(0);
      $("#drop-hint").textContent =
        `PNG, JPEG, WebP, BMP, GIF or TIFF \u00b7 up to ${mb} MB each \u00b7 classified at ` +
        `${m.input_size.width}\u00d7${m.input_size.height}`;
    } catch (err) {
      box.replaceChildren(el("span", { className: "chip bad" }, `model unavailable (${err.message})`));
    }
  }

  function makeCard(file, before) {
    const card = $("#card-template").content.firstElementChild.cloneNode(true);
    const url = URL.createObjectURL(file);
    const photo = $(".photo", card);
    photo.addEventListener("error", () => card.classList.add("no-preview"), { once: true });
    photo.src = url;
    photo.alt = file.name;
    $(".under", card).src = url;
    $(".filename", card).textContent = file.name;
    $(".filename", card).title = file.name;
    card.dataset.filename = file.name;
    $("#results").insertBefore(card, before);
    return card;
  }

  function showError(card, message) {
    card.classList.remove("pending");
    card.classList.add("failed");
    $(".eyebrow", card).textContent = "Could not classify";
    $(".label-text", card).textContent = "Not classified";
    const p = $(".error", card);
    p.textContent = message;
    p.hidden = false;
    state.failed += 1;
  }

  function showResult(card, r) {
    card.classList.remove("pending");
    card.classList.add("done");
    card.dataset.label = r.label;
    $(".label-text", card).textContent = displayName(r.label);
    $(".confidence", card).textContent = pct(r.confidence) + (r.uncertain ? " \u00b7 uncertain" : "");
    if (r.uncertain) {
      card.classList.add("uncertain");
      const why = Array.isArray(r.uncertain_reasons) && r.uncertain_reasons.length ? r.uncertain_reasons
        : ["low_confidence"];
      $(".confidence", card).title = why.map((w) => REASON_TEXT[w] || w).join("; ");
      if (Array.isArray(r.uncertain_reasons)) {
        $(".confidence", card).textContent += " (" + why.map((w) => REASON_SHORT[w] || w).join(", ") + ")";
      }
    }
    const route = state.model && state.model.route;
    if (typeof r.file_perturbed === "number" && route) {  // a routed model: which kind of file, so which member
      const perturbed = r.file_perturbed >= route.threshold;
      const note = el("p", { className: perturbed ? "route perturbed" : "route" },
        perturbed ? `file looks re-saved, resized or edited (${pct(r.file_perturbed)}): answered by ${route.perturbed}`
                  : `file looks as its generator wrote it (${pct(1 - r.file_perturbed)}): answered by ${route.pristine}`);
      note.title = `A file detector gives ${pct(r.file_perturbed)} that this file was re-encoded, resized, ` +
        `cropped or blurred; from ${pct(route.threshold)} the model trained on such files answers.`;
      $(".meta", card).after(note);
    }
    const bars = $(".bars", card);
    bars.replaceChildren();
    for (const [cls, p] of Object.entries(r.probabilities)) {
      const li = el("li", { className: cls === r.label ? "bar top" : "bar" });
      li.dataset.class = cls;
      li.setAttribute("aria-label", `${displayName(cls)}: ${pct(p)}`);
      li.append(el("span", { className: "bar-name" }, displayName(cls)));
      const track = el("span", { className: "bar-track" });
      const fill = el("span", { className: "bar-fill" });
      fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
      track.append(fill);
      li.append(track, el("span", { className: "bar-value" }, pct(p)));
      bars.append(li);
    }
    $(".timing", card).textContent = `${r.time_ms.toFixed(1)} ms`;
    if (r.resized_from) {  // the model reads 100x100: say that this image was resized (and blurred) to fit
      const note = el("p", { className: "resized" },
        `resized from ${r.resized_from[0]}\u00d7${r.resized_from[1]} to 100\u00d7100: less reliable`);
      note.title = "The model reads 100x100 images; resizing blurs the generator traces it looks for.";
      $(".meta", card).after(note);
    }
    const camFrame = $(".cam-frame", card);
    if (r.cam && !r.cam.empty) {
      const heat = $(".heat", card);
      heat.src = r.cam.png;
      heat.alt = `Grad-CAM heat map for ${displayName(r.cam.target)}`;
      const who = r.cam.member ? ` of ${r.cam.member}, the member that answered` : "";
      camFrame.title = `Grad-CAM${who} for ${displayName(r.cam.target)}: layer ${r.cam.layer}, ` +
        `${r.cam.grid.join("\u00d7")} grid; bright = weighed most`;
    } else if (r.cam) {
      camFrame.classList.add("empty");  // no positive evidence anywhere: say so rather than show black
      camFrame.title = "No location raised the score of the predicted class";
    } else {
      camFrame.classList.add("off");
    }
    state.totalMs += r.time_ms;
  }

  async function classify(file, card) {
    const limits = state.model && state.model.limits;
    if (limits && file.size > limits.max_file_bytes) {
      showError(card, `${(file.size / 1048576).toFixed(1)} MB is over the ${(limits.max_file_bytes / 1048576).toFixed(0)} MB limit`);
      return;
    }
    const body = new FormData();
    body.append("files", file, file.name);
    const cam = !!(state.model && state.model.gradcam.available);
    try {
      const res = await api(`/v1/predict${cam ? "?cam=1" : ""}`, { method: "POST", body });
      let data = null;
      try { data = await res.json(); } catch { /* not JSON */ }
      if (!res.ok) {
        showError(card, data && data.detail ? data.detail : `HTTP ${res.status}`);
        return;
      }
      showResult(card, data.results[0]);
      state.done += 1;
    } catch (err) {
      showError(card, `network error: ${err.message}`);
    }
  }

  function pump() {
    while (state.active < PARALLEL && state.queue.length) {
      const { file, card } = state.queue.shift();
      state.active += 1;
      classify(file, card).finally(() => {
        state.active -= 1;
        updateSummary();
        pump();
      });
    }
  }

  function updateSummary() {
    const box = $("#summary");
    const pending = state.queue.length + state.active;
    const counts = {};
    document.querySelectorAll(".card.done").forEach((c) => { counts[c.dataset.label] = (counts[c.dataset.label] || 0) + 1; });
    box.replaceChildren();
    const total = document.querySelectorAll(".card").length;
    if (!total) { box.hidden = true; return; }
    box.hidden = false;
    const done = total - pending - state.failed;
    box.append(el("span", { className: "summary-main" },
      pending ? `Classifying ${pending} of ${total}\u2026` : `${done} image${done === 1 ? "" : "s"} classified`));
    for (const [cls, n] of Object.entries(counts).sort()) {
      box.append(el("span", { className: "chip" }, `${displayName(cls)}: ${n}`));
    }
    if (state.failed) box.append(el("span", { className: "chip bad" }, `${state.failed} failed`));
  }

  function addFiles(list) {
    const files = Array.from(list || []);
    if (!files.length) return;
    $("#empty").hidden = true;
    $("#clear").disabled = false;
    const before = $("#results").firstElementChild;  // a new batch goes on top, in the order given
    for (const file of files) state.queue.push({ file, card: makeCard(file, before) });
    updateSummary();
    pump();
  }

  function init() {
    const drop = $("#drop");
    const input = $("#file-input");
    input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
    ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    }));
    ["dragleave", "dragend", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
    drop.addEventListener("drop", (e) => { e.preventDefault(); addFiles(e.dataTransfer.files); });
    drop.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
    });
    // dropping outside the zone must not navigate away from the page
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());

    $("#cam-toggle").addEventListener("change", (e) => {
      document.body.classList.toggle("overlay", e.target.checked);
    });
    const opacity = $("#cam-opacity");
    const setOpacity = () => document.documentElement.style.setProperty("--cam-opacity", String(opacity.value / 100));
    opacity.addEventListener("input", setOpacity);
    setOpacity();
    $("#clear").addEventListener("click", () => {
      document.querySelectorAll(".card").forEach((c) => {
        const src = $(".photo", c).src;
        if (src.startsWith("blob:")) URL.revokeObjectURL(src);
        c.remove();
      });
      Object.assign(state, { done: 0, failed: 0, totalMs: 0 });
      $("#clear").disabled = true;
      $("#empty").hidden = false;
      updateSummary();
    });
    loadModel();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
