"""Tests for perc_daemons.kmf.tokens (RFC 9068 access tokens, cnf binding)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.trial import unittest

from perc_daemons.kmf.signing import SigningKeys
from perc_daemons.kmf.tokens import (
    AccessToken,
    CertificateMismatch,
    ExpiredToken,
    InsufficientScope,
    InvalidToken,
    TokenError,
    WrongAudience,
    WrongIssuer,
    certificate_thumbprint,
    issue_access_token,
    unverified_jti,
    verify_access_token,
)

T0 = 1_800_000_000
ISSUER = "https://idp.example.com"
AUDIENCE = "kmf"
CERT = b"0\x82\x01\x00 a DER certificate"
OTHER_CERT = b"0\x82\x01\x00 another certificate"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(signature)}"


class TokenTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.keys = SigningKeys.create(Path(self.mktemp()), T0, max_token_lifetime=600)

    def issue(self, **overrides: Any) -> str:
        kwargs: dict[str, Any] = {
            "issuer": ISSUER,
            "subject": "alice@example.com",
            "audience": AUDIENCE,
            "client_id": "perc-endpoint",
            "scopes": ["conference:join", "keys:read"],
            "now": T0,
        }
        kwargs.update(overrides)
        return issue_access_token(self.keys, **kwargs)

    def verify(self, token: str, **overrides: Any) -> AccessToken:
        kwargs: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "now": T0 + 1}
        kwargs.update(overrides)
        keys = kwargs.pop("keys", self.keys)
        return verify_access_token(token, keys, **kwargs)

    def claims(self, token: str) -> dict[str, Any]:
        return jwt.decode(token, options={"verify_signature": False})

    # --- round trip ---------------------------------------------------------

    def test_round_trip(self) -> None:
        token = self.issue()
        header = jwt.get_unverified_header(token)
        self.assertEqual(header, {"alg": "ES256", "typ": "at+jwt", "kid": self.keys.active.kid})
        claims = self.claims(token)
        self.assertEqual(claims["exp"], T0 + 300)
        self.assertEqual(claims["iat"], T0)
        self.assertEqual(claims["scope"], "conference:join keys:read")
        self.assertEqual(len(base64.urlsafe_b64decode(claims["jti"] + "==")), 16)
        self.assertNotIn("cnf", claims)
        result = self.verify(token, required_scopes=["keys:read"])
        self.assertEqual(
            result,
            AccessToken(
                subject="alice@example.com",
                client_id="perc-endpoint",
                scopes=frozenset({"conference:join", "keys:read"}),
                expires_at=T0 + 300,
                jti=claims["jti"],
                thumbprint=None,
            ),
        )

    def test_verify_with_published_jwks(self) -> None:
        token = self.issue()
        result = self.verify(token, keys=self.keys.jwks(T0))
        self.assertEqual(result.subject, "alice@example.com")

    def test_jti_random_or_given(self) -> None:
        self.assertNotEqual(self.claims(self.issue())["jti"], self.claims(self.issue())["jti"])
        self.assertEqual(self.verify(self.issue(jti="one-time-1")).jti, "one-time-1")

    def test_unverified_jti(self) -> None:
        self.assertEqual(unverified_jti(self.issue(jti="j-1")), "j-1")
        for token in ("", "a.b", "a.b.c.d", craft({}, {"jti": 7}), craft({}, {"sub": "x"}),
                      craft({}, {"jti": ""}), craft({}, {"jti": "x" * 257}),
                      "e30.!!!.e30", "e30.WzFd.e30", "x" * 9000):
            self.assertIsNone(unverified_jti(token), token[:40])

    def test_issue_refuses_bad_arguments(self) -> None:
        self.assertRaises(ValueError, self.issue, lifetime=601)  # beyond key retention
        self.assertRaises(ValueError, self.issue, lifetime=0)
        self.assertRaises(ValueError, self.issue, scopes=["two words"])
        self.assertRaises(ValueError, self.issue, scopes=['quote"'])
        self.assertRaises(ValueError, self.issue, certificate_thumbprint=b"short")
        self.assertRaises(ValueError, self.issue, subject="")

    # --- times ----------------------------------------------------------------

    def test_expired(self) -> None:
        token = self.issue()
        self.verify(token, now=T0 + 299)
        self.assertRaises(ExpiredToken, self.verify, token, now=T0 + 300)
        self.verify(token, now=T0 + 300, leeway=5)
        self.assertRaises(ExpiredToken, self.verify, token, now=T0 + 305, leeway=5)

    def test_not_yet_valid(self) -> None:
        token = self.issue(now=T0 + 100)
        e = self.assertRaises(InvalidToken, self.verify, token, now=T0)
        self.assertIn("not valid yet", str(e))
        self.verify(token, now=T0 + 90, leeway=10)

    def test_nbf_in_future(self) -> None:
        claims = self.claims(self.issue())
        claims["nbf"] = T0 + 50
        token = jwt.encode(
            claims,
            self.keys.active.private_key,
            algorithm="ES256",
            headers={"kid": self.keys.active.kid, "typ": "at+jwt"},
        )
        self.assertRaises(InvalidToken, self.verify, token, now=T0 + 10)
        self.verify(token, now=T0 + 50)

    # --- claims -----------------------------------------------------------------

    def test_wrong_audience(self) -> None:
        token = self.issue(audience="kd")
        self.assertRaises(WrongAudience, self.verify, token)
        self.verify(token, audience="kd")

    def test_audience_list(self) -> None:
        token = self.issue(audience=["kd", AUDIENCE])
        self.verify(token)
        self.verify(token, audience="kd")
        self.assertRaises(WrongAudience, self.verify, token, audience="md")

    def test_wrong_issuer(self) -> None:
        token = self.issue(issuer="https://evil.example.net")
        self.assertRaises(WrongIssuer, self.verify, token)

    def test_insufficient_scope(self) -> None:
        token = self.issue(scopes=["conference:join"])
        e = self.assertRaises(
            InsufficientScope, self.verify, token, required_scopes=["conference:join", "admin"]
        )
        self.assertIn("admin", str(e))
        self.verify(token, required_scopes=["conference:join"])

    def test_missing_required_claim(self) -> None:
        for claim in ("client_id", "jti", "sub", "iat", "exp"):
            claims = self.claims(self.issue())
            del claims[claim]
            token = jwt.encode(
                claims,
                self.keys.active.private_key,
                algorithm="ES256",
                headers={"kid": self.keys.active.kid, "typ": "at+jwt"},
            )
            self.assertRaises(InvalidToken, self.verify, token)

    def test_ill_typed_claims(self) -> None:
        for name, value in (("exp", "later"), ("exp", True), ("scope", ["a"]), ("sub", 5),
                            ("cnf", "x"), ("cnf", {"x5t#S256": "!!"})):
            claims = self.claims(self.issue())
            claims[name] = value
            token = jwt.encode(
                claims,
                self.keys.active.private_key,
                algorithm="ES256",
                headers={"kid": self.keys.active.kid, "typ": "at+jwt"},
            )
            self.assertRaises(InvalidToken, self.verify, token)

    # --- signatures and headers ---------------------------------------------

    def test_alg_none_refused(self) -> None:
        claims = self.claims(self.issue())
        token = craft({"alg": "none", "typ": "at+jwt", "kid": self.keys.active.kid}, claims)
        self.assertRaises(InvalidToken, self.verify, token)
        self.assertRaises(InvalidToken, self.verify, token + "AAAA")

    def test_hs256_with_public_key_refused(self) -> None:
        claims = self.claims(self.issue())
        public_pem = self.keys.active.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = {"alg": "HS256", "typ": "at+jwt", "kid": self.keys.active.kid}
        unsigned = craft(header, claims).rsplit(".", 1)[0]
        signature = hmac.new(public_pem, unsigned.encode(), hashlib.sha256).digest()
        token = f"{unsigned}.{b64(signature)}"
        self.assertRaises(InvalidToken, self.verify, token)
        self.assertRaises(InvalidToken, self.verify, token, keys=self.keys.jwks(T0))

    def test_forged_with_other_key_same_kid(self) -> None:
        claims = self.claims(self.issue())
        forger = ec.generate_private_key(ec.SECP256R1())
        token = jwt.encode(
            claims, forger, algorithm="ES256",
            headers={"kid": self.keys.active.kid, "typ": "at+jwt"},
        )
        self.assertRaises(InvalidToken, self.verify, token)

    def test_tampered_payload(self) -> None:
        token = self.issue(scopes=["conference:join"])
        head, _body, signature = token.split(".")
        claims = self.claims(token)
        claims["scope"] = "conference:join admin"
        forged = f"{head}.{b64(json.dumps(claims).encode())}.{signature}"
        self.assertRaises(InvalidToken, self.verify, forged)

    def test_unknown_kid(self) -> None:
        claims = self.claims(self.issue())
        token = jwt.encode(
            claims, self.keys.active.private_key, algorithm="ES256",
            headers={"kid": "somebody-else", "typ": "at+jwt"},
        )
        self.assertRaises(InvalidToken, self.verify, token)

    def test_wrong_typ(self) -> None:
        claims = self.claims(self.issue())
        for typ in ("JWT", "perc-identity+jwt", None):
            headers = {"kid": self.keys.active.kid, "typ": typ}
            token = jwt.encode(claims, self.keys.active.private_key, "ES256", headers=headers)
            self.assertRaises(InvalidToken, self.verify, token)
        token = jwt.encode(
            claims, self.keys.active.private_key, "ES256",
            headers={"kid": self.keys.active.kid, "typ": "application/at+jwt"},
        )
        self.verify(token)

    def test_garbage(self) -> None:
        for token in ("", "a.b.c", "...", "x" * 100_000, b"\xff.\xfe.\xfd", "é.é.é"):
            self.assertRaises(InvalidToken, self.verify, token)

    def test_bad_jwks_is_invalid_token(self) -> None:
        self.assertRaises(InvalidToken, self.verify, self.issue(), keys={"keys": "nope"})

    # --- rotation ---------------------------------------------------------------

    def test_rotation_old_token_valid_until_prune(self) -> None:
        old_token = self.issue()
        old_kid = self.keys.active.kid
        self.keys.rotate(T0 + 10)
        new_token = self.issue(now=T0 + 10)
        self.assertNotEqual(jwt.get_unverified_header(new_token)["kid"], old_kid)
        self.verify(old_token, now=T0 + 20)
        self.verify(old_token, now=T0 + 20, keys=self.keys.jwks(T0 + 20))
        self.verify(new_token, now=T0 + 20)

    def test_pruned_kid_refused(self) -> None:
        old_token = self.issue()
        self.keys.rotate(T0 + 10)
        # A huge leeway takes expiry out of the picture: only the key matters.
        self.verify(old_token, now=T0 + 609, leeway=10_000)
        jwks_before = self.keys.jwks(T0 + 609)
        self.assertNotEqual(self.keys.prune(T0 + 610), [])
        e = self.assertRaises(InvalidToken, self.verify, old_token, now=T0 + 610, leeway=10_000)
        self.assertIn("kid", str(e))
        self.assertRaises(
            InvalidToken, self.verify, old_token, now=T0 + 610, leeway=10_000,
            keys=self.keys.jwks(T0 + 610),
        )
        self.verify(old_token, now=T0 + 610, leeway=10_000, keys=jwks_before)

    # --- certificate binding ----------------------------------------------------

    def test_bound_token(self) -> None:
        thumbprint = certificate_thumbprint(CERT)
        token = self.issue(certificate_thumbprint=thumbprint)
        self.assertEqual(self.claims(token)["cnf"], {"x5t#S256": b64(thumbprint)})
        result = self.verify(token, presented_certificate=CERT, require_certificate_binding=True)
        self.assertEqual(result.thumbprint, thumbprint)

    def test_bound_token_other_certificate(self) -> None:
        token = self.issue(certificate_thumbprint=certificate_thumbprint(CERT))
        self.assertRaises(
            CertificateMismatch, self.verify, token, presented_certificate=OTHER_CERT
        )

    def test_bound_token_no_certificate(self) -> None:
        token = self.issue(certificate_thumbprint=certificate_thumbprint(CERT))
        self.assertRaises(CertificateMismatch, self.verify, token)

    def test_binding_required(self) -> None:
        token = self.issue()
        self.verify(token, presented_certificate=CERT)
        self.assertRaises(
            CertificateMismatch, self.verify, token, presented_certificate=CERT,
            require_certificate_binding=True,
        )

    def test_errors_are_token_errors(self) -> None:
        for cls in (InvalidToken, ExpiredToken, WrongAudience, WrongIssuer, InsufficientScope,
                    CertificateMismatch):
            self.assertTrue(issubclass(cls, TokenError))
