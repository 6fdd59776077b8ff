"""The endpoint's client of the IdP/KMF: OAuth login, identity assertion, signed roster.

Login (:meth:`KmfClient.login`) is what a browser-based user agent does with
the KMF's public client ``perc-endpoint``: OAuth 2.0 authorization code grant
(RFC 6749 s4.1) with PKCE S256 (RFC 7636 s4.2):

1. ``GET /oauth/authorize?response_type=code&client_id&redirect_uri&scope&
   state&code_challenge&code_challenge_method=S256`` returns the HTML login
   form; every hidden input of the form that has the password field is kept
   (the request parameters and the KMF's ``csrf_token``), and so are the
   cookies the page sets (``__Host-perc-login`` binds the form to this
   client, as it does to a browser);
2. the form is posted back with ``username`` and ``password`` and those
   cookies (each form works once); the answer is a
   302 to ``redirect_uri`` whose query carries ``code``, ``state`` (must be
   ours: RFC 6749 s10.12) and ``iss`` (must be the KMF's issuer from its RFC
   8414 metadata: RFC 9207 s2.4).  The login page shown again means the
   credentials were refused: :class:`LoginFailed` with the page's message;
3. ``POST /oauth/token`` (``grant_type=authorization_code``, ``code``,
   ``redirect_uri``, ``client_id``, ``code_verifier``).

Every request to the KMF presents the endpoint's DTLS certificate as TLS
client certificate, so the access token carries ``cnf`` ``x5t#S256`` of that
certificate (RFC 8705 s3.1); the token is refused here if it does not.  The
token is kept in the client object only: never logged, never in ``repr``.

Then :meth:`KmfClient.assertion` asks ``POST /v1/identity/assertions`` for an
RFC 8827 identity assertion binding the user's identity to the certificate's
fingerprint for one audience (the conference id), and
:meth:`KmfClient.verified_roster` fetches ``GET /v1/conferences/{id}/roster``
and checks it with the KMF's JWKS (:func:`~perc_daemons.protocol.roster.verify_roster`).
"""

from __future__ import annotations

import base64
import hashlib
import html.parser
import json
import secrets
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from perc_daemons.endpoint.https import (
    ClientTlsPolicy,
    EndpointHttpError,
    HttpsClient,
    problem_text,
)
from perc_daemons.problems import parse_problem
from perc_daemons.protocol import jsontext
from perc_daemons.protocol.dtls import certificate_fingerprint, format_fingerprint
from perc_daemons.protocol.ekt import EktCipher, EktParameterSet, derive_master_salt
from perc_daemons.protocol.encryption_key import parse_encryption_key
from perc_daemons.protocol.roster import Roster, verify_roster

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_REDIRECT_URI",
    "DEFAULT_SCOPE",
    "KmfClient",
    "KmfError",
    "KmfRefused",
    "LoginFailed",
    "LoginForm",
    "parse_login_form",
    "pkce_pair",
]

DEFAULT_CLIENT_ID = "perc-endpoint"
DEFAULT_REDIRECT_URI = "http://127.0.0.1/callback"
DEFAULT_SCOPE = "identity keys"
_FORM = "application/x-www-form-urlencoded"


class KmfError(EndpointHttpError):
    """The KMF could not be used (bad answer, protocol violation)."""


class KmfRefused(KmfError):
    """The KMF refused a request: ``status``, ``title`` and ``detail`` say why."""

    def __init__(self, status: int, title: str, detail: str = "", slug: str = "") -> None:
        super().__init__(f"{title} ({status})" + (f": {detail}" if detail else ""))
        self.status = status
        self.title = title
        self.detail = detail
        #: The problem type's machine-readable last part (e.g. ``history-not-allowed``).
        self.slug = slug


class LoginFailed(KmfError):
    """The KMF refused the sign-in; ``message`` is what its login page (or error) said."""

    def __init__(self, message: str) -> None:
        super().__init__(f"login refused: {message}")
        self.message = message


def pkce_pair() -> tuple[str, str]:
    """A fresh ``(code_verifier, code_challenge)`` for PKCE S256 (RFC 7636 s4.1-4.2)."""
    verifier = secrets.token_urlsafe(48)  # 64 characters of [A-Za-z0-9_-]
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return verifier, challenge


@dataclass
class LoginForm:
    """One HTML form: its action, hidden inputs, and whether it asks for a password."""

    action: str = ""
    method: str = "get"
    hidden: dict[str, str] = field(default_factory=dict)
    has_password: bool = False


