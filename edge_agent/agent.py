"""The station agent: frames in, decisions out, every message through the durable outbox.

Threads, and why each exists:
- the inspection loop (the caller's thread): source -> deciding model -> policy -> store; the
  critical path, which nothing else may block. Slot changes run here, between two parts.
- the candidate worker: the other model on the same frame, with a bounded queue; when it cannot
  keep up it skips parts and counts them, it never delays a decision. It runs at a lower CPU
  priority (`inference.candidate_nice`), so when the CPU is short the active model gets it.
- the outbox relay (edge_agent.relay), by default a child process with its own MQTT connection:
  outbox rows to MQTT from the oldest not yet receipted, receipts back; the agent wakes it after
  every commit and restarts it if it dies.
- the command worker: parses, downloads and loads off the critical path, then asks the loop to
  apply the change at a part boundary and acks the result once the change is saved.
- housekeeping: verdicts from the UI, requests from the screen (made by the loop), state,
  metrics, quota, free disk space, the UI's status snapshot, and the save of slots the store
  refused (which acks the commands and takes the screen's requests waiting for it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import queue
import shutil
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from edge_agent.actuator import PartSignal, build_gate, start_gate
from edge_agent.bundle_fetch import fetch_bundle, tidy_bundles
from edge_agent.config import AgentConfig
from edge_agent.disk_space import CHECK_EVERY_S, DiskSpace, floor_bytes, low_message
from edge_agent.drift import FEATURES, DriftMonitor, Reference, image_stats
from edge_agent.handoff import SkippingQueue
from edge_agent.inference import InferenceError
from edge_agent.metrics import AgentMetrics, SourceLosses, counted_since, read_source_losses
from edge_agent.policy import ModelOutput, PartDecision, Slot, agree, decide, decider_for
from edge_agent.relay import OutboxRelay, RelayProcess, RelaySpec, Restarts, ThreadRelay
from edge_agent.slots import (
    LoadedModel,
    SlotError,
    Slots,
    check_fraction,
    is_placeholder,
    load_model,
    promoted,
    restore_slots,
    rolled_back,
    switched,
    unloadable_model,
    with_candidate,
    with_mode,
)
from edge_agent.sources import (
    EndOfSource,
    Frame,
    FrameSource,
    SourceError,
    open_source,
    parse_spec,
    redact_url,
)
from edge_agent.store import (
    OutboxFull,
    PartLogEntry,
    ReviewItem,
    StationStore,
    UiRequest,
    VerdictRow,
)
from edge_agent.synthetic import id_prefix, next_index
from edge_agent.writer import DurableWriter
from linesight import __version__, systemd
from linesight import protocol as p
from linesight.artifacts import (
    BundleError,
    load_public_key,
)
from linesight.command_auth import load_verifying_key, signature_error
from linesight.config_file import ConfigError
from linesight.disk_space import is_low
from linesight.mqtt import MqttLink, ReceivedMessage, Will

log = logging.getLogger(__name__)
T = TypeVar("T")
ACK_ERROR_MAX = 4000  # CommandAck.error's bound in the contract
CANDIDATE_DRAIN_S = 30.0  # at a stop, the longest wait for the parts queued for the candidate
BOUNDARY_WAIT_S = 30.0  # the longest a command waits for the inspection loop to take its change
COMMAND_DRAIN_S = 20.0  # at a stop, the longest wait for the command in hand (a deploy's download)
STALL_FAULT_S = 1.0  # a wait for the writer this long is a stalled store, not a busy moment


CommandRecord = tuple[str, str, str]
"""A command's cmd_id, name and result (ack JSON), as the command log keeps it."""


@dataclass(frozen=True, slots=True)
class UnsavedCommand:
    """A command carried out whose change the store has not saved yet. It is acknowledged
    only once the change is saved, with its record in the same commit: until then a restart
    undoes the change, and the controller, told nothing, sends the command again."""

    cmd_id: uuid.UUID
    name: str

    @property
    def record(self) -> CommandRecord:
        return (str(self.cmd_id), self.name, _ack_json(None))


@dataclass(frozen=True, slots=True)
class CandidateJob:
    frame: Frame
    decision: PartDecision
    decider: Slot
    decider_model: LoadedModel
    decider_output: ModelOutput
    other_model: LoadedModel
    mode: p.DeploymentMode
    automation: p.AutomationLevel
    queued_review: bool
    generation: int
    """The slots' generation when the part was judged: a job from before a slot change (a
    rolled-back candidate's queued parts) must not raise faults or move the agreement of the
    models that run now."""


@dataclass
class Window:
    """Counters since the last StationMetrics message."""

    started: float
    parts: int = 0
    pairs: int = 0
    agreed: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.actions: dict[p.Action, int] = {}
        self.deciders: dict[p.DecidedBy, int] = {}
        self.latency: dict[Slot, list[float]] = {"active": [], "candidate": []}


def run_model(model: LoadedModel, image: np.ndarray, timeout_ms: float) -> ModelOutput:
    """One inference that never raises: a failure or a late answer is a failed output."""
    start = time.perf_counter()
    try:
        prediction = model.session.predict(image)
    except InferenceError as exc:
        return ModelOutput(None, None, (time.perf_counter() - start) * 1000, error=str(exc))
    except Exception as exc:  # onnxruntime raises several unrelated types  # noqa: BLE001
        return ModelOutput(
            None, None, (time.perf_counter() - start) * 1000, error=f"runtime error: {exc}"
        )
    if prediction.latency_ms > timeout_ms:
        return ModelOutput(
            None, None, prediction.latency_ms,
            error=f"timed out: {prediction.latency_ms:.0f} ms > {timeout_ms:.0f} ms",
        )
    return ModelOutput(prediction.label, prediction.confidence, prediction.latency_ms)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def lower_thread_priority(steps: int) -> None:
    """Make the calling thread `steps` nice levels less important to the scheduler (Linux).

    Raising one's own nice value needs no privilege. Elsewhere PRIO_PROCESS would name the whole
    process, so other systems keep one priority for every thread.
    """
    if steps <= 0:
        return
    if not sys.platform.startswith("linux"):
        log.info("thread priorities are not set on %s", sys.platform)
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(current + steps, 19))
    except OSError as exc:
        log.warning("could not lower the priority of thread %s: %s", tid, exc)


