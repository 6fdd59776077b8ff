"""Sign-in at an upstream OpenID Connect provider through perc-kmf's /oauth/authorize.

A real in-process HTTPS KMF (the set-up of :mod:`tests.unit.test_kmf_oauth_http`)
and a real provider run here as a small Twisted web server on loopback: an
authorization endpoint that sends the browser back with a code for a chosen
user, a token endpoint that checks the client secret and the PKCE verifier
and signs ID tokens with a real EC key, and the JWKS of
:mod:`tests.unit.test_auth`.  The "browser" follows the redirects by hand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import urllib.parse

import jwt
import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent

from perc_daemons import config
from perc_daemons.kmf import service
from perc_daemons.kmf.auth.oidc import OidcAuthenticator, OidcLogin
from perc_daemons.kmf.tokens import verify_access_token
from tests.unit import test_kmf_oauth_http as oauth_http
from tests.unit.test_auth import CLIENT, EC1, ISSUER, JwksResource, listen

CLIENT_SECRET = "provider s3cret:/+"
PUBLIC_URL = "https://kmf.example.com:8443"
CALLBACK = PUBLIC_URL + "/oauth/oidc/callback"
COOKIE = "__Host-perc-oidc"


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()
                                    ).rstrip(b"=").decode()


def query_of(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


class AuthorizeEndpoint(resource.Resource):
    """Signs the user in at once: back to redirect_uri with a code (or ``error``)."""

    isLeaf = True

    def __init__(self, provider: Provider) -> None:
        super().__init__()
        self.provider = provider

    def render_GET(self, request):
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        self.provider.authorize_requests.append(args)
        if args.get("client_id") != CLIENT or args.get("redirect_uri") != CALLBACK:
            request.setResponseCode(400)
            return b"bad client"
        back = [("state", args["state"])]
        if self.provider.deny:
            back.insert(0, ("error", "access_denied"))
        else:
            code = secrets.token_urlsafe(16)
            self.provider.codes[code] = args
            back.insert(0, ("code", code))
        request.setResponseCode(302)
        request.setHeader(b"location",
                          (CALLBACK + "?" + urllib.parse.urlencode(back)).encode())
        return b""


class TokenEndpoint(resource.Resource):
    """Client secret (HTTP Basic), one-time code, redirect_uri and PKCE checked."""

    isLeaf = True

    def __init__(self, provider: Provider) -> None:
        super().__init__()
        self.provider = provider

    def answer(self, request, status, body):
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def render_POST(self, request):
        p = self.provider
        p.token_requests += 1
        if p.token_status != 200:
            return self.answer(request, p.token_status, {"error": "temporarily_unavailable"})
        user = urllib.parse.unquote_plus(request.getUser().decode())
        password = urllib.parse.unquote_plus(request.getPassword().decode())
        if (user, password) != (CLIENT, CLIENT_SECRET):
            return self.answer(request, 401, {"error": "invalid_client"})
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        grant = p.codes.pop(args.get("code", ""), None)
        if (grant is None or args.get("grant_type") != "authorization_code"
                or args.get("redirect_uri") != grant["redirect_uri"]):
            return self.answer(request, 400, {"error": "invalid_grant"})
        if (grant.get("code_challenge_method") != "S256"
                or s256(args.get("code_verifier", "")) != grant["code_challenge"]):
            return self.answer(request, 400, {"error": "invalid_grant"})
        p.exchanges += 1
        now = int(reactor.seconds())
        claims = {"iss": ISSUER, "aud": CLIENT, "sub": "u-1", "email": p.email,
                  "email_verified": True, "nonce": grant["nonce"], "iat": now,
                  "exp": now + 300}
        claims.update(p.claims)
        claims = {k: v for k, v in claims.items() if v is not None}
        token = jwt.encode(claims, EC1, algorithm="ES256", headers={"kid": "ec1"})
        return self.answer(request, 200, {"access_token": "at", "token_type": "Bearer",
                                          "id_token": token})


class Provider:
    """The upstream OpenID Connect provider: /authorize, /token, /jwks.json."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.authorize_requests: list[dict[str, str]] = []
        self.codes: dict[str, dict[str, str]] = {}
        self.token_requests = 0
        self.exchanges = 0
        self.token_status = 200
        self.deny = False
        self.email = "carol@example.com"
        self.claims: dict[str, object] = {}
        root = resource.Resource()
        root.putChild(b"authorize", AuthorizeEndpoint(self))
        root.putChild(b"token", TokenEndpoint(self))
        root.putChild(b"jwks.json", JwksResource())
        port = listen(test, server.Site(root))
        self.base = f"http://127.0.0.1:{port}"


