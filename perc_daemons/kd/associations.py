"""The Key Distributor's association manager, sans-I/O (RFC 8871, RFC 9185).

:class:`KeyDistributorCore` terminates the endpoints' DTLS-SRTP handshakes
that the MD tunnels to the KD.  Tunnel messages and explicit time in, tunnel
messages out; no sockets, no Twisted, no clock of its own.

* An association is admitted only if :meth:`KeyDistributorCore.expect` named
  it first (from a verified SignAnswer): its server :class:`DtlsConnection`
  requires the client certificate to have the signalled fingerprint and the
  ClientHello's external_session_id to be the signalled tls-id, so no key is
  derived, let alone sent, for anyone else.  A datagram for any other
  association is answered with EndpointDisconnect and leaves no state.
* On HandshakeComplete the MD gets MediaKeys with the *outer* (hop-by-hop)
  halves of the DOUBLE keying material only, then the endpoint gets the
  conference's current EKTKey.
* Each conference has numbered epochs (1, 2, ...); the key source gives the
  EKT parameter set of each and must change the SPI every epoch.  A member
  that leaves (EndpointDisconnect from the MD, close_notify, alert or
  retransmissions exhausted) starts a new epoch for the remaining members.
  Joining does not: a joiner gets the current epoch's key only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from perc_daemons.protocol.double import DOUBLE_PROFILES, split_keying_material
from perc_daemons.protocol.dtls import (
    ConnectionClosed,
    DtlsConfiguration,
    DtlsConnection,
    EktKeyAcknowledged,
    HandshakeComplete,
    Role,
)
from perc_daemons.protocol.ekt import EktCipher, EktParameterSet
from perc_daemons.protocol.srtp import Profile
from perc_daemons.protocol.tunnel import EndpointDisconnect, MediaKeys, TunneledDtls

#: What the core hands back: tunnel messages for the MD, in order.
TunnelMessage = MediaKeys | TunneledDtls | EndpointDisconnect
#: ``ekt_params_for(conference_id, epoch)``: the EKT parameter set of an epoch.
KeySource = Callable[[str, int], EktParameterSet]

DEFAULT_PROFILES = (Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM,
                    Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM)
#: The EKT cipher must be at least as strong as the SRTP cipher (RFC 8870 s6).
DEFAULT_EKT_CIPHERS: Mapping[int, EktCipher] = {
    Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM: EktCipher.AESKW_128,
    Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM: EktCipher.AESKW_256,
}


@dataclass
class _Association:
    association_id: bytes
    conference_id: str
    identity: str
    fingerprint: bytes
    tls_id: bytes
    connection: DtlsConnection | None = None
    member: bool = False  # handshake complete, keys sent
    acknowledged_spis: list[int] = field(default_factory=list)


@dataclass
class _Conference:
    epoch: int = 0
    params: EktParameterSet | None = None
    spis: set[int] = field(default_factory=set)


class KeyDistributorCore:
    """Every tunnelled DTLS association of one KD, and each conference's epochs."""

    def __init__(self, certificate: bytes, private_key: ec.EllipticCurvePrivateKey,
                 tls_id: bytes, cookie_secret: bytes, ekt_params_for: KeySource, *,
                 profiles: Sequence[int] = DEFAULT_PROFILES,
                 ekt_ciphers: Mapping[int, EktCipher] = DEFAULT_EKT_CIPHERS,
                 initial_retransmit: float = 1.0) -> None:
        if not profiles or any(p not in DOUBLE_PROFILES for p in profiles):
            raise ValueError("profiles must be a non-empty list of DOUBLE profiles")
        if any(p not in ekt_ciphers for p in profiles):
            raise ValueError("every profile needs an EKT cipher")
        if not 20 <= len(tls_id) <= 255:
            raise ValueError("tls_id must be 20 to 255 bytes")
        if len(cookie_secret) < 16:
            raise ValueError("cookie_secret must be at least 16 bytes")
        self._certificate = certificate
        self._private_key = private_key
        self._tls_id = tls_id
        self._cookie_secret = cookie_secret
        self._ekt_params_for = ekt_params_for
        self._profiles = [int(p) for p in profiles]
        self._ekt_ciphers = {int(p): EktCipher(c) for p, c in ekt_ciphers.items()}
        self._initial_retransmit = initial_retransmit
        self._associations: dict[bytes, _Association] = {}
        self._conferences: dict[str, _Conference] = {}

    # -- queries -----------------------------------------------------------------------

    def members(self, conference_id: str) -> list[tuple[str, bytes]]:
        """(identity, association id) of each keyed member, in join order."""
        return [(a.identity, a.association_id) for a in self._associations.values()
                if a.conference_id == conference_id and a.member]

    def epoch(self, conference_id: str) -> int:
        """The conference's current epoch; 0 before its first key."""
        conference = self._conferences.get(conference_id)
        return conference.epoch if conference is not None else 0

    def current_params(self, conference_id: str) -> EktParameterSet | None:
        conference = self._conferences.get(conference_id)
        return conference.params if conference is not None else None

    def acknowledged_spis(self, association_id: bytes) -> list[int]:
        """SPIs whose EKTKey the endpoint has acknowledged (RFC 8870 s5.2.2)."""
        association = self._associations.get(association_id)
        return list(association.acknowledged_spis) if association is not None else []

    def knows(self, association_id: bytes) -> bool:
        return association_id in self._associations

    def next_timer(self) -> float | None:
        timers = [t for a in self._associations.values() if a.connection is not None
                  if (t := a.connection.get_timer()) is not None]
        return min(timers) if timers else None

    # -- input -------------------------------------------------------------------------

    def expect(self, association_id: bytes, conference_id: str, identity: str,
               fingerprint: bytes, tls_id: bytes) -> None:
        """Admit an association, as learnt from the offer of a verified SignAnswer."""
        if not isinstance(association_id, bytes) or len(association_id) != 16:
            raise ValueError("association_id must be 16 bytes")
        if len(fingerprint) != 32:
            raise ValueError("fingerprint must be a SHA-256 digest (32 bytes)")
        if not 20 <= len(tls_id) <= 255:
            raise ValueError("tls_id must be 20 to 255 bytes")
        if not conference_id or not identity:
            raise ValueError("conference_id and identity must not be empty")
        existing = self._associations.get(association_id)
        if existing is not None and existing.connection is not None:
            raise ValueError("association already has a DTLS connection")
        self._associations[association_id] = _Association(
            association_id, conference_id, identity, fingerprint, tls_id)

    def tunneled_dtls(self, association_id: bytes, data: bytes,
                      now: float) -> list[TunnelMessage]:
        """A DTLS datagram the MD tunnelled for ``association_id``."""
        association = self._associations.get(association_id)
        if association is None:
            return [EndpointDisconnect(association_id)]
        if association.connection is None:
            connection = self._new_connection(association)
            if connection is None:
                del self._associations[association_id]
                return [EndpointDisconnect(association_id)]
            association.connection = connection
        association.connection.receive_datagram(data, now)
        return self._drain(association, now)

    def endpoint_disconnect(self, association_id: bytes, now: float) -> list[TunnelMessage]:
        """The MD says the endpoint left: forget it and rekey the rest (requirement e)."""
        association = self._associations.pop(association_id, None)
        if association is None:
            return []
        if association.connection is not None:
            association.connection.close()  # its close_notify has nowhere to go
        if association.member:
            return self.new_epoch(association.conference_id, now)
        return []

    def new_epoch(self, conference_id: str, now: float) -> list[TunnelMessage]:
        """Start the conference's next epoch and send its EKTKey to every member."""
        params = self._advance(conference_id)
        out: list[TunnelMessage] = []
        for association in list(self._associations.values()):
            if association.conference_id == conference_id and association.member:
                out += self._send_key(association, params, now)
        return out

    def end_conference(self, conference_id: str, now: float) -> list[TunnelMessage]:
        """Close every association of the conference and wipe its keys."""
        out: list[TunnelMessage] = []
        for association in list(self._associations.values()):
            if association.conference_id != conference_id:
                continue
            del self._associations[association.association_id]
            connection = association.connection
            if connection is not None:
                connection.close()
                out += [TunneledDtls(association.association_id, d)
                        for d in connection.datagrams_to_send(now)]
            out.append(EndpointDisconnect(association.association_id))
        self._conferences.pop(conference_id, None)
        return out

    def handle_timers(self, now: float) -> list[TunnelMessage]:
        out: list[TunnelMessage] = []
        for association in list(self._associations.values()):
            if self._associations.get(association.association_id) is not association:
                continue  # removed while handling an earlier one
            connection = association.connection
            if connection is None:
                continue
            timer = connection.get_timer()
            if timer is not None and now >= timer:
                connection.handle_timer(now)
                out += self._drain(association, now)
        return out

    # -- internals ---------------------------------------------------------------------

    def _advance(self, conference_id: str) -> EktParameterSet:
        conference = self._conferences.setdefault(conference_id, _Conference())
        epoch = conference.epoch + 1
        params = self._ekt_params_for(conference_id, epoch)
        if params.spi in conference.spis:
            raise ValueError(f"key source reused EKT SPI {params.spi} in {conference_id!r}")
        conference.epoch, conference.params = epoch, params
        conference.spis.add(params.spi)
        return params

    def _current(self, conference_id: str) -> EktParameterSet:
        conference = self._conferences.get(conference_id)
        if conference is None or conference.params is None:
            return self._advance(conference_id)
        return conference.params

    def _new_connection(self, association: _Association) -> DtlsConnection | None:
        cipher = self._current(association.conference_id).cipher
        profiles = [p for p in self._profiles if self._ekt_ciphers[p] == cipher]
        if not profiles:
            return None
        config = DtlsConfiguration(
            self._certificate, self._private_key,
            srtp_profiles=profiles,
            ekt_ciphers=[cipher],
            expected_peer_fingerprint=association.fingerprint,
            external_session_id=self._tls_id,
            expected_peer_external_session_id=association.tls_id,
            cookie_secret=self._cookie_secret,
            peer_id=association.association_id,
            initial_retransmit=self._initial_retransmit,
        )
        return DtlsConnection(Role.SERVER, config)

    def _send_key(self, association: _Association, params: EktParameterSet,
                  now: float) -> list[TunnelMessage]:
        connection = association.connection
        assert connection is not None
        connection.send_ekt_key(params, now)
        return self._drain(association, now)

    def _drain(self, association: _Association, now: float) -> list[TunnelMessage]:
        connection = association.connection
        assert connection is not None
        aid = association.association_id
        first: list[TunnelMessage] = []
        closed = False
        while (event := connection.next_event()) is not None:
            if isinstance(event, HandshakeComplete):
                media_keys = self._admit(association, event, now)
                if media_keys is None:
                    connection.close()
                else:
                    first.append(media_keys)
            elif isinstance(event, EktKeyAcknowledged):
                association.acknowledged_spis.append(event.spi)
            elif isinstance(event, ConnectionClosed):
                closed = True
        out = first + [TunneledDtls(aid, d) for d in connection.datagrams_to_send(now)]
        if closed:
            self._associations.pop(aid, None)
            out.append(EndpointDisconnect(aid))
            if association.member:
                # Even with nobody left: a later joiner must not get a key the
                # departed member knows.
                association.member = False
                out += self.new_epoch(association.conference_id, now)
        return out

    def _admit(self, association: _Association, event: HandshakeComplete,
               now: float) -> MediaKeys | None:
        """Keys for a finished handshake, or None to refuse it."""
        # DtlsConnection already enforced both; checked again before any key leaves.
        if event.peer_fingerprint != association.fingerprint:
            return None
        if event.peer_external_session_id != association.tls_id:
            return None
        if event.srtp_profile not in self._profiles:
            return None
        params = self._current(association.conference_id)
        if event.ekt_cipher != params.cipher:
            return None
        keys = split_keying_material(Profile(event.srtp_profile), event.keying_material)
        association.member = True
        association.connection.send_ekt_key(params, now)  # type: ignore[union-attr]
        return MediaKeys(
            association_id=association.association_id,
            protection_profile=event.srtp_profile,
            mki=b"",
            client_write_key=keys.client_outer.key,
            server_write_key=keys.server_outer.key,
            client_write_salt=keys.client_outer.salt,
            server_write_salt=keys.server_outer.salt,
        )
