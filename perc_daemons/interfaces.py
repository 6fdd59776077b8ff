"""zope.interface contracts between the parts of perc-daemons (see DESIGN.md).

Each has one real implementation (a second only where users need it), and
tests check implementations with ``verifyObject``.  Methods that may touch
the network or a disk return Deferreds.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface, classImplements


class IConferenceStore(Interface):
    """The KMF's conference session database (seed draft-westerlund sections 4.5-4.9).

    Conferences, invitations, EKT key epochs (wrapped: never in clear), the
    audit trail and the signed roster.  Implementations: SQLite (embedded,
    one host) and Redis (several KMF/KD hosts).  Every method returns a
    Deferred; failures are the typed errors of :mod:`perc_daemons.store`.
    """

    def create(conference):
        """Store a new :class:`~perc_daemons.store.Conference`.

        Fails with ConferenceExists if the id is taken.
        """

    def get(conference_id):
        """The Conference, or fail with ConferenceNotFound."""

    def list(state=None):
        """All conferences (optionally only those in ``state``), ordered by id."""

    def set_state(conference_id, state, now):
        """Move SCHEDULED -> RUNNING -> ENDED (ENDED is final); returns the Conference.

        Ending a conference wipes its keys as :meth:`end` does.
        """

    def update(conference_id, changes, now, by=None):
        """Change the policy fields of a conference not ended (``changes``: a mapping of
        :data:`~perc_daemons.store.POLICY_FIELDS`); returns the Conference.

        The result is checked as a new Conference would be (ValueError); one
        "policy-changed" audit record (:func:`~perc_daemons.store.policy_changed_detail`:
        ``changes``, the fields that changed, and ``by``, who changed them: the
        token's subject) is chained if any changed.  Fails
        with ConferenceEnded once the conference has ended.
        """

    def invite(conference_id, identity, now):
        """Add ``identity`` ("user@domain") to the invited set (idempotent)."""

    def uninvite(conference_id, identity, now):
        """Remove ``identity`` from the invited set (idempotent)."""

    def add_epoch(conference_id, spi, wrapped_key, now):
        """Atomically append the next EKT key epoch; returns its EpochKey.

        ``wrapped_key`` is the EKT key wrapped with the key-encryption key.
        Fails with ConferenceEnded once the conference has ended.
        """

    def current_epoch(conference_id):
        """The newest EpochKey, or None before the first epoch."""

    def epochs(conference_id):
        """Every stored EpochKey, oldest first."""

    def record_admission(conference_id, identity, ssrcs, epoch, now):
        """Audit an endpoint admitted under ``epoch`` with its SSRCs."""

    def audit(conference_id):
        """The conference's AuditEvents, oldest first."""

    def append_audit(conference_id, kind, identity, detail, now, report_id=None):
        """Chain one more record (kind of AUDIT_KINDS, detail JSON data without key
        material) to the conference's trail, also once it has ended; fires with its
        :class:`~perc_daemons.protocol.audit.AuditRecord`.

        ``report_id`` (a KD's name of the event, :data:`~perc_daemons.store.REPORT_ID`)
        is kept beside the record, not in it: a second record with the same id in
        the conference is not added (fires with None), whichever KMF process of the
        store gets it, and however the KD batched it."""

    def audit_trail(conference_id):
        """``(records, checkpoints)``: the chained AuditRecords in stored order and the
        signed Checkpoints, for :func:`perc_daemons.protocol.audit.verify_trail`."""

    def audit_tail(conference_id):
        """``(last AuditRecord or None, seq of the newest checkpoint or 0)``."""

    def add_audit_checkpoint(checkpoint):
        """Keep a signed Checkpoint beside the records (idempotent per seq)."""

    def expired_trails(ended_before):
        """Ids of the ended conferences whose "ended" record is older than
        ``ended_before`` and whose trail has not been deleted."""

    def delete_audit_trail(conference_id, retention, now):
        """Replace an ended conference's trail by one ``trail-deleted`` record that
        continues the chain; fires with it (None if nothing was deleted)."""

    def set_roster(conference_id, epoch, signed_roster, admitted=()):
        """Keep the signed roster (a JWS string) of ``epoch`` and whom the KD admitted:
        ``admitted`` is a collection of (identity, 32-byte SHA-256 fingerprint of the
        DTLS certificate it was admitted with)."""

    def roster(conference_id):
        """``(epoch, signed_roster)`` of the newest roster, or None."""

    def admitted(conference_id):
        """``(epoch, frozenset of (identity, fingerprint))`` reported with the newest
        roster, or None."""

    def add_media_distributor(conference_id, tunnel, now):
        """Record that the MD whose KD tunnel listener is ``tunnel`` ("host:port")
        serves the conference (draft-roach-perc-webrtc slides 4.1.1 steps 9-11).

        Idempotent; fires True when the list changed (then audited
        "media-distributor-added").  ``tunnel`` is validated and kept in its
        canonical form (ValueError otherwise); fails with ConferenceEnded once
        the conference has ended.
        """

    def remove_media_distributor(conference_id, tunnel, now):
        """Take ``tunnel`` off the conference's list; idempotent, True when it was on it
        (then audited "media-distributor-removed").  ConferenceEnded once ended."""

    def media_distributors(conference_id):
        """The conference's tunnel addresses, sorted (empty once it has ended)."""

    def active_media_distributors():
        """The sorted union of the tunnel addresses of every conference not ended:
        the MDs a KD should keep a tunnel to."""

    def end(conference_id, now):
        """End the conference: state ENDED, every epoch key, the roster and the
        list of Media Distributors deleted."""

    def close():
        """Release connections; returns a Deferred."""


class IAuthenticator(Interface):
    """An enterprise authentication back-end of the IdP (issue 5: file, LDAP, OIDC)."""

    name = Attribute("Short name used in configuration and logs, e.g. 'file'.")

    def authenticate(credentials):
        """Check ``credentials``; returns a Deferred firing with the identity "user@domain".

        Fails with ``UnsupportedCredentials`` when this back-end does not
        handle that kind of credentials (the chain then asks the next one),
        and with ``AuthenticationFailed`` otherwise; the failure never says
        whether the user exists.
        """


class IIdentityVerifier(Interface):
    """Checks an RFC 8827 identity assertion (used by the KD)."""

    def verify(assertion, audience, fingerprint, now):
        """Return the asserted identity if ``assertion`` is valid for ``audience``.

        ``fingerprint`` is the SHA-256 digest of the DTLS certificate actually
        used, which must be among the asserted fingerprints.  Raises a typed
        ``IdentityError`` (bad signature, expired, wrong audience, fingerprint
        not covered, foreign domain) otherwise.
        """


class IGrantStore(Interface):
    """The OAuth 2.0 server's persistent state: authorization codes, refresh tokens,
    the revocation list of access tokens and the one-time values already used.

    Only SHA-256 hashes of codes and tokens are stored (a leaked store cannot be
    replayed).  Every method returns a Deferred; implementations: SQLite and
    Redis, beside the conference stores.
    """

    def save_code(code_hash, grant, expires_at):
        """Keep an authorization code's grant (a JSON-serialisable dict) until it expires."""

    def take_code(code_hash, now):
        """Atomically consume a code: its grant once, then None forever (RFC 6749 s4.1.2)."""

    def save_refresh_token(token_hash, grant, expires_at):
        """Keep a new refresh token (grant includes its ``family`` id)."""

    def rotate_refresh_token(old_hash, new_hash, new_grant, expires_at, now):
        """Atomically retire ``old_hash`` and store its successor; returns the old grant.

        Presenting an already-rotated token revokes its whole family and fails
        with RefreshTokenReused (RFC 6819 s5.2.2.3, OAuth 2.0 Security BCP).
        """

    def revoke_refresh_token(token_hash):
        """Revoke one refresh token and its family (RFC 7009); idempotent."""

    def refresh_token(token_hash, now):
        """The live grant of a refresh token, or None (unknown, expired, revoked)."""

    def revoke_access_token(jti_hash, expires_at, now):
        """Put an access token on the revocation list until ``expires_at`` (its ``exp``).

        ``jti_hash`` is the SHA-256 of the token's ``jti`` (RFC 7009; RFC 9068
        tokens are self-contained, so resources look the list up).  Idempotent.
        """

    def access_token_revoked(jti_hash, now):
        """Whether that access token is on the revocation list (one key look-up)."""

    def use_once(key_hash, expires_at, now):
        """Fires True the first time ``key_hash`` is used, False ever after (until ``expires_at``).

        Atomic across every KMF sharing the store: one-time values such as
        login form tokens and OpenID Connect states are accepted once.
        """


class ITunnelPeer(Interface):
    """One end of an established MD<->KD tunnel connection (RFC 9185 over TLS 1.3).

    Implemented by :class:`perc_daemons.tunnel_link.TunnelLink`.
    """

    peer_fingerprint = Attribute("SHA-256 digest (32 bytes) of the peer's TLS certificate")
    peer_name = Attribute("For the KD end: the MD name it verified; for the MD end: None")

    def send(message):
        """Frame and write one tunnel message (protocol/tunnel.py dataclass)."""

    def close(reason):
        """Close this one tunnel connection, logging ``reason``."""


class ITunnelHandler(Interface):
    """What a daemon gives its tunnel ends: the MD's and the KD's tunnel logic."""

    def tunnel_up(peer):
        """``peer`` (an ITunnelPeer) is connected and the version is agreed.

        At the MD: ``peer`` is the KD certificate's one registered tunnel
        (a second connection with that certificate never gets here while it
        answers; see :mod:`perc_daemons.md.tunnel`).
        """

    def tunnel_message(peer, message):
        """A decoded message (not SupportedProfiles/UnsupportedVersion/Ping/Pong) from ``peer``."""

    def tunnel_down(peer, reason):
        """``peer`` is gone (closed by either side, failed, or refused); ``reason`` is text."""


class IKeySource(Interface):
    """Where the KD gets each conference's epoch keys: the KMF, so several KDs agree.

    Implemented by :class:`perc_daemons.kd.kmf_client.KmfClient`.  Both methods
    are coroutines (awaitable Deferreds in Twisted).
    """

    def new_epoch(conference_id):
        """Start the conference's next epoch; its description (epoch number, SPI)."""

    def current_key(conference_id):
        """``(epoch, EktParameterSet)`` of the conference's current epoch."""


# protocol/ imports nothing above it (DESIGN.md), so its implementations are
# declared here rather than with @implementer.
from perc_daemons.protocol.identity import JwksIdentityVerifier  # noqa: E402

classImplements(JwksIdentityVerifier, IIdentityVerifier)
