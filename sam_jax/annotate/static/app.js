// sam-jax-annotate serve: the browser side (plain JS, no build step, nothing fetched from
// elsewhere). The server decodes every mask; this file draws them and sends the prompts.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const PALETTE = [
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
    [0, 128, 128], [170, 110, 40],
  ];
  const CURRENT = [30, 144, 255];
  const PROPOSAL = [255, 200, 0];

  const S = {
    images: [], // the listing (/api/images)
    image: null, // the open image (/api/images/NAME)
    bitmap: null,
    points: [], // [x, y, label] in image pixels
    box: null, // [x0, y0, x1, y1]
    history: [], // prompt steps, for undo: {kind: "point"} or {kind: "box", prev}
    accepted: [], // objects accepted in this visit of the image, for undo
    mask: null, // the current mask {data, w, h, layer, score}
    objects: [],
    proposals: [],
    seq: 0, // predict requests sent
    shownSeq: 0, // the request whose answer is on screen
    clickTime: 0,
    latencies: [], // {browser_ms, server_ms, total_ms} per mask shown
    drag: null,
    highlight: null, // an object id or proposal pid under the pointer in the lists
    loading: false,
    busy: 0,
    scale: 1,
  };

  // ------------------------------------------------------------------ server

  async function api(method, url, body) {
    const init = { method, headers: {} };
    if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    S.busy += 1;
    try {
      const response = await fetch(url, init);
      let data = null;
      try {
        data = await response.json();
      } catch (e) {
        data = null;
      }
      if (!response.ok) {
        const message = (data && data.error) || `${response.status} ${response.statusText}`;
        throw new Error(message);
      }
      return data;
    } finally {
      S.busy -= 1;
    }
  }

  const enc = encodeURIComponent;
  const imageUrl = (suffix) => `/api/images/${enc(S.image.name)}${suffix || ""}`;

  function status(text, isError) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", !!isError);
  }

  // ------------------------------------------------------------------ masks (COCO RLE)

  function rleCounts(counts) {
    if (Array.isArray(counts)) return counts;
    // pycocotools' rleFrString: 5 bits a character, sign bit 0x10, continuation bit 0x20,
    // counts after the second stored as differences to the one two places back.
    const out = [];
    let p = 0;
    while (p < counts.length) {
      let x = 0;
      let k = 0;
      let more = true;
      while (more) {
        const c = counts.charCodeAt(p) - 48;
        x += (c & 0x1f) * 2 ** (5 * k);
        more = (c & 0x20) !== 0;
        p += 1;
        k += 1;
        if (!more && (c & 0x10)) x -= 2 ** (5 * k);
      }
      if (out.length > 2) x += out[out.length - 2];
      out.push(x);
    }
    return out;
  }

  function decodeMask(rle) {
    const [h, w] = rle.size;
    const data = new Uint8Array(h * w); // row-major
    let i = 0;
    let on = false;
    for (const run of rleCounts(rle.counts)) {
      if (on) {
        for (let j = i; j < i + run; j += 1) data[(j % h) * w + Math.floor(j / h)] = 1;
      }
      i += run;
      on = !on;
    }
    return { data, w, h };
  }

  function maskLayer(mask, rgb, alpha) {
    const layer = document.createElement("canvas");
    layer.width = mask.w;
    layer.height = mask.h;
    const lctx = layer.getContext("2d");
    const pixels = lctx.createImageData(mask.w, mask.h);
    const a = Math.round(alpha * 255);
    for (let i = 0; i < mask.data.length; i += 1) {
      if (mask.data[i]) {
        pixels.data[4 * i] = rgb[0];
        pixels.data[4 * i + 1] = rgb[1];
        pixels.data[4 * i + 2] = rgb[2];
        pixels.data[4 * i + 3] = a;
      }
    }
    lctx.putImageData(pixels, 0, 0);
    return layer;
  }

  function colorOf(id) {
    return PALETTE[Math.abs(id) % PALETTE.length];
  }

  function prepObject(o) {
    const mask = decodeMask(o.segmentation);
    return { ...o, mask, layer: maskLayer(mask, colorOf(o.id), 0.45),
      bright: maskLayer(mask, colorOf(o.id), 0.8) };
  }

  function prepProposal(p) {
    const mask = decodeMask(p.segmentation);
    return { ...p, mask, layer: maskLayer(mask, PROPOSAL, 0.35),
      bright: maskLayer(mask, PROPOSAL, 0.75) };
  }

  // ------------------------------------------------------------------ drawing

  function layout() {
    if (!S.image) return;
    const stage = $("stage");
    const w = S.image.width;
    const h = S.image.height;
    const scale = Math.max(0.05, Math.min((stage.clientWidth - 16) / w,
      (stage.clientHeight - 16) / h));
    const dpr = window.devicePixelRatio || 1;
    S.scale = scale;
    canvas.style.width = `${Math.round(w * scale)}px`;
    canvas.style.height = `${Math.round(h * scale)}px`;
    canvas.width = Math.round(w * scale * dpr);
    canvas.height = Math.round(h * scale * dpr);
    render();
  }

  function render() {
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!S.image || !S.bitmap) return;
    const k = canvas.width / S.image.width; // canvas pixels per image pixel
    ctx.setTransform(k, 0, 0, k, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(S.bitmap, 0, 0, S.image.width, S.image.height);
    for (const o of S.objects) ctx.drawImage(S.highlight === o.id ? o.bright : o.layer, 0, 0);
    for (const p of S.proposals) ctx.drawImage(S.highlight === p.pid ? p.bright : p.layer, 0, 0);
    if (S.mask) ctx.drawImage(S.mask.layer, 0, 0);
    const px = 1 / (S.scale || 1); // one screen pixel, in image pixels
    const boxes = [];
    if (S.box) boxes.push([S.box, [0, 220, 0], []]);
    if (S.drag && S.drag.moved) boxes.push([dragBox(), [255, 255, 255], [4 * px, 3 * px]]);
    for (const [[x0, y0, x1, y1], rgb, dash] of boxes) {
      ctx.setLineDash(dash);
      ctx.lineWidth = 2 * px;
      ctx.strokeStyle = `rgb(${rgb.join(",")})`;
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    }
    ctx.setLineDash([]);
    for (const [x, y, label] of S.points) {
      ctx.beginPath();
      ctx.arc(x, y, 5 * px, 0, 2 * Math.PI);
      ctx.fillStyle = label === 1 ? "rgb(0,210,0)" : "rgb(230,0,0)";
      ctx.fill();
      ctx.lineWidth = 1.5 * px;
      ctx.strokeStyle = "white";
      ctx.stroke();
    }
  }

  // ------------------------------------------------------------------ prompts

  function toImage(event) {
    const r = canvas.getBoundingClientRect();
    const x = ((event.clientX - r.left) * S.image.width) / r.width;
    const y = ((event.clientY - r.top) * S.image.height) / r.height;
    const round = (v, hi) => Math.round(Math.min(Math.max(v, 0), hi) * 100) / 100;
    return [round(x, S.image.width), round(y, S.image.height)];
  }

  function dragBox() {
    const d = S.drag;
    return [Math.min(d.x0, d.x1), Math.min(d.y0, d.y1), Math.max(d.x0, d.x1),
      Math.max(d.y0, d.y1)];
  }

  function addPoint(x, y, label) {
    if (S.points.length >= S.maxPoints) {
      status(`at most ${S.maxPoints} points per object`, true);
      return;
    }
    S.points.push([x, y, label]);
    S.history.push({ kind: "point" });
    requestMask();
  }

  function setBox(box) {
    S.history.push({ kind: "box", prev: S.box });
    S.box = box;
    requestMask();
  }

  function promptInfo() {
    const pos = S.points.filter((p) => p[2] === 1).length;
    const neg = S.points.length - pos;
    const parts = [`${pos} positive, ${neg} negative point(s)`];
    if (S.box) parts.push("a box");
    if (S.mask) parts.push(`predicted IoU ${S.mask.score.toFixed(3)}`);
    $("prompt-info").textContent = S.points.length || S.box ? parts.join(", ")
      : "Click the image to start an object.";
    $("accept").disabled = !S.mask || !(S.points.length || S.box);
  }

  async function requestMask() {
    const seq = ++S.seq;
    const t0 = S.clickTime || performance.now();
    promptInfo();
    render();
    if (!S.points.length && !S.box) {
      S.mask = null;
      S.shownSeq = seq;
      promptInfo();
      render();
      return;
    }
    const body = { image: S.image.name, points: S.points.map((p) => [...p]), box: S.box };
    try {
      const r = await api("POST", "/api/predict", body);
      if (seq !== S.seq) return; // a newer click is on its way
      const mask = decodeMask(r.mask);
      S.mask = { ...mask, layer: maskLayer(mask, CURRENT, 0.5), score: r.score };
      render();
      await new Promise((resolve) => requestAnimationFrame(resolve));
      const ms = performance.now() - t0;
      S.latencies.push({ browser_ms: ms, server_ms: r.server_ms, total_ms: r.total_ms });
      status(`mask in ${ms.toFixed(0)} ms (decoder ${r.server_ms.toFixed(0)} ms)`);
    } catch (e) {
      if (seq === S.seq) status(e.message, true);
    } finally {
      if (seq === S.seq) {
        S.shownSeq = seq;
        promptInfo();
      }
    }
  }

  function clearPrompts() {
    S.points = [];
    S.box = null;
    S.history = [];
    S.mask = null;
    S.seq += 1;
    S.shownSeq = S.seq;
    promptInfo();
    render();
  }

  async function undo() {
    if (!S.image) return;
    const step = S.history.pop();
    if (step) {
      if (step.kind === "point") S.points.pop();
      else S.box = step.prev;
      requestMask();
      return;
    }
    // No pending prompt: take the last object accepted here back into editing.
    const id = S.accepted.pop();
    const obj = S.objects.find((o) => o.id === id);
    if (!obj) return;
    await removeObject(obj);
    if (obj.box) S.history.push({ kind: "box", prev: null });
    S.box = obj.box;
    S.points = (obj.points || []).map((p) => [...p]);
    for (let i = 0; i < S.points.length; i += 1) S.history.push({ kind: "point" });
    $("name").value = obj.name;
    requestMask();
  }

  // ------------------------------------------------------------------ objects and proposals

  async function accept() {
    if (!S.image || !S.mask || !(S.points.length || S.box)) return;
    const body = { points: S.points, box: S.box, name: $("name").value };
    try {
      const obj = prepObject(await api("POST", imageUrl("/objects"), body));
      S.objects.push(obj);
      S.accepted.push(obj.id);
      clearPrompts();
      addName(obj.name);
      renderLists();
      status(`accepted "${obj.name}" (${obj.area} px)`);
      refreshImages();
    } catch (e) {
      status(e.message, true);
    }
  }

  async function removeObject(obj) {
    try {
      await api("DELETE", imageUrl(`/objects/${obj.id}`));
      S.objects = S.objects.filter((o) => o.id !== obj.id);
      S.accepted = S.accepted.filter((id) => id !== obj.id);
      renderLists();
      render();
      refreshImages();
    } catch (e) {
      status(e.message, true);
    }
  }

  async function renameObject(obj, name) {
    try {
      const r = await api("PATCH", imageUrl(`/objects/${obj.id}`), { name });
      obj.name = r.name;
      addName(r.name);
      status(`renamed to "${r.name}"`);
    } catch (e) {
      status(e.message, true);
    }
    renderLists();
  }

  async function decide(p, action, name) {
    try {
      const body = action === "accept" ? { name } : {};
      const r = await api("POST", imageUrl(`/proposals/${enc(p.pid)}/${action}`), body);
      S.proposals = S.proposals.filter((q) => q.pid !== p.pid);
      if (r.object) {
        const obj = prepObject(r.object);
        S.objects.push(obj);
        S.accepted.push(obj.id);
        addName(obj.name);
      }
      renderLists();
      render();
      refreshImages();
    } catch (e) {
      status(e.message, true);
    }
  }

  function addName(name) {
    const list = $("names");
    if ([...list.options].some((o) => o.value === name)) return;
    const option = document.createElement("option");
    option.value = name;
    list.appendChild(option);
  }

  function swatch(rgb) {
    const el = document.createElement("span");
    el.className = "swatch";
    el.style.background = `rgb(${rgb.join(",")})`;
    return el;
  }

  function hoverable(li, key) {
    li.addEventListener("mouseenter", () => { S.highlight = key; render(); });
    li.addEventListener("mouseleave", () => { S.highlight = null; render(); });
  }

  function renderLists() {
    const objects = $("object-list");
    objects.replaceChildren();
    for (const o of S.objects) {
      const li = document.createElement("li");
      li.dataset.id = String(o.id);
      const input = document.createElement("input");
      input.value = o.name;
      input.maxLength = 100;
      input.setAttribute("list", "names");
      input.setAttribute("aria-label", "object name");
      input.addEventListener("change", () => renameObject(o, input.value));
      input.addEventListener("keydown", (e) => { if (e.key === "Enter") input.blur(); });
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = `${o.source} ${o.area}px`;
      const del = document.createElement("button");
      del.className = "delete";
      del.textContent = "\u2715";
      del.title = "delete this object";
      del.addEventListener("click", () => removeObject(o));
      li.append(swatch(colorOf(o.id)), input, meta, del);
      hoverable(li, o.id);
      objects.appendChild(li);
    }
    const proposals = $("proposal-list");
    proposals.replaceChildren();
    $("proposals-panel").hidden = S.proposals.length === 0;
    for (const p of S.proposals) {
      const li = document.createElement("li");
      li.dataset.pid = p.pid;
      const input = document.createElement("input");
      input.value = p.name;
      input.maxLength = 100;
      input.setAttribute("list", "names");
      input.setAttribute("aria-label", "proposal name");
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = `${p.source} ${p.score.toFixed(2)}`;
      const ok = document.createElement("button");
      ok.className = "accept";
      ok.textContent = "\u2713";
      ok.title = "accept this proposal";
      ok.addEventListener("click", () => decide(p, "accept", input.value));
      const no = document.createElement("button");
      no.className = "reject";
      no.textContent = "\u2715";
      no.title = "reject this proposal";
      no.addEventListener("click", () => decide(p, "reject"));
      li.append(swatch(PROPOSAL), input, meta, ok, no);
      hoverable(li, p.pid);
      proposals.appendChild(li);
    }
  }

  // ------------------------------------------------------------------ images

  function renderImageList() {
    const list = $("image-list");
    list.replaceChildren();
    for (const im of S.images) {
      const li = document.createElement("li");
      li.dataset.name = im.name;
      if (S.image && S.image.name === im.name) li.classList.add("current");
      if (!im.readable) li.classList.add("unreadable");
      const button = document.createElement("button");
      const label = document.createElement("span");
      label.textContent = im.name;
      const badge = document.createElement("span");
      badge.className = "badge";
      if (!im.readable) {
        badge.textContent = "unreadable";
        button.title = im.error || "unreadable";
      } else {
        const parts = [];
        if (im.objects) parts.push(`${im.objects} obj`);
        if (im.pending) {
          parts.push(`${im.pending} to review`);
          badge.classList.add("pending");
        }
        badge.textContent = parts.join(", ");
      }
      button.append(label, badge);
      button.addEventListener("click", () => openImage(im.name));
      li.appendChild(button);
      list.appendChild(li);
    }
  }

  async function refreshImages() {
    try {
      const data = await api("GET", "/api/images");
      S.images = data.images;
      S.maxPoints = data.max_points;
      renderImageList();
    } catch (e) {
      status(e.message, true);
    }
  }

  function loadBitmap(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the image could not be shown"));
      img.src = url;
    });
  }

  async function openImage(name) {
    if (S.loading) return;
    S.loading = true;
    status(`opening ${name} (the encoder runs once per image)...`);
    try {
      const data = await api("GET", `/api/images/${enc(name)}`);
      const bitmap = await loadBitmap(`/api/images/${enc(name)}/image.png`);
      S.image = data;
      S.bitmap = bitmap;
      S.objects = data.objects.map(prepObject);
      S.proposals = data.proposals.map(prepProposal);
      S.accepted = [];
      S.highlight = null;
      for (const n of data.names) addName(n);
      $("image-title").textContent = `${data.name} (${data.width}x${data.height})`;
      window.history.replaceState(null, "", `#${enc(name)}`);
      clearPrompts();
      renderLists();
      layout();
      const notes = data.warnings.length ? ` \u2014 ${data.warnings.join("; ")}` : "";
      status(`${data.name}: ${data.objects.length} object(s), ${data.proposals.length} `
        + `proposal(s) to review${notes}`);
    } catch (e) {
      status(`${name}: ${e.message}`, true);
    } finally {
      S.loading = false;
      await refreshImages();
    }
  }

  function step(delta) {
    if (!S.images.length) return;
    const names = S.images.filter((im) => im.readable).map((im) => im.name);
    if (!names.length) return;
    const at = S.image ? names.indexOf(S.image.name) : -1;
    const next = at < 0 ? 0 : at + delta;
    if (next >= 0 && next < names.length) openImage(names[next]);
  }

  // ------------------------------------------------------------------ events

  canvas.addEventListener("mousedown", (e) => {
    if (!S.image || e.button !== 0) return;
    const [x, y] = toImage(e);
    S.drag = { x0: x, y0: y, x1: x, y1: y, cx: e.clientX, cy: e.clientY, moved: false };
  });

  window.addEventListener("mousemove", (e) => {
    if (!S.drag) return;
    if (Math.hypot(e.clientX - S.drag.cx, e.clientY - S.drag.cy) > 4) S.drag.moved = true;
    [S.drag.x1, S.drag.y1] = toImage(e);
    if (S.drag.moved) render();
  });

  window.addEventListener("mouseup", (e) => {
    if (!S.drag || e.button !== 0) return;
    const drag = S.drag;
    [drag.x1, drag.y1] = toImage(e);
    const box = dragBox();
    S.drag = null;
    S.clickTime = performance.now();
    if (drag.moved) setBox(box);
    else addPoint(drag.x0, drag.y0, 1);
  });

  canvas.addEventListener("contextmenu", (e) => {
    e.preventDefault();
    if (!S.image) return;
    S.clickTime = performance.now();
    const [x, y] = toImage(e);
    addPoint(x, y, 0);
  });

  $("accept").addEventListener("click", accept);
  $("undo").addEventListener("click", () => { S.clickTime = performance.now(); undo(); });
  $("clear").addEventListener("click", clearPrompts);
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("accept-all").addEventListener("click", async () => {
    for (const p of [...S.proposals]) await decide(p, "accept", p.name);
  });
  window.addEventListener("resize", layout);

  document.addEventListener("keydown", (e) => {
    const typing = e.target instanceof HTMLInputElement;
    if (e.key === "Enter" && (!typing || e.target.id === "name")) {
      e.preventDefault();
      accept();
    } else if (e.key === "Escape") {
      clearPrompts();
    } else if (typing) {
      // keys type into the field
    } else if ((e.key === "z" && (e.ctrlKey || e.metaKey)) || e.key === "u") {
      e.preventDefault();
      S.clickTime = performance.now();
      undo();
    } else if (e.key === "n") {
      step(1);
    } else if (e.key === "p") {
      step(-1);
    }
  });

  // For tests and for the curious: the state, the current mask (row-major 0/1) and whether
  // every answer is on screen.
  window.annotator = {
    state: S,
    mask: () => (S.mask ? Array.from(S.mask.data) : null),
    idle: () => !S.loading && S.busy === 0 && S.shownSeq === S.seq,
  };

  (async () => {
    S.maxPoints = 64;
    await refreshImages();
    const wanted = decodeURIComponent(window.location.hash.slice(1));
    const first = S.images.find((im) => im.name === wanted)
      || S.images.find((im) => im.readable);
    if (first) await openImage(first.name);
  })();
})();
