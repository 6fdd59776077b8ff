"""The shared conference store: Redis through txredisapi (several KMF/KD hosts).

Keys, all under a namespace (default ``perc``; conference ids cannot contain
``:``)::

    {ns}:conferences           sorted set (score 0) of conference ids
    {ns}:conf:{id}             hash: title initiator state starts_at ends_at
                               late created_at last_epoch early_start grace
                               rekey_interval late_join (absent: the defaults,
                               late_join from late)
    {ns}:conf:{id}:invited     set of identities
    {ns}:conf:{id}:groups      set of LDAP groups
    {ns}:conf:{id}:epochs      hash epoch -> {"spi", "key" (base64 of the
                               KEK-wrapped key), "created_at"}
    {ns}:conf:{id}:audit       list of hash-chained audit records (JSON, see
                               perc_daemons.protocol.audit), oldest first
    {ns}:conf:{id}:audit-checkpoints  hash seq -> {"hash", "jws"}: the KMF's
                               signed checkpoints
    {ns}:conf:{id}:audit-reports  hash: the KD report ids recorded (each once)
    {ns}:conf:{id}:roster      hash: epoch, jws, admitted
    {ns}:conf:{id}:mds         set of tunnel addresses (its Media Distributors)
    {ns}:audit-chained         "1" once the entries of the unchained layout are
                               chained (chain_legacy_audit)
    {ns}:media-distributors    hash tunnel address -> how many conferences not
                               ended list it (active_media_distributors)

Every change is one Lua script (EVALSHA, falling back to EVAL), so each is
atomic against every other client of the server: create refuses a taken id,
add_epoch increments ``last_epoch``, stores the key and appends the audit
entry in one step and refuses an ended conference, end wipes the epochs, the
roster and the conference's Media Distributors (taking them off the counts of
``{ns}:media-distributors``) and appends the audit entry in one step.  Reads that need several
keys are scripts too, so they see one consistent state.

The audit chain is continued inside the script that makes the change: each
record's SHA-256 is computed in Lua (Redis has only SHA-1 built in, so
:data:`_SHA256_LUA` implements FIPS 180-4 with the ``bit`` library) over
the record's canonical JSON, built from pieces Python encoded canonically.
Records written before the chain (``{"t", "k", "i", "d"}``) are chained
when the store connects.

Connections: a txredisapi pool that reconnects by itself (exponential
back-off); ``convertNumbers=False`` so that strings stay strings; AUTH with
``password`` (and ``username`` for ACL users); TLS with any
``IOpenSSLClientConnectionCreator`` such as
``twisted.internet.ssl.optionsForClientTLS(hostname, trustRoot=..., clientCertificate=...)``,
which txredisapi hands to ``TLSMemoryBIOFactory`` (see
:meth:`RedisConferenceStore.__init__`).  Failing to connect, authenticate or
get an answer within the timeouts is :class:`~perc_daemons.store.StoreUnavailable`.

Durability is the server's business: run it with ``appendonly yes``
(``appendfsync everysec`` loses at most a second of changes on a power cut,
``always`` nothing).  Deleted epoch keys stay in the append-only file until
Redis rewrites it; they are wrapped with the KEK, never in clear.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import txredisapi
from twisted.internet import defer, error, reactor, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from zope.interface import implementer

from perc_daemons.interfaces import IConferenceStore
from perc_daemons.protocol.audit import (
    GENESIS,
    TRAIL_DELETED,
    AuditError,
    AuditRecord,
    Checkpoint,
    canonical_json,
    parse_record,
)
from perc_daemons.store import (
    DEFAULT_EARLY_START,
    DEFAULT_GRACE,
    DEFAULT_REKEY_INTERVAL,
    TRANSITIONS,
    AuditEvent,
    Conference,
    ConferenceEnded,
    ConferenceExists,
    ConferenceNotFound,
    ConferenceState,
    EpochKey,
    InvalidTransition,
    ReportedAudit,
    StoreError,
    StoreUnavailable,
    admitted_json,
    admitted_set,
    check_admission_args,
    check_admitted,
    check_audit_args,
    check_conference_id,
    check_epoch_args,
    check_identity,
    check_media_distributor_args,
    check_now,
    check_roster_args,
    check_update,
    created_detail,
    policy_changed_detail,
    trail_deleted_detail,
)

NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_REFUSAL = re.compile(r"(?:ERR )?PERC_([A-Z]+)(?: (\w+))?$")

# KEYS of every per-conference script, in this order.
_K = ("conf", "invited", "groups", "epochs", "audit", "roster", "index", "mds", "active",
      "checkpoints", "reports")


def _isqrt_n(value: int, n: int) -> int:
    """floor(value ** (1/n)) for integers."""
    x = 1 << ((value.bit_length() + n - 1) // n)
    while True:
        y = ((n - 1) * x + value // x ** (n - 1)) // n
        if y >= x:
            return x
        x = y


def _sha256_constants() -> tuple[list[int], list[int]]:
    primes = [p for p in range(2, 312) if all(p % d for d in range(2, int(p ** 0.5) + 1))]
    k = [_isqrt_n(p << 96, 3) & 0xFFFFFFFF for p in primes[:64]]
    h = [_isqrt_n(p << 64, 2) & 0xFFFFFFFF for p in primes[:8]]
    return k, h


_SHA_K, _SHA_H = _sha256_constants()

#: SHA-256 (FIPS 180-4) in Redis's Lua 5.1 with the bit library; hex digest.
_SHA256_LUA = """
local SHA_K = {@K@}
local function sha256(msg)
  local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
  local rshift, lshift, ror, tobit = bit.rshift, bit.lshift, bit.ror, bit.tobit
  local ml = #msg * 8
  msg = msg .. '\\128' .. string.rep('\\0', (55 - #msg) % 64) .. string.char(0, 0, 0, 0,
    math.floor(ml / 16777216) % 256, math.floor(ml / 65536) % 256,
    math.floor(ml / 256) % 256, ml % 256)
  local H = {@H@}
  local w = {}
  for chunk = 1, #msg, 64 do
    for i = 0, 15 do
      local a, b, c, d = string.byte(msg, chunk + i * 4, chunk + i * 4 + 3)
      w[i] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
    end
    for i = 16, 63 do
      local x, y = w[i - 15], w[i - 2]
      local s0 = bxor(ror(x, 7), ror(x, 18), rshift(x, 3))
      local s1 = bxor(ror(y, 17), ror(y, 19), rshift(y, 10))
      w[i] = tobit(w[i - 16] + s0 + w[i - 7] + s1)
    end
    local a, b, c, d, e, f, g, h = H[1], H[2], H[3], H[4], H[5], H[6], H[7], H[8]
    for i = 0, 63 do
      local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
      local ch = bxor(band(e, f), band(bnot(e), g))
      local t1 = tobit(h + S1 + ch + SHA_K[i + 1] + w[i])
      local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
      local maj = bxor(band(a, b), band(a, c), band(b, c))
      local t2 = tobit(S0 + maj)
      h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + t2)
    end
    H[1], H[2], H[3], H[4] = tobit(H[1] + a), tobit(H[2] + b), tobit(H[3] + c), tobit(H[4] + d)
    H[5], H[6], H[7], H[8] = tobit(H[5] + e), tobit(H[6] + f), tobit(H[7] + g), tobit(H[8] + h)
  end
  local out = {}
  for i = 1, 8 do out[i] = bit.tohex(H[i], 8) end
  return table.concat(out)