class _FormParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[LoginForm] = []
        self._current: LoginForm | None = None
        self._in_alert = False
        self.alerts: list[str] = []
        self._paragraph: list[str] | None = None
        self.paragraphs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag == "form":
            self._current = LoginForm(a.get("action", ""), a.get("method", "get").lower())
            self.forms.append(self._current)
        elif tag == "input" and self._current is not None:
            kind = a.get("type", "text").lower()
            if kind == "hidden" and a.get("name"):
                self._current.hidden[a["name"]] = a.get("value", "")
            elif kind == "password":
                self._current.has_password = True
        elif tag == "p":
            self._in_alert = a.get("role") == "alert"
            self._paragraph = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None
        elif tag == "p" and self._paragraph is not None:
            text = " ".join("".join(self._paragraph).split())
            (self.alerts if self._in_alert else self.paragraphs).append(text)
            self._paragraph, self._in_alert = None, False

    def handle_data(self, data: str) -> None:
        if self._paragraph is not None:
            self._paragraph.append(data)


def parse_login_form(page: str) -> tuple[LoginForm | None, list[str], list[str]]:
    """(the form with a password field or None, alert messages, other paragraphs)."""
    parser = _FormParser()
    parser.feed(page)
    parser.close()
    form = next((f for f in parser.forms if f.has_password), None)
    return form, parser.alerts, parser.paragraphs


def _cookies(headers: Any) -> dict[str, str]:
    """``name -> value`` of the cookies a response sets (RFC 6265 s4.1), for the login POST."""
    cookies: dict[str, str] = {}
    for line in headers.getRawHeaders("set-cookie") or []:
        name, sep, rest = line.partition("=")
        value = rest.split(";", 1)[0].strip()
        name = name.strip()
        if sep and name and all(c.isalnum() or c in "-_." for c in name) and all(
                0x21 <= ord(c) <= 0x7E and c not in '",;\\' for c in value):
            cookies[name] = value
    return cookies


def _bearer(token: str) -> str:
    return f"Bearer {token}"


