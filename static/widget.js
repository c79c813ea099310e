/*! Simili "similar images" widget. No dependencies.
 * <div data-simili-similar="IMAGE_KEY" data-limit="6"></div>
 * <script src="https://simili.example/static/widget.js" async></script>
 * If the server is down or the image unknown, the element stays empty and the console says why. */
(function () {
  "use strict";
  var script = document.currentScript;
  var defaultBase = script ? script.src.replace(/\/static\/widget\.js(?:[?#].*)?$/, "") : "";
  var STYLE_ID = "simili-widget-style";
  var CSS = ".simili-widget{list-style:none;margin:0;padding:0;display:grid;gap:6px;" +
    "grid-template-columns:repeat(auto-fill,minmax(96px,1fr))}" +
    ".simili-widget a{display:block}.simili-widget img{width:100%;height:auto;aspect-ratio:1;object-fit:cover;" +
    "border-radius:6px;display:block}";

  function addStyle() {
    if (document.getElementById(STYLE_ID)) { return; }
    var style = document.createElement("style");
    style.id = STYLE_ID;
    style.textContent = CSS;
    document.head.appendChild(style);
  }

  function render(el, results) {
    var list = document.createElement("ul");
    list.className = "simili-widget";
    results.forEach(function (result) {
      var image = result.image;
      if (!image.thumbnail_url) { return; }
      var item = document.createElement("li");
      var link = document.createElement("a");
      link.href = image.url;
      link.target = "_blank";
      link.rel = "noopener";
      var img = document.createElement("img");
      img.src = image.thumbnail_url;
      img.alt = image.name || "Similar image";
      img.loading = "lazy";
      img.width = 160;
      img.height = 160;
      link.appendChild(img);
      item.appendChild(link);
      list.appendChild(item);
    });
    if (list.children.length) {
      addStyle();
      el.appendChild(list);
    }
  }

  function load(el) {
    if (el.getAttribute("data-simili-state")) { return; }
    el.setAttribute("data-simili-state", "loading");
    var key = el.getAttribute("data-simili-similar");
    var limit = parseInt(el.getAttribute("data-limit") || "6", 10);
    if (!(limit >= 1 && limit <= 100)) { limit = 6; }
    var base = (el.getAttribute("data-simili-base") || defaultBase).replace(/\/$/, "");
    var url = base + "/api/v1/images/" + encodeURIComponent(key) + "/similar?k=" + limit;
    fetch(url, { mode: "cors", credentials: "omit" })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status + " for " + url); }
        return response.json();
      })
      .then(function (body) {
        render(el, body.results || []);
        el.setAttribute("data-simili-state", "done");
      })
      .catch(function (err) {
        el.setAttribute("data-simili-state", "error");
        console.error("Simili widget:", err.message || err);
      });
  }

  function loadAll() {
    Array.prototype.forEach.call(document.querySelectorAll("[data-simili-similar]"), load);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", loadAll);
  } else {
    loadAll();
  }
})();
