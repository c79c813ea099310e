// Collection page: drag-and-drop uploads and live status of images still processing.
(function () {
  "use strict";
  var grid = document.getElementById("grid");
  var form = document.getElementById("upload");

  function pendingKeys() {
    var tiles = grid ? grid.querySelectorAll(".tile[data-status=pending], .tile[data-status=processing]") : [];
    return Array.prototype.map.call(tiles, function (t) { return t.dataset.key; });
  }

  function poll() {
    var keys = pendingKeys();
    if (!keys.length) { return; }
    fetch(grid.dataset.statusUrl + "?keys=" + encodeURIComponent(keys.join(",")), { credentials: "same-origin" })
      .then(function (r) { return r.json(); })
      .then(function (data) {
        data.images.forEach(function (img) {
          var tile = grid.querySelector('.tile[data-key="' + img.key + '"]');
          if (!tile || tile.dataset.status === img.status) { return; }
          tile.dataset.status = img.status;
          var label = tile.querySelector(".status");
          label.className = "status status-" + img.status;
          label.textContent = img.status.charAt(0).toUpperCase() + img.status.slice(1);
          if (img.thumbnail_url) {
            var link = tile.querySelector("a");
            link.innerHTML = "";
            var el = document.createElement("img");
            el.src = img.thumbnail_url; el.alt = "Image"; el.loading = "lazy";
            link.appendChild(el);
          }
          if (img.error) { label.title = img.error; }
        });
      })
      .catch(function (err) { console.error("Simili: status poll failed", err); })
      .finally(function () { setTimeout(poll, 1500); });
  }

  function upload(files) {
    var data = new FormData();
    var results = document.getElementById("upload-results");
    Array.prototype.forEach.call(files, function (f) { data.append("files", f); });
    data.append("csrfmiddlewaretoken", form.querySelector("[name=csrfmiddlewaretoken]").value);
    results.innerHTML = "<li>Uploading " + files.length + " file(s)…</li>";
    fetch(form.action, { method: "POST", body: data, credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.json(); })
      .then(function (body) {
        var rejected = (body.results || []).filter(function (r) { return r.outcome === "rejected"; });
        if (!rejected.length) { window.location.reload(); return; }
        results.innerHTML = "";
        body.results.forEach(function (r) {
          var li = document.createElement("li");
          li.textContent = r.name + ": " + (r.outcome === "rejected" ? r.message : r.outcome);
          results.appendChild(li);
        });
        var link = document.createElement("li");
        link.innerHTML = '<a href="">Show the collection</a>';
        results.appendChild(link);
      })
      .catch(function (err) { results.innerHTML = "<li>Upload failed: " + err + "</li>"; });
  }

  if (form) {
    ["dragenter", "dragover"].forEach(function (name) {
      form.addEventListener(name, function (e) { e.preventDefault(); form.classList.add("over"); });
    });
    ["dragleave", "drop"].forEach(function (name) {
      form.addEventListener(name, function (e) { e.preventDefault(); form.classList.remove("over"); });
    });
    form.addEventListener("drop", function (e) { if (e.dataTransfer.files.length) { upload(e.dataTransfer.files); } });
    form.addEventListener("submit", function (e) {
      var input = form.querySelector("input[type=file]");
      if (window.fetch && input.files.length) { e.preventDefault(); upload(input.files); }
    });
  }
  if (grid) { poll(); }
})();