end
""".replace("@K@", ",".join(map(str, _SHA_K))).replace("@H@", ",".join(map(str, _SHA_H)))

_PRELUDE = _SHA256_LUA + """
local CID = string.match(KEYS[1], ':conf:([^:]*)$')
-- The next record of the chain: t (JSON number), kind, ident (JSON string or null)
-- and detail (canonical JSON) as Python encoded them; seq and prev continue the list
-- unless given.  The hashed text is the record's canonical JSON (sorted keys).
local function audit(t, kind, ident, detail, seq, prev)
  if not seq then
    seq, prev = 1, '@GENESIS@'
    local last = redis.call('LINDEX', KEYS[5], -1)
    if last then
      local e = cjson.decode(last)
      seq, prev = e.seq + 1, e.hash
    end
  end
  local body = '{"conference":"' .. CID .. '","detail":' .. detail .. ',"identity":' ..
    ident .. ',"kind":"' .. kind .. '","prev":"' .. prev .. '","seq":' ..
    string.format('%d', seq) .. ',"time":' .. t .. '}'
  local h = sha256(body)
  redis.call('RPUSH', KEYS[5], string.sub(body, 1, -2) .. ',"hash":"' .. h .. '"}')
  return h
end
-- One audit argument: "time\\nkind\\nident\\ndetail" (see _audit_entry).
local function audit_entry(a)
  local t, kind, ident, detail = string.match(a, '^([^\\n]*)\\n([^\\n]*)\\n([^\\n]*)\\n(.*)$')
  return audit(t, kind, ident, detail)
end
""".replace("@GENESIS@", GENESIS) + """
local function conference()
  return {redis.call('HGETALL', KEYS[1]), redis.call('SMEMBERS', KEYS[2]),
          redis.call('SMEMBERS', KEYS[3]), redis.call('SMEMBERS', KEYS[8])}
end
local function count_md(tunnel, delta)
  if redis.call('HINCRBY', KEYS[9], tunnel, delta) <= 0 then
    redis.call('HDEL', KEYS[9], tunnel)
  end
end
local function drop_mds()
  for _, tunnel in ipairs(redis.call('SMEMBERS', KEYS[8])) do count_md(tunnel, -1) end
  redis.call('DEL', KEYS[8])
end
local function finish(t)
  local n = redis.call('HLEN', KEYS[4])
  drop_mds()
  redis.call('DEL', KEYS[4], KEYS[6])
  redis.call('HSET', KEYS[1], 'state', 'ended')
  audit(t, 'ended', 'null', '{"epochs_wiped":' .. n .. '}')
end
local state = redis.call('HGET', KEYS[1], 'state')
"""

_NOT_FOUND = "if not state then return redis.error_reply('PERC_NOTFOUND') end\n"
_OPEN = _NOT_FOUND + "if state == 'ended' then return redis.error_reply('PERC_ENDED') end\n"

# ARGV: id, audit entry, 2n, n hash field/value pairs, m, m identities, g, g groups,
# tunnel addresses...
_CREATE = _PRELUDE + """
if state then return redis.error_reply('PERC_EXISTS') end
drop_mds()
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[10], KEYS[11])
local n = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 4, 3 + n))
local i = 4 + n
local m = tonumber(ARGV[i])
for j = i + 1, i + m do redis.call('SADD', KEYS[2], ARGV[j]) end
i = i + m + 1
local g = tonumber(ARGV[i])
for j = i + 1, i + g do redis.call('SADD', KEYS[3], ARGV[j]) end
for j = i + g + 1, #ARGV do
  if redis.call('SADD', KEYS[8], ARGV[j]) == 1 then count_md(ARGV[j], 1) end
end
redis.call('ZADD', KEYS[7], 0, ARGV[1])
audit_entry(ARGV[2])
return 1
"""

_GET = _PRELUDE + _NOT_FOUND + "return conference()\n"

# ARGV: target state, time, states it may be reached from...
_SET_STATE = _PRELUDE + _NOT_FOUND + """
if state ~= ARGV[1] then
  local allowed = false
  for j = 3, #ARGV do if ARGV[j] == state then allowed = true end end
  if not allowed then return redis.error_reply('PERC_INVALID ' .. state) end
  if ARGV[1] == 'ended' then
    finish(ARGV[2])
  else
    redis.call('HSET', KEYS[1], 'state', ARGV[1])
    audit(ARGV[2], 'state', 'null', '{"state":"' .. ARGV[1] .. '"}')
  end
