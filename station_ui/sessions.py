"""The sessions signed in on the station's screens, kept by the server so that a sign-out revokes
them.

The session cookie is signed, not stored: on its own it would stay valid until it expires,
whoever holds a copy. So each sign-in gets a fresh random id that the cookie carries and the
station store records (table `ui_sessions` of station.db); a cookie whose id is not recorded is
refused. Sign-out, idle sign-out, the end of the maximum session length and a PIN change forget
the id.

The store is the one record every UI process of the station reads and writes (two screens on one
data dir accept each other's cookies, so they must also see each other's sign-outs), and it
survives restarts. When the store fails, the screen fails closed: a cookie that cannot be checked
is refused, and a sign-out that cannot be recorded still clears the browser's cookie.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from edge_agent.store import MAX_UI_SESSIONS, StationStore, StoreError

log = logging.getLogger(__name__)

MAX_SESSIONS = MAX_UI_SESSIONS
"""At most this many live sessions; past it, a sign-in ends the oldest one."""
_OLD_FILES = ("ui-sessions.json", ".ui-sessions.json.tmp")
"""Where builds before the store's `ui_sessions` kept the record: removed at start-up."""


class LiveSessions:
    """The live sessions of the station's screens, as recorded in its store."""

    def __init__(
        self,
        store: StationStore,
        clock: Callable[[], float],
        max_age_s: float,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        if max_age_s <= 0:
            raise ValueError(f"max_age_s: must be positive, got {max_age_s}")
        self._store = store
        self._clock = clock
        self._max_age = timedelta(seconds=max_age_s)
        self._max_sessions = max_sessions

    def start(self) -> str:
        """A new session: its fresh id, recorded as live from now. A store error propagates:
        the sign-in fails rather than hand out a cookie that no screen would accept."""
        session_id = secrets.token_urlsafe(32)
        self._store.start_ui_session(session_id, self._now(), self._max_age, self._max_sessions)
        return session_id

    def is_live(self, session_id: object) -> bool:
        """Whether the cookie's id is a live session; False when the store cannot tell."""
        if not isinstance(session_id, str) or not session_id:
            return False
        try:
            return self._store.ui_session_live(session_id, self._now(), self._max_age)
        except (sqlite3.Error, StoreError) as exc:
            log.warning("cannot check a session in %s (%s): the cookie is refused",
                        self._store.path, exc)
            return False

    def end(self, session_id: object) -> None:
        """Forget `session_id`; an id that is not live (or no id at all) is nothing to do.

        A store error is logged, not raised: the browser's cookie is cleared all the same, and
        the session still ends at the maximum session length."""
        if not isinstance(session_id, str) or not session_id:
            return
        try:
            self._store.end_ui_session(session_id)
        except (sqlite3.Error, StoreError) as exc:
            log.warning(
                "cannot end a session in %s (%s): the cookie was cleared, but a copy of it stays "
                "valid until the session's maximum length at most", self._store.path, exc,
            )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)


def remove_old_record(data_dir: Path) -> None:
    """Delete the session file an earlier build kept in the data dir; its sessions are not
    carried over (those operators sign in again). A failure is logged: nothing reads it."""
    for name in _OLD_FILES:
        path = data_dir / name
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s, no longer used (%s)", path, exc)
