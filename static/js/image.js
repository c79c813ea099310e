// Image page: arrow keys walk the collection; drag a box on the image to search by that region.
(function () {
  "use strict";

  document.addEventListener("keydown", function (e) {
    if (e.altKey || e.ctrlKey || e.metaKey || e.shiftKey) { return; }
    var target = e.target;
    if (target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) { return; }
    var link = document.getElementById(e.key === "ArrowLeft" ? "prev-image" : e.key === "ArrowRight" ? "next-image" : "");
    if (link) { e.preventDefault(); window.location.assign(link.href); }
  });

  var stage = document.getElementById("region-stage");
  var img = document.getElementById("main-image");
  var box = document.getElementById("region-box");
  var form = document.getElementById("region-form");
  var searchButton = document.getElementById("region-search");
  var clearButton = document.getElementById("region-clear");
  if (!stage || !img || !box || !form) { return; }

  var MIN_SIDE = 16; // CSS pixels: smaller drags are clicks, not selections
  var start = null;
  var region = null; // {x, y, w, h} in CSS pixels relative to the image

  function point(e) {
    var rect = img.getBoundingClientRect();
    return {
      x: Math.max(0, Math.min(rect.width, e.clientX - rect.left)),
      y: Math.max(0, Math.min(rect.height, e.clientY - rect.top))
    };
  }

  function draw(r) {
    box.hidden = false;
    box.style.left = (img.offsetLeft + r.x) + "px";
    box.style.top = (img.offsetTop + r.y) + "px";
    box.style.width = r.w + "px";
    box.style.height = r.h + "px";
  }

  function setRegion(r) {
    region = r;
    searchButton.disabled = !r;
    clearButton.disabled = !r;
    if (!r) { box.hidden = true; }
  }

  img.addEventListener("dragstart", function (e) { e.preventDefault(); });
  stage.addEventListener("pointerdown", function (e) {
    if (e.button !== 0) { return; }
    start = point(e);
    stage.setPointerCapture(e.pointerId);
    e.preventDefault();
  });
  stage.addEventListener("pointermove", function (e) {
    if (!start) { return; }
    var p = point(e);
    draw({ x: Math.min(start.x, p.x), y: Math.min(start.y, p.y), w: Math.abs(p.x - start.x), h: Math.abs(p.y - start.y) });
  });
  function finish(e) {
    if (!start) { return; }
    var p = point(e);
    var r = { x: Math.min(start.x, p.x), y: Math.min(start.y, p.y), w: Math.abs(p.x - start.x), h: Math.abs(p.y - start.y) };
    start = null;
    if (r.w < MIN_SIDE || r.h < MIN_SIDE) { setRegion(null); return; }
    draw(r);
    setRegion(r);
    searchButton.focus();
  }
  stage.addEventListener("pointerup", finish);
  stage.addEventListener("pointercancel", function () { start = null; });

  clearButton.addEventListener("click", function () { setRegion(null); });

  searchButton.addEventListener("click", function () {
    if (!region) { return; }
    var scaleX = img.naturalWidth / img.clientWidth;
    var scaleY = img.naturalHeight / img.clientHeight;
    var sx = Math.round(region.x * scaleX), sy = Math.round(region.y * scaleY);
    var sw = Math.max(1, Math.round(region.w * scaleX)), sh = Math.max(1, Math.round(region.h * scaleY));
    var canvas = document.createElement("canvas");
    canvas.width = sw;
    canvas.height = sh;
    canvas.getContext("2d").drawImage(img, sx, sy, sw, sh, 0, 0, sw, sh);
    searchButton.disabled = true;
    searchButton.textContent = "Searching…";
    canvas.toBlob(function (blob) {
      // The crop travels as an ordinary file field, so the search page answers as for any upload.
      var transfer = new DataTransfer();
      transfer.items.add(new File([blob], "region.png", { type: "image/png" }));
      document.getElementById("region-file").files = transfer.files;
      form.submit();
    }, "image/png");
  });
})();