end
return conference()
"""

# ARGV: identity (normalised), audit entry, "1" to add or "0" to remove.  Members
# stored before identities were normalised match in any (ASCII) case.
_INVITATION = _PRELUDE + _OPEN + """
local changed = 0
local present = redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1
for _, who in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if who ~= ARGV[1] and string.lower(who) == ARGV[1] then
    present = true
    if ARGV[3] == '0' then changed = changed + redis.call('SREM', KEYS[2], who) end
  end
end
if ARGV[3] == '1' then
  if not present then changed = redis.call('SADD', KEYS[2], ARGV[1]) end
else
  changed = changed + redis.call('SREM', KEYS[2], ARGV[1])
end
if changed > 0 then audit_entry(ARGV[2]) end
return changed
"""

# ARGV: spi, base64 wrapped key, time (JSON number)
_ADD_EPOCH = _PRELUDE + _OPEN + """
local e = redis.call('HINCRBY', KEYS[1], 'last_epoch', 1)
redis.call('HSET', KEYS[4], e,
  '{"spi":' .. ARGV[1] .. ',"key":"' .. ARGV[2] .. '","created_at":' .. ARGV[3] .. '}')
audit(ARGV[3], 'epoch', 'null', '{"epoch":' .. e .. ',"spi":' .. ARGV[1] .. '}')
return e
"""

# ARGV: audit entry, then field/value pairs (the conference's new policy)
_UPDATE = _PRELUDE + _OPEN + """
if #ARGV > 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2, #ARGV))
  audit_entry(ARGV[1])
end
return conference()
"""

_CURRENT_EPOCH = _PRELUDE + _NOT_FOUND + """
local e = redis.call('HGET', KEYS[1], 'last_epoch')
local v = redis.call('HGET', KEYS[4], e)
if not v then return {} end
return {e, v}
"""

_EPOCHS = _PRELUDE + _NOT_FOUND + "return redis.call('HGETALL', KEYS[4])\n"

# ARGV: audit entry
_APPEND_AUDIT = _PRELUDE + _OPEN + "audit_entry(ARGV[1])\nreturn 1\n"

# ARGV: audit entry, report id ('' for none); also once the conference has ended.
# Returns the record, or '' if a record with that report id is there already.
_REPORT_AUDIT = _PRELUDE + _NOT_FOUND + """
if ARGV[2] ~= '' and redis.call('HSETNX', KEYS[11], ARGV[2], '1') == 0 then return '' end
audit_entry(ARGV[1])
return redis.call('LINDEX', KEYS[5], -1)
"""

_AUDIT_TRAIL = _PRELUDE + _NOT_FOUND + """
return {redis.call('LRANGE', KEYS[5], 0, -1), redis.call('HGETALL', KEYS[10])}
"""

_AUDIT_TAIL = _PRELUDE + _NOT_FOUND + """
local last = redis.call('LINDEX', KEYS[5], -1)
local mark = 0
for _, seq in ipairs(redis.call('HKEYS', KEYS[10])) do
  if tonumber(seq) > mark then mark = tonumber(seq) end
end
return {last or '', tostring(mark)}
"""

# ARGV: seq, hash, jws
_ADD_CHECKPOINT = _PRELUDE + _NOT_FOUND + """
redis.call('HSETNX', KEYS[10], ARGV[1], '{"hash":"' .. ARGV[2] .. '","jws":"' .. ARGV[3] .. '"}')
return 1
"""

# ARGV: length and last entry read (unchanged since), then the deletion record's time,
# detail, seq and prev.  Returns the new record, or '' if the trail changed meanwhile.
_DELETE_TRAIL = _PRELUDE + _NOT_FOUND + """
if state ~= 'ended' then return '' end
if redis.call('LLEN', KEYS[5]) ~= tonumber(ARGV[1]) then return '' end
if redis.call('LINDEX', KEYS[5], -1) ~= ARGV[2] then return '' end
redis.call('DEL', KEYS[5], KEYS[10], KEYS[11])
audit(ARGV[3], 'trail-deleted', 'null', ARGV[4], tonumber(ARGV[5]), ARGV[6])
return redis.call('LINDEX', KEYS[5], -1)
"""

# ARGV: length and first entry read (unchanged since), then the chained entries.
_REWRITE_LEGACY = _PRELUDE + """
if redis.call('LLEN', KEYS[5]) ~= tonumber(ARGV[1]) then return 0 end
if redis.call('LINDEX', KEYS[5], 0) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[5])
redis.call('RPUSH', KEYS[5], unpack(ARGV, 3))
return 1
"""

_AUDIT = _PRELUDE + _NOT_FOUND + "return redis.call('LRANGE', KEYS[5], 0, -1)\n"

# ARGV: epoch, jws, admitted
_SET_ROSTER = _PRELUDE + _OPEN + """
local cur = redis.call('HGET', KEYS[6], 'epoch')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[6], 'epoch', ARGV[1], 'jws', ARGV[2], 'admitted', ARGV[3])
return 1
"""

_ROSTER = _PRELUDE + _NOT_FOUND + "return redis.call('HMGET', KEYS[6], 'epoch', 'jws')\n"

_ADMITTED = _PRELUDE + _NOT_FOUND + "return redis.call('HMGET', KEYS[6], 'epoch', 'admitted')\n"

# ARGV: tunnel address, audit entry, "1" to add or "0" to remove
_MEDIA_DISTRIBUTOR = _PRELUDE + _OPEN + """
if ARGV[3] == '1' then
  if redis.call('SADD', KEYS[8], ARGV[1]) == 0 then return 0 end
  count_md(ARGV[1], 1)