class KmfClient:
    """The KMF's HTTPS API as the endpoint uses it (see the module docstring).

    ``ca`` are the trust roots for the KMF's server certificate;
    ``certificate`` is the endpoint's DTLS certificate ``(DER, private key)``,
    presented as TLS client certificate on every request.
    """

    def __init__(self, reactor: Any, url: str, *, ca: Sequence[x509.Certificate],
                 certificate: tuple[bytes, ec.EllipticCurvePrivateKey],
                 client_id: str = DEFAULT_CLIENT_ID,
                 redirect_uri: str = DEFAULT_REDIRECT_URI, scope: str = DEFAULT_SCOPE,
                 issuer: str | None = None) -> None:
        self.reactor = reactor
        self.http = HttpsClient(reactor, url, ClientTlsPolicy(ca, client_certificate=certificate))
        self.client_id = client_id
        self.redirect_uri = redirect_uri
        self.scope = scope
        self.fingerprint = certificate_fingerprint(certificate[0])
        self._issuer = issuer
        self._token: str | None = None
        self.subject: str | None = None
        self.token_expires_at: float | None = None

    def __repr__(self) -> str:
        return (f"<KmfClient {self.http.base} client_id={self.client_id!r} "
                f"logged_in={self._token is not None}>")

    @property
    def logged_in(self) -> bool:
        return self._token is not None

    async def close(self) -> None:
        await self.http.close()

    # --- discovery --------------------------------------------------------------------

    async def issuer(self) -> str:
        """The KMF's issuer (RFC 8414 metadata, unless given to the constructor)."""
        if self._issuer is None:
            code, body, content = await self.http.json(
                "GET", "/.well-known/oauth-authorization-server")
            if code != 200:
                raise KmfRefused(code, *problem_text(code, content))
            if not isinstance(body, dict) or not isinstance(body.get("issuer"), str):
                raise KmfError("the KMF's metadata (RFC 8414) has no issuer")
            self._issuer = body["issuer"]
        return self._issuer

    async def jwks(self) -> dict[str, Any]:
        code, body, content = await self.http.json("GET", "/.well-known/jwks.json")
        if code != 200:
            raise KmfRefused(code, *problem_text(code, content))
        if not isinstance(body, dict):
            raise KmfError("the KMF's JWKS is not a JSON object")
        return body

    # --- login ------------------------------------------------------------------------

    async def login(self, username: str, password: str) -> None:
        """Sign in (authorization code + PKCE); keeps a certificate-bound access token.

        Raises :class:`LoginFailed` when the credentials are refused,
        :class:`KmfRefused` / :class:`KmfError` for anything else.
        """
        issuer = await self.issuer()
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(24)
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": self.client_id,
            "redirect_uri": self.redirect_uri, "scope": self.scope, "state": state,
            "code_challenge": challenge, "code_challenge_method": "S256"})
        code, headers, content = await self.http.request(
            "GET", "/oauth/authorize?" + query, headers={"Accept": "text/html"})
        if code in (301, 302, 303, 307, 308):
            self._callback(headers, state, issuer)  # raises: no code without a login
            raise KmfError("the KMF issued a code without a login")
        form = self._form(code, content)
        cookies = _cookies(headers)
        fields = dict(form.hidden)
        fields.update(username=username, password=password)
        action = urllib.parse.urljoin(self.http.base + "/oauth/authorize", form.action or "")
        if not action.startswith(self.http.base + "/"):
            raise KmfError(f"the login form posts elsewhere ({action!r})")
        post_headers = {"Content-Type": _FORM, "Accept": "text/html"}
        if cookies:
            post_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        code, headers, content = await self.http.request(
            "POST", action, headers=post_headers,
            data=urllib.parse.urlencode(fields).encode("utf-8"))
        if code in (200, 401, 429):
            _, alerts, _ = parse_login_form(content.decode("utf-8", "replace"))
            raise LoginFailed(alerts[0] if alerts else f"HTTP {code}")
        if code not in (301, 302, 303, 307, 308):
            raise KmfRefused(code, *self._page_text(code, content))
        authorization_code = self._callback(headers, state, issuer)
        await self._exchange(authorization_code, verifier)

    def _form(self, code: int, content: bytes) -> LoginForm:
        if code != 200:
            raise KmfRefused(code, *self._page_text(code, content))
        form, _, _ = parse_login_form(content.decode("utf-8", "replace"))
        if form is None:
            raise KmfError("the KMF's authorization page has no login form")
        return form

    @staticmethod
    def _page_text(code: int, content: bytes) -> tuple[str, str]:
        _, alerts, paragraphs = parse_login_form(content.decode("utf-8", "replace"))
        texts = alerts + paragraphs
        if texts:
            return f"HTTP {code}", texts[0]
        return problem_text(code, content)

    def _callback(self, headers: Any, state: str, issuer: str) -> str:
        """The ``code`` of the redirect to our redirect URI, after its checks."""
        locations = headers.getRawHeaders("location") or []
        if len(locations) != 1:
            raise KmfError("the KMF redirected without a Location")
        location = locations[0]
        parts = urllib.parse.urlsplit(location)
        expected = urllib.parse.urlsplit(self.redirect_uri)
        if (parts.scheme, parts.netloc, parts.path) != (expected.scheme, expected.netloc,
                                                        expected.path):
            raise KmfError("the KMF redirected somewhere else than our redirect_uri")
        params = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        if params.get("state") != state:
            raise KmfError("the authorization response does not carry our state")
        if params.get("iss") != issuer:  # RFC 9207 s2.4
            raise KmfError("the authorization response's iss is not the KMF's issuer")
        if "error" in params:
            description = params.get("error_description", "")
            if params["error"] == "access_denied":
                raise LoginFailed(description or "access denied")
            raise KmfRefused(302, params["error"], description)
        code = params.get("code")
        if not code:
            raise KmfError("the authorization response has no code")
        return code

    async def _exchange(self, authorization_code: str, verifier: str) -> None:
        body = urllib.parse.urlencode({
            "grant_type": "authorization_code", "client_id": self.client_id,
            "code": authorization_code, "redirect_uri": self.redirect_uri,
            "code_verifier": verifier}).encode("ascii")
        code, _, content = await self.http.request(
            "POST", "/oauth/token", headers={"Content-Type": _FORM, "Accept": "application/json"},
            data=body)
        if code != 200:
            raise KmfRefused(code, *problem_text(code, content))
        try:
            answer = jsontext.loads(content)
        except jsontext.JsonError:
            answer = None
        if (not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str)
                or str(answer.get("token_type", "")).lower() != "bearer"):
            raise KmfError("bad token response (no Bearer access_token)")
        token = answer["access_token"]
        try:  # our own token's claims, for the binding check only (the KMF verifies it)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise KmfError("the access token is not a JWT (RFC 9068)") from None
        thumbprint = base64.urlsafe_b64encode(self.fingerprint).rstrip(b"=").decode()
        cnf = claims.get("cnf") if isinstance(claims, dict) else None
        if not isinstance(cnf, dict) or cnf.get("x5t#S256") != thumbprint:
            raise KmfError("the access token is not bound to our certificate (RFC 8705)")
        self._token = token
        self.subject = claims.get("sub") if isinstance(claims.get("sub"), str) else None
        exp = claims.get("exp")
        self.token_expires_at = float(exp) if isinstance(exp, int | float) else None

    def _require_token(self) -> str:
        if self._token is None:
            raise KmfError("not logged in")
        return self._token

    # --- identity assertion -------------------------------------------------------------

    async def assertion(self, audience: str) -> str:
        """The RFC 8827 assertion JSON (compact) for our fingerprint and ``audience``."""
        token = self._require_token()
        code, body, content = await self.http.json(
            "POST", "/v1/identity/assertions",
            {"fingerprints": [format_fingerprint(self.fingerprint)], "audience": audience},
            token=token)
        if code not in (200, 201):
            raise KmfRefused(code, *problem_text(code, content))
        if not isinstance(body, dict) or not isinstance(body.get("assertion"), str):
            raise KmfError("the identity assertion response is not an RFC 8827 assertion")
        return json.dumps(body, separators=(",", ":"))

    # --- the key service (seed 1 section 6.3) ---------------------------------------------

    async def conference_key(self, conference_id: str) -> tuple[int, bytes]:
        """(epoch, EKT key) of ``conference_id`` from the KMF's key service.

        A user agent's second way to its EKT key (the first is EKTKey over
        DTLS, RFC 8870): the KMF answers only a current member, admitted by the
        KD with the certificate this client presents (403 ``not-admitted``
        otherwise, raised as :class:`KmfRefused`).
        """
        epoch, _body, key = await self._key(conference_id, None)
        return epoch, key

    async def epoch_parameters(self, conference_id: str, epoch: int | None = None
                               ) -> tuple[int, EktParameterSet]:
        """(epoch, EKT parameter set) of the current epoch or of an earlier ``epoch``
        (``?epoch=N``: only under the conference's ``late_join = "history"`` policy,
        else :class:`KmfRefused` with slug ``history-not-allowed``; ``unknown-epoch``
        for one not stored).  The set is the KD's (RFC 8870 s4.2): the key from the
        ``Encryption-Key`` header, SPI and cipher from the body, the salt from
        :func:`~perc_daemons.protocol.ekt.derive_master_salt`; its ttl the longest
        (it opens a recording, not live media)."""
        number, body, key = await self._key(conference_id, epoch)
        try:
            params = EktParameterSet(key=key, cipher=EktCipher[body["ekt_cipher"]],
                                     master_salt=derive_master_salt(key, conference_id,
                                                                    number),
                                     spi=body["spi"], ttl=(1 << 24) - 1)
        except (KeyError, TypeError, ValueError) as e:
            raise KmfError(f"the key service's answer is unusable: {type(e).__name__}"
                           ) from None
        return number, params

    async def _key(self, conference_id: str, epoch: int | None
                   ) -> tuple[int, dict[str, Any], bytes]:
        token = self._require_token()
        path = f"/v1/conferences/{quote(conference_id, safe='')}/keys"
        if epoch is not None:
            path += f"?epoch={int(epoch)}"
        code, headers, content = await self.http.request(
            "POST", path, headers={"Accept": "application/json",
                                   "Authorization": _bearer(token)})
        if code != 200:
            problem = parse_problem(code, content)
            raise KmfRefused(code, problem.title, problem.detail, problem.slug)
        try:
            body = json.loads(content)
            number = body["epoch"]
            [header] = headers.getRawHeaders("encryption-key") or [None]
            if not isinstance(number, int) or header is None:
                raise ValueError("no epoch or no Encryption-Key header")
            if epoch is not None and number != epoch:
                raise ValueError(f"asked for epoch {epoch}, given {number}")
            return number, body, parse_encryption_key(header, conference_id, number)
        except (ValueError, KeyError, TypeError) as e:
            raise KmfError(f"the key service's answer is unusable: {e}") from None

    # --- roster -------------------------------------------------------------------------

    async def roster(self, conference_id: str) -> tuple[int | None, str]:
        """(epoch the KMF reports, signed roster JWS) of ``conference_id``, unverified."""
        token = self._require_token()
        code, body, content = await self.http.json(
            "GET", f"/v1/conferences/{quote(conference_id, safe='')}/roster", token=token)
        if code != 200:
            raise KmfRefused(code, *problem_text(code, content))
        if not isinstance(body, dict) or not isinstance(body.get("roster"), str):
            raise KmfError("the roster response has no roster")
        epoch = body.get("epoch")
        return (epoch if isinstance(epoch, int) else None), body["roster"]

    async def verified_roster(self, conference_id: str, *, now: float,
                              min_epoch: int | None = None) -> Roster:
        """The roster, verified with the KMF's JWKS (raises RosterError subclasses)."""
        _, signed = await self.roster(conference_id)
        jwks = await self.jwks()
        return verify_roster(signed, jwks, issuer=await self.issuer(),
                             conference_id=conference_id, now=now, min_epoch=min_epoch)
