// makima dashboard: the little script every page shares. Live pages add
// static/js/live.js. Nothing here renders text from the server as HTML.
(function () {
  "use strict";
  // Confirm buttons that ask for it: <button data-confirm="Stop this directive?">.
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-confirm]");
    if (button && !window.confirm(button.getAttribute("data-confirm"))) {
      event.preventDefault();
    }
  });
})();
