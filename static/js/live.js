// makima live directive page. On a page with
//   <div id="directive-page" data-live-socket="/ws/directives/<id>/" [data-last-event-id="<id>"]>
// it opens the directive's websocket and, whenever events arrive, re-fetches
// every element carrying data-live-url and swaps it for the server's fresh
// copy (each partial answers with one root element, same id, same data-live-url).
// Events are only a cue to refresh: nothing from the socket is ever inserted
// as HTML. While the socket is down the page polls every 3 s instead.
(function () {
  "use strict";

  var DEBOUNCE_MS = 200;
  var POLL_MS = 3000;
  var BACKOFF_MIN_MS = 1000;
  var BACKOFF_MAX_MS = 10000;
  // The server refuses for good (signed out, directive no longer visible).
  var FINAL_CLOSE_CODES = { 4401: "offline \u2014 sign in again", 4404: "offline \u2014 not available" };

  var page = document.querySelector("#directive-page[data-live-socket]");
  if (!page || !window.WebSocket || !window.fetch) {
    return;
  }
  var socketPath = page.getAttribute("data-live-socket") || "";
  if (socketPath.charAt(0) !== "/" || socketPath.charAt(1) === "/") {
    return; // same host only
  }
  var socketUrl = (window.location.protocol === "https:" ? "wss://" : "ws://") + window.location.host + socketPath;

  var lastEventId = parseInt(page.getAttribute("data-last-event-id") || "", 10);
  if (isNaN(lastEventId)) {
    lastEventId = null;
  }

  // ------------------------------------------------------------------ indicator

  var indicator = document.getElementById("live-status");
  if (!indicator) {
    indicator = document.createElement("span");
    indicator.id = "live-status";
    page.insertBefore(indicator, page.firstChild);
  }
  indicator.setAttribute("role", "status");
  indicator.classList.add("live-status");

  function setStatus(text, state) {
    indicator.textContent = text;
    indicator.setAttribute("data-state", state);
  }

  // ------------------------------------------------------------------ refreshing

  var timer = null;
  var inFlight = false;
  var again = false;

  function scheduleRefresh(delay) {
    if (inFlight) {
      again = true; // one more refresh after the current one
      return;
    }
    if (timer !== null) {
      return;
    }
    timer = window.setTimeout(function () {
      timer = null;
      refresh();
    }, delay === undefined ? DEBOUNCE_MS : delay);
  }

  function liveElements() {
    var all = document.querySelectorAll("[data-live-url]");
    var outermost = [];
    for (var i = 0; i < all.length; i++) {
      var parent = all[i].parentElement;
      // A nested live element is replaced together with its ancestor.
      if (!parent || !parent.closest("[data-live-url]")) {
        outermost.push(all[i]);
      }
    }
    return outermost;
  }

  // Carry over what the user was doing inside an element: typed text, ticked
  // boxes, opened <details> and scroll positions, matched by id.
  function carryState(oldEl, newEl) {
    var scrolled = [oldEl].concat(Array.prototype.slice.call(oldEl.querySelectorAll("[id]")));
    for (var s = 0; s < scrolled.length; s++) {
      var box = scrolled[s];
      if (box.id && (box.scrollTop || box.scrollLeft)) {
        var same = box === oldEl ? newEl : newEl.querySelector("#" + cssEscape(box.id));
        if (same) {
          same.setAttribute("data-live-scroll", box.scrollLeft + "," + box.scrollTop);
        }
      }
    }
    var fields = oldEl.querySelectorAll("input[id], textarea[id], select[id], details[id]");
    for (var i = 0; i < fields.length; i++) {
      var field = fields[i];
      var twin = newEl.querySelector("#" + cssEscape(field.id));
      if (!twin || twin.tagName !== field.tagName) {
        continue;
      }
      if (field.tagName === "DETAILS") {
        twin.open = field.open;
      } else if (field.type === "checkbox" || field.type === "radio") {
        if (field.checked !== field.defaultChecked) {
          twin.checked = field.checked;
        }
      } else if (field.type !== "hidden" && field.type !== "file" && field.value !== fieldDefault(field)) {
        twin.value = field.value;
      }
    }
  }

  function fieldDefault(field) {
    if (field.tagName === "SELECT") {
      for (var i = 0; i < field.options.length; i++) {
        if (field.options[i].defaultSelected) {
          return field.options[i].value;
        }
      }
      return field.options.length ? field.options[0].value : "";
    }
    return field.defaultValue;
  }

  function cssEscape(value) {
    return window.CSS && window.CSS.escape ? window.CSS.escape(value) : value.replace(/[^a-zA-Z0-9_-]/g, "\\$&");
  }

  function restoreScroll(root) {
    var boxes = [root].concat(Array.prototype.slice.call(root.querySelectorAll("[data-live-scroll]")));
    for (var i = 0; i < boxes.length; i++) {
      var at = boxes[i].getAttribute("data-live-scroll");
      if (at) {
        var parts = at.split(",");
        boxes[i].removeAttribute("data-live-scroll");
        boxes[i].scrollLeft = parseInt(parts[0], 10) || 0;
        boxes[i].scrollTop = parseInt(parts[1], 10) || 0;
      }
    }
  }

  function refreshElement(el) {
    var url = el.getAttribute("data-live-url");
    if (!url || url.charAt(0) !== "/" || url.charAt(1) === "/") {
      return Promise.resolve();
    }
    return window
      .fetch(url, { headers: { "HX-Request": "true" }, credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        // Signed out (redirected to the login page) or gone: keep what is shown.
        if (!response.ok || response.redirected) {
          return null;
        }
        return response.text();
      })
      .then(function (html) {
        if (html === null || !el.isConnected || el.liveHtml === html) {
          return;
        }
        var template = document.createElement("template");
        template.innerHTML = html.trim(); // server-rendered, auto-escaped partial
        var fresh = template.content.firstElementChild;
        if (!fresh || (el.id && fresh.id !== el.id)) {
          return;
        }
        carryState(el, fresh);
        fresh.liveHtml = html;
        el.replaceWith(fresh);
        restoreScroll(fresh);
        if (window.htmx) {
          window.htmx.process(fresh);
        }
      })
      .catch(function () {
        // A network hiccup: the next event or poll tries again.
      });
  }

  function refresh() {
    if (inFlight) {
      again = true;
      return;
    }
    inFlight = true;
    var active = document.activeElement;
    var focusId = active && active !== document.body ? active.id : "";
    var selection = null;
    if (focusId && typeof active.selectionStart === "number") {
      try {
        selection = [active.selectionStart, active.selectionEnd];
      } catch (ignored) {
        selection = null; // inputs without a text selection (checkboxes) throw
      }
    }
    Promise.all(liveElements().map(refreshElement)).then(function () {
      if (focusId && document.activeElement !== document.getElementById(focusId)) {
        var target = document.getElementById(focusId);
        if (target) {
          target.focus({ preventScroll: true });
          if (selection && typeof target.setSelectionRange === "function") {
            try {
              target.setSelectionRange(selection[0], selection[1]);
            } catch (ignored) {
              // not a text field any more
            }
          }
        }
      }
      inFlight = false;
      if (again) {
        again = false;
        scheduleRefresh();
      }
    });
  }

  // ------------------------------------------------------------------ the socket

  var socket = null;
  var backoff = BACKOFF_MIN_MS;
  var pollTimer = null;
  var wasDisconnected = false;
  var leaving = false;

  function startPolling() {
    if (pollTimer === null) {
      pollTimer = window.setInterval(function () {
        scheduleRefresh(0);
      }, POLL_MS);
    }
  }

  function stopPolling() {
    if (pollTimer !== null) {
      window.clearInterval(pollTimer);
      pollTimer = null;
    }
  }

  function onMessage(event) {
    var message;
    try {
      message = JSON.parse(event.data);
    } catch (ignored) {
      return;
    }
    if (!message || message.type !== "events" || !Array.isArray(message.events)) {
      return;
    }
    for (var i = 0; i < message.events.length; i++) {
      var id = message.events[i] && message.events[i].id;
      if (typeof id === "number" && (lastEventId === null || id > lastEventId)) {
        lastEventId = id;
      }
    }
    if (message.events.length) {
      scheduleRefresh();
    }
  }

  function connect() {
    try {
      socket = new window.WebSocket(socketUrl);
    } catch (ignored) {
      reconnectLater();
      return;
    }
    socket.onopen = function () {
      backoff = BACKOFF_MIN_MS;
      setStatus("live", "live");
      stopPolling();
      if (lastEventId !== null) {
        socket.send(JSON.stringify({ type: "resume", after: lastEventId }));
      }
      if (wasDisconnected) {
        wasDisconnected = false;
        scheduleRefresh(0); // catch up on what happened while away
      }
    };
    socket.onmessage = onMessage;
    socket.onclose = function (event) {
      socket = null;
      if (leaving) {
        return;
      }
      wasDisconnected = true;
      if (Object.prototype.hasOwnProperty.call(FINAL_CLOSE_CODES, event.code)) {
        stopPolling();
        setStatus(FINAL_CLOSE_CODES[event.code], "offline");
        return;
      }
      setStatus("reconnecting\u2026", "reconnecting");
      startPolling();
      reconnectLater();
    };
  }

  function reconnectLater() {
    var delay = backoff;
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    window.setTimeout(connect, delay);
  }

  window.addEventListener("pagehide", function () {
    leaving = true;
    stopPolling();
    if (socket) {
      socket.close();
    }
  });
  window.addEventListener("pageshow", function (event) {
    // Back from the browser's page cache: the old socket is gone.
    if (event.persisted && leaving) {
      leaving = false;
      wasDisconnected = true;
      connect();
    }
  });

  setStatus("connecting\u2026", "reconnecting");
  connect();
})();
