"""The Key Distributor's association manager, sans-I/O (RFC 8871, RFC 9185).

:class:`KeyDistributorCore` terminates the endpoints' DTLS-SRTP handshakes
that the MD tunnels to the KD.  Tunnel messages and explicit time in, tunnel
messages out; no sockets, no Twisted, no clock of its own, no key source of
its own: epoch keys come from the KMF over HTTPS, so the service fetches them
and hands them in with :meth:`KeyDistributorCore.install_epoch`.

* An association is admitted only if :meth:`KeyDistributorCore.expect` named
  it first (from a verified SignAnswer), and only for a conference that has a
  current epoch: its server :class:`DtlsConnection` requires the client
  certificate to have the signalled fingerprint and the ClientHello's
  external_session_id (RFC 8844) to be the signalled tls-id, so no key is
  derived, let alone sent, for anyone else.  A datagram for any other
  association is answered with EndpointDisconnect and leaves no state.
* On HandshakeComplete the MD gets MediaKeys with the *outer* (hop-by-hop)
  halves of the DOUBLE keying material only (RFC 8723 s5.1, RFC 9185 s5.4).
  The endpoint then gets the conference's current EKTKey (RFC 8870 s5.2.2)
  once the service has re-checked its invitation: :meth:`take_grants` names
  the conferences with such joiners and :meth:`grant` sends the key.  If the
  conference rekeys on join (``set_policy(rekey_on_join=True)``) or a rekey
  is already due, its first EKTKey is the next epoch's instead, installed by
  :meth:`install_epoch`, so a joiner never learns a key that was in use before
  it joined, nor one a departed member knows.  No EKTKey leaves the core but
  through :meth:`grant` and :meth:`install_epoch`, the two calls before which
  the service re-checks every recipient's invitation (:meth:`identities`);
  :meth:`remove_identity` closes an identity whose invitation was withdrawn.
* Each conference has numbered epochs; every epoch must be newer than the
  current one and must not reuse an SPI of the conference (RFC 8870 s4.2).
  A keyed member that leaves (EndpointDisconnect from the MD, close_notify,
  alert or retransmissions exhausted) makes the conference due for a new
  epoch, as does a completed join with ``rekey_on_join``;
  :meth:`take_rekeys` reports the due conferences (coalesced), and
  :meth:`take_roster_updates` those whose keyed membership changed without one.
* For the KMF's audit trail (issue 14), :meth:`take_audit_events` hands out
  :class:`Admitted` (an association's first EKT key: identity, certificate
  fingerprint, epoch) and :class:`Left` (a keyed member gone, and why:
  ``close_notify``, ``md_disconnect``, ``uninvited``, ``conference_ended``,
  or the DTLS failure's cause); :meth:`take_rekeys_with_causes` says why each
  due epoch is due (``join``, ``leave``).  Refusals are :class:`DtlsRefusal`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

__all__ = [
    "DEFAULT_EKT_CIPHERS",
    "DEFAULT_PROFILES",
    "Admitted",
    "DtlsRefusal",
    "EpochError",
    "KeyDistributorCore",
    "Left",
    "NoCurrentEpoch",
    "ReusedSpi",
    "StaleEpoch",
    "TunnelMessage",
]

#: What the core hands back: tunnel messages for the MD, in order.
TunnelMessage = MediaKeys | TunneledDtls | EndpointDisconnect

DEFAULT_PROFILES = (Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM,
                    Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM)
#: The EKT cipher must be at least as strong as the SRTP cipher (RFC 8870 s6).
DEFAULT_EKT_CIPHERS: Mapping[int, EktCipher] = {
    Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM: EktCipher.AESKW_128,
    Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM: EktCipher.AESKW_256,
}


@dataclass(frozen=True)
class DtlsRefusal:
    """An association that ended before it was admitted (issue 10: say why).

    ``cause`` is a short slug for metrics: the DTLS failure's (e.g.
    ``dtls_no_srtp_profile`` -- no DOUBLE profile --, ``dtls_no_ekt``,
    ``dtls_wrong_tls_id``, ``dtls_wrong_certificate``), ``peer_alert``,
    ``timeout``, ``no_dtls`` (the endpoint never sent DTLS), ``kd_check``
    (the KD's own re-check refused the finished handshake); ``detail`` a
    sentence for the log.  Never any key material.
    """

    association_id: bytes
    conference_id: str
    identity: str
    cause: str
    detail: str


@dataclass(frozen=True)
class Admitted:
    """An association got its first EKT key (it is a keyed member from now on)."""

    association_id: bytes
    conference_id: str
    identity: str
    fingerprint: bytes
    epoch: int
    ssrcs: tuple[int, ...]


@dataclass(frozen=True)
class Left:
    """A keyed member is gone; ``reason`` a slug (see the module doc)."""

    association_id: bytes
    conference_id: str
    identity: str
    reason: str


class EpochError(ValueError):
    """An epoch that cannot be installed, or a join without a current epoch."""


class StaleEpoch(EpochError):
    """The epoch number is not newer than the conference's current one."""


class ReusedSpi(EpochError):
    """The epoch's EKT SPI was already used in the conference (RFC 8870 s4.2)."""


class NoCurrentEpoch(EpochError):
    """A join was signalled for a conference that has no epoch key yet."""


#: Seconds a signed answer's association waits for its endpoint's first DTLS record.
DEFAULT_EXPECT_TIMEOUT = 60.0


@dataclass
class _Association:
    association_id: bytes
    conference_id: str
    identity: str
    fingerprint: bytes
    tls_id: bytes
    #: The KD's own tls-id for this association (RFC 8842 s5.3: new and unique per
    #: DTLS association), its external_session_id (RFC 8844).
    kd_tls_id: bytes = b""
    ssrcs: tuple[int, ...] = ()
    connection: DtlsConnection | None = None
    #: without a handshake by then, the expectation is dropped (None: never)
    expires_at: float | None = None
    member: bool = False  # handshake complete, MediaKeys sent
    keyed: bool = False  # has been sent an EKTKey
    ekt_cipher: EktCipher | None = None  # negotiated in the handshake
    acknowledged_spis: list[int] = field(default_factory=list)


@dataclass
class _Conference:
    epoch: int = 0
    params: EktParameterSet | None = None
    spis: set[int] = field(default_factory=set)
    rekey_on_join: bool = False
    #: A keyed member left since the current epoch was installed.
    stale: bool = False


class KeyDistributorCore:
    """Every tunnelled DTLS association of one KD, and each conference's epochs."""

    def __init__(self, certificate: bytes, private_key: ec.EllipticCurvePrivateKey,
                 cookie_secret: bytes, *,
                 profiles: Sequence[int] = DEFAULT_PROFILES,
                 ekt_ciphers: Mapping[int, EktCipher] = DEFAULT_EKT_CIPHERS,
                 initial_retransmit: float = 1.0,
                 expect_timeout: float = DEFAULT_EXPECT_TIMEOUT) -> None:
        if not profiles or any(p not in DOUBLE_PROFILES for p in profiles):
            raise ValueError("profiles must be a non-empty list of DOUBLE profiles")
        if any(p not in ekt_ciphers for p in profiles):
            raise ValueError("every profile needs an EKT cipher")
        if len(cookie_secret) < 16:
            raise ValueError("cookie_secret must be at least 16 bytes")
        self._certificate = certificate
        self._private_key = private_key
        self._cookie_secret = cookie_secret
        self._profiles = [int(p) for p in profiles]
        self._ekt_ciphers = {int(p): EktCipher(c) for p, c in ekt_ciphers.items()}
        self._initial_retransmit = initial_retransmit
        if expect_timeout <= 0:
            raise ValueError("expect_timeout must be positive")
        self._expect_timeout = expect_timeout
        self._associations: dict[bytes, _Association] = {}
        self._conferences: dict[str, _Conference] = {}
        self._rekeys: dict[str, set[str]] = {}  # ordered: conference -> causes
        self._roster_updates: dict[str, None] = {}
        self._grants: dict[str, None] = {}
        self._refusals: list[DtlsRefusal] = []
        self._audit: list[Admitted | Left] = []

    def __repr__(self) -> str:
        return (f"<KeyDistributorCore associations={len(self._associations)} "
                f"conferences={len(self._conferences)}>")

    # -- queries -----------------------------------------------------------------------

    def members(self, conference_id: str) -> list[tuple[str, bytes]]:
        """(identity, association id) of each keyed member, in join order."""
        return [(a.identity, a.association_id) for a in self._associations.values()
                if a.conference_id == conference_id and a.keyed]

    def roster(self, conference_id: str) -> list[tuple[str, list[int]]]:
        """(identity, SSRCs) of each keyed identity, in join order: the KMF roster.

        One identity may join from several devices (associations); the roster
        lists it once with the SSRCs of all of them.
        """
        merged: dict[str, list[int]] = {}
        for a in self._associations.values():
            if a.conference_id == conference_id and a.keyed:
                ssrcs = merged.setdefault(a.identity, [])
                ssrcs.extend(ssrc for ssrc in a.ssrcs if ssrc not in ssrcs)
        return list(merged.items())

    def admitted(self, conference_id: str) -> list[tuple[str, bytes]]:
        """(identity, certificate fingerprint) of each keyed association, in join order:
        whom the KMF's HTTPS key service may serve (issue 10)."""
        return list(dict.fromkeys((a.identity, a.fingerprint)
                                  for a in self._associations.values()
                                  if a.conference_id == conference_id and a.keyed))

    def identities(self, conference_id: str) -> list[str]:
        """Every identity with an association in the conference (expected, joining,
        member): those whose invitation is re-checked before a key leaves."""
        return list(dict.fromkeys(a.identity for a in self._associations.values()
                                  if a.conference_id == conference_id))

    def conference_of(self, association_id: bytes) -> str | None:
        association = self._associations.get(association_id)
        return association.conference_id if association is not None else None

    def conferences(self) -> list[str]:
        """Conferences with an epoch or a policy."""
        return list(self._conferences)

    def association_count(self) -> int:
        return len(self._associations)

    def member_count(self) -> int:
        return sum(1 for a in self._associations.values() if a.keyed)

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
        timers = [t for a in self._associations.values()
                  if (t := a.connection.get_timer() if a.connection is not None
                      else a.expires_at) is not None]
        return min(timers) if timers else None

    def take_rekeys(self) -> list[str]:
        """Conferences due for a new epoch since the last call, each once.

        A keyed member leaving always makes its conference due; a completed
        join does when the conference rekeys on join.  The caller gets a new
        epoch key (KMF) and hands it to :meth:`install_epoch`.
        """
        return [conference for conference, _ in self.take_rekeys_with_causes()]

    def take_rekeys_with_causes(self) -> list[tuple[str, frozenset[str]]]:
        """As :meth:`take_rekeys`, with why each is due: ``join``, ``leave``."""
        due, self._rekeys = self._rekeys, {}
        return [(conference, frozenset(causes)) for conference, causes in due.items()]

    def take_audit_events(self) -> list[Admitted | Left]:
        """Admissions and leaves since the last call, in order (for the audit trail)."""
        events, self._audit = self._audit, []
        return events

    def _rekey(self, conference_id: str, cause: str) -> None:
        self._rekeys.setdefault(conference_id, set()).add(cause)

    def _keyed(self, association: _Association, epoch: int) -> None:
        if not association.keyed:
            association.keyed = True
            if len(self._audit) < 10_000:
                self._audit.append(Admitted(association.association_id,
                                            association.conference_id, association.identity,
                                            association.fingerprint, epoch, association.ssrcs))

    def take_roster_updates(self) -> list[str]:
        """Conferences whose keyed membership grew without a new epoch, each once."""
        due, self._roster_updates = list(self._roster_updates), {}
        return due

    def take_refusals(self) -> list[DtlsRefusal]:
        """Associations that ended before admission since the last call, with why."""
        refusals, self._refusals = self._refusals, []
        return refusals

    def take_grants(self) -> list[str]:
        """Conferences with members waiting for the current epoch's key, each once:
        the caller re-checks their invitations, then calls :meth:`grant`."""
        due, self._grants = list(self._grants), {}
        return due

    # -- input -------------------------------------------------------------------------

    def set_policy(self, conference_id: str, *, rekey_on_join: bool) -> None:
        """Whether a completed join starts a new epoch (KMF late_joiners_get_earlier_epochs
        false) or the joiner gets the current epoch's key at once."""
        if not conference_id:
            raise ValueError("conference_id must not be empty")
        self._conferences.setdefault(conference_id, _Conference()).rekey_on_join = bool(
            rekey_on_join)

    def install_epoch(self, conference_id: str, epoch: int, params: EktParameterSet,
                      now: float) -> list[TunnelMessage]:
        """Make ``epoch`` current and send its EKTKey to every member (RFC 8870 s5.2.2).

        Every keyed member gets it, and so does every member still waiting
        for its first key.  Raises :class:`StaleEpoch` unless ``epoch`` is
        newer than the current one, :class:`ReusedSpi` if the conference used
        the SPI before.  A member whose handshake negotiated another EKT
        cipher cannot take the key: it is closed and disconnected.
        """
        if not conference_id:
            raise ValueError("conference_id must not be empty")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise ValueError("epoch must be a positive integer")
        if not isinstance(params, EktParameterSet):
            raise TypeError("params must be an EktParameterSet")
        conference = self._conferences.setdefault(conference_id, _Conference())
        if epoch <= conference.epoch:
            raise StaleEpoch(f"epoch {epoch} of {conference_id!r} is not newer than "
                             f"{conference.epoch}")
        if params.spi in conference.spis:
            raise ReusedSpi(f"EKT SPI {params.spi} was used before in {conference_id!r}")
        conference.epoch, conference.params = epoch, params
        conference.spis.add(params.spi)
        conference.stale = False
        out: list[TunnelMessage] = []
        for association in list(self._associations.values()):
            if association.conference_id != conference_id or not association.member:
                continue
            if self._associations.get(association.association_id) is not association:
                continue
            if association.ekt_cipher != params.cipher:
                out += self._drop(association, now, "ekt_cipher_mismatch")
                continue
            self._keyed(association, epoch)
            out += self._send_key(association, params, now)
        return out

    def grant(self, conference_id: str, now: float) -> list[TunnelMessage]:
        """Send the current epoch's EKTKey to every member still waiting for one.

        Nothing if a rekey is due (its epoch keys them all) or the conference
        rekeys on join.  Call only after re-checking :meth:`identities`.
        """
        conference = self._conferences.get(conference_id)
        if (conference is None or conference.params is None or conference.stale
                or conference.rekey_on_join or conference_id in self._rekeys):
            return []
        out: list[TunnelMessage] = []
        for association in list(self._associations.values()):
            if (association.conference_id != conference_id or not association.member
                    or association.keyed):
                continue
            if self._associations.get(association.association_id) is not association:
                continue
            self._keyed(association, conference.epoch)
            self._roster_updates[conference_id] = None
            out += self._send_key(association, conference.params, now)
        return out

    def remove_identity(self, conference_id: str, identity: str,
                        now: float) -> list[TunnelMessage]:
        """Close every association of ``identity`` in the conference (its invitation
        was withdrawn): close_notify to the endpoint, EndpointDisconnect to the MD;
        if it was keyed, the rest are due for a new epoch without it."""
        out: list[TunnelMessage] = []
        for association in list(self._associations.values()):
            if (association.conference_id == conference_id
                    and association.identity == identity
                    and self._associations.get(association.association_id) is association):
                out += self._drop(association, now, "uninvited")
        return out

    def expect(self, association_id: bytes, conference_id: str, identity: str,
               fingerprint: bytes, tls_id: bytes, ssrcs: Sequence[int] = (), *,
               kd_tls_id: bytes, now: float | None = None) -> None:
        """Admit an association, as learnt from the offer of a verified SignAnswer.

        ``tls_id`` is the endpoint's (from the offer), ``kd_tls_id`` the KD's own for
        this association alone (in the answer; RFC 8842 s5.3 wants a new one per
        DTLS association): the handshake must carry both as external_session_id
        (RFC 8844), so an endpoint's DTLS binds to this one answer.

        The conference must have a current epoch (:class:`NoCurrentEpoch`
        otherwise): the service installs one first.  With ``now``, an
        expectation whose endpoint sends no DTLS for ``expect_timeout``
        seconds is dropped by :meth:`handle_timers` (EndpointDisconnect), so
        signed answers nobody uses do not pile up.
        """
        if not isinstance(association_id, bytes) or len(association_id) != 16:
            raise ValueError("association_id must be 16 bytes")
        if len(fingerprint) != 32:
            raise ValueError("fingerprint must be a SHA-256 digest (32 bytes)")
        if not 20 <= len(tls_id) <= 255 or not 20 <= len(kd_tls_id) <= 255:
            raise ValueError("tls_id and kd_tls_id must be 20 to 255 bytes")
        if not conference_id or not identity:
            raise ValueError("conference_id and identity must not be empty")
        ssrc_tuple = tuple(dict.fromkeys(int(s) for s in ssrcs))
        if any(not 0 <= s <= 0xFFFFFFFF for s in ssrc_tuple):
            raise ValueError("an SSRC is a 32-bit unsigned integer")
        if self.current_params(conference_id) is None:
            raise NoCurrentEpoch(f"conference {conference_id!r} has no epoch key")
        existing = self._associations.get(association_id)
        if existing is not None and existing.connection is not None:
            raise ValueError("association already has a DTLS connection")
        self._associations[association_id] = _Association(
            association_id, conference_id, identity, fingerprint, tls_id, kd_tls_id, ssrc_tuple,
            expires_at=None if now is None else now + self._expect_timeout)

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
                self._refused(association, "no_profile",
                              "no DOUBLE profile for the conference's EKT cipher")
                return [EndpointDisconnect(association_id)]
            association.connection = connection
        association.connection.receive_datagram(data, now)
        return self._drain(association, now)

    def endpoint_disconnect(self, association_id: bytes, now: float,
                            reason: str = "md_disconnect") -> list[TunnelMessage]:
        """The MD says the endpoint left: forget it; a keyed member makes a rekey due.

        ``reason`` is the leave's (audit): what the MD said (its EndpointDisconnect's
        private reason: ``consent_timeout``, ``md_leave``, ``conference_deleted``),
        else ``md_disconnect``.  The KD answers with EndpointDisconnect: whoever
        ended the DTLS association, the KD tells the MD (RFC 9185 section 5.4).
        """
        association = self._associations.pop(association_id, None)
        if association is None:
            return []
        if association.connection is not None:
            association.connection.close()  # its close_notify has nowhere to go
        self._left(association, reason)
        return [EndpointDisconnect(association_id)]

    def end_conference(self, conference_id: str, now: float) -> list[TunnelMessage]:
        """Close every association of the conference and wipe its keys."""
        out: list[TunnelMessage] = []
        for association in list(self._associations.values()):
            if association.conference_id != conference_id:
                continue
            del self._associations[association.association_id]
            if association.keyed and len(self._audit) < 10_000:
                self._audit.append(Left(association.association_id, conference_id,
                                        association.identity, "conference_ended"))
            connection = association.connection
            if connection is not None:
                connection.close()
                out += [TunneledDtls(association.association_id, d)
                        for d in connection.datagrams_to_send(now)]
            out.append(EndpointDisconnect(association.association_id))
        self._conferences.pop(conference_id, None)
        self._rekeys.pop(conference_id, None)
        self._roster_updates.pop(conference_id, None)
        self._grants.pop(conference_id, None)
        return out

    def handle_timers(self, now: float) -> list[TunnelMessage]:
        out: list[TunnelMessage] = []
        for association in list(self._associations.values()):
            if self._associations.get(association.association_id) is not association:
                continue  # removed while handling an earlier one
            connection = association.connection
            if connection is None:
                expires_at = association.expires_at
                if expires_at is not None and now >= expires_at:
                    # A signed answer its endpoint never used (RFC 9185 s5.4)
                    del self._associations[association.association_id]
                    self._refused(association, "no_dtls",
                                  "no DTLS from the endpoint within the expect timeout")
                    out.append(EndpointDisconnect(association.association_id))
                continue
            timer = connection.get_timer()
            if timer is not None and now >= timer:
                connection.handle_timer(now)
                out += self._drain(association, now)
        return out

    # -- internals ---------------------------------------------------------------------

    def _left(self, association: _Association, reason: str) -> None:
        """A member left: if it knew a key, the rest need a new epoch, even with nobody
        left (a later joiner must not get a key the departed member knows)."""
        if association.keyed:
            if len(self._audit) < 10_000:
                self._audit.append(Left(association.association_id, association.conference_id,
                                        association.identity, reason))
            association.keyed = association.member = False
            conference = self._conferences.get(association.conference_id)
            if conference is not None:
                conference.stale = True
            self._rekey(association.conference_id, "leave")
            self._roster_updates.pop(association.conference_id, None)

    def _drop(self, association: _Association, now: float,
              reason: str) -> list[TunnelMessage]:
        """Close an association the KD cannot keep, and tell the MD."""
        aid = association.association_id
        self._associations.pop(aid, None)
        out: list[TunnelMessage] = []
        if association.connection is not None:
            association.connection.close()
            out += [TunneledDtls(aid, d) for d in association.connection.datagrams_to_send(now)]
        out.append(EndpointDisconnect(aid))
        self._left(association, reason)
        return out

    def _new_connection(self, association: _Association) -> DtlsConnection | None:
        params = self.current_params(association.conference_id)
        if params is None:
            return None
        cipher = params.cipher
        profiles = [p for p in self._profiles if self._ekt_ciphers[p] == cipher]
        if not profiles:
            return None
        config = DtlsConfiguration(
            self._certificate, self._private_key,
            srtp_profiles=profiles,
            ekt_ciphers=[cipher],
            expected_peer_fingerprint=association.fingerprint,
            external_session_id=association.kd_tls_id,
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
        closed: ConnectionClosed | None = None
        refused_here = False
        while (event := connection.next_event()) is not None:
            if isinstance(event, HandshakeComplete):
                media_keys = self._admit(association, event, now)
                if media_keys is None:
                    refused_here = True
                    connection.close()
                else:
                    first.append(media_keys)
            elif isinstance(event, EktKeyAcknowledged):
                association.acknowledged_spis.append(event.spi)
            elif isinstance(event, ConnectionClosed):
                closed = event
        out = first + [TunneledDtls(aid, d) for d in connection.datagrams_to_send(now)]
        if closed is not None and self._associations.get(aid) is association:
            del self._associations[aid]
            out.append(EndpointDisconnect(aid))
            if refused_here:
                self._refused(association, "kd_check",
                              "the finished handshake failed the KD's own checks")
            elif not association.member:
                self._refused(association, closed.cause or "dtls_error", closed.reason)
            self._left(association, closed.cause or "dtls_error")
        return out

    def _refused(self, association: _Association, cause: str, detail: str) -> None:
        if len(self._refusals) < 10_000:  # the service takes them after every input
            self._refusals.append(DtlsRefusal(association.association_id,
                                              association.conference_id,
                                              association.identity, cause, detail))

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
        conference = self._conferences.get(association.conference_id)
        if conference is None or conference.params is None:
            return None
        params = conference.params
        if event.ekt_cipher != params.cipher:
            return None
        keys = split_keying_material(Profile(event.srtp_profile), event.keying_material)
        association.member = True
        association.ekt_cipher = EktCipher(event.ekt_cipher)
        if conference.rekey_on_join or conference.stale:
            # The first key this member gets is the next epoch's.
            self._rekey(association.conference_id, "join")
        else:
            # The current epoch's key, once the service re-checked the invitation.
            self._grants[association.conference_id] = None
        return MediaKeys(
            association_id=association.association_id,
            protection_profile=event.srtp_profile,
            mki=b"",
            client_write_key=keys.client_outer.key,
            server_write_key=keys.server_outer.key,
            client_write_salt=keys.client_outer.salt,
            server_write_salt=keys.server_outer.salt,
        )
