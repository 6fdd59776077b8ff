"""Enterprise authentication back-ends of the IdP/KMF (issue 5).

Back-ends implement :class:`~perc_daemons.interfaces.IAuthenticator`:

* :class:`~perc_daemons.kmf.auth.file.FileAuthenticator`: a local user file
  with argon2id hashes (managed with ``perc-admin user ...``);
* :class:`~perc_daemons.kmf.auth.ldap.LdapAuthenticator`: LDAP search + simple
  bind (ldaptor);
* :class:`~perc_daemons.kmf.auth.oidc.OidcAuthenticator`: ID tokens of an
  upstream OpenID Connect provider, checked against its JWKS.

:class:`AuthenticatorChain` asks several in the configured order.  Whatever
goes wrong, callers see one :class:`AuthenticationFailed` whose message is
always ``"invalid credentials"``; the cause is kept in ``reason`` for logs
only (never a password).  :class:`LoginRateLimiter` limits failed logins per
user and per source address; :func:`authenticate_limited` glues the two.
An attempt is counted before it is evaluated (:meth:`LoginRateLimiter.attempt`)
and taken back only when it succeeds, so attempts still being evaluated count
against the limits: concurrency never buys extra guesses.

Decisions:

* Inside a chain, a back-end says "not my user" with :class:`UnknownUser` and
  the chain asks the next one; any other failure (wrong password, disabled
  account, back-end unreachable) ends the chain.  Failing closed on an outage
  means an attacker who can make one back-end unreachable cannot change which
  back-end decides a username; put the local file first if its accounts must
  keep working while the directory is down.
* The chain can hold every failure back until ``failure_delay`` seconds after
  the attempt began, so the number of back-ends consulted is not visible in
  the response time.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from perc_daemons.interfaces import IAuthenticator
from perc_daemons.protocol.identity import normalize_identity

__all__ = [
    "AuthenticationFailed",
    "AuthenticatorChain",
    "BackendUnavailable",
    "IdToken",
    "LoginRateLimiter",
    "RateLimited",
    "UnknownUser",
    "UnsupportedCredentials",
    "UsernamePassword",
    "authenticate_limited",
    "make_identity",
]

log = Logger()

#: The only message a failed authentication ever carries.
FAILURE_MESSAGE = "invalid credentials"


@dataclass(frozen=True)
class UsernamePassword:
    """A username and password typed by the user (file and LDAP back-ends)."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class IdToken:
    """An ID token of the upstream OpenID Connect provider (OIDC back-end).

    ``nonce`` is the nonce the KMF put in the authentication request, if any;
    the token must then carry the same value.
    """

    token: str = field(repr=False)
    nonce: str | None = field(default=None, repr=False)


class AuthenticationFailed(Exception):
    """The credentials were not accepted.

    ``str()`` is always ``"invalid credentials"`` whatever the cause, so the
    exception can be shown to users; ``reason`` says why, for logs.
    """

    def __init__(self, reason: str = "") -> None:
        super().__init__(FAILURE_MESSAGE)
        self.reason = reason

    def __str__(self) -> str:
        return FAILURE_MESSAGE

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r})"


class UnknownUser(AuthenticationFailed):
    """A back-end does not know the user: a chain asks the next back-end.

    Callers of :class:`AuthenticatorChain` never see this type.
    """


class BackendUnavailable(AuthenticationFailed):
    """The back-end could not decide (directory or provider unreachable, timeout)."""


class UnsupportedCredentials(Exception):
    """This back-end does not handle this kind of credentials."""


class RateLimited(Exception):
    """Too many failed logins; try again after ``retry_after`` seconds.

    It is raised whether or not the user exists (failures of unknown users
    count too), so it reveals nothing about accounts.
    """

    def __init__(self, retry_after: float, scope: str) -> None:
        self.retry_after = retry_after
        self.scope = scope  # "user" or "address", for logs and metrics
        super().__init__(f"too many failed logins; retry after {math.ceil(retry_after)} s")


def make_identity(user: str, domain: str) -> str:
    """The RFC 8827 identity ``user@domain``, in its normal form (lower case).

    '%' and '@' in the user part are percent-encoded so the identity has
    exactly one '@' and decodes unambiguously.  Identities are normalised
    (:func:`~perc_daemons.protocol.identity.normalize_identity`: ASCII lower
    case) so that invitation lists match whatever case a directory or
    provider returns ("Bob@Example.com" is "bob@example.com"); a non-ASCII
    name cannot sign in (:class:`AuthenticationFailed`).
    """
    if not user or not domain or "@" in domain:
        raise ValueError("an identity needs a user part and a domain")
    try:
        return normalize_identity(user.replace("%", "%25").replace("@", "%40") + "@" + domain)
    except ValueError as e:
        raise AuthenticationFailed(str(e)) from None


