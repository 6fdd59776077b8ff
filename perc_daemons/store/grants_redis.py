"""OAuth grants (authorization codes, refresh tokens, revoked access tokens) in Redis.

:class:`RedisGrantStore` implements :class:`~perc_daemons.interfaces.IGrantStore`
with the rules of :mod:`perc_daemons.store.grant_errors`, over the same
connection handling as :class:`~perc_daemons.store.redis.RedisConferenceStore`
(password, TLS, timeouts, reconnection, StoreUnavailable).  Keys::

    {ns}:oauth:code:{sha256 hex}     string "<expires_at> <grant JSON>"
    {ns}:oauth:rt:{sha256 hex}       hash: state (live|rotated) family grant exp
    {ns}:oauth:rtfam:{family}        set of the family's token hashes (hex)
    {ns}:oauth:revoked:{sha256 hex}  string "<expires_at>": a revoked access token's jti
    {ns}:oauth:used:{sha256 hex}     string "1": a one-time value already used

``take_code`` is one ``GETDEL``, ``access_token_revoked`` one ``GET``,
``use_once`` one ``SET NX``; saving,
rotating and revoking refresh tokens are Lua scripts, atomic against every
other client.  A script's refusal does not undo what it wrote, which is how
detecting reuse revokes the family and still fails.  Expiry is checked
against the caller's ``now``; keys also get a Redis expiry (``EXPIREAT`` a
minute after ``expires_at``, on the server's clock) so that dead grants go
away by themselves.  The scripts name
family members they did not receive as KEYS: fine on one server or a
replicated pair, not on Redis Cluster.
"""

from __future__ import annotations

import math
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from perc_daemons.interfaces import IGrantStore
from perc_daemons.store.grant_errors import (
    GrantError,
    InvalidGrant,
    RefreshTokenReused,
    check_grant,
    check_hash,
    check_time,
    load_grant,
)
from perc_daemons.store.redis import RedisConferenceStore

#: Seconds a key outlives its ``expires_at`` in Redis (clock skew between hosts).
GRACE = 60

_SAVE_REFRESH = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.error_reply('PERC_GRANTEXISTS') end
redis.call('HSET', KEYS[1], 'state', 'live', 'family', ARGV[1], 'grant', ARGV[2], 'exp', ARGV[3])
redis.call('EXPIREAT', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], ARGV[5])
if redis.call('EXPIRETIME', KEYS[2]) < tonumber(ARGV[4]) then
  redis.call('EXPIREAT', KEYS[2], ARGV[4])
end
return 1
"""

# KEYS: old, new; ARGV: now, grant, exp, exat, new hex, token prefix, family prefix
_ROTATE = """
local old = redis.call('HMGET', KEYS[1], 'state', 'family', 'grant', 'exp')
if not old[1] or tonumber(old[4]) <= tonumber(ARGV[1]) then
  return redis.error_reply('PERC_GRANTINVALID')
end
local fam = ARGV[7] .. old[2]
if old[1] ~= 'live' then
  for _, h in ipairs(redis.call('SMEMBERS', fam)) do redis.call('DEL', ARGV[6] .. h) end
  redis.call('DEL', fam, KEYS[1])
  return redis.error_reply('PERC_GRANTREUSED')
