// Enhancements only: every page works without this file.
(function () {
  "use strict";
  // Filters apply as soon as a select changes.
  document.querySelectorAll("form[data-autosubmit] select").forEach(function (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  });
  // A journey page can refresh its numbers; the choice is kept for the tab.
  var box = document.getElementById("refresh");
  if (box) {
    var key = "nurture.refresh";
    var seconds = parseInt(box.getAttribute("data-refresh"), 10) || 30;
    var timer = null;
    var arm = function () {
      if (timer) { clearTimeout(timer); timer = null; }
      if (box.checked) { timer = setTimeout(function () { window.location.reload(); }, seconds * 1000); }
    };
    box.checked = sessionStorage.getItem(key) === "1";
    box.addEventListener("change", function () { sessionStorage.setItem(key, box.checked ? "1" : "0"); arm(); });
    arm();
  }
  // After a step is chosen on the map, move focus to its details (keyboard and screen readers).
  if (window.location.hash === "#step") {
    var step = document.getElementById("step");
    if (step) { step.focus(); }
  }
}());
