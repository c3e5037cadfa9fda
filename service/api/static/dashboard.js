// Live updates of the run page: poll the run's state until it finishes, patch the DAG, the
// timeline, the steps table and the step details in place (no reload), then stop. Logs are
// fetched when a step's details are open and the step has logs (again when it finishes).
(function () {
  "use strict";
  var root = document.querySelector("[data-live-run]");
  if (!root) {
    return;
  }
  var url = root.getAttribute("data-state-url");
  var interval = Number(root.getAttribute("data-interval")) || 500;
  var live = root.querySelector("[data-live]");

  function seconds(value) {
    if (value === null || value === undefined) {
      return "—";
    }
    return value < 1 ? Math.round(value * 1000) + "ms" : value.toFixed(2) + "s";
  }

  function clock(iso) {
    return iso ? new Date(iso).toISOString().substring(11, 23) : "—";
  }

  function nodeMeta(step) {
    var text = step.status + " · " + seconds(step.duration_s);
    return step.attempt > 1 ? text + " · try " + step.attempt : text;
  }

  function stepMeta(step) {
    var retry = step.retry_at ? " · retry at " + clock(step.retry_at) : "";
    if (!step.started) {
      return "not started" + retry;
    }
    if (step.cached_from) {
      return "outputs of run " + step.cached_from.slice(0, 12) + " · reused at " + clock(step.started);
    }
    return "attempt " + step.attempt + " of " + (step.max_retries + 1) +
      (step.worker ? " · " + step.worker : "") + " · " + clock(step.started) + " to " +
      (step.finished ? clock(step.finished) : "now") + " · " + seconds(step.duration_s) + retry;
  }

  function byStep(selector, name) {
    var all = root.querySelectorAll(selector);
    for (var i = 0; i < all.length; i++) {
      if (all[i].getAttribute("data-step") === name) {
        return all[i];
      }
    }
    return null;
  }

  function badge(cell, status) {
    var span = document.createElement("span");
    span.className = "badge st-" + status;
    span.textContent = status;
    cell.replaceChildren(span);
  }

  function outputs(cell, links) {
    var parts = [];
    links.forEach(function (link) {
      var part;
      if (link.artifact_id) {
        part = document.createElement("a");
        part.href = "/artifacts/" + encodeURIComponent(link.artifact_id);
      } else {
        part = document.createElement("span");
      }
      part.textContent = link.name;
      parts.push(part);
    });
    cell.replaceChildren.apply(cell, parts);
  }

  function loadLogs(details) {
    if (!details.open || details.getAttribute("data-has-logs") !== "true" ||
        details.getAttribute("data-logs-loaded") === "true") {
      return;
    }
    details.setAttribute("data-logs-loaded", "true");
    var note = details.querySelector(".logs-note");
    var text = details.querySelector(".logs-text");
    fetch(details.getAttribute("data-logs-url"), { credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("the server answered " + response.status);
        }
        return response.text();
      })
      .then(function (body) {
        text.textContent = body;
        text.hidden = false;
        note.textContent = body ? "" : "The step printed and logged nothing.";
        note.hidden = Boolean(body);
      })
      .catch(function (error) {
        details.removeAttribute("data-logs-loaded");
        note.textContent = "Logs could not be loaded (" + error.message + ").";
      });
  }

  function patchNode(step) {
    var node = byStep("g.node", step.name);
    if (!node) {
      return;
    }
    node.setAttribute("class", "node st-" + step.status + (step.attempt > 1 ? " retried" : ""));
    node.querySelector("text.meta").textContent = nodeMeta(step);
    node.querySelector("title").textContent = step.name + ": " + step.status +
      (step.error ? " — " + step.error : "");
  }

  function patchTimeline(step) {
    var row = byStep(".tl-row", step.name);
    if (!row) {
      return;
    }
    badge(row.querySelector(".tl-status"), step.status);
    row.querySelector(".retried-mark").hidden = step.attempt <= 1;
    var mark = row.querySelector(".cached-mark");
    mark.hidden = step.status !== "cached";
    if (step.cached_from) {
      mark.setAttribute("href", "/runs/" + encodeURIComponent(step.cached_from));
      mark.setAttribute("title", "outputs of run " + step.cached_from);
    }
    row.querySelector(".tl-meta").textContent = stepMeta(step);
    var bar = row.querySelector(".tl-bar");
    var going = step.bar && step.bar.going ? " going" : "";
    bar.setAttribute("class", "tl-bar st-" + step.status + going);
    bar.setAttribute("x", (step.bar ? step.bar.offset_pct : 0) + "%");
    bar.setAttribute("width", (step.bar ? step.bar.width_pct : 0) + "%");
  }

  function patchRow(step) {
    var row = byStep("tr", step.name);
    if (!row) {
      return;
    }
    row.setAttribute("data-status", step.status);
    badge(row.querySelector(".status"), step.status);
    row.querySelector(".attempts").textContent = String(step.attempt);
    row.querySelector(".duration").textContent = seconds(step.duration_s);
    var error = row.querySelector(".error");
    error.textContent = step.error || "";
    if (step.cached_from) {
      var from = document.createElement("span");
      from.className = "cached-from";
      from.appendChild(document.createTextNode("cached from run "));
      var link = document.createElement("a");
      link.className = "mono";
      link.href = "/runs/" + encodeURIComponent(step.cached_from);
      link.textContent = step.cached_from.slice(0, 12);
      from.appendChild(link);
      error.insertBefore(from, error.firstChild);
    }
    outputs(row.querySelector(".outputs"), step.outputs);
  }

  function patchDetails(step) {
    var details = byStep("details.step-detail", step.name);
    if (!details) {
      return;
    }
    badge(details.querySelector(".step-status"), step.status);
    details.querySelector(".step-meta").textContent = stepMeta(step);
    var error = details.querySelector(".step-error");
    error.textContent = step.error || "";
    error.hidden = !step.error;
    var traceback = details.querySelector("details.traceback");
    if (step.traceback && traceback.hidden) {
      traceback.querySelector(".traceback-text").textContent = step.traceback;
      traceback.hidden = false;
      details.open = true;
    }
    var hadLogs = details.getAttribute("data-has-logs") === "true";
    var finished = ["completed", "failed", "skipped", "cancelled", "cached"].indexOf(step.status) >= 0;
    if (step.has_logs && (!hadLogs || (finished && details.getAttribute("data-status") !== step.status))) {
      details.setAttribute("data-has-logs", "true");
      details.removeAttribute("data-logs-loaded");
      details.querySelector(".logs-note").textContent = "Logs load when this is open.";
      details.querySelector(".logs-link").hidden = false;
    }
    if (!step.has_logs) {
      details.querySelector(".logs-note").textContent = finished ?
        "The step printed and logged nothing." : "No logs yet: they are kept when an attempt ends.";
    }
    details.setAttribute("data-status", step.status);
    loadLogs(details);
  }

  function apply(state) {
    var status = state.run.status;
    root.querySelectorAll("[data-run-status]").forEach(function (el) {
      el.className = "badge st-" + status;
      el.textContent = status;
    });
    root.querySelectorAll("[data-run-duration]").forEach(function (el) {
      el.textContent = seconds(state.elapsed_s);
    });
    root.querySelectorAll("[data-span]").forEach(function (el) {
      el.textContent = seconds(state.span_s);
    });
    var error = root.querySelector("[data-run-error]");
    if (error) {
      error.textContent = state.run.error || "";
      error.hidden = !state.run.error;
    }
    state.steps.forEach(function (step) {
      patchNode(step);
      patchTimeline(step);
      patchRow(step);
      patchDetails(step);
    });
  }

  function tick() {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (response.status === 401) {
          throw new Error("session expired: reload the page to log in again");
        }
        if (!response.ok) {
          throw new Error("the server answered " + response.status);
        }
        return response.json();
      })
      .then(function (state) {
        apply(state);
        if (state.finished) {
          root.setAttribute("data-finished", "true");
          live.textContent = "finished";
          live.classList.add("done");
        } else {
          live.textContent = "live";
          window.setTimeout(tick, interval);
        }
      })
      .catch(function (error) {
        live.textContent = "reconnecting (" + error.message + ")";
        window.setTimeout(tick, interval * 4);
      });
  }

  root.querySelectorAll("details.step-detail").forEach(function (details) {
    details.addEventListener("toggle", function () {
      loadLogs(details);
    });
    loadLogs(details);
  });

  if (root.getAttribute("data-finished") !== "true") {
    window.setTimeout(tick, interval);
  }
})();