end
if redis.call('EXISTS', KEYS[2]) == 1 then return redis.error_reply('PERC_GRANTEXISTS') end
redis.call('HSET', KEYS[1], 'state', 'rotated')
redis.call('HSET', KEYS[2], 'state', 'live', 'family', old[2], 'grant', ARGV[2], 'exp', ARGV[3])
redis.call('EXPIREAT', KEYS[2], ARGV[4])
redis.call('SADD', fam, ARGV[5])
if redis.call('EXPIRETIME', fam) < tonumber(ARGV[4]) then redis.call('EXPIREAT', fam, ARGV[4]) end
return {old[2], old[3]}
"""

# KEYS: token; ARGV: token prefix, family prefix
_REVOKE = """
local f = redis.call('HGET', KEYS[1], 'family')
if not f then return 0 end
local fam = ARGV[2] .. f
for _, h in ipairs(redis.call('SMEMBERS', fam)) do redis.call('DEL', ARGV[1] .. h) end
redis.call('DEL', fam, KEYS[1])
return 1
"""


def _exat(expires_at: float) -> int:
    return math.ceil(expires_at) + GRACE


class _Connection(RedisConferenceStore):
    """The conference store's connection handling, with the grant scripts' refusals."""

    def _map(self, f: Failure, conference_id: str | None = None,
             target: str | None = None) -> Failure:
        if f.check(GrantError):
            return f
        if f.check(txredisapi.ResponseError):
            message = str(f.value)
            if "PERC_GRANTINVALID" in message:
                return Failure(InvalidGrant("unknown or expired refresh token"))
            if "PERC_GRANTREUSED" in message:
                return Failure(RefreshTokenReused("refresh token reused: family revoked"))
        return super()._map(f, conference_id, target)


@implementer(IGrantStore)
class RedisGrantStore:
    """:class:`~perc_daemons.interfaces.IGrantStore` in Redis.

    Takes the arguments of :class:`~perc_daemons.store.redis.RedisConferenceStore`;
    ``yield store.connect()`` (or :meth:`open`) before use.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._conn = _Connection(*args, **kwargs)
        base = f"{self._conn.namespace}:oauth"
        self._code = f"{base}:code:"
        self._rt = f"{base}:rt:"
        self._fam = f"{base}:rtfam:"
        self._revoked = f"{base}:revoked:"
        self._used = f"{base}:used:"

    @classmethod
    def open(cls, *args: Any, **kwargs: Any) -> defer.Deferred[RedisGrantStore]:
        store = cls(*args, **kwargs)
        return store.connect()

    def connect(self) -> defer.Deferred[RedisGrantStore]:
        return self._conn.connect().addCallback(lambda _: self)

    def close(self) -> defer.Deferred[None]:
        return self._conn.close()

    def __repr__(self) -> str:
        c = self._conn
        return f"<RedisGrantStore {c.host}:{c.port}/{c.db} ns={c.namespace}>"

    def _call(self, check: Any, run: Any) -> defer.Deferred[Any]:
        try:
            args = check()
        except ValueError:
            return defer.fail()
        return self._conn._call(lambda redis: run(redis, *args))

    # -- IGrantStore

    def save_code(self, code_hash: bytes, grant: dict[str, Any],
                  expires_at: float) -> defer.Deferred[None]:
        def run(redis: Any, h: bytes, text: str, exp: float) -> defer.Deferred[None]:
            d = redis.execute_command("SET", self._code + h.hex(), f"{exp!r} {text}",
                                      "EXAT", str(_exat(exp)))
            return d.addCallback(lambda _: None)

        return self._call(lambda: (check_hash(code_hash), check_grant(grant),
                                   check_time("expires_at", expires_at)), run)

    def take_code(self, code_hash: bytes, now: float) -> defer.Deferred[dict[str, Any] | None]:
        def parse(value: str | None, when: float) -> dict[str, Any] | None:
            if value is None:
                return None
            exp, _, text = value.partition(" ")
            return None if float(exp) <= when else load_grant(text)

        def run(redis: Any, h: bytes, when: float) -> defer.Deferred[dict[str, Any] | None]:
            d = redis.execute_command("GETDEL", self._code + h.hex())
            return d.addCallback(parse, when)

        return self._call(lambda: (check_hash(code_hash), check_time("now", now)), run)

    def save_refresh_token(self, token_hash: bytes, grant: dict[str, Any],
                           expires_at: float) -> defer.Deferred[None]:
        def check() -> tuple[Any, ...]:
            text = check_grant(grant, family=True)
            return check_hash(token_hash), grant["family"], text, check_time("expires_at",
                                                                             expires_at)

        def run(redis: Any, h: bytes, family: str, text: str, exp: float
                ) -> defer.Deferred[None]:
            d = redis.eval(_SAVE_REFRESH, [self._rt + h.hex(), self._fam + family],
                           [family, text, repr(exp), str(_exat(exp)), h.hex()])
            return d.addCallback(lambda _: None)

        return self._call(check, run)

    def rotate_refresh_token(self, old_hash: bytes, new_hash: bytes, new_grant: dict[str, Any],
                             expires_at: float, now: float) -> defer.Deferred[dict[str, Any]]:
        def check() -> tuple[Any, ...]:
            return (check_hash(old_hash), check_hash(new_hash),
                    check_grant(new_grant, family=True), check_time("expires_at", expires_at),
                    check_time("now", now))

        def run(redis: Any, old: bytes, new: bytes, text: str, exp: float, when: float
                ) -> defer.Deferred[dict[str, Any]]:
            d = redis.eval(_ROTATE, [self._rt + old.hex(), self._rt + new.hex()],
                           [repr(when), text, repr(exp), str(_exat(exp)), new.hex(),
                            self._rt, self._fam])
            return d.addCallback(lambda r: load_grant(r[1], r[0]))

        return self._call(check, run)

    def revoke_refresh_token(self, token_hash: bytes) -> defer.Deferred[None]:
        def run(redis: Any, h: bytes) -> defer.Deferred[None]:
            d = redis.eval(_REVOKE, [self._rt + h.hex()], [self._rt, self._fam])
            return d.addCallback(lambda _: None)

        return self._call(lambda: (check_hash(token_hash),), run)

    def refresh_token(self, token_hash: bytes, now: float
                      ) -> defer.Deferred[dict[str, Any] | None]:
        def parse(reply: list[str | None], when: float) -> dict[str, Any] | None:
            state, family, text, exp = reply
            if state != "live" or family is None or text is None or exp is None:
                return None
            return None if float(exp) <= when else load_grant(text, family)

        def run(redis: Any, h: bytes, when: float) -> defer.Deferred[dict[str, Any] | None]:
            d = redis.hmget(self._rt + h.hex(), ["state", "family", "grant", "exp"])
            return d.addCallback(parse, when)

        return self._call(lambda: (check_hash(token_hash), check_time("now", now)), run)

    def revoke_access_token(self, jti_hash: bytes, expires_at: float,
                            now: float) -> defer.Deferred[None]:
        def run(redis: Any, h: bytes, exp: float, when: float) -> defer.Deferred[None]:
            if exp <= when:
                return defer.succeed(None)  # expired: refused anyway
            d = redis.execute_command("SET", self._revoked + h.hex(), repr(exp),
                                      "EXAT", str(_exat(exp)))
            return d.addCallback(lambda _: None)

        return self._call(lambda: (check_hash(jti_hash), check_time("expires_at", expires_at),
                                   check_time("now", now)), run)

    def access_token_revoked(self, jti_hash: bytes, now: float) -> defer.Deferred[bool]:
        def run(redis: Any, h: bytes, when: float) -> defer.Deferred[bool]:
            d = redis.get(self._revoked + h.hex())
            return d.addCallback(lambda exp: exp is not None and float(exp) > when)

        return self._call(lambda: (check_hash(jti_hash), check_time("now", now)), run)

    def use_once(self, key_hash: bytes, expires_at: float, now: float) -> defer.Deferred[bool]:
        def run(redis: Any, h: bytes, exp: float, when: float) -> defer.Deferred[bool]:
            d = redis.execute_command("SET", self._used + h.hex(), "1", "NX",
                                      "EXAT", str(_exat(max(exp, when))))
            return d.addCallback(lambda reply: reply is not None)

        return self._call(lambda: (check_hash(key_hash), check_time("expires_at", expires_at),
                                   check_time("now", now)), run)