class OidcLoginTests(unittest.TestCase):
    timeout = 20

    call = oauth_http.OAuthHttpTests.call
    header = oauth_http.OAuthHttpTests.header
    authorize_query = oauth_http.OAuthHttpTests.authorize_query
    login_form = oauth_http.OAuthHttpTests.login_form
    token = oauth_http.OAuthHttpTests.token

    def setUp(self):
        d = defer.ensureDeferred(self._setUp())
        return d

    async def _setUp(self):
        await oauth_http.OAuthHttpTests.setUp(self)
        self.provider = Provider(self)
        self.authenticator = OidcAuthenticator(ISSUER, CLIENT, self.provider.base + "/jwks.json",
                                               domain=oauth_http.DOMAIN, timeout=5)
        self.api.oidc_login = self.login_with(CLIENT_SECRET)

    def login_with(self, secret: str) -> OidcLogin:
        return OidcLogin(self.authenticator, self.provider.base + "/authorize",
                         self.provider.base + "/token", secret, name="Example IdP", timeout=5)

    # --- the browser ------------------------------------------------------------------

    async def start(self):
        """Login page -> "Sign in with Example IdP" -> the provider's redirect back.

        Returns the callback path (with query) and the cookie the KMF set.
        """
        _, page, fields = await self.login_form()
        self.assertIn("Sign in with Example IdP", page)
        self.assertIn('name="login" value="oidc"', page)
        response, content = await self.call("POST", "/oauth/authorize",
                                            form=dict(fields, login="oidc"))
        self.assertEqual(response.code, 303, content)
        location = self.header(response, "location")
        self.assertTrue(location.startswith(self.provider.base + "/authorize?"), location)
        cookie = self.header(response, "set-cookie")
        self.assertIn("Secure", cookie)
        self.assertIn("HttpOnly", cookie)
        name, _, value = cookie.split(";")[0].partition("=")
        self.assertEqual(name, COOKIE)
        at_provider = await treq.get(location, allow_redirects=False,
                                     agent=Agent(reactor, pool=self.pool))
        await treq.content(at_provider)
        self.assertEqual(at_provider.code, 302)
        back = at_provider.headers.getRawHeaders("location")[0]
        self.assertTrue(back.startswith(CALLBACK + "?"), back)
        return back[len(PUBLIC_URL):], f"{COOKIE}={value}"

    async def callback(self, path, cookie):
        headers = {"Cookie": cookie} if cookie else {}
        return await self.call("GET", path, headers=headers)

    async def refused_at_login_page(self, path, cookie):
        response, content = await self.callback(path, cookie)
        self.assertEqual(response.code, 200, content)
        self.assertIsNone(self.header(response, "location"))
        page = content.decode()
        self.assertIn("Sign-in with Example IdP failed.", page)
        self.assertIn('name="password"', page)  # the login form again
        return page

    def assertClientError(self, response, error):
        self.assertEqual(response.code, 302)
        location = self.header(response, "location")
        self.assertTrue(location.startswith(oauth_http.REDIRECT + "?"), location)
        query = query_of(location)
        self.assertEqual(query, {"error": error, "error_description": query.get(
            "error_description"), "state": oauth_http.STATE, "iss": oauth_http.ISSUER})
        self.assertNotIn("code", query)

    def assertErrorPage(self, response, content, status):
        self.assertEqual(response.code, status, content)
        self.assertIsNone(self.header(response, "location"))
        self.assertEqual(self.header(response, "content-type"), "text/html; charset=utf-8")
        self.assertIn("Sign-in error", content.decode())

    # --- the flow -------------------------------------------------------------------

    async def test_full_flow(self):
        csp = self.header((await self.call("GET", self.authorize_query()))[0],
                          "content-security-policy")
        self.assertIn(self.provider.base, csp)  # the POST may redirect to the provider
        path, cookie = await self.start()
        sent = self.provider.authorize_requests[-1]
        self.assertEqual(sent["response_type"], "code")
        self.assertEqual(sent["scope"], "openid email")
        self.assertEqual(sent["redirect_uri"], CALLBACK)
        self.assertEqual(sent["code_challenge_method"], "S256")
        self.assertRegex(sent["code_challenge"], r"^[A-Za-z0-9_-]{43}$")
        self.assertGreaterEqual(len(sent["nonce"]), 22)
        self.assertNotEqual(sent["state"], oauth_http.STATE)  # the KMF's own, signed state

        response, content = await self.callback(path, cookie)
        self.assertEqual(response.code, 302, content)
        self.assertEqual(self.provider.exchanges, 1)  # secret and PKCE verifier accepted
        location = self.header(response, "location")
        self.assertTrue(location.startswith(oauth_http.REDIRECT + "?"), location)
        query = query_of(location)
        self.assertEqual(query["state"], oauth_http.STATE)
        self.assertEqual(query["iss"], oauth_http.ISSUER)
        self.assertIn("Max-Age=0", self.header(response, "set-cookie"))

        _, body = await self.token({"grant_type": "authorization_code", "client_id": "webapp",
                                    "code": query["code"], "redirect_uri": oauth_http.REDIRECT,
                                    "code_verifier": oauth_http.VERIFIER})
        access = verify_access_token(body["access_token"], self.keys, issuer=oauth_http.ISSUER,
                                     audience=oauth_http.ISSUER, now=reactor.seconds(),
                                     presented_certificate=self.alice_cert.der)
        self.assertEqual(access.subject, "carol@example.com")
        self.assertEqual(access.scopes, frozenset({"identity", "keys"}))

        # the state is one-time: the same callback again is refused before the provider
        response, content = await self.callback(path, cookie)
        self.assertErrorPage(response, content, 400)
        self.assertIn("already been used", content.decode())
        self.assertEqual(self.provider.token_requests, 1)

    async def test_wrong_state(self):
        path, cookie = await self.start()
        query = query_of(path)
        state = query["state"]
        payload, _, mac = state.partition(".")
        for bad in (payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"),
                    payload[:-4] + "." + mac, "", "x.y"):
            query["state"] = bad
            response, content = await self.callback(
                "/oauth/oidc/callback?" + urllib.parse.urlencode(query), cookie)
            self.assertErrorPage(response, content, 400)
        self.assertEqual(self.provider.token_requests, 0)
        # the genuine state still works (the bad ones did not burn it)
        response, _ = await self.callback(path, cookie)
        self.assertEqual(response.code, 302)
        self.assertIn("code", query_of(self.header(response, "location")))

    async def test_state_needs_the_browser_cookie(self):
        path, cookie = await self.start()
        response, content = await self.callback(path, None)
        self.assertErrorPage(response, content, 403)
        response, content = await self.callback(path, f"{COOKIE}=someone-else")
        self.assertErrorPage(response, content, 403)
        self.assertEqual(self.provider.token_requests, 0)
        response, _ = await self.callback(path, cookie)  # the browser that started it
        self.assertEqual(response.code, 302)
        self.assertIn("code", query_of(self.header(response, "location")))

    async def test_expired_state(self):
        path, cookie = await self.start()
        later = reactor.seconds() + self.api.form_lifetime + 1
        self.patch(self.api, "now", lambda: later)
        response, content = await self.callback(path, cookie)
        self.assertErrorPage(response, content, 400)
        self.assertEqual(self.provider.token_requests, 0)

    async def test_replayed_state_after_failure(self):
        self.provider.claims = {"nonce": "not-the-nonce"}
        path, cookie = await self.start()
        await self.refused_at_login_page(path, cookie)
        self.provider.claims = {}
        response, content = await self.callback(path, cookie)
        self.assertErrorPage(response, content, 400)
        self.assertEqual(self.provider.token_requests, 1)

    async def test_access_denied_at_the_provider(self):
        self.provider.deny = True
        path, cookie = await self.start()
        self.assertEqual(query_of(path)["error"], "access_denied")
        response, _ = await self.callback(path, cookie)
        self.assertClientError(response, "access_denied")
        self.assertEqual(self.provider.token_requests, 0)

    async def test_wrong_nonce(self):
        self.provider.claims = {"nonce": "attacker-nonce"}
        path, cookie = await self.start()
        await self.refused_at_login_page(path, cookie)
        self.assertEqual(self.provider.exchanges, 1)

    async def test_missing_nonce(self):
        self.provider.claims = {"nonce": None}
        path, cookie = await self.start()
        await self.refused_at_login_page(path, cookie)

    async def test_expired_id_token(self):
        now = int(reactor.seconds())
        self.provider.claims = {"iat": now - 900, "exp": now - 600}
        path, cookie = await self.start()
        await self.refused_at_login_page(path, cookie)

    async def test_email_not_verified(self):
        self.provider.claims = {"email_verified": False}
        path, cookie = await self.start()
        await self.refused_at_login_page(path, cookie)

    async def test_identity_outside_the_domain(self):
        self.provider.email = "mallory@evil.example"
        path, cookie = await self.start()
        await self.refused_at_login_page(path, cookie)

    async def test_bad_client_secret(self):
        self.api.oidc_login = self.login_with("wrong secret")
        path, cookie = await self.start()
        response, _ = await self.callback(path, cookie)
        self.assertClientError(response, "server_error")
        self.assertEqual(self.provider.token_requests, 1)
        self.assertEqual(self.provider.exchanges, 0)

    async def test_token_endpoint_unavailable(self):
        self.provider.token_status = 503
        path, cookie = await self.start()
        response, _ = await self.callback(path, cookie)
        self.assertClientError(response, "temporarily_unavailable")

    async def test_not_configured(self):
        self.api.oidc_login = None
        _, page, fields = await self.login_form()
        self.assertNotIn("Sign in with", page)
        response, content = await self.call("POST", "/oauth/authorize",
                                            form=dict(fields, login="oidc"))
        self.assertErrorPage(response, content, 400)
        response, content = await self.callback("/oauth/oidc/callback?code=a&state=b", None)
        self.assertErrorPage(response, content, 404)

    async def test_start_needs_the_form_token(self):
        _, _, fields = await self.login_form()
        fields["csrf_token"] = fields["csrf_token"][:-2] + "AA"
        response, content = await self.call("POST", "/oauth/authorize",
                                            form=dict(fields, login="oidc"))
        self.assertErrorPage(response, content, 403)
        self.assertEqual(self.provider.authorize_requests, [])


