// Linesight fleet dashboard: polls the controller's JSON API and redraws the page. Every value
// from the API enters the page through textContent or an SVG attribute holding a number, never
// as markup. The API token, when the controller needs one, lives only in its input field.
"use strict";

(function () {
  const meta = (name) => {
    const element = document.querySelector(`meta[name="${name}"]`);
    return element ? element.getAttribute("content") || "" : "";
  };
  const refreshMs = Math.max(500, parseInt(meta("refresh-ms"), 10) || 2000);
  const pinnedRollout = meta("rollout-id");
  const SVG_NS = "http://www.w3.org/2000/svg";
  const WINDOW_MIN = 30;
  const BUCKET_S = 30;
  const TERMINAL = ["promoted", "rolled_back", "aborted"];

  // --- small helpers ---------------------------------------------------------------------

  function el(tag, className, text) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== undefined && text !== null) element.textContent = String(text);
    return element;
  }

  function svg(tag, attributes) {
    const element = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      element.setAttribute(name, String(value));
    }
    return element;
  }

  function byId(id) {
    return document.getElementById(id);
  }

  function setText(id, text) {
    const element = byId(id);
    if (element) element.textContent = text;
  }

  const isNumber = (value) => typeof value === "number" && Number.isFinite(value);

  function percent(rate, digits) {
    return isNumber(rate) ? `${(rate * 100).toFixed(digits === undefined ? 1 : digits)} %` : "—";
  }

  // A difference of two error rates, in percent of parts, always signed.
  function signedPercent(diff) {
    if (!isNumber(diff)) return "—";
    const value = diff * 100;
    return `${value >= 0 ? "+" : "−"}${Math.abs(value).toFixed(2)} %`;
  }

  function clock(iso) {
    if (!iso) return "—";
    const when = new Date(iso);
    return Number.isNaN(when.getTime()) ? String(iso) : when.toLocaleTimeString([], { hour12: false });
  }

  function dateTime(iso) {
    if (!iso) return "—";
    const when = new Date(iso);
    if (Number.isNaN(when.getTime())) return String(iso);
    const two = (n) => String(n).padStart(2, "0");
    return `${when.getFullYear()}-${two(when.getMonth() + 1)}-${two(when.getDate())} ${clock(iso)}`;
  }

  function ago(iso) {
    if (!iso) return "never";
    const seconds = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
    if (!Number.isFinite(seconds)) return String(iso);
    if (seconds < 2) return "just now";
    if (seconds < 120) return `${seconds} s ago`;
    if (seconds < 7200) return `${Math.round(seconds / 60)} min ago`;
    return `${Math.round(seconds / 3600)} h ago`;
  }

  // A station's clock this far off (deploy/clock_offset.py WARN_S) is more than any delivery.
  const CLOCK_WARN_S = 60;

  function clockNote(behind) {
    if (!isNumber(behind) || Math.abs(behind) < CLOCK_WARN_S) return "";
    const seconds = Math.abs(behind);
    let span;
    if (seconds < 3600) span = `${Math.round(seconds / 60)} min`;
    else if (seconds < 48 * 3600) span = `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
    else span = `${Math.round(seconds / 86400)} days`;
    return `clock ${span} ${behind > 0 ? "behind" : "ahead"}`;
  }

  function until(iso) {
    if (!iso) return "—";
    const seconds = Math.round((new Date(iso).getTime() - Date.now()) / 1000);
    if (!Number.isFinite(seconds)) return String(iso);
    if (seconds <= 0) return "reached";
    if (seconds < 120) return `in ${seconds} s`;
    return `in ${Math.round(seconds / 60)} min`;
  }

  const model = (ref) => (ref ? `${ref.name} ${ref.version}` : "—");
  const words = (value) => String(value || "").replace(/_/g, " ");

  async function getJson(url, missing) {
    const response = await fetch(url, { cache: "no-store", headers: { Accept: "application/json" } });
    if (response.status === 404 && missing !== undefined) return missing;
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  // --- rollout --------------------------------------------------------------------------------

  let shownRollout = null; // the rollout document last drawn, for the buttons
  const plans = new Map(); // rollout id -> plan, fetched once

  function renderPhase(rollout) {
    const phase = byId("phase");
    const name = rollout ? rollout.phase_detail || rollout.phase : "none";
    phase.dataset.phase = name;
    phase.textContent = rollout ? words(name) : "no rollout";
  }

  function stageRow(stage, current, rollout) {
    const row = el("tr", `stage-${stage.status}`);
    row.dataset.status = stage.status;
    if (stage.index === current && !TERMINAL.includes(rollout.phase)) row.classList.add("current");
    row.append(el("td", "num", stage.index + 1), el("td", "stage-name", stage.name));
    const plan = plans.get(rollout.rollout_id);
    const planned = plan ? plan.stages[stage.index] : null;
    let mode = words(stage.mode);
    if (planned && isNumber(planned.fraction)) mode += ` ${percent(planned.fraction, 0)}`;
    if (planned && planned.approval) mode += ", then approval";
    row.append(el("td", "", mode));
    row.append(el("td", "stations-cell", stage.stations.length ? stage.stations.join(", ") : "not chosen yet"));
    const status = el("td");
    status.append(el("span", `badge badge-${stage.status}`, words(stage.status)));
    row.append(status);
    if (!stage.gate) return [row];
    // The verdict text is long: it gets a full-width line of its own under its stage.
    const verdict = el("tr", `gate-row stage-${stage.status}`);
    if (row.classList.contains("current")) verdict.classList.add("current");
    verdict.append(el("td"));
    const text = el("td", "gate-text", `Gate: ${stage.gate}`);
    text.colSpan = 4;
    verdict.append(text);
    return [row, verdict];
  }

  function renderRollout(rollout) {
    shownRollout = rollout;
    renderPhase(rollout);
    byId("rollout-none").hidden = Boolean(rollout);
    byId("rollout-none").textContent = pinnedRollout
      ? `This controller has no rollout ${pinnedRollout}.`
      : "No rollout has run on this controller since it started.";
    byId("rollout-body").hidden = !rollout;
    renderControls(rollout);
    if (!rollout) {
      renderEvidence(null, null);
      byId("pending").replaceChildren();
      byId("history").replaceChildren();
      return;
    }
    setText("candidate", model(rollout.candidate));
    setText("plan", rollout.plan);
    setText("stage", `${rollout.stage + 1} of ${rollout.stages.length}: ${rollout.stages[rollout.stage].name}`);
    setText("started", dateTime(rollout.started));
    const reason = byId("reason");
    reason.hidden = !rollout.reason;
    reason.textContent = rollout.reason ? `Reason: ${rollout.reason}` : "";
    reason.className = `reason reason-${rollout.phase_detail}`;
    byId("stages").replaceChildren(...rollout.stages.flatMap((s) => stageRow(s, rollout.stage, rollout)));

    const pending = (rollout.pending_commands || [])
      .map((c) => el("li", "", `${words(c.command)} → ${c.station} (sent ${c.attempts}×)`));
    // Stations that never answered their rollback: they may still run the candidate.
    const owed = (rollout.rollbacks_owed || [])
      .map((station) => el("li", "owed", `rollback owed → ${station} (sent again if it comes back holding the candidate)`));
    byId("pending").replaceChildren(...(pending.length || owed.length ? [...pending, ...owed]
      : [el("li", "muted", "none waiting for an ack")]));

    const lines = (rollout.history || []).slice(-20).reverse();
    byId("history").replaceChildren(...lines.map((line) => {
      const li = el("li");
      const space = line.indexOf(" ");
      li.append(el("time", "", space > 0 ? clock(line.slice(0, space)) : ""),
        el("span", "", space > 0 ? line.slice(space + 1) : line));
      return li;
    }));
    const plan = plans.get(rollout.rollout_id);
    renderEvidence(rollout, plan ? plan.stages[rollout.stage] : null);
  }

  function progress(now, needed) {
    const box = svg("svg", { class: "meter", viewBox: "0 0 100 10", preserveAspectRatio: "none", "aria-hidden": "true" });
    const share = needed > 0 ? Math.min(1, now / needed) : 1;
    box.append(svg("rect", { class: "meter-track", x: 0, y: 0, width: 100, height: 10 }),
      svg("rect", { class: share >= 1 ? "meter-done" : "meter-fill", x: 0, y: 0, width: (share * 100).toFixed(1), height: 10 }));
    return box;
  }

  function evidenceRow(key, measure, now, needed, state, meterNow, meterNeeded) {
    const row = el("tr", state ? `ev-${state}` : "");
    row.dataset.measure = key;
    const value = el("td", "ev-now");
    value.append(el("span", "", now));
    if (isNumber(meterNow) && isNumber(meterNeeded)) value.append(progress(meterNow, meterNeeded));
    row.append(el("th", "", measure), value, el("td", "ev-needed", needed));
    return row;
  }

  function verdictBadge(outcome) {
    const text = { pass: "pass", fail: "FAIL", continue: "collecting" }[outcome] || "—";
    return el("span", `badge badge-gate-${outcome || "none"}`, text);
  }

  function renderEvidence(rollout, stage) {
    const evidence = rollout ? rollout.evidence : null;
    const table = byId("evidence");
    const none = byId("evidence-none");
    const gate = byId("gate");
    table.hidden = !evidence;
    none.hidden = Boolean(evidence);
    gate.hidden = !evidence;
    if (!evidence) {
      none.textContent = !rollout ? "No rollout."
        : rollout.stages[rollout.stage].mode === "promote" ? "A promote stage has no gate: it installs the candidate."
          : "No evidence yet: the stage is choosing stations or waiting for them to acknowledge the candidate.";
      byId("evidence-rows").replaceChildren();
      return;
    }
    const gateSettings = stage ? stage.gate : null;
    const worst = [evidence.gate, evidence.escape_gate].includes("fail") ? "fail"
      : evidence.gate === "pass" && evidence.escape_gate === "pass" ? "pass" : "continue";
    gate.replaceChildren(el("span", "", "gate "), verdictBadge(worst));

    const rows = [];
    rows.push(evidenceRow("parts", "Parts judged by both", String(evidence.parts),
      `≥ ${evidence.min_parts}`, evidence.parts >= evidence.min_parts ? "met" : "short",
      evidence.parts, evidence.min_parts));
    const maxDisagreement = gateSettings ? gateSettings.max_disagreement_rate : null;
    rows.push(evidenceRow("agreement", "Agreement",
      `${percent(evidence.agreement_rate)} (${evidence.disagreements} disagreement${evidence.disagreements === 1 ? "" : "s"})`,
      isNumber(maxDisagreement) ? `≥ ${percent(1 - maxDisagreement, 0)}` : "no limit",
      isNumber(maxDisagreement) && isNumber(evidence.agreement_rate) && evidence.agreement_rate < 1 - maxDisagreement ? "bad" : ""));
    rows.push(evidenceRow("labelled", "Labelled disagreements",
      `${evidence.labelled_disagreements} (candidate right: ${evidence.candidate_right})`,
      `≥ ${evidence.min_labelled_disagreements}`,
      evidence.labelled_disagreements >= evidence.min_labelled_disagreements ? "met" : "short",
      evidence.labelled_disagreements, evidence.min_labelled_disagreements));
    rows.push(gateRow("error", "Error rate Δ", evidence.error_diff_estimate,
      evidence.error_diff_upper, gateSettings ? gateSettings.delta : null, evidence.gate));
    rows.push(gateRow("escapes", "Escaped defects Δ", evidence.escape_diff_estimate,
      evidence.escape_diff_upper, gateSettings ? gateSettings.escape_delta : null, evidence.escape_gate,
      `on ${evidence.escape_disagreements_labelled} labelled`));
    const maxLatency = gateSettings ? gateSettings.max_p95_latency_ms : null;
    rows.push(evidenceRow("latency", "p95 latency, candidate",
      isNumber(evidence.p95_latency_ms) ? `${evidence.p95_latency_ms.toFixed(1)} ms` : "—",
      isNumber(maxLatency) ? `≤ ${maxLatency} ms` : "no limit",
      isNumber(maxLatency) && isNumber(evidence.p95_latency_ms) && evidence.p95_latency_ms > maxLatency ? "bad" : ""));
    rows.push(evidenceRow("deadline", "Stage time limit", until(rollout.deadline),
      rollout.deadline ? `by ${clock(rollout.deadline)}` : "—", ""));
    byId("evidence-rows").replaceChildren(...rows);
  }

  function gateRow(key, measure, estimate, upper, tolerance, outcome, extra) {
    const row = el("tr", `ev-${outcome}`);
    row.dataset.measure = key;
    const now = el("td", "ev-now");
    const estimateText = isNumber(estimate) ? signedPercent(estimate) : "—";
    const upperText = isNumber(upper) ? ` (worst ${signedPercent(upper)})` : "";
    now.append(el("span", "", `${estimateText}${upperText}${extra ? ` ${extra}` : ""} `), verdictBadge(outcome));
    row.append(el("th", "", measure), now,
      el("td", "ev-needed", isNumber(tolerance) ? `worst ≤ ${signedPercent(tolerance)}` : "—"));
    return row;
  }

  // --- controls -----------------------------------------------------------------------------

  function renderControls(rollout) {
    const phase = rollout ? rollout.phase_detail || rollout.phase : "none";
    const allowed = {
      approve: phase === "waiting_approval",
      pause: phase === "running" || phase === "waiting_approval",
      resume: phase === "paused",
      abort: rollout !== null && !TERMINAL.includes(phase) && phase !== "rolling_back",
    };
    for (const button of document.querySelectorAll("#controls [data-action]")) {
      if (button.dataset.busy === "1") continue;
      button.disabled = !allowed[button.dataset.action];
    }
  }

  function showResult(text, bad) {
    const box = byId("action-result");
    box.textContent = text;
    box.className = bad ? "action-result bad" : "action-result";
    box.hidden = false;
  }

  // POST to the API, with the token of the field if there is one, and say in the result line
  // how it went; `done(answer)` on success.
  async function request(what, path, body, done) {
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    const tokenInput = byId("token-input");
    if (tokenInput && tokenInput.value) headers.Authorization = `Bearer ${tokenInput.value}`;
    try {
      const response = await fetch(path, { method: "POST", headers, cache: "no-store", body: JSON.stringify(body) });
      const answer = await response.json().catch(() => ({}));
      if (response.ok) {
        done(answer);
      } else if (response.status === 401) {
        showResult(`${what}: refused, the controller needs its API token`, true);
      } else {
        showResult(`${what}: refused, ${answer.error || `HTTP ${response.status}`}`, true);
      }
    } catch (error) {
      showResult(`${what}: the controller did not answer (${error.message})`, true);
    }
  }

  async function act(button) {
    const rollout = shownRollout;
    const action = button.dataset.action;
    if (!rollout) return;
    const reasonInput = byId("reason-input");
    const reason = reasonInput ? reasonInput.value.trim() : "";
    if (action === "abort" && !window.confirm(`Abort rollout ${rollout.rollout_id} and roll back every touched station?`)) {
      return;
    }
    // Approve names the stage shown: a double click or a retry must not approve a later stage
    // that came to wait meanwhile (the controller refuses an approve for another stage).
    const body = { by: "dashboard", reason };
    if (action === "approve" && Number.isInteger(rollout.stage)) body.stage = rollout.stage;
    button.dataset.busy = "1";
    button.disabled = true;
    try {
      await request(action, `/api/rollouts/${encodeURIComponent(rollout.rollout_id)}/${action}`,
        body, (answer) => {
          showResult(`${action}: done, the rollout is ${words(answer.phase_detail || answer.phase)}`, false);
          if (reasonInput) reasonInput.value = "";
          renderRollout(answer);
        });
    } finally {
      delete button.dataset.busy;
      renderControls(shownRollout);
    }
  }

  // A station out of step: a rollout that deploys and promotes its promoted model again.
  async function realign(button, station, expected) {
    const model = `${expected.name} ${expected.version}`;
    if (!window.confirm(`Deploy ${model} to ${station} again and make it the active model there, without gates? A promoted rollout put it there before.`)) {
      return;
    }
    button.disabled = true;
    try {
      await request(station, "/api/realign", { stations: [station], by: "dashboard" },
        (answer) => {
          showResult(`${station}: rollout ${answer.rollout_id} puts ${model} back`, false);
          renderRollout(answer);
        });
    } finally {
      button.disabled = false;
    }
  }

  // --- stations -------------------------------------------------------------------------------

  function stationRow(entry) {
    const state = entry.state || {};
    const metrics = entry.metrics;
    const row = el("tr", entry.online ? "online" : "offline");
    row.dataset.station = entry.station;

    const name = el("td", "station-name");
    name.append(el("strong", "", entry.station));
    const labels = Object.entries(entry.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ");
    if (labels) name.append(el("small", "labels", labels));
    row.append(name);

    const status = el("td", "status-cell");
    status.append(el("span", `pill ${entry.online ? "pill-on" : "pill-off"}`, entry.online ? "online" : "offline"),
      el("small", "", `seen ${ago(entry.last_seen)}`));
    const clockOff = clockNote(entry.clock_behind_s);
    if (clockOff) {
      const note = el("small", "clock-off warn", clockOff);
      note.title = "Its messages are stamped with its own clock, and its TLS certificates are "
        + "checked against it: set the station's clock, or give it a time source (NTP).";
      status.append(note);
    }
    row.append(status);

    const active = modelCell(state.active, "");
    const expected = entry.expected_active;
    if (entry.out_of_step && expected) {
      const note = el("small", "out-of-step warn", `promoted: ${expected.name} ${expected.version}`);
      note.title = "A promoted rollout made this model the station's active one; the station now "
        + "runs another (restored from a backup? replaced?).";
      const button = el("button", "btn btn-realign", `Deploy ${expected.version} again`);
      button.type = "button";
      button.addEventListener("click", () => realign(button, entry.station, expected));
      active.append(note, button);
    }
    row.append(active, modelCell(state.candidate, "has-candidate"));

    let mode = words(state.mode || "none");
    if (state.mode === "canary") mode += ` ${percent(state.canary_fraction, 0)}`;
    if (state.mode === "blue_green") mode += ` (${state.serving} serves)`;
    row.append(el("td", "", mode));
    const automation = el("td", "", words(state.automation || "—"));
    if (state.automation_note) automation.title = state.automation_note;
    row.append(automation);

    const faults = el("td", "faults-cell");
    const faultList = state.faults || [];
    if (faultList.length) {
      faults.classList.add("has-faults");
      for (const fault of faultList) {
        const line = el("div", "fault");
        line.append(el("strong", "", fault.code), el("span", "", ` ${fault.message}`));
        faults.append(line);
      }
    } else {
      faults.textContent = "none";
    }
    row.append(faults);

    row.append(el("td", "num", state.outbox_depth ?? "—"));
    const review = el("td", "num", state.review_queue_depth ?? "—");
    if ((state.review_queue_depth || 0) >= 20) review.classList.add("warn");
    row.append(review);

    const perMinute = metrics && metrics.window_s > 0 ? (metrics.parts / metrics.window_s) * 60 : null;
    row.append(partsCell(perMinute, entry.parts_missed_last_hour));
    row.append(el("td", "num", metrics ? percent(metrics.agreement_rate) : "—"));
    const latency = metrics ? metrics.latency || {} : {};
    const p95 = [latency.active, latency.candidate].filter(Boolean)
      .map((l) => l.p95_ms.toFixed(l.p95_ms < 10 ? 1 : 0));
    const latencyCell = el("td", "num", p95.length ? p95.join(" / ") : "—");
    latencyCell.title = "active / candidate";
    row.append(latencyCell);
    return row;
  }

  // Parts inspected per minute and, under it, the parts the station did not inspect in the
  // last hour: the whole cell is marked when there are any, since those parts went on unseen.
  function partsCell(perMinute, missed) {
    const cell = el("td", "num parts-cell", isNumber(perMinute) ? perMinute.toFixed(0) : "—");
    if (!missed || !isNumber(missed.parts)) {
      const note = el("small", "missed muted", "missed: not reported");
      note.title = "None of its metrics reports of the last hour says: a synthetic source "
        + "(which cannot miss a part), an agent too old to report it, or no report this hour.";
      cell.append(note);
      return cell;
    }
    const note = el("small", "missed", `missed ${missed.parts}`);
    cell.append(note);
    if (missed.parts > 0) {
      cell.classList.add("missing-parts");
      note.title = "Parts not inspected in the last hour: missed PLC triggers (camera down?) or "
        + "unreadable images. See the station's log and its linesight_source_* metrics.";
      if (missed.last_missed) cell.append(el("small", "missed-last", `last ${clock(missed.last_missed)}`));
    }
    return cell;
  }

  // Name and version on lines of their own when the column is narrow, never split mid-name.
  function modelCell(ref, className) {
    const cell = el("td", ref ? `model-cell ${className}` : "model-cell");
    if (!ref) {
      cell.textContent = "—";
      return cell;
    }
    cell.append(el("span", "model-name", ref.name), document.createTextNode(" "),
      el("span", "model-version", ref.version));
    return cell;
  }

  function renderStations(stations) {
    const online = stations.filter((s) => s.online).length;
    setText("station-count", `${online} of ${stations.length} online`);
    byId("stations").replaceChildren(...(stations.length ? stations.map(stationRow)
      : [emptyRow(12, "No station has reported yet.")]));
  }

  function emptyRow(columns, text) {
    const row = el("tr");
    const cell = el("td", "muted", text);
    cell.colSpan = columns;
    row.append(cell);
    return row;
  }

  // --- plots -------------------------------------------------------------------------------------

  const PLOT = { width: 600, height: 200, left: 44, bottom: 22, top: 8 };

  function timeAxis(box, start, end) {
    const y = PLOT.height - PLOT.bottom;
    box.append(svg("line", { class: "axis", x1: PLOT.left, y1: y, x2: PLOT.width, y2: y }));
    const first = svg("text", { class: "tick", x: PLOT.left, y: PLOT.height - 4 });
    first.textContent = clock(new Date(start).toISOString()).slice(0, 5);
    const last = svg("text", { class: "tick", x: PLOT.width, y: PLOT.height - 4, "text-anchor": "end" });
    last.textContent = "now";
    box.append(first, last);
  }

  function yLabel(box, y, text) {
    const label = svg("text", { class: "tick", x: PLOT.left - 6, y: y + 5, "text-anchor": "end" });
    label.textContent = text;
    box.append(label, svg("line", { class: "grid", x1: PLOT.left, y1: y, x2: PLOT.width, y2: y }));
  }

  function renderPlots(points) {
    // The window ends where the current bucket ends, so the newest bar is drawn whole.
    const end = Math.ceil(Date.now() / (BUCKET_S * 1000)) * BUCKET_S * 1000;
    const start = end - WINDOW_MIN * 60 * 1000;
    const span = PLOT.width - PLOT.left;
    const slot = span / ((WINDOW_MIN * 60) / BUCKET_S);
    const xOf = (iso) => PLOT.left + ((new Date(iso).getTime() - start) / (end - start)) * span;
    const inner = PLOT.height - PLOT.bottom - PLOT.top;
    const visible = points.filter((p) => new Date(p.start).getTime() >= start - BUCKET_S * 1000);

    const decisions = byId("plot-decisions");
    const peak = Math.max(1, ...visible.map((p) => p.parts));
    decisions.replaceChildren();
    yLabel(decisions, PLOT.top, String(peak));
    // A whole number of decisions about halfway, where it is (a peak of 1 has none).
    const half = Math.floor(peak / 2);
    if (half > 0) yLabel(decisions, PLOT.top + inner * (1 - half / peak), String(half));
    for (const point of visible) {
      let base = PLOT.height - PLOT.bottom;
      const x = Math.max(PLOT.left, xOf(point.start));
      for (const action of ["pass", "reject", "review"]) {
        const count = (point.actions || {})[action] || 0;
        if (count <= 0) continue;
        const height = (count / peak) * inner;
        base -= height;
        const bar = svg("rect", { class: `bar bar-${action}`, x: x.toFixed(1), y: base.toFixed(1), width: Math.max(1, slot - 1).toFixed(1), height: height.toFixed(1) });
        const title = svg("title");
        title.textContent = `${clock(point.start)}: ${count} ${action}`;
        bar.append(title);
        decisions.append(bar);
      }
    }
    timeAxis(decisions, start, end);
    if (!visible.length) decisions.append(noData());

    const agreement = byId("plot-agreement");
    agreement.replaceChildren();
    const rated = visible.filter((p) => isNumber(p.agreement_rate) && p.shadow_pairs > 0);
    const lowest = Math.min(0.9, ...rated.map((p) => p.agreement_rate));
    const floor = Math.max(0, Math.floor(lowest * 10) / 10);
    const yOf = (rate) => PLOT.top + (1 - (rate - floor) / (1 - floor)) * inner;
    yLabel(agreement, yOf(1), "100%");
    yLabel(agreement, yOf(floor), `${Math.round(floor * 100)}%`);
    let path = "";
    let previous = null;
    for (const point of rated) {
      const x = xOf(point.start) + slot / 2;
      const y = yOf(point.agreement_rate);
      const joined = previous !== null && new Date(point.start).getTime() - previous <= BUCKET_S * 1000;
      path += `${joined ? "L" : "M"}${x.toFixed(1)} ${y.toFixed(1)} `;
      previous = new Date(point.start).getTime();
      const dot = svg("circle", { class: "dot", cx: x.toFixed(1), cy: y.toFixed(1), r: 3.5 });
      const title = svg("title");
      title.textContent = `${clock(point.start)}: ${percent(point.agreement_rate)} of ${point.shadow_pairs} pairs`;
      dot.append(title);
      agreement.append(dot);
    }
    if (path) agreement.prepend(svg("path", { class: "line", d: path.trim() }));
    timeAxis(agreement, start, end);
    if (!rated.length) agreement.append(noData("no candidate running beside the active model"));
  }

  function noData(text) {
    const label = svg("text", { class: "nodata", x: PLOT.left + (PLOT.width - PLOT.left) / 2, y: PLOT.height / 2, "text-anchor": "middle" });
    label.textContent = text || "no decisions";
    return label;
  }

  // --- past rollouts --------------------------------------------------------------------------

  function renderPast(rollouts) {
    byId("past").replaceChildren(...(rollouts.length ? rollouts.map((r) => {
      const row = el("tr");
      const cell = el("td");
      const link = el("a", "", r.rollout_id);
      link.href = `/rollouts/${encodeURIComponent(r.rollout_id)}`;
      cell.append(link);
      const phase = el("td");
      phase.append(el("span", `badge badge-${r.phase}`, words(r.phase)));
      row.append(cell, phase, el("td", "", dateTime(r.updated)));
      return row;
    }) : [emptyRow(3, "none yet")]));
  }

  // --- the poll loop ------------------------------------------------------------------------------

  function banner(text) {
    const box = byId("banner");
    box.hidden = !text;
    box.textContent = text || "";
  }

  // A size as `df -h` shows it, in units of 1024 (linesight/disk_space.py size_text).
  function size(bytes) {
    let value = bytes / (1024 * 1024);
    let unit = "MB";
    for (const larger of ["GB", "TB"]) {
      if (value < 1024) break;
      value /= 1024;
      unit = larger;
    }
    const text = value < 10 ? value.toFixed(1) : value.toFixed(0);
    return `${text.replace(/\.0$/, "")} ${unit}`;
  }

  // The controller's link to the broker: a pill, and why it is down when the link knows (bad
  // credentials, a certificate to renew, a twin with the same client id), or else which of its
  // certificates expires soon.
  function renderBroker(health) {
    const pill = byId("broker");
    pill.textContent = health.broker_connected ? "broker connected" : "broker DISCONNECTED";
    pill.className = `pill ${health.broker_connected ? "pill-on" : "pill-off"}`;
    const error = typeof health.broker_error === "string" ? health.broker_error : "";
    const expiring = typeof health.broker_cert_warning === "string" ? health.broker_cert_warning : "";
    const text = error || expiring ? `Controller and broker: ${error || expiring}` : "";
    const box = byId("broker-banner");
    box.hidden = !text;
    if (box.textContent !== text) box.textContent = text;
  }

  // The controller's own disk: a warning while it is low, before writes start to fail. It
  // stays as last seen while the controller does not answer.
  function renderDisk(disk) {
    const box = byId("disk-banner");
    const low = Boolean(disk && disk.low && isNumber(disk.free_bytes) && isNumber(disk.total_bytes));
    let text = "";
    if (low) {
      // Once low, the warning lasts until free space is a tenth above the floor again.
      const where = disk.free_bytes < disk.min_free_bytes ? "below" : "only just above";
      text = `Controller disk: ${size(disk.free_bytes)} free of ${size(disk.total_bytes)}, ${where} `
        + `the ${size(disk.min_free_bytes)} floor: lower retention_days or add space.`;
    }
    box.hidden = !low;
    if (box.textContent !== text) box.textContent = text;
  }

  async function loadPlan(rolloutId) {
    if (plans.has(rolloutId)) return;
    try {
      const found = await getJson(`/api/rollouts/${encodeURIComponent(rolloutId)}/plan`);
      plans.set(rolloutId, found.plan);
    } catch (error) {
      // The page still works without the plan; it only lacks the tolerances.
    }
  }

  async function refresh() {
    try {
      const health = await getJson("/api/health");
      const rolloutId = pinnedRollout || health.rollout;
      const [stations, series, past, rollout] = await Promise.all([
        getJson("/api/stations"),
        getJson(`/api/series?minutes=${WINDOW_MIN}&bucket_s=${BUCKET_S}`),
        getJson("/api/rollouts"),
        // A rollout this controller does not have (a mistyped link) is no reason to stop.
        rolloutId ? getJson(`/api/rollouts/${encodeURIComponent(rolloutId)}`, null) : Promise.resolve(null),
      ]);
      if (rollout) await loadPlan(rolloutId);
      renderBroker(health);
      renderDisk(health.disk);
      renderStations(stations.stations);
      renderRollout(rollout);
      renderPlots(series.points);
      renderPast(past.rollouts);
      banner("");
      setText("refreshed", `updated ${new Date().toLocaleTimeString([], { hour12: false })}`);
      document.body.dataset.refreshed = String(Date.now());
    } catch (error) {
      banner(`The controller is not answering (${error.message}); the figures below are stale.`);
    } finally {
      window.setTimeout(refresh, refreshMs);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const button of document.querySelectorAll("#controls [data-action]")) {
      button.addEventListener("click", () => act(button));
    }
    byId("controls").addEventListener("submit", (event) => event.preventDefault());
    refresh();
  });
})();
