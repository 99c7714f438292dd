"""The sessions signed in on this screen, kept by the server so that a sign-out revokes them.

The session cookie is signed, not stored: on its own it would stay valid until it expires,
whoever holds a copy. So each sign-in gets a fresh random id that the cookie carries and the
server records; a cookie whose id is not recorded is refused. Sign-out, idle sign-out, the end
of the maximum session length and a PIN change forget the id.

The record is kept in memory and saved to a small file in the data dir (mode 0600) at each
sign-in and sign-out, so that a restart of the screen signs no one out. A record that cannot be
read signs everyone out; one that cannot be saved is removed, so that a restart never brings
back a session that was ended.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SESSIONS_FILE = "ui-sessions.json"
MAX_SESSIONS = 1000
"""At most this many live sessions; past it, a sign-in ends the oldest one."""


def _unreadable(path: Path, why: str) -> dict[str, float]:
    log.warning("%s %s: everyone signs in again", path, why)
    return {}


class LiveSessions:
    """Session id -> sign-in time (clock seconds) of every live session of one screen."""

    def __init__(
        self,
        path: Path | None,
        clock: Callable[[], float],
        max_age_s: float,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self._path = path
        self._clock = clock
        self._max_age_s = max_age_s
        self._max_sessions = max_sessions
        self._lock = threading.Lock()
        self._started: dict[str, float] = self._load(path) if path is not None else {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._started)

    def start(self) -> str:
        """A new session: its fresh id, recorded as live from now."""
        session_id = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            self._purge(now)
            while len(self._started) >= self._max_sessions:
                oldest = min(self._started, key=self._started.__getitem__)
                del self._started[oldest]
            self._started[session_id] = now
            self._save()
        return session_id

    def is_live(self, session_id: object) -> bool:
        if not isinstance(session_id, str):
            return False
        with self._lock:
            started = self._started.get(session_id)
        return started is not None and self._clock() - started <= self._max_age_s

    def end(self, session_id: object) -> None:
        """Forget `session_id`; an id that is not live (or no id at all) is nothing to do."""
        with self._lock:
            if isinstance(session_id, str) and self._started.pop(session_id, None) is not None:
                self._save()

    def _purge(self, now: float) -> None:
        for session_id in [s for s, t in self._started.items() if now - t > self._max_age_s]:
            del self._started[session_id]

    @staticmethod
    def _load(path: Path) -> dict[str, float]:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            return _unreadable(path, f"cannot be read ({exc})")
        sessions = doc.get("sessions") if isinstance(doc, dict) else None
        if not isinstance(sessions, dict) or not all(
            isinstance(s, str) and type(t) in (int, float) and math.isfinite(t)
            for s, t in sessions.items()
        ):
            return _unreadable(
                path, 'is not {"sessions": {session id: sign-in time in seconds, ...}}'
            )
        return {s: float(t) for s, t in sessions.items()}

    def _save(self) -> None:
        """Write the record whole (a temporary file renamed over the old one); called locked."""
        if self._path is None:
            return
        temporary = self._path.with_name(f".{self._path.name}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"sessions": self._started}, handle)
            os.replace(temporary, self._path)
        except OSError as exc:
            # A full disk: without the file a restart signs everyone out, which is safe; an
            # outdated file could bring back a session that was ended.
            log.warning("%s cannot be saved (%s): a restart of the screen will sign everyone "
                        "out", self._path, exc)
            temporary.unlink(missing_ok=True)
            self._path.unlink(missing_ok=True)
