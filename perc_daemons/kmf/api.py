"""The KMF's HTTPS API (Twisted Web): identity assertions, key service, roster, conferences.

Routes (every error is an RFC 9457 problem, see :mod:`perc_daemons.problems`):

==========================================================  =====================
``GET    /.well-known/jwks.json``                            public
``POST   /v1/identity/assertions``                           ``identity``, bound
``GET    /v1/conferences`` (``?state=``)                     ``admin``
``POST   /v1/conferences``                                   ``admin``
``GET    /v1/conferences/{id}``                              ``admin``
``PATCH  /v1/conferences/{id}``  (policy, title)             ``admin``
``POST   /v1/conferences/{id}/invitations``                  ``admin``
``GET    /v1/conferences/{id}/invitations/{identity}``       ``kd`` or ``admin``
``POST   /v1/conferences/{id}/invitation-check``             ``kd`` or ``admin``
``DELETE /v1/conferences/{id}/invitations/{identity}``       ``admin``
``POST   /v1/conferences/{id}/start``                        ``admin``
``POST   /v1/conferences/{id}/end``                          ``admin``
``POST   /v1/conferences/{id}/media-distributors``           ``admin``
``DELETE /v1/conferences/{id}/media-distributors/{tunnel}``  ``admin``
``GET    /v1/media-distributors``                            ``kd``
``POST   /v1/conferences/{id}/epochs``                       ``kd`` or ``admin``
``POST   /v1/conferences/{id}/keys`` (``?epoch=``)           ``keys`` bound + admitted, or ``kd``
``GET    /v1/conferences/{id}/roster``                       ``keys`` (invited), ``kd``, ``admin``
``PUT    /v1/conferences/{id}/roster``                       ``kd``
``GET    /v1/conferences/{id}/audit``                        ``auditor`` or ``admin``
``POST   /v1/conferences/{id}/audit``                        ``kd``
``GET    /v1/events``  (text/event-stream)                   ``kd``
``GET    /.well-known/oauth-authorization-server``           public (RFC 8414)
``GET    /oauth/authorize``  (HTML login form)               public
``POST   /oauth/authorize``  (form submission)               public, CSRF token
``POST   /oauth/token``                                      client auth (RFC 6749)
``POST   /oauth/revoke``                                     client auth (RFC 7009)
``POST   /oauth/introspect``                                 confidential client (RFC 7662)
``GET    /oauth/oidc/callback``                              public, signed state + cookie
==========================================================  =====================

The ``/oauth/*`` routes exist when an
:class:`~perc_daemons.kmf.oauth.AuthorizationServer` is given.  They answer
in OAuth's formats, not RFC 9457: ``/oauth/token``, ``/revoke`` and
``/introspect`` take ``application/x-www-form-urlencoded`` bodies, answer
JSON (``Cache-Control: no-store``, ``Pragma: no-cache``) and fail with RFC
6749 s5.2 ``{"error", "error_description"}`` (401 with ``WWW-Authenticate:
Basic`` for ``invalid_client``).  Clients authenticate with HTTP Basic
(``client_secret_basic``, percent-decoded id and secret, RFC 6749 s2.3.1) or,
public clients, with ``client_id`` in the body; ``client_secret`` in the body
is refused.  ``/oauth/authorize`` serves a self-contained HTML login form
(CSP ``default-src 'none'``, no framing, ``Referrer-Policy: same-origin`` so
that the browser sends its ``Origin`` on the POST) whose hidden fields carry
the request and a ``csrf_token``: the time the form was made, a random nonce
and an HMAC (under a per-process secret) over them, the parameters and a
browser binding.  The binding is the value of a ``__Host-perc-login`` cookie
(``Secure; HttpOnly; SameSite=Lax; Path=/``, no ``Domain``, ``Max-Age``
``form_lifetime``) set with the form and kept while the browser has it: a
form works only from the browser it was shown to, and a cross-site POST does
not carry the cookie.  The POST is refused (403) before any credential is
checked when its ``Origin`` is present but not the KMF's own (``public_url``,
or ``https://`` + the request's ``Host``), when the cookie is missing, or the
token is not valid for that cookie and parameters, or is older than
``form_lifetime`` seconds, or was used before: each form token is accepted
once, remembered in the grant store (:meth:`use_once`, shared by every KMF
sharing the store) until it expires; a refused login shows a new form.

With an :class:`~perc_daemons.kmf.auth.oidc.OidcLogin` (``oidc_login``) the
login page also offers "Sign in with <provider>": that form posts the same
signed request with ``login=oidc``, and the KMF answers 303 to the provider's
authorization endpoint (code flow, PKCE S256, ``nonce``, ``scope``
"openid email", ``redirect_uri`` ``<public_url>/oauth/oidc/callback``).  The
``state`` sent there is the pending request, signed (HMAC under the form
secret) with its issue time (valid ``form_lifetime`` seconds) and a random id
from which the PKCE verifier and the nonce are derived; a ``__Host-`` cookie
holding that id binds it to the browser, and each state is accepted once
(remembered in the grant store like form tokens).
``GET /oauth/oidc/callback`` checks state and cookie (else an HTML error page:
nothing can be trusted), revalidates the request, exchanges the code at the
provider's token endpoint and validates the ID token (with the nonce); then it
completes the request as a password login does (302 to the client with
``code``, ``state``, ``iss``).  The provider's ``error`` and token endpoint
failures are redirected to the client as RFC 6749 s4.1.2.1 errors
(``access_denied``, ``temporarily_unavailable``, ``server_error``); an ID
token that is refused shows the login page again.

The Media Distributors of a conference are the tunnel addresses ("host:port",
:mod:`~perc_daemons.protocol.tunnel_address`) of the MDs' KD tunnel
listeners, which an MD gives back when it acknowledges a conference
(draft-roach-perc-webrtc slides 4.1.1 steps 9-11).  Adding one publishes the
``media-distributor`` event (``{"conference", "tunnel"}``) so that a KD
following ``/v1/events`` connects there; ``GET /v1/media-distributors`` is
every address of the conferences not ended, which a KD reads whenever its
event stream (re)connects.

"invited" means the token's subject is in the conference's ``invited``
list or, when the KMF has an LDAP back-end (``groups``, a :class:`GroupCache`),
belongs to one of its ``invited_groups`` (group names compared
case-insensitively; look-ups cached briefly).  If the directory cannot be
asked the answer is 503 ``directory-unavailable``, never an admission.

"admitted" (the key service, issue 10) means the KD's newest roster report,
for the conference's current epoch, lists the token's subject with the
fingerprint of the very certificate the token is bound to: the KD has
admitted that identity over DTLS with that certificate and it has not left
since.  An invited identity that never joined, that left, or that presents
another certificate gets 403 ``not-admitted``; so does everyone between a
new epoch and the KD's roster report for it (moments: retry).

"bound" means the access token must carry ``cnf`` (RFC 8705) matching the TLS
client certificate of the request; any token with ``cnf`` is refused from
another certificate.  Access tokens are checked with the KMF's own signing
keys; issuer and audience are both ``[idp] issuer``.  An access token revoked
at ``/oauth/revoke`` (here or at another KMF sharing the grant store) is
refused (401 ``invalid_token``): before the handler runs, :meth:`KmfApi.prepare`
looks the bearer token's ``jti`` up on the grant store's revocation list (one
key look-up per request; 503 if the store cannot answer).

Policy (issue 14; :class:`~perc_daemons.store.Conference`): before
``starts_at - early_start`` the key routes (``epochs``, ``keys``, ``roster``
PUT) answer 403 ``not-started``, and the invitation answer says
``"schedule": "not_started"`` so that the KD refuses the join with that
reason; at ``ends_at + grace`` the conference ends by itself exactly as
``POST .../end`` does (:meth:`KmfApi.end_conference`, cause "schedule": keys
wiped, ``conference-ended`` to the KDs, which revoke the endpoints' keys and
tell the MDs).  The timers are armed from the store at start-up
(:mod:`perc_daemons.kmf.schedule`), and a key route reached after that
moment ends the conference there and then (410).  ``?epoch=N`` on the key
route asks for an earlier epoch's key: only under ``late_join = "history"``
(else 403 ``history-not-allowed``), only for an epoch still stored (404
``unknown-epoch``), only to an admitted member as for the current key; each
such delivery is logged (:meth:`KmfApi.history_key_delivered`).  Every
refusal is a problem whose ``type`` ends in a machine-readable slug.

The key service answers 200 with an empty body and::

    Encryption-Key: keyid="<conference>/<epoch>"; aesgcm128=<base64url EKT key>; usage="EKT"

(draft-thomson-http-encryption-02 section 4 ``parameter`` syntax: ``keyid``
is a quoted-string as it contains ``/``; base64url is a token).  The
response also carries ``Cache-Control: no-store``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import json
import math
import re
import secrets
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web import server

from perc_daemons.kmf.audit import AuditLog, ReportError
from perc_daemons.kmf.auth import AuthenticationFailed, BackendUnavailable, UnsupportedCredentials
from perc_daemons.kmf.auth.oidc import TokenEndpointError
from perc_daemons.kmf.kek import KeyEncryptionKey, KeyUnwrapError
from perc_daemons.kmf.oauth import ClientAuthRateLimited, LoginFailed, LoginRateLimited, OAuthError
from perc_daemons.kmf.signing import SigningKeys
from perc_daemons.kmf.tokens import (
    AccessToken,
    CertificateMismatch,
    InsufficientScope,
    TokenError,
    unverified_jti,
    verify_access_token,
)
from perc_daemons.logs import AccessLogSite
from perc_daemons.problems import (
    JsonApi,
    LimitedRequest,
    Problem,
    Response,
    Routes,
    read_json,
)
from perc_daemons.protocol.ekt import EktCipher
from perc_daemons.protocol.encryption_key import format_encryption_key
from perc_daemons.protocol.identity import create_assertion, normalize_identity, parse_fingerprint
from perc_daemons.protocol.jose import b64url_encode
from perc_daemons.protocol.roster import DuplicateSsrc, sign_roster
from perc_daemons.protocol.tunnel_address import TunnelAddressError, check_tunnel_address
from perc_daemons.store import (
    Conference,
    ConferenceEnded,
    ConferenceExists,
    ConferenceNotFound,
    ConferenceState,
    EpochKey,
    InvalidTransition,
    StoreUnavailable,
    check_conference_id,
    check_identity,
    policy_json,
    schedule_status,
)
from perc_daemons.tls import peer_certificate_der

__all__ = ["EventBus", "GroupCache", "KmfApi", "kmf_site"]

#: The request parameters of /oauth/authorize carried by the login form.
AUTHORIZE_PARAMS = ("response_type", "client_id", "redirect_uri", "scope", "state",
                    "code_challenge", "code_challenge_method")
#: The scopes the routes above understand (RFC 8414 ``scopes_supported``).
API_SCOPES = ("admin", "auditor", "identity", "kd", "keys")
_FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
_CSP_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+")
_LOGIN_COOKIE = b"__Host-perc-login"
_BINDING = re.compile(r"[A-Za-z0-9_-]{22}")  # base64url of 16 random bytes
_DEFAULT_PORTS = {"https": 443, "http": 80}
MAX_FINGERPRINTS = 16
MAX_MEMBERS = 10_000
ASSERTION_LIFETIME = 120
_EPOCH_ATTEMPTS = 3


class EventBus:
    """In-process publish/subscribe of conference events for ``GET /v1/events``."""

    def __init__(self) -> None:
        self._subscribers: list[Callable[[int, str, dict[str, Any]], None]] = []
        self._next_id = 1

    def subscribe(self, callback: Callable[[int, str, dict[str, Any]], None]
                  ) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def __len__(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        event_id, self._next_id = self._next_id, self._next_id + 1
        for callback in list(self._subscribers):
            callback(event_id, kind, data)


class GroupCache:
    """An identity's LDAP group names (case-folded), cached ``ttl`` seconds on ``clock``.

    ``lookup(identity)`` returns a Deferred firing with an iterable of group
    names (e.g. :meth:`LdapAuthenticator.groups`).  At most ``max_entries``
    identities are kept (least recently used first out); concurrent look-ups
    of one identity share one query; failures are not cached.
    """

    def __init__(self, lookup: Callable[[str], Any], *, clock: IReactorTime,
                 ttl: float = 60.0, max_entries: int = 10_000) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("ttl and max_entries must be positive")
        self._lookup = lookup
        self._clock = clock
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, frozenset[str]]] = OrderedDict()
        self._pending: dict[str, list[defer.Deferred]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def groups(self, identity: str) -> defer.Deferred:
        """Fires with the frozenset of ``identity``'s group names, case-folded."""
        now = self._clock.seconds()
        entry = self._entries.get(identity)
        if entry is not None:
            if entry[0] > now:
                self._entries.move_to_end(identity)
                return defer.succeed(entry[1])
            del self._entries[identity]
        waiter: defer.Deferred = defer.Deferred()
        waiters = self._pending.get(identity)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._pending[identity] = [waiter]

        def done(result: Any) -> None:
            pending = self._pending.pop(identity, [])
            if not isinstance(result, Failure):
                result = frozenset(str(name).casefold() for name in result)
                self._entries[identity] = (self._clock.seconds() + self.ttl, result)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            for d in pending:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)

        defer.maybeDeferred(self._lookup, identity).addBoth(done)
        return waiter


