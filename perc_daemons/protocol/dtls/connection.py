"""A sans-I/O DTLS 1.2 connection, client or server (RFC 6347 over RFC 5246).

Bytes and explicit time in, datagrams and events out::

    conn = DtlsConnection(Role.CLIENT, config)
    conn.connect(now)
    for datagram in conn.datagrams_to_send(now): send(datagram)
    conn.receive_datagram(data, now); event = conn.next_event()
    if conn.get_timer() is not None and now >= conn.get_timer(): conn.handle_timer(now)

What it does (and nothing else): ECDHE_ECDSA with AES-128/256-GCM (RFC 5289),
secp256r1 and X25519 (RFC 8422), mutual certificate authentication checked
against SDP fingerprints (WebRTC, RFC 8827 section 6.5), the extended master
secret (RFC 7627, required), use_srtp (RFC 5764) with the DOUBLE (RFC 8723)
and GCM (RFC 7714) profiles, supported_ekt_ciphers and the EKTKey message
with its ACK (RFC 8870 section 5.2), external_session_id (RFC 8844), secure
renegotiation indication with renegotiation refused (RFC 5746), stateless
HelloVerifyRequest cookies (RFC 6347 section 4.2.1), flights and
retransmission with exponential back-off (section 4.2.4), fragmentation and
reassembly (section 4.2.3), the anti-replay window (section 4.1.2.6), alerts
and close_notify.  Sessions are never resumed.

Bad input from the peer never raises out of this class: a malformed record is
dropped; a malformed or unacceptable handshake message ends the association
with the matching fatal alert and a :class:`ConnectionClosed` event.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum, auto

from cryptography.hazmat.primitives.asymmetric import ec

from perc_daemons.protocol.dtls import handshake as hs
from perc_daemons.protocol.dtls.alerts import (
    AlertDescription,
    AlertLevel,
    DecodeError,
    DecryptError,
    DtlsError,
    ExternalSessionIdMismatch,
    FingerprintMismatch,
    HandshakeFailure,
    IllegalParameter,
    NoCommonEktCipher,
    NoCommonSrtpProfile,
    ProtocolVersionError,
    UnexpectedMessage,
)
from perc_daemons.protocol.dtls.crypto import (
    SUITES,
    KeyShare,
    SuiteParameters,
    certificate_fingerprint,
    export_keying_material,
    extended_master_secret,
    key_block,
    peer_public_key,
    sign,
    signature_scheme_for,
    verify,
    verify_data,
)
from perc_daemons.protocol.dtls.handshake import (
    DTLS_1_0,
    DTLS_1_2,
    CipherSuite,
    ExtensionType,
    HandshakeType,
    NamedGroup,
    SignatureScheme,
)
from perc_daemons.protocol.dtls.record import (
    AEAD_OVERHEAD,
    MAX_PLAINTEXT_LENGTH,
    RECORD_HEADER_LENGTH,
    ContentType,
    GcmProtection,
    Record,
    ReplayWindow,
    encode_record,
    parse_records,
)
from perc_daemons.protocol.ekt import (
    EktCipher,
    EktError,
    EktParameterSet,
    decode_ekt_key,
    encode_ekt_key,
)
from perc_daemons.protocol.srtp import Profile

SRTP_EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"
#: Keying material per SRTP profile: 2 * (key + salt) per layer (RFC 5764 s4.2).
SRTP_KEYING_MATERIAL_LENGTH = {
    Profile.AEAD_AES_128_GCM: 56,
    Profile.AEAD_AES_256_GCM: 88,
    Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM: 112,
    Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM: 176,
}
_COOKIE_LENGTH = 32
_MAX_EARLY_RECORDS = 16
_MAX_RETRANSMISSIONS = 10
_MAX_ACKED_RECORDS = 32
_MAX_HELLO_VERIFY_REQUESTS = 3


class Role(Enum):
    CLIENT = auto()
    SERVER = auto()


@dataclass
class DtlsConfiguration:
    """What one side offers and requires.

    Non-empty ``srtp_profiles`` / ``ekt_ciphers`` are *required*: with no
    common value the handshake fails (handshake_failure) rather than going on
    without SRTP keys or EKT.  ``expected_peer_fingerprint`` (SHA-256 of the
    peer's DER certificate, from SDP) is checked before any key is derived;
    ``None`` accepts any certificate (tests and interop only).
    """

    certificate: bytes
    private_key: ec.EllipticCurvePrivateKey
    srtp_profiles: list[int] = field(default_factory=lambda: [
        Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM,
        Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM,
        Profile.AEAD_AES_128_GCM, Profile.AEAD_AES_256_GCM])
    ekt_ciphers: list[int] = field(default_factory=list)
    expected_peer_fingerprint: bytes | None = None
    external_session_id: bytes | None = None
    expected_peer_external_session_id: bytes | None = None
    cipher_suites: list[int] = field(default_factory=lambda: [
        CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        CipherSuite.ECDHE_ECDSA_WITH_AES_256_GCM_SHA384])
    groups: list[int] = field(default_factory=lambda: [NamedGroup.X25519,
                                                       NamedGroup.SECP256R1])
    mtu: int = 1200
    initial_retransmit: float = 1.0
    max_retransmit: float = 60.0
    #: Server: HMAC key for stateless HelloVerifyRequest cookies; None: no cookies.
    cookie_secret: bytes | None = None
    #: Server: identifies the peer (e.g. its address) inside the cookie.
    peer_id: bytes = b""
    #: Server: largest handshake reassembly buffer per association.
    max_handshake_buffer: int = 65536

    def __post_init__(self) -> None:
        if not 200 <= self.mtu <= 65507:
            raise ValueError("mtu must be between 200 and 65507")
        if not 0 < self.initial_retransmit <= self.max_retransmit:
            raise ValueError("need 0 < initial_retransmit <= max_retransmit")
        if not self.cipher_suites or any(s not in SUITES for s in self.cipher_suites):
            raise ValueError("cipher_suites must be a non-empty list of supported suites")
        if not self.groups or any(g not in (NamedGroup.X25519, NamedGroup.SECP256R1)
                                  for g in self.groups):
            raise ValueError("groups must be a non-empty list of X25519 / secp256r1")
        for value in (self.external_session_id, self.expected_peer_external_session_id):
            if value is not None and not 20 <= len(value) <= 255:
                raise ValueError("external_session_id must be 20 to 255 bytes")


# -- events --------------------------------------------------------------------------------

@dataclass(frozen=True)
class HandshakeComplete:
    srtp_profile: int | None
    keying_material: bytes = field(repr=False)
    peer_certificate: bytes = field(repr=False)
    peer_fingerprint: bytes
    cipher_suite: int
    ekt_cipher: int | None
    peer_external_session_id: bytes | None


@dataclass(frozen=True)
class EktKeyReceived:
    params: EktParameterSet


@dataclass(frozen=True)
class EktKeyAcknowledged:
    spi: int


@dataclass(frozen=True)
class ApplicationDataReceived:
    data: bytes


@dataclass(frozen=True)
class ConnectionClosed:
    alert: int | None
    reason: str
    by_peer: bool
    #: A short slug for metrics: the DtlsError's ``reason`` when we failed the
    #: connection (e.g. ``dtls_no_srtp_profile``), ``peer_alert``,
    #: ``close_notify``, ``timeout`` or ``closed_locally``.
    cause: str = ""


Event = (HandshakeComplete | EktKeyReceived | EktKeyAcknowledged | ApplicationDataReceived
         | ConnectionClosed)


class _State(Enum):
    CLIENT_START = auto()
    CLIENT_WAIT_HELLO = auto()
    CLIENT_WAIT_CERTIFICATE = auto()
    CLIENT_WAIT_KEY_EXCHANGE = auto()
    CLIENT_WAIT_REQUEST_OR_DONE = auto()
    CLIENT_WAIT_DONE = auto()
    CLIENT_WAIT_FINISHED = auto()
    SERVER_WAIT_HELLO = auto()
    SERVER_WAIT_CERTIFICATE = auto()
    SERVER_WAIT_KEY_EXCHANGE = auto()
    SERVER_WAIT_CERTIFICATE_VERIFY = auto()
    SERVER_WAIT_FINISHED = auto()
    CONNECTED = auto()
    CLOSED = auto()


_OUR_SIGNATURE_SCHEMES = [SignatureScheme.ECDSA_SECP256R1_SHA256,
                          SignatureScheme.ECDSA_SECP384R1_SHA384]


@dataclass
class _OutMessage:
    """One item of a flight: a handshake message, or a ChangeCipherSpec."""

    content_type: int
    epoch: int
    msg_type: int = 0
    message_seq: int = 0
    body: bytes = b""


class DtlsConnection:
    """One DTLS 1.2 association (RFC 6347), either role."""

    def __init__(self, role: Role, config: DtlsConfiguration) -> None:
        self.role = role
        self.config = config
        self._state = _State.CLIENT_START if role is Role.CLIENT else _State.SERVER_WAIT_HELLO
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        # record layer
        self._write_epoch = 0
        self._write_seq = [0, 0]
        self._write_protection: GcmProtection | None = None
        self._read_epoch = 0
        self._read_protection: GcmProtection | None = None
        self._pending_read: GcmProtection | None = None
        self._replay = [ReplayWindow(), ReplayWindow()]
        self._early_records: list[Record] = []
        # handshake
        self._reassembler = hs.Reassembler(config.max_handshake_buffer)
        self._next_send_seq = 0
        self._transcript = bytearray()
        self._flight: list[_OutMessage] = []  # resent by the timer
        self._final_flight: list[_OutMessage] = []  # server: resent on the client's repeat
        self._timer: float | None = None
        self._timeout = config.initial_retransmit
        self._retransmissions = 0
        self._client_random = b""
        self._server_random = b""
        self._client_hello: hs.ClientHello | None = None
        self._hello_verify_requests = 0
        self._suite: SuiteParameters | None = None
        self._cipher_suite = 0
        self._key_share: KeyShare | None = None
        self._peer_key_share = b""
        self._peer_certificate = b""
        self._peer_key: ec.EllipticCurvePublicKey | None = None
        self._certificate_requested = False
        self._master_secret = b""
        self._srtp_profile: int | None = None
        self._ekt_cipher: int | None = None
        self._peer_external_session_id: bytes | None = None
        # EKTKey (server: sent, awaiting ACK; client: records that carried it)
        self._ekt_pending: tuple[int, list[set[tuple[int, int]]]] | None = None
        self._ekt_records: list[tuple[int, int]] = []

    # -- public API ----------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._state is _State.CONNECTED

    def connect(self, now: float) -> None:
        """Client: send the first ClientHello."""
        if self.role is not Role.CLIENT or self._state is not _State.CLIENT_START:
            raise RuntimeError("connect() is for a new client connection")
        self._client_random = os.urandom(32)
        self._send_client_hello(b"", now)
        self._state = _State.CLIENT_WAIT_HELLO

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return self._timer

    def handle_timer(self, now: float) -> None:
        if self._timer is None or now < self._timer:
            return
        if self._retransmissions >= _MAX_RETRANSMISSIONS:
            self._close(None, "peer did not answer: retransmissions exhausted", by_peer=False,
                        cause="timeout")
            return
        self._retransmissions += 1
        self._timeout = min(self._timeout * 2, self.config.max_retransmit)
        self._timer = now + self._timeout
        self._send_flight()

    def send_application_data(self, data: bytes) -> None:
        if self._state is not _State.CONNECTED:
            raise RuntimeError("the DTLS handshake is not complete")
        for start in range(0, max(len(data), 1), self._max_plaintext()):
            chunk = data[start:start + self._max_plaintext()]
            self._send_record(ContentType.APPLICATION_DATA, chunk)

    def send_ekt_key(self, params: EktParameterSet, now: float) -> None:
        """Server: send (or replace) the EKTKey and retransmit it until ACKed (RFC 8870 s5.2.2)."""
        if self.role is not Role.SERVER or self._state is not _State.CONNECTED:
            raise RuntimeError("EKTKey is sent by a connected server")
        if self._ekt_cipher is None:
            raise RuntimeError("EKT was not negotiated on this association")
        if params.cipher != self._ekt_cipher:
            raise ValueError("EKTKey cipher differs from the negotiated EKT cipher")
        message = _OutMessage(ContentType.HANDSHAKE, 1, HandshakeType.EKT_KEY,
                              self._next_send_seq, encode_ekt_key(params))
        self._next_send_seq += 1
        # An EKTKey not yet acknowledged stays in the flight: the client delivers
        # handshake messages in order, so the new one needs it.
        self._flight = [*self._flight, message] if self._ekt_pending is not None else [message]
        self._ekt_pending = (params.spi, [])
        self._start_timer(now)
        self._send_flight()

    def export_keying_material(self, label: bytes, length: int,
                               context: bytes | None = None) -> bytes:
        """RFC 5705 exporter; only after the handshake."""
        if not self._master_secret or self._suite is None:
            raise RuntimeError("no master secret yet")
        return export_keying_material(self._suite.hash_name, self._master_secret,
                                      self._client_random, self._server_random, label, length,
                                      context)

    def close(self) -> None:
        """Send close_notify and end the association."""
        if self._state is _State.CLOSED:
            return
        self._send_alert(AlertLevel.WARNING, AlertDescription.CLOSE_NOTIFY)
        self._close(AlertDescription.CLOSE_NOTIFY, "closed locally", by_peer=False,
                    cause="closed_locally")

    # -- input ---------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, now: float) -> None:
        if self._state is _State.CLOSED:
            return
        try:
            for record in parse_records(data):
                self._receive_record(record, now)
                if self._state is _State.CLOSED:
                    return
            self._after_input(now)
        except DtlsError as e:
            self._fail(e)

    def _receive_record(self, record: Record, now: float) -> None:
        epoch = record.epoch
        if epoch > 1:
            return  # we never renegotiate: no epoch 2
        if self._state is _State.SERVER_WAIT_HELLO:
            # Stateless until a ClientHello with a valid cookie (RFC 6347 s4.2.1):
            # nothing else is looked at, nothing is kept, nothing malformed answered.
            if epoch == 0 and record.content_type == ContentType.HANDSHAKE:
                self._server_receive_initial(record, now)
            return
        if epoch == 0 and self._read_epoch == 1:
            self._receive_old_epoch(record)
            return
        if epoch > self._read_epoch:
            # Epoch 1 before the ChangeCipherSpec (reordered or CCS lost): keep it.
            if len(self._early_records) < _MAX_EARLY_RECORDS:
                self._early_records.append(record)
            return
        window = self._replay[epoch]
        if window.seen(record.sequence_number):
            return
        if epoch == 0:
            payload = record.fragment
        else:
            payload = self._read_protection.open(record)  # type: ignore[union-attr]
            if payload is None:
                return  # bad record MAC: discard silently (RFC 6347 s4.1.2.7)
        window.add(record.sequence_number)
        content_type = record.content_type
        if content_type == ContentType.HANDSHAKE:
            self._receive_handshake(payload, record, now)
        elif content_type == ContentType.CHANGE_CIPHER_SPEC:
            self._receive_change_cipher_spec(payload, now)
        elif content_type == ContentType.ALERT:
            self._receive_alert(payload)
        elif content_type == ContentType.APPLICATION_DATA:
            if epoch == 1 and self._state is _State.CONNECTED and payload:
                self._events.append(ApplicationDataReceived(payload))
        elif content_type == ContentType.ACK:
            if epoch == 1:
                self._receive_ack(payload)
        # other content types: ignored (RFC 5246 s6)

    def _receive_old_epoch(self, record: Record) -> None:
        """Epoch 0 after the switch: unauthenticated, so it can only tell us that
        the peer is retransmitting its previous flight (ours was lost, s4.2.4).
        A forged or malformed record here can never end the association."""
        if record.content_type != ContentType.HANDSHAKE:
            return
        try:
            fragments = hs.parse_handshake_fragments(record.fragment)
        except DtlsError:
            return
        if any(f.message_seq < self._reassembler.next_seq for f in fragments):
            self._reassembler.saw_retransmission = True

    def _receive_change_cipher_spec(self, payload: bytes, now: float) -> None:
        if payload != b"\x01":
            raise DecodeError("malformed ChangeCipherSpec")
        if self._pending_read is None:
            # A retransmitted CCS, or one that overtook the key exchange (whose
            # datagram was lost): ignore it; the peer's retransmitted flight brings
            # it again in order (RFC 6347 s4.2.4).
            return
        self._read_protection, self._pending_read = self._pending_read, None
        self._read_epoch = 1
        early, self._early_records = self._early_records, []
        for record in early:
            self._receive_record(record, now)

    def _receive_alert(self, payload: bytes) -> None:
        try:
            level, description = hs.decode_alert(payload)
        except DtlsError:
            return
        if description == AlertDescription.CLOSE_NOTIFY:
            if self._state is not _State.CLOSED:
                self._send_alert(AlertLevel.WARNING, AlertDescription.CLOSE_NOTIFY)
            self._close(description, "peer sent close_notify", by_peer=True,
                        cause="close_notify")
        elif level == AlertLevel.FATAL:
            try:
                name = AlertDescription(description).name
            except ValueError:
                name = str(description)
            self._close(description, f"peer sent fatal alert {name}", by_peer=True,
                        cause="peer_alert")

    def _receive_ack(self, payload: bytes) -> None:
        if self._ekt_pending is None:
            return
        try:
            acked = set(hs.decode_ack(payload))
        except DtlsError:
            return
        spi, transmissions = self._ekt_pending
        # Acknowledged once every record of one transmission is (RFC 9147 s7).
        if any(records and records <= acked for records in transmissions):
            self._ekt_pending = None
            self._flight = []
            self._stop_timer()
            self._events.append(EktKeyAcknowledged(spi))

    def _receive_handshake(self, payload: bytes, record: Record, now: float) -> None:
        fragments = hs.parse_handshake_fragments(payload)
        for fragment in fragments:
            if (fragment.msg_type == HandshakeType.EKT_KEY and self.role is Role.CLIENT
                    and record.epoch == 1):
                # Record numbers to acknowledge (RFC 9147 s7); the latest few suffice.
                self._ekt_records = [*self._ekt_records[-(_MAX_ACKED_RECORDS - 1):],
                                     (record.epoch, record.sequence_number)]
            self._reassembler.add(fragment)
        while True:
            message = self._reassembler.pop()
            if message is None:
                break
            msg_type, message_seq, body = message
            self._handle_message(msg_type, message_seq, body, now)
            if self._state is _State.CLOSED:
                return

    def _after_input(self, now: float) -> None:
        if self._reassembler.saw_retransmission:
            self._reassembler.saw_retransmission = False
            # The peer retransmitted its previous flight: ours was lost (s4.2.4).
            if self.role is Role.CLIENT and self._ekt_records and self._state is _State.CONNECTED:
                self._send_record(ContentType.ACK, hs.encode_ack(self._ekt_records))
            elif self._state is _State.CONNECTED:
                self._send_messages(self._final_flight)
            elif self._flight:
                self._send_flight()

    # -- handshake messages -------------------------------------------------------------

    def _handle_message(self, msg_type: int, message_seq: int, body: bytes, now: float) -> None:
        state = self._state
        full = hs.full_message(msg_type, message_seq, body)
        if state is _State.CONNECTED:
            self._handle_post_handshake(msg_type, body, now)
            return
        handler = _HANDLERS.get((state, msg_type))
        if handler is None:
            raise UnexpectedMessage(f"{_name(msg_type)} in state {state.name}")
        handler(self, body, full, now)

    def _handle_post_handshake(self, msg_type: int, body: bytes, now: float) -> None:
        if msg_type == HandshakeType.EKT_KEY and self.role is Role.CLIENT:
            if self._ekt_cipher is None:
                raise UnexpectedMessage("EKTKey without negotiated EKT")
            try:
                params = decode_ekt_key(body, EktCipher(self._ekt_cipher))
            except EktError as e:
                raise IllegalParameter(f"bad EKTKey: {e}") from None
            self._send_record(ContentType.ACK, hs.encode_ack(self._ekt_records))
            self._events.append(EktKeyReceived(params))
            return
        if msg_type in (HandshakeType.CLIENT_HELLO, HandshakeType.HELLO_REQUEST):
            self._send_alert(AlertLevel.WARNING, AlertDescription.NO_RENEGOTIATION)
            return
        raise UnexpectedMessage(f"{_name(msg_type)} after the handshake")

    # client side

    def _send_client_hello(self, cookie: bytes, now: float) -> None:
        config = self.config
        extensions = [
            (ExtensionType.SUPPORTED_GROUPS, hs.encode_supported_groups(config.groups)),
            (ExtensionType.EC_POINT_FORMATS, hs.encode_ec_point_formats([0])),
            (ExtensionType.SIGNATURE_ALGORITHMS,
             hs.encode_signature_algorithms(_OUR_SIGNATURE_SCHEMES)),
            (ExtensionType.EXTENDED_MASTER_SECRET, b""),
            (ExtensionType.RENEGOTIATION_INFO, hs.encode_renegotiation_info(b"")),
        ]
        if config.srtp_profiles:
            extensions.append((ExtensionType.USE_SRTP, hs.encode_use_srtp(config.srtp_profiles)))
        if config.ekt_ciphers:
            extensions.append((ExtensionType.SUPPORTED_EKT_CIPHERS,
                               hs.encode_ekt_ciphers_client(config.ekt_ciphers)))
        if config.external_session_id is not None:
            extensions.append((ExtensionType.EXTERNAL_SESSION_ID,
                               hs.encode_external_session_id(config.external_session_id)))
        hello = hs.ClientHello(DTLS_1_2, self._client_random, b"", cookie,
                               list(config.cipher_suites), [0], extensions)
        self._client_hello = hello
        self._transcript.clear()
        body = hello.encode()
        self._transcript += hs.full_message(HandshakeType.CLIENT_HELLO, self._next_send_seq, body)
        self._new_flight([self._handshake_message(HandshakeType.CLIENT_HELLO, body)], now)

    def _client_hello_verify(self, body: bytes, full: bytes, now: float) -> None:
        request = hs.HelloVerifyRequest.decode(body)
        self._hello_verify_requests += 1
        if self._hello_verify_requests > _MAX_HELLO_VERIFY_REQUESTS:
            raise HandshakeFailure("too many HelloVerifyRequests (cookie never accepted)")
        if request.version not in (DTLS_1_0, DTLS_1_2):
            raise ProtocolVersionError("HelloVerifyRequest for an unsupported version")
        if not request.cookie:
            raise IllegalParameter("empty cookie in HelloVerifyRequest")
        # A stateless server numbers its records afresh after the cookie exchange.
        self._replay[0] = ReplayWindow()
        self._send_client_hello(request.cookie, now)  # transcript restarts (s4.2.1)

    def _client_server_hello(self, body: bytes, full: bytes, now: float) -> None:
        hello = hs.ServerHello.decode(body)
        config = self.config
        if hello.version != DTLS_1_2:
            raise ProtocolVersionError("server did not choose DTLS 1.2")
        if hello.cipher_suite not in config.cipher_suites:
            raise IllegalParameter("server chose a cipher suite we did not offer")
        if hello.compression_method != 0:
            raise IllegalParameter("server chose compression")
        offered = {t for t, _ in self._client_hello.extensions}  # type: ignore[union-attr]
        for ext_type, _data in hello.extensions:
            if ext_type not in offered:
                raise _unsupported_extension(ext_type)
        ems = hs.find_extension(hello.extensions, ExtensionType.EXTENDED_MASTER_SECRET)
        if ems is None:
            raise HandshakeFailure("server does not support the extended master secret")
        hs.decode_empty(ems)
        ri = hs.find_extension(hello.extensions, ExtensionType.RENEGOTIATION_INFO)
        if ri is not None and hs.decode_renegotiation_info(ri) != b"":
            raise HandshakeFailure("non-empty renegotiation_info in an initial handshake")
        srtp = hs.find_extension(hello.extensions, ExtensionType.USE_SRTP)
        if srtp is not None:
            profiles, mki = hs.decode_use_srtp(srtp)
            if len(profiles) != 1 or profiles[0] not in config.srtp_profiles or mki:
                raise IllegalParameter("server's use_srtp answer is not one offered profile")
            self._srtp_profile = profiles[0]
        elif config.srtp_profiles:
            raise HandshakeFailure("server did not agree on an SRTP protection profile")
        ekt = hs.find_extension(hello.extensions, ExtensionType.SUPPORTED_EKT_CIPHERS)
        if ekt is not None:
            cipher = hs.decode_ekt_cipher_server(ekt)
            if cipher not in config.ekt_ciphers:
                raise IllegalParameter("server chose an EKT cipher we did not offer")
            self._ekt_cipher = int(cipher)
        elif config.ekt_ciphers:
            raise HandshakeFailure("server did not agree on an EKT cipher")
        esi = hs.find_extension(hello.extensions, ExtensionType.EXTERNAL_SESSION_ID)
        self._peer_external_session_id = (hs.decode_external_session_id(esi)
                                          if esi is not None else None)
        self._check_peer_external_session_id()
        self._server_random = hello.random
        self._cipher_suite = hello.cipher_suite
        self._suite = SUITES[CipherSuite(hello.cipher_suite)]
        self._transcript += full
        self._stop_timer()
        self._state = _State.CLIENT_WAIT_CERTIFICATE

    def _client_certificate(self, body: bytes, full: bytes, now: float) -> None:
        self._receive_peer_certificate(hs.Certificate.decode(body))
        self._transcript += full
        self._state = _State.CLIENT_WAIT_KEY_EXCHANGE

    def _client_server_key_exchange(self, body: bytes, full: bytes, now: float) -> None:
        message = hs.ServerKeyExchange.decode(body)
        if message.named_group not in self.config.groups:
            raise IllegalParameter("server chose a group we did not offer")
        if message.signature_scheme not in _OUR_SIGNATURE_SCHEMES:
            raise IllegalParameter("server signed with a scheme we did not offer")
        verify(self._peer_key, message.signature_scheme, message.signature,  # type: ignore[arg-type]
               self._client_random + self._server_random + message.params())
        self._key_share = KeyShare(message.named_group)
        self._peer_key_share = message.public_key
        self._transcript += full
        self._state = _State.CLIENT_WAIT_REQUEST_OR_DONE

    def _client_certificate_request(self, body: bytes, full: bytes, now: float) -> None:
        request = hs.CertificateRequest.decode(body)
        if hs.ClientCertificateType.ECDSA_SIGN not in request.certificate_types:
            raise HandshakeFailure("server does not accept ECDSA client certificates")
        scheme = signature_scheme_for(self.config.private_key)
        if scheme not in request.signature_schemes:
            raise HandshakeFailure("server does not accept our signature scheme")
        self._certificate_requested = True
        self._transcript += full
        self._state = _State.CLIENT_WAIT_DONE

    def _client_server_hello_done(self, body: bytes, full: bytes, now: float) -> None:
        hs.decode_empty(body)
        if not self._certificate_requested:
            # WebRTC / RFC 9185: the KD authenticates the endpoint by its certificate.
            raise HandshakeFailure("server did not request our certificate")
        self._transcript += full
        config = self.config
        key_share = self._key_share
        assert key_share is not None and self._suite is not None
        pre_master = key_share.shared_secret(self._peer_key_share)
        flight: list[_OutMessage] = []
        self._append(flight, HandshakeType.CERTIFICATE,
                     hs.Certificate([config.certificate]).encode())
        self._append(flight, HandshakeType.CLIENT_KEY_EXCHANGE,
                     hs.ClientKeyExchange(key_share.public_bytes).encode())
        self._derive_keys(pre_master)  # session hash: up to ClientKeyExchange (RFC 7627)
        scheme = signature_scheme_for(config.private_key)
        self._append(flight, HandshakeType.CERTIFICATE_VERIFY, hs.CertificateVerify(
            scheme, sign(config.private_key, scheme, bytes(self._transcript))).encode())
        flight.append(_OutMessage(ContentType.CHANGE_CIPHER_SPEC, 0))
        self._append(flight, HandshakeType.FINISHED,
                     hs.Finished(self._verify_data(b"client finished")).encode(), epoch=1)
        self._new_flight(flight, now)
        self._state = _State.CLIENT_WAIT_FINISHED

    def _client_finished(self, body: bytes, full: bytes, now: float) -> None:
        if self._read_epoch != 1:
            raise UnexpectedMessage("Finished before ChangeCipherSpec")
        finished = hs.Finished.decode(body)
        if not hmac.compare_digest(finished.verify_data, self._verify_data(b"server finished")):
            raise DecryptError("server Finished does not verify")
        self._transcript += full
        self._flight = []
        self._stop_timer()
        self._complete()

    # server side

    def _server_receive_initial(self, record: Record, now: float) -> None:
        """ClientHello processing that keeps no state until the cookie checks (s4.2.1).

        Anything malformed before that point is dropped without an answer: it
        may be spoofed, and answering would let anyone close this association.
        """
        try:
            fragments = hs.parse_handshake_fragments(record.fragment)
            hello_fragment = next((f for f in fragments
                                   if f.msg_type == HandshakeType.CLIENT_HELLO), None)
            if (hello_fragment is None or hello_fragment.fragment_offset != 0
                    or len(hello_fragment.body) != hello_fragment.length):
                return  # a fragmented first ClientHello is not accepted (no state yet)
            hello = hs.ClientHello.decode(hello_fragment.body)
        except DtlsError:
            return
        secret = self.config.cookie_secret
        if secret is not None:
            expected = self._cookie(secret, hello)
            if not hmac.compare_digest(hello.cookie, expected):
                verify_request = hs.HelloVerifyRequest(DTLS_1_0, expected).encode()
                fragment = hs.HandshakeFragment(HandshakeType.HELLO_VERIFY_REQUEST,
                                                len(verify_request), hello_fragment.message_seq,
                                                0, verify_request)
                # Same record sequence number as the ClientHello: stateless (s4.2.1).
                self._out.append(encode_record(ContentType.HANDSHAKE, DTLS_1_0, 0,
                                               record.sequence_number, fragment.encode()))
                return
        # Accepted: from here on the association has state.
        self._replay[0].add(record.sequence_number)
        self._reassembler.next_seq = hello_fragment.message_seq + 1
        self._next_send_seq = hello_fragment.message_seq
        # Continue from the ClientHello's record number: the stateless
        # HelloVerifyRequest reused an earlier one (RFC 6347 s4.2.1).
        self._write_seq[0] = record.sequence_number
        self._server_client_hello(hello, hs.full_message(HandshakeType.CLIENT_HELLO,
                                                         hello_fragment.message_seq,
                                                         hello_fragment.body), now)
        for fragment in fragments:
            if fragment is not hello_fragment:
                self._reassembler.add(fragment)

    def _cookie(self, secret: bytes, hello: hs.ClientHello) -> bytes:
        material = self.config.peer_id + replace(hello, cookie=b"").encode()
        return hmac.digest(secret, material, "sha256")[:_COOKIE_LENGTH]

    def _server_client_hello(self, hello: hs.ClientHello, full: bytes, now: float) -> None:
        config = self.config
        if hello.version > DTLS_1_2 or hello.version >> 8 != 0xFE:  # lower is newer in DTLS
            raise ProtocolVersionError("client does not offer DTLS 1.2")
        if 0 not in hello.compression_methods:
            raise IllegalParameter("client does not offer null compression")
        suite = next((s for s in config.cipher_suites if s in hello.cipher_suites), None)
        if suite is None:
            raise HandshakeFailure("no common cipher suite")
        extensions = hello.extensions
        if hs.find_extension(extensions, ExtensionType.EXTENDED_MASTER_SECRET) is None:
            raise HandshakeFailure("client does not support the extended master secret")
        ri = hs.find_extension(extensions, ExtensionType.RENEGOTIATION_INFO)
        if ri is not None and hs.decode_renegotiation_info(ri) != b"":
            raise HandshakeFailure("non-empty renegotiation_info in an initial handshake")
        groups_ext = hs.find_extension(extensions, ExtensionType.SUPPORTED_GROUPS)
        client_groups = (hs.decode_supported_groups(groups_ext) if groups_ext is not None
                         else [NamedGroup.SECP256R1])
        group = next((g for g in config.groups if g in client_groups), None)
        if group is None:
            raise HandshakeFailure("no common ECDHE group")
        sig_ext = hs.find_extension(extensions, ExtensionType.SIGNATURE_ALGORITHMS)
        our_scheme = signature_scheme_for(config.private_key)
        if sig_ext is not None and our_scheme not in hs.decode_signature_algorithms(sig_ext):
            raise HandshakeFailure("client does not accept our signature scheme")
        answer: list[tuple[int, bytes]] = [
            (ExtensionType.EXTENDED_MASTER_SECRET, b""),
            (ExtensionType.RENEGOTIATION_INFO, hs.encode_renegotiation_info(b"")),
        ]
        if hs.find_extension(extensions, ExtensionType.EC_POINT_FORMATS) is not None:
            answer.append((ExtensionType.EC_POINT_FORMATS, hs.encode_ec_point_formats([0])))
        srtp_ext = hs.find_extension(extensions, ExtensionType.USE_SRTP)
        if config.srtp_profiles:
            if srtp_ext is None:
                raise NoCommonSrtpProfile("client did not offer use_srtp")
            profiles, mki = hs.decode_use_srtp(srtp_ext)
            if mki:
                raise IllegalParameter("SRTP MKI is not supported (and forbidden with EKT)")
            profile = next((p for p in config.srtp_profiles if p in profiles), None)
            if profile is None:
                raise NoCommonSrtpProfile("no common SRTP protection profile")
            self._srtp_profile = int(profile)
            answer.append((ExtensionType.USE_SRTP, hs.encode_use_srtp([profile])))
        ekt_ext = hs.find_extension(extensions, ExtensionType.SUPPORTED_EKT_CIPHERS)
        if config.ekt_ciphers:
            offered = hs.decode_ekt_ciphers_client(ekt_ext) if ekt_ext is not None else []
            cipher = next((c for c in config.ekt_ciphers if c in offered), None)
            if cipher is None:
                raise NoCommonEktCipher("no common EKT cipher")
            self._ekt_cipher = int(cipher)
            answer.append((ExtensionType.SUPPORTED_EKT_CIPHERS,
                           hs.encode_ekt_cipher_server(cipher)))
        esi = hs.find_extension(extensions, ExtensionType.EXTERNAL_SESSION_ID)
        if esi is not None:
            self._peer_external_session_id = hs.decode_external_session_id(esi)
            if config.external_session_id is not None:
                answer.append((ExtensionType.EXTERNAL_SESSION_ID,
                               hs.encode_external_session_id(config.external_session_id)))
        self._check_peer_external_session_id()
        self._client_hello = hello
        self._client_random = hello.random
        self._server_random = os.urandom(32)
        self._cipher_suite = int(suite)
        self._suite = SUITES[CipherSuite(suite)]
        self._transcript = bytearray(full)
        # Flight 4: ServerHello, Certificate, ServerKeyExchange, CertificateRequest, Done.
        flight = []
        server_hello = hs.ServerHello(DTLS_1_2, self._server_random, b"", suite, 0, answer)
        self._append(flight, HandshakeType.SERVER_HELLO, server_hello.encode())
        self._append(flight, HandshakeType.CERTIFICATE,
                     hs.Certificate([config.certificate]).encode())
        self._key_share = KeyShare(group)
        params = hs.ServerKeyExchange(group, self._key_share.public_bytes, our_scheme, b"")
        signature = sign(config.private_key, our_scheme,
                         self._client_random + self._server_random + params.params())
        self._append(flight, HandshakeType.SERVER_KEY_EXCHANGE,
                     replace(params, signature=signature).encode())
        self._append(flight, HandshakeType.CERTIFICATE_REQUEST,
                     hs.CertificateRequest([hs.ClientCertificateType.ECDSA_SIGN],
                                           list(_OUR_SIGNATURE_SCHEMES), []).encode())
        self._append(flight, HandshakeType.SERVER_HELLO_DONE, b"")
        self._new_flight(flight, now)
        self._state = _State.SERVER_WAIT_CERTIFICATE

    def _server_certificate(self, body: bytes, full: bytes, now: float) -> None:
        self._receive_peer_certificate(hs.Certificate.decode(body))
        self._stop_timer()
        self._transcript += full
        self._state = _State.SERVER_WAIT_KEY_EXCHANGE

    def _server_client_key_exchange(self, body: bytes, full: bytes, now: float) -> None:
        message = hs.ClientKeyExchange.decode(body)
        assert self._key_share is not None
        pre_master = self._key_share.shared_secret(message.public_key)
        self._transcript += full
        self._derive_keys(pre_master)
        self._state = _State.SERVER_WAIT_CERTIFICATE_VERIFY

    def _server_certificate_verify(self, body: bytes, full: bytes, now: float) -> None:
        message = hs.CertificateVerify.decode(body)
        if message.signature_scheme not in _OUR_SIGNATURE_SCHEMES:
            raise IllegalParameter("client signed with a scheme we did not offer")
        verify(self._peer_key, message.signature_scheme, message.signature,  # type: ignore[arg-type]
               bytes(self._transcript))
        self._transcript += full
        self._state = _State.SERVER_WAIT_FINISHED

    def _server_finished(self, body: bytes, full: bytes, now: float) -> None:
        if self._read_epoch != 1:
            raise UnexpectedMessage("Finished before ChangeCipherSpec")
        finished = hs.Finished.decode(body)
        if not hmac.compare_digest(finished.verify_data, self._verify_data(b"client finished")):
            raise DecryptError("client Finished does not verify")
        self._transcript += full
        flight = [_OutMessage(ContentType.CHANGE_CIPHER_SPEC, 0)]
        self._append(flight, HandshakeType.FINISHED,
                     hs.Finished(self._verify_data(b"server finished")).encode(), epoch=1)
        # The last flight has no timer: it is resent when the client repeats its
        # own (s4.2.4); the timer is free for the EKTKey.
        self._final_flight = flight
        self._flight = []
        self._stop_timer()
        self._send_messages(flight)
        self._complete()

    # -- shared handshake pieces ----------------------------------------------------------

    def _receive_peer_certificate(self, message: hs.Certificate) -> None:
        if not message.certificates:
            raise HandshakeFailure("peer sent no certificate")
        certificate = message.certificates[0]
        fingerprint = certificate_fingerprint(certificate)
        expected = self.config.expected_peer_fingerprint
        if expected is not None and not hmac.compare_digest(fingerprint, expected):
            raise FingerprintMismatch("peer certificate does not match the expected fingerprint")
        self._peer_key = peer_public_key(certificate)
        self._peer_certificate = certificate

    def _check_peer_external_session_id(self) -> None:
        expected = self.config.expected_peer_external_session_id
        if expected is not None and self._peer_external_session_id != expected:
            raise ExternalSessionIdMismatch(
                "external_session_id does not match the signalled tls-id")

    def _derive_keys(self, pre_master: bytes) -> None:
        suite = self._suite
        assert suite is not None
        session_hash = hashlib.new(suite.hash_name, bytes(self._transcript)).digest()
        self._master_secret = extended_master_secret(suite.hash_name, pre_master, session_hash)
        client_key, server_key, client_iv, server_iv = key_block(
            suite, self._master_secret, self._client_random, self._server_random)
        ours, theirs = ((client_key, client_iv), (server_key, server_iv))
        if self.role is Role.SERVER:
            ours, theirs = theirs, ours
        self._write_protection = GcmProtection(*ours)
        self._pending_read = GcmProtection(*theirs)

    def _verify_data(self, label: bytes) -> bytes:
        suite = self._suite
        assert suite is not None
        return verify_data(suite.hash_name, self._master_secret, label,
                           hashlib.new(suite.hash_name, bytes(self._transcript)).digest())

    def _complete(self) -> None:
        self._state = _State.CONNECTED
        self._retransmissions = 0
        profile = self._srtp_profile
        material = b""
        if profile is not None and profile in SRTP_KEYING_MATERIAL_LENGTH:
            material = self.export_keying_material(
                SRTP_EXPORTER_LABEL, SRTP_KEYING_MATERIAL_LENGTH[Profile(profile)])
        self._events.append(HandshakeComplete(
            srtp_profile=profile, keying_material=material,
            peer_certificate=self._peer_certificate,
            peer_fingerprint=certificate_fingerprint(self._peer_certificate),
            cipher_suite=self._cipher_suite, ekt_cipher=self._ekt_cipher,
            peer_external_session_id=self._peer_external_session_id))
        self._key_share = None

    # -- output ---------------------------------------------------------------------------

    def _handshake_message(self, msg_type: int, body: bytes, epoch: int = 0) -> _OutMessage:
        message = _OutMessage(ContentType.HANDSHAKE, epoch, msg_type, self._next_send_seq, body)
        self._next_send_seq += 1
        return message

    def _append(self, flight: list[_OutMessage], msg_type: int, body: bytes,
                epoch: int = 0) -> None:
        """Add a handshake message to ``flight`` and to the transcript."""
        message = self._handshake_message(msg_type, body, epoch)
        flight.append(message)
        self._transcript += hs.full_message(msg_type, message.message_seq, body)

    def _new_flight(self, flight: list[_OutMessage], now: float) -> None:
        self._flight = flight
        self._start_timer(now)
        self._send_flight()

    def _start_timer(self, now: float) -> None:
        self._timeout = self.config.initial_retransmit
        self._retransmissions = 0
        self._timer = now + self._timeout

    def _stop_timer(self) -> None:
        self._timer = None

    def _max_plaintext(self) -> int:
        overhead = RECORD_HEADER_LENGTH + (AEAD_OVERHEAD if self._write_epoch else 0)
        return min(self.config.mtu - overhead, MAX_PLAINTEXT_LENGTH)

    def _send_flight(self) -> None:
        """(Re)send the timer-driven flight."""
        if self._ekt_pending is not None and self._flight:
            self._ekt_pending[1].append(set())  # records of this transmission
        self._send_messages(self._flight)

    def _send_messages(self, flight: list[_OutMessage]) -> None:
        """Send ``flight`` with fresh record numbers, packed into datagrams <= ``mtu``."""
        datagram = b""
        mtu = self.config.mtu
        for message in flight:
            if message.content_type == ContentType.CHANGE_CIPHER_SPEC:
                records = [self._encode(ContentType.CHANGE_CIPHER_SPEC, 0, b"\x01")]
            else:
                overhead = RECORD_HEADER_LENGTH + hs.HANDSHAKE_HEADER_LENGTH + (
                    AEAD_OVERHEAD if message.epoch else 0)
                records = []
                for fragment in hs.fragment_message(message.msg_type, message.message_seq,
                                                    message.body, mtu - overhead):
                    records.append(self._encode(ContentType.HANDSHAKE, message.epoch,
                                                fragment.encode()))
            for record in records:
                if datagram and len(datagram) + len(record) > mtu:
                    self._out.append(datagram)
                    datagram = b""
                datagram += record
        if datagram:
            self._out.append(datagram)

    def _encode(self, content_type: int, epoch: int, payload: bytes) -> bytes:
        """One record in ``epoch`` (0: clear, 1: protected) with the next sequence number."""
        seq = self._write_seq[epoch]
        self._write_seq[epoch] = seq + 1
        if epoch == 0:
            return encode_record(content_type, DTLS_1_2, 0, seq, payload)
        protection = self._write_protection
        assert protection is not None
        self._write_epoch = 1
        if (content_type == ContentType.HANDSHAKE and self._ekt_pending is not None
                and payload[0] == HandshakeType.EKT_KEY):  # not a resent final flight
            self._ekt_pending[1][-1].add((1, seq))
        return encode_record(content_type, DTLS_1_2, 1, seq,
                             protection.seal(content_type, DTLS_1_2, 1, seq, payload))

    def _send_record(self, content_type: int, payload: bytes) -> None:
        epoch = 1 if self._write_protection is not None and self._write_epoch == 1 else 0
        self._out.append(self._encode(content_type, epoch, payload))

    def _send_alert(self, level: int, description: int) -> None:
        self._send_record(ContentType.ALERT, hs.encode_alert(level, description))

    def _fail(self, error: DtlsError) -> None:
        if self._state is _State.CLOSED:
            return
        self._send_alert(AlertLevel.FATAL, error.alert)
        self._close(error.alert, str(error), by_peer=False, cause=error.reason)

    def _close(self, alert: int | None, reason: str, by_peer: bool, *, cause: str) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._timer = None
        self._flight = []
        self._key_share = None
        self._events.append(ConnectionClosed(alert, reason, by_peer, cause))


def _name(msg_type: int) -> str:
    try:
        return HandshakeType(msg_type).name
    except ValueError:
        return f"handshake type {msg_type}"


class _UnsupportedExtension(IllegalParameter):
    alert = AlertDescription.UNSUPPORTED_EXTENSION


def _unsupported_extension(ext_type: int) -> DtlsError:
    return _UnsupportedExtension(f"server sent extension {ext_type} we did not offer")


_Handler = Callable[[DtlsConnection, bytes, bytes, float], None]
_HANDLERS: dict[tuple[_State, int], _Handler] = {
    (_State.CLIENT_WAIT_HELLO, HandshakeType.HELLO_VERIFY_REQUEST):
        DtlsConnection._client_hello_verify,
    (_State.CLIENT_WAIT_HELLO, HandshakeType.SERVER_HELLO): DtlsConnection._client_server_hello,
    (_State.CLIENT_WAIT_CERTIFICATE, HandshakeType.CERTIFICATE):
        DtlsConnection._client_certificate,
    (_State.CLIENT_WAIT_KEY_EXCHANGE, HandshakeType.SERVER_KEY_EXCHANGE):
        DtlsConnection._client_server_key_exchange,
    (_State.CLIENT_WAIT_REQUEST_OR_DONE, HandshakeType.CERTIFICATE_REQUEST):
        DtlsConnection._client_certificate_request,
    (_State.CLIENT_WAIT_REQUEST_OR_DONE, HandshakeType.SERVER_HELLO_DONE):
        DtlsConnection._client_server_hello_done,
    (_State.CLIENT_WAIT_DONE, HandshakeType.SERVER_HELLO_DONE):
        DtlsConnection._client_server_hello_done,
    (_State.CLIENT_WAIT_FINISHED, HandshakeType.FINISHED): DtlsConnection._client_finished,
    (_State.SERVER_WAIT_CERTIFICATE, HandshakeType.CERTIFICATE):
        DtlsConnection._server_certificate,
    (_State.SERVER_WAIT_KEY_EXCHANGE, HandshakeType.CLIENT_KEY_EXCHANGE):
        DtlsConnection._server_client_key_exchange,
    (_State.SERVER_WAIT_CERTIFICATE_VERIFY, HandshakeType.CERTIFICATE_VERIFY):
        DtlsConnection._server_certificate_verify,
    (_State.SERVER_WAIT_FINISHED, HandshakeType.FINISHED): DtlsConnection._server_finished,
}
