// Video page: a keyframe click seeks the player there (without reloading); ?t= starts there.
(function () {
  "use strict";
  var player = document.getElementById("player");
  if (!player) { return; }
  var start = parseFloat(player.dataset.start || "0");
  if (start > 0) {
    // The #t= media fragment already asks for it; set it too for players that ignore fragments.
    player.addEventListener("loadedmetadata", function () {
      if (Math.abs(player.currentTime - start) > 0.5) { player.currentTime = start; }
    }, { once: true });
  }
  var strip = document.getElementById("keyframes");
  if (strip) {
    strip.addEventListener("click", function (e) {
      var link = e.target.closest("a[data-timestamp]");
      if (!link) { return; }
      e.preventDefault();
      player.currentTime = parseFloat(link.dataset.timestamp);
      player.play().catch(function () { /* autoplay refused: the position is set all the same */ });
      history.replaceState(null, "", link.getAttribute("href"));
    });
  }
})();