def _unauthorized(detail: str, error: str = "invalid_token") -> Problem:
    challenge = f'Bearer realm="perc-kmf", error="{error}"'.encode()
    if error == "":
        challenge = b'Bearer realm="perc-kmf"'
    return Problem(401, "unauthorized", "Authentication required", detail,
                   headers={b"www-authenticate": challenge})


def _host(request: server.Request) -> str | None:
    """The request's source address (for rate limits), if it has one."""
    return getattr(request.getClientAddress(), "host", None)


def _forbidden(slug: str, title: str, detail: str) -> Problem:
    return Problem(403, slug, title, detail)


def _bad_request(detail: str) -> Problem:
    return Problem(400, "invalid-request", "Invalid request", detail)


def conference_json(c: Conference) -> dict[str, Any]:
    return {
        "id": c.conference_id,
        "title": c.title,
        "initiator": c.initiator,
        "state": str(c.state),
        "invited": sorted(c.invited),
        "invited_groups": sorted(c.invited_groups),
        "starts_at": c.starts_at,
        "ends_at": c.ends_at,
        "late_joiners_get_earlier_epochs": c.late_joiners_get_earlier_epochs,
        "created_at": c.created_at,
        "media_distributors": sorted(c.media_distributors),
        **policy_json(c),
    }


def _path_conference_id(value: str) -> str:
    try:
        return check_conference_id(value)
    except ValueError:
        raise Problem(404, "not-found", "Not found", "no such conference") from None


