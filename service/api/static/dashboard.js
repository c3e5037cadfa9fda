// Live updates of the run page: poll the run's state until it finishes, patch the DAG and
// the steps table in place (no reload), then stop.
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

  function apply(state) {
    var status = state.run.status;
    root.querySelectorAll("[data-run-status]").forEach(function (el) {
      el.className = "badge st-" + status;
      el.textContent = status;
    });
    root.querySelectorAll("[data-run-duration]").forEach(function (el) {
      el.textContent = seconds(state.elapsed_s);
    });
    var error = root.querySelector("[data-run-error]");
    if (error) {
      error.textContent = state.run.error || "";
      error.hidden = !state.run.error;
    }
    state.steps.forEach(function (step) {
      var node = byStep("g.node", step.name);
      if (node) {
        node.setAttribute("class", "node st-" + step.status);
        node.querySelector("text.meta").textContent = step.status + " · " + seconds(step.duration_s);
        node.querySelector("title").textContent = step.name + ": " + step.status +
          (step.error ? " — " + step.error : "");
      }
      var row = byStep("tr", step.name);
      if (row) {
        row.setAttribute("data-status", step.status);
        badge(row.querySelector(".status"), step.status);
        row.querySelector(".attempts").textContent = String(step.attempt);
        row.querySelector(".duration").textContent = seconds(step.duration_s);
        row.querySelector(".error").textContent = step.error || "";
        outputs(row.querySelector(".outputs"), step.outputs);
      }
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

  if (root.getAttribute("data-finished") !== "true") {
    window.setTimeout(tick, interval);
  }
})();