def split_identity(identity: str) -> tuple[str, str]:
    """Inverse of :func:`make_identity`: ``(user, domain)``."""
    user, sep, domain = identity.rpartition("@")
    if not sep or not user or not domain:
        raise ValueError("not an identity: " + identity)
    return user.replace("%40", "@").replace("%25", "%"), domain


@implementer(IAuthenticator)
class AuthenticatorChain:
    """Ask back-ends in order; the first success wins.

    A back-end raising :class:`UnsupportedCredentials` or :class:`UnknownUser`
    passes the credentials on; any other failure ends the attempt.  If no
    back-end handles the kind of credentials the chain raises
    UnsupportedCredentials; every other failure reaches the caller as a plain
    :class:`AuthenticationFailed` whose ``reason`` lists what each back-end
    said.  With ``failure_delay`` > 0 failures are delivered no earlier than
    that many seconds after the attempt began (on ``clock``).
    """

    name = "chain"

    def __init__(
        self,
        backends: Sequence[Any],
        *,
        failure_delay: float = 0.0,
        clock: IReactorTime | None = None,
    ) -> None:
        self.backends = list(backends)
        self.failure_delay = failure_delay
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self._clock = clock

    def authenticate(self, credentials: object) -> defer.Deferred[str]:
        return defer.Deferred.fromCoroutine(self._authenticate(credentials))

    async def _authenticate(self, credentials: object) -> str:
        started = self._clock.seconds()
        reasons: list[str] = []
        supported = False
        for backend in self.backends:
            name = getattr(backend, "name", type(backend).__name__)
            try:
                identity = await defer.maybeDeferred(backend.authenticate, credentials)
            except UnsupportedCredentials:
                continue
            except UnknownUser as e:
                supported = True
                reasons.append(f"{name}: {e.reason or 'unknown user'}")
                continue
            except AuthenticationFailed as e:
                supported = True
                reasons.append(f"{name}: {e.reason or 'refused'}")
                break
            except Exception as e:  # a back-end bug must not become a success
                supported = True
                log.failure("authentication back-end {name} raised", name=name)
                reasons.append(f"{name}: error {type(e).__name__}")
                break
            return identity
        if not supported:
            raise UnsupportedCredentials(type(credentials).__name__)
        wait = started + self.failure_delay - self._clock.seconds()
        if wait > 0:
            await task.deferLater(self._clock, wait, lambda: None)
        raise AuthenticationFailed("; ".join(reasons))


