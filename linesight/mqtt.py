"""The one MQTT link of Linesight: the only module that imports paho-mqtt.

Every process (station agent, fleet controller, demo) talks to the broker through `MqttLink`:
it connects in the background, reconnects with exponential backoff, re-subscribes on every
connect, retries only seldom when the broker refuses the credentials, and backs off when another
client keeps taking its client id's session over. Delivery guarantees beyond "QoS 1 while the
process lives" belong to the caller's outbox, not to this link.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from linesight import cert_expiry, tls_failure
from linesight.config_file import ConfigPath, Count, Number

__all__ = [
    "BrokerAddress",
    "LinkConfig",
    "MqttLink",
    "PublishTicket",
    "ReceivedMessage",
    "TakeoverWatch",
    "Will",
    "parse_broker_url",
    "topic_matches",
]

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

# CONNACK reasons that no amount of retrying will fix (paho maps MQTT 3.1.1 return codes 4 and 5
# to 134 and 135, so one set covers both protocols): retrying them only floods the broker's log.
FATAL_CONNACK_REASONS: dict[int, str] = {
    133: "client identifier not valid",
    134: "bad user name or password",
    135: "not authorised",
    138: "client banned",
    140: "bad authentication method",
}


# MQTT 5 DISCONNECT reason: another connection with our client id took the session over.
SESSION_TAKEN_OVER = 142
# Brokers that close the old connection without saying why (mosquitto before 2.0.15, any broker
# under MQTT 3.1.1): this many connections in a row closed this soon after the broker accepted
# them are the same sign. The twins' own reconnect delays (backoff_min_s) keep each other's
# connections far shorter; a broker restart closes one connection, not several in a row.
SHORT_SESSION_S = 10.0
SHORT_SESSIONS_IN_A_ROW = 3

# How long the check whether the broker still listens may take (see listener_refuses).
LISTENER_CHECK_S = 0.5

LostHow = Literal["taken_over", "closed", "other"]
ConflictKind = Literal["taken_over", "closed_soon"]


def loss_after_refusals(how: LostHow, refused_here: bool, refusals_known: bool) -> LostHow:
    """How a lost connection counts towards a client-id conflict, given the broker's refusals.

    Mosquitto closes an MQTT 5 connection after a publish its ACL refuses: that is no other
    client taking the session over. The refusal's PUBACK is not always read before the closed
    socket fails a write, so while a refusal is known and not lifted (a publish on that topic
    has not been taken since), a close without a reason is put down to it too. A session the
    broker says was taken over still counts as one."""
    if refused_here or (refusals_known and how == "closed"):
        return "other"
    return how


def owed_one_by_one(owed: int, reset: bool, unacknowledged: int, window: int) -> int:
    """How many PUBACKs the next connections must read one message at a time, after a loss.

    A broker that closes a connection with data of ours still unread resets it, and the reset
    throws away what it had sent us and we had not read yet: among it, the PUBACK of a publish it
    refused (Mosquitto closes an MQTT 5 connection after one), the only sign of why it closed.
    The messages on the wire then (at most `window`, the first of the `unacknowledged`) go again
    one at a time, so that a refusal among them is read before the broker closes again; a loss
    without a reset lost no PUBACK and changes nothing."""
    if reset and unacknowledged > 0:
        return max(owed, min(unacknowledged, window))
    return owed


def listener_refuses(peer: tuple[str, int], timeout: float = LISTENER_CHECK_S) -> bool:
    """Whether nothing listens at the broker's address `peer` right now (the connection is
    refused). Checked at once after a connection the broker closed without a reason: a broker
    stopping or restarting closes its listener with its connections, and a new one is not back
    that soon, while a takeover needs a broker that is running. A timeout or any other error says
    nothing either way: False."""
    try:
        with socket.create_connection(peer, timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


class _DropPahoNoise(logging.Filter):
    """paho 2.2 logs an ERROR each time its loop runs once more after a clean disconnect, one
    for each TLS error on a read or write, which the link reports itself (once, as
    `tls_error`), and one for each read that failed on a reset connection, which the link's own
    warning names (`lost the broker (...: [Errno 104] ...)`): the latter two go down to DEBUG,
    so a broker that resets every retry is not an ERROR line each time (alerts fire on those)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Client is not connected"):
            return False
        if str(record.msg).startswith("failed to receive on socket") or (
            record.args and isinstance(record.args, tuple)
            and isinstance(record.args[0], ssl.SSLError)
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_A = TypeVar("_A")
_R = TypeVar("_R")


class _Client(paho.Client):
    """paho's client, keeping the first error a connection's socket raised, which paho only
    logs. A broker that refuses this device's client certificate under TLS 1.3 says so on the
    first read after the handshake (or closes the connection first): this is where it shows."""

    socket_error: OSError | None = None

    def set_inflight_window(self, messages: int) -> None:
        """QoS 1 messages on the wire at once, from now on: paho reads it at every PUBACK and
        reconnect, but its own setter refuses while a connection is open or being reopened."""
        self._max_inflight_messages = messages

    def _messages_reconnect_reset_out(self) -> None:
        """paho's, keeping the window: paho 2.x marks every unacknowledged message to go again
        at once on reconnect (it never counts them against the window there), so a backlog of
        thousands went out in one burst; here all but the first `max_inflight` wait their turn."""
        super()._messages_reconnect_reset_out()
        with self._out_message_mutex:
            window = self._max_inflight_messages
            on_the_wire = 0
            for message in self._out_messages.values():
                if message.qos == 0 or window == 0:
                    continue
                if on_the_wire < window:
                    on_the_wire += 1
                elif message.state == paho.mqtt_ms_publish:
                    message.state = paho.mqtt_ms_queued

    def replace_tls_context(self, context: ssl.SSLContext) -> None:
        """Use `context` from the next connect on (paho's `tls_set_context` works only once)."""
        self._ssl_context = context

    def _sock_recv(self, bufsize: int) -> bytes:
        return self._keeping_error(super()._sock_recv, bufsize)

    def _sock_send(self, buf: bytes | bytearray) -> int:
        return self._keeping_error(super()._sock_send, buf)

    def _keeping_error(self, call: Callable[[_A], _R], argument: _A) -> _R:
        try:
            return call(argument)
        except BlockingIOError:  # no data yet, or the send buffer is full: not an error
            raise
        except OSError as exc:
            self.socket_error = self.socket_error or exc
            raise


# paho's own debug trail (packets in and out), under ours so one logging config covers both.
_ROUTE_CACHE_SIZE = 100_000
_PAHO_LOGGER = logging.getLogger(f"{__name__}.paho")
_PAHO_LOGGER.addFilter(_DropPahoNoise())

MessageCallback = Callable[["ReceivedMessage"], None]
Listener = Callable[[], None]


class BrokerAddress(NamedTuple):
    host: str
    port: int
    tls: bool


def _without_credentials(url: str) -> str:
    """`url` with whatever stands before an '@' (a user name, a password) replaced by ***."""
    if "@" not in url:
        return url
    scheme, separator, _ = url.partition("://")
    head = f"{scheme}://" if separator and "@" not in scheme else ""
    return f"{head}***@{url.rpartition('@')[2]}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Split `mqtt://host:port` or `mqtts://host:port` into (host, port, tls).

    The port may be left out (1883 / 8883). Credentials, paths and queries are refused so a
    password never ends up in a URL that gets logged.
    """
    safe_url = _without_credentials(url.strip())  # what the errors below show: they are logged
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        shown = f"'{parts.scheme}'" if parts.scheme else "none"
        raise ValueError(
            f"broker URL {safe_url!r}: scheme {shown} is not supported; use mqtt:// or mqtts://"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"broker URL {safe_url!r}: credentials do not belong in the URL; "
            "set username/password in the link config"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"broker URL {safe_url!r}: unexpected path, query or fragment after host:port"
        )
    host = parts.hostname
    if not host:
        raise ValueError(f"broker URL {safe_url!r}: host is missing")
    try:
        # What the resolver does first; its UnicodeError would end paho's network thread.
        host.encode("idna")
    except UnicodeError:
        raise ValueError(
            f"broker URL {safe_url!r}: {host!r} is not a valid host name (dot-separated parts of "
            "1 to 63 characters each)"
        ) from None
    try:
        port = parts.port
    except ValueError:
        raw_port = parts.netloc.rpartition(":")[2]
        raise ValueError(
            f"broker URL {safe_url!r}: port {raw_port!r} is not a number between 1 and 65535"
        ) from None
    if port is None:
        port = DEFAULT_PORTS[scheme]
    elif port == 0:
        raise ValueError(f"broker URL {safe_url!r}: port 0 is not a number between 1 and 65535")
    return BrokerAddress(host=host, port=port, tls=scheme == "mqtts")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT wildcard matching with paho's own rules, so fakes behave like the real broker.

    A shared subscription (`$share/<group>/<filter>`) matches like its inner filter.
    """
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    return bool(paho.topic_matches_sub(topic_filter, topic))


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Will:
    """What the broker publishes for us when our connection dies without a clean disconnect."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class LinkConfig(BaseModel):
    # No infinite delays: the backoff would double for ever, and JSON (the relay's spec) has
    # no such number.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    url: str
    client_id: str = Field(min_length=1, max_length=128)
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    ca_file: ConfigPath | None = None
    cert_file: ConfigPath | None = None
    key_file: ConfigPath | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive: Count = Field(default=30, ge=1, le=65535)
    backoff_min_s: Number = Field(default=0.5, gt=0)
    backoff_max_s: Number = Field(default=30.0, gt=0)
    # After a refusal no retry can fix by itself (bad credentials, not authorised): try again
    # this seldom, so a corrected password file or ACL is picked up without a restart, and the
    # broker's log is not flooded meanwhile.
    refused_retry_s: Number = Field(default=60.0, ge=0.1, le=3600)
    # False keeps the broker-side session (subscriptions + queued QoS 1 messages) across
    # disconnects, so a durable subscriber misses nothing while it is away.
    clean_start: bool = False
    # MQTT 5 only: how long the broker keeps the session after we go away (3.1.1 sessions
    # live until the broker's own persistent_client_expiration).
    session_expiry_s: Count = Field(default=7 * 24 * 3600, ge=0, le=0xFFFFFFFF)
    # After another client with our client id took the session over (two stations configured
    # with the same name): reconnect only this seldom, so the two do not take it from each other
    # many times a second.
    takeover_retry_s: Number = Field(default=30.0, ge=0.1, le=3600)
    # QoS 1 messages on the wire before their PUBACK. paho's default of 20 makes a busy
    # publisher (the controller's receipts, a station's outbox replay) wait a round trip per 20.
    max_inflight: Count = Field(default=1000, ge=1, le=65535)
    # Warn this many days before the broker's certificate (read at every TLS connect) or this
    # client's own `cert_file` expires; 0: never.
    cert_warn_days: Number = Field(default=cert_expiry.DEFAULT_WARN_DAYS, ge=0, le=3650)

    @field_validator("url")
    @classmethod
    def _url_is_valid(cls, url: str) -> str:
        parse_broker_url(url)
        return url

    @model_validator(mode="after")
    def _fields_agree(self) -> LinkConfig:
        if self.backoff_min_s > self.backoff_max_s:
            raise ValueError(
                f"backoff_min_s ({self.backoff_min_s}) is larger than "
                f"backoff_max_s ({self.backoff_max_s})"
            )
        if self.password is not None and self.username is None:
            raise ValueError("password is set but username is not")
        tls_files = [name for name in ("ca_file", "cert_file", "key_file") if getattr(self, name)]
        if tls_files and not self.address.tls:
            raise ValueError(f"{', '.join(tls_files)} set but url {self.url!r} is not mqtts://")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set but cert_file is not")
        return self

    @property
    def address(self) -> BrokerAddress:
        return parse_broker_url(self.url)


class PublishTicket:
    """Tells whether the broker acknowledged one publish (PUBACK for QoS 1).

    A PUBACK only means the broker has the message. It is not proof of delivery: the durable
    guarantee is the caller's outbox, which deletes a row only on the consumer's receipt.
    """

    # The Event is made only when someone waits before the PUBACK: a publisher sending a batch
    # waits on its last ticket only, and an Event per message was measurable at line rates.
    __slots__ = ("_done", "_event", "_reason", "mid", "qos", "topic")
    _lock = threading.Lock()

    def __init__(self, mid: int, qos: int, topic: str = "") -> None:
        self.mid = mid
        self.qos = qos
        self.topic = topic
        self._done = False
        self._event: threading.Event | None = None
        self._reason: int | None = None

    def wait(self, timeout: float) -> bool:
        """True once the broker acknowledged the message; False if `timeout` passed first."""
        with PublishTicket._lock:
            if self._done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def is_published(self) -> bool:
        return self._done

    @property
    def reason(self) -> int | None:
        """The PUBACK reason code (MQTT 5; 0 for 3.1.1), None until acknowledged."""
        return self._reason

    def _complete(self, reason: int) -> None:
        with PublishTicket._lock:
            self._reason = reason
            self._done = True
            event = self._event
        if event is not None:
            event.set()


class TakeoverWatch:
    """Whether another client keeps taking this client id's session over.

    A conflict begins with an MQTT 5 DISCONNECT "Session taken over" (reason 142), or with
    `SHORT_SESSIONS_IN_A_ROW` connections in a row that the broker closed, without a word, less
    than `SHORT_SESSION_S` after accepting them. It is over once a connection has lasted
    `stable_s`: the link uses twice its `takeover_retry_s`, by when a twin backing off the same
    way would have taken the session again. Times are `time.monotonic()` seconds; not
    thread-safe (the link holds its lock).
    """

    def __init__(self, stable_s: float) -> None:
        if stable_s <= 0:
            raise ValueError(f"stable_s must be positive, not {stable_s}")
        self.stable_s = stable_s
        self.conflict: ConflictKind | None = None
        self._connected_at: float | None = None
        self._short_in_a_row = 0

    def connected(self, now: float) -> None:
        self._connected_at = now

    def is_short(self, now: float) -> bool:
        """Whether the current connection is younger than `SHORT_SESSION_S`: only a close of
        such a one can count towards a conflict."""
        return self._connected_at is not None and now - self._connected_at < SHORT_SESSION_S

    def connect_failed(self) -> None:
        """A connect the broker did not take (down, refusing): a broker that keeps restarting,
        not a twin, which never keeps this link from connecting; the run of short sessions
        starts again."""
        self._short_in_a_row = 0

    def lost(self, now: float, how: LostHow) -> bool:
        """The connection ended (`how`: "taken_over" for reason 142, "closed" when the broker
        closed it without a DISCONNECT, "other" for anything else); True if a conflict begins."""
        connected_at, self._connected_at = self._connected_at, None
        kind: ConflictKind | None = None
        if how == "taken_over":
            kind = "taken_over"
        elif how == "closed" and connected_at is not None and now - connected_at < SHORT_SESSION_S:
            self._short_in_a_row += 1
            if self._short_in_a_row >= SHORT_SESSIONS_IN_A_ROW:
                kind = "closed_soon"
        else:
            self._short_in_a_row = 0
        if kind is None or self.conflict is not None:
            return False
        self.conflict = kind
        return True

    def settle(self, now: float) -> bool:
        """True if the conflict has just ended: the current connection has lasted `stable_s`."""
        if self.conflict is None or self._connected_at is None:
            return False
        if now - self._connected_at < self.stable_s:
            return False
        self.conflict = None
        self._short_in_a_row = 0
        return True


@dataclass(frozen=True, slots=True)
class _Subscription:
    topic_filter: str
    callback: MessageCallback
    qos: int


def _disable_nagle(client: paho.Client, userdata: Any, sock: Any) -> None:
    """TCP_NODELAY on the client's socket, which paho leaves off.

    With Nagle's algorithm on, a small PUBLISH sent while the previous one is not yet
    acknowledged at the TCP level waits for that ACK, and the broker's kernel may delay its ACK
    by up to 40 ms: a quarter of a station's publish round trips took ~40 ms instead of
    ~0.5 ms at 200 parts/s, so its messages went out in bursts (docs/decisions/0007).
    """
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is None:  # not a TCP socket (websockets): nothing to tune
        return
    try:
        setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        logger.warning("mqtt: cannot set TCP_NODELAY: %s", exc)


class MqttLink:
    """One connection to the broker, shared by everything in a process.

    Callbacks (message, connect and disconnect listeners) run on paho's network thread: they
    must be quick and must not block on the link itself (e.g. `ticket.wait`).
    """

    def __init__(self, config: LinkConfig, *, will: Will | None = None) -> None:
        self._config = config
        self._address = config.address
        self._will = will
        self._lock = threading.Lock()
        # Signalled whenever `_connected` or `_fatal_error` changes, for wait_connected.
        self._state_changed = threading.Condition(self._lock)
        self._subscriptions: list[_Subscription] = []
        self._routes: dict[str, list[MessageCallback]] = {}  # topic -> callbacks, cached
        # Filters the broker has seen a SUBSCRIBE for from this link, see _resubscribe.
        self._sent_filters: set[str] = set()
        self._stale_filters: set[str] = set()
        self._connect_listeners: list[Listener] = []
        self._disconnect_listeners: list[Listener] = []
        # mid -> ticket, or None when the PUBACK beat the publisher to registering its ticket.
        # A PUBACK that came before publish() registered its ticket leaves its reason code.
        self._pending: dict[int, PublishTicket | int] = {}
        self._denied: dict[str, str] = {}  # topic -> why the broker refused a publish there
        self._denied_now = False  # the broker refused a publish on this connection
        self._peer: tuple[str, int] | None = None  # the broker's address on this connection
        # PUBACKs still to read one message at a time after a reset, see owed_one_by_one.
        self._owed_one_by_one = 0
        self._connected = False
        # Connected and the subscriptions sent: what wait_connected waits for, so that what a
        # caller publishes next reaches the broker after this link's SUBSCRIBE.
        self._ready = False
        self._fatal_error: str | None = None
        self._tls_error: str | None = None  # why the last connect's TLS handshake failed
        self._closed_alert: str | None = None  # the broker's alert after the handshake, if read
        self._answered = False  # the broker answered this attempt's CONNECT (CONNACK read)
        self._takeovers = TakeoverWatch(2 * config.takeover_retry_s)
        self._connect_attempts = 0
        self._last_failure: str | None = None  # why the last connect failed, logged once
        self._started = False
        self._stopping = False
        self._tls_files = _tls_files_stamp(config)  # to load them again once replaced
        self._client = self._build_client()  # checks the TLS files: readable, what they say
        self._broker_cert_expires: datetime | None = None  # read at every TLS connect
        self._own_cert_expires = self._read_own_expiry(config)

    @staticmethod
    def _read_own_expiry(config: LinkConfig) -> datetime | None:
        """When `cert_file` expires. The TLS context has loaded it already; a form it takes that
        this cannot read costs only the warning before expiry, never the link."""
        if config.cert_file is None:
            return None
        try:
            return cert_expiry.not_after_of(config.cert_file)
        except ValueError as exc:
            logger.warning("mqtt link %s: no warning before cert_file expires: %s",
                           config.client_id, exc)
            return None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting in the background; returns at once even with no broker listening."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("this MqttLink was stopped; build a new one")
            if self._started:
                return
            self._started = True
        config = self._config
        if config.protocol == "5":
            # paho leaves Properties.__init__ unannotated.
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0 if config.clean_start else config.session_expiry_s
            self._client.connect_async(
                self._address.host,
                self._address.port,
                keepalive=config.keepalive,
                clean_start=config.clean_start,
                properties=properties,
            )
        else:
            self._client.connect_async(
                self._address.host, self._address.port, keepalive=config.keepalive
            )
        self._client.loop_start()
        logger.info(
            "mqtt link %s connecting to %s:%d (MQTT %s%s)",
            config.client_id,
            self._address.host,
            self._address.port,
            config.protocol,
            ", TLS" if self._address.tls else "",
        )

    def stop(self) -> None:
        """Disconnect cleanly (the broker does NOT send the Will) and end the network thread.

        Publish an offline state yourself before calling this if subscribers should see one.
        Safe to call more than once, and before `start`.
        """
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            started = self._started
        if started:
            self._client.disconnect()
            self._client.loop_stop()
        with self._lock:
            self._connected = self._ready = False
            self._pending.clear()
            self._state_changed.notify_all()

    def __enter__(self) -> MqttLink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- state -------------------------------------------------------------------------------

    @property
    def config(self) -> LinkConfig:
        return self._config

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    @property
    def fatal_error(self) -> str | None:
        """Why the broker refused this client in a way no quick retry fixes (bad credentials,
        not authorised, ...), until it takes the client again; the link still tries, every
        `refused_retry_s`. None otherwise."""
        with self._lock:
            return self._fatal_error

    @property
    def tls_error(self) -> str | None:
        """Why the TLS handshake with the broker failed on the last attempt (its certificate
        expired, not valid yet by this device's clock, issued for another host name, or not
        signed by a trusted CA; or the broker ended the handshake), until a connection succeeds
        or an attempt fails for another reason; the link keeps retrying with its backoff. None
        otherwise."""
        with self._lock:
            return self._tls_error

    @property
    def cert_warning(self) -> str | None:
        """Which certificate expires within `cert_warn_days`, and when: the broker's (as last
        seen in a TLS handshake) or this client's own `cert_file` (loaded again first if it was
        replaced: a renewed certificate ends the warning). None otherwise."""
        if self._address.tls:
            self._reload_tls_files()
        with self._lock:
            broker_expires = self._broker_cert_expires
        now = datetime.now(UTC)
        days = self._config.cert_warn_days
        address = f"{self._address.host}:{self._address.port}"
        warnings = [
            cert_expiry.warning(what, expires, now, days)
            for what, expires in (
                (f"the broker's certificate ({address})", broker_expires),
                (f"this client's certificate ({self._config.cert_file})", self._own_cert_expires),
            )
            if expires is not None
        ]
        return "; ".join(w for w in warnings if w) or None

    @property
    def conflict_error(self) -> str | None:
        """Why another client seems to share this link's client id (the broker keeps handing
        the session from one to the other), while it does: the link then reconnects only every
        `takeover_retry_s`. None once a connection has lasted twice that long untaken."""
        with self._lock:
            ended = self._takeovers.settle(time.monotonic())
            kind = self._takeovers.conflict
        if ended:
            self._log_conflict_over()
        return None if kind is None else self._conflict_message(kind)

    @property
    def connect_attempts(self) -> int:
        """How many times a connection was attempted (TCP connect + CONNECT), for diagnostics."""
        with self._lock:
            return self._connect_attempts

    @property
    def unacknowledged(self) -> int:
        """QoS 1 messages handed to this link that the broker has not acknowledged yet: they
        wait in memory and go again at each reconnect until it does."""
        with self._lock:
            return self._unacknowledged_locked()

    def _unacknowledged_locked(self) -> int:
        return sum(
            isinstance(ticket, PublishTicket) and ticket.qos > 0
            for ticket in self._pending.values()
        )

    def holds(self, ticket: PublishTicket) -> bool:
        """Whether the message of `ticket` still waits in this link for the broker's PUBACK (it
        goes again by itself at the next connect); False once acknowledged, dropped (QoS 0 at a
        disconnect, everything at `stop`) or pushed out by a later message with its message id."""
        with self._lock:
            return self._pending.get(ticket.mid) is ticket

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected and subscribed (the SUBSCRIBE sent: a message published
        after this returns reaches the broker after it); False on timeout, or at once after a
        fatal refusal."""
        with self._state_changed:
            self._state_changed.wait_for(
                lambda: self._ready or self._fatal_error is not None or self._stopping,
                timeout,
            )
            return self._ready

    # -- traffic -----------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> PublishTicket:
        """Hand a message to paho; never raises because the broker is away.

        While disconnected, QoS 1 messages wait in paho's memory and go out on reconnect; QoS 0
        messages are dropped. Neither survives this process: durability is the caller's outbox.
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        ticket = PublishTicket(info.mid, qos, topic)
        if qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # Dropped by paho while disconnected: no PUBACK will ever come.
            return ticket
        with self._lock:
            early = self._pending.get(info.mid)
            if isinstance(early, int):
                del self._pending[info.mid]
            else:
                self._pending[info.mid] = ticket
        if isinstance(early, int):
            self._acknowledged(ticket, early)
        return ticket

    def subscribe(self, topic_filter: str, callback: MessageCallback, qos: int = 1) -> None:
        """Deliver messages matching `topic_filter` to `callback`, across every reconnect.

        Register before `start()` when the session is persistent: the messages the broker
        queued while we were away arrive right after CONNACK and need a callback to land in.
        The callback runs on the network thread; if it raises, the error is logged and later
        messages are still delivered. With overlapping filters the broker may send one copy per
        filter, and each copy reaches every matching callback: consumers dedupe by message id.
        """
        if not _filter_is_valid(topic_filter):
            raise ValueError(f"invalid MQTT topic filter {topic_filter!r}")
        subscription = _Subscription(topic_filter, callback, qos)
        with self._lock:
            self._subscriptions.append(subscription)
            self._routes.clear()
            connected = self._connected
        if connected:
            self._send_subscribe([subscription], session_present=False)

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget every callback registered for `topic_filter` and tell the broker."""
        with self._lock:
            self._subscriptions = [s for s in self._subscriptions if s.topic_filter != topic_filter]
            self._routes.clear()
            self._sent_filters.discard(topic_filter)
            connected = self._connected
        if connected:
            self._client.unsubscribe(topic_filter)

    def forget_subscription(self, topic_filter: str) -> None:
        """Drop `topic_filter` from the broker's copy of a persistent session, on every connect.

        A session outlives the program that made it: a station upgraded from a build that
        subscribed to `topic_filter` under this client id would go on receiving (and dropping)
        those messages. After each connect whose session the broker kept, the link sends an
        UNSUBSCRIBE for every forgotten filter it has not subscribed itself. Call before `start()`.
        """
        if not _filter_is_valid(topic_filter):
            raise ValueError(f"invalid MQTT topic filter {topic_filter!r}")
        with self._lock:
            self._stale_filters.add(topic_filter)

    def add_connect_listener(self, listener: Listener) -> None:
        """Call `listener` after every successful connect, once subscriptions are re-sent."""
        with self._lock:
            self._connect_listeners.append(listener)

    def add_disconnect_listener(self, listener: Listener) -> None:
        """Call `listener` whenever an established connection is lost or closed."""
        with self._lock:
            self._disconnect_listeners.append(listener)

    # -- paho plumbing (network thread) ------------------------------------------------------

    def _build_client(self) -> _Client:
        config = self._config
        v5 = config.protocol == "5"
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            # paho refuses clean_session for MQTT 5; there clean_start goes to connect_async.
            clean_session=None if v5 else config.clean_start,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        )
        client.enable_logger(_PAHO_LOGGER)
        client.max_inflight_messages_set(config.max_inflight)
        # paho types these as int but only does float arithmetic and sleeps with them.
        client.reconnect_delay_set(config.backoff_min_s, config.backoff_max_s)  # type: ignore[arg-type]
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if self._address.tls:
            client.tls_set_context(_tls_context(config))
        if self._will is not None:
            client.will_set(
                self._will.topic, self._will.payload, qos=self._will.qos, retain=self._will.retain
            )
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = _disable_nagle
        return client

    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        self._client.socket_error = None
        if self._address.tls:
            self._reload_tls_files()
        with self._lock:
            self._connect_attempts += 1
            self._answered = False

    def _reload_tls_files(self) -> None:
        """Load `ca_file`, `cert_file` and `key_file` again when one was replaced since they were
        loaded (a renewed client certificate), so the next connect uses them without a restart;
        an established connection goes on with the ones it was made with. Files that cannot be
        used are logged once, and the ones loaded before stay in use."""
        config = self._config
        stamp = _tls_files_stamp(config)
        with self._lock:  # the network thread and a reader of cert_warning may both look
            if stamp == self._tls_files:
                return
            self._tls_files = stamp
        try:
            context = _tls_context(config)
        except ValueError as exc:
            logger.warning("mqtt link %s: the TLS files changed, but cannot be used, so the ones "
                           "loaded before stay in use: %s", config.client_id, exc)
            return
        self._client.replace_tls_context(context)
        expires = self._read_own_expiry(config)
        with self._lock:
            self._own_cert_expires = expires
        logger.info("mqtt link %s: the TLS files changed; loaded them again", config.client_id)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this from the `except OSError` around its connect, with the error unnamed.
        error = sys.exc_info()[1]
        reason = (str(error) or type(error).__name__) if error is not None else "unknown error"
        tls_error = None
        if isinstance(error, ssl.SSLError):
            config = self._config
            tls_error = tls_failure.describe(
                error, self._address.host, self._address.port, config.ca_file, config.cert_file
            )
            reason = tls_error
        self._connect_failed(reason, tls_error)

    def _connect_failed(self, reason: str, tls_error: str | None) -> None:
        """A connect that did not get as far as the broker's CONNACK; `tls_error` replaces the
        last one (None: a failure of another kind ends it)."""
        with self._lock:
            self._tls_error = tls_error
            self._takeovers.connect_failed()
            repeated = reason == self._last_failure
            self._last_failure = reason
        # Once per distinct reason: a broker down for a day is one line, not thousands.
        logger.log(
            logging.DEBUG if repeated else logging.WARNING,
            "mqtt link %s: cannot connect to %s:%d (%s), retrying with backoff",
            self._config.client_id,
            self._address.host,
            self._address.port,
            reason,
        )

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._on_refused(client, reason_code)
            return
        broker_expires = _peer_not_after(client)
        peer = _peer_address(client)
        with self._lock:
            self._broker_cert_expires = broker_expires
            self._peer = peer
            stopping = self._stopping
            self._connected = True
            self._denied_now = False
            self._takeovers.connected(time.monotonic())
            self._last_failure = None
            self._tls_error = self._closed_alert = None
            was_refused, self._fatal_error = self._fatal_error, None
            subscriptions = list(self._subscriptions)
            listeners = list(self._connect_listeners)
            stale = sorted(self._stale_filters - {sub.topic_filter for sub in subscriptions})
            self._state_changed.notify_all()
        if was_refused is not None:  # back to the usual backoff for the next outage
            config = self._config
            client.reconnect_delay_set(config.backoff_min_s, config.backoff_max_s)  # type: ignore[arg-type]
            logger.warning("mqtt link %s: the broker takes this client again", config.client_id)
        if stopping:
            # stop() raced with this connect: its disconnect() may have been overtaken.
            client.disconnect()
            return
        logger.info(
            "mqtt link %s connected to %s:%d (session present: %s)",
            self._config.client_id,
            self._address.host,
            self._address.port,
            flags.session_present,
        )
        expiring = self.cert_warning
        if expiring is not None:
            logger.warning("mqtt link %s: %s", self._config.client_id, expiring)
        if subscriptions:
            self._send_subscribe(subscriptions, session_present=flags.session_present)
        if stale and flags.session_present:
            result, _ = client.unsubscribe(stale)
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                logger.warning(
                    "mqtt link %s: unsubscribe %s not sent (%s); tried again on the next connect",
                    self._config.client_id,
                    stale,
                    paho.error_string(result),
                )
        with self._lock:
            self._ready = self._connected  # unless the link went down meanwhile
            self._state_changed.notify_all()
        for listener in listeners:
            self._call_safely(listener, "connect listener")

    def _on_refused(self, client: paho.Client, reason_code: ReasonCode) -> None:
        with self._lock:
            self._takeovers.connect_failed()
            # The handshake went well: whatever TLS trouble an earlier attempt had is over.
            self._answered = True
            self._tls_error = self._closed_alert = None
        fatal = FATAL_CONNACK_REASONS.get(reason_code.value)
        if fatal is None:
            logger.warning(
                "mqtt link %s: broker refused the connection (%s), retrying",
                self._config.client_id,
                reason_code,
            )
            return
        retry = self._config.refused_retry_s
        message = (
            f"broker {self._address.host}:{self._address.port} refused client "
            f"{self._config.client_id!r}: {fatal} (reason code {reason_code.value}); fix the "
            f"credentials or the broker's ACL (tried again every {retry:g} s)"
        )
        with self._lock:
            known = self._fatal_error == message
            self._fatal_error = message
            self._state_changed.notify_all()
        if not known:
            logger.error("mqtt link %s: %s", self._config.client_id, message)
        # paho's loop reconnects by itself; only seldom, until the broker takes us.
        client.reconnect_delay_set(retry, retry)  # type: ignore[arg-type]

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        now = time.monotonic()
        how = self._how_lost(flags, reason_code)
        with self._lock:
            peer, self._peer = self._peer, None
            check_listener = how == "closed" and self._takeovers.is_short(now) and not (
                self._stopping or self._denied_now or self._denied)
        if check_listener and peer is not None and listener_refuses(peer):
            # The broker went away with its listener (stopped, restarting): no other client.
            how = "other"
        with self._lock:
            was_connected = self._connected
            self._connected = self._ready = False
            stopping = self._stopping
            denied, self._denied_now = self._denied_now, False
            how = loss_after_refusals(how, denied, bool(self._denied))
            owed_before = self._owed_one_by_one
            if was_connected and not stopping:
                self._owed_one_by_one = owed_one_by_one(
                    owed_before, self._client.socket_error is not None,
                    self._unacknowledged_locked(), self._config.max_inflight,
                )
            owed = self._owed_one_by_one
            # QoS 0 packets not yet written are discarded by paho on reconnect: forget them.
            for mid, ticket in list(self._pending.items()):
                if isinstance(ticket, PublishTicket) and ticket.qos == 0:
                    del self._pending[mid]
            listeners = list(self._disconnect_listeners)
            ended = began = False
            if was_connected and not stopping:
                ended = self._takeovers.settle(now)
                began = self._takeovers.lost(now, how)
            conflict = self._takeovers.conflict
            answered = self._answered
            self._state_changed.notify_all()
        if not was_connected:
            # After a refusing CONNACK paho closes the connection itself: no TLS failure.
            if self._address.tls and not stopping and not answered:
                # paho finished the TLS handshake in connect (else on_connect_fail): the broker
                # ended the connection after it, before its CONNACK.
                error = self._client.socket_error
                tls_error = tls_failure.describe_closed(
                    error, self._address.host, self._address.port, self._config.cert_file
                )
                with self._lock:
                    if tls_failure.is_alert(error):
                        self._closed_alert = tls_error
                    elif self._closed_alert is not None:
                        # The broker's alert is not always read before it closes the socket:
                        # what an earlier attempt read stands.
                        tls_error = self._closed_alert
                self._connect_failed(tls_error, tls_error)
            return
        config = self._config
        if owed:
            client.set_inflight_window(1)  # type: ignore[attr-defined]
            if not owed_before:
                logger.info("mqtt link %s: the broker reset the connection before its PUBACKs "
                            "were read; the next %d messages go one at a time, so that a refusal "
                            "among them is read", config.client_id, owed)
        if stopping:
            logger.info("mqtt link %s disconnected", config.client_id)
        else:
            if ended:
                self._log_conflict_over()
            if began and conflict is not None:
                logger.error("mqtt link %s: %s", config.client_id, self._conflict_message(conflict))
            # A conflict is said once, at ERROR: not again each time the twin takes over.
            socket_error = self._client.socket_error
            logger.log(
                logging.WARNING if conflict is None and not denied else logging.DEBUG,
                "mqtt link %s lost the broker (%s%s%s), reconnecting%s",
                config.client_id,
                reason_code,
                f": {socket_error}" if socket_error is not None else "",
                ", after it refused a message" if denied else "",
                f" in {config.takeover_retry_s:g} s" if conflict is not None else
                f" in {config.refused_retry_s:g} s" if denied else "",
            )
            # paho's loop reads the delay right after this callback.
            if conflict is not None:
                retry = config.takeover_retry_s
                client.reconnect_delay_set(retry, retry)  # type: ignore[arg-type]
            elif denied:
                # An ACL is not fixed in a second: try again as for refused credentials.
                retry = config.refused_retry_s
                client.reconnect_delay_set(retry, retry)  # type: ignore[arg-type]
            else:
                client.reconnect_delay_set(config.backoff_min_s, config.backoff_max_s)  # type: ignore[arg-type]
        for listener in listeners:
            self._call_safely(listener, "disconnect listener")

    def _how_lost(self, flags: paho.DisconnectFlags, reason_code: ReasonCode) -> LostHow:
        if flags.is_disconnect_packet_from_server:
            # Only MQTT 5 has reason codes on the broker's DISCONNECT.
            v5 = self._config.protocol == "5"
            return "taken_over" if v5 and reason_code.value == SESSION_TAKEN_OVER else "other"
        # What paho reports for a connection closed or reset under it (MQTT_ERR_CONN_LOST),
        # as opposed to its own keepalive timeout or a protocol error.
        return "closed" if reason_code == "Unspecified error" else "other"

    def _log_conflict_over(self) -> None:
        logger.info(
            "mqtt link %s: connected for %g s without being taken over: no longer in conflict",
            self._config.client_id,
            self._takeovers.stable_s,
        )

    def _conflict_message(self, kind: ConflictKind) -> str:
        config = self._config
        broker = f"{self._address.host}:{self._address.port}"
        if kind == "taken_over":
            seen = (
                f"broker {broker} disconnected client id {config.client_id!r} because another "
                f"connection with that id took its session over (MQTT 5 reason code "
                f"{SESSION_TAKEN_OVER}, Session taken over)"
            )
        else:
            seen = (
                f"broker {broker} accepted client id {config.client_id!r} and closed the "
                f"connection again, without a reason, within {SHORT_SESSION_S:g} s, "
                f"{SHORT_SESSIONS_IN_A_ROW} times in a row (a broker log line 'Client "
                f"{config.client_id} already connected, closing old connection' confirms it)"
            )
        return (
            f"{seen}: another client uses client id {config.client_id!r}; two stations "
            "configured with the same name (or two controllers, or two copies of one program)? "
            "Give each its own station name or broker.client_id. (If no other client uses it, "
            "the broker may be restarting over and over: see its log.) Until then this link "
            f"reconnects only every {config.takeover_retry_s:g} s"
        )

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            logger.warning(
                "mqtt link %s: dropped a message with a non-UTF-8 topic", self._config.client_id
            )
            return
        received = ReceivedMessage(
            topic=topic, payload=bytes(message.payload), qos=message.qos, retain=message.retain
        )
        with self._lock:
            callbacks = self._routes.get(topic)
            if callbacks is None:
                # Matching every filter per message is the network thread's biggest cost at
                # thousands of messages a second; a topic's callbacks change only on (un)subscribe.
                callbacks = [
                    s.callback for s in self._subscriptions
                    if topic_matches(s.topic_filter, topic)
                ]
                if len(self._routes) >= _ROUTE_CACHE_SIZE:
                    self._routes.clear()
                self._routes[topic] = callbacks
        for callback in callbacks:
            self._call_safely(partial(callback, received), f"message callback for {topic}")

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        with self._lock:
            widen = self._owed_one_by_one == 1
            self._owed_one_by_one = max(0, self._owed_one_by_one - 1)
            ticket = self._pending.pop(mid, None)
            if not isinstance(ticket, PublishTicket):
                # publish() has not registered its ticket yet; it completes it on arrival.
                self._pending[mid] = reason_code.value
        if widen:
            # paho reads the window right after this callback, and sends that many at once.
            self._client.set_inflight_window(self._config.max_inflight)
        if isinstance(ticket, PublishTicket):
            self._acknowledged(ticket, reason_code.value)

    def _acknowledged(self, ticket: PublishTicket, reason: int) -> None:
        """Complete `ticket`; a refusal (MQTT 5 only: a 3.1.1 broker drops what it refuses
        without saying so) is kept per topic and logged when it starts and when it ends, not
        for every message: a station's backlog goes again and again."""
        ticket._complete(reason)
        topic = ticket.topic
        if reason >= 0x80:
            why = str(ReasonCode(PacketTypes.PUBACK, identifier=reason))
            with self._lock:
                known = self._denied.get(topic)
                self._denied[topic] = why
                self._denied_now = True
            if known != why:
                logger.warning("mqtt link %s: the broker refuses to take messages on %s (%s; "
                               "reason code %d): check its ACL for this client's user name",
                               self._config.client_id, topic, why, reason)
        elif self._denied:
            with self._lock:
                ended = self._denied.pop(topic, None)
            if ended is not None:
                logger.info("mqtt link %s: the broker takes messages on %s again",
                            self._config.client_id, topic)

    @property
    def denied_error(self) -> str | None:
        """Why the broker refuses this client's messages on a topic (its latest refusal there,
        MQTT 5), until a message on that topic is taken again; None otherwise."""
        with self._lock:
            if not self._denied:
                return None
            topic, why = next(iter(self._denied.items()))
            others = len(self._denied) - 1
        more = f" (and {others} more topic{'s' if others > 1 else ''})" if others else ""
        return (f"the broker refuses to take messages on {topic}{more}: {why}; check the "
                f"broker's ACL for the user name this client connects with")

    def _send_subscribe(self, subscriptions: list[_Subscription], *, session_present: bool) -> None:
        # One SUBSCRIBE per filter, at the highest QoS any callback asked for.
        by_filter: dict[str, int] = {}
        for subscription in subscriptions:
            qos = max(by_filter.get(subscription.topic_filter, 0), subscription.qos)
            by_filter[subscription.topic_filter] = qos
        with self._lock:
            already_sent = set(self._sent_filters) if session_present else set()
            self._sent_filters.update(by_filter)
        if self._config.protocol == "5":
            # When the broker kept our session, re-subscribing must not replay retained messages
            # we already got; a filter the broker never saw from us still gets them.
            options = [
                (
                    topic_filter,
                    SubscribeOptions(
                        qos=qos,
                        retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
                        if topic_filter in already_sent
                        else SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE,
                    ),
                )
                for topic_filter, qos in by_filter.items()
            ]
            result, _ = self._client.subscribe(options)
        else:
            result, _ = self._client.subscribe(list(by_filter.items()))
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # The next connect re-sends every subscription.
            logger.warning(
                "mqtt link %s: subscribe %s not sent (%s)",
                self._config.client_id,
                sorted(by_filter),
                paho.error_string(result),
            )

    def _call_safely(self, function: Callable[[], None], what: str) -> None:
        try:
            function()
        except Exception:
            # A faulty consumer must not take down the network thread for everyone else.
            logger.exception("mqtt link %s: %s raised", self._config.client_id, what)


