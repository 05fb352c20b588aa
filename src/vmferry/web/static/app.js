// vmferry Admin Center: live parts of server-rendered pages (no build step).
// An element with data-sse="/url" gets its content replaced by each "update" event of that
// server-sent event stream; a "done" event closes it (and reloads the page if data-reload).
"use strict";
function ferryStreams(root) {
  root.querySelectorAll("[data-sse]").forEach(function (el) {
    if (el.ferryStream) { return; }
    var es = new EventSource(el.getAttribute("data-sse"));
    el.ferryStream = es;
    es.addEventListener("update", function (e) { el.innerHTML = e.data; });
    es.addEventListener("done", function () {
      es.close();
      if (el.hasAttribute("data-reload")) { window.location.reload(); }
    });
  });
}
document.addEventListener("DOMContentLoaded", function () { ferryStreams(document); });
document.addEventListener("htmx:afterSwap", function (e) { ferryStreams(e.target); });
