// enricher review page: live character counters, inline edit, keyboard shortcuts.
// Plain JavaScript, no build step. All text comes from the server already escaped; this
// script never inserts HTML, only text.
(function () {
  "use strict";
  // Unicode scalar values, as the server counts them.
  function chars(s) { return Array.from(s).length; }

  function updateCounter(area) {
    var id = area.id.replace(/^edit-/, "count-");
    var out = document.getElementById(id);
    if (!out) return;
    var n = chars(area.value);
    var max = parseInt(area.dataset.max || "0", 10);
    var min = parseInt(area.dataset.min || "0", 10);
    out.textContent = max > 0 ? n + "/" + max : String(n);
    out.classList.toggle("over", max > 0 && n > max);
    out.classList.toggle("under", min > 0 && n < min);
  }

  document.querySelectorAll("textarea[data-max]").forEach(function (a) {
    a.addEventListener("input", function () { updateCounter(a); });
    updateCounter(a);
  });

  var editForm = document.getElementById("edit-form");
  var view = document.getElementById("view");
  var actions = document.getElementById("actions");
  function toggleEdit(on) {
    if (!editForm) return;
    editForm.classList.toggle("hidden", !on);
    if (view) view.classList.toggle("hidden", on);
    if (actions) actions.classList.toggle("hidden", on);
    if (on) {
      var first = editForm.querySelector("textarea");
      if (first) first.focus();
    }
  }
  var editBtn = document.getElementById("edit");
  if (editBtn) editBtn.addEventListener("click", function () { toggleEdit(true); });
  var cancel = document.getElementById("cancel-edit");
  if (cancel) cancel.addEventListener("click", function () { toggleEdit(false); });

  // Queue: j/k move the selection, Enter opens.
  var rows = Array.prototype.slice.call(document.querySelectorAll("tr.row"));
  var sel = rows.length ? 0 : -1;
  function select(i) {
    if (!rows.length) return;
    sel = Math.max(0, Math.min(rows.length - 1, i));
    rows.forEach(function (r, j) { r.classList.toggle("selected", j === sel); });
    rows[sel].scrollIntoView({ block: "nearest" });
  }
  if (rows.length) select(0);
  rows.forEach(function (r, j) {
    r.addEventListener("click", function (e) {
      if (e.target.tagName !== "A") { select(j); window.location = r.dataset.href; }
    });
  });

  function typing(e) {
    var t = e.target;
    return t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable);
  }

  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (typing(e)) {
      if (e.key === "Escape") { e.target.blur(); toggleEdit(false); }
      return;
    }
    var go = function (id) { var a = document.getElementById(id); if (a) window.location = a.href; };
    switch (e.key) {
      case "j":
        if (rows.length) select(sel + 1); else go("next");
        break;
      case "k":
        if (rows.length) select(sel - 1); else go("prev");
        break;
      case "Enter":
        if (rows.length && sel >= 0) window.location = rows[sel].dataset.href;
        break;
      case "a":
        var ap = document.getElementById("approve");
        if (ap && !ap.disabled) { e.preventDefault(); ap.click(); }
        break;
      case "e":
        e.preventDefault(); toggleEdit(true);
        break;
      case "r":
        var reason = document.getElementById("reason");
        if (reason) { e.preventDefault(); reason.focus(); }
        break;
    }
  });
})();