class OidcLoginConfigTests(unittest.TestCase):
    """[auth.oidc] authorization_endpoint, token_endpoint, client_secret_file."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.secret = os.path.join(self.dir, "secret")
        with open(self.secret, "w") as f:
            f.write(CLIENT_SECRET + "\n")
        os.chmod(self.secret, 0o600)

    def cfg(self, **oidc):
        values = {"issuer": ISSUER, "audience": CLIENT,
                  "jwks_url": "https://idp.example.com/jwks"}
        values.update(oidc)
        return config.validate("kmf", "kmf.toml", {
            "idp": {"domain": "example.com"}, "auth": {"backends": ["oidc"], "oidc": values}})

    def endpoints(self, **over):
        values = {"authorization_endpoint": "https://idp.example.com/authorize",
                  "token_endpoint": "https://idp.example.com/token",
                  "client_secret_file": self.secret}
        values.update(over)
        return values

    def login(self, cfg):
        return service.oidc_login(cfg, service.auth_backends(cfg, reactor), reactor)

    def test_enabled(self):
        login = self.login(self.cfg(name="Example IdP", **self.endpoints()))
        self.assertIsInstance(login, OidcLogin)
        self.assertEqual((login.name, login.client_id), ("Example IdP", CLIENT))
        self.assertEqual(login.token_endpoint, "https://idp.example.com/token")

    def test_disabled_by_default(self):
        self.assertIsNone(self.login(self.cfg()))

    def test_keys_go_together(self):
        for key in ("authorization_endpoint", "token_endpoint", "client_secret_file"):
            with self.assertRaises(config.ConfigError) as cm:
                self.cfg(**self.endpoints(**{key: ""}))
            self.assertIn(f"auth.oidc.{key}", str(cm.exception))

    def test_secret_file_mode_checked(self):
        os.chmod(self.secret, 0o644)
        with self.assertRaises(config.ConfigError) as cm:
            self.login(self.cfg(**self.endpoints()))
        self.assertIn("auth.oidc.client_secret_file", str(cm.exception))

    def test_plain_http_only_on_loopback(self):
        with self.assertRaises(config.ConfigError) as cm:
            self.login(self.cfg(**self.endpoints(token_endpoint="http://idp.example.com/t")))
        self.assertIn("auth.oidc.token_endpoint", str(cm.exception))
        login = self.login(self.cfg(**self.endpoints(
            token_endpoint="http://127.0.0.1:8080/token")))
        self.assertIsNotNone(login)