def _encrypted_key() -> bytes:
    raise ValueError(
        "the key is encrypted; give the link an unencrypted key (readable by its user only)"
    )


def _peer_not_after(client: paho.Client) -> datetime | None:
    """When the broker's certificate expires, from this connection's TLS handshake; None
    without TLS."""
    sock = client.socket()
    if not isinstance(sock, ssl.SSLSocket):
        return None
    certificate = sock.getpeercert()
    not_after = certificate.get("notAfter") if certificate else None
    if not isinstance(not_after, str):
        return None
    return datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), UTC)


def _peer_address(client: paho.Client) -> tuple[str, int] | None:
    """The broker's IP address and port on this connection (no name to resolve again)."""
    sock = client.socket()
    try:
        peer = sock.getpeername() if isinstance(sock, socket.socket) else None
    except OSError:
        return None
    return (str(peer[0]), int(peer[1])) if peer else None


def _tls_files_stamp(config: LinkConfig) -> tuple[tuple[int, int] | None, ...]:
    """(modification time, size) of each TLS file that is set; None for one that cannot be
    read now."""
    stamps: list[tuple[int, int] | None] = []
    for path in (config.ca_file, config.cert_file, config.key_file):
        try:
            stat = path.stat() if path is not None else None
        except OSError:
            stat = None
        stamps.append((stat.st_mtime_ns, stat.st_size) if stat is not None else None)
    return tuple(stamps)


