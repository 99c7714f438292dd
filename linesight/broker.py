"""Run a Mosquitto broker that we own: for the integration tests, the benchmarks and the demo.

The broker listens on 127.0.0.1 only, keeps its config, log and persistence file in one data
directory, and is stopped by its pid, never by name, so it cannot touch any other broker.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "Broker",
    "BrokerError",
    "find_mosquitto",
    "ephemeral_port_range",
    "free_port",
    "port_candidates",
    "start_broker",
    "write_password_file",
    "TlsFiles",
]

LOCALHOST = "127.0.0.1"
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
# Mosquitto logs this (log_type information) only once every listener is bound and listening.
_RUNNING = re.compile(r"mosquitto version \S+ running")


class BrokerError(RuntimeError):
    pass


def find_mosquitto() -> Path:
    """The mosquitto executable, from PATH or /usr/sbin (where Debian puts it, off most PATHs)."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    for candidate in (Path("/usr/sbin/mosquitto"), Path("/usr/local/sbin/mosquitto")):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(
        "mosquitto not found on PATH or in /usr/sbin; install it with "
        "`sudo apt-get install mosquitto` (Debian/Ubuntu)"
    )


# Below this are the ports services are configured on (the demo's 8700 and up among them).
_LOWEST_PICKED_PORT = 16384
_PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LINUX_DEFAULT_EPHEMERAL = (32768, 60999)


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands out on its own (bind to 0, every outgoing connection)."""
    try:
        low, high = (int(part) for part in _PORT_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return _LINUX_DEFAULT_EPHEMERAL
    return low, high


def port_candidates(ephemeral: tuple[int, int]) -> list[int]:
    """Ports above the configured services' and outside the kernel's own range."""
    low, high = ephemeral
    return [port for port in range(_LOWEST_PICKED_PORT, 65536) if not low <= port <= high]


def free_port(rng: random.Random | None = None) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, for a server to bind next.

    Picked outside the ephemeral range: a port from there (what binding port 0 gives) can become
    any outgoing connection's local port before the server binds it, which two test workers'
    stations and brokers did. A port outside it is only taken by a program binding it by number.
    """
    pick = rng if rng is not None else random.SystemRandom()
    candidates = port_candidates(ephemeral_port_range())
    for port in pick.sample(candidates, min(50, len(candidates))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((LOCALHOST, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        chosen: int = probe.getsockname()[1]
        return chosen


def write_password_file(
    path: Path, users: Mapping[str, str], *, use_mosquitto_passwd: bool = True
) -> Path:
    """Write a Mosquitto password file for `users` (name -> password).

    Uses `mosquitto_passwd` when installed; otherwise writes the same `$7$` PBKDF2-SHA512
    format Mosquitto 2 reads, so tests and the demo need nothing beyond the broker itself.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tool = shutil.which("mosquitto_passwd") if use_mosquitto_passwd else None
    if tool is not None:
        path.unlink(missing_ok=True)
        path.touch(mode=0o600)
        for name, password in users.items():
            # -b takes the password on the command line: fine for a local, generated file.
            subprocess.run(  # noqa: S603 - fixed executable, arguments are not shell-parsed
                [tool, "-b", str(path), name, password],
                check=True,
                capture_output=True,
                timeout=_STOP_TIMEOUT_S,
            )
        return path
    lines = []
    for name, password in users.items():
        if ":" in name:
            raise ValueError(f"user name {name!r} may not contain ':'")
        salt = secrets.token_bytes(12)
        iterations = 101  # what mosquitto_passwd itself uses for $7$
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
        lines.append(
            f"{name}:$7${iterations}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(digest).decode()}\n"
        )
    path.write_text("".join(lines))
    path.chmod(0o600)
    return path


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for a TLS listener: the CA that signed the server certificate, and its key.
    With `require_client_cert`, clients must present a certificate that CA signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_cert: bool = False


class Broker:
    """One mosquitto process on 127.0.0.1; use `start_broker` to get a running one."""

    host = LOCALHOST

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        autosave_interval_s: int = 1,
        tls: TlsFiles | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.acl_file = acl_file
        self.tls = tls
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.password_file = password_file
        self.autosave_interval_s = autosave_interval_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def config_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        """The broker's log so far (connections, refusals, errors): handy in test failures."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> Broker:
        """Start mosquitto and wait (bounded) until it says it is running on its port.

        Raises BrokerError when it cannot: the message names the address and, for a port that
        another program already listens on, says so.
        """
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A port picked by free_port() can be taken by someone else before mosquitto binds it;
        # when the caller did not insist on a port, try a fresh one.
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            if attempt:
                self.port = free_port()
            log_start = self._log_size()
            self._spawn()
            if self._wait_until_running(log_start):
                return self
        log = self._log_since(log_start)
        if "Address already in use" in log:
            raise BrokerError(
                f"mosquitto could not listen on {self.host}:{self.port}: the port is already in "
                f"use by another program; log {self.log_path}"
            )
        raise BrokerError(
            f"mosquitto did not start on {self.host}:{self.port}; log {self.log_path}:\n"
            + log[-2000:]
        )

    def stop(self) -> None:
        """SIGTERM (mosquitto then writes its persistence file), SIGKILL if it lingers."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=_STOP_TIMEOUT_S)
        self._process = None

    def kill(self) -> None:
        """SIGKILL, like a power cut: only what autosave already wrote survives."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=_STOP_TIMEOUT_S)
        self._process = None

    def restart(self) -> Broker:
        """Stop if running, then start again on the same port with the same persistence."""
        self.stop()
        self._fixed_port = True
        return self.start()

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _write_config(self) -> None:
        lines = [
            # Started as root, mosquitto would switch to the `mosquitto` user, which cannot
            # write our data dir; staying the user that started it keeps the files ours.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if self.password_file else 'true'}",
            # Sessions and queued QoS 1 messages of persistent clients survive a restart.
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "persistence_file mosquitto.db",
            # Saved on a timer (mosquitto saves about every interval + 1 s), so a SIGKILL loses
            # at most that much broker state; a SIGTERM saves everything.
            f"autosave_interval {self.autosave_interval_s}",
            # The default max_queued_messages (1000) makes mosquitto silently drop QoS 1
            # messages for an offline persistent client; 0 means no limit.
            "max_queued_messages 0",
            "max_queued_bytes 0",
            # Inflight beyond this are queued, not dropped; larger means fewer round-trip stalls.
            "max_inflight_messages 100",
            # start() waits for the "running" line, logged at level information.
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
        ]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.tls is not None:
            lines += [f"cafile {self.tls.ca_file}", f"certfile {self.tls.cert_file}",
                      f"keyfile {self.tls.key_file}"]
            if self.tls.require_client_cert:
                lines.append("require_certificate true")
        self.config_path.write_text("\n".join(lines) + "\n")

    def _spawn(self) -> None:
        self._write_config()
        with self.log_path.open("ab") as early_output:
            # Own session: a Ctrl-C in the terminal reaches the tests, not the broker.
            self._process = subprocess.Popen(  # noqa: S603 - fixed executable, no shell
                [str(find_mosquitto()), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=early_output,
                stderr=early_output,
                start_new_session=True,
            )

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        """What this start of mosquitto logged: the log file also holds earlier runs."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _wait_until_running(self, log_start: int) -> bool:
        # Not a TCP connect: while mosquitto is still starting, a connect to its port can reach
        # another program listening there, just before mosquitto fails to bind and exits.
        process = self._process
        assert process is not None  # noqa: S101 - set by _spawn just before
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                return False
            if _RUNNING.search(self._log_since(log_start)):
                return True
            time.sleep(0.02)
        self.kill()
        return False


def start_broker(
    data_dir: Path,
    port: int | None = None,
    *,
    password_file: Path | None = None,
    acl_file: Path | None = None,
    autosave_interval_s: int = 1,
    tls: TlsFiles | None = None,
) -> Broker:
    """Start a mosquitto on 127.0.0.1 (a free port unless `port` is given) and return it."""
    return Broker(
        data_dir, port, password_file=password_file, acl_file=acl_file,
        autosave_interval_s=autosave_interval_s, tls=tls,
    ).start()