else
  if redis.call('SREM', KEYS[8], ARGV[1]) == 0 then return 0 end
  count_md(ARGV[1], -1)
end
audit_entry(ARGV[2])
return 1
"""

_MEDIA_DISTRIBUTORS = _PRELUDE + _NOT_FOUND + "return redis.call('SMEMBERS', KEYS[8])\n"

# ARGV: time
_END = _PRELUDE + _NOT_FOUND + """
if state == 'ended' then return 0 end
finish(ARGV[1])
return 1
"""


def _json_number(value: float) -> str:
    return json.dumps(float(value))


def _audit_entry(now: float, kind: str, identity: str | None, detail: dict[str, Any]) -> str:
    """The pieces of a record the Lua ``audit_entry`` chains, each canonical JSON."""
    return "\n".join((_json_number(now), kind, canonical_json(identity), canonical_json(detail)))


def _parse_record(conference_id: str, raw: str) -> AuditRecord:
    obj = json.loads(raw)
    try:
        return parse_record(obj)
    except AuditError as e:
        raise StoreError(f"{conference_id}: corrupt audit record: {e}") from None


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _policy_fields(c: Conference) -> list[str]:
    """The hash fields/values of ``c``'s policy (and title)."""
    return [
        "title", c.title,
        "starts_at", "" if c.starts_at is None else repr(c.starts_at),
        "ends_at", "" if c.ends_at is None else repr(c.ends_at),
        "late", "1" if c.late_joiners_get_earlier_epochs else "0",
        "early_start", repr(c.early_start),
        "grace", repr(c.grace),
        "rekey_interval", repr(c.rekey_interval),
        "late_join", str(c.late_join),
    ]


def _opt_float(value: str | None) -> float | None:
    return None if value in (None, "") else float(value)


class _RecordingFactory:
    """Passes everything to txredisapi's factory; records why connections are lost."""

    def __init__(self, wrapped: Any, endpoint: _RecordingEndpoint) -> None:
        self._wrapped = wrapped
        self._endpoint = endpoint

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self._wrapped.buildProtocol(addr)
        lost = protocol.connectionLost

        def connection_lost(reason: Failure) -> Any:
            # recorded first: txredisapi reports a failed AUTH from in there
            self._endpoint.last_error = reason.value
            return lost(reason)

        protocol.connectionLost = connection_lost
        return protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


@implementer(IStreamClientEndpoint)
class _RecordingEndpoint:
    """Remembers why the last connection failed or was lost (a TLS error, say).

    txredisapi only says "Lost connection" or nothing at all.
    """

    def __init__(self, wrapped: IStreamClientEndpoint) -> None:
        self.wrapped = wrapped
        self.last_error: BaseException | None = None

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        def failed(f: Failure) -> Failure:
            self.last_error = f.value
            return f

        return self.wrapped.connect(_RecordingFactory(factory, self)).addErrback(failed)

    def why(self) -> str:
        last = self.last_error
        if last is None or isinstance(last, error.ConnectionDone):
            return ""
        return f" (last connection: {last})"


