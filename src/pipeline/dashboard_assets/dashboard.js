// sae.cpp feature dashboards. Opened from file:// with no network: data files are scripts that
// call saeDash.add(kind, key, data), loaded on demand by adding a <script> element (fetch and
// XMLHttpRequest are refused for file:// pages).
"use strict";
const saeDash = (() => {
  const store = {}; // kind -> key -> data
  const waiting = {}; // "kind/key" -> [resolve]
  function add(kind, key, data) {
    (store[kind] = store[kind] || {})[key] = data;
    for (const resolve of waiting[kind + "/" + key] || []) resolve(data);
    delete waiting[kind + "/" + key];
  }
  function load(kind, key, file) {
    if (store[kind] && key in store[kind]) return Promise.resolve(store[kind][key]);
    return new Promise((resolve, reject) => {
      (waiting[kind + "/" + key] = waiting[kind + "/" + key] || []).push(resolve);
      const s = document.createElement("script");
      s.src = "data/" + file;
      s.onerror = () => reject(new Error("cannot load data/" + file));
      document.head.appendChild(s);
    });
  }
  const pad3 = (n) => String(n).padStart(3, "0");
  const meta = () => load("meta", 0, "meta.js");
  const vocab = () => load("vocab", 0, "vocab.js");
  const el = (tag, attrs = {}, ...children) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  };
  const fmt = (v) => (Math.abs(v) >= 100 || v === 0 ? v.toFixed(0) : v.toPrecision(3));
  const pct = (v) => (v * 100).toPrecision(3) + "%";
  const latentLink = (f, text) => el("a", { href: "latent.html?f=" + f }, text ?? "#" + f);

  function describe(m) {
    return `${m.hook} of ${m.model} · ${m.d_sae} latents · levels ${m.levels.join("/")} · ` +
      `${m.tokens} ${m.split} tokens in ${m.windows} windows of ${m.context_size} · sae.cpp ${m.saecpp_version}`;
  }

  // One token coloured by its activation (alpha relative to the latent's max).
  function token(text, act, max, qualifying) {
    const ctl = text.startsWith("<") && text.endsWith(">") && text.length > 2;
    const span = el("span", { class: "tok" + (qualifying ? " q" : "") + (ctl ? " ctl" : "") }, text);
    if (act > 0) span.style.background = `rgba(232,137,43,${Math.min(1, act / max).toFixed(3)})`;
    span.title = `activation ${fmt(act)}`;
    return span;
  }
  function example(ex, max, v) {
    const row = el("div", { class: "example" }, el("span", { class: "val" }, fmt(ex.v)));
    ex.t.forEach((id, i) => row.append(token(v[id] ?? "?", ex.a[i], max, i === ex.q)));
    row.append(el("span", { class: "where" }, ex.doc >= 0 ? `doc ${ex.doc}, token ${ex.pos}` : ""));
    return row;
  }

  // A bar chart as plain SVG: bars[i] over [lo + i w, lo + (i+1) w).
  function histogram(bars, lo, w, cls, label) {
    const W = 320, H = 110, n = Math.max(bars.length, 1), top = Math.max(...bars, 1);
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "hist " + cls);
    svg.setAttribute("width", W);
    svg.setAttribute("height", H + 16);
    bars.forEach((b, i) => {
      const r = document.createElementNS(svg.namespaceURI, "rect");
      const h = (b / top) * H;
      r.setAttribute("x", (i * W) / n);
      r.setAttribute("y", H - h);
      r.setAttribute("width", Math.max(W / n - 1, 1));
      r.setAttribute("height", h);
      if (lo + (i + 0.5) * w < 0) r.setAttribute("class", "neg");
      const t = document.createElementNS(svg.namespaceURI, "title");
      t.textContent = `[${fmt(lo + i * w)}, ${fmt(lo + (i + 1) * w)}): ${b}`;
      r.append(t);
      svg.append(r);
    });
    for (const [x, v] of [[0, lo], [W - 40, lo + n * w]]) {
      const t = document.createElementNS(svg.namespaceURI, "text");
      t.setAttribute("x", x);
      t.setAttribute("y", H + 12);
      t.textContent = fmt(v);
      svg.append(t);
    }
    return el("div", {}, el("div", { class: "note" }, label), svg);
  }

  function linkList(title, pairs, what) {
    const ul = el("ul");
    for (const [f, v] of pairs) ul.append(el("li", {}, latentLink(f), ` ${what} ${fmt(v)}`));
    if (!pairs.length) ul.append(el("li", { class: "note" }, "none"));
    return el("div", { class: "panel" }, el("h2", {}, title), ul);
  }

  async function latentPage() {
    const f = Number(new URLSearchParams(location.search).get("f") ?? 0);
    const [m, v] = await Promise.all([meta(), vocab()]);
    document.getElementById("meta").textContent = describe(m);
    const file = Math.floor(f / m.latents_per_file);
    const data = await load("latents", file, `latents-${pad3(file)}.js`);
    const d = data[String(f)];
    const main = document.getElementById("latent");
    const nav = document.getElementById("nav");
    nav.append(" · ", latentLink(f - 1, "previous"), " · ", latentLink(f + 1, "next"));
    document.title = `Latent ${f}`;
    if (!d) {
      document.getElementById("title").textContent = `Latent ${f}: not in this dashboard`;
      return;
    }
    const level = m.levels.length > 1
      ? `Matryoshka level ${d.level} (latents ${d.level ? m.levels[d.level - 1] : 0}–${m.levels[d.level] - 1})`
      : "";
    document.getElementById("title").textContent = `Latent ${f}` + (level ? ` · ${level}` : "");
    main.append(el("p", {}, `Fires on ${d.fires} of ${m.tokens} tokens (density ${pct(d.density)}); ` +
      `max ${fmt(d.max)}; over its firing tokens: mean ${fmt(d.mean)}, E[a²] ${fmt(d.mean_sq)}, ` +
      `skew ${fmt(d.skew)}, excess kurtosis ${fmt(d.kurtosis)}.`));
    const hist = histogram(d.hist, 0, d.hist_width, "acts", `Activation histogram (firing tokens; density ${pct(d.density)})`);
    const lhist = histogram(d.logits_hist, d.logits_hist_lo, d.logits_hist_width, "logits", "Logit effects of W_dec[f] · W_U (all tokens)");
    const logitTable = (ids, vals, cls, title) => {
      const t = el("table", {}, el("tr", {}, el("th", {}, title), el("th", {}, "")));
      ids.forEach((id, i) => t.append(el("tr", {}, el("td", {}, token(v[id] ?? "?", 0, 1, false)), el("td", { class: "num " + cls }, fmt(vals[i])))));
      return t;
    };
    main.append(el("div", { class: "panels" },
      el("div", { class: "panel" }, el("h2", {}, "Activations"), hist),
      el("div", { class: "panel" }, el("h2", {}, "Logits"), lhist,
        el("div", { class: "panels" },
          logitTable(d.logits_neg, d.logits_neg_values, "neg", "suppressed"),
          logitTable(d.logits_pos, d.logits_pos_values, "pos", "promoted")),
        el("div", { class: "note" }, "Unit decoder direction times the unembedding; the final RMSNorm is not applied."))));
    main.append(el("div", { class: "panels" },
      linkList("Nearest latents (decoder cosine)", d.nearest, "cos"),
      linkList("Most correlated latents (firing)", d.correlated, "r"),
      linkList("Likely parents (inner level, P(parent | this))", d.parents, "p"),
      linkList("Children (outer level, P(this | child))", d.children, "p")));
    const section = (title, groups) => {
      const s = el("section", {}, el("h2", {}, title));
      for (const g of groups) {
        s.append(el("div", { class: "group" }, el("h3", {}, g.title)));
        for (const ex of g.examples) s.append(example(ex, d.max, v));
      }
      return s;
    };
    main.append(section("Top activations", [{ title: `the ${d.top.length} highest`, examples: d.top }]));
    main.append(section("Activation intervals", d.intervals.map((g) => ({
      title: `[${fmt(g.lo)}, ${fmt(g.hi)}): ${g.count} tokens (${pct(g.count / d.fires)} of firing)`, examples: g.examples,
    }))));
    main.append(section("Quantiles of the firing activations", d.quantiles.map((g, i) => ({
      title: `quantile ${d.quantiles.length - i} of ${d.quantiles.length}: ${fmt(g.lo)} – ${fmt(g.hi)}`, examples: g.examples,
    }))));
  }

  async function indexPage() {
    const [m, v] = await Promise.all([meta(), vocab()]);
    document.getElementById("meta").textContent = describe(m);
    const levelSel = document.getElementById("level");
    m.levels.forEach((w, i) => levelSel.append(el("option", { value: i }, `${i} (< ${w})`)));
    const perPage = 200;
    let rows = [], page = 0, all = false;
    const loadIndex = (i) => load("index", i, `index-${pad3(i)}.js`);
    rows = await loadIndex(0); // the first file at once; the rest when a view needs them
    const controls = ["search", "level", "density", "sort", "descending"].map((id) => document.getElementById(id));
    async function render() {
      const [search, level, density, sort, desc] = controls;
      const needAll = search.value || level.value || density.value || sort.value !== "0" || desc.checked ||
        (page + 1) * perPage > rows.length;
      if (needAll && !all) {
        const files = [];
        for (let i = 0; i < m.index_files; ++i) files.push(loadIndex(i));
        rows = (await Promise.all(files)).flat();
        all = true;
      }
      const q = search.value.toLowerCase();
      let view = rows.filter((r) =>
        (!level.value || r[3] === Number(level.value)) &&
        (!density.value || (density.value === "dead" ? r[1] === 0 : density.value === "dense" ? r[1] > 0.01 : r[1] > 0)) &&
        (!q || r[4].some((id) => (v[id] ?? "").toLowerCase().includes(q))));
      const key = Number(sort.value);
      view.sort((a, b) => (a[key] - b[key]) * (desc.checked ? -1 : 1) || a[0] - b[0]);
      page = Math.min(page, Math.max(0, Math.ceil(view.length / perPage) - 1));
      const body = document.querySelector("#latents tbody");
      body.replaceChildren();
      for (const r of view.slice(page * perPage, (page + 1) * perPage)) {
        const toks = el("td");
        r[4].forEach((id) => toks.append(token(v[id] ?? "?", 0, 1, false), " "));
        body.append(el("tr", {}, el("td", {}, latentLink(r[0])), el("td", { class: "num" }, String(r[3])),
          el("td", { class: "num" }, pct(r[1])), el("td", { class: "num" }, fmt(r[2])), toks));
      }
      document.getElementById("count").textContent = `${view.length} of ${m.latents} latents`;
      document.getElementById("page").textContent = `page ${page + 1} of ${Math.max(1, Math.ceil(view.length / perPage))}`;
    }
    for (const c of controls) c.addEventListener("input", () => { page = 0; render(); });
    document.getElementById("prev").onclick = () => { page = Math.max(0, page - 1); render(); };
    document.getElementById("next").onclick = () => { page += 1; render(); };
    await render();
    document.body.dataset.ready = "1";
  }

  // Pages mark themselves ready (tests wait for it) once rendered.
  const ready = (p) => p.then(() => { document.body.dataset.ready = "1"; });
  return {
    add,
    indexPage: () => ready(indexPage()),
    latentPage: () => ready(latentPage()),
  };
})();
