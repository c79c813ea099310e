// Collection page: drag-and-drop uploads, one request per file with its own progress and outcome,
// then the live status of images still processing.
(function () {
  "use strict";
  var grid = document.getElementById("grid");
  var form = document.getElementById("upload");
  var polling = false;

  function capitalise(s) { return s.charAt(0).toUpperCase() + s.slice(1); }

  function pendingKeys() {
    var tiles = grid ? grid.querySelectorAll(".tile[data-status=pending], .tile[data-status=processing]") : [];
    return Array.prototype.map.call(tiles, function (t) { return t.dataset.key; });
  }

  function thumbnail(img, alt) {
    var el = document.createElement("img");
    el.src = img.thumbnail_url; el.alt = alt || "Image"; el.loading = "lazy"; el.width = 200; el.height = 200;
    return el;
  }

  function poll() {
    var keys = pendingKeys();
    if (!keys.length) { polling = false; return; }
    polling = true;
    fetch(grid.dataset.statusUrl + "?keys=" + encodeURIComponent(keys.join(",")), { credentials: "same-origin" })
      .then(function (r) { return r.json(); })
      .then(function (data) {
        data.images.forEach(function (img) {
          var tile = grid.querySelector('.tile[data-key="' + img.key + '"]');
          if (!tile || tile.dataset.status === img.status) { return; }
          tile.dataset.status = img.status;
          var label = tile.querySelector(".status");
          label.className = "status status-" + img.status;
          label.textContent = capitalise(img.status);
          if (img.thumbnail_url) {
            var link = tile.querySelector("a");
            link.textContent = "";
            link.appendChild(thumbnail(img, tile.dataset.name));
          }
          if (img.error) { label.title = img.error; }
        });
      })
      .catch(function (err) { console.error("Simili: status poll failed", err); })
      .finally(function () { setTimeout(poll, 1500); });
  }

  function ensurePolling() { if (grid && !polling) { poll(); } }

  function addTile(result) {
    if (!grid || grid.querySelector('.tile[data-key="' + result.image.key + '"]')) { return; }
    var empty = grid.querySelector(".empty");
    if (empty) { empty.remove(); }
    var li = document.createElement("li");
    li.className = "tile";
    li.dataset.key = result.image.key;
    li.dataset.status = result.image.status;
    li.dataset.name = result.name;
    var link = document.createElement("a");
    link.href = result.image.url;
    if (result.image.thumbnail_url) {
      link.appendChild(thumbnail(result.image, result.name));
    } else {
      var placeholder = document.createElement("span");
      placeholder.className = "placeholder";
      placeholder.textContent = capitalise(result.image.status);
      link.appendChild(placeholder);
    }
    var label = document.createElement("span");
    label.className = "status status-" + result.image.status;
    label.textContent = capitalise(result.image.status);
    li.appendChild(link);
    li.appendChild(label);
    grid.insertBefore(li, grid.firstChild);
  }

  function row(file) {
    var li = document.createElement("li");
    li.className = "upload-row";
    var name = document.createElement("span");
    name.className = "upload-name";
    name.textContent = file.name;
    var bar = document.createElement("progress");
    bar.max = 100; bar.value = 0;
    bar.setAttribute("aria-label", "Upload progress of " + file.name);
    var outcome = document.createElement("span");
    outcome.className = "upload-outcome";
    outcome.textContent = "Waiting";
    li.appendChild(name); li.appendChild(bar); li.appendChild(outcome);
    return { li: li, bar: bar, outcome: outcome };
  }

  function show(ui, kind, text) {
    ui.li.dataset.outcome = kind;
    ui.outcome.className = "upload-outcome outcome-" + kind;
    ui.outcome.textContent = text;
  }

  function sendOne(file, ui, token) {
    return new Promise(function (resolve) {
      var video = /^video\//.test(file.type);
      var maxBytes = parseInt(video ? form.dataset.maxVideoBytes : form.dataset.maxBytes, 10);
      if (maxBytes && file.size > maxBytes) {
        show(ui, "rejected", "Rejected: larger than " + Math.round(maxBytes / 1048576) + " MB");
        resolve(); return;
      }
      var data = new FormData();
      data.append("files", file);
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.setRequestHeader("X-CSRFToken", token);
      xhr.upload.onprogress = function (e) { if (e.lengthComputable) { ui.bar.value = Math.round(100 * e.loaded / e.total); } };
      xhr.onload = function () {
        if (xhr.status === 429) {
          // The upload rate limit counts requests: wait as told, then send this file again.
          var wait = parseInt(xhr.getResponseHeader("Retry-After"), 10) || 5;
          show(ui, "sending", "Waiting " + wait + " s (rate limit)");
          setTimeout(function () { sendOne(file, ui, token).then(resolve); }, wait * 1000);
          return;
        }
        var body = null;
        try { body = JSON.parse(xhr.responseText); } catch (err) { body = null; }
        var result = body && body.results && body.results[0];
        ui.bar.value = 100;
        if (result && result.video) {
          show(ui, "accepted", result.outcome === "duplicate" ? "Duplicate: already in this collection"
            : "Accepted: the video is being indexed; it shows under Videos when ready");
        } else if (result && result.outcome === "accepted") {
          show(ui, "accepted", "Accepted"); addTile(result);
        } else if (result && result.outcome === "duplicate") {
          show(ui, "duplicate", "Duplicate: already in this collection"); addTile(result);
        } else if (result) {
          show(ui, "rejected", "Rejected: " + result.message);
        } else {
          show(ui, "rejected", "Rejected: " + ((body && body.message) || "the server answered " + xhr.status));
        }
        resolve();
      };
      xhr.onerror = function () { show(ui, "rejected", "Failed: the network request did not complete"); resolve(); };
      show(ui, "sending", "Uploading");
      xhr.send(data);
    });
  }

  function upload(files) {
    var results = document.getElementById("upload-results");
    var token = form.querySelector("[name=csrfmiddlewaretoken]").value;
    var list = Array.prototype.slice.call(files);
    var rows = list.map(function (file) { var ui = row(file); results.appendChild(ui.li); return ui; });
    // Two at a time: progress stays readable and the server is not flooded by a big drop.
    var next = 0;
    function worker() {
      if (next >= list.length) { return Promise.resolve(); }
      var i = next++;
      return sendOne(list[i], rows[i], token).then(worker);
    }
    Promise.all([worker(), worker()]).then(ensurePolling);
  }

  if (form) {
    ["dragenter", "dragover"].forEach(function (name) {
      form.addEventListener(name, function (e) { e.preventDefault(); form.classList.add("over"); });
    });
    ["dragleave", "drop"].forEach(function (name) {
      form.addEventListener(name, function (e) { e.preventDefault(); form.classList.remove("over"); });
    });
    form.addEventListener("drop", function (e) { if (e.dataTransfer.files.length) { upload(e.dataTransfer.files); } });
    var input = form.querySelector("input[type=file]");
    input.addEventListener("change", function () { if (input.files.length) { upload(input.files); input.value = ""; } });
    form.addEventListener("submit", function (e) {
      if (input.files.length) { e.preventDefault(); upload(input.files); input.value = ""; }
    });
  }
  ensurePolling();
})();
