"use strict";
// Plain ES2020, no build step. Talks to the JSON API of `unialign serve`.
(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("text-search"), input = $("q"), kSelect = $("k"), captions = $("captions");
  const drop = $("drop"), fileInput = $("file"), status = $("status"), error = $("error"), results = $("results");
  let limits = { max_upload_bytes: 10 * 1024 * 1024, max_query_chars: 512, max_k: 100 };

  function showError(message) {
    error.textContent = message;
    error.hidden = false;
    status.textContent = "";
  }

  function detailText(body) {
    if (!body || body.detail === undefined) return null;
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    return JSON.stringify(body.detail);
  }

  async function run(request, label) {
    error.hidden = true;
    status.textContent = "Searching…";
    results.setAttribute("aria-busy", "true");
    try {
      const response = await request();
      const body = await response.json().catch(() => null);
      if (!response.ok) {
        showError(detailText(body) || `${response.status} ${response.statusText}`);
        return;
      }
      render(body.results);
      status.textContent = `${body.results.length} result${body.results.length === 1 ? "" : "s"} for ${label}`;
    } catch (err) {
      showError(`Search failed: ${err.message}`);
    } finally {
      results.setAttribute("aria-busy", "false");
    }
  }

  function render(items) {
    results.replaceChildren(...items.map((r) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "result";
      button.setAttribute("aria-label", `Rank ${r.rank}, score ${r.score.toFixed(3)}, ${r.name}` +
        (r.caption ? `: ${r.caption}` : "") + ". Find similar images.");
      const img = document.createElement("img");
      img.src = r.thumb_url;
      img.alt = r.caption || r.name;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = r.score.toFixed(3);
      score.title = "cosine similarity to the query (-1 to 1, higher is closer; compare within this query only)";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = r.name;
      button.append(img, score, name);
      if (r.caption) {
        const caption = document.createElement("span");
        caption.className = "caption";
        caption.textContent = r.caption;
        button.append(caption);
      }
      button.addEventListener("click", () => similar(r));
      li.append(button);
      return li;
    }));
  }

  function k() { return Math.min(Number(kSelect.value), limits.max_k); }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const q = input.value.trim();
    if (!q) { showError("Type a description to search for."); return; }
    const params = new URLSearchParams({ q, k: String(k()) });
    if (captions.checked) params.set("captions", "true");
    run(() => fetch(`/api/search?${params}`), `“${q}”`);
  });

  function upload(file, label) {
    if (!file) return;
    if (!file.type.startsWith("image/")) { showError(`${file.name} is not an image.`); return; }
    if (file.size > limits.max_upload_bytes) {
      showError(`${file.name} is larger than ${(limits.max_upload_bytes / 1048576).toFixed(0)} MB.`);
      return;
    }
    const data = new FormData();
    data.append("file", file, file.name);
    run(() => fetch(`/api/search/image?k=${k()}`, { method: "POST", body: data }), label || file.name);
  }

  async function similar(result) {
    const response = await fetch(result.thumb_url);
    if (!response.ok) { showError(`Cannot load ${result.name} (${response.status}).`); return; }
    const blob = await response.blob();
    upload(new File([blob], `${result.name}.jpg`, { type: "image/jpeg" }), `images similar to ${result.name}`);
  }

  fileInput.addEventListener("change", () => upload(fileInput.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("dragover"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragover"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragover");
    upload(event.dataTransfer.files[0]);
  });

  fetch("/api/health").then((r) => r.json()).then((h) => {
    limits = h;
    input.maxLength = h.max_query_chars;
    $("captions-option").hidden = !h.caption_index;
    $("index-info").textContent = `${h.items.toLocaleString()} images indexed (${h.image_index})` +
      (h.captions ? `, ${h.captions.toLocaleString()} captions` : "") +
      (h.query_bank ? `; text search normalised by a query bank of ${h.query_bank.toLocaleString()} queries` : "");
  }).catch(() => { $("index-info").textContent = "Index information unavailable."; });
})();
