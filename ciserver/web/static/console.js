// ciserver organizer console: live answer counts (events table, an event's figures), the
// live page preview, copy buttons.
// Every page works without this file; it only makes them update by themselves.
(function () {
  "use strict";

  // Live counts: /console/counts.json every few seconds while the tab is visible.
  function startCounts(table) {
    var url = table.getAttribute("data-counts-url");
    var status = document.getElementById("counts-status");
    var stopped = false;
    function update(data) {
      (data.events || []).forEach(function (ev) {
        var row = table.querySelector('tr[data-event-id="' + String(ev.id).replace(/[^a-z0-9]/gi, "") + '"]');
        if (!row) { return; }
        row.querySelectorAll("[data-count]").forEach(function (cell) {
          var key = cell.getAttribute("data-count");
          if (!(key in ev)) { return; }
          var text = String(ev[key]);
          if (cell.textContent !== text) {
            cell.textContent = text;
            cell.classList.add("changed");
            window.setTimeout(function () { cell.classList.remove("changed"); }, 2000);
          }
        });
      });
      if (status) { status.textContent = "Updated " + new Date().toLocaleTimeString(); }
    }
    function poll() {
      if (stopped) { return; }
      if (document.visibilityState === "hidden") { window.setTimeout(poll, 5000); return; }
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" }, cache: "no-store" })
        .then(function (r) {
          if (r.status === 401) { stopped = true; if (status) { status.textContent = "Signed out: reload the page."; } return null; }
          return r.ok ? r.json() : null;
        })
        .then(function (data) { if (data) { update(data); } })
        .catch(function () { /* offline for a moment: try again later */ })
        .then(function () { if (!stopped) { window.setTimeout(poll, 5000); } });
    }
    window.setTimeout(poll, 5000);
  }

  // Live preview: the iframe shows /console/preview with the form's current values.
  function startPreview(form, frame) {
    var base = frame.getAttribute("data-preview-url");
    var timer = null;
    function refresh() {
      var params = new URLSearchParams();
      new FormData(form).forEach(function (value, key) {
        if (key !== "csrf" && key !== "slug" && typeof value === "string" && value !== "") {
          params.append(key, value);
        }
      });
      frame.src = base + "?" + params.toString();
    }
    function later() {
      if (timer) { window.clearTimeout(timer); }
      timer = window.setTimeout(refresh, 350);
    }
    form.addEventListener("input", later);
    form.addEventListener("change", later);
  }

  function startCopy(button) {
    button.addEventListener("click", function () {
      var field = document.getElementById(button.getAttribute("data-copy"));
      if (!field) { return; }
      field.select();
      var done = function () { button.textContent = "Copied"; window.setTimeout(function () { button.textContent = "Copy"; }, 1500); };
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(field.value).then(done, function () {});
      } else if (document.execCommand && document.execCommand("copy")) {
        done();
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    // The events table of the home page, the figures of an event's report.
    document.querySelectorAll("table[data-counts-url]").forEach(startCounts);
    var form = document.getElementById("page-form");
    var frame = document.getElementById("preview");
    if (form && frame) { startPreview(form, frame); }
    document.querySelectorAll("button.copy[data-copy]").forEach(startCopy);
  });
}());
