/* ciserver invite button for any web site:

     <script src="https://HOST/embed.js" data-event="ID" data-label="Add to my calendar" async></script>
     <script src="https://HOST/embed.js" data-events="ID1,ID2" async></script>

   Optional: data-label (button text), data-color (#rrggbb button color),
   data-placeholder (email field hint), data-target (CSS selector of the element to render
   into; default: where the script tag is).

   The button and its email field live in a shadow root, so the host page's CSS cannot break
   them and theirs cannot leak out. The address is POSTed as JSON to the server the script
   came from (POST /api/v1/events/ID/invites or /api/v1/invites); no cookies are sent. Only
   textContent is used: nothing from attributes or answers is parsed as HTML. */
(function () {
  "use strict";

  var CSS = [
    ":host{display:inline-block;max-width:100%;vertical-align:middle}",
    ".ci{display:flex;flex-wrap:wrap;gap:.5em;align-items:center;margin:0;",
    "font:15px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif;color:#1a1a1a}",
    ".ci input{font:inherit;flex:1 1 14em;min-width:0;padding:.55em .7em;color:#1a1a1a;",
    "background:#fff;border:2px solid #767676;border-radius:6px}",
    ".ci button{font:inherit;font-weight:700;min-height:40px;padding:.55em 1.1em;border:0;",
    "border-radius:6px;background:var(--ci-color,#0b57d0);color:var(--ci-on,#fff);cursor:pointer}",
    ".ci button:disabled{opacity:.65;cursor:progress}",
    ".ci input:focus-visible,.ci button:focus-visible,.ci a:focus-visible{outline:3px solid #f9ab00;",
    "outline-offset:2px}",
    ".status{flex-basis:100%;margin:0}",
    ".status:empty{display:none}",
    ".ok{padding:.6em .8em;border-radius:6px;background:#e6f4ea;color:#0d3b1e}",
    ".err{padding:.6em .8em;border-radius:6px;background:#fce8e6;color:#5c1010}",
    ".err a{color:inherit}",
    ".vh{position:absolute;width:1px;height:1px;margin:-1px;overflow:hidden;clip:rect(0 0 0 0);",
    "white-space:nowrap;border:0}"
  ].join("");

  var counter = 0;

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text) { node.textContent = text; }
    if (cls) { node.className = cls; }
    return node;
  }

  function luminance(hex) {
    var c = [1, 3, 5].map(function (i) {
      var s = parseInt(hex.substr(i, 2), 16) / 255;
      return s <= 0.04045 ? s / 12.92 : Math.pow((s + 0.055) / 1.055, 2.4);
    });
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
  }

  function serverOf(script) {
    return script.src.replace(/\/embed\.js(?:[?#].*)?$/, "");
  }

  function eventsOf(script) {
    var raw = script.getAttribute("data-events") || script.getAttribute("data-event") || "";
    var out = [];
    raw.split(",").forEach(function (part) {
      part = part.trim();
      /* All of them, never the first few: the server refuses a list that is too long with
         a message naming its limit, where a cut list would answer "Done!" for games it
         never sent. */
      if (part && out.indexOf(part) < 0) { out.push(part); }
    });
    return out;
  }

  function place(script, host) {
    var selector = script.getAttribute("data-target");
    var target = null;
    if (selector) {
      try { target = document.querySelector(selector); } catch (e) { target = null; }
    }
    if (target) { target.appendChild(host); return; }
    var parent = script.parentNode;
    if (parent && parent.nodeName !== "HEAD" && parent.nodeName !== "HTML") {
      parent.insertBefore(host, script);
    } else if (document.body) {
      document.body.appendChild(host);
    } else {
      document.addEventListener("DOMContentLoaded", function () {
        document.body.appendChild(host);
      });
    }
  }

  function mount(script) {
    if (!script || script.getAttribute("data-ci-mounted")) { return; }
    var events = eventsOf(script);
    if (!events.length || !script.src) { return; }
    script.setAttribute("data-ci-mounted", "1");
    var server = serverOf(script);
    var many = events.length > 1;
    var n = ++counter;

    var host = el("span", "", "ciserver-invite");
    var root = host.attachShadow ? host.attachShadow({ mode: "open" }) : host;
    if (root !== host && root.adoptedStyleSheets !== undefined && window.CSSStyleSheet) {
      try {
        var sheet = new CSSStyleSheet();
        sheet.replaceSync(CSS);
        root.adoptedStyleSheets = [sheet];
      } catch (e) { root.appendChild(el("style", CSS)); }
    } else if (root !== host) {
      root.appendChild(el("style", CSS));
    }

    var form = el("form", "", "ci");
    form.setAttribute("part", "form");
    var color = script.getAttribute("data-color") || "";
    if (/^#[0-9a-fA-F]{6}$/.test(color)) {
      form.style.setProperty("--ci-color", color);
      form.style.setProperty("--ci-on", luminance(color) > 0.179 ? "#000" : "#fff");
    }
    var label = el("label", "Your email address", "vh");
    label.htmlFor = "ciserver-email-" + n;
    var input = el("input");
    input.type = "email";
    input.name = "email";
    input.id = "ciserver-email-" + n;
    input.required = true;
    input.autocomplete = "email";
    input.maxLength = 320;
    input.placeholder = script.getAttribute("data-placeholder") || "you@example.com";
    var button = el("button", script.getAttribute("data-label") ||
                    (many ? "Add these games to my calendar" : "Add to my calendar"));
    button.type = "submit";
    var status = el("p", "", "status");
    status.setAttribute("role", "status");
    status.setAttribute("aria-live", "polite");
    form.appendChild(label);
    form.appendChild(input);
    form.appendChild(button);
    form.appendChild(status);
    root.appendChild(form);
    place(script, host);

    var fallback = server + (many ? "/i?events=" + encodeURIComponent(events.join(","))
                                  : "/i/" + encodeURIComponent(events[0]));

    function fail(message, withLink) {
      status.textContent = message;
      status.className = "status err";
      if (withLink) {
        status.appendChild(document.createTextNode(" "));
        var link = el("a", "Open the invite page");
        link.href = fallback + (many ? "&" : "?") + "email=" +
                    encodeURIComponent(input.value.trim());
        link.target = "_blank";
        link.rel = "noopener noreferrer";
        status.appendChild(link);
      }
      button.disabled = false;
    }

    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var email = input.value.trim();
      if (!email) { input.focus(); return; }
      var url = server + (many ? "/api/v1/invites"
                               : "/api/v1/events/" + encodeURIComponent(events[0]) + "/invites");
      var body = { email: email };
      if (many) { body.events = events; }
      button.disabled = true;
      status.className = "status";
      status.textContent = "Sending…";
      if (!window.fetch) { fail("This browser cannot send from here.", true); return; }
      fetch(url, {
        method: "POST", mode: "cors", credentials: "omit",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body)
      }).then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (data) {
          return { ok: r.ok, status: r.status, data: data };
        });
      }).then(function (res) {
        if (res.ok) {
          var already = res.data && res.data.status === "already_subscribed";
          form.textContent = "";
          var done = el("p", already
            ? email + (many ? " already has these invites." : " already has this invite.")
            : "Done! Check your mailbox: the invite" + (many ? "s are" : " is") +
              " on the way to " + email + ". Answer Yes and it is on your calendar.",
            "status ok");
          done.setAttribute("role", "status");
          form.appendChild(done);
          return;
        }
        if (res.status === 429) { fail("Too many requests; please try again later.", false); return; }
        var err = (res.data && res.data.error) || {};
        /* Only a refused address is the visitor's to fix; any other 422 (too many games on
           the button, say) is shown as the server words it, naming the real problem. */
        if (res.status === 422 && (err.code === "invalid_email" || !err.message ||
                                   /^email\b/.test(err.message))) {
          fail("Please enter a valid email address.", false);
          input.focus();
          return;
        }
        fail(err.message || "The invite could not be sent.", res.status >= 500);
      }, function () {
        fail("Could not reach the invite server.", true);
      });
    });
  }

  var current = document.currentScript;
  if (current && current.src) {
    mount(current);
  } else {
    var scripts = document.querySelectorAll("script[src*='/embed.js']");
    for (var i = 0; i < scripts.length; i++) { mount(scripts[i]); }
  }
})();
