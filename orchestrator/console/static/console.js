// The console's progressive enhancement: every page works without it, but for the live tail.
//
//   <main data-refresh="N">        fetch this page again every N seconds and swap <main> (paused while hidden)
//   <main data-live="URL"          server-sent events from URL (the log's records, id = position):
//         data-live-mode="append">   prepend each record to [data-tail], from <template data-tail-row>
//         data-live-mode="refresh">  fetch this page again (at most once a second) after a record
//   [data-live-status]             says whether the stream is live or reconnecting
//
// A dropped stream is reopened by the browser itself with Last-Event-ID = the last position
// received, so nothing is missed; rows are keyed by position, so nothing is shown twice.
"use strict";

(function () {
  const MAX_ROWS = 500;

  function main() {
    return document.querySelector("main");
  }

  // Fetch this page again and put its <main> in place of ours (keeping the stream open).
  let refreshing = false;
  async function refresh() {
    if (refreshing) return;
    refreshing = true;
    try {
      const response = await fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.querySelector("main");
      const current = main();
      if (!fresh || !current) return;
      // Keep what the person is typing or has opened.
      if (current.contains(document.activeElement) && document.activeElement.matches("input, select, textarea")) return;
      const open = new Set([...current.querySelectorAll("details[open]")].map(keyOf));
      const status = current.querySelector("[data-live-status]");
      current.innerHTML = fresh.innerHTML;
      for (const details of current.querySelectorAll("details")) {
        if (open.has(keyOf(details))) details.open = true;
      }
      const placeholder = current.querySelector("[data-live-status]");
      if (status && placeholder) placeholder.replaceWith(status);
      current.dispatchEvent(new CustomEvent("console:refreshed", { bubbles: true }));
    } catch (error) {
      // The daemon is away: try again at the next tick.
    } finally {
      refreshing = false;
    }
  }

  function keyOf(details) {
    const row = details.closest("[data-position]");
    return (row ? row.dataset.position : "") + "/" + (details.className || "");
  }

  function periodic(seconds) {
    setInterval(() => {
      if (document.visibilityState === "visible") refresh();
    }, seconds * 1000);
  }

  function setStatus(text, state) {
    for (const element of document.querySelectorAll("[data-live-status]")) {
      element.textContent = text;
      element.dataset.state = state;
    }
  }

  function appendRow(record) {
    const body = document.querySelector("[data-tail]");
    const template = document.querySelector("template[data-tail-row]");
    if (!body || !template) return;
    if (body.querySelector(`tr[data-position="${record.position}"]`)) return;
    const row = template.content.firstElementChild.cloneNode(true);
    row.dataset.position = String(record.position);
    row.classList.add("new");
    for (const field of row.querySelectorAll("[data-field]")) {
      const name = field.dataset.field;
      field.textContent = name === "version" ? "v" + record.version : String(record[name]);
      if (name === "stream") field.href = record.href;
      if (name === "type") field.classList.add(record.kind);
    }
    // Newest first: before the first row with a smaller position.
    let before = null;
    for (const existing of body.rows) {
      if (Number(existing.dataset.position) < record.position) {
        before = existing;
        break;
      }
    }
    body.insertBefore(row, before);
    while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1);
  }

  // The stream from ?after= the last record seen: where a stream the browser gave up on starts again.
  function resumed(url, lastId) {
    if (lastId === null) return url;
    const next = new URL(url, location.href);
    next.searchParams.set("after", lastId);
    return next.pathname + next.search;
  }

  function live(url, mode) {
    let pending = null;
    let last = 0;
    let lastId = null;
    function open(streamUrl) {
      const source = new EventSource(streamUrl);
      window.consoleStream = source;
      source.addEventListener("open", () => setStatus("live", "live"));
      source.addEventListener("error", () => {
        setStatus("reconnecting…", "down");
        // The browser reconnects by itself (with Last-Event-ID) after a network error; after an
        // answer that is not a stream (a daemon shutting down says 503) it gives up: start again.
        if (source.readyState === EventSource.CLOSED) setTimeout(() => open(resumed(url, lastId)), 2000);
      });
      source.addEventListener("record", (event) => {
        lastId = event.lastEventId;
        setStatus("live", "live");
        if (mode === "append") {
          appendRow(JSON.parse(event.data));
          return;
        }
        // A refresh at most once a second, however fast records come.
        if (pending) return;
        const wait = Math.max(0, 1000 - (Date.now() - last));
        pending = setTimeout(() => {
          pending = null;
          last = Date.now();
          refresh();
        }, wait);
      });
    }
    open(url);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const page = main();
    if (!page) return;
    if (page.dataset.refresh) periodic(Number(page.dataset.refresh));
    if (page.dataset.live) live(page.dataset.live, page.dataset.liveMode || "refresh");
    for (const link of document.querySelectorAll("a[data-back]")) {
      if (history.length > 1) {
        link.addEventListener("click", (event) => {
          event.preventDefault();
          history.back();
        });
      }
    }
  });
})();