def _tls_context(config: LinkConfig) -> ssl.SSLContext:
    """The client's TLS context: the server's certificate and host name are verified, against
    `ca_file` or else the system trust store, like a browser. ValueError naming the setting and
    the file when one of the files cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for setting in ("ca_file", "cert_file", "key_file"):
        path: Path | None = getattr(config, setting)
        if path is None:
            continue
        try:
            path.open("rb").close()
        except OSError as exc:
            raise ValueError(f"{setting} {path}: cannot read it: {exc.strerror or exc}") from exc
    try:
        if config.ca_file is None:
            context.load_default_certs()
        else:
            context.load_verify_locations(cafile=config.ca_file)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"ca_file {config.ca_file}: no usable CA certificate in it: {exc}"
        ) from exc
    if config.cert_file is not None:
        try:
            # A callable password: OpenSSL must not stop the agent at a passphrase prompt.
            context.load_cert_chain(config.cert_file, config.key_file, password=_encrypted_key)
        except (OSError, ValueError) as exc:
            where = f"cert_file {config.cert_file}"
            if config.key_file is not None:
                where = f"{where} with key_file {config.key_file}"
            raise ValueError(
                f"{where}: cannot load them as a certificate and its private key: {exc}"
            ) from exc
    return context


def _filter_is_valid(topic_filter: str) -> bool:
    """A filter paho would accept in SUBSCRIBE: non-empty, `#` last, wildcards whole levels."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True
