"""Admin credentials the server issues, and the limit on sign-in attempts.

In public mode admin rights belong to whoever holds a credential issued at a successful sign-in:
256 random bits (``secrets.token_urlsafe(32)``), handed to the one HTTP caller that signed in
(a script's bearer token, a browser's HttpOnly cookie). They are never tied to Gradio's session
hash, which the client chooses and which shows in every ``?session_hash=`` URL and proxy log.

:class:`AdminSessions` keeps the live credentials with their expiry (unused for an hour, or twelve
hours after sign-in: ``optdemo.core.defaults``) and revokes one at sign-out. It stores only each
token's SHA-256 digest, so a dump or a log of the store gives nobody a credential, and a lookup
compares the digest of what a caller sent with every live one through ``hmac.compare_digest``
(constant time, and never stopping at a match), so timing tells a guesser nothing.

:class:`SignInLimiter` counts wrong passwords per client address: after a few, each new failure
makes that address wait twice as long as the last (2 s, 4 s... up to 15 minutes), and every attempt
during a wait, right password included, is refused with the time left.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from optdemo.core import defaults
from optdemo.core.errors import AccessError

Clock = Callable[[], float]  # seconds, monotonic (tests pass a clock they move by hand)
TOKEN_BYTES = 32  # random bytes per credential: 43 URL-safe characters


class TooManySignInsError(AccessError):
    """Sign-in refused because this address failed too often; ``retry_after`` is in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "too many failed sign-ins from your address: "
            f"try again in {defaults.describe_seconds(retry_after)}"
        )
        self.retry_after = retry_after


@dataclass(frozen=True)
class AdminGrant:
    """What a successful sign-in hands to its caller, once: the credential and when it ends."""

    token: str = field(repr=False)  # the credential itself: never logged, never shown again
    username: str
    expires_in: int  # seconds until it ends, however much it is used
    idle_timeout: int  # it ends sooner after this many seconds unused


@dataclass
class _Entry:
    """One live credential (its token is the key, as a digest)."""

    username: str
    issued: float
    last_used: float


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class AdminSessions:
    """The live admin credentials, with their expiry; thread-safe."""

    def __init__(
        self,
        idle_seconds: float = defaults.ADMIN_SESSION_IDLE_SECONDS,
        max_seconds: float = defaults.ADMIN_SESSION_MAX_SECONDS,
        max_sessions: int = defaults.MAX_ADMIN_SESSIONS,
        clock: Clock = time.monotonic,
    ) -> None:
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.max_sessions = max_sessions
        self.clock = clock
        self._live: OrderedDict[bytes, _Entry] = OrderedDict()  # oldest sign-in first
        self._lock = threading.Lock()

    def issue(self, username: str) -> AdminGrant:
        """A new credential for ``username`` (who just proved the password). Past
        ``max_sessions`` live ones, the oldest ends, so repeated sign-ins cannot fill memory."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = self.clock()
        with self._lock:
            self._prune(now)
            self._live[_digest(token)] = _Entry(username, now, now)
            while len(self._live) > self.max_sessions:
                self._live.popitem(last=False)
        return AdminGrant(token, username, int(self.max_seconds), int(self.idle_seconds))

    def valid(self, token: str | None) -> bool:
        """Whether ``token`` is a live credential; using it restarts its idle time. Every live
        digest is compared, in constant time, so how long a wrong guess takes says nothing."""
        if not token or not isinstance(token, str):
            return False
        digest = _digest(token)
        now = self.clock()
        with self._lock:
            found = None
            for key in self._live:
                if hmac.compare_digest(key, digest):
                    found = key
            entry = self._live.get(found) if found is not None else None
            if entry is None:
                return False
            if self._expired(entry, now):
                del self._live[found]
                return False
            entry.last_used = now
            return True

    def revoke(self, token: str | None) -> bool:
        """End ``token`` (sign-out); True if it was live."""
        if not token or not isinstance(token, str):
            return False
        now = self.clock()
        with self._lock:
            entry = self._live.pop(_digest(token), None)
            return entry is not None and not self._expired(entry, now)

    def __len__(self) -> int:
        with self._lock:
            self._prune(self.clock())
            return len(self._live)

    def _expired(self, entry: _Entry, now: float) -> bool:
        return now - entry.last_used > self.idle_seconds or now - entry.issued >= self.max_seconds

    def _prune(self, now: float) -> None:
        """Forget expired credentials (called with the lock held)."""
        for key in [key for key, entry in self._live.items() if self._expired(entry, now)]:
            del self._live[key]


@dataclass
class _Failures:
    count: int
    last: float  # when the latest failure happened
    until: float  # no attempt before this


class SignInLimiter:
    """Failed sign-ins per client address, and the wait they impose; thread-safe."""

    def __init__(
        self,
        free_failures: int = defaults.SIGN_IN_FREE_FAILURES,
        max_wait_seconds: float = defaults.SIGN_IN_MAX_WAIT_SECONDS,
        forget_seconds: float = defaults.SIGN_IN_FORGET_SECONDS,
        max_clients: int = defaults.MAX_SIGN_IN_CLIENTS,
        clock: Clock = time.monotonic,
    ) -> None:
        self.free_failures = free_failures
        self.max_wait_seconds = max_wait_seconds
        self.forget_seconds = forget_seconds
        self.max_clients = max_clients
        self.clock = clock
        self._clients: OrderedDict[str, _Failures] = OrderedDict()  # least recent failure first
        self._lock = threading.Lock()

    def wait(self, client: str) -> float:
        """Seconds ``client`` must still wait before its next attempt (0: it may try now)."""
        now = self.clock()
        with self._lock:
            record = self._current(client, now)
            return max(0.0, record.until - now) if record else 0.0

    def check(self, client: str) -> None:
        """Refuse an attempt during ``client``'s wait.

        Raises:
            TooManySignInsError: saying how long is left (whole seconds, rounded up).
        """
        left = self.wait(client)
        if left > 0:
            raise TooManySignInsError(math.ceil(left))

    def failed(self, client: str) -> float:
        """Count a wrong password from ``client``; returns the wait it now imposes (0 while the
        free tries last): 2 s after the first failure past them, doubling each time, capped."""
        now = self.clock()
        with self._lock:
            record = self._current(client, now) or _Failures(0, now, now)
            record.count += 1
            record.last = now
            over = record.count - self.free_failures
            wait = min(2.0**over, self.max_wait_seconds) if over > 0 else 0.0
            record.until = now + wait
            self._clients[client] = record
            self._clients.move_to_end(client)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
            return wait

    def succeeded(self, client: str) -> None:
        """Forget ``client``'s failures: it signed in."""
        with self._lock:
            self._clients.pop(client, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)

    def _current(self, client: str, now: float) -> _Failures | None:
        """``client``'s record, unless its failures are old enough to forget (lock held)."""
        record = self._clients.get(client)
        if record is not None and now - record.last >= self.forget_seconds:
            del self._clients[client]
            return None
        return record
