"""Tests for perc_daemons.protocol.identity (RFC 8827 assertions as ES256 JWS)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from perc_daemons.interfaces import IIdentityVerifier
from perc_daemons.kmf.signing import SigningKeys
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.identity import (
    IDENTITY_TYP,
    BadSignature,
    ExpiredAssertion,
    FingerprintNotAsserted,
    ForeignIdentity,
    IdentityError,
    JwksIdentityVerifier,
    MalformedAssertion,
    UntrustedIdp,
    WrongAudience,
    create_assertion,
    decode_sdp_identity,
    encode_sdp_identity,
    format_fingerprints,
    normalize_identity,
    parse_fingerprint,
)
from perc_daemons.protocol.jose import InvalidJwks, parse_jwks, public_jwk

T0 = 1_800_000_000
DOMAIN = "example.com"
CERT_A = hashlib.sha256(b"certificate A").digest()
CERT_B = hashlib.sha256(b"certificate B").digest()
CERT_C = hashlib.sha256(b"certificate C").digest()

# RFC 8827 §7.4.1 example a=identity value (its assertion is not a JWS).
RFC_EXAMPLE = (
    "eyJpZHAiOnsiZG9tYWluIjoiZXhhbXBsZS5vcmciLCJwcm90b2NvbCI6ImJvZ3Vz"
    "In0sImFzc2VydGlvbiI6IntcImlkZW50aXR5XCI6XCJib2JAZXhhbXBsZS5vcmdc"
    "IixcImNvbnRlbnRzXCI6XCJhYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3l6XCIsXCJz"
    "aWduYXR1cmVcIjpcIjAxMDIwMzA0MDUwNlwifSJ9"
)


def make_key(kid: str = "k1") -> tuple[str, ec.EllipticCurvePrivateKey]:
    return kid, ec.generate_private_key(ec.SECP256R1())


def jwks_of(*keys: tuple[str, ec.EllipticCurvePrivateKey]) -> dict[str, Any]:
    result = []
    for kid, private_key in keys:
        jwk = public_jwk(private_key.public_key())
        jwk.update({"kid": kid, "use": "sig", "alg": "ES256"})
        result.append(jwk)
    return {"keys": result}


KEY = make_key()
VERIFIER = JwksIdentityVerifier(DOMAIN, jwks_of(KEY))


def assertion(**overrides: Any) -> str:
    kwargs: dict[str, Any] = {
        "idp_domain": DOMAIN,
        "identity": "alice@example.com",
        "fingerprints": [CERT_B, CERT_A],
        "audience": "conf-1",
        "now": T0,
    }
    kwargs.update(overrides)
    keys = kwargs.pop("keys", KEY)
    return create_assertion(keys, **kwargs)


def crafted(
    claims: dict[str, Any],
    *,
    key: tuple[str, ec.EllipticCurvePrivateKey] = KEY,
    domain: str = DOMAIN,
    headers: dict[str, Any] | None = None,
) -> str:
    """An assertion with arbitrary claims (over those of a valid one), properly signed."""
    base = jwt.decode(
        json.loads(assertion())["assertion"], options={"verify_signature": False}
    )
    base.update(claims)
    token = jwt.encode(
        {k: v for k, v in base.items() if v is not None},
        key[1],
        algorithm="ES256",
        headers=headers if headers is not None else {"kid": key[0], "typ": IDENTITY_TYP},
    )
    return json.dumps({"idp": {"domain": domain, "protocol": "default"}, "assertion": token})


def verify(text: str, audience: str = "conf-1", fingerprint: bytes = CERT_A,
           now: float = T0 + 1, verifier: JwksIdentityVerifier = VERIFIER) -> str:
    return verifier.verify(text, audience, fingerprint, now)


class FingerprintTestCase(unittest.TestCase):
    def test_format(self) -> None:
        digest = bytes(range(32))
        (entry,) = format_fingerprints([digest])
        self.assertEqual(entry["algorithm"], "sha-256")
        self.assertEqual(entry["digest"][:12], "00:01:02:03:")
        self.assertEqual(entry["digest"][-5:], "1E:1F")
        self.assertEqual(parse_fingerprint(entry["digest"]), digest)
        self.assertEqual(parse_fingerprint(entry["digest"].lower()), digest)

    def test_format_refuses_other_lengths(self) -> None:
        self.assertRaises(ValueError, format_fingerprints, [b"\x00" * 20])

    def test_parse_refuses_garbage(self) -> None:
        for text in ("", "AA:", "A:BB", "AA-BB", "AABB", "GG"):
            self.assertRaises(ValueError, parse_fingerprint, text)


class SdpIdentityTestCase(unittest.TestCase):
    def test_round_trip(self) -> None:
        text = assertion()
        value = encode_sdp_identity(text)
        self.assertNotIn(" ", value)
        self.assertEqual(base64.b64decode(value).decode(), text)
        self.assertEqual(decode_sdp_identity(value), text)

    def test_rfc8827_example(self) -> None:
        outer = json.loads(decode_sdp_identity(RFC_EXAMPLE))
        self.assertEqual(outer["idp"], {"domain": "example.org", "protocol": "bogus"})
        self.assertRaises(UntrustedIdp, verify, decode_sdp_identity(RFC_EXAMPLE))
        verifier = JwksIdentityVerifier("example.org", jwks_of(KEY))
        self.assertRaises(
            MalformedAssertion, verify, decode_sdp_identity(RFC_EXAMPLE), verifier=verifier
        )

    def test_decode_refuses(self) -> None:
        for value in ("not base64!", "QQ", "//79", "é", b"\x00", "A" * 100_000):
            self.assertRaises(MalformedAssertion, decode_sdp_identity, value)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
    def test_decode_random(self, value: str | bytes) -> None:
        try:
            text = decode_sdp_identity(value)
        except IdentityError:
            return
        self.assertIsInstance(text, str)


class NormalizeIdentityTestCase(unittest.TestCase):
    def test_ascii_lower_case_of_the_whole_identity(self) -> None:
        self.assertEqual(normalize_identity("USER@LOCALHOST"), "user@localhost")
        self.assertEqual(normalize_identity("Bob.O'Neil+X@Xn--Bcher-Kva.Example"),
                         "bob.o'neil+x@xn--bcher-kva.example")
        self.assertEqual(normalize_identity("a%40B@example.com"), "a%40b@example.com")

    def test_non_ascii_refused(self) -> None:
        # U+212A KELVIN SIGN lower-cases to "k" under Unicode rules: not folded, refused
        for bad in ("b\u00f6b@example.com", "\u212aate@example.com", "bob@b\u00fccher.de", 7, None):
            self.assertRaises(ValueError, normalize_identity, bad)


class CreateAssertionTestCase(unittest.TestCase):
    def test_shape(self) -> None:
        outer = json.loads(assertion())
        self.assertEqual(set(outer), {"idp", "assertion"})
        self.assertEqual(outer["idp"], {"domain": DOMAIN, "protocol": "default"})
        header = jwt.get_unverified_header(outer["assertion"])
        self.assertEqual(header, {"alg": "ES256", "typ": IDENTITY_TYP, "kid": "k1"})
        claims = jwt.decode(outer["assertion"], options={"verify_signature": False})
        self.assertEqual(claims["iss"], "https://example.com")
        self.assertEqual(claims["sub"], "alice@example.com")
        self.assertEqual(claims["aud"], "conf-1")
        self.assertEqual((claims["iat"], claims["exp"]), (T0, T0 + 120))
        self.assertIsInstance(claims["jti"], str)
        self.assertEqual(
            json.loads(claims["contents"]),
            {"fingerprint": format_fingerprints([CERT_B, CERT_A])},
        )

    def test_with_signing_keys(self) -> None:
        keys = SigningKeys.create(Path(self.mktemp()), T0)
        verifier = JwksIdentityVerifier(DOMAIN, keys.jwks(T0))
        self.assertEqual(verify(assertion(keys=keys), verifier=verifier), "alice@example.com")

    def test_asserts_the_normal_form(self) -> None:
        outer = json.loads(assertion(identity="Alice@EXAMPLE.com"))
        claims = jwt.decode(outer["assertion"], options={"verify_signature": False})
        self.assertEqual(claims["sub"], "alice@example.com")

    def test_refuses_bad_arguments(self) -> None:
        self.assertRaises(ValueError, assertion, identity="mallory@evil.example")
        self.assertRaises(ValueError, assertion, identity="b\u00f6b@example.com")
        self.assertRaises(ValueError, assertion, identity="a@b@example.com")
        self.assertRaises(ValueError, assertion, identity="a%41@example.com")
        self.assertRaises(ValueError, assertion, fingerprints=[])
        self.assertRaises(ValueError, assertion, protocol="a/b")
        self.assertRaises(ValueError, assertion, lifetime=0)


class VerifyTestCase(unittest.TestCase):
    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IIdentityVerifier, VERIFIER))

    def test_valid(self) -> None:
        text = assertion()
        self.assertEqual(verify(text), "alice@example.com")
        self.assertEqual(verify(text, fingerprint=CERT_B), "alice@example.com")
        self.assertEqual(verify(text.encode()), "alice@example.com")

    def test_via_sdp(self) -> None:
        value = encode_sdp_identity(assertion(audience="kd"))
        self.assertEqual(verify(decode_sdp_identity(value), audience="kd"), "alice@example.com")

    def test_expired(self) -> None:
        text = assertion()
        verify(text, now=T0 + 129)  # leeway 10
        self.assertRaises(ExpiredAssertion, verify, text, now=T0 + 130)

    def test_not_yet_valid(self) -> None:
        text = assertion(now=T0 + 60)
        self.assertRaises(ExpiredAssertion, verify, text, now=T0)
        verify(text, now=T0 + 50)

    def test_wrong_audience(self) -> None:
        self.assertRaises(WrongAudience, verify, assertion(), audience="conf-2")
        self.assertRaises(WrongAudience, verify, assertion(audience="kd"))

    def test_forged_signature_same_kid(self) -> None:
        forger = make_key("k1")
        self.assertRaises(BadSignature, verify, assertion(keys=forger))
        self.assertRaises(BadSignature, verify, crafted({}, key=forger))

    def test_unknown_kid(self) -> None:
        self.assertRaises(BadSignature, verify, assertion(keys=make_key("k2")))

    def test_alg_none_and_hs256(self) -> None:
        outer = json.loads(assertion())
        head, body, _sig = outer["assertion"].split(".")
        for header in ({"alg": "none", "typ": IDENTITY_TYP, "kid": "k1"},
                       {"alg": "HS256", "typ": IDENTITY_TYP, "kid": "k1"}):
            forged_head = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=")
            outer["assertion"] = f"{forged_head.decode()}.{body}."
            self.assertRaises(BadSignature, verify, json.dumps(outer))
        self.assertEqual(verify(json.dumps({**outer, "assertion": f"{head}.{body}.{_sig}"})),
                         "alice@example.com")

    def test_tampered_claims(self) -> None:
        outer = json.loads(assertion())
        head, _body, sig = outer["assertion"].split(".")
        claims = jwt.decode(outer["assertion"], options={"verify_signature": False})
        claims["contents"] = json.dumps({"fingerprint": format_fingerprints([CERT_C])})
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        outer["assertion"] = f"{head}.{body}.{sig}"
        self.assertRaises(BadSignature, verify, json.dumps(outer), fingerprint=CERT_C)

    def test_wrong_typ(self) -> None:
        text = crafted({}, headers={"kid": "k1", "typ": "at+jwt"})
        self.assertRaises(MalformedAssertion, verify, text)

    def test_untrusted_domain(self) -> None:
        text = crafted({"iss": "https://evil.example", "sub": "mallory@evil.example"},
                       domain="evil.example")
        self.assertRaises(UntrustedIdp, verify, text)

    def test_issuer_must_match_domain(self) -> None:
        self.assertRaises(UntrustedIdp, verify, crafted({"iss": "https://evil.example"}))
        self.assertRaises(UntrustedIdp, verify, crafted({"iss": "example.com"}))

    def test_domain_comparison_ignores_case(self) -> None:
        verifier = JwksIdentityVerifier(["other.example", "EXAMPLE.com"], jwks_of(KEY))
        text = crafted({"sub": "bob@Example.COM"})
        self.assertEqual(verify(text, verifier=verifier), "bob@example.com")

    def test_identity_comes_out_in_normal_form(self) -> None:
        # An IdP asserting "BOB@EXAMPLE.COM" means the bob invited as bob@example.com.
        self.assertEqual(verify(crafted({"sub": "BOB@EXAMPLE.COM"})), "bob@example.com")
        self.assertRaises(ForeignIdentity, verify, crafted({"sub": "b\u00f6b@example.com"}))
        self.assertRaises(MalformedAssertion, verify, crafted({"sub": 7}))

    def test_foreign_identity(self) -> None:
        self.assertRaises(ForeignIdentity, verify, crafted({"sub": "mallory@evil.example"}))
        self.assertRaises(ForeignIdentity, verify, crafted({"sub": "example.com"}))
        self.assertRaises(ForeignIdentity, verify, crafted({"sub": "@example.com"}))

    def test_percent_encoding(self) -> None:
        self.assertEqual(verify(crafted({"sub": "user%40133@example.com"})),
                         "user%40133@example.com")
        self.assertEqual(verify(crafted({"sub": "100%25@example.com"})), "100%25@example.com")
        # An unescaped '@' in the user part makes the domain ambiguous.
        self.assertRaises(ForeignIdentity, verify, crafted({"sub": "evil.example@example.com@x"}))
        self.assertRaises(ForeignIdentity, verify, crafted({"sub": "a@b@example.com"}))
        # Only '@' and '%' may be escaped.
        self.assertRaises(ForeignIdentity, verify, crafted({"sub": "%61lice@example.com"}))
        self.assertRaises(ForeignIdentity, verify, crafted({"sub": "100%@example.com"}))

    def test_fingerprint_not_asserted(self) -> None:
        self.assertRaises(FingerprintNotAsserted, verify, assertion(), fingerprint=CERT_C)
        self.assertRaises(FingerprintNotAsserted, verify, assertion(), fingerprint=CERT_A[:20])

    def test_other_algorithms_ignored(self) -> None:
        contents = json.dumps({"fingerprint": [
            {"algorithm": "sha-1", "digest": CERT_A[:20].hex(":").upper()},
            {"algorithm": "SHA-256", "digest": CERT_B.hex(":")},
        ]})
        text = crafted({"contents": contents})
        self.assertEqual(verify(text, fingerprint=CERT_B), "alice@example.com")
        self.assertRaises(FingerprintNotAsserted, verify, text, fingerprint=CERT_A)

    def test_malformed_contents(self) -> None:
        for contents in ("not json", "{}", '{"fingerprint": []}', '{"fingerprint": [1]}',
                         '{"fingerprint": [{"algorithm": "sha-256", "digest": "XYZ"}]}',
                         '{"fingerprint": [{"algorithm": "sha-256", "digest": "AA:BB"}]}',
                         5):
            self.assertRaises(MalformedAssertion, verify, crafted({"contents": contents}))

    def test_missing_claims(self) -> None:
        for claim in ("iss", "sub", "aud", "iat", "exp", "contents"):
            self.assertRaises(MalformedAssertion, verify, crafted({claim: None}))
        self.assertRaises(MalformedAssertion, verify, crafted({"exp": "soon"}))
        self.assertRaises(MalformedAssertion, verify, crafted({"exp": 1e400}))

    def test_malformed_outer(self) -> None:
        good = json.loads(assertion())
        for text in ("", "[]", "null", "{", '{"idp": "example.com", "assertion": "x"}',
                     json.dumps({"idp": good["idp"]}),
                     json.dumps({"idp": {"protocol": "default"}, "assertion": "x"}),
                     json.dumps({"idp": {"domain": DOMAIN, "protocol": "a/b"}, "assertion": "x"}),
                     json.dumps({**good, "assertion": "not a jws"}),
                     '{"idp": {"domain": "evil.example"}, "idp": {"domain": "example.com"}}',
                     "[" * 10_000, b"\xff", 42):
            self.assertRaises(MalformedAssertion, verify, text)

    def test_jwks_rotation(self) -> None:
        new = make_key("k2")
        verifier = JwksIdentityVerifier(DOMAIN, jwks_of(KEY))
        old_text, new_text = assertion(), assertion(keys=new)
        self.assertRaises(BadSignature, verify, new_text, verifier=verifier)
        verifier.update_jwks(jwks_of(new, KEY))
        verify(old_text, verifier=verifier)
        verify(new_text, verifier=verifier)
        verifier.update_jwks(jwks_of(new))
        self.assertRaises(BadSignature, verify, old_text, verifier=verifier)
        self.assertRaises(InvalidJwks, verifier.update_jwks, {"keys": [{"kty": "EC"}]})
        verify(new_text, verifier=verifier)  # kept the previous keys

    def test_parse_jwks(self) -> None:
        jwks = jwks_of(KEY)
        self.assertEqual(list(parse_jwks(jwks)), ["k1"])
        rsa = {"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"}
        self.assertEqual(list(parse_jwks({"keys": [rsa, *jwks["keys"]]})), ["k1"])
        self.assertRaises(InvalidJwks, parse_jwks, {"keys": [rsa]})
        bad = dict(jwks["keys"][0])
        for change in ({"x": bad["y"]}, {"x": "AAAA"}, {"kid": None}, {"d": "AAAA"}):
            self.assertRaises(InvalidJwks, parse_jwks, {"keys": [{**bad, **change}]})
        self.assertRaises(InvalidJwks, parse_jwks, {"keys": [bad, bad]})
        self.assertRaises(InvalidJwks, parse_jwks, [])

    def test_errors(self) -> None:
        classes = (MalformedAssertion, UntrustedIdp, BadSignature, ExpiredAssertion,
                   WrongAudience, ForeignIdentity, FingerprintNotAsserted)
        for cls in classes:
            self.assertTrue(issubclass(cls, IdentityError))
        self.assertTrue(issubclass(IdentityError, ProtocolError))
        reasons = [cls.reason for cls in (IdentityError, *classes)]
        self.assertEqual(len(set(reasons)), len(reasons))
        self.assertNotIn(ProtocolError.reason, reasons)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["idp", "domain", "protocol", "assertion", "x"]),
                      children, max_size=4),
    max_leaves=12,
)


class RandomInputTestCase(unittest.TestCase):
    """Whatever arrives, verification ends in an IdentityError, never another exception."""

    def check(self, value: Any) -> None:
        try:
            verify(value)
        except IdentityError:
            return
        self.fail("random input verified")

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.text(max_size=300))
    def test_random_text(self, text: str) -> None:
        self.check(text)
        try:
            decoded = decode_sdp_identity(text)
        except IdentityError:
            return
        self.check(decoded)

    @settings(max_examples=300, deadline=None)
    @given(json_values)
    def test_random_json(self, value: Any) -> None:
        self.check(json.dumps(value))

    @settings(max_examples=200, deadline=None)
    @given(st.text(alphabet="ABCDEFabcdef0123456789-_.=", max_size=200))
    def test_random_jws(self, token: str) -> None:
        self.check(json.dumps({"idp": {"domain": DOMAIN, "protocol": "default"},
                               "assertion": token}))

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_mutated_assertion(self, data: st.DataObject) -> None:
        text = assertion()
        position = data.draw(st.integers(0, len(text) - 1))
        replacement = data.draw(st.characters(codec="ascii"))
        mutated = text[:position] + replacement + text[position + 1:]
        try:
            verify(mutated)
        except IdentityError:
            return
        # Only changes that leave the signed content intact may pass.
        self.assertEqual(json.loads(mutated)["assertion"], json.loads(text)["assertion"])
