/* ciserver public pages, progressive enhancement. Without this script the form posts as a
   plain HTML form and the server answers with a confirmation page; with it, the same POST
   goes by fetch (Accept: application/json), the confirmation shows inline, and each game's
   time is also shown in the viewer's own time zone. Only textContent is used: no HTML from
   data is ever parsed. */
(function () {
  "use strict";

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text) { node.textContent = text; }
    if (cls) { node.className = cls; }
    return node;
  }

  function offsetMinutes(iso) {
    var m = /(Z|([+-])(\d\d):(\d\d))$/.exec(iso);
    if (!m) { return null; }
    if (m[1] === "Z") { return 0; }
    var v = parseInt(m[3], 10) * 60 + parseInt(m[4], 10);
    return m[2] === "-" ? -v : v;
  }

  /* "Your time: Sat, 1 May, 14:00 EDT" under each game, when the viewer is elsewhere. */
  function viewerTimes() {
    var zone = "";
    try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (e) { return; }
    var fmt;
    try {
      fmt = new Intl.DateTimeFormat(undefined, {
        weekday: "short", day: "numeric", month: "short",
        hour: "2-digit", minute: "2-digit", timeZoneName: "short"
      });
    } catch (e) { return; }
    var nodes = document.querySelectorAll(".viewer-time[data-start]");
    for (var i = 0; i < nodes.length; i++) {
      var node = nodes[i];
      var iso = node.getAttribute("data-start");
      var when = new Date(iso);
      if (isNaN(when.getTime())) { continue; }
      var venue = offsetMinutes(iso);
      var mine = -when.getTimezoneOffset();
      if (node.getAttribute("data-tz") === zone || (venue !== null && venue === mine)) {
        continue;
      }
      node.textContent = "Your time: " + fmt.format(when);
      node.hidden = false;
    }
  }

  var form = document.getElementById("invite-form");
  var status = document.getElementById("form-status");
  var confirmation = document.getElementById("confirmation");
  var send = document.getElementById("send");

  function boxes() { return form.querySelectorAll('input[name="events"]'); }

  function showStatus(message, isError) {
    if (!status) { return; }
    status.textContent = message;
    status.className = isError ? "error" : "notice";
    status.setAttribute("role", isError ? "alert" : "status");
    status.hidden = false;
  }

  function markInvalid(field) {
    var email = document.getElementById("email");
    if (email) {
      if (field === "email") {
        email.setAttribute("aria-invalid", "true");
        email.setAttribute("aria-describedby", "form-status");
      } else {
        email.removeAttribute("aria-invalid");
        email.removeAttribute("aria-describedby");
      }
    }
    if (field === "email" && email) { email.focus(); }
    else if (field === "events" && boxes().length) { boxes()[0].focus(); }
    else if (status) { status.focus(); }
  }

  function showConfirmation(data) {
    confirmation.textContent = "";
    var title = el("h2", "Check your mailbox");
    title.id = "confirmation-title";
    confirmation.appendChild(title);
    var msg = el("p", data.message || "Done!", "notice");
    msg.id = "confirmation-message";
    msg.setAttribute("role", "status");
    confirmation.appendChild(msg);
    var list = el("ul", "", "confirmed");
    list.setAttribute("role", "list");
    (data.games || []).forEach(function (g) {
      var item = el("li", "", "confirmed-game");
      item.setAttribute("data-event", g.id);
      item.appendChild(el("strong", g.summary));
      item.appendChild(el("span", g.sent ? "Invite sent" : "Already sent earlier",
                          g.sent ? "badge" : "badge badge--quiet"));
      item.appendChild(el("br"));
      item.appendChild(document.createTextNode(g.when + (g.location ? " · " + g.location : "")));
      list.appendChild(item);
    });
    confirmation.appendChild(list);
    confirmation.appendChild(el("p", "Open the invite and answer Yes or Maybe: it goes on " +
      "your calendar, and any later change or cancellation updates it by itself. Nothing " +
      "there in a few minutes? Please look in your spam folder."));
    var again = el("button", "Send to another address");
    again.type = "button";
    again.id = "send-again";
    again.addEventListener("click", function () {
      confirmation.hidden = true;
      form.hidden = false;
      var email = document.getElementById("email");
      if (email) { email.value = ""; email.focus(); }
    });
    confirmation.appendChild(again);
    if (status) { status.hidden = true; }
    form.hidden = true;
    confirmation.hidden = false;
    confirmation.focus();
  }

  function enhanceForm() {
    if (!form || !window.fetch || !window.FormData || !window.URLSearchParams) { return; }
    if (form.getAttribute("data-preview")) { return; }  /* the console's preview */

    var all = document.getElementById("select-all");
    if (all) {
      var sync = function () {
        var list = boxes(), allOn = list.length > 0;
        for (var i = 0; i < list.length; i++) { allOn = allOn && list[i].checked; }
        all.textContent = allOn ? "Clear all" : "Select all";
      };
      all.hidden = false;
      all.addEventListener("click", function () {
        var list = boxes(), allOn = true;
        for (var i = 0; i < list.length; i++) { allOn = allOn && list[i].checked; }
        for (var j = 0; j < list.length; j++) { list[j].checked = !allOn; }
        sync();
      });
      form.addEventListener("change", sync);
      sync();
    }

    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var list = boxes(), picked = 0;
      for (var i = 0; i < list.length; i++) { if (list[i].checked) { picked++; } }
      if (list.length > 1 && picked === 0) {
        showStatus("Please pick at least one game.", true);
        markInvalid("events");
        return;
      }
      send.disabled = true;
      send.setAttribute("aria-busy", "true");
      var body = new URLSearchParams(new FormData(form));
      fetch(form.action, {
        method: "POST", body: body, credentials: "same-origin",
        headers: { "Accept": "application/json" }
      }).then(function (r) {
        return r.json().then(function (data) { return { status: r.status, data: data }; });
      }).then(function (res) {
        send.disabled = false;
        send.removeAttribute("aria-busy");
        if (res.data && res.data.ok) {
          showConfirmation(res.data);
          return;
        }
        var err = (res.data && res.data.error) || {};
        showStatus(err.message || "Something went wrong; please try again.", true);
        markInvalid(err.field || "");
      }).catch(function () {
        /* The server could not be reached by fetch: fall back to the plain form post. */
        send.disabled = false;
        send.removeAttribute("aria-busy");
        HTMLFormElement.prototype.submit.call(form);
      });
    });
  }

  viewerTimes();
  enhanceForm();
})();
