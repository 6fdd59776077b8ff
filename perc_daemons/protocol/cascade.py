"""Cascade links: one DTLS-SRTP association between two Media Distributors (sans-I/O).

RFC 8871 section 4.5.1: "Media Distributors use DTLS-SRTP directly with a
peer Media Distributor to establish the HBH key"; the Key Distributor takes
no part.  A :class:`CascadeLink` is one MD's end of such a link: datagrams,
addresses and an explicit ``now`` in, datagrams, timers and events out, in
the verbs of :class:`~perc_daemons.protocol.dtls.DtlsConnection`.  It keeps
no clock, opens no socket and draws its randomness from the ``rng`` it is
given.

What a link is (DESIGN.md, decisions; DIGEST.md section 4):

* **Roles.**  The MD that was asked to open the link is the ``"client"``: the
  DTLS client and the ICE controlling side, which sends STUN Binding
  requests to the peer's configured address.  The ``"server"`` answers them
  and learns the peer's address from a check that authenticates (RFC 8445
  section 7.3 style short-term credentials: USERNAME ``"<server ufrag>:<client
  ufrag>"``, MESSAGE-INTEGRITY under the server's ice-pwd, FINGERPRINT).  Only
  such a check moves the bound address; DTLS from any other address is
  ignored.  Unauthenticated checks get no answer (a link's peer is another
  MD that knows the credentials: an error response would only be a
  reflector).
* **DTLS-SRTP.**  Our DTLS 1.2 engine with exactly one SRTP protection
  profile, the RFC 7714 profile matching the conference's outer half
  (AEAD_AES_128_GCM 0x0007 for DOUBLE 0x0009, AEAD_AES_256_GCM 0x0008 for
  0x000A: :data:`LINK_PROFILE_FOR`), no EKT, both certificates checked: each
  MD pins the other's SHA-256 fingerprint (a handshake with anything else
  fails).  The server uses stateless HelloVerifyRequest cookies bound to the
  peer's address (RFC 6347 section 4.2.1), so a spoofed ClientHello creates
  no state.  Keys: the exporter ``EXTRACTOR-dtls_srtp`` split as RFC 5764
  section 4.2 says (client key, server key, client salt, server salt); each
  side gets its write and the peer's write key in :class:`LinkUp`.
* **Consent.**  The client sends a Binding request every
  ``consent_interval`` (times a uniform 0.8-1.2 jitter, RFC 7675 section 5.1;
  every ``check_interval`` until the first answer); the server expects them.
  Either side declares the link down (:class:`LinkDown`) when
  ``consent_timeout`` passes without an authenticated request (server) or
  response (client), or when the association ends (close_notify, a fatal
  alert, a failed handshake).
* **Re-establishment.**  After :class:`LinkDown` the client starts over (new
  checks, then a new DtlsConnection) after a jittered exponential back-off
  in ``[backoff_min, backoff_max]``.  The server accepts a new association
  whenever a cookie-checked ClientHello from the bound address starts one,
  and switches to it only when that handshake completes (the peer proved
  its certificate): a peer that restarted, whether the server noticed the
  old association's end or not, is welcome, and no one else can reset the
  link.  While the new handshake runs the old association stays up.
* **Rekey.**  Every ``rekey_interval`` the client runs a fresh handshake (a
  new association, new keys, :class:`LinkUp` again) while the old keys stay
  in use; the caller keeps the old keys for a while (see
  :mod:`perc_daemons.md.plane`).
* **Lost association.**  Each side puts an 8-byte tag of its current
  association (an exporter value, label ``EXPERIMENTAL-perc-cascade-link``)
  in its STUN messages (attribute :data:`ATTR_ASSOCIATION_TAG`).  A client
  whose peer answers with another tag (or none: the peer MD restarted and
  lost the keys) declares the link down and re-establishes it; answers to
  checks sent before the current association was up are not taken as
  evidence.

Several links between the same two MDs share one 5-tuple (each MD has one
media port), and DTLS 1.2 cannot tell their handshakes apart.  So every
datagram of a link other than STUN travels in TURN ChannelData framing
(RFC 8656 section 12.4: channel number 0x4000-0x4FFF, length, data; RFC
7983 puts first bytes 64-79 beside STUN, DTLS and SRTP): the channel number
names the link at the *receiving* MD.  Each side tells the other the number
it receives on in its STUN messages (attribute CHANNEL-NUMBER, 0x000C, as
RFC 8656 encodes it), authenticated by MESSAGE-INTEGRITY.  This class deals
in unframed DTLS and exposes ``local_channel`` / ``remote_channel``; the
framing itself is the media plane's.

Bad input never raises: malformed, unauthenticated or unexpected STUN and
DTLS is dropped and counted in :attr:`CascadeLink.counters`
(:data:`LINK_COUNTERS`).  What it does not do: ICE candidate gathering or
pairing (one configured address), TURN, DTLS renegotiation (a rekey is a
new association), EKT, or media: SRTP is the caller's, with the keys of
:class:`LinkUp`.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from perc_daemons.protocol.dtls.connection import (
    SRTP_KEYING_MATERIAL_LENGTH,
    ConnectionClosed,
    DtlsConfiguration,
    DtlsConnection,
    HandshakeComplete,
    Role,
)
from perc_daemons.protocol.dtls.handshake import HandshakeType
from perc_daemons.protocol.dtls.record import (
    ContentType,
    encode_record,
    parse_records,
)
from perc_daemons.protocol.srtp import LAYER_KEY_LENGTH, SALT_LENGTH, Profile
from perc_daemons.protocol.stun import (
    ATTR_ICE_CONTROLLING,
    ATTR_PRIORITY,
    ATTR_USE_CANDIDATE,
    ATTR_USERNAME,
    ATTR_XOR_MAPPED_ADDRESS,
    BINDING_ERROR,
    BINDING_REQUEST,
    BINDING_SUCCESS,
    StunError,
    StunMessage,
    check_fingerprint,
    check_integrity,
    parse_username,
    xor_mapped_address,
)

__all__ = [
    "ATTR_ASSOCIATION_TAG",
    "ATTR_CHANNEL_NUMBER",
    "CHANNEL_HEADER_LENGTH",
    "CHANNEL_MAX",
    "CHANNEL_MIN",
    "CLIENT",
    "CONNECTING",
    "DOWN",
    "LINK_COUNTERS",
    "LINK_PROFILES",
    "LINK_PROFILE_FOR",
    "SERVER",
    "UP",
    "CascadeLink",
    "LinkDown",
    "LinkEvent",
    "LinkTiming",
    "LinkUp",
    "split_link_keys",
]

Address = tuple[Any, ...]

CLIENT = "client"
SERVER = "server"
#: Link states (:attr:`CascadeLink.state`).
CONNECTING, UP, DOWN = "connecting", "up", "down"

#: The single-layer profiles a link may use (RFC 7714).
LINK_PROFILES = (Profile.AEAD_AES_128_GCM, Profile.AEAD_AES_256_GCM)
#: A conference's DOUBLE profile -> the link profile matching its outer half.
LINK_PROFILE_FOR = {
    Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM: Profile.AEAD_AES_128_GCM,
    Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM: Profile.AEAD_AES_256_GCM,
}

#: CHANNEL-NUMBER (RFC 8656 section 14.1): here, the channel its sender receives on.
ATTR_CHANNEL_NUMBER = 0x000C
#: Ours, comprehension-optional: the sender's current association tag (8 bytes).
ATTR_ASSOCIATION_TAG = 0xC0C5
CHANNEL_MIN, CHANNEL_MAX = 0x4000, 0x4FFF  # RFC 8656 section 12
CHANNEL_HEADER_LENGTH = 4
TAG_LABEL = b"EXPERIMENTAL-perc-cascade-link"
TAG_LENGTH = 8
#: PRIORITY of our checks: a host candidate, component 1 (RFC 8445 section 5.1.2.1).
_PRIORITY = struct.pack("!I", (126 << 24) | (65535 << 8) | 255)

#: Per-link counters (:attr:`CascadeLink.counters`).
LINK_COUNTERS = (
    "stun_in",               # STUN datagrams received
    "stun_out",              # Binding requests (client) / success responses (server) sent
    "dtls_in",               # DTLS datagrams received from the bound address
    "handshakes",            # DTLS handshakes started (client) / accepted after the cookie
    "handshake_failures",    # handshakes that ended without an association
    "rekeys",                # handshakes started while up (client: the rekey schedule)
    "link_up",               # LinkUp events
    "link_down",             # LinkDown events
    "stun_malformed",        # unparsable STUN, bad FINGERPRINT, missing link attributes
    "stun_unauthenticated",  # USERNAME or MESSAGE-INTEGRITY wrong: no answer
    "stun_unexpected",       # a response to no transaction of ours, a request at the client
    "stun_error_response",   # the peer answered with an error
    "wrong_address",         # STUN response or DTLS from other than the bound address
    "dtls_unexpected",       # DTLS with no association or handshake to take it
    "dtls_duplicate_hello",  # the current association's ClientHello again
    "address_moved",         # an authenticated check moved the bound address
    "tag_mismatch",          # the peer's association is not ours: link re-established
    "app_data",              # DTLS application data (unused on links): ignored
    "unknown_kind",          # neither STUN nor DTLS (RFC 7983)
    "empty",                 # zero-length datagram
)


@dataclass(frozen=True)
class LinkTiming:
    """The link's clocks, in seconds (defaults for production; tests shrink them).

    ``key_overlap`` and ``switch_delay`` are used by the media plane: how long
    the previous inbound keys stay accepted after a rekey, and how long the
    server side keeps sending under the previous keys unless a packet under
    the new ones arrives first.  The server completes a handshake one flight
    before the client, so ``switch_delay`` covers a lost final flight (the
    client resends its own after 1 s, RFC 6347 s4.2.4.1) and ``key_overlap``
    must outlast it.
    """

    consent_interval: float = 5.0    # RFC 7675 section 5.1 (jittered 0.8-1.2)
    consent_timeout: float = 30.0    # RFC 7675 section 5.1
    check_interval: float = 0.5      # checks before the first answer (RFC 8489 RTO)
    handshake_timeout: float = 20.0  # a handshake older than this is abandoned
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    rekey_interval: float | None = 3600.0
    key_overlap: float = 10.0
    switch_delay: float = 5.0

    def __post_init__(self) -> None:
        values = (self.consent_interval, self.consent_timeout, self.check_interval,
                  self.handshake_timeout, self.backoff_min, self.backoff_max,
                  self.key_overlap, self.switch_delay)
        if min(values) <= 0:
            raise ValueError("link timings must be positive")
        if self.backoff_min > self.backoff_max:
            raise ValueError("backoff_min must not exceed backoff_max")
        if self.consent_interval * 1.2 >= self.consent_timeout:
            raise ValueError("consent_interval must be well below consent_timeout")
        if self.rekey_interval is not None and self.rekey_interval <= 0:
            raise ValueError("rekey_interval must be positive (or None)")
        if self.key_overlap <= self.switch_delay:
            raise ValueError("key_overlap must exceed switch_delay")


@dataclass(frozen=True)
class LinkUp:
    """An association is up (first time, after a LinkDown, or a rekey): its SRTP keys."""

    profile: int
    local_write_key: bytes = field(repr=False)
    local_write_salt: bytes = field(repr=False)
    remote_write_key: bytes = field(repr=False)
    remote_write_salt: bytes = field(repr=False)


@dataclass(frozen=True)
class LinkDown:
    """The link lost its association (or the first attempt failed): keys are no longer valid.

    Announced once per loss; the client's attempts to get the link back that
    fail too are counted (``handshake_failures``, :attr:`CascadeLink.last_failure`).

    ``reason`` is a slug for metrics: ``consent_timeout``, ``handshake_timeout``,
    ``peer_restart`` (the peer holds another association or none),
    ``close_notify``, ``peer_alert`` or the DTLS failure's reason (e.g.
    ``dtls_wrong_certificate``, ``dtls_no_srtp_profile``, ``dtls_timeout``).
    """

    reason: str
    detail: str = ""


LinkEvent = LinkUp | LinkDown


def split_link_keys(profile: int, material: bytes, role: str) -> LinkUp:
    """RFC 5764 section 4.2: client key, server key, client salt, server salt."""
    n = LAYER_KEY_LENGTH[Profile(profile)]
    if len(material) != 2 * (n + SALT_LENGTH):
        raise ValueError(f"{len(material)} bytes of keying material for profile {profile:#06x}")
    client_key, server_key = material[:n], material[n:2 * n]
    client_salt = material[2 * n:2 * n + SALT_LENGTH]
    server_salt = material[2 * n + SALT_LENGTH:]
    if role == CLIENT:
        return LinkUp(profile, client_key, client_salt, server_key, server_salt)
    return LinkUp(profile, server_key, server_salt, client_key, client_salt)


def _channel(value: bytes | None) -> int | None:
    if value is None or len(value) != 4:
        return None
    channel = (value[0] << 8) | value[1]
    return channel if CHANNEL_MIN <= channel <= CHANNEL_MAX else None


def _client_hello_random(data: bytes) -> bytes | None:
    """The random of an unfragmented epoch-0 ClientHello opening ``data``, else None."""
    if (len(data) < 13 + 12 + 34 or data[0] != ContentType.HANDSHAKE or data[3:5] != b"\0\0"
            or data[13] != HandshakeType.CLIENT_HELLO or data[19:22] != b"\0\0\0"):
        return None
    return bytes(data[27:59])


class CascadeLink:
    """One MD's end of a cascade link (see the module docstring).

    ``local_channel`` is the ChannelData number this MD receives the link's
    datagrams on (the media plane picks it); ``peer_address`` is where the
    client sends, ``None`` for a server (learnt from the first authenticated
    check).  The client's first check is ready in :meth:`datagrams_to_send`
    as soon as the link is made.
    """

    def __init__(self, role: str, *, local_ufrag: str, local_pwd: str, remote_ufrag: str,
                 remote_pwd: str, certificate: bytes, private_key: ec.EllipticCurvePrivateKey,
                 peer_fingerprint: bytes, profile: int, local_channel: int, now: float,
                 peer_address: Address | None = None, timing: LinkTiming | None = None,
                 rng: random.Random | None = None, mtu: int = 1200) -> None:
        if role not in (CLIENT, SERVER):
            raise ValueError(f"role must be {CLIENT!r} or {SERVER!r}")
        for name, ufrag in (("local_ufrag", local_ufrag), ("remote_ufrag", remote_ufrag)):
            if not ufrag or ":" in ufrag:
                raise ValueError(f"{name} must be non-empty without ':'")
        if not local_pwd or not remote_pwd:
            raise ValueError("ice-pwd must be non-empty")
        if profile not in LINK_PROFILES:
            raise ValueError(f"profile {profile:#06x} is not AEAD_AES_128_GCM or _256_GCM")
        if len(peer_fingerprint) != 32:
            raise ValueError("peer_fingerprint must be a SHA-256 digest")
        if not CHANNEL_MIN <= local_channel <= CHANNEL_MAX:
            raise ValueError("local_channel must be 0x4000-0x4FFF")
        if (peer_address is None) == (role == CLIENT):
            raise ValueError("a client needs peer_address; a server learns it")
        self.role = role
        self.profile = int(profile)
        self.local_ufrag, self.remote_ufrag = local_ufrag, remote_ufrag
        self._local_key = local_pwd.encode("utf-8")
        self._remote_key = remote_pwd.encode("utf-8")
        self._username = f"{remote_ufrag}:{local_ufrag}".encode()
        self.local_channel = local_channel
        #: The peer's channel for our datagrams, from its last authenticated STUN message.
        self.remote_channel: int | None = None
        #: Client: configured; server: from the last authenticated check.
        self.peer_address = peer_address
        self.timing = timing or LinkTiming()
        self._rng = rng or random.SystemRandom()
        self._config = DtlsConfiguration(
            certificate, private_key, srtp_profiles=[self.profile], ekt_ciphers=[],
            expected_peer_fingerprint=bytes(peer_fingerprint),
            mtu=mtu - CHANNEL_HEADER_LENGTH)
        self._cookie_secret = self._rng.randbytes(32)
        self._tiebreaker = self._rng.randbytes(8)
        self.state = CONNECTING
        self.counters = dict.fromkeys(LINK_COUNTERS, 0)
        #: (reason, detail) of the latest failure, announced or not.
        self.last_failure: tuple[str, str] | None = None
        self._down_announced = False
        self._events: list[LinkEvent] = []
        self._out: list[bytes] = []
        self._closed = False
        # associations: the established one, the handshake in progress, the
        # server's stateless listener for new ClientHellos
        self._current: DtlsConnection | None = None
        self._current_random = b""
        self._pending: DtlsConnection | None = None
        self._pending_random = b""
        self._pending_since = now
        self._listener: DtlsConnection | None = None
        self._generation = 0  # bumped per association
        self._tag: bytes | None = None
        self._last_consent = now
        # client
        self._transactions: dict[bytes, tuple[float, int]] = {}
        self._answered = False  # a check of this attempt was answered
        self._next_check = now
        self._retry_at: float | None = None
        self._rekey_at: float | None = None
        self._failures = 0
        if role == CLIENT:
            self._send_check(now)
        else:
            self._listener = self._new_listener()

    def __repr__(self) -> str:  # never the ice-pwd
        return (f"<CascadeLink {self.role} {self.local_ufrag}->{self.remote_ufrag} "
                f"{self.state} peer={self.peer_address!r}>")

    # -- the sans-I/O verbs ------------------------------------------------------------

    def receive(self, datagram: bytes, address: Address, now: float) -> None:
        """One STUN or (unframed) DTLS datagram from ``address``; never raises."""
        if self._closed:
            return
        if not datagram:
            self.counters["empty"] += 1
            return
        first = datagram[0]
        if first <= 3:
            self.counters["stun_in"] += 1
            self._stun(datagram, address, now)
        elif 20 <= first <= 63:
            if address != self.peer_address:
                self.counters["wrong_address"] += 1
                return
            self.counters["dtls_in"] += 1
            self._dtls(datagram, now)
        else:
            self.counters["unknown_kind"] += 1

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """STUN and (unframed) DTLS datagrams for :attr:`peer_address`."""
        out, self._out = self._out, []
        for conn in (self._listener, self._pending, self._current):
            if conn is not None:
                out += conn.datagrams_to_send(now)
        return out

    def next_event(self) -> LinkEvent | None:
        return self._events.pop(0) if self._events else None

    def next_timer(self) -> float | None:
        if self._closed:
            return None
        timers = [t for t in (self._pending.get_timer() if self._pending else None,
                              self._current.get_timer() if self._current else None)
                  if t is not None]
        timing = self.timing
        if self._pending is not None:
            timers.append(self._pending_since + timing.handshake_timeout)
        if self.role == CLIENT:
            if self.state == DOWN:
                if self._retry_at is not None:
                    timers.append(self._retry_at)
            else:
                timers += [self._next_check, self._last_consent + timing.consent_timeout]
                if self._rekey_at is not None and self._pending is None:
                    timers.append(self._rekey_at)
        elif self.state == UP:
            timers.append(self._last_consent + timing.consent_timeout)
        return min(timers) if timers else None

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now`` (retransmissions, checks, timeouts, rekey)."""
        if self._closed:
            return
        for conn in (self._pending, self._current):
            if conn is not None and (t := conn.get_timer()) is not None and now >= t:
                conn.handle_timer(now)
        self._dtls_events(now)
        timing = self.timing
        if self._pending is not None and now >= self._pending_since + timing.handshake_timeout:
            self._abandon_pending(now)
        if self.role == CLIENT:
            self._client_timers(now)
        elif self.state == UP and now >= self._last_consent + timing.consent_timeout:
            self._down("consent_timeout", "no authenticated check from the peer", now)

    def close(self) -> None:
        """End the link: close_notify on its associations (in :meth:`datagrams_to_send`)."""
        if self._closed:
            return
        for conn in (self._pending, self._current):
            if conn is not None:
                conn.close()
                self._out += conn.datagrams_to_send(0.0)
        self._pending = self._current = self._listener = None
        self._tag = None
        self.state = DOWN
        self._closed = True

    def expects(self, transaction_id: bytes) -> bool:
        """Whether a STUN response with this transaction id would be ours."""
        return transaction_id in self._transactions

    # -- client ------------------------------------------------------------------------

    def _client_timers(self, now: float) -> None:
        timing = self.timing
        if self.state == DOWN:
            if self._retry_at is not None and now >= self._retry_at:
                self._retry_at = None
                self.state = CONNECTING
                self._last_consent = now  # the attempt's consent clock
                self._answered = False
                self._send_check(now)
            return
        if now >= self._last_consent + timing.consent_timeout:
            self._down("consent_timeout", "no authenticated answer from the peer", now)
            return
        if (self.state == UP and self._rekey_at is not None and now >= self._rekey_at
                and self._pending is None):
            self._rekey_at = None
            self.counters["rekeys"] += 1
            self._start_handshake(now)
        if now >= self._next_check:
            self._send_check(now)

    def _send_check(self, now: float) -> None:
        timing = self.timing
        horizon = now - timing.consent_timeout
        for tid in [t for t, (sent, _) in self._transactions.items() if sent < horizon]:
            del self._transactions[tid]
        tid = self._rng.randbytes(12)
        attributes = [
            (ATTR_USERNAME, self._username),
            (ATTR_PRIORITY, _PRIORITY),
            (ATTR_ICE_CONTROLLING, self._tiebreaker),
            (ATTR_USE_CANDIDATE, b""),
            (ATTR_CHANNEL_NUMBER, struct.pack("!HH", self.local_channel, 0)),
        ]
        if self._tag is not None:
            attributes.append((ATTR_ASSOCIATION_TAG, self._tag))
        self._out.append(StunMessage(BINDING_REQUEST, tid, attributes).encode(
            integrity_key=self._remote_key))
        self._transactions[tid] = (now, self._generation)
        self.counters["stun_out"] += 1
        if self._answered:
            self._next_check = now + timing.consent_interval * self._rng.uniform(0.8, 1.2)
        else:
            self._next_check = now + timing.check_interval

    def _response(self, message: StunMessage, data: bytes, address: Address,
                  now: float) -> None:
        entry = self._transactions.get(message.transaction_id)
        if entry is None:
            self.counters["stun_unexpected"] += 1
            return
        if address != self.peer_address:
            self.counters["wrong_address"] += 1
            return
        if not (check_fingerprint(data) and check_integrity(data, self._remote_key)):
            self.counters["stun_error_response" if message.message_type == BINDING_ERROR
                          else "stun_unauthenticated"] += 1
            return
        del self._transactions[message.transaction_id]
        if message.message_type == BINDING_ERROR:
            self.counters["stun_error_response"] += 1
            return
        channel = _channel(message.get(ATTR_CHANNEL_NUMBER))
        if channel is None:
            self.counters["stun_malformed"] += 1
            return
        self.remote_channel = channel
        self._last_consent = now
        if not self._answered:
            self._answered = True
            self._next_check = now + self.timing.consent_interval * self._rng.uniform(0.8, 1.2)
        if self.state == CONNECTING:
            if self._pending is None and self._current is None:
                self._start_handshake(now)
        elif (self.state == UP and self._pending is None and entry[1] == self._generation
              and message.get(ATTR_ASSOCIATION_TAG) != self._tag):
            # Asked after our association was up, answered from another (or none).
            self.counters["tag_mismatch"] += 1
            self._down("peer_restart", "the peer holds another association or none", now)

    def _start_handshake(self, now: float) -> None:
        conn = DtlsConnection(Role.CLIENT, self._config)
        conn.connect(now)
        self._pending, self._pending_since = conn, now
        self.counters["handshakes"] += 1

    def _backoff(self) -> float:
        timing = self.timing
        ceiling = min(timing.backoff_max, timing.backoff_min * 2.0 ** min(self._failures, 30))
        return self._rng.uniform(timing.backoff_min, ceiling)

    # -- server ------------------------------------------------------------------------

    def _new_listener(self) -> DtlsConnection:
        config = DtlsConfiguration(
            self._config.certificate, self._config.private_key,
            srtp_profiles=[self.profile], ekt_ciphers=[],
            expected_peer_fingerprint=self._config.expected_peer_fingerprint,
            mtu=self._config.mtu, cookie_secret=self._cookie_secret,
            peer_id=repr(self.peer_address).encode())
        return DtlsConnection(Role.SERVER, config)

    def _answer(self, message: StunMessage, data: bytes, address: Address, now: float) -> None:
        if not check_fingerprint(data):
            self.counters["stun_malformed"] += 1
            return
        username = message.get(ATTR_USERNAME)
        try:
            names = parse_username(username) if username is not None else None
        except StunError:
            names = None
        if (names != (self.local_ufrag, self.remote_ufrag)
                or not check_integrity(data, self._local_key)):
            self.counters["stun_unauthenticated"] += 1
            return
        channel = _channel(message.get(ATTR_CHANNEL_NUMBER))
        if channel is None:
            self.counters["stun_malformed"] += 1
            return
        if address != self.peer_address:
            if self.peer_address is not None:
                self.counters["address_moved"] += 1
            self.peer_address = address
            self._listener = self._new_listener()  # cookies name the peer's address
        self.remote_channel = channel
        self._last_consent = now
        tid = message.transaction_id
        attributes = []
        try:
            attributes.append((ATTR_XOR_MAPPED_ADDRESS,
                               xor_mapped_address(address[0], address[1], tid)))
        except (ValueError, TypeError, IndexError):
            pass  # not an IP address (only in tests): the attribute is for ICE's benefit
        attributes.append((ATTR_CHANNEL_NUMBER, struct.pack("!HH", self.local_channel, 0)))
        if self._tag is not None:
            attributes.append((ATTR_ASSOCIATION_TAG, self._tag))
        self._out.append(StunMessage(BINDING_SUCCESS, tid, attributes).encode(
            integrity_key=self._local_key))
        self.counters["stun_out"] += 1

    def _client_hello(self, data: bytes, random_: bytes, now: float) -> None:
        if self._pending is not None and random_ == self._pending_random:
            self._pending.receive_datagram(data, now)  # a retransmission: its handshake
            return
        if random_ == self._current_random:
            self.counters["dtls_duplicate_hello"] += 1
            return
        listener = self._listener
        assert listener is not None
        listener.receive_datagram(data, now)
        event = listener.next_event()
        if isinstance(event, ConnectionClosed):  # a cookie-checked hello we refuse
            self._out += listener.datagrams_to_send(now)
            self._listener = self._new_listener()
            self._handshake_failed(event, now)
        elif listener.get_timer() is not None:
            # The cookie checked and flight 4 is out (its retransmission timer runs):
            # this is a handshake now; a stalled one it replaces is dropped.
            if self._pending is not None:
                self.counters["handshake_failures"] += 1
            self._out += listener.datagrams_to_send(now)
            self._pending, self._pending_random, self._pending_since = listener, random_, now
            self._listener = self._new_listener()
            self.counters["handshakes"] += 1
            if self.state == DOWN:
                self.state = CONNECTING

    # -- shared ------------------------------------------------------------------------

    def _stun(self, data: bytes, address: Address, now: float) -> None:
        try:
            message = StunMessage.parse(data)
        except StunError:
            self.counters["stun_malformed"] += 1
            return
        if message.message_type == BINDING_REQUEST and self.role == SERVER:
            self._answer(message, data, address, now)
        elif message.message_type in (BINDING_SUCCESS, BINDING_ERROR) and self.role == CLIENT:
            self._response(message, data, address, now)
        else:
            self.counters["stun_unexpected"] += 1

    def _dtls(self, data: bytes, now: float) -> None:
        if self.role == SERVER:
            random_ = _client_hello_random(data)
            if random_ is not None:
                self._client_hello(data, random_, now)
                self._dtls_events(now)
                return
        pending, current = self._pending, self._current
        if pending is not None:
            pending.receive_datagram(data, now)
            if current is not None:
                # Epoch-0 records belong to the handshake; the established association
                # authenticates (or silently drops) the protected ones.
                protected = b"".join(
                    encode_record(r.content_type, r.version, r.epoch, r.sequence_number,
                                  r.fragment) for r in parse_records(data) if r.epoch)
                if protected:
                    current.receive_datagram(protected, now)
        elif current is not None:
            current.receive_datagram(data, now)
        else:
            self.counters["dtls_unexpected"] += 1
        self._dtls_events(now)

    def _dtls_events(self, now: float) -> None:
        while self._pending is not None and (event := self._pending.next_event()) is not None:
            if isinstance(event, HandshakeComplete):
                self._established(event, now)
            elif isinstance(event, ConnectionClosed):
                self._out += self._pending.datagrams_to_send(now)
                self._pending = None
                self._handshake_failed(event, now)
        while self._current is not None and (event := self._current.next_event()) is not None:
            if isinstance(event, ConnectionClosed):
                self._out += self._current.datagrams_to_send(now)
                self._current, self._current_random, self._tag = None, b"", None
                reason = "dtls_timeout" if event.cause == "timeout" else event.cause
                if self._pending is not None:  # a handshake is under way: carry on with it
                    self.state = CONNECTING
                    self._lost(reason, event.reason)
                else:
                    self._down(reason, event.reason, now)
            elif not isinstance(event, HandshakeComplete):
                self.counters["app_data"] += 1

    def _established(self, event: HandshakeComplete, now: float) -> None:
        conn = self._pending
        assert conn is not None
        expected = SRTP_KEYING_MATERIAL_LENGTH.get(Profile(self.profile))
        if (event.srtp_profile != self.profile or event.ekt_cipher is not None
                or len(event.keying_material) != expected):  # our engine never allows it
            conn.close()
            self._out += conn.datagrams_to_send(now)
            self._pending = None
            self.counters["handshake_failures"] += 1
            return
        keys = split_link_keys(self.profile, event.keying_material, self.role)
        if self._current is not None:
            self._out += self._current.datagrams_to_send(now)
        self._current, self._current_random = conn, self._pending_random
        self._pending, self._pending_random = None, b""
        self._generation += 1
        self._tag = conn.export_keying_material(TAG_LABEL, TAG_LENGTH)
        self.state = UP
        self._failures = 0
        if self.role == CLIENT and self.timing.rekey_interval is not None:
            self._rekey_at = now + self.timing.rekey_interval
        self._emit(keys)

    def _handshake_failed(self, event: ConnectionClosed, now: float) -> None:
        self.counters["handshake_failures"] += 1
        if self.state == UP:
            if self.role == CLIENT:  # a failed rekey: the association we have stays
                self._rekey_at = now + self.timing.backoff_max
            return
        reason = "dtls_timeout" if event.cause == "timeout" else event.cause
        self._down(reason, event.reason, now)

    def _abandon_pending(self, now: float) -> None:
        self._pending = None
        self.counters["handshake_failures"] += 1
        if self.state == UP:
            if self.role == CLIENT:
                self._rekey_at = now + self.timing.backoff_max
        elif self.state == CONNECTING:
            self._down("handshake_timeout", "the DTLS handshake did not complete", now)

    def _down(self, reason: str, detail: str, now: float) -> None:
        """No association any more (no close_notify: the peer may be gone)."""
        self._current = self._pending = None
        self._current_random = self._pending_random = b""
        self._tag = None
        self._transactions.clear()
        self._rekey_at = None
        self.state = DOWN
        if self.role == CLIENT:
            self._failures += 1
            self._retry_at = now + self._backoff()
        self._lost(reason, detail)

    def _lost(self, reason: str, detail: str) -> None:
        """LinkDown, once per loss: failed attempts to get it back are only counted."""
        self.last_failure = (reason, detail)
        if not self._down_announced:
            self._down_announced = True
            self._emit(LinkDown(reason, detail))

    def _emit(self, event: LinkEvent) -> None:
        if isinstance(event, LinkUp):
            self.counters["link_up"] += 1
            self._down_announced = False
        else:
            self.counters["link_down"] += 1
        self._events.append(event)
