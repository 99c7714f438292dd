// Linesight station screen: live queue, verdicts without reload, keyboard shortcuts, image zoom,
// on-screen PIN keypad. Every piece of data goes into the page through textContent, never as
// markup; the only markup inserted is the server's own escaped fragment for the current part.
"use strict";

(function () {
  const meta = (name) => {
    const element = document.querySelector(`meta[name="${name}"]`);
    return element ? element.getAttribute("content") : "";
  };
  const csrfToken = meta("csrf-token");
  const pollMs = Math.max(250, parseInt(meta("poll-interval"), 10) || 1500);
  const signedIn = document.body.dataset.signedIn === "1";

  // --- toast -------------------------------------------------------------------------------

  let toastTimer = null;
  function toast(text, warn) {
    const box = document.getElementById("toast");
    if (!box) return;
    box.textContent = text;
    box.className = warn ? "toast warn" : "toast";
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.hidden = true; }, 2500);
  }

  // The server says why (idle, the sign-in's time limit, signed out elsewhere); the sign-in
  // page tells the operator.
  async function signedOut(response) {
    const answer = response ? await response.json().catch(() => ({})) : {};
    const known = ["idle", "expired", "signed_out"];
    const reason = known.includes(answer.reason) ? answer.reason : "signed_out";
    window.location.assign(`/login?reason=${reason}`);
  }

  // --- live status: queue count, banners, the waiting list ---------------------------------

  function renderBanners(banners) {
    const holder = document.getElementById("banners");
    if (!holder) return;
    const wanted = JSON.stringify(banners);
    if (holder.dataset.shown === wanted) return;
    holder.dataset.shown = wanted;
    holder.replaceChildren(...banners.map((banner) => {
      const div = document.createElement("div");
      div.className = `banner banner-${banner.severity}`;
      div.dataset.kind = banner.kind;
      div.textContent = banner.text;
      return div;
    }));
  }

  function renderUpcoming(items, shown) {
    const list = document.getElementById("upcoming");
    if (!list) return;
    const others = items.filter((item) => item.part_id !== shown).slice(0, items.length - 1);
    list.replaceChildren(...others.map((item) => {
      const li = document.createElement("li");
      const id = document.createElement("span");
      id.className = "up-id";
      id.textContent = item.part_id;
      const info = document.createElement("span");
      info.className = "up-meta";
      info.textContent = `${item.time} · ${item.reason_title}`;
      li.append(id, info);
      return li;
    }));
  }

  function setText(id, text) {
    const element = document.getElementById(id);
    if (element && element.textContent !== text) element.textContent = text;
  }

  let swapping = false;
  async function refreshCurrent() {
    if (swapping) return;
    swapping = true;
    try {
      const response = await fetch("/partial/current", { headers: { Accept: "text/html" } });
      if (response.status === 401) return signedOut(response);
      if (!response.ok) return;
      const html = await response.text();
      const current = document.getElementById("current");
      if (!current) return;
      const holder = document.createElement("template");
      holder.innerHTML = html;
      const fresh = holder.content.getElementById("current");
      if (fresh) current.replaceWith(fresh);
    } finally {
      swapping = false;
    }
  }

  // The card on screen stays until its part is judged: a part that arrives later but was
  // captured earlier (a disagreement found by the candidate) waits in the list instead of
  // replacing the card under the operator's finger.
  let judgedHere = "";
  // A part whose verdict this screen sent but whose answer was lost (the connection went).
  let sentUnanswered = "";
  // A card that has just come in ignores taps and keys for a moment: the second tap of a double
  // tap (or a bounced key) meant for the part judged a moment ago must not judge the next one.
  const NEW_CARD_HOLD_MS = 600;
  function holdButtons(ms) {
    const buttons = document.querySelectorAll("#current form[data-verdict] button");
    buttons.forEach((b) => { b.disabled = true; });
    setTimeout(() => buttons.forEach((b) => { b.disabled = false; }), ms);
  }

  // Said on the screen, not only in the console: an operator judging from a queue that no
  // longer updates must know it. The next good answer replaces it with the server's banners.
  function notUpToDate(why) {
    renderBanners([{ kind: "screen_stale", severity: "alarm",
                     text: `This screen is not up to date: ${why.replace(/\.$/, "")}.` }]);
  }

  let polling = false;
  async function poll() {
    if (polling) return;
    polling = true;
    try {
      const current = document.getElementById("current");
      const shown = current ? current.dataset.partId || "" : "";
      const response = await fetch(`/api/queue?showing=${encodeURIComponent(shown)}`,
                                   { headers: { Accept: "application/json" } });
      if (response.status === 401) return signedOut(response);
      if (!response.ok) {
        const answer = await response.json().catch(() => ({}));
        return notUpToDate(answer.error || `the screen's server answered ${response.status}`);
      }
      const queue = await response.json();
      setText("queue-count", String(queue.count));
      setText("queue-total", String(queue.count));
      renderBanners(queue.banners);
      renderUpcoming(queue.items, shown);
      if (current && !queue.showing_waiting && shown !== (queue.head || "")) {
        closeZoom();
        await refreshCurrent();
        if (shown && shown === sentUnanswered) {
          // The verdict sent from here arrived after all (or another screen's did first).
          toast(`Part ${shown} is judged: the station has its verdict`, false);
          holdButtons(1000);
        } else if (shown && shown !== judgedHere) {
          // Judged on another screen: say so, and let a tap meant for it not land on the next.
          toast(`Part ${shown} was judged on another screen`, true);
          holdButtons(1000);
        } else {
          holdButtons(NEW_CARD_HOLD_MS);
        }
      }
    } catch (error) {
      // The UI server restarting or the network blinking: the next poll tries again.
      notUpToDate("no answer from the station's screen server");
    } finally {
      polling = false;
    }
  }

  // --- verdicts ------------------------------------------------------------------------------

  const outcomeText = { pass: "passed", reject: "rejected", escalate: "escalated" };

  async function sendVerdict(form, button) {
    if (form.dataset.busy === "1") return; // a double tap sends one request
    form.dataset.busy = "1";
    form.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    const body = new URLSearchParams(new FormData(form));
    body.set("outcome", button.value);
    const partId = body.get("part_id");
    try {
      const response = await fetch(form.action, {
        method: "POST",
        headers: { Accept: "application/json", "X-CSRF-Token": csrfToken },
        body,
      });
      if (response.status === 401) return signedOut(response);
      const answer = await response.json().catch(() => ({}));
      if (!response.ok) {
        toast(answer.error || `Not recorded (error ${response.status})`, true);
      } else if (answer.result === "already_judged") {
        judgedHere = partId;
        toast(`Part ${partId} was already judged`, true);
      } else {
        judgedHere = partId;
        toast(`Part ${partId} ${outcomeText[button.value] || button.value}`, false);
      }
    } catch (error) {
      // The request may have been saved before the connection went: tapping again is safe,
      // a part already judged says so.
      sentUnanswered = partId;
      toast("Maybe not recorded: the screen lost its connection. Tap again to make sure.", true);
    } finally {
      form.dataset.busy = "";
      form.querySelectorAll("button").forEach((b) => { b.disabled = false; });
    }
    await poll();
  }

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-verdict")) return;
    event.preventDefault();
    const button = event.submitter;
    if (button && button.value) sendVerdict(form, button);
  });

  // A barcode scanner that acts as a keyboard types a whole code ("PR4471" and Enter) as
  // keystrokes a few milliseconds apart; its P or R must not judge the part. So a shortcut acts
  // only for a key pressed on its own: it waits SHORTCUT_WAIT_MS, and a key that comes less than
  // BURST_GAP_MS after the one before makes both of them a burst, which does nothing.
  const BURST_GAP_MS = 50;
  const SHORTCUT_WAIT_MS = 60;
  const MODIFIERS = new Set(["Shift", "Control", "Alt", "Meta", "CapsLock", "AltGraph"]);
  let lastKeyAt = -Infinity;
  let pendingShortcut = null; // the timer of a shortcut waiting to see that no key follows

  function zoomOpen() {
    const zoom = document.getElementById("zoom");
    return Boolean(zoom && !zoom.hidden);
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.altKey || event.metaKey || event.repeat) return;
    const target = event.target;
    if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement) return;
    if (zoomOpen()) {
      // A verdict is given on the card, with the enlarged image closed.
      if (event.key === "Escape") closeZoom();
      return;
    }
    // Shift held for a capital letter is part of the key press, not a key of its own.
    if (MODIFIERS.has(event.key)) return;
    // The event's own time: when the key was pressed, even if the page was busy meanwhile.
    const burst = event.timeStamp - lastKeyAt < BURST_GAP_MS;
    lastKeyAt = event.timeStamp;
    clearTimeout(pendingShortcut); // any key after a waiting shortcut cancels it
    pendingShortcut = null;
    if (burst) return;
    const key = event.key.toLowerCase();
    // Compared, not put in a selector: a key such as " or \ would make the selector invalid.
    const button = [...document.querySelectorAll("#current form[data-verdict] button[data-key]")]
      .find((candidate) => candidate.dataset.key === key);
    if (button && !button.disabled) {
      event.preventDefault();
      pendingShortcut = setTimeout(() => {
        pendingShortcut = null;
        // The card may have changed, or the image been enlarged, while the key waited.
        if (button.isConnected && !button.disabled && !zoomOpen()) button.click();
      }, SHORTCUT_WAIT_MS);
    }
  });

  // --- zoom: tap to enlarge, tap to magnify 2.5x where tapped, pinch to scale ------------------

  const view = { scale: 1, x: 0, y: 0 };
  const pointers = new Map();
  let pinchStart = null;

  function applyView() {
    const image = document.querySelector("[data-zoom-image]");
    if (image) image.style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.scale})`;
  }

  function openZoom(source) {
    const zoom = document.getElementById("zoom");
    const image = document.querySelector("[data-zoom-image]");
    if (!zoom || !image) return;
    image.src = source.src;
    image.alt = source.alt;
    Object.assign(view, { scale: 1, x: 0, y: 0 });
    applyView();
    zoom.hidden = false;
  }

  function closeZoom() {
    const zoom = document.getElementById("zoom");
    if (zoom) zoom.hidden = true;
    pointers.clear();
    pinchStart = null;
  }

  document.addEventListener("click", (event) => {
    const opener = event.target.closest("[data-zoom]");
    if (opener) {
      const image = opener.querySelector("img");
      if (image) openZoom(image);
      return;
    }
    if (event.target.closest("[data-zoom-close]")) closeZoom();
  });

  const stage = document.querySelector("[data-zoom-stage]");
  if (stage) {
    let moved = false;
    stage.addEventListener("pointerdown", (event) => {
      pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
      moved = false;
      if (pointers.size === 2) {
        const [a, b] = [...pointers.values()];
        pinchStart = { distance: Math.hypot(a.x - b.x, a.y - b.y), scale: view.scale };
      }
    });
    stage.addEventListener("pointermove", (event) => {
      if (!pointers.has(event.pointerId)) return;
      const last = pointers.get(event.pointerId);
      pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
      if (pointers.size === 2 && pinchStart) {
        const [a, b] = [...pointers.values()];
        const distance = Math.hypot(a.x - b.x, a.y - b.y);
        view.scale = Math.min(8, Math.max(1, pinchStart.scale * distance / pinchStart.distance));
        moved = true;
        applyView();
      } else if (pointers.size === 1 && view.scale > 1) {
        view.x += event.clientX - last.x;
        view.y += event.clientY - last.y;
        if (Math.abs(event.clientX - last.x) + Math.abs(event.clientY - last.y) > 2) moved = true;
        applyView();
      }
    });
    const release = (event) => {
      const wasTap = pointers.size === 1 && !moved;
      pointers.delete(event.pointerId);
      if (pointers.size < 2) pinchStart = null;
      if (!wasTap || event.type !== "pointerup") return;
      if (view.scale > 1) {
        Object.assign(view, { scale: 1, x: 0, y: 0 });
      } else {
        const box = stage.getBoundingClientRect();
        view.scale = 2.5;
        view.x = (box.left + box.width / 2 - event.clientX) * 1.5;
        view.y = (box.top + box.height / 2 - event.clientY) * 1.5;
      }
      applyView();
    };
    stage.addEventListener("pointerup", release);
    stage.addEventListener("pointercancel", release);
  }

  // --- sign-in keypad ---------------------------------------------------------------------------

  const keypad = document.querySelector("[data-keypad]");
  if (keypad) {
    const fields = [...document.querySelectorAll("[data-keypad-target]")];
    let target = fields.find((field) => field.value === "") || fields[fields.length - 1];
    const mark = () => fields.forEach((field) => field.classList.toggle("active-field", field === target));
    fields.forEach((field) => field.addEventListener("focus", () => { target = field; mark(); }));
    mark();
    keypad.addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (!button || !target) return;
      if (button.dataset.digit !== undefined) {
        if (target.value.length < (target.maxLength > 0 ? target.maxLength : 64)) {
          target.value += button.dataset.digit;
        }
      } else if (button.hasAttribute("data-erase")) {
        target.value = target.value.slice(0, -1);
      }
    });
  }

  // --- start -----------------------------------------------------------------------------------

  if (signedIn) {
    setInterval(poll, pollMs);
    if (document.querySelector("[data-queue]")) poll();
  }
})();