class KmfApi(JsonApi):
    """The routes above, as one leaf resource dispatching on method and path."""

    def __init__(self, *, store: Any, kek: KeyEncryptionKey, keys: SigningKeys,
                 idp_domain: str, issuer: str, clock: IReactorTime,
                 ekt_cipher: EktCipher = EktCipher.AESKW_256,
                 events: EventBus | None = None, keepalive: float = 15.0,
                 oauth: Any = None, public_url: str | None = None,
                 form_secret: bytes | None = None, form_lifetime: int = 600,
                 groups: GroupCache | None = None, oidc_login: Any = None,
                 policy_defaults: dict[str, Any] | None = None,
                 audit: AuditLog | None = None) -> None:
        super().__init__()
        #: New conferences' policy where the request names none ([conferences] config).
        self.policy_defaults = dict(policy_defaults or {})
        #: Called with each conference created, changed or ended (the schedule timers).
        self.on_conference: Callable[[Conference], None] | None = None
        self.audit = audit if audit is not None else AuditLog(store, keys, issuer=issuer,
                                                              clock=clock)
        self.oidc_login = oidc_login
        self.groups = groups
        self.store = store
        self.kek = kek
        self.keys = keys
        self.idp_domain = idp_domain
        self.issuer = issuer
        self.clock = clock
        self.ekt_cipher = ekt_cipher
        self.events = events if events is not None else EventBus()
        self.keepalive = keepalive
        self._epoch_locks: dict[str, defer.DeferredLock] = {}
        conf = r"/v1/conferences/(?P<cid>[^/]+)"
        self._routes: Routes = [
            (re.compile(r"/\.well-known/jwks\.json"), {b"GET": self.jwks}),
            (re.compile(r"/v1/identity/assertions"), {b"POST": self.identity_assertion}),
            (re.compile(r"/v1/conferences"), {b"GET": self.list_conferences,
                                               b"POST": self.create_conference}),
            (re.compile(conf), {b"GET": self.show_conference,
                                b"PATCH": self.update_conference}),
            (re.compile(conf + r"/invitations"), {b"POST": self.invite}),
            (re.compile(conf + r"/invitation-check"), {b"POST": self.invitation_check}),
            (re.compile(conf + r"/invitations/(?P<identity>[^/]+)"),
             {b"GET": self.invitation, b"DELETE": self.uninvite}),
            (re.compile(conf + r"/start"), {b"POST": self.start}),
            (re.compile(conf + r"/end"), {b"POST": self.end}),
            (re.compile(conf + r"/media-distributors"), {b"POST": self.add_media_distributor}),
            (re.compile(conf + r"/media-distributors/(?P<tunnel>[^/]+)"),
             {b"DELETE": self.remove_media_distributor}),
            (re.compile(r"/v1/media-distributors"), {b"GET": self.list_media_distributors}),
            (re.compile(conf + r"/epochs"), {b"POST": self.new_epoch}),
            (re.compile(conf + r"/keys"), {b"POST": self.conference_key}),
            (re.compile(conf + r"/roster"), {b"GET": self.get_roster, b"PUT": self.put_roster}),
            (re.compile(conf + r"/audit"), {b"GET": self.get_audit, b"POST": self.report_audit}),
            (re.compile(r"/v1/events"), {b"GET": self.event_stream}),
        ]
        self.oauth = oauth
        self.public_url = (public_url or issuer).rstrip("/")
        self.form_secret = form_secret if form_secret is not None else secrets.token_bytes(32)
        self.form_lifetime = form_lifetime
        if oauth is not None:
            self._routes += [
                (re.compile(r"/\.well-known/oauth-authorization-server"),
                 {b"GET": self.oauth_metadata}),
                (re.compile(r"/oauth/authorize"), {b"GET": self.authorize_form,
                                                   b"POST": self.authorize_login}),
                (re.compile(r"/oauth/token"), {b"POST": self.oauth_token}),
                (re.compile(r"/oauth/revoke"), {b"POST": self.oauth_revoke}),
                (re.compile(r"/oauth/introspect"), {b"POST": self.oauth_introspect}),
                (re.compile(r"/oauth/oidc/callback"), {b"GET": self.oidc_callback}),
            ]

    # --- plumbing -----------------------------------------------------------

    def now(self) -> float:
        return self.clock.seconds()

    def problem_for(self, request: server.Request, failure: Failure) -> Problem:
        error = failure.value
        if isinstance(error, ConferenceNotFound):
            problem = Problem(404, "not-found", "Not found", "no such conference")
        elif isinstance(error, ConferenceEnded):
            problem = Problem(410, "conference-ended", "Conference ended",
                              "the conference has ended")
        elif isinstance(error, ConferenceExists):
            problem = Problem(409, "conference-exists", "Conference exists",
                              "a conference with that id exists")
        elif isinstance(error, InvalidTransition):
            problem = Problem(409, "invalid-transition", "Invalid state change", str(error))
        elif isinstance(error, StoreUnavailable):
            self.log.failure("conference store unavailable", failure)
            problem = Problem(503, "store-unavailable", "Service unavailable",
                              "the conference store cannot be reached")
        else:
            problem = super().problem_for(request, failure)
        return problem

    async def prepare(self, request: server.Request) -> None:
        """Look the bearer token's ``jti`` up on the revocation list, for :meth:`authorize`."""
        header = request.getHeader(b"authorization")
        if self.oauth is None or header is None or not request.path.startswith(b"/v1/"):
            return  # only the /v1 routes take bearer tokens
        kind, _, token = header.decode("latin-1").partition(" ")
        jti = unverified_jti(token.strip()) if kind.lower() == "bearer" else None
        if jti is not None and await self.oauth.access_token_revoked(jti, self.now()):
            request.perc_token_revoked = True  # type: ignore[attr-defined]

    def authorize(self, request: server.Request, scopes: tuple[str, ...], *,
                  bound: bool = False) -> AccessToken:
        """The request's verified token, holding at least one of ``scopes``."""
        header = request.getHeader(b"authorization")
        if header is None:
            raise _unauthorized("a bearer access token is required", error="")
        kind, _, token = header.decode("latin-1").partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise _unauthorized("the Authorization header must be 'Bearer <token>'",
                                error="invalid_request")
        try:
            verified = verify_access_token(
                token.strip(), self.keys, issuer=self.issuer, audience=self.issuer,
                now=self.now(), presented_certificate=peer_certificate_der(request.transport),
                require_certificate_binding=bound)
        except InsufficientScope as e:  # not raised without required_scopes; kept for safety
            raise Problem(403, "insufficient-scope", "Insufficient scope", str(e)) from None
        except CertificateMismatch as e:
            raise _unauthorized(f"certificate binding: {e}") from None
        except TokenError as e:
            raise _unauthorized(str(e)) from None
        if getattr(request, "perc_token_revoked", False):  # looked up by prepare()
            raise _unauthorized("the token has been revoked")
        if not verified.scopes.intersection(scopes):
            raise Problem(403, "insufficient-scope", "Insufficient scope",
                          "the token needs scope " + " or ".join(scopes),
                          headers={b"www-authenticate": (
                              f'Bearer realm="perc-kmf", error="insufficient_scope", '
                              f'scope="{" ".join(scopes)}"').encode()})
        return verified

    async def _invited(self, identity: str, conference: Conference) -> bool:
        """Whether ``identity`` is invited, directly or through an LDAP group.

        Compared in the normal form (``normalize_identity``), as stored.
        """
        try:
            identity = normalize_identity(identity)
        except ValueError:
            return False
        if identity in conference.invited:
            return True
        if not conference.invited_groups or self.groups is None:
            return False
        try:
            names = await self.groups.groups(identity)
        except Exception as e:
            self.log.warn("LDAP group look-up of {identity} failed: {error}",
                          identity=identity, error=getattr(e, "reason", None) or e)
            raise Problem(503, "directory-unavailable", "Service unavailable",
                          "the directory cannot be asked for group memberships") from None
        return any(group.casefold() in names for group in conference.invited_groups)

    # --- public ---------------------------------------------------------------

    async def jwks(self, request: server.Request) -> Response:
        return Response(200, self.keys.jwks(self.now()),
                        {b"content-type": b"application/jwk-set+json"})

    # --- identity assertions --------------------------------------------------

    async def identity_assertion(self, request: server.Request) -> Response:
        token = self.authorize(request, ("identity",), bound=True)
        body = read_json(request)
        fingerprints = body.get("fingerprints")
        if (not isinstance(fingerprints, list) or not fingerprints
                or len(fingerprints) > MAX_FINGERPRINTS):
            raise _bad_request(f"fingerprints must be a list of 1-{MAX_FINGERPRINTS} "
                               "sha-256 fingerprints (AA:BB:...)")
        digests = []
        for text in fingerprints:
            try:
                digest = parse_fingerprint(text)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise _bad_request(f"not a sha-256 fingerprint: {text!r}")
            digests.append(digest)
        audience = body.get("audience")
        if audience != "kd":
            try:
                check_conference_id(audience)
            except ValueError:
                raise _bad_request('audience must be "kd" or a conference id') from None
        # the token is bound: this is the presented certificate's digest
        if token.thumbprint not in digests:
            raise _forbidden("fingerprint-not-presented", "Fingerprint not presented",
                             "the TLS client certificate is not among the fingerprints")
        try:
            assertion = create_assertion(self.keys, idp_domain=self.idp_domain,
                                         identity=token.subject, fingerprints=digests,
                                         audience=audience, now=self.now(),
                                         lifetime=ASSERTION_LIFETIME)
        except ValueError as e:
            raise _forbidden("foreign-identity", "Identity not asserted", str(e)) from None
        return Response(201, json.loads(assertion))

    # --- conferences (admin) -------------------------------------------------

    async def list_conferences(self, request: server.Request) -> Response:
        self.authorize(request, ("admin",))
        state = request.args.get(b"state", [None])[0]
        if state is not None:
            try:
                state = ConferenceState(state.decode("latin-1"))
            except ValueError:
                raise _bad_request("state must be scheduled, running or ended") from None
        conferences = await self.store.list(state)
        return Response(200, {"conferences": [conference_json(c) for c in conferences]})

    async def create_conference(self, request: server.Request) -> Response:
        token = self.authorize(request, ("admin",))
        body = read_json(request)
        allowed = {"id", "title", "initiator", "invited", "invited_groups", "starts_at",
                   "ends_at", "late_joiners_get_earlier_epochs", "early_start", "grace",
                   "rekey_interval", "late_join"}
        unknown = set(body) - allowed
        if unknown:
            raise _bad_request("unknown member(s): " + ", ".join(sorted(unknown)))
        for name in ("invited", "invited_groups"):
            if not isinstance(body.get(name, []), list):
                raise _bad_request(f"{name} must be a list")
        initiator = body.get("initiator")
        if initiator is None:
            try:
                initiator = check_identity(token.subject)
            except ValueError:
                raise _bad_request(
                    f"initiator: name the conference's owner (user@domain); this token's "
                    f"subject {token.subject!r} is a client, not a user") from None
        policy = {name: body.get(name, self.policy_defaults.get(name))
                  for name in ("early_start", "grace", "rekey_interval")}
        policy = {name: value for name, value in policy.items() if value is not None}
        late_join = body.get("late_join")
        if late_join is None and "late_joiners_get_earlier_epochs" not in body:
            late_join = self.policy_defaults.get("late_join")
        try:
            conference = Conference(
                conference_id=body.get("id"),
                title=body.get("title", ""),
                initiator=initiator,
                invited=frozenset(body.get("invited", [])),
                invited_groups=frozenset(body.get("invited_groups", [])),
                starts_at=body.get("starts_at"),
                ends_at=body.get("ends_at"),
                late_joiners_get_earlier_epochs=body.get("late_joiners_get_earlier_epochs"),
                late_join=late_join,
                created_at=self.now(),
                **policy,
            )
        except (ValueError, TypeError) as e:
            raise _bad_request(str(e)) from None
        created = await self.store.create(conference)
        self._changed(created)
        await self._checkpoint(created.conference_id)
        location = f"/v1/conferences/{created.conference_id}".encode()
        return Response(201, conference_json(created), {b"location": location})

    async def show_conference(self, request: server.Request, cid: str) -> Response:
        self.authorize(request, ("admin",))
        conference = await self.store.get(_path_conference_id(cid))
        body = conference_json(conference)
        current = await self.store.current_epoch(conference.conference_id)
        body["epoch"] = current.epoch if current is not None else None
        return Response(200, body)

    async def update_conference(self, request: server.Request, cid: str) -> Response:
        """Change a conference's policy or title (members of POLICY_FIELDS; ``null``
        clears ``starts_at``/``ends_at``); the KDs get the ``policy`` event."""
        token = self.authorize(request, ("admin",))
        cid = _path_conference_id(cid)
        body = read_json(request)
        try:
            updated = await self.store.update(cid, body, self.now(), by=token.subject)
        except (ValueError, TypeError) as e:
            raise _bad_request(str(e)) from None
        await self._checkpoint(cid)
        self._changed(updated)
        self.events.publish("policy", {"conference": cid, **policy_json(updated)})
        return Response(200, conference_json(updated))

    def _changed(self, conference: Conference) -> None:
        if self.on_conference is not None:
            self.on_conference(conference)

    async def invite(self, request: server.Request, cid: str) -> Response:
        self.authorize(request, ("admin",))
        cid = _path_conference_id(cid)
        body = read_json(request)
        try:
            identity = check_identity(body.get("identity"))
        except ValueError as e:
            raise _bad_request(str(e)) from None
        await self.store.invite(cid, identity, self.now())
        await self._checkpoint(cid)
        return Response(200, conference_json(await self.store.get(cid)))

    async def invitation(self, request: server.Request, cid: str, identity: str) -> Response:
        """Whether ``identity`` (percent-decoded path segment) is invited, for a KD.

        "Invited" as for the key service: by name or, with LDAP, through one of
        the conference's ``invited_groups`` (503 if the directory cannot be
        asked).  The conference's ``state`` is reported, not checked: the KD
        admits only to running conferences.
        """
        self.authorize(request, ("kd", "admin"))
        cid = _path_conference_id(cid)
        try:
            identity = check_identity(identity)
        except ValueError as e:
            raise _bad_request(str(e)) from None
        conference = await self.store.get(cid)
        return Response(200, {
            "conference": conference.conference_id,
            "identity": identity,
            "invited": await self._invited(identity, conference),
            "state": str(conference.state),
            "late_joiners_get_earlier_epochs": conference.late_joiners_get_earlier_epochs,
            "late_join": conference.late_join,
            "rekey_interval": conference.rekey_interval,
            "schedule": schedule_status(conference, self.now()),
            "starts_at": conference.starts_at,
            "admission_opens_at": (None if conference.starts_at is None
                                   else conference.starts_at - conference.early_start),
        })

    async def uninvite(self, request: server.Request, cid: str, identity: str) -> Response:
        self.authorize(request, ("admin",))
        cid = _path_conference_id(cid)
        try:
            identity = check_identity(identity)
        except ValueError as e:
            raise _bad_request(str(e)) from None
        await self.store.uninvite(cid, identity, self.now())
        await self._checkpoint(cid)
        conference = await self.store.get(cid)
        await self._withdrawn(conference, identity)
        return Response(200, conference_json(conference))

    async def _withdrawn(self, conference: Conference, identity: str) -> bool:
        """Publish ``invitation-withdrawn`` if ``identity`` is no longer invited to a
        running conference, so that the KD closes its associations at once."""
        if conference.state is not ConferenceState.RUNNING:
            return False
        try:
            if await self._invited(identity, conference):
                return False  # still invited, e.g. through one of invited_groups
        except Problem:
            pass  # the directory is down: the KD's own check before any key decides
        self.events.publish("invitation-withdrawn", {"conference": conference.conference_id,
                                                     "identity": identity})
        return True

    async def invitation_check(self, request: server.Request, cid: str) -> Response:
        """Which of up to MAX_MEMBERS ``identities`` are invited now, for a KD about to
        hand out an epoch key (the membership check where a key leaves)."""
        self.authorize(request, ("kd", "admin"))
        cid = _path_conference_id(cid)
        body = read_json(request)
        identities = body.get("identities")
        if not isinstance(identities, list) or len(identities) > MAX_MEMBERS:
            raise _bad_request(f"identities must be a list of at most {MAX_MEMBERS}")
        try:
            wanted = list(dict.fromkeys(check_identity(i) for i in identities))
        except ValueError as e:
            raise _bad_request(str(e)) from None
        conference = await self.store.get(cid)
        verdicts = [await self._invited(i, conference) for i in wanted]
        return Response(200, {
            "conference": conference.conference_id,
            "state": str(conference.state),
            "invited": [i for i, ok in zip(wanted, verdicts, strict=True) if ok],
            "not_invited": [i for i, ok in zip(wanted, verdicts, strict=True) if not ok],
        })

    async def sweep_invitations(self) -> int:
        """Publish ``invitation-withdrawn`` for each admitted identity of a running
        conference with ``invited_groups`` that is no longer invited (it left the LDAP
        group: seen once the group cache refreshes).  Returns how many."""
        if self.groups is None:
            return 0
        withdrawn = 0
        for conference in await self.store.list(ConferenceState.RUNNING):
            if not conference.invited_groups:
                continue
            admitted = await self.store.admitted(conference.conference_id)
            if admitted is None:
                continue
            for identity in sorted({i for i, _ in admitted[1]}):
                if identity in conference.invited:
                    continue
                try:
                    invited = await self._invited(identity, conference)
                except Problem:
                    continue  # directory down: try again on the next sweep
                if not invited:
                    self.log.info("{identity} is no longer in an invited group of "
                                  "{conference}", identity=identity,
                                  conference=conference.conference_id)
                    self.events.publish("invitation-withdrawn", {
                        "conference": conference.conference_id, "identity": identity})
                    withdrawn += 1
        return withdrawn

    async def start(self, request: server.Request, cid: str) -> Response:
        self.authorize(request, ("admin",))
        cid = _path_conference_id(cid)
        conference = await self.store.set_state(cid, ConferenceState.RUNNING, self.now())
        epoch = await self.store.current_epoch(cid)
        if epoch is None:
            epoch = await self._add_epoch(cid)
        await self._checkpoint(cid)
        body = conference_json(conference)
        body["epoch"] = epoch.epoch
        return Response(200, body)

    async def end(self, request: server.Request, cid: str) -> Response:
        self.authorize(request, ("admin",))
        cid = _path_conference_id(cid)
        return Response(200, conference_json(await self.end_conference(cid, "admin")))

    async def end_conference(self, cid: str, cause: str) -> Conference:
        """End the conference (``perc-admin conferences end``, or its schedule): every
        stored key wiped, ``conference-ended`` to the KDs (which revoke the endpoints'
        keys and end it at the MDs).  ``cause``: "admin" or "schedule"."""
        before = await self.store.get(cid)
        await self.store.end(cid, self.now())
        after = await self.store.get(cid)
        await self._checkpoint(cid, final=True)
        if before.state is not ConferenceState.ENDED:
            self.conference_ended(cid, cause)
            self.events.publish("conference-ended", {"conference": cid, "cause": cause})
            self._changed(after)
        return after

    def conference_ended(self, cid: str, cause: str) -> None:
        """Hook: the conference ``cid`` has just ended (``cause`` "admin" or "schedule");
        the store has audited "ended".  Logged here; an audit trail may record more."""
        self.log.info("conference {conference} ended ({cause})", conference=cid, cause=cause)

    # --- Media Distributors (draft-roach-perc-webrtc slides 4.1.1 steps 9-11) ----

    @staticmethod
    def _tunnel(value: object) -> str:
        try:
            return check_tunnel_address(value)
        except TunnelAddressError as e:
            raise _bad_request(f"tunnel: {e}") from None

    async def add_media_distributor(self, request: server.Request, cid: str) -> Response:
        """Record the MD whose KD tunnel listener is ``tunnel`` for the conference and
        tell the KDs (event ``media-distributor``), so that one connects there."""
        self.authorize(request, ("admin",))
        cid = _path_conference_id(cid)
        body = read_json(request)
        unknown = set(body) - {"tunnel"}
        if unknown:
            raise _bad_request("unknown member(s): " + ", ".join(sorted(unknown)))
        tunnel = self._tunnel(body.get("tunnel"))
        if await self.store.add_media_distributor(cid, tunnel, self.now()):
            await self._checkpoint(cid)
            self.log.info("conference {conference}: media distributor {tunnel} added",
                          conference=cid, tunnel=tunnel)
        self.events.publish("media-distributor", {"conference": cid, "tunnel": tunnel})
        return Response(200, conference_json(await self.store.get(cid)))

    async def remove_media_distributor(self, request: server.Request, cid: str,
                                       tunnel: str) -> Response:
        """Take ``tunnel`` (percent-decoded path segment) off the conference's list."""
        self.authorize(request, ("admin",))
        cid = _path_conference_id(cid)
        tunnel = self._tunnel(tunnel)
        if await self.store.remove_media_distributor(cid, tunnel, self.now()):
            await self._checkpoint(cid)
            self.log.info("conference {conference}: media distributor {tunnel} removed",
                          conference=cid, tunnel=tunnel)
        return Response(200, conference_json(await self.store.get(cid)))

    async def list_media_distributors(self, request: server.Request) -> Response:
        """Every tunnel address of the conferences not ended, for a KD whose event
        stream has (re)connected."""
        self.authorize(request, ("kd",))
        return Response(200, {"media_distributors":
                              await self.store.active_media_distributors()})

    # --- epochs and keys ------------------------------------------------------

    async def _running(self, cid: str) -> Conference:
        """The conference, if it is running and within its schedule: else 410 (ended;
        one past ``ends_at + grace`` is ended now), 409 ``conference-not-running`` or
        403 ``not-started``."""
        conference = await self.store.get(cid)
        if conference.state is ConferenceState.ENDED:
            raise ConferenceEnded(cid)
        status = schedule_status(conference, self.now())
        if status == "over":
            await self.end_conference(cid, "schedule")
            raise ConferenceEnded(cid)
        if conference.state is not ConferenceState.RUNNING:
            raise Problem(409, "conference-not-running", "Conference not running",
                          f"the conference is {conference.state}")
        if status == "not_started":
            assert conference.starts_at is not None
            raise _forbidden("not-started", "Conference not started",
                             f"the conference admits endpoints and serves keys from "
                             f"{conference.starts_at - conference.early_start:.0f} (POSIX "
                             f"time), {conference.early_start:.0f} s before it starts")
        return conference

    async def _add_epoch(self, cid: str) -> EpochKey:
        """A new epoch with a fresh random EKT key, wrapped for its epoch number.

        Serialised per conference in this process; should another KMF sharing
        the store take the expected number first, the (unusable) epoch is
        superseded by trying again.
        """
        lock = self._epoch_locks.setdefault(cid, defer.DeferredLock())
        await lock.acquire()
        try:
            for _ in range(_EPOCH_ATTEMPTS):
                current = await self.store.current_epoch(cid)
                number = current.epoch + 1 if current is not None else 1
                spi = ((current.spi + 1) & 0xFFFF if current is not None
                       else secrets.randbelow(0x10000))
                key = secrets.token_bytes(self.ekt_cipher.key_length)
                wrapped = self.kek.wrap(key, conference_id=cid, epoch=number)
                added = await self.store.add_epoch(cid, spi, wrapped, self.now())
                if added.epoch == number:
                    await self._checkpoint(cid)
                    self.events.publish("epoch", {"conference": cid, "epoch": number,
                                                  "spi": spi})
                    return added
            raise StoreUnavailable(f"conference {cid!r}: epochs taken concurrently")
        finally:
            lock.release()
            if not lock.waiting:
                self._epoch_locks.pop(cid, None)

    async def new_epoch(self, request: server.Request, cid: str) -> Response:
        self.authorize(request, ("kd", "admin"))
        cid = _path_conference_id(cid)
        await self._running(cid)
        epoch = await self._add_epoch(cid)
        return Response(201, {"conference": cid, "epoch": epoch.epoch, "spi": epoch.spi,
                              "ekt_cipher": self.ekt_cipher.name})

    def _epoch_wanted(self, request: server.Request) -> int | None:
        raw = request.args.get(b"epoch", [None])[0]
        if raw is None:
            return None
        try:
            epoch = int(raw.decode("ascii"), 10)
        except (UnicodeDecodeError, ValueError):
            epoch = 0
        if epoch < 1 or not raw.isdigit():
            raise _bad_request("epoch must be a positive integer")
        return epoch

    async def conference_key(self, request: server.Request, cid: str) -> Response:
        token = self.authorize(request, ("keys", "kd"))
        cid = _path_conference_id(cid)
        wanted = self._epoch_wanted(request)
        conference = await self._running(cid)
        if "kd" not in token.scopes:
            if token.thumbprint is None:
                raise _unauthorized("certificate binding: a certificate-bound token is required")
            if not await self._invited(token.subject, conference):
                raise _forbidden("not-invited", "Not invited",
                                 "this identity is not invited to the conference")
        current = await self.store.current_epoch(cid)
        if current is None:
            raise Problem(409, "no-epoch", "No key yet", "the conference has no key epoch")
        if "kd" not in token.scopes:
            await self._check_admitted(cid, current.epoch, token)
        if wanted is not None and wanted != current.epoch:
            current = await self._earlier_epoch(conference, current, wanted, token)
        try:
            key = self.kek.unwrap(current.wrapped_key, conference_id=cid, epoch=current.epoch)
        except KeyUnwrapError:
            raise Problem(500, "internal-error", "Internal server error",
                          "the stored key cannot be unwrapped") from None
        if wanted is not None and "kd" not in token.scopes:
            self.history_key_delivered(cid, token.subject, token.thumbprint, current.epoch)
        header = format_encryption_key(cid, current.epoch, key).encode()
        # no key leaves unaudited: a store that cannot record it fails the request
        await self.audit.key_delivered(
            cid, identity=token.subject, epoch=current.epoch, spi=current.spi,
            recipient="kd" if "kd" in token.scopes else "endpoint",
            certificate=None if token.thumbprint is None else token.thumbprint.hex())
        return Response(200, {"conference": cid, "epoch": current.epoch, "spi": current.spi,
                              "ekt_cipher": EktCipher.AESKW_256.name if len(key) == 32
                              else EktCipher.AESKW_128.name},
                        {b"encryption-key": header})

    async def _earlier_epoch(self, conference: Conference, current: EpochKey, wanted: int,
                             token: Any) -> EpochKey:
        """The stored epoch ``wanted`` (< current) if the conference's policy gives late
        joiners its history (the caller is checked admitted already)."""
        if wanted > current.epoch:
            raise Problem(404, "unknown-epoch", "Unknown epoch",
                          f"epoch {wanted} has not been started")
        if conference.late_join != "history":
            raise _forbidden("history-not-allowed", "Earlier epochs not given",
                             f"the conference's late_join policy is {conference.late_join!r}: "
                             f"only the current epoch's key is served")
        for epoch in await self.store.epochs(conference.conference_id):
            if epoch.epoch == wanted:
                return epoch
        raise Problem(404, "unknown-epoch", "Unknown epoch", f"epoch {wanted} is not stored")

    def history_key_delivered(self, cid: str, identity: str, thumbprint: bytes | None,
                              epoch: int) -> None:
        """Hook: an earlier epoch's key (``late_join = "history"``) went to ``identity``
        (admitted with the certificate of SHA-256 ``thumbprint``).  Logged; an audit
        trail may record it too (never the key)."""
        self.log.info("conference {conference}: key of earlier epoch {epoch} delivered to "
                      "{identity} (late_join history)", conference=cid, epoch=epoch,
                      identity=identity,
                      fingerprint=thumbprint.hex() if thumbprint else None)

    async def _check_admitted(self, cid: str, epoch: int, token: Any) -> None:
        """403 unless the KD's report for ``epoch`` lists the token's subject with the
        certificate the token is bound to (issue 10: only current members get keys)."""
        admitted = await self.store.admitted(cid)
        if (admitted is None or admitted[0] != epoch
                or (token.subject, token.thumbprint) not in admitted[1]):
            raise _forbidden("not-admitted", "Not admitted",
                             "the key goes only to a current member of the conference, "
                             "with the certificate it joined with")

    # --- roster ---------------------------------------------------------------

    async def get_roster(self, request: server.Request, cid: str) -> Response:
        token = self.authorize(request, ("keys", "kd", "admin"))
        cid = _path_conference_id(cid)
        conference = await self.store.get(cid)
        if not token.scopes.intersection(("kd", "admin")) and (
                not await self._invited(token.subject, conference)):
            raise _forbidden("not-invited", "Not invited",
                             "this identity is not invited to the conference")
        roster = await self.store.roster(cid)
        if roster is None:
            raise Problem(404, "no-roster", "No roster", "no roster has been reported yet")
        return Response(200, {"conference": cid, "epoch": roster[0], "roster": roster[1]})

    async def put_roster(self, request: server.Request, cid: str) -> Response:
        self.authorize(request, ("kd",))
        cid = _path_conference_id(cid)
        body = read_json(request)
        epoch = body.get("epoch")
        members = body.get("members")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise _bad_request("epoch must be a positive integer")
        if not isinstance(members, list) or len(members) > MAX_MEMBERS:
            raise _bad_request(f"members must be a list of at most {MAX_MEMBERS}")
        pairs = []
        admitted = []
        for member in members:
            if (not isinstance(member, dict) or not {"identity", "ssrcs"} <= set(member)
                    or not set(member) <= {"identity", "ssrcs", "fingerprints"}):
                raise _bad_request('each member is {"identity": ..., "ssrcs": [...], '
                                   '"fingerprints": [...]}')
            pairs.append((member["identity"], member["ssrcs"]))
            fingerprints = member.get("fingerprints", [])
            if not isinstance(fingerprints, list) or len(fingerprints) > MAX_FINGERPRINTS:
                raise _bad_request(f"fingerprints must be a list of at most "
                                   f"{MAX_FINGERPRINTS}")
            try:
                admitted += [(member["identity"], parse_fingerprint(f)) for f in fingerprints]
            except ValueError as e:
                raise _bad_request(f"fingerprints: {e}") from None
        await self._running(cid)
        current = await self.store.current_epoch(cid)
        if current is None or epoch > current.epoch:
            raise Problem(409, "unknown-epoch", "Unknown epoch",
                          f"epoch {epoch} has not been started")
        try:
            signed = sign_roster(self.keys, issuer=self.issuer, conference_id=cid, epoch=epoch,
                                 members=pairs, now=self.now())
        except (ValueError, DuplicateSsrc) as e:
            raise _bad_request(str(e)) from None
        try:
            await self.store.set_roster(cid, epoch, signed, admitted)
        except ValueError as e:
            raise _bad_request(str(e)) from None
        return Response(200, {"conference": cid, "epoch": epoch, "roster": signed})

    # --- audit trail (issue 14; perc_daemons.kmf.audit) -----------------------

    async def _checkpoint(self, cid: str, *, final: bool = False) -> None:
        """Sign a checkpoint if one is due (or, ``final``, of whatever is unsigned)."""
        try:
            await self.audit.checkpoint(cid, force=final)
        except (StoreUnavailable, ConferenceNotFound) as e:
            self.log.warn("audit checkpoint of {conference} not signed: {error}",
                          conference=cid, error=str(e))

    async def get_audit(self, request: server.Request, cid: str) -> Response:
        """The trail (records in stored order, checkpoints) for an operator or auditor;
        verify it with the JWKS (``perc-admin audit verify``)."""
        self.authorize(request, ("auditor", "admin"))
        cid = _path_conference_id(cid)
        records, checkpoints = await self.store.audit_trail(cid)
        return Response(200, {"conference": cid,
                              "records": [r.to_json() for r in records],
                              "checkpoints": [c.to_json() for c in checkpoints]},
                        {b"cache-control": b"no-store"})

    async def report_audit(self, request: server.Request, cid: str) -> Response:
        """What only the KD sees (admissions, refusals, leaves, epochs started)."""
        self.authorize(request, ("kd",))
        cid = _path_conference_id(cid)
        body = read_json(request)
        if set(body) != {"events"}:
            raise _bad_request('the body is {"events": [...]}')
        try:
            recorded, duplicates = await self.audit.report(cid, body["events"])
        except ReportError as e:
            raise _bad_request(str(e)) from None
        return Response(200, {"conference": cid, "recorded": recorded,
                              "duplicates": duplicates})

    # --- events -----------------------------------------------------------------

    async def event_stream(self, request: server.Request) -> None:
        self.authorize(request, ("kd",))
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")

        def send(event_id: int, kind: str, data: dict[str, Any]) -> None:
            request.write(f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
                          .encode())

        request.write(b": perc-kmf events\n\n")
        unsubscribe = self.events.subscribe(send)
        keepalive = task.LoopingCall(lambda: request.write(b": keep-alive\n\n"))
        keepalive.clock = self.clock
        keepalive.start(self.keepalive, now=False)

        def gone(_: object) -> None:
            unsubscribe()
            if keepalive.running:
                keepalive.stop()

        request.notifyFinish().addBoth(gone)
        return None

    # --- OAuth 2.0 (RFC 6749, 7009, 7636, 7662, 8414, 8705) -----------------------

    def oauth_error(self, error: OAuthError) -> Response:
        """RFC 6749 s5.2 JSON error response."""
        status = error.status if 400 <= error.status < 500 else 400
        headers = {b"content-type": b"application/json", b"pragma": b"no-cache"}
        if isinstance(error, ClientAuthRateLimited):
            headers[b"retry-after"] = str(max(1, math.ceil(error.retry_after))).encode()
        elif error.error == "invalid_client":
            status = 401
            headers[b"www-authenticate"] = b'Basic realm="perc-kmf", charset="UTF-8"'
        return Response(status, error.response(), headers)

    @staticmethod
    def _single(pairs: list[tuple[str, str]]) -> dict[str, str]:
        params: dict[str, str] = {}
        for name, value in pairs:
            if name in params:  # RFC 6749 s3.1: no parameter more than once
                raise OAuthError("invalid_request", f"{name} given more than once")
            params[name] = value
        return params

    def _query(self, request: server.Request) -> dict[str, str]:
        query = request.uri.partition(b"?")[2]
        try:
            text = query.decode("ascii")
            pairs = urllib.parse.parse_qsl(text, keep_blank_values=True,
                                           errors="strict", max_num_fields=64)
        except (UnicodeDecodeError, ValueError):
            raise OAuthError("invalid_request", "malformed query") from None
        return self._single(pairs)

    def _form(self, request: server.Request) -> dict[str, str]:
        """The ``application/x-www-form-urlencoded`` body, or OAuthError invalid_request."""
        if getattr(request, "body_too_large", False):
            raise Problem(413, "body-too-large", "Request body too large",
                          f"the body may be at most {request.channel.site.max_body} bytes")
        content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
        if content_type.split(";", 1)[0].strip().lower() != _FORM_CONTENT_TYPE:
            raise OAuthError("invalid_request", f"the body must be {_FORM_CONTENT_TYPE}")
        request.content.seek(0)
        raw = request.content.read()
        try:
            text = raw.decode("ascii")
            pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text),
                                           encoding="utf-8", errors="strict",
                                           max_num_fields=64)
        except (UnicodeDecodeError, ValueError):
            raise OAuthError("invalid_request", "malformed form body") from None
        return self._single(pairs)

    def _client_auth(self, request: server.Request,
                     params: dict[str, str]) -> tuple[str, str] | None:
        """HTTP Basic client credentials (RFC 6749 s2.3.1), or None for a public client."""
        if "client_secret" in params:
            raise OAuthError("invalid_request", "send client credentials with HTTP Basic")
        header = request.getHeader(b"authorization")
        if header is None:
            return None
        kind, _, value = header.decode("latin-1").partition(" ")
        if kind.lower() != "basic":
            raise OAuthError("invalid_client", "use HTTP Basic client authentication", 401)
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise OAuthError("invalid_client", "malformed Basic credentials", 401) from None
        client_id, sep, secret = decoded.partition(":")
        if not sep:
            raise OAuthError("invalid_client", "malformed Basic credentials", 401)
        try:
            return (urllib.parse.unquote_plus(client_id, errors="strict"),
                    urllib.parse.unquote_plus(secret, errors="strict"))
        except UnicodeDecodeError:
            raise OAuthError("invalid_client", "malformed Basic credentials", 401) from None

    async def oauth_metadata(self, request: server.Request) -> Response:
        base = self.public_url
        return Response(200, {
            "issuer": self.issuer,
            "authorization_endpoint": base + "/oauth/authorize",
            "token_endpoint": base + "/oauth/token",
            "revocation_endpoint": base + "/oauth/revoke",
            "introspection_endpoint": base + "/oauth/introspect",
            "jwks_uri": base + "/.well-known/jwks.json",
            "scopes_supported": list(API_SCOPES),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "client_credentials",
                                      "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
            "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
            "tls_client_certificate_bound_access_tokens": True,
            "authorization_response_iss_parameter_supported": True,
        })

    async def oauth_token(self, request: server.Request) -> Response:
        try:
            params = self._form(request)
            client_auth = self._client_auth(request, params)
            grant_type = params.pop("grant_type", "")
            if not grant_type:
                raise OAuthError("invalid_request", "missing grant_type")
            body = await self.oauth.token(grant_type, params, client_auth,
                                          peer_certificate_der(request.transport), self.now(),
                                          source_address=_host(request))
        except OAuthError as e:
            return self.oauth_error(e)
        return Response(200, body, {b"pragma": b"no-cache"})

    async def oauth_revoke(self, request: server.Request) -> Response:
        try:
            params = self._form(request)
            client_auth = self._client_auth(request, params)
            await self.oauth.revoke(params.get("token"), params.get("token_type_hint"),
                                    client_auth, self.now(), client_id=params.get("client_id"),
                                    source_address=_host(request))
        except OAuthError as e:
            return self.oauth_error(e)
        return Response(200, None, {b"pragma": b"no-cache"})

    async def oauth_introspect(self, request: server.Request) -> Response:
        try:
            params = self._form(request)
            client_auth = self._client_auth(request, params)
            body = await self.oauth.introspect(params.get("token"), client_auth, self.now(),
                                               source_address=_host(request))
        except OAuthError as e:
            return self.oauth_error(e)
        return Response(200, body, {b"pragma": b"no-cache"})

    # login form

    def _form_token(self, params: dict[str, str], issued: int, nonce: str,
                    binding: str) -> str:
        """``issued.nonce.mac``: the form's time and one-time nonce, bound to the browser."""
        message = json.dumps([issued, nonce, binding]
                             + [params.get(n, "") for n in AUTHORIZE_PARAMS])
        mac = hmac.new(self.form_secret, b"perc-kmf login form\0" + message.encode(),
                       hashlib.sha256).digest()
        return f"{issued}.{nonce}.{b64url_encode(mac)}"

    def _form_token_open(self, params: dict[str, str], token: str | None,
                         binding: str) -> tuple[int, str] | None:
        """``(issued, nonce)`` of a valid, unexpired token for these parameters and browser."""
        if not token or len(token) > 128 or token.count(".") != 2:
            return None
        issued_text, nonce, _ = token.split(".")
        if (not issued_text.isascii() or not issued_text.isdigit()  # int() takes e.g. "²"
                or not _BINDING.fullmatch(nonce)):
            return None
        issued = int(issued_text)
        age = self.now() - issued
        if age < -5 or age > self.form_lifetime:
            return None
        expected = self._form_token(params, issued, nonce, binding)
        return (issued, nonce) if hmac.compare_digest(token.encode(), expected.encode()) else None

    @staticmethod
    def _binding(request: server.Request) -> str | None:
        """The browser binding of the request's ``__Host-perc-login`` cookie, if well formed."""
        value = request.getCookie(_LOGIN_COOKIE)
        text = value.decode("latin-1") if value is not None else ""
        return text if _BINDING.fullmatch(text) else None

    def _login_cookie(self, binding: str) -> bytes:
        # __Host-: Secure, Path=/, no Domain (RFC 6265bis s4.1.3.2).  Lax, not Strict: the
        # form is usually reached by a cross-site redirect from the client, which must
        # carry the cookie so that several tabs share one binding; a cross-site POST never does.
        return (_LOGIN_COOKIE + b"=" + binding.encode("ascii")
                + f"; Path=/; Max-Age={self.form_lifetime}; Secure; HttpOnly; SameSite=Lax"
                .encode())

    @staticmethod
    def _origin_key(origin: str) -> tuple[str, str, int] | None:
        try:
            parts = urllib.parse.urlsplit(origin)
            port = parts.port
        except ValueError:
            return None
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            return None
        return parts.scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[parts.scheme]

    def _same_origin(self, request: server.Request) -> bool:
        """False when the request's ``Origin`` is present and not the KMF's own.

        Own origins: that of ``public_url``, and ``https://`` + the ``Host`` the
        browser asked for.  ``Origin: null`` (opaque) is not the KMF's.
        """
        origin = request.getHeader(b"origin")
        if origin is None:
            return True
        got = self._origin_key(origin.decode("latin-1").strip())
        if got is None:
            return False
        own = {self._origin_key(self.public_url)}
        host = request.getHeader(b"host")
        if host is not None:
            own.add(self._origin_key("https://" + host.decode("latin-1").strip()))
        return got in own

    def _html(self, status: int, title: str, body: str, *, form_origin: str | None = None,
              headers: dict[bytes, Any] | None = None) -> Response:
        # form-action also governs the redirect after the POST (CSP 3): allow the client's origin
        form_action = "'self'" + (f" {form_origin}" if form_origin else "")
        page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title></head>\n<body>\n"
                f"<h1>{html.escape(title)}</h1>\n{body}</body></html>\n")
        all_headers = {
            b"content-type": b"text/html; charset=utf-8",
            b"content-security-policy": (
                f"default-src 'none'; form-action {form_action}; frame-ancestors 'none'; "
                "base-uri 'none'").encode(),
            b"x-frame-options": b"DENY",
            b"x-content-type-options": b"nosniff",
            # not no-referrer: the browser would then send "Origin: null" with the POST
            b"referrer-policy": b"same-origin",
            b"pragma": b"no-cache",
        }
        all_headers.update(headers or {})
        return Response(status, page.encode("utf-8"), all_headers)

    def _error_page(self, status: int, message: str) -> Response:
        return self._html(status, "Sign-in error", f"<p>{html.escape(message)}</p>\n")

    @staticmethod
    def _origin(uri: str) -> str | None:
        parts = urllib.parse.urlsplit(uri)
        origin = f"{parts.scheme}://{parts.netloc}"
        return origin if _CSP_ORIGIN.fullmatch(origin) else None

    def _login_page(self, request: server.Request, params: dict[str, str], *,
                    status: int = 200, message: str = "",
                    headers: dict[bytes, Any] | None = None) -> Response:
        """The login form, bound to the browser's ``__Host-perc-login`` cookie (set, or renewed)."""
        e = html.escape
        fields = "".join(
            f'<input type="hidden" name="{n}" value="{e(params[n])}">\n'
            for n in AUTHORIZE_PARAMS if n in params)
        binding = self._binding(request) or b64url_encode(secrets.token_bytes(16))
        nonce = b64url_encode(secrets.token_bytes(16))
        token = self._form_token(params, int(self.now()), nonce, binding)
        cookies = [self._login_cookie(binding)]
        headers = dict(headers or {})
        if b"set-cookie" in headers:
            cookies.append(headers[b"set-cookie"])
        headers[b"set-cookie"] = cookies
        notice = f'<p role="alert">{e(message)}</p>\n' if message else ""
        upstream = ""
        form_origin = self._origin(params.get("redirect_uri", ""))
        if self.oidc_login is not None:
            # form-action also governs the redirect to the provider (CSP 3)
            provider = self._origin(self.oidc_login.authorization_endpoint)
            form_origin = " ".join(o for o in (form_origin, provider) if o)
            upstream = ('<form method="post" action="/oauth/authorize">\n'
                        f"{fields}"
                        f'<input type="hidden" name="csrf_token" value="{e(token)}">\n'
                        '<input type="hidden" name="login" value="oidc">\n'
                        f'<p><button type="submit">Sign in with {e(self.oidc_login.name)}'
                        '</button></p>\n</form>\n')
        body = (f"<p>Sign in to {e(self.idp_domain)} for <b>{e(params.get('client_id', ''))}</b>"
                f" (scope: {e(params.get('scope', '') or 'default')}).</p>\n{notice}"
                '<form method="post" action="/oauth/authorize">\n'
                f"{fields}"
                f'<input type="hidden" name="csrf_token" value="{e(token)}">\n'
                '<p><label>Username <input name="username" autocomplete="username" '
                'required autofocus></label></p>\n'
                '<p><label>Password <input type="password" name="password" '
                'autocomplete="current-password" required></label></p>\n'
                '<p><button type="submit">Sign in</button></p>\n</form>\n'
                f"{upstream}")
        return self._html(status, "Sign in", body, form_origin=form_origin or None,
                          headers=headers)

    def _form_refused(self, status: int, message: str) -> Response:
        return self._error_page(status, message + "; go back to the application and start "
                                                  "again.")

    async def _checked_authorize(self, params: dict[str, str], username: str | None,
                                 password: str | None, address: str | None) -> str:
        return await self.oauth.authorize(
            params.get("client_id"), params.get("redirect_uri"), params.get("response_type"),
            params.get("scope"), params.get("state"), params.get("code_challenge"),
            params.get("code_challenge_method"), username, password, address, self.now())

    def _authorize_refused(self, error: OAuthError) -> Response:
        url = error.redirect_url()
        if url is None:  # unknown client or redirect URI: never redirect (RFC 6749 s4.1.2.1)
            return self._error_page(400, f"The request is invalid: {error.description}.")
        return Response(302, None, {b"location": url.encode("utf-8")})

    async def authorize_form(self, request: server.Request) -> Response:
        try:
            params = self._query(request)
        except OAuthError as e:
            return self._error_page(400, f"The request is invalid: {e.description}.")
        params = {k: v for k, v in params.items() if k in AUTHORIZE_PARAMS}
        try:
            # No credentials: the server validates the whole request, then refuses the
            # (absent) login with LoginFailed, which here means "valid: show the form".
            await self._checked_authorize(params, None, None, None)
        except LoginFailed:
            return self._login_page(request, params)
        except OAuthError as e:
            return self._authorize_refused(e)
        raise AssertionError("authorize succeeded without credentials")  # pragma: no cover

    async def authorize_login(self, request: server.Request) -> Response:
        if not self._same_origin(request):  # login CSRF: a form posted from another site
            self.log.warn("login form POST refused: Origin {origin}",
                          origin=(request.getHeader(b"origin") or b"")[:100])
            return self._form_refused(403, "This sign-in form was sent from another site")
        try:
            form = self._form(request)
        except OAuthError as e:
            return self._error_page(400, f"The request is invalid: {e.description}.")
        params = {k: v for k, v in form.items() if k in AUTHORIZE_PARAMS}
        binding = self._binding(request)
        if binding is None:
            return self._form_refused(403, "This sign-in needs cookies, and must be completed "
                                           "in the browser it started in")
        opened = self._form_token_open(params, form.get("csrf_token"), binding)
        if opened is None:
            return self._form_refused(403, "This sign-in form is invalid or has expired")
        issued, nonce = opened
        try:
            first = await self.oauth.first_use("login form", nonce,
                                               issued + self.form_lifetime + 10, self.now())
        except StoreUnavailable:
            self.log.warn("login form refused: the grant store is unavailable")
            return self._error_page(503, "Sign-in is unavailable at the moment; try again "
                                         "later.")
        if not first:
            return self._form_refused(403, "This sign-in form has already been used")
        if form.get("login") == "oidc":
            return await self._oidc_start(params)
        try:
            url = await self._checked_authorize(params, form.get("username"),
                                                form.get("password"), _host(request))
        except LoginRateLimited as e:
            wait = str(max(1, math.ceil(e.retry_after))).encode()
            return self._login_page(request, params, status=429,
                                    message="Too many failed sign-ins; try again later.",
                                    headers={b"retry-after": wait})
        except LoginFailed:
            return self._login_page(request, params, message="Invalid username or password.")
        except OAuthError as e:
            return self._authorize_refused(e)
        return Response(302, None, {b"location": url.encode("utf-8")})

    # sign-in at the upstream OpenID Connect provider

    _STATE_COOKIE = b"__Host-perc-oidc"
    _STATE_LABEL = b"perc-kmf oidc state\0"

    def _derive(self, label: bytes, state_id: str) -> str:
        return b64url_encode(hmac.new(self.form_secret, label + state_id.encode("ascii"),
                                      hashlib.sha256).digest())

    def _oidc_state(self, params: dict[str, str], issued: int, state_id: str) -> str:
        payload = b64url_encode(json.dumps(
            [1, issued, state_id, {n: params[n] for n in AUTHORIZE_PARAMS if n in params}],
            separators=(",", ":")).encode("utf-8"))
        mac = hmac.new(self.form_secret, self._STATE_LABEL + payload.encode("ascii"),
                       hashlib.sha256).digest()
        return f"{payload}.{b64url_encode(mac)}"

    def _oidc_state_open(self, state: str | None) -> tuple[str, dict[str, str]] | None:
        """(state id, the pending request's parameters) of a valid, unexpired state."""
        if not state or len(state) > 8192 or state.count(".") != 1:
            return None
        payload, _, mac_text = state.partition(".")
        mac = hmac.new(self.form_secret, self._STATE_LABEL + payload.encode("ascii", "replace"),
                       hashlib.sha256).digest()
        if not hmac.compare_digest(mac_text.encode("ascii", "replace"),
                                   b64url_encode(mac).encode("ascii")):
            return None
        try:
            version, issued, state_id, params = json.loads(
                base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, TypeError, binascii.Error):
            return None
        age = self.now() - issued
        if version != 1 or age < -5 or age > self.form_lifetime:
            return None
        return state_id, params

    async def _oidc_start(self, params: dict[str, str]) -> Response:
        if self.oidc_login is None:
            return self._error_page(400, "Sign-in with an identity provider is not enabled.")
        try:
            self._check_request(params)
        except OAuthError as e:
            return self._authorize_refused(e)
        state_id = b64url_encode(secrets.token_bytes(16))
        state = self._oidc_state(params, int(self.now()), state_id)
        verifier = self._derive(b"perc-kmf oidc pkce\0", state_id)
        challenge = b64url_encode(hashlib.sha256(verifier.encode("ascii")).digest())
        url = self.oidc_login.authorization_url(
            self.public_url + "/oauth/oidc/callback", state,
            self._derive(b"perc-kmf oidc nonce\0", state_id), challenge)
        cookie = (self._STATE_COOKIE + b"=" + state_id.encode("ascii")
                  + f"; Path=/; Max-Age={self.form_lifetime}; Secure; HttpOnly; SameSite=Lax"
                  .encode())
        return Response(303, None, {b"location": url.encode("utf-8"), b"set-cookie": cookie})

    def _check_request(self, params: dict[str, str]) -> Any:
        return self.oauth.check_request(
            params.get("client_id"), params.get("redirect_uri"), params.get("response_type"),
            params.get("scope"), params.get("state"), params.get("code_challenge"),
            params.get("code_challenge_method"))

    async def oidc_callback(self, request: server.Request) -> Response:
        if self.oidc_login is None:
            return self._error_page(404, "Sign-in with an identity provider is not enabled.")
        try:
            query = self._query(request)
        except OAuthError as e:
            return self._error_page(400, f"The request is invalid: {e.description}.")
        opened = self._oidc_state_open(query.get("state"))
        if opened is None:
            return self._error_page(400, "This sign-in is invalid or has expired; "
                                         "go back to the application and start again.")
        state_id, params = opened
        cookie = request.getCookie(self._STATE_COOKIE)
        if cookie is None or not hmac.compare_digest(cookie, state_id.encode("ascii")):
            return self._error_page(403, "This sign-in was started in another browser; "
                                         "go back to the application and start again.")
        try:
            first = await self.oauth.first_use("oidc state", state_id,
                                               self.now() + self.form_lifetime + 10, self.now())
        except StoreUnavailable:
            self.log.warn("oidc sign-in refused: the grant store is unavailable")
            return self._error_page(503, "Sign-in is unavailable at the moment; try again "
                                         "later.")
        if not first:
            return self._error_page(400, "This sign-in has already been used; "
                                         "go back to the application and start again.")
        clear = {b"set-cookie": self._STATE_COOKIE
                 + b"=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Lax"}
        name = self.oidc_login.name
        try:
            pending = self._check_request(params)
            if "error" in query:
                error = query["error"]
                self.log.warn("oidc sign-in refused by the provider: {error}", error=error[:64])
                if error == "temporarily_unavailable":
                    raise pending.refuse(error, f"{name} is temporarily unavailable")
                if error == "server_error":
                    raise pending.refuse(error, f"{name} failed")
                raise pending.refuse("access_denied", f"{name} refused the sign-in")
            code = query.get("code")
            if not code or len(code) > 4096:
                raise pending.refuse("server_error", f"{name} sent no authorization code")
            redirect_uri = self.public_url + "/oauth/oidc/callback"
            try:
                id_token = await self.oidc_login.exchange(
                    code, redirect_uri, self._derive(b"perc-kmf oidc pkce\0", state_id))
            except TokenEndpointError as e:
                self.log.warn("oidc token endpoint: {reason}", reason=e.reason)
                raise pending.refuse("temporarily_unavailable" if e.transient else "server_error",
                                     f"{name} could not complete the sign-in") from None
            try:
                identity = await self.oidc_login.authenticate(
                    id_token, self._derive(b"perc-kmf oidc nonce\0", state_id))
            except BackendUnavailable as e:
                self.log.warn("oidc sign-in: {reason}", reason=e.reason)
                raise pending.refuse("temporarily_unavailable",
                                     f"{name} could not be checked") from None
            except (AuthenticationFailed, UnsupportedCredentials) as e:
                self.log.warn("oidc sign-in refused: {reason}",
                              reason=getattr(e, "reason", type(e).__name__))
                return self._login_page(request, params, message=f"Sign-in with {name} failed.",
                                        headers=clear)
            url = await self.oauth.complete(pending, identity, self.now())
        except OAuthError as e:
            refused = self._authorize_refused(e)
            refused.headers = {**(refused.headers or {}), **clear}
            return refused
        return Response(302, None, {b"location": url.encode("utf-8"), **clear})


def kmf_site(api: KmfApi, *, max_body: int = 65536) -> server.Site:
    site = AccessLogSite(api, requestFactory=LimitedRequest)
    site.max_body = max_body  # type: ignore[attr-defined]
    site.displayTracebacks = False
    site.noisy = False
    return site