class Agent:
    def __init__(self, config: AgentConfig, *, source: FrameSource | None = None) -> None:
        self.config = config
        self.station = config.station
        self.topics = p.Topics(config.topic_prefix)
        self._decision_topic = self.topics.station(self.station, p.Channel.DECISION)
        self._shadow_topic = self.topics.station(self.station, p.Channel.SHADOW)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = StationStore(config.data_dir, max_outbox_rows=config.outbox.max_rows)
        self.writer = DurableWriter(
            self.store, name=f"writer-{config.station}", max_backlog=config.storage.write_queue,
            on_reviews=self._reviews_stored, on_committed=self._wake_relay,
        )
        self.key = load_public_key(config.key) if config.key else None
        self.command_key = load_verifying_key(config.command_key) if config.command_key else None
        self.metrics = AgentMetrics(self.station)
        self.gate = start_gate(
            build_gate(config.reject_output),
            on_error=lambda error: self._raise_fault("reject_output", error),
            on_ok=lambda: self._clear_faults("reject_output"),
        )
        self.automation = config.automation
        self.automation_note = ""
        self.faults: dict[str, p.Fault] = {}
        self.parts_inspected = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._loop_running = False
        self._boundary: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._boundary_lock = threading.Lock()
        self._jobs: SkippingQueue[CandidateJob] = SkippingQueue(config.inference.candidate_queue)
        self._commands: queue.Queue[ReceivedMessage | None] = queue.Queue()
        self._commands_closed = threading.Event()  # at a stop: no command is taken any more
        self._state_dirty = threading.Event()
        self._window = Window(time.monotonic())
        self._recent_agreement: deque[bool] = deque(maxlen=500)
        self._slot_generation = 0  # +1 at every slot change, under self._lock
        self._slots_unsaved = False  # a save failed: housekeeping tries again
        self._save_lock = threading.Lock()  # one save at a time, each of the newest slots
        # Commands carried out whose change is not saved yet (cmd_id -> command), unanswered
        # until it is: a copy the controller sends again tries the save, and is not carried out
        # again. Only changed under the save lock.
        self._unsaved_commands: dict[str, UnsavedCommand] = {}
        # Requests from the screen made whose change is not saved yet: the store keeps them open
        # until a save of the slots takes them, so a restart before it makes them again. Only
        # changed under the save lock.
        self._unsaved_requests: list[UiRequest] = []
        self._requests_in_hand = 0  # the id of the last screen request handed to the loop
        # Results of commands refused whose record the store could not take (cmd_id -> ack
        # JSON): a copy the controller sends again gets the same answer.
        self._unrecorded: dict[str, str] = {}
        self._step_failed_at: dict[str, float] = {}  # housekeeping step -> its last failure logged
        self._disk_unmeasured = False  # the free space could not be measured (logged once)
        self._threads: list[threading.Thread] = []
        self._command_thread: threading.Thread | None = None
        interval = systemd.watchdog_interval()
        self._watchdog_every = interval / 2 if interval else None
        self._last_watchdog = 0.0
        self.slots = self._initial_slots()
        self._tidy_bundles()  # what a crash left: a half download, a bundle no slot took
        self._warn_of_unknown_thresholds()
        self.drift = DriftMonitor(config.drift_window, reference=self._saved_reference())
        self.source = source or self._open_source()
        # Parts the source had missed when the last StationMetrics window began.
        self._missed_at_window = read_source_losses(self.source).parts_missed
        # PLC triggers for a source that takes every frame (no `trigger`): it cannot count them.
        self._unheeded_triggers = 0
        self.link = MqttLink(config.broker, will=Will(
            self.topics.station(self.station, p.Channel.STATE),
            self._state(online=False).to_json(), qos=1, retain=True,
        ))
        self.relay = self._build_relay()
        if isinstance(self.relay, RelayProcess):
            # Receipts go to the relay's own connection. A build whose agent subscribed to them
            # left that subscription in this client id's persistent session on the broker.
            self.link.forget_subscription(self.topics.station(self.station, p.Channel.RECEIPT))
        self._relay_restarts = Restarts()

    # --- start-up ---------------------------------------------------------------------------

    def _build_relay(self) -> RelayProcess | ThreadRelay:
        outbox = self.config.outbox
        if outbox.relay == "thread":
            return ThreadRelay(OutboxRelay(
                self.store, self.link, station=self.station, topics=self.topics,
                publish_batch=outbox.publish_batch, resend_after_s=outbox.resend_after_s,
                linger_s=outbox.publish_linger_ms / 1000,
            ))
        return RelayProcess(RelaySpec(
            station=self.station, topic_prefix=self.config.topic_prefix,
            data_dir=self.config.data_dir, max_outbox_rows=outbox.max_rows,
            publish_batch=outbox.publish_batch, resend_after_s=outbox.resend_after_s,
            linger_s=outbox.publish_linger_ms / 1000, broker=self.config.broker,
            log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        ))

    def _load(self, bundle: Path, slot: Slot) -> LoadedModel:
        threads = (
            self.config.inference.active_threads if slot == "active"
            else self.config.inference.candidate_threads
        )
        return load_model(
            bundle, self.key, providers=self.config.inference.providers, threads=threads
        )

    def _initial_slots(self) -> Slots:
        """What the station ran before a restart wins over the configuration's start values."""
        record = self.store.load_slots()
        if record is not None:
            return self._slots_from_record(record)
        slots = Slots(active=self._configured_active())
        if self.config.candidate is not None:
            try:
                candidate = self._load(self.config.candidate, "candidate")
                slots = with_candidate(
                    slots, candidate, self.config.mode, self.config.canary_fraction
                )
            except (BundleError, InferenceError, SlotError, OSError) as exc:
                self._raise_fault("candidate_load", f"candidate not loaded: {exc}")
        return slots

    def _configured_active(self) -> LoadedModel:
        try:
            return self._load(self.config.active, "active")
        except (BundleError, InferenceError, OSError) as exc:
            self._raise_fault("active_load", f"active model not loaded: {exc}")
            return unloadable_model(self.config.active, str(exc))

    def _slots_from_record(self, record: dict[str, Any]) -> Slots:
        """Each saved slot on its own: a bundle gone from disk costs only its slot (a lost active
        one is replaced by the configuration's), and the automation level is kept regardless."""
        try:
            self.automation = p.AutomationLevel(record.get("automation", self.automation))
        except ValueError:
            log.error("saved automation level %r unknown; using %s", record.get("automation"),
                      self.automation.value)
        slots, problems = restore_slots(record, self._load, self._configured_active)
        for problem in problems:
            if problem.slot == "candidate":
                self._raise_fault("candidate_load", problem.message)
            elif problem.slot == "active":
                log.error("%s; using the configuration's active model", problem.message)
            else:
                log.error("%s", problem.message)
        return slots

    def _saved_reference(self) -> Reference | None:
        record = self.store.load_slots() or {}
        document = record.get("drift_reference")
        if document and record.get("reference_for") == self.slots.active.ref.sha256:
            return Reference.from_dict(document)
        return None

    def _warn_of_unknown_thresholds(self) -> None:
        """A configured threshold for a label the active model does not have (a typo, say) is
        never used: the manifest's own threshold applies to the real label. Said at start-up."""
        active = self.slots.active
        unknown = sorted(set(self.config.thresholds) - set(active.manifest.labels))
        if unknown and not is_placeholder(active):
            log.warning(
                "thresholds for %s are not used: %s %s has no such label (its labels: %s)",
                ", ".join(unknown), active.ref.name, active.ref.version,
                ", ".join(active.manifest.labels),
            )

    def _open_source(self) -> FrameSource:
        spec = parse_spec(self.config.source, self.config.source_options)
        start = 0
        if spec.kind == "synthetic":
            # A restarted simulation goes on down the line instead of judging its first parts
            # again under ids the review queue and the controller already hold.
            seed = spec.options.seed
            start = next_index(self.store.part_ids_to_avoid(id_prefix(seed)), seed)
            if start:
                log.info("synthetic source (seed %d) goes on at part %d", seed, start)
        try:
            return open_source(spec, station=self.station, synthetic_start=start)
        except SourceError as exc:  # a folder or video file that is not there: a setting
            raise ConfigError(f"source: {exc}") from exc

    # --- state ------------------------------------------------------------------------------

    def _state(self, *, online: bool) -> p.StationState:
        slots = self.slots
        with self._lock:
            faults = list(self.faults.values())
        return p.StationState(
            station=self.station,
            seq=max(self.store.last_seq(), 0),
            stream=self.store.stream,
            online=online,
            active=slots.active.ref,
            candidate=slots.candidate.ref if slots.candidate else None,
            previous=slots.previous.ref if slots.previous else None,
            mode=slots.mode,
            automation=self.automation,
            canary_fraction=slots.canary_fraction,
            serving=slots.serving,
            faults=faults,
            outbox_depth=self.store.outbox_depth(),
            receipted_upto=self.store.receipted_upto(),
            review_queue_depth=self.store.review_count(),
            drift=self.drift.last,
            parts_inspected=self.parts_inspected,
            labels=self.config.labels,
            agent_version=__version__,
            automation_note=self.automation_note,
        )

    def _raise_fault(
        self, code: str, message: str, model: p.ModelRef | None = None,
        generation: int | None = None, *, update: bool = False,
    ) -> None:
        """Raise a fault once; with `generation`, only if the slots have not changed since. With
        `update`, a fault already raised takes the new message (and keeps its `since`): for a
        message that describes a measure going on changing, the free space say."""
        with self._lock:
            if generation is not None and generation != self._slot_generation:
                return  # about a model that has left its slot
            known = code in self.faults
            if not known:
                self.faults[code] = p.Fault(
                    code=code, message=message[:2000], model=model, since=datetime.now(UTC)
                )
            elif update:
                self.faults[code] = self.faults[code].model_copy(
                    update={"message": message[:2000]}
                )
        if not known:
            log.error("fault %s: %s", code, message)
            self.metrics.fault_events.labels(self.station, code).inc()
            self._state_dirty.set()

    def _clear_faults(self, *codes: str) -> None:
        with self._lock:
            cleared = [code for code in codes if self.faults.pop(code, None) is not None]
        if cleared:
            log.info("faults cleared: %s", ", ".join(cleared))
            self._state_dirty.set()

    def _save_slots(self, command: CommandRecord | None = None) -> None:
        """One commit: the slots, `command`'s record, and the screen's requests whose change
        the slots carry, taken. Only under the save lock."""
        record = self.slots.to_record()
        record["automation"] = self.automation.value
        if self.drift.reference is not None:
            record["drift_reference"] = self.drift.reference.to_dict()
            record["reference_for"] = self.slots.active.ref.sha256
        self.store.save_slots(record, command, [r.id for r in self._unsaved_requests])
        self._unsaved_requests.clear()

    def _save_with_commands(
        self, command: UnsavedCommand | None, request: UiRequest | None = None
    ) -> list[UnsavedCommand]:
        """Save the slots with the record of every command whose change waits for it (each
        record in a commit of its own with the slots), and take the screen's requests whose
        change waits for it in the first of those commits; the commands now saved, to
        acknowledge. A store that cannot write now (disk full, locked) raises the `slots_save`
        fault, whose message names the commands and requests still unsaved, and housekeeping
        tries again: neither the inspection loop nor a command dies of it."""
        with self._save_lock:
            if command is not None:
                self._unsaved_commands[str(command.cmd_id)] = command
            if request is not None:
                self._unsaved_requests.append(request)
            waiting = list(self._unsaved_commands.values())
            saved: list[UnsavedCommand] = []
            problem: str | None = None
            try:
                if not waiting:
                    self._save_slots()
                for each in waiting:
                    self._save_slots(each.record)
                    del self._unsaved_commands[str(each.cmd_id)]
                    saved.append(each)
            except Exception as exc:  # noqa: BLE001 - any store failure
                problem = unsaved_message(
                    exc, list(self._unsaved_commands.values()), self._unsaved_requests
                )
            self._slots_unsaved = problem is not None
        self._fault_while("slots_save", problem, update=True)
        return saved

    def _persist_slots(self) -> None:
        """Save the slots (a change without a command, or a retry) and acknowledge the
        commands (and take the screen's requests) whose change this made durable."""
        self._ack_saved(self._save_with_commands(None))

    def _ack_saved(self, saved: list[UnsavedCommand]) -> dict[str, p.CommandAck]:
        """The ok acks of commands whose change is saved, by cmd_id. One the outbox cannot take
        now is answered from the command log when the controller sends the command again."""
        acks: dict[str, p.CommandAck] = {}
        for command in saved:
            try:
                acks[str(command.cmd_id)] = self._ack(command.cmd_id, command.name, ok=True,
                                                      error=None)
            except Exception:  # noqa: BLE001 - a full disk: the command log answers the copy
                log.exception("the ack of command %s (%s), saved, could not be queued; the "
                              "next copy of it is answered", command.cmd_id, command.name)
        return acks

    def _set_slots(
        self, slots: Slots, command: UnsavedCommand | None = None
    ) -> list[UnsavedCommand]:
        """Only the inspection loop (or, when it has ended, the command worker) calls this.
        The commands whose change this saved are returned, for the caller to acknowledge."""
        old = self.slots
        active_changed = slots.active is not old.active
        with self._lock:
            self._slot_generation += 1
            self.slots = slots
            if slots.candidate is not old.candidate or active_changed:
                self._recent_agreement.clear()  # agreement of models that no longer pair
        if active_changed:
            self.drift.reset()
            for feature in FEATURES:  # the old model's drift is not this one's
                with contextlib.suppress(KeyError):
                    self.metrics.drift.remove(self.station, feature)
            if not is_placeholder(slots.active):
                self._clear_faults("active_load")  # a loaded model took the placeholder's place
        self._clear_faults("active_inference", "candidate_inference", "candidate_load")
        saved = self._save_with_commands(command)
        self._state_dirty.set()
        return saved

    # --- the inspection loop ----------------------------------------------------------------

    def run(self) -> int:
        """Inspect until stopped (or --max-parts), then deliver what is owed and exit."""
        port = self.config.metrics_port
        if port is not None:  # first: a port in use is a setting to change, before anything runs
            try:
                self.metrics.serve(port)
            except OSError as exc:
                raise ConfigError(
                    f"metrics_port: cannot serve metrics on port {port}: {exc.strerror or exc}"
                ) from exc
        for topic, handler in (
            (self.topics.station(self.station, p.Channel.CMD), self._on_command),
            (self.topics.trigger(self.station), self._on_trigger),
        ):
            self.link.subscribe(topic, handler)
        self.link.add_connect_listener(self._on_connected)
        self.relay.attach()
        self.link.start()
        self._persist_slots()
        self.relay.start()
        for target, name in (
            (self._candidate_worker, "candidate"),
            (self._command_worker, "commands"),
            (self._housekeeping, "housekeeping"),
        ):
            thread = threading.Thread(target=target, name=f"{name}-{self.station}", daemon=True)
            thread.start()
            self._threads.append(thread)
            if name == "commands":
                self._command_thread = thread
        log.info(
            "station %s inspecting from %s with %s %s (mode %s, automation %s)",
            self.station, redact_url(self.config.source), self.slots.active.ref.name,
            self.slots.active.ref.version, self.slots.mode.value, self.automation.value,
        )
        systemd.notify("\n".join(
            [systemd.READY, systemd.status(self._ready_status())]
        ))
        self._loop_running = True
        try:
            self._inspect_until_done()
        finally:
            self._loop_running = False
            self._apply_boundary_actions()
        return self._shutdown()

    def _ready_status(self) -> str:
        """systemd's Status line at READY: what runs, and whether the active model loaded."""
        status = f"inspecting from {redact_url(self.config.source)}"
        if is_placeholder(self.slots.active):
            status += "; ACTIVE MODEL NOT LOADED (fault active_load): every part goes to review"
        return status

    def stop(self) -> None:
        """Stop at the next part boundary (signal handlers call this)."""
        self._stop.set()

    def _inspect_until_done(self) -> None:
        limit = self.config.max_parts
        while not self._stop.is_set():
            self._watchdog()
            self._apply_boundary_actions()
            if limit is not None and self.parts_inspected >= limit:
                return
            if not self._room_for_the_next_part():
                continue  # a stop came during the wait
            try:
                frame = self.source.read(timeout=0.2)
            except EndOfSource:
                log.info("source ended after %d parts", self.parts_inspected)
                return
            except SourceError as exc:
                self._raise_fault("source", str(exc))
                self._stop.wait(1.0)
                continue
            if frame is None:
                if not getattr(self.source, "connected", True):
                    self._raise_fault(
                        "source", f"{redact_url(self.config.source)}: no stream, reconnecting "
                        f"({self.source.reconnects} reconnects so far)",
                    )
                continue
            self._clear_faults("source")
            self.inspect(frame)

    def _room_for_the_next_part(self) -> bool:
        """Wait while `storage.write_queue` items wait for the disk: a part taken now could be
        neither stored nor signalled to the line, and the queue would grow until memory runs
        out. A wait past `STALL_FAULT_S` raises `store_stalled`; it clears once the queue is
        down to half its bound, so a slow disk does not raise it at every commit. False: a stop
        came meanwhile."""
        writer = self.writer
        if not writer.full:
            if "store_stalled" in self.faults and writer.backlog <= writer.max_backlog // 2:
                self._clear_faults("store_stalled")
            return True
        started = time.monotonic()
        while not self._stop.is_set():
            # Alive and waiting on purpose: a restart would lose what waits and hang the same.
            self._watchdog()
            self._apply_boundary_actions()  # a rollback must not wait for the disk
            if writer.wait_for_room(0.25):
                return True
            waited = time.monotonic() - started
            if waited >= STALL_FAULT_S:
                self._raise_fault("store_stalled", stalled_message(
                    waited, writer.backlog, self.config.storage.write_queue), update=True)
        return False

    def _watchdog(self) -> None:
        """Only the inspection loop pings systemd's watchdog: a hung loop gets restarted."""
        now = time.monotonic()
        if self._watchdog_every is not None and now - self._last_watchdog >= self._watchdog_every:
            systemd.notify(systemd.WATCHDOG)
            self._last_watchdog = now

    def _apply_boundary_actions(self) -> None:
        if self._boundary.empty():
            return
        with self._boundary_lock:  # the loop, or a caller whose change the ended loop missed
            while True:
                try:
                    action = self._boundary.get_nowait()
                except queue.Empty:
                    return
                action()

    def at_boundary(self, change: Callable[[], T], timeout: float | None = None) -> T:
        """Run `change` on the inspection loop between two parts and return its result.

        When the loop takes no part boundary within `timeout` (`BOUNDARY_WAIT_S`; a model stuck
        on a part), the change is withdrawn and TimeoutError says so: it is never made later,
        behind the back of a caller that was told it failed."""
        wait_s = BOUNDARY_WAIT_S if timeout is None else timeout
        future: Future[T] = Future()

        def apply() -> None:
            if not future.set_running_or_notify_cancel():
                return  # withdrawn: the caller stopped waiting for it
            try:
                future.set_result(change())
            except Exception as exc:  # the caller re-raises it  # noqa: BLE001
                future.set_exception(exc)

        if not self._loop_running:
            apply()
            return future.result()
        self._boundary.put(apply)
        deadline = time.monotonic() + wait_s
        while not futures.wait([future], timeout=0.05).done:
            if not self._loop_running:
                # The loop ended after the check above: its last pass may have missed this.
                self._apply_boundary_actions()
            elif time.monotonic() >= deadline and future.cancel():
                raise TimeoutError(
                    f"the inspection loop took no part boundary within {wait_s:g} s (a model "
                    "stuck on a part?); nothing was changed"
                )
        return future.result()

    def _at_next_boundary(self, change: Callable[[], None]) -> None:
        """Make `change` at the next part boundary without waiting for it (or now, when the
        loop does not run)."""

        def apply() -> None:
            try:
                change()
            except Exception:  # a failed change must not stop the inspection  # noqa: BLE001
                log.exception("a change at a part boundary failed")

        if self._loop_running:
            self._boundary.put(apply)
        else:
            apply()

    def inspect(self, frame: Frame) -> PartDecision:
        """Judge one part. The decision is committed, acted on and published by the writer."""
        slots = self.slots
        decider = decider_for(
            frame.part_id, slots.mode, slots.canary_fraction, slots.serving,
            slots.candidate is not None,
        )
        model = slots.model(decider)
        output = run_model(model, frame.image, self.config.inference.timeout_ms)
        if output.error is not None:
            self._raise_fault(f"{decider}_inference", output.error, model.ref)
        thresholds = {**model.manifest.thresholds, **self.config.thresholds}
        automation = self.automation
        part = decide(
            frame.part_id, automation, decider, output, thresholds,
            model.manifest.defect_label, self.config.audit_fraction,
        )
        shown = part.shows_model
        stream = self.store.stream  # stamped here: the store would copy the message to add it

        def decision(seq: int) -> p.Decision:
            return p.Decision(
                station=self.station, seq=seq, stream=stream, part_id=frame.part_id,
                decided_by=part.decided_by,
                label=output.label if shown else None,
                confidence=output.confidence if shown else None,
                action=part.action, review_reason=part.review_reason,
                model=model.ref if shown or part.decided_by == p.DecidedBy.FAILSAFE else None,
                latency_ms=output.latency_ms, automation=automation, mode=slots.mode,
                suggestion=part.suggestion,
            )

        self.writer.enqueue(self._decision_topic, 1, decision,
                            after=lambda stored: self._decision_stored(stored, decision))
        queued = part.action == p.Action.REVIEW or part.audit
        if queued:
            reason = part.review_reason or p.ReviewReason.AUDIT
            self.writer.review(lambda: self._review_item(
                frame, reason, automation, model, output, part.suggestion, None
            ))
        self._count(part, decider, output, frame)
        other: Slot = "active" if decider == "candidate" else "candidate"
        if slots.candidate is not None:
            job = CandidateJob(
                frame, part, decider, model, output, slots.model(other), slots.mode,
                automation, queued, self._slot_generation,
            )
            if self._jobs.offer(job):
                return part
            self.metrics.candidate_skipped.inc()
            with self._lock:
                self._window.skipped += 1
        self._log_part(frame, part, output if decider == "active" else None, None)
        return part

    def _decision_stored(
        self, result: p.Envelope | Exception, decision: Callable[[int], p.Decision]
    ) -> None:
        if isinstance(result, Exception):
            self._raise_fault("outbox_write", f"a decision could not be stored: {result}")
            # The line is told all the same: a part to reject must not go on for want of disk.
            self.gate.act(PartSignal.of(decision(0), stored=False))
            return
        self._clear_faults("outbox_write")
        if isinstance(result, p.Decision):
            self.gate.act(PartSignal.of(result))

    def _reviews_stored(self, error: str | None) -> None:
        if error is None:
            self._clear_faults("review_store")
        else:
            self._raise_fault("review_store", error)

    def _count(
        self, decision: PartDecision, decider: Slot, output: ModelOutput, frame: Frame
    ) -> None:
        self.parts_inspected += 1
        self.metrics.parts.inc()
        self.metrics.decision_of(decision.action.value, decision.decided_by.value).inc()
        self.metrics.latency_of(decider).observe(output.latency_ms)
        if output.confidence is not None:
            self.metrics.confidence_of(decider).observe(output.confidence)
        self.metrics.frame_age.set(self.source.frame_age_s)
        with self._lock:
            window = self._window
            window.parts += 1
            window.actions[decision.action] = window.actions.get(decision.action, 0) + 1
            window.deciders[decision.decided_by] = window.deciders.get(decision.decided_by, 0) + 1
            window.latency[decider].append(output.latency_ms)
        sampled = self.parts_inspected % self.config.drift_sample_every == 0
        # Only a frame the model could judge: one it could not (empty, say) has no statistics.
        if sampled and decider == "active" and output.confidence is not None and self.drift.add(
            image_stats(frame.image), output.confidence
        ):
            if self.drift.last is not None:
                for feature in FEATURES:
                    self.metrics.drift.labels(self.station, feature).set(
                        getattr(self.drift.last, f"psi_{feature}")
                    )
            else:
                self._persist_slots()  # a new reference was just taken
            self._state_dirty.set()

    def _review_item(
        self,
        frame: Frame,
        reason: p.ReviewReason,
        automation: p.AutomationLevel,
        model: LoadedModel,
        output: ModelOutput,
        suggestion: str | None,
        candidate: tuple[LoadedModel, ModelOutput] | None,
    ) -> ReviewItem | None:
        """The part's review item with its JPEG (built on the writer thread), or None."""
        try:
            ok, jpeg = cv2.imencode(
                ".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, self.config.review.jpeg_quality]
            )
        except cv2.error:  # an empty or malformed frame
            ok = False
        if not ok:
            self._raise_fault("review_image", f"cannot encode part {frame.part_id} as JPEG")
            return None
        slots = self.slots
        return ReviewItem(
            part_id=frame.part_id,
            created=datetime.fromtimestamp(frame.captured_at, UTC),
            reason=reason.value,
            automation=automation.value,
            suggestion=suggestion,
            confidence=output.confidence,
            model_label=output.label,
            candidate_label=candidate[1].label if candidate else None,
            active_version=model.ref.version if candidate is None else slots.active.ref.version,
            candidate_version=candidate[0].ref.version if candidate else None,
            image_jpeg=jpeg.tobytes(),
        )

    def _log_part(
        self, frame: Frame, decision: PartDecision, active: ModelOutput | None,
        candidate: ModelOutput | None,
    ) -> None:
        self.writer.log_part(PartLogEntry(
            part_id=frame.part_id,
            ts=datetime.fromtimestamp(frame.captured_at, UTC),
            action=decision.action.value,
            decided_by=decision.decided_by.value,
            active_label=active.label if active else None,
            candidate_label=candidate.label if candidate else None,
            agree=agree(active, candidate) if active and candidate else None,
            active_confidence=active.confidence if active else None,
        ))

    # --- candidate worker -------------------------------------------------------------------

    def _candidate_worker(self) -> None:
        lower_thread_priority(self.config.inference.candidate_nice)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._judge_with_other(job)
            except Exception:  # the worker must outlive any one part  # noqa: BLE001
                log.exception("candidate worker failed on part %s", job.frame.part_id)
            finally:
                self._jobs.done()

    def _judge_with_other(self, job: CandidateJob) -> None:
        other = run_model(job.other_model, job.frame.image, self.config.inference.timeout_ms)
        other_slot: Slot = "active" if job.decider == "candidate" else "candidate"
        if other.error is not None:
            self._raise_fault(f"{other_slot}_inference", other.error, job.other_model.ref,
                              generation=job.generation)
        active_model, active_out, candidate_model, candidate_out = (
            (job.decider_model, job.decider_output, job.other_model, other)
            if job.decider == "active"
            else (job.other_model, other, job.decider_model, job.decider_output)
        )
        agreed = agree(active_out, candidate_out)

        def opinion(model: LoadedModel, output: ModelOutput) -> p.ModelOpinion:
            return p.ModelOpinion(
                model=model.ref, label=output.label, confidence=output.confidence,
                latency_ms=output.latency_ms, error=output.error,
            )

        self.writer.enqueue(
            self._shadow_topic,
            1,
            lambda seq: p.ShadowResult(
                station=self.station, seq=seq, stream=self.store.stream,
                part_id=job.frame.part_id, mode=job.mode,
                active=opinion(active_model, active_out),
                candidate=opinion(candidate_model, candidate_out), agree=agreed,
            ),
            after=self._shadow_stored,
        )
        self.metrics.shadow_pairs.inc()
        self.metrics.latency_of(other_slot).observe(other.latency_ms)
        if other.confidence is not None:
            self.metrics.confidence_of(other_slot).observe(other.confidence)
        with self._lock:
            self._window.pairs += 1
            self._window.agreed += int(agreed)
            self._window.latency[other_slot].append(other.latency_ms)
            if job.generation == self._slot_generation:
                self._recent_agreement.append(agreed)
        if not agreed:
            self.metrics.disagreements.inc()
            if not job.queued_review:
                # The candidate never changes what happens to the part; the operator's label of
                # the disagreement is what the rollout gate needs.
                self.writer.review(lambda: self._review_item(
                    job.frame, p.ReviewReason.DISAGREEMENT, job.automation, active_model,
                    active_out, active_out.label, (candidate_model, candidate_out),
                ))
        self._log_part(job.frame, job.decision, active_out, candidate_out)

    def _shadow_stored(self, result: p.Envelope | Exception) -> None:
        if isinstance(result, OutboxFull):
            self._raise_fault("outbox_full", "outbox full: shadow results are being dropped")
        elif isinstance(result, Exception):
            self._raise_fault("outbox_write", f"a shadow result could not be stored: {result}")

    def _wake_relay(self) -> None:
        """After each writer commit: the relay publishes what it stored."""
        self.relay.wake()

    # --- MQTT: connection, triggers ---------------------------------------------------------

    def _on_connected(self) -> None:
        self._state_dirty.set()

    def _on_trigger(self, message: ReceivedMessage) -> None:
        trigger = getattr(self.source, "trigger", None)
        if trigger is None:
            # Once at warning: a PLC triggering every part would flood the log; the metric counts.
            level = logging.DEBUG if self._unheeded_triggers else logging.WARNING
            self._unheeded_triggers += 1  # only the MQTT thread writes it
            log.log(level, "trigger message ignored: source %s takes every frame as a part "
                    "(counted in linesight_source_ignored_triggers_total)",
                    redact_url(self.config.source))
            return
        part_id, problem = trigger_part_id(message.payload)
        if problem is not None:
            log.warning("trigger: %s; the part gets the camera's id", problem)
        trigger(part_id)

    # --- commands ---------------------------------------------------------------------------

    def _on_command(self, message: ReceivedMessage) -> None:
        if self._commands_closed.is_set():
            # Stopping: the controller sends a command again until it is acked.
            log.info("a command arrived while the station stops: left for its next start")
            return
        self._commands.put(message)

    def _command_worker(self) -> None:
        while True:
            message = self._commands.get()
            if message is None:
                return
            try:
                self.handle_command(message.payload)
            except Exception:  # a command must never take the station down  # noqa: BLE001
                log.exception("command handling failed")

    def handle_command(self, payload: bytes) -> p.CommandAck | None:
        """Carry out a command and acknowledge it; None when it is not answered yet (carried
        out, but its change is not saved: see `_answer_once_saved`)."""
        try:
            command = p.parse(p.Command, payload)
        except p.ProtocolError as exc:
            claimed = _cmd_id_of(payload)
            return self._ack(self._unproven(claimed), "unknown", ok=False,
                             error=_with_claim(str(exc), claimed, self._unproven(claimed)))
        name = command.body.name
        cmd_id = str(command.cmd_id)
        if self.command_key is not None:
            # Checked first: a forged command must neither use up a real one's cmd_id nor
            # answer for it (an error ack under a rollout's cmd_id would roll the rollout back).
            refused = signature_error(command, self.command_key)
            if refused is not None:
                log.warning("refused command %s (%s): %s", command.cmd_id, name, refused)
                return self._ack(NIL_CMD_ID, name, ok=False,
                                 error=_with_claim(refused, command.cmd_id, NIL_CMD_ID))
        if command.station != self.station:
            return self._ack(command.cmd_id, name, ok=False,
                             error=f"command addressed to {command.station}, not {self.station}")
        if cmd_id in self._unsaved_commands:
            # Carried out, its change not saved yet: this copy tries the save again.
            return self._answer_once_saved(command.cmd_id, name, self._save_with_commands(None))
        previous = self._unrecorded.get(cmd_id)
        if previous is not None:
            self._record_command(cmd_id, name, previous)
        else:
            previous = self.store.command_result(cmd_id)
        if previous is not None:
            done = json.loads(previous)
            return self._ack(command.cmd_id, name, ok=bool(done["ok"]), error=done["error"])
        if command.expires_at is not None and command.expires_at < datetime.now(UTC):
            # Not recorded: a stale copy the broker kept must not use up the cmd_id of a fresh
            # copy that follows it.
            return self._ack(command.cmd_id, name, ok=False,
                             error=f"command expired at {command.expires_at.isoformat()}")
        error, saved = self._execute(command.body, UnsavedCommand(command.cmd_id, name))
        if isinstance(command.body, p.DeployCandidate | p.Promote | p.Rollback):
            self._tidy_bundles()
        if error is None:
            return self._answer_once_saved(command.cmd_id, name, saved)
        # Nothing was changed. In memory first: the answer stays the same for every copy,
        # whether or not the store takes its record.
        result = _ack_json(error)
        self._unrecorded[cmd_id] = result
        self._record_command(cmd_id, name, result)
        return self._ack(command.cmd_id, name, ok=False, error=error)

    def _answer_once_saved(
        self, cmd_id: uuid.UUID, name: str, saved: list[UnsavedCommand]
    ) -> p.CommandAck | None:
        """Acknowledge the commands `saved` made durable; the ack of `cmd_id` among them, or
        None while its change is not saved (or when housekeeping's retry saved and acked it
        meanwhile). Unanswered, the controller sends the command again; a restart before the
        save undoes the change, and the copy that follows carries the command out afresh."""
        ack = self._ack_saved(saved).get(str(cmd_id))
        if ack is None and str(cmd_id) in self._unsaved_commands:
            log.warning("command %s (%s) is carried out but its change is not saved yet (fault "
                        "slots_save): it is acknowledged once it is", cmd_id, name)
        return ack

    def _record_command(self, cmd_id: str, name: str, result: str) -> None:
        """Store a command's result; one the store cannot take now stays in memory, answers
        the copies the controller sends, and is stored at the next copy."""
        try:
            self.store.record_command(cmd_id, name, result)
        except Exception as exc:  # noqa: BLE001 - a full or failing disk, a lock held too long
            log.error("the result of command %s (%s) could not be stored: %s; it is kept in "
                      "memory, so a copy of the command is answered, not carried out again",
                      cmd_id, name, exc)
            return
        self._unrecorded.pop(cmd_id, None)

    def _unproven(self, claimed: uuid.UUID) -> uuid.UUID:
        """The cmd_id to answer a command that could not be authenticated under: with a
        command key, never the one it claims."""
        return NIL_CMD_ID if self.command_key is not None else claimed

    def _execute(
        self, body: p.CommandBody, done: UnsavedCommand
    ) -> tuple[str | None, list[UnsavedCommand]]:
        """Carry out one command: the error text (None on success), and the commands whose
        change its save made durable (itself among them unless the store refused the save). A
        change is saved with the command's record in one commit, so a crash cannot keep one
        without the other."""
        saved: list[UnsavedCommand] = []
        try:
            if isinstance(body, p.DeployCandidate):
                check_fraction(body.mode, body.canary_fraction)  # before any download
                candidate = self._fetch_candidate(body)
                saved = self.at_boundary(lambda: self._set_slots(
                    with_candidate(self.slots, candidate, body.mode, body.canary_fraction), done
                ))
            elif isinstance(body, p.SetMode):
                saved = self.at_boundary(lambda: self._set_slots(
                    with_mode(self.slots, body.mode, body.canary_fraction), done
                ))
            elif isinstance(body, p.SetAutomation):
                saved = self.at_boundary(lambda: self._set_automation(
                    body.automation, body.reason, "controller", done
                ))
            elif isinstance(body, p.Promote):
                saved = self.at_boundary(
                    lambda: self._set_slots(promoted(self.slots, body.expect), done)
                )
            elif isinstance(body, p.Rollback):
                saved = self.at_boundary(lambda: self._set_slots(rolled_back(self.slots), done))
            elif isinstance(body, p.Switch):
                saved = self.at_boundary(lambda: self._set_slots(switched(self.slots, body.to),
                                                                 done))
        except (SlotError, BundleError, InferenceError, OSError, ValueError) as exc:
            log.warning("command %s refused: %s", body.name, exc)
            return str(exc), []
        log.info("command %s done", body.name)
        return None, saved

    def _set_automation(
        self, level: p.AutomationLevel, reason: str, by: str,
        command: UnsavedCommand | None = None, request: UiRequest | None = None,
    ) -> list[UnsavedCommand]:
        """Set the level asked for by a command, or by a `request` from the screen (taken by
        the save that carries it). The commands whose change this saved are returned, for the
        caller to acknowledge (a request from the screen has no command: it acknowledges them
        itself). The level is set before the save lock is taken: a retry that saves it first
        leaves the request open, never takes it without its level."""
        self.automation = level
        self.automation_note = f"{level.value} by {by}: {reason}".strip(": ")
        saved = self._save_with_commands(command, request)
        self._state_dirty.set()
        log.info("automation set to %s by %s (%s)", level.value, by, reason or "no reason given")
        return saved

    def _fetch_candidate(self, body: p.DeployCandidate) -> LoadedModel:
        """Download and verify the bundle (unless it is the candidate already), load, warm up."""
        if self.slots.candidate is not None and self.slots.candidate.ref == body.model:
            return self.slots.candidate
        bundle = fetch_bundle(
            body.url, body.model, body.signature, self.config.data_dir, key=self.key,
            timeout=self.config.download_timeout_s,
            min_free_bytes=floor_bytes(self.config.storage.min_free_mb),
        )
        return self._load(bundle, "candidate")

    def _tidy_bundles(self) -> None:
        """Remove the bundle folders under `data_dir/bundles/` that neither the slots run now,
        nor the saved slots (which a restart restores), nor the configuration names. Called
        where no fetch can run: at start-up and by the command worker between commands."""
        try:
            saved = self.store.load_slots() or {}
        except Exception as exc:  # noqa: BLE001 - a locked or failing store: remove nothing
            log.warning("bundle folders not tidied: the saved slots cannot be read: %s", exc)
            return
        slots = self.slots
        running = [model.bundle for model in (slots.active, slots.candidate, slots.previous)
                   if model is not None]
        named = [Path(str(saved[slot])) for slot in ("active", "candidate", "previous")
                 if saved.get(slot)]
        configured = [path for path in (self.config.active, self.config.candidate) if path]
        try:
            tidy_bundles(self.config.data_dir, [*running, *named, *configured])
        except OSError as exc:  # an unreadable folder: never worth failing a command or a start
            log.error("bundle folders not tidied: %s", exc)

    def _ack(
        self, cmd_id: uuid.UUID, name: str, *, ok: bool, error: str | None
    ) -> p.CommandAck:
        state = self._state(online=True)
        error = None if error is None else error[:ACK_ERROR_MAX]  # the contract's bound
        ack = self.store.enqueue(
            self.topics.station(self.station, p.Channel.ACK),
            1,
            lambda seq: p.CommandAck(
                station=self.station, seq=seq, cmd_id=cmd_id, command=name, ok=ok,
                error=error, state_after=state,
            ),
        )
        self.relay.wake()
        self._state_dirty.set()
        assert isinstance(ack, p.CommandAck)  # noqa: S101 - enqueue returns what it was given
        return ack

    # --- housekeeping -----------------------------------------------------------------------

    def _housekeeping(self) -> None:
        last_state = last_metrics = last_quota = last_status = last_disk = 0.0
        step = self._housekeeping_step
        while not self._stop.is_set() or self._loop_running:
            now = time.monotonic()
            # Each step on its own: one that fails (a full disk refuses the verdicts) must not
            # stop the others (the state, the relay's supervision).
            step("publishing verdicts", self._pump_verdicts)
            step("taking requests from the screen", self._take_ui_requests)
            if now - last_quota > 60:
                last_quota = now
                step("review quota and retention", self._enforce_quota)
            if now - last_disk > CHECK_EVERY_S:
                last_disk = now
                step("measuring free disk space", self._check_disk_space)
            step("connection faults", self._connection_faults)
            if self._state_dirty.is_set() or now - last_state > self.config.state_interval_s:
                self._state_dirty.clear()
                last_state = now
                step("publishing the state", self._publish_state)
            if now - last_metrics > self.config.metrics_interval_s:
                last_metrics = now
                step("publishing metrics", self._publish_metrics)
            if now - last_status > 1.0:
                last_status = now
                if self._slots_unsaved:
                    self._persist_slots()
                step("supervising the outbox relay", functools.partial(self._supervise_relay, now))
                step("counting what the source lost", self._count_source_losses)
                step("saving the status for the screen", self._save_status)
            self._stop.wait(0.25)

    def _housekeeping_step(self, what: str, step: Callable[[], None]) -> None:
        """Run one housekeeping step; a failure is logged, at most once a minute per step (a
        full disk fails the same step four times a second, and the log may share that disk)."""
        try:
            step()
        except Exception:  # housekeeping must keep going  # noqa: BLE001
            now = time.monotonic()
            if now - self._step_failed_at.get(what, -math.inf) >= 60:
                self._step_failed_at[what] = now
                log.exception("housekeeping: %s failed (logged at most once a minute)", what)

    def _connection_faults(self) -> None:
        # Shown on the station's own screen and metrics: nothing reaches the broker.
        self._fault_while("broker_refused", self.link.fatal_error)
        # A certificate expired, not valid yet by this clock, or for another host.
        self._fault_while("broker_tls", self.link.tls_error)
        # Advisory: a certificate to renew within broker.cert_warn_days.
        self._fault_while("broker_cert_expiring", self.link.cert_warning)
        # Another client with this station's client id (a station of the same name).
        self._fault_while("client_id_conflict", self.link.conflict_error)
        # The broker takes the connection but not the messages (an ACL for another user name).
        self._fault_while("broker_denied", self.link.denied_error)

    def _check_disk_space(self) -> None:
        """Warn while there is still room: the disk_low fault while the data dir's file system
        has less free space than `storage.min_free_mb`, before a write fails for want of it."""
        data_dir = self.config.data_dir.absolute()
        try:
            usage = shutil.disk_usage(data_dir)
        except OSError as exc:  # the data dir gone (lost storage), a file system that fails
            self.metrics.disk_free.set(math.nan)
            if not self._disk_unmeasured:
                self._disk_unmeasured = True
                log.warning("cannot measure the free space of %s: %s", data_dir, exc)
            return
        if self._disk_unmeasured:
            self._disk_unmeasured = False
            log.info("the free space of %s can be measured again", data_dir)
        space = DiskSpace(free=usage.free, total=usage.total)
        self.metrics.disk_free.set(space.free)
        min_free_mb = self.config.storage.min_free_mb
        with self._lock:
            was_low = "disk_low" in self.faults
        low = is_low(space.free, floor_bytes(min_free_mb), was_low=was_low)
        message = low_message(data_dir, space, min_free_mb) if low else None
        self._fault_while("disk_low", message, update=True)

    def _fault_while(self, code: str, message: str | None, *, update: bool = False) -> None:
        """Raise `code` while a condition gives a message for it; clear it once there is none."""
        if message is None:
            self._clear_faults(code)
        else:
            self._raise_fault(code, message, update=update)

    def _supervise_relay(self, now: float) -> None:
        """Start a relay that died again (the outbox is the hand-over, so nothing is lost), with
        a growing delay while it keeps dying; the fault stays until one has run for a while."""
        self.metrics.outbox_depth.set(self.store.outbox_depth())
        if self._stop.is_set():
            return
        restarts = self._relay_restarts
        if self.relay.alive():
            if restarts.healthy(now):
                self._clear_faults("outbox_relay")
            return
        if not restarts.may_start(now):
            return
        exit_code = self.relay.exit_code
        log.warning("the outbox relay stopped (exit code %s); starting it again", exit_code)
        self._raise_fault(
            "outbox_relay",
            f"the outbox relay stopped (exit code {exit_code}) and was started again",
        )
        self.relay.start()
        restarts.started(now)

    def _pump_verdicts(self) -> None:
        topic = self.topics.station(self.station, p.Channel.VERDICT)

        def build(row: VerdictRow, seq: int) -> p.Verdict:
            return p.Verdict(
                station=self.station, seq=seq, part_id=row.part_id, operator=row.operator,
                outcome=p.VerdictOutcome(row.outcome), label=row.label,
                review_reason=p.ReviewReason(row.review_reason), model_label=row.model_label,
                candidate_label=row.candidate_label, decided_at=row.decided_at,
            )

        if self.store.publish_verdicts(lambda _row: topic, build):
            self.relay.wake()

    def _take_ui_requests(self) -> None:
        """Hand the screen's new requests to the loop, oldest first, each once: one stays open
        in the store until the save of its change takes it, so only the id of the last one in
        hand tells it apart from one still waiting for its save."""
        for request in self.store.open_requests(after=self._requests_in_hand):
            self._requests_in_hand = request.id
            # Not waited for: a loop stuck on a part must not hold up housekeeping, and the
            # request is made as soon as the loop goes on.
            self._at_next_boundary(functools.partial(self._automation_requested, request))

    def _automation_requested(self, request: UiRequest) -> None:
        """A level asked for on the screen, taken by the save that carries it; that save also
        acknowledges the commands it saved. One for a level this agent does not know is taken
        with a save that changes nothing."""
        try:
            level = p.AutomationLevel(request.level)
        except ValueError:
            log.warning("ignored request %d from the screen for unknown automation level %r",
                        request.id, request.level)
            self._ack_saved(self._save_with_commands(None, request))
            return
        self._ack_saved(self._set_automation(level, request.reason, request.by, request=request))

    def _enforce_quota(self) -> None:
        quota = int(self.config.review.quota_mb * 1024 * 1024)
        self.store.prune_confirmed(timedelta(days=self.config.review.retention_days))
        self.store.prune_part_log(timedelta(days=self.config.history_days))
        self.store.prune_history(timedelta(days=self.config.history_days))
        report = self.store.enforce_quota(quota)
        if report.over_quota_unconfirmed:
            self._raise_fault(
                "review_quota_exceeded",
                f"{report.over_quota_unconfirmed} unconfirmed review images are over the "
                f"{self.config.review.quota_mb:g} MB quota; kept, waiting for operators",
            )
        else:
            self._clear_faults("review_quota_exceeded")

    def _publish_state(self) -> None:
        if self.store.outbox_full:
            self._raise_fault("outbox_full", "outbox full: shadow results are being dropped")
        else:
            self._clear_faults("outbox_full")
        state = self._state(online=True)
        self.metrics.outbox_depth.set(state.outbox_depth)
        self.metrics.review_depth.set(state.review_queue_depth)
        self.metrics.shadow_dropped.set(self.store.shadow_dropped)
        self.metrics.faults.set(len(state.faults))
        if not self.link.connected:
            # Published now, it would wait in the MQTT client's memory (one more every
            # state_interval_s, for as long as the broker is away) and go out stale at the
            # reconnect; the reconnect marks the state dirty, so the newest goes out then.
            return
        self.link.publish(self.topics.station(self.station, p.Channel.STATE), state.to_json(),
                          qos=1, retain=True)

    def _count_source_losses(self) -> None:
        """Parts and frames the source lost, and its reconnects, in the metrics: read once a
        second, not per part (a camera flapping between two states shows at the next scrape)."""
        self.metrics.record_source(with_unheeded_triggers(
            read_source_losses(self.source), self._unheeded_triggers
        ))
        self.metrics.source_reconnects.set(self.source.reconnects)

    def _window_parts_missed(self) -> int | None:
        """Parts the source missed since the last StationMetrics; None when it counts none."""
        missed = read_source_losses(self.source).parts_missed
        before, self._missed_at_window = self._missed_at_window, missed
        return None if missed is None else counted_since(missed, before)

    def _publish_metrics(self) -> None:
        with self._lock:
            window, self._window = self._window, Window(time.monotonic())
            recent = list(self._recent_agreement)
        elapsed = max(time.monotonic() - window.started, 1e-3)
        agreement = (window.agreed / window.pairs) if window.pairs else None
        # NaN: no pairs of the models that run now (none yet, or no candidate any more).
        self.metrics.agreement.set(sum(recent) / len(recent) if recent else math.nan)
        message = p.StationMetrics(
            station=self.station, seq=max(self.store.last_seq(), 0), window_s=elapsed,
            parts=window.parts, parts_missed=self._window_parts_missed(),
            actions=window.actions, decided_by=window.deciders,
            shadow_pairs=window.pairs, agreement_rate=agreement,
            candidate_skipped=window.skipped,
            latency={
                slot: p.LatencySummary(
                    p50_ms=percentile(values, 50), p95_ms=percentile(values, 95),
                    p99_ms=percentile(values, 99), count=len(values),
                )
                for slot, values in window.latency.items() if values
            },
            faults=len(self.faults), outbox_depth=self.store.outbox_depth(),
            review_queue_depth=self.store.review_count(), drift=self.drift.last,
        )
        self.link.publish(self.topics.station(self.station, p.Channel.METRICS),
                          message.to_json(), qos=0)

    def _save_status(self, *, running: bool = True) -> None:
        """The snapshot the station UI shows: the state, plus whether the broker is reachable."""
        connected = running and self.link.connected
        document = self._state(online=connected).model_dump(mode="json", by_alias=True)
        document["broker_connected"] = connected
        document["rollout_active"] = self.slots.candidate is not None
        # The screen's Pass and Reject carry the running model's own words for the two labels.
        manifest = self.slots.active.manifest
        document["model_labels"] = {"ok": manifest.ok_label, "defect": manifest.defect_label}
        self.store.save_status(document)

    # --- shutdown ---------------------------------------------------------------------------

    def _shutdown(self) -> int:
        systemd.notify("\n".join([systemd.STOPPING, systemd.status("delivering what is owed")]))
        # The commands taken so far finish first, so their acks are among what is delivered
        # below (not left for the next start); one that comes later is not taken.
        self._commands_closed.set()
        self._commands.put(None)
        if self._command_thread is not None:
            self._command_thread.join(timeout=COMMAND_DRAIN_S)
            if self._command_thread.is_alive():
                log.warning("the command in hand did not finish within %.0f s; the station "
                            "stops without its ack", COMMAND_DRAIN_S)
        # Every queued part gets its shadow result, unless the candidate hangs (a model call
        # cannot be interrupted): the stop must not wait for it forever.
        if not self._jobs.join(timeout=CANDIDATE_DRAIN_S):
            log.warning("the candidate worker did not finish %d parts within %.0f s; their "
                        "shadow results are not stored", self._jobs.unfinished, CANDIDATE_DRAIN_S)
        self.writer.flush()
        # A full disk may refuse the verdicts: they wait in the store for the next start.
        self._housekeeping_step("publishing verdicts", self._pump_verdicts)
        self.relay.wake()
        deadline = time.monotonic() + self.config.outbox.receipt_wait_s
        stop_requested = False
        while self.store.outbox_depth() > 0 and time.monotonic() < deadline:
            if self._stop.is_set() and not stop_requested:
                # A stop request, before or during the wait: what is owed stays safely in the
                # outbox, so only a short wait more.
                stop_requested = True
                deadline = min(deadline, time.monotonic() + 2.0)
            self.relay.wake()
            self._watchdog()
            time.sleep(0.05)
        owed = self.store.outbox_depth()
        if owed:
            log.warning(
                "%d messages still owed (no receipt yet); they stay in the outbox for next start",
                owed,
            )
        else:
            log.info("every message delivered and receipted")
        self._stop.set()
        self._jobs.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._apply_boundary_actions()  # a screen's request handed over as the loop ended
        if self._slots_unsaved:
            self._persist_slots()  # a last try: what the station runs outlives the stop
        if self._unsaved_commands:
            log.warning("stopping with commands carried out whose change could not be saved "
                        "(%s): they were not acknowledged, the next start undoes them, and the "
                        "controller sends them again", ", ".join(
                            c.name for c in self._unsaved_commands.values()))
        if self._unsaved_requests:
            log.warning("stopping with requests from the screen made whose change could not be "
                        "saved (%s): they stay open, and the next start makes them again",
                        ", ".join(request_text(r) for r in self._unsaved_requests))
        self.relay.stop()
        self.writer.close()
        self.gate.close()
        self._save_status(running=False)
        offline = self.link.publish(
            self.topics.station(self.station, p.Channel.STATE),
            self._state(online=False).to_json(), qos=1, retain=True,
        )
        offline.wait(2.0)
        self.link.stop()
        self.source.close()
        self.store.close()
        return 0