@implementer(IConferenceStore)
class RedisConferenceStore:
    """:class:`~perc_daemons.interfaces.IConferenceStore` in a Redis server.

    Create it, then ``yield store.connect()`` (or use :meth:`open`).
    """

    #: First and longest delay between reconnection attempts, in seconds.
    reconnect_delays = (0.2, 5.0)

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        password: str | None = None,
        username: str | None = None,
        db: int = 0,
        namespace: str = "perc",
        tls: Any = None,
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
        poolsize: int = 2,
    ) -> None:
        """Configure, without connecting.

        ``tls``: None for plain TCP; True to verify the server against the
        system's CAs for the name ``host``; or an
        ``IOpenSSLClientConnectionCreator`` (``optionsForClientTLS(...)``,
        with ``trustRoot`` for a private CA and ``clientCertificate`` when
        the server demands one).  ``connect_timeout`` bounds :meth:`connect`,
        ``timeout`` every operation (waiting for a connection included).
        """
        if not NAMESPACE.fullmatch(namespace):
            raise ValueError(f"Redis namespace must match {NAMESPACE.pattern}: {namespace!r}")
        if isinstance(db, bool) or not isinstance(db, int) or db < 0:
            raise ValueError(f"Redis db must be a non-negative integer: {db!r}")
        self.host = host
        self.port = port
        self.db = db
        self.namespace = namespace
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._password = password
        self._username = username
        self._tls = optionsForClientTLS(host) if tls is True else tls
        self._poolsize = poolsize
        self._factory: txredisapi.RedisFactory | None = None
        self._redis: Any = None
        self._closed = False

    @classmethod
    def open(cls, *args: Any, **kwargs: Any) -> defer.Deferred[RedisConferenceStore]:
        """``RedisConferenceStore(*args, **kwargs).connect()``."""
        return cls(*args, **kwargs).connect()

    def __repr__(self) -> str:
        tls = " tls" if self._tls is not None else ""
        return f"<RedisConferenceStore {self.host}:{self.port}/{self.db}{tls} ns={self.namespace}>"

    @property
    def _where(self) -> str:
        return f"Redis at {self.host}:{self.port}"

    # -- connection

    def connect(self) -> defer.Deferred[RedisConferenceStore]:
        """Open the connection pool; fires with the store once it can be used.

        Fails with StoreUnavailable when the server cannot be reached within
        ``connect_timeout`` or refuses the password.
        """
        if self._factory is not None or self._closed:
            return defer.fail(StoreError("connect() may be called once, before close()"))
        endpoint: Any = HostnameEndpoint(reactor, self.host, self.port,
                                         timeout=self.connect_timeout)
        if self._tls is not None:
            endpoint = wrapClientTLS(self._tls, endpoint)
        recording = _RecordingEndpoint(endpoint)
        tls = " (TLS)" if self._tls is not None else ""
        factory = txredisapi.RedisFactory(
            f"{self.host}:{self.port}",
            self.db or None,  # no SELECT for the default database
            self._poolsize,
            isLazy=False,
            charset="utf-8",
            password=self._password,
            username=self._username,
            convertNumbers=False,
        )
        factory.reconnect = True
        factory.initialDelay, factory.maxDelay = self.reconnect_delays
        self._factory = factory

        result: defer.Deferred[RedisConferenceStore] = defer.Deferred()
        ready = factory.deferred

        def connected(handler: Any) -> None:
            if result.called:
                return
            # a server that wants a password we did not give accepts the
            # connection and refuses every command: find out now
            ping = handler.ping()

            def answered(reply: object) -> None:
                if not result.called:
                    self._redis = handler
                    chained = self.chain_legacy_audit()
                    chained.addCallbacks(lambda _: result.called or result.callback(self),
                                         lambda f: result.called or result.errback(f))

            def refused(f: Failure) -> None:
                if not result.called:
                    result.errback(StoreUnavailable(f"{self._where} refused PING", f.value))

            ping.addCallbacks(answered, refused)

        def refused(f: Failure) -> None:
            if not result.called:
                result.errback(StoreUnavailable(
                    f"{self._where}{tls} refused the connection{recording.why()}", f.value))

        ready.addCallbacks(connected, refused)

        def failed(f: Failure) -> defer.Deferred[None]:
            if f.check(defer.TimeoutError):
                f = Failure(StoreUnavailable(
                    f"no usable connection to {self._where}{tls} within "
                    f"{self.connect_timeout} s{recording.why()}"))
            self._factory = None
            # this may run inside a connection state transition of
            # txredisapi's ClientService, which cannot be stopped reentrantly
            d = task.deferLater(reactor, 0, factory.disconnect)
            return d.addBoth(lambda _: f)

        result.addTimeout(self.connect_timeout, reactor)
        result.addErrback(failed)
        factory.startConnecting(recording)
        return result

    def close(self) -> defer.Deferred[None]:
        """Close every connection and stop reconnecting (idempotent)."""
        self._closed = True
        factory, self._factory, self._redis = self._factory, None, None
        if factory is None:
            return defer.succeed(None)
        return factory.disconnect().addCallback(lambda _: None)

    # -- plumbing

    def _keys(self, conference_id: str) -> list[str]:
        base = f"{self.namespace}:conf:{conference_id}"
        return [base, f"{base}:invited", f"{base}:groups", f"{base}:epochs", f"{base}:audit",
                f"{base}:roster", f"{self.namespace}:conferences", f"{base}:mds",
                self._active_key, f"{base}:audit-checkpoints", f"{base}:audit-reports"]

    @property
    def _active_key(self) -> str:
        return f"{self.namespace}:media-distributors"

    def _map(self, f: Failure, conference_id: str | None = None,
             target: str | None = None) -> Failure:
        if f.check(StoreError, ValueError, TypeError):
            return f
        if f.check(txredisapi.ResponseError):
            # our scripts' refusals; Redis puts "ERR " before a one-word error
            m = _REFUSAL.match(str(f.value))
            code = m.group(1) if m else None
            if code == "NOTFOUND":
                return Failure(ConferenceNotFound(conference_id))
            if code == "ENDED":
                return Failure(ConferenceEnded(conference_id))
            if code == "EXISTS":
                return Failure(ConferenceExists(conference_id))
            if code == "INVALID" and m is not None:
                return Failure(InvalidTransition(conference_id or "", m.group(2), target or ""))
            return Failure(StoreUnavailable(f"{self._where} answered with an error", f.value))
        if f.check(defer.TimeoutError):
            return Failure(StoreUnavailable(f"{self._where} did not answer within "
                                            f"{self.timeout} s", f.value))
        if f.check(txredisapi.RedisError, error.ConnectError, error.ConnectionLost,
                   error.ConnectionDone, OSError):
            return Failure(StoreUnavailable(f"{self._where} cannot be used", f.value))
        return f

    def _call(self, run: Callable[[Any], defer.Deferred[Any]],
              conference_id: str | None = None, target: str | None = None
              ) -> defer.Deferred[Any]:
        if self._redis is None:
            state = "closed" if self._closed else "not connected (call connect() first)"
            return defer.fail(StoreUnavailable(f"{self._where}: store {state}"))
        d = defer.maybeDeferred(run, self._redis)
        d.addTimeout(self.timeout, reactor)
        return d.addErrback(self._map, conference_id, target)

    def _script(self, script: str, conference_id: str, args: Sequence[Any] = (),
                target: str | None = None) -> defer.Deferred[Any]:
        keys = self._keys(conference_id)
        return self._call(lambda r: r.eval(script, keys, [str(a) for a in args]),
                          conference_id, target)

    @staticmethod
    def _validated(check: Callable[[], Any], run: Callable[[Any], defer.Deferred[Any]]
                   ) -> defer.Deferred[Any]:
        try:
            args = check()
        except ValueError:
            return defer.fail()
        return run(args)

    def _conference(self, conference_id: str, reply: list[Any]) -> Conference:
        fields = _pairs(reply[0])
        return Conference(
            conference_id=conference_id,
            title=fields["title"],
            initiator=fields["initiator"],
            state=ConferenceState(fields["state"]),
            invited=frozenset(reply[1]),
            invited_groups=frozenset(reply[2]),
            starts_at=_opt_float(fields.get("starts_at")),
            ends_at=_opt_float(fields.get("ends_at")),
            created_at=float(fields["created_at"]),
            media_distributors=frozenset(reply[3]),
            early_start=float(fields.get("early_start", DEFAULT_EARLY_START)),
            grace=float(fields.get("grace", DEFAULT_GRACE)),
            rekey_interval=float(fields.get("rekey_interval", DEFAULT_REKEY_INTERVAL)),
            late_join=fields.get("late_join") or (
                "current" if fields.get("late") == "1" else "none"),
        )

    def _epoch(self, conference_id: str, epoch: str, value: str) -> EpochKey:
        data = json.loads(value)
        try:
            blob = base64.b64decode(data["key"], validate=True)
        except binascii.Error as e:
            raise StoreError(f"{conference_id} epoch {epoch}: corrupt stored key") from e
        return EpochKey(conference_id, int(epoch), int(data["spi"]), blob,
                        float(data["created_at"]))

    # -- IConferenceStore

    def create(self, conference: Conference) -> defer.Deferred[Conference]:
        if not isinstance(conference, Conference):
            return defer.fail(TypeError("create() takes a Conference"))
        c = conference
        fields = [
            "initiator", c.initiator,
            "state", str(c.state),
            "created_at", repr(c.created_at),
            "last_epoch", "0",
            *_policy_fields(c),
        ]
        invited = sorted(c.invited)
        groups = sorted(c.invited_groups)
        args = [
            c.conference_id,
            _audit_entry(c.created_at, "created", c.initiator, created_detail(c)),
            len(fields), *fields,
            len(invited), *invited,
            len(groups), *groups,
            *sorted(c.media_distributors),
        ]
        d = self._script(_CREATE, c.conference_id, args)
        return d.addCallback(lambda _: c)

    def get(self, conference_id: str) -> defer.Deferred[Conference]:
        def run(cid: str) -> defer.Deferred[Conference]:
            return self._script(_GET, cid).addCallback(lambda r: self._conference(cid, r))

        return self._validated(lambda: check_conference_id(conference_id), run)

    def list(self, state: ConferenceState | str | None = None) -> defer.Deferred[list[Conference]]:
        try:
            wanted = None if state is None else ConferenceState(state)
        except ValueError:
            return defer.fail()

        @defer.inlineCallbacks
        def run(redis: Any) -> Any:
            ids = yield redis.zrange(f"{self.namespace}:conferences", 0, -1)
            try:
                replies = yield defer.gatherResults(
                    [redis.eval(_GET, self._keys(cid)) for cid in ids], consumeErrors=True
                )
            except defer.FirstError as e:
                e.subFailure.raiseException()
            found = [self._conference(cid, r) for cid, r in zip(ids, replies, strict=True)]
            return sorted((c for c in found if wanted is None or c.state is wanted),
                          key=lambda c: c.conference_id)

        return self._call(run)

    def set_state(self, conference_id: str, state: ConferenceState | str,
                  now: float) -> defer.Deferred[Conference]:
        def check() -> tuple[str, ConferenceState, float]:
            return check_conference_id(conference_id), ConferenceState(state), check_now(now)

        def run(args: tuple[str, ConferenceState, float]) -> defer.Deferred[Conference]:
            cid, target, when = args
            sources = [str(s) for s, targets in TRANSITIONS.items() if target in targets]
            d = self._script(_SET_STATE, cid, [target, _json_number(when), *sources], target)
            return d.addCallback(lambda r: self._conference(cid, r))

        return self._validated(check, run)

    def _invitation(self, conference_id: str, identity: str, now: float,
                    add: bool) -> defer.Deferred[None]:
        def check() -> tuple[str, str, float]:
            return check_conference_id(conference_id), check_identity(identity), check_now(now)

        def run(args: tuple[str, str, float]) -> defer.Deferred[None]:
            cid, who, when = args
            entry = _audit_entry(when, "invited" if add else "uninvited", who, {})
            d = self._script(_INVITATION, cid, [who, entry, "1" if add else "0"])
            return d.addCallback(lambda _: None)

        return self._validated(check, run)

    def update(self, conference_id: str, changes: dict[str, Any],
               now: float, by: str | None = None) -> defer.Deferred[Conference]:
        """Read, check (:func:`check_update`), then write in one script that refuses an
        ended conference; a concurrent update between the two is overwritten."""
        def check() -> tuple[str, dict[str, Any], float]:
            policy_changed_detail({}, by)
            return check_conference_id(conference_id), dict(changes), check_now(now)

        @defer.inlineCallbacks
        def run(args: tuple[str, dict[str, Any], float]) -> Any:
            cid, wanted, when = args
            current = yield self.get(cid)
            if current.state is ConferenceState.ENDED:
                raise ConferenceEnded(cid)
            updated, changed = check_update(current, wanted)
            argv = [_audit_entry(when, "policy-changed", *policy_changed_detail(changed, by))]
            if changed:
                argv += _policy_fields(updated)
            reply = yield self._script(_UPDATE, cid, argv)
            return self._conference(cid, reply)

        return self._validated(check, run)

    def invite(self, conference_id: str, identity: str, now: float) -> defer.Deferred[None]:
        return self._invitation(conference_id, identity, now, True)

    def uninvite(self, conference_id: str, identity: str, now: float) -> defer.Deferred[None]:
        return self._invitation(conference_id, identity, now, False)

    def add_epoch(self, conference_id: str, spi: int, wrapped_key: bytes,
                  now: float) -> defer.Deferred[EpochKey]:
        def check() -> tuple[str, int, bytes, float]:
            return (check_conference_id(conference_id), *check_epoch_args(spi, wrapped_key, now))

        def run(args: tuple[str, int, bytes, float]) -> defer.Deferred[EpochKey]:
            cid, spi_, blob, when = args
            b64 = base64.b64encode(blob).decode("ascii")
            d = self._script(_ADD_EPOCH, cid, [spi_, b64, _json_number(when)])
            return d.addCallback(lambda e: EpochKey(cid, int(e), spi_, blob, when))

        return self._validated(check, run)

    def current_epoch(self, conference_id: str) -> defer.Deferred[EpochKey | None]:
        def run(cid: str) -> defer.Deferred[EpochKey | None]:
            d = self._script(_CURRENT_EPOCH, cid)
            return d.addCallback(lambda r: self._epoch(cid, r[0], r[1]) if r else None)

        return self._validated(lambda: check_conference_id(conference_id), run)

    def epochs(self, conference_id: str) -> defer.Deferred[list[EpochKey]]:
        def parse(cid: str, reply: list[str]) -> list[EpochKey]:
            keys = [self._epoch(cid, e, v) for e, v in _pairs(reply).items()]
            return sorted(keys, key=lambda k: k.epoch)

        def run(cid: str) -> defer.Deferred[list[EpochKey]]:
            return self._script(_EPOCHS, cid).addCallback(lambda r: parse(cid, r))

        return self._validated(lambda: check_conference_id(conference_id), run)

    def record_admission(self, conference_id: str, identity: str, ssrcs: Any, epoch: int,
                         now: float) -> defer.Deferred[None]:
        def check() -> tuple[str, str, list[int], int, float]:
            return (check_conference_id(conference_id),
                    *check_admission_args(identity, ssrcs, epoch, now))

        def run(args: tuple[str, str, list[int], int, float]) -> defer.Deferred[None]:
            cid, who, ssrc_list, ep, when = args
            entry = _audit_entry(when, "admitted", who, {"ssrcs": ssrc_list, "epoch": ep})
            return self._script(_APPEND_AUDIT, cid, [entry]).addCallback(lambda _: None)

        return self._validated(check, run)

    def audit(self, conference_id: str) -> defer.Deferred[list[AuditEvent]]:
        def parse(cid: str, entries: list[str]) -> list[AuditEvent]:
            records = [_parse_record(cid, raw) for raw in entries]
            return [AuditEvent(cid, r.time, r.kind, r.identity, r.detail) for r in records]

        def run(cid: str) -> defer.Deferred[list[AuditEvent]]:
            return self._script(_AUDIT, cid).addCallback(lambda r: parse(cid, r))

        return self._validated(lambda: check_conference_id(conference_id), run)

    def set_roster(self, conference_id: str, epoch: int, signed_roster: str,
                   admitted: Any = ()) -> defer.Deferred[None]:
        def check() -> tuple[str, int, str, str]:
            return (check_conference_id(conference_id), *check_roster_args(epoch, signed_roster),
                    admitted_json(check_admitted(admitted)))

        def run(args: tuple[str, int, str, str]) -> defer.Deferred[None]:
            cid, ep, jws, who = args
            return self._script(_SET_ROSTER, cid, [ep, jws, who]).addCallback(lambda _: None)

        return self._validated(check, run)

    def roster(self, conference_id: str) -> defer.Deferred[tuple[int, str] | None]:
        def run(cid: str) -> defer.Deferred[tuple[int, str] | None]:
            d = self._script(_ROSTER, cid)
            return d.addCallback(lambda r: None if r[0] is None else (int(r[0]), r[1]))

        return self._validated(lambda: check_conference_id(conference_id), run)

    def admitted(self, conference_id: str
                 ) -> defer.Deferred[tuple[int, frozenset[tuple[str, bytes]]] | None]:
        def run(cid: str) -> defer.Deferred[tuple[int, frozenset[tuple[str, bytes]]] | None]:
            d = self._script(_ADMITTED, cid)
            return d.addCallback(
                lambda r: None if r[0] is None else (int(r[0]), admitted_set(r[1])))

        return self._validated(lambda: check_conference_id(conference_id), run)

    def _media_distributor(self, conference_id: str, tunnel: str, now: float,
                           add: bool) -> defer.Deferred[bool]:
        def run(args: tuple[str, str, float]) -> defer.Deferred[bool]:
            cid, address, when = args
            kind = "media-distributor-added" if add else "media-distributor-removed"
            entry = _audit_entry(when, kind, None, {"tunnel": address})
            d = self._script(_MEDIA_DISTRIBUTOR, cid, [address, entry, "1" if add else "0"])
            return d.addCallback(lambda changed: int(changed) == 1)

        return self._validated(lambda: check_media_distributor_args(conference_id, tunnel, now),
                               run)

    def add_media_distributor(self, conference_id: str, tunnel: str,
                              now: float) -> defer.Deferred[bool]:
        return self._media_distributor(conference_id, tunnel, now, True)

    def remove_media_distributor(self, conference_id: str, tunnel: str,
                                 now: float) -> defer.Deferred[bool]:
        return self._media_distributor(conference_id, tunnel, now, False)

    def media_distributors(self, conference_id: str) -> defer.Deferred[list[str]]:
        def run(cid: str) -> defer.Deferred[list[str]]:
            return self._script(_MEDIA_DISTRIBUTORS, cid).addCallback(sorted)

        return self._validated(lambda: check_conference_id(conference_id), run)

    def active_media_distributors(self) -> defer.Deferred[list[str]]:
        return self._call(lambda r: r.hkeys(self._active_key)).addCallback(sorted)

    def end(self, conference_id: str, now: float) -> defer.Deferred[None]:
        def check() -> tuple[str, float]:
            return check_conference_id(conference_id), check_now(now)

        def run(args: tuple[str, float]) -> defer.Deferred[None]:
            cid, when = args
            return self._script(_END, cid, [_json_number(when)]).addCallback(lambda _: None)

        return self._validated(check, run)

    # -- the audit chain

    def append_audit(self, conference_id: str, kind: str, identity: str | None,
                     detail: dict[str, Any], now: float, report_id: str | None = None
                     ) -> defer.Deferred[AuditRecord | None]:
        def run(a: ReportedAudit) -> defer.Deferred[AuditRecord | None]:
            entry = _audit_entry(a.now, a.kind, a.identity, a.detail)
            d = self._script(_REPORT_AUDIT, a.conference_id, [entry, a.report_id or ""])
            return d.addCallback(
                lambda raw: _parse_record(a.conference_id, raw) if raw else None)

        return self._validated(
            lambda: check_audit_args(conference_id, kind, identity, detail, now, report_id),
            run)

    def audit_trail(self, conference_id: str
                    ) -> defer.Deferred[tuple[list[AuditRecord], list[Checkpoint]]]:
        def parse(cid: str, reply: list[Any]) -> tuple[list[AuditRecord], list[Checkpoint]]:
            records = [_parse_record(cid, raw) for raw in reply[0]]
            marks = []
            for seq, value in _pairs(reply[1]).items():
                data = json.loads(value)
                marks.append(Checkpoint(cid, int(seq), data["hash"], data["jws"]))
            return records, sorted(marks, key=lambda c: c.seq)

        def run(cid: str) -> defer.Deferred[tuple[list[AuditRecord], list[Checkpoint]]]:
            return self._script(_AUDIT_TRAIL, cid).addCallback(lambda r: parse(cid, r))

        return self._validated(lambda: check_conference_id(conference_id), run)

    def audit_tail(self, conference_id: str
                   ) -> defer.Deferred[tuple[AuditRecord | None, int]]:
        def run(cid: str) -> defer.Deferred[tuple[AuditRecord | None, int]]:
            d = self._script(_AUDIT_TAIL, cid)
            return d.addCallback(
                lambda r: (_parse_record(cid, r[0]) if r[0] else None, int(r[1])))

        return self._validated(lambda: check_conference_id(conference_id), run)

    def add_audit_checkpoint(self, checkpoint: Checkpoint) -> defer.Deferred[None]:
        if not isinstance(checkpoint, Checkpoint):
            return defer.fail(TypeError("add_audit_checkpoint() takes a Checkpoint"))
        c = checkpoint

        def run(cid: str) -> defer.Deferred[None]:
            if not set(c.jws) <= _JWS_CHARS or not set(c.hash) <= _JWS_CHARS:
                return defer.fail(ValueError("a checkpoint is a compact JWS and a hex hash"))
            d = self._script(_ADD_CHECKPOINT, cid, [c.seq, c.hash, c.jws])
            return d.addCallback(lambda _: None)

        return self._validated(lambda: check_conference_id(c.conference), run)

    def expired_trails(self, ended_before: float) -> defer.Deferred[list[str]]:
        @defer.inlineCallbacks
        def run(redis: Any) -> Any:
            before = check_now(ended_before)
            ids = yield redis.zrange(f"{self.namespace}:conferences", 0, -1)
            expired = []
            for cid in ids:
                records, _ = yield self.audit_trail(cid)
                conference = yield self.get(cid)
                if conference.state is not ConferenceState.ENDED:
                    continue
                if any(r.kind == "ended" and r.time < before for r in records):
                    expired.append(cid)
            return sorted(expired)

        try:
            check_now(ended_before)
        except ValueError:
            return defer.fail()
        return self._call(run)

    def delete_audit_trail(self, conference_id: str, retention: float,
                           now: float) -> defer.Deferred[AuditRecord | None]:
        @defer.inlineCallbacks
        def run(args: tuple[str, float, float]) -> Any:
            cid, keep, when = args
            for _ in range(5):
                entries = yield self._script(_AUDIT_TRAIL, cid)
                raw = entries[0]
                records = [_parse_record(cid, r) for r in raw]
                ended = [r.time for r in records if r.kind == "ended"]
                if not ended or records[-1].kind == TRAIL_DELETED:
                    return None
                last = records[-1]
                detail = trail_deleted_detail(records[0].seq, last.seq, last.hash,
                                              len(records), ended[-1], keep)
                new = yield self._script(_DELETE_TRAIL, cid, [
                    len(raw), raw[-1], _json_number(when), canonical_json(detail),
                    last.seq + 1, last.hash])
                if new:
                    return _parse_record(cid, new)
            raise StoreUnavailable(f"{self._where}: the trail of {cid} kept changing")

        return self._validated(
            lambda: (check_conference_id(conference_id), check_now(retention), check_now(now)),
            run)

    @defer.inlineCallbacks
    def chain_legacy_audit(self) -> Any:
        """Chain the audit entries written before the trail was chained (on connect).

        Returns how many conferences' lists were rewritten.
        """
        marker = f"{self.namespace}:audit-chained"
        if (yield self._call(lambda r: r.get(marker))):
            return 0
        ids = yield self._call(lambda r: r.zrange(f"{self.namespace}:conferences", 0, -1))
        rewritten = 0
        for cid in ids:
            keys = self._keys(cid)
            raw = yield self._call(lambda r, k=keys: r.lrange(k[4], 0, -1))
            if not raw or all('"hash"' in entry for entry in raw):
                continue
            prev, chained = GENESIS, []
            for seq, entry in enumerate(raw, 1):
                e = json.loads(entry)
                if "hash" in e:
                    record = parse_record(e)
                else:
                    record = AuditRecord.chained(cid, seq, float(e["t"]), e["k"], e["i"],
                                                 e["d"], prev)
                chained.append(canonical_json(record.to_json()))
                prev = record.hash
            args = [str(len(raw)), raw[0], *chained]
            done = yield self._call(lambda r, k=keys, a=args: r.eval(_REWRITE_LEGACY, k, a))
            rewritten += int(done)
        yield self._call(lambda r: r.set(marker, "1"))
        return rewritten


_JWS_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