class _Windows:
    """Sliding windows of failure times, one per key, with a bounded key count."""

    def __init__(self, limit: int, window: float, max_keys: int) -> None:
        if limit < 1 or window <= 0 or max_keys < 1:
            raise ValueError("limit, window and max_keys must be positive")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        # key -> failure times (newest last); ordered by last failure, oldest first
        self._entries: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again; 0 when it may now."""
        times = self._entries.get(key)
        if times is None:
            return 0.0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._entries[key]
            return 0.0
        if len(times) < self.limit:
            return 0.0
        return times[0] + self.window - now

    def add(self, key: str, now: float) -> None:
        times = self._entries.get(key)
        if times is None:
            if len(self._entries) >= self.max_keys:
                self._make_room(now)
            times = self._entries[key] = deque(maxlen=self.limit)
        else:
            self._entries.move_to_end(key)
        times.append(now)

    def clear(self, key: str) -> None:
        self._entries.pop(key, None)

    def discard(self, key: str, when: float) -> None:
        """Take back one entry made at ``when`` (if it is still there)."""
        times = self._entries.get(key)
        if times is None:
            return
        try:
            times.remove(when)
        except ValueError:
            return
        if not times:
            del self._entries[key]

    def _make_room(self, now: float) -> None:
        # Entries are ordered by their newest failure, so expired ones come first.
        while self._entries:
            times = next(iter(self._entries.values()))
            if times[-1] > now - self.window:
                break
            self._entries.popitem(last=False)
        if len(self._entries) >= self.max_keys:
            self._entries.popitem(last=False)  # the least recently failing live entry


class LoginRateLimiter:
    """Limits failed logins per username and per source address (no clock of its own).

    Each key has a sliding window: after ``user_limit`` failures within
    ``window`` seconds the user is refused until the oldest of them leaves
    the window; likewise ``address_limit`` per address.  IPv6 addresses are
    counted per /``ipv6_prefix`` network (one host usually holds a whole
    /64).  At most ``max_keys`` users and ``max_keys`` addresses are tracked;
    beyond that, expired entries and then the least recently failing ones
    are forgotten.  Each entry keeps at most ``limit`` times, so memory is
    bounded by ``max_keys * (limit + overhead)`` per table.

    Use :meth:`attempt` before evaluating credentials: it checks and counts
    the attempt as a failure in one step (nothing can run in between), so
    attempts still being evaluated count too; :meth:`record_success` takes
    a successful attempt back.  Checking, awaiting the back-end and only then
    recording the failure would let N concurrent attempts all pass the check.

    Per-user limits let anyone lock a user out for a window by failing on
    purpose; the defaults keep the window short and it is configurable.
    """

    def __init__(
        self,
        *,
        user_limit: int = 5,
        address_limit: int = 20,
        window: float = 15 * 60.0,
        max_keys: int = 100_000,
        ipv6_prefix: int = 64,
    ) -> None:
        self._users = _Windows(user_limit, window, max_keys)
        self._addresses = _Windows(address_limit, window, max_keys)
        self._ipv6_prefix = ipv6_prefix

    @property
    def tracked(self) -> tuple[int, int]:
        """``(users, addresses)`` currently tracked."""
        return len(self._users), len(self._addresses)

    @staticmethod
    def _user_key(username: str | None) -> str | None:
        return None if username is None else username.casefold()

    def _address_key(self, address: str | None) -> str | None:
        if address is None:
            return None
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            net = ipaddress.IPv6Network((ip, self._ipv6_prefix), strict=False)
            return str(net)
        return str(ip)

    def check(self, username: str | None, address: str | None, now: float) -> None:
        """Raise :class:`RateLimited` if this user or address must wait."""
        user, addr = self._user_key(username), self._address_key(address)
        waits = []
        if addr is not None:
            waits.append((self._addresses.retry_after(addr, now), "address"))
        if user is not None:
            waits.append((self._users.retry_after(user, now), "user"))
        wait, scope = max(waits, default=(0.0, ""))
        if wait > 0:
            raise RateLimited(wait, scope)

    def attempt(self, username: str | None, address: str | None, now: float) -> None:
        """Count an attempt before it is evaluated; :class:`RateLimited` if it must wait.

        A refused attempt counts nothing.  An admitted one counts as a failure
        of the user and the address at ``now`` until :meth:`record_success`
        (with the same ``now``) takes it back.
        """
        self.check(username, address, now)
        self.record_failure(username, address, now)

    def record_failure(self, username: str | None, address: str | None, now: float) -> None:
        user, addr = self._user_key(username), self._address_key(address)
        if user is not None:
            self._users.add(user, now)
        if addr is not None:
            self._addresses.add(addr, now)

    def record_success(self, username: str | None, address: str | None, now: float) -> None:
        """The attempt of :meth:`attempt` at ``now`` succeeded.

        Forgets the user's failures, and takes back this one attempt of the
        address (only this one: one valid account must not let an address
        reset its own limit between guesses).
        """
        user, addr = self._user_key(username), self._address_key(address)
        if user is not None:
            self._users.clear(user)
        if addr is not None:
            self._addresses.discard(addr, now)


async def _authenticate_limited(
    authenticator: Any,
    limiter: LoginRateLimiter,
    credentials: object,
    address: str | None,
    clock: IReactorTime | None,
) -> str:
    started = clock.seconds() if clock is not None else time.time()
    username = getattr(credentials, "username", None)
    limiter.attempt(username, address, started)  # counted before it is evaluated
    identity = await defer.maybeDeferred(authenticator.authenticate, credentials)
    limiter.record_success(username, address, started)
    return identity


def authenticate_limited(
    authenticator: Any,
    limiter: LoginRateLimiter,
    credentials: object,
    address: str | None,
    clock: IReactorTime | None = None,
) -> defer.Deferred[str]:
    """Authenticate through ``limiter``: count the attempt, then evaluate it.

    Fails with :class:`RateLimited` before asking ``authenticator`` when the
    user (if the credentials name one) or the address must wait.  The attempt
    counts as a failure from the start; a success takes it back.
    """
    return defer.Deferred.fromCoroutine(
        _authenticate_limited(authenticator, limiter, credentials, address, clock)
    )