def with_unheeded_triggers(losses: SourceLosses, unheeded: int) -> SourceLosses:
    """The source's losses with the PLC triggers it had no use for added to its ignored ones."""
    if not unheeded:
        return losses
    return replace(losses, ignored_triggers=(losses.ignored_triggers or 0) + unheeded)


def trigger_part_id(payload: bytes) -> tuple[str | None, str | None]:
    """The part id a PLC gateway's trigger names (None: the camera's id), and what was wrong
    with the payload, if anything. A trigger is never refused: the part is in front of the
    camera either way. An over-long id is not cut short, which could give two parts one id."""
    if not payload.strip():
        return None, None
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):  # not JSON or UTF-8, a huge number, deep nesting
        return None, "payload is not JSON"
    if not isinstance(document, dict):
        return None, 'payload is not a JSON object like {"part_id": "..."}'
    part_id = document.get("part_id")
    if part_id is None or part_id == "":
        return None, None
    if not isinstance(part_id, str):
        return None, f"part_id is not a string: {part_id!r:.60}"
    if len(part_id) > p.PART_ID_MAX_LENGTH:
        return None, (
            f"part_id is {len(part_id)} characters, more than {p.PART_ID_MAX_LENGTH}: "
            f"{part_id[:40]!r}..."
        )
    return part_id, None


