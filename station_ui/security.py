"""PIN hashing, the sign-in rate limit, CSRF tokens and the response headers of the station UI.

Everything here is pure or holds only in-memory state, so it is tested without a server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from flask import Response

# scrypt at N=2**14, r=8: 16 MiB and tens of milliseconds per check on a station CPU, which
# makes an offline guess of a short numeric PIN slow without making sign-in feel slow.
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_HASH_SCHEME = "scrypt"
PIN_PATTERN = re.compile(r"^[0-9]{4,12}$")
BADGE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def check_pin(pin: str) -> None:
    """Raise ValueError unless the PIN is 4 to 12 digits (what a gloved hand types on a pad)."""
    if not PIN_PATTERN.match(pin):
        raise ValueError("the PIN must be 4 to 12 digits")


def check_badge(badge: str) -> None:
    if not BADGE_PATTERN.match(badge):
        raise ValueError(
            "the badge id must be 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _scrypt(pin: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        pin.encode(), salt=salt, n=n, r=r, p=p, dklen=_KEY_BYTES, maxmem=256 * 1024 * 1024
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def hash_pin(pin: str) -> str:
    """`scrypt$N$r$p$salt$key` with a fresh random salt per operator."""
    check_pin(pin)
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _scrypt(pin, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    return f"{_HASH_SCHEME}${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_pin(pin: str, stored: str) -> bool:
    """Constant-time check of a PIN against a stored hash; a malformed hash never matches."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != _HASH_SCHEME:
            return False
        expected = base64.b64decode(key, validate=True)
        actual = _scrypt(pin, base64.b64decode(salt, validate=True), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


# A hash to check against when the badge is unknown, so a wrong badge takes as long as a
# wrong PIN and timing does not tell which badges exist.
_DECOY_HASH = hash_pin("0000")


def verify_decoy(pin: str) -> bool:
    verify_pin(pin, _DECOY_HASH)
    return False


def hash_fingerprint(pin_hash: str) -> str:
    """A short digest of the stored hash: a session carries it, so a PIN reset signs it out."""
    return hashlib.sha256(pin_hash.encode()).hexdigest()[:16]


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str | None, given: str | None) -> bool:
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def apply_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


# --- sign-in rate limit ----------------------------------------------------------------------


@dataclass(slots=True)
class _Failures:
    count: int = 0
    lockouts: int = 0
    locked_until: float = 0.0
    last_failure: float = 0.0
    pending: int = 0
    """Sign-ins let through whose PIN is still being checked: each counts against the limit
    until it is settled (`fail`, `succeed` or `release`)."""


@dataclass(frozen=True, slots=True)
class LockPolicy:
    """How many failures lock a key, and for how long (doubling per lockout, capped)."""

    max_failures: int = 5
    first_lock_s: float = 30.0
    max_lock_s: float = 300.0
    forget_after_s: float = 900.0
    """A key quiet this long starts again from the first lock duration."""

    def lock_s(self, lockouts: int) -> float:
        """The length of the next lock of a key locked `lockouts` times before."""
        return min(self.first_lock_s * float(2**lockouts), self.max_lock_s)


def _wait(entry: _Failures, policy: LockPolicy, now: float) -> float:
    """Seconds before `entry` may start another sign-in; 0 when it may start one now."""
    if entry.locked_until > now:
        return entry.locked_until - now
    if entry.count + entry.pending >= policy.max_failures:
        # The sign-ins in progress take every try left: if they fail, this lock begins.
        return policy.lock_s(entry.lockouts)
    return 0.0


class SignInLimiter:
    """Counts failed sign-ins per key ("badge:..." or "addr:...") and locks a key for a while.

    A sign-in first reserves a try on each of its keys (`begin`), under the limiter's lock,
    and only then has its PIN checked, outside it: so sign-ins answered side by side on the
    server's threads get no more PIN checks between two locks than `max_failures`, and a slow
    PIN hash does not hold up the sign-ins of other keys.

    The cap on the lock duration is what keeps a shared kiosk usable: at worst a few minutes.
    The table is bounded, so a flood of invented badge ids cannot exhaust memory.
    """

    def __init__(
        self, clock: Callable[[], float], max_keys: int = 10_000
    ) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._entries: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    def locked_for(self, key: str) -> float:
        """Seconds until `key` may try again; 0 when it may try now."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            return 0.0 if entry is None else max(0.0, entry.locked_until - now)

    def begin(self, keys: Mapping[str, LockPolicy]) -> float:
        """Reserve one try on every key at once: 0 when reserved, else the seconds to wait
        (nothing reserved). Settle each key of a reserved try with `fail`, `succeed` or
        `release`."""
        now = self._clock()
        with self._lock:
            entries = [(self._entry(key, policy, now), policy) for key, policy in keys.items()]
            wait = max((_wait(entry, policy, now) for entry, policy in entries), default=0.0)
            if wait > 0:
                return wait
            for entry, _ in entries:
                entry.pending += 1
            return 0.0

    def fail(self, key: str, policy: LockPolicy) -> float:
        """Record a failure (settling a try `begin` reserved, if any); returns the lock now in
        force for `key` (0 when not locked)."""
        now = self._clock()
        with self._lock:
            entry = self._entry(key, policy, now)
            entry.pending = max(0, entry.pending - 1)
            entry.count += 1
            entry.last_failure = now
            if entry.count >= policy.max_failures:
                lock = policy.lock_s(entry.lockouts)
                if lock < policy.max_lock_s:
                    # Once at the cap, no more doubling: 2**1024 is past what a float holds.
                    entry.lockouts += 1
                entry.count = 0
                entry.locked_until = now + lock
            return max(0.0, entry.locked_until - now)

    def succeed(self, key: str) -> None:
        """A right PIN: the key's failures and locks are forgotten (its other tries in
        progress stay reserved)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.pending <= 1:
                self._entries.pop(key, None)
            else:
                self._entries[key] = _Failures(pending=entry.pending - 1)

    def release(self, key: str) -> None:
        """Give back a reserved try whose PIN could not be checked (the store failed): it
        counts neither as a failure nor as a success."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.pending = max(0, entry.pending - 1)

    def _entry(self, key: str, policy: LockPolicy, now: float) -> _Failures:
        entry = self._entries.get(key)
        if entry is None:
            self._make_room(now, policy)
            entry = self._entries[key] = _Failures()
        elif now - entry.last_failure > policy.forget_after_s:
            # Quiet long enough: start again from the first lock (tries in progress stay).
            entry.count = entry.lockouts = 0
        return entry

    def _make_room(self, now: float, policy: LockPolicy) -> None:
        if len(self._entries) < self._max_keys:
            return
        stale = [
            key
            for key, entry in self._entries.items()
            if entry.pending == 0 and entry.locked_until <= now
            and now - entry.last_failure > policy.forget_after_s
        ]
        for key in stale:
            del self._entries[key]
        if len(self._entries) >= self._max_keys:
            # Still full: drop the oldest unlocked entries rather than grow without bound
            # (never one with a try in progress: its count would be lost).
            unlocked = sorted(
                (entry.last_failure, key)
                for key, entry in self._entries.items()
                if entry.pending == 0 and entry.locked_until <= now
            )
            for _, key in unlocked[: max(1, len(unlocked) // 2)]:
                del self._entries[key]