NIL_CMD_ID = p.NIL_CMD_ID


def _ack_json(error: str | None) -> str:
    """A command's result as the command log keeps it."""
    return json.dumps({"ok": error is None, "error": error})


def unsaved_message(
    error: Exception, unsaved: list[UnsavedCommand], requests: list[UiRequest] | None = None
) -> str:
    """The `slots_save` fault's message: what failed, the commands it keeps unanswered and the
    screen's requests it keeps open."""
    message = f"the model slots could not be saved: {error}"
    if unsaved:
        names = ", ".join(f"{command.name} ({command.cmd_id})" for command in unsaved)
        message += (f"; carried out but not acknowledged until saved (a restart before that "
                    f"undoes them): {names}")
    if requests:
        asked = ", ".join(request_text(request) for request in requests)
        message += (f"; asked on the screen, made but kept open until saved (a restart before "
                    f"that makes them again): {asked}")
    return message


def stalled_message(waited_s: float, backlog: int, bound: int) -> str:
    """The `store_stalled` fault's message, renewed while the wait lasts."""
    return (f"the disk has taken nothing for {waited_s:.0f} s: {backlog} items wait to be "
            f"stored (storage.write_queue: {bound}); parts passing meanwhile are not inspected "
            "(a live camera's frames are dropped, a trigger's part missed) until the disk "
            "catches up. Check data_dir's disk (a stuck NFS or USB disk, a failing drive)")


def request_text(request: UiRequest) -> str:
    """A screen's request as a fault message or the log names it."""
    return f"automation {request.level} by {request.by} (request {request.id})"


def _with_claim(error: str, claimed: uuid.UUID, answered: uuid.UUID) -> str:
    """The error, naming the cmd_id the command claimed when it is answered under another."""
    return error if claimed == answered else f"{error} (it claimed cmd_id {claimed})"


def _cmd_id_of(payload: bytes) -> uuid.UUID:
    """The cmd_id of an unreadable command when one can be found, so the ack still correlates."""
    try:
        document = json.loads(payload)
        return uuid.UUID(str(document["cmd_id"]))
    except (ValueError, KeyError, TypeError, RecursionError):
        return NIL_CMD_ID
