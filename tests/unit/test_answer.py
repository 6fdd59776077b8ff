"""Signed SDP answers (perc_daemons.protocol.answer) with real DevPki certificates."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import uuid
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.devpki import DevPki
from perc_daemons.protocol import sdp
from perc_daemons.protocol.answer import (
    ANSWER_TYP,
    LEEWAY,
    SIGNATURE_ATTRIBUTE,
    AnswerError,
    AnswerMismatch,
    BadAnswerSignature,
    ExpiredAnswer,
    MalformedSignedAnswer,
    UntrustedKd,
    VerifiedAnswer,
    sign_answer,
    verify_signed_answer,
)
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.jose import b64url_encode
from perc_daemons.protocol.sdp import Attribute, SessionDescription
from tests.unit.test_sdp import OFFER

KD_NAME = "kd.localhost"
KD_TLS_ID = "KD-tls-id_0123456789+/"
UFRAG = "mdUf"
PWD = "mdPasswordmdPassword+/"
CANDIDATE = "1 1 udp 2130706431 127.0.0.1 40000 typ host"
AID = uuid.uuid4().bytes
CID = "conf-1"
ALICE = "alice@example.com"
#: Inputs saved by make fuzz (tests/fuzz), as hex.
FUZZ_INPUTS = Path(__file__).parent / "fuzz_inputs"


def load_key(path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def der_of(path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(
        serialization.Encoding.DER)


def self_signed(name: str) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A self-signed P-256 leaf for ``name`` with the KD's extensions."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER), key


def std_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) >= 1, old
    return text.replace(old, new, 1)


class AnswerTestsBase(unittest.TestCase):
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        self.pki = DevPki(directory)
        issued = self.pki.issue("kd", [KD_NAME])
        self.kd_der = der_of(issued.certificate)
        self.kd_key = load_key(issued.private_key)
        self.kd_fp = hashlib.sha256(self.kd_der).digest()
        self.roots = [self.pki.ca_certificate]
        self.now = float(int(datetime.datetime.now(datetime.UTC).timestamp()))
        self.offer = OFFER
        self.unsigned = self.make_answer(self.kd_fp)

    def make_answer(self, fingerprint: bytes, tls_id: str = KD_TLS_ID) -> SessionDescription:
        return sdp.make_answer(sdp.parse(self.offer), fingerprint=fingerprint, tls_id=tls_id,
                               ice_ufrag=UFRAG, ice_pwd=PWD, candidates=[CANDIDATE])

    def sign(self, answer: SessionDescription | None = None, **overrides) -> str:
        kwargs = dict(association_id=AID, conference_id=CID, identity=ALICE,
                      certificate_chain=[self.kd_der], private_key=self.kd_key, now=self.now)
        kwargs.update(overrides)
        offer = kwargs.pop("offer", self.offer)
        return sign_answer(self.unsigned if answer is None else answer, offer, **kwargs)

    def verify(self, signed: str | bytes, offer: str | None = None, **overrides) -> VerifiedAnswer:
        kwargs = dict(trust_roots=self.roots, kd_names=[KD_NAME], now=self.now)
        kwargs.update(overrides)
        return verify_signed_answer(signed, self.offer if offer is None else offer, **kwargs)

    def forge(self, answer: SessionDescription | None = None, *, claims=None, header=None,
              key=None, algorithm: str = "ES256", chain=None, offer: str | None = None) -> str:
        """A signed answer built by hand (sign_answer refuses most of these)."""
        answer = self.unsigned if answer is None else answer
        body = {
            "aid": str(uuid.UUID(bytes=AID)), "cid": CID, "sub": ALICE,
            "offer": b64url_encode(hashlib.sha256(
                (self.offer if offer is None else offer).encode()).digest()),
            "answer": b64url_encode(hashlib.sha256(answer.serialize().encode()).digest()),
            "iat": int(self.now), "exp": int(self.now) + 300,
        }
        for name, value in (claims or {}).items():
            if value is None:
                body.pop(name, None)
            else:
                body[name] = value
        headers = {"typ": ANSWER_TYP,
                   "x5c": [std_b64(c) for c in (chain or [self.kd_der])]}
        for name, value in (header or {}).items():
            if value is None:
                headers.pop(name, None)
            else:
                headers[name] = value
        token = jwt.encode(body, key or self.kd_key, algorithm=algorithm, headers=headers)
        return answer.with_attributes(SIGNATURE_ATTRIBUTE, [token]).serialize()

    def token_of(self, signed: str) -> str:
        [attribute] = sdp.parse(signed).get_all(SIGNATURE_ATTRIBUTE)
        return attribute.value

    def with_token(self, token: str, answer: SessionDescription | None = None) -> str:
        answer = self.unsigned if answer is None else answer
        return answer.with_attributes(SIGNATURE_ATTRIBUTE, [token]).serialize()

    def assertRefused(self, error: type[AnswerError], signed, offer=None, **overrides):
        raised = self.assertRaises(error, self.verify, signed, offer, **overrides)
        self.assertIsInstance(raised, ProtocolError)
        return raised


class RoundTripTests(AnswerTestsBase):
    def test_round_trip(self):
        signed = self.sign()
        verified = self.verify(signed)
        self.assertEqual(verified, VerifiedAnswer(
            answer=self.unsigned, association_id=AID, conference_id=CID, identity=ALICE,
            kd_name=KD_NAME, kd_fingerprint=self.kd_fp, kd_tls_id=KD_TLS_ID,
            expires_at=self.now + 300))
        self.assertEqual(verified.answer.serialize(), self.unsigned.serialize())
        self.assertEqual(verified.kd_fingerprint, hashlib.sha256(self.kd_der).digest())
        # UTF-8 bytes work as well as text; the answer stays valid within its lifetime
        self.assertEqual(self.verify(signed.encode()), verified)
        self.assertEqual(self.verify(signed, now=self.now + 300 + LEEWAY - 1), verified)
        self.assertEqual(self.verify(signed, now=self.now - LEEWAY + 1), verified)

    def test_format(self):
        signed = self.sign(lifetime=60)
        lines = signed.split("\r\n")
        self.assertTrue(signed.endswith("\r\n"))
        first_media = next(i for i, line in enumerate(lines) if line.startswith("m="))
        # appended after the other session-level attributes, nowhere else
        self.assertTrue(lines[first_media - 1].startswith(f"a={SIGNATURE_ATTRIBUTE}:"))
        self.assertEqual(sum(SIGNATURE_ATTRIBUTE in line for line in lines), 1)
        self.assertEqual("\r\n".join(lines[:first_media - 1] + lines[first_media:]),
                         self.unsigned.serialize())
        token = self.token_of(signed)
        header = jwt.get_unverified_header(token)
        self.assertEqual(header["alg"], "ES256")
        self.assertEqual(header["typ"], ANSWER_TYP)
        self.assertEqual(header["x5c"], [base64.b64encode(self.kd_der).decode()])
        claims = jwt.decode(token, self.kd_key.public_key(), algorithms=["ES256"],
                            options={"verify_exp": False, "verify_iat": False})
        self.assertEqual(claims, {
            "aid": str(uuid.UUID(bytes=AID)), "cid": CID, "sub": ALICE,
            "offer": b64url_encode(hashlib.sha256(OFFER.encode("utf-8")).digest()),
            "answer": b64url_encode(hashlib.sha256(
                self.unsigned.serialize().encode("utf-8")).digest()),
            "iat": int(self.now), "exp": int(self.now) + 60})

    def test_kd_names_and_chain(self):
        signed = self.sign()
        verified = self.verify(signed, kd_names={"other.localhost", KD_NAME, "zz.localhost"})
        self.assertEqual(verified.kd_name, KD_NAME)
        # the CA certificate may travel in x5c as well
        ca_der = self.pki.ca_certificate.public_bytes(serialization.Encoding.DER)
        signed = self.sign(certificate_chain=[self.kd_der, ca_der])
        self.assertEqual(self.verify(signed).kd_name, KD_NAME)
        # another root in the trust store changes nothing
        other = DevPki(os.path.abspath(self.mktemp())).ca_certificate
        self.assertEqual(self.verify(signed, trust_roots=[other, *self.roots]).kd_name, KD_NAME)

    def test_session_level_fingerprint(self):
        """The KD fingerprint may sit at session level (SessionDescription.fingerprints_for)."""
        attribute = f"sha-256 {self.kd_fp.hex(':').upper()}"
        media = tuple(m.without("fingerprint") for m in self.unsigned.media)
        answer = SessionDescription(self.unsigned.origin, self.unsigned.session_name,
                                    self.unsigned.fields,
                                    (*self.unsigned.attributes,
                                     Attribute("fingerprint", attribute)), media)
        self.assertEqual(self.verify(self.sign(answer)).answer, answer)

    def test_rejected_sections_need_nothing(self):
        offer = replace_once(OFFER, "m=video 9", "m=video 0")
        answer = sdp.make_answer(sdp.parse(offer), fingerprint=self.kd_fp, tls_id=KD_TLS_ID,
                                 ice_ufrag=UFRAG, ice_pwd=PWD, candidates=[CANDIDATE])
        self.assertEqual([m.port for m in answer.media], [9, 0])
        signed = self.sign(answer, offer=offer)
        self.assertEqual(self.verify(signed, offer).kd_tls_id, KD_TLS_ID)

    def test_errors_and_reasons(self):
        reasons = set()
        for error in (MalformedSignedAnswer, BadAnswerSignature, UntrustedKd, AnswerMismatch,
                      ExpiredAnswer):
            self.assertTrue(issubclass(error, AnswerError))
            self.assertTrue(issubclass(error, ProtocolError))
            reasons.add(error.reason)
        self.assertEqual(len(reasons), 5)
        self.assertNotIn(AnswerError.reason, reasons)


class SignAnswerRefusalTests(AnswerTestsBase):
    def test_already_signed(self):
        signed = sdp.parse(self.sign())
        error = self.assertRaises(ValueError, self.sign, signed)
        self.assertIn(SIGNATURE_ATTRIBUTE, str(error))

    def test_fingerprint_not_the_signers(self):
        wrong = "sha-256 " + "AA:" * 31 + "AA"
        audio, video = self.unsigned.media
        one_wrong = SessionDescription(
            self.unsigned.origin, self.unsigned.session_name, self.unsigned.fields,
            self.unsigned.attributes, (audio, video.with_attributes("fingerprint", [wrong])))
        for answer in (self.make_answer(bytes(32)), one_wrong):
            self.assertRaises(ValueError, self.sign, answer)
        # a certificate whose key is not the signer's
        other_der, _ = self_signed(KD_NAME)
        self.assertRaises(ValueError, self.sign, certificate_chain=[other_der])

    def test_bad_arguments(self):
        self.assertRaises(ValueError, self.sign, association_id=b"short")
        self.assertRaises(ValueError, self.sign, conference_id="")
        self.assertRaises(ValueError, self.sign, identity="")
        self.assertRaises(ValueError, self.sign, lifetime=0)
        self.assertRaises(ValueError, self.sign, certificate_chain=[])
        self.assertRaises(ValueError, self.sign, certificate_chain=[self.kd_der] * 5)
        self.assertRaises(ValueError, self.sign,
                          private_key=ec.generate_private_key(ec.SECP384R1()))
        no_tls_id = SessionDescription(
            self.unsigned.origin, self.unsigned.session_name, self.unsigned.fields,
            self.unsigned.attributes, tuple(m.without("tls-id") for m in self.unsigned.media))
        self.assertRaises(ValueError, self.sign, no_tls_id)

    def test_key_not_in_errors(self):
        pem = self.kd_key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
        body = "".join(pem.splitlines()[1:-1])
        scalar = str(self.kd_key.private_numbers().private_value)
        for call in (lambda: self.sign(self.make_answer(bytes(32))),
                     lambda: self.sign(association_id=b"x")):
            error = self.assertRaises(ValueError, call)
            self.assertNotIn(body[:40], str(error))
            self.assertNotIn(scalar, str(error))
        verified = self.verify(self.sign())
        self.assertNotIn(scalar, repr(verified))


class TamperedAnswerTests(AnswerTestsBase):
    def test_tampered_answer_text(self):
        signed = self.sign()
        fingerprint = self.kd_fp.hex(":").upper()
        for old, new in ((f"a=ice-pwd:{PWD}", "a=ice-pwd:" + "x" * 22),
                         (CANDIDATE, "1 1 udp 2130706431 192.0.2.66 40000 typ host"),
                         (fingerprint, ("AB" if fingerprint[:2] != "AB" else "CD")
                          + fingerprint[2:]),
                         (f"a=tls-id:{KD_TLS_ID}\r\n", ""),
                         ("a=sendrecv", "a=inactive"),
                         ("m=audio 9", "m=audio 0")):
            tampered = replace_once(signed, old, new)
            self.assertRefused(AnswerMismatch, tampered)

    def test_tampered_offer(self):
        signed = self.sign()
        for offer in (replace_once(OFFER, "a=ice-pwd:bP+X", "a=ice-pwd:bP+Y"),
                      OFFER.replace("\r\n", "\n"),  # the same SDP, not the same text
                      OFFER + "a=extra\r\n", ""):
            error = self.assertRefused(AnswerMismatch, signed, offer)
            self.assertIn("offer", str(error))

    def test_signed_but_wrong_fingerprint(self):
        """Even a validly signed answer must name the signer's certificate."""
        for fingerprint in (bytes(32), hashlib.sha256(b"another certificate").digest()):
            error = self.assertRefused(AnswerMismatch, self.forge(self.make_answer(fingerprint)))
            self.assertIn("fingerprint", str(error))

    def test_signed_but_extra_or_other_fingerprints(self):
        kd = f"sha-256 {self.kd_fp.hex(':').upper()}"
        for values in ([kd, kd], [kd, "sha-1 " + "AB:" * 19 + "AB"],
                       ["sha-1 " + "AB:" * 19 + "AB"]):
            media = (self.unsigned.media[0].with_attributes("fingerprint", values),
                     *self.unsigned.media[1:])
            answer = SessionDescription(self.unsigned.origin, self.unsigned.session_name,
                                        self.unsigned.fields, self.unsigned.attributes, media)
            self.assertRefused(AnswerMismatch, self.forge(answer))

    def test_signed_but_tls_id_missing_or_differing(self):
        audio, video = self.unsigned.media
        for media in ((audio.without("tls-id"), video),
                      (audio, video.with_tls_id("another-tls-id-0123456789"))):
            answer = SessionDescription(self.unsigned.origin, self.unsigned.session_name,
                                        self.unsigned.fields, self.unsigned.attributes, media)
            error = self.assertRefused(AnswerMismatch, self.forge(answer))
            self.assertIn("tls-id", str(error))

    def test_signed_but_no_accepted_section(self):
        media = tuple(sdp.MediaDescription(m.media, 0, m.proto, m.formats,
                                           attributes=(Attribute("mid", m.mid),))
                      for m in self.unsigned.media)
        answer = SessionDescription(self.unsigned.origin, self.unsigned.session_name,
                                    self.unsigned.fields, self.unsigned.attributes, media)
        error = self.assertRefused(AnswerMismatch, self.forge(answer))
        self.assertIn("no accepted", str(error))
        answer = SessionDescription(self.unsigned.origin, self.unsigned.session_name,
                                    self.unsigned.fields, self.unsigned.attributes, ())
        self.assertRefused(AnswerMismatch, self.forge(answer))

    def test_signature_over_another_answer(self):
        other = self.make_answer(self.kd_fp, tls_id="another-tls-id-0123456789")
        token = self.token_of(self.sign(other))
        self.assertRefused(AnswerMismatch, self.with_token(token))


class SignerTests(AnswerTestsBase):
    def test_another_key_with_the_same_x5c(self):
        other = ec.generate_private_key(ec.SECP256R1())
        self.assertRefused(BadAnswerSignature, self.forge(key=other))

    def test_tampered_signature_or_claims(self):
        head, payload, signature = self.token_of(self.sign()).split(".")
        flipped = ("A" if signature[5] != "A" else "B")
        self.assertRefused(BadAnswerSignature, self.with_token(
            f"{head}.{payload}.{signature[:5]}{flipped}{signature[6:]}"))
        self.assertRefused(BadAnswerSignature, self.with_token(f"{head}.{payload}."))
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["sub"] = "mallory@example.com"
        forged = b64url_encode(json.dumps(claims).encode())
        self.assertRefused(BadAnswerSignature, self.with_token(f"{head}.{forged}.{signature}"))

    def test_self_signed_leaf(self):
        der, key = self_signed(KD_NAME)
        signed = self.forge(self.make_answer(hashlib.sha256(der).digest()), key=key,
                            chain=[der])
        error = self.assertRefused(UntrustedKd, signed)
        self.assertNotIn(str(key.private_numbers().private_value), str(error))

    def test_leaf_from_another_ca(self):
        other = DevPki(os.path.abspath(self.mktemp()))
        issued = other.issue("kd", [KD_NAME])
        der = der_of(issued.certificate)
        signed = self.sign(self.make_answer(hashlib.sha256(der).digest()),
                           certificate_chain=[der], private_key=load_key(issued.private_key))
        self.assertRefused(UntrustedKd, signed)
        # with the other CA trusted it verifies
        self.assertEqual(self.verify(signed, trust_roots=[other.ca_certificate]).kd_name,
                         KD_NAME)
        # another CA's certificate in x5c as an "intermediate" does not help
        ca_der = other.ca_certificate.public_bytes(serialization.Encoding.DER)
        signed = self.sign(self.make_answer(hashlib.sha256(der).digest()),
                           certificate_chain=[der, ca_der],
                           private_key=load_key(issued.private_key))
        self.assertRefused(UntrustedKd, signed)

    def test_wrong_kd_name(self):
        signed = self.sign()
        for names in (["other.localhost"], ["localhost"], ["*.localhost"], ["KD.localhost."]):
            self.assertRefused(UntrustedKd, signed, kd_names=names)

    def test_leaf_not_p256(self):
        key = ec.generate_private_key(ec.SECP384R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, KD_NAME)])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder().subject_name(subject)
            .issuer_name(self.pki.ca_certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(KD_NAME)]), critical=False)
            .sign(self.pki.ca.key, hashes.SHA256())
        )
        der = certificate.public_bytes(serialization.Encoding.DER)
        error = self.assertRefused(UntrustedKd, self.forge(chain=[der]))
        self.assertIn("P-256", str(error))

    def test_expired(self):
        signed = self.sign(lifetime=300)
        self.assertRefused(ExpiredAnswer, signed, now=self.now + 300 + LEEWAY)
        self.assertRefused(ExpiredAnswer, signed, now=self.now + 3600)
        # issued in the future
        self.assertRefused(ExpiredAnswer, signed, now=self.now - LEEWAY - 1)
        # the certificate's validity is checked first (DevPki leaves live 30 days)
        self.assertRefused(UntrustedKd, signed, now=self.now + 40 * 86400)
        self.assertRefused(UntrustedKd, signed, now=self.now - 2 * 3600)


class MalformedTests(AnswerTestsBase):
    def test_alg_none_and_hs256(self):
        header = {"alg": "none", "typ": ANSWER_TYP, "x5c": [std_b64(self.kd_der)]}
        claims = jwt.decode(self.token_of(self.sign()), options={"verify_signature": False})
        unsigned = (b64url_encode(json.dumps(header).encode()) + "."
                    + b64url_encode(json.dumps(claims).encode()))
        self.assertRefused(BadAnswerSignature, self.with_token(unsigned + "."))
        self.assertRefused(BadAnswerSignature, self.with_token(unsigned + ".c2ln"))
        # HS256 keyed with the (public) certificate: the classic confusion
        header["alg"] = "HS256"
        signing_input = (b64url_encode(json.dumps(header).encode()) + "."
                         + b64url_encode(json.dumps(claims).encode()))
        mac = hmac.new(self.kd_der, signing_input.encode(), hashlib.sha256).digest()
        self.assertRefused(BadAnswerSignature,
                           self.with_token(signing_input + "." + b64url_encode(mac)))
        self.assertRefused(BadAnswerSignature, self.forge(key="secret" * 6, algorithm="HS256"))
        self.assertRefused(BadAnswerSignature,
                           self.forge(key=ec.generate_private_key(ec.SECP384R1()),
                                      algorithm="ES384"))

    def test_missing_or_duplicated_attribute(self):
        self.assertRefused(MalformedSignedAnswer, self.unsigned.serialize())
        signed = sdp.parse(self.sign())
        token = self.token_of(self.sign())
        twice = signed.with_attributes(SIGNATURE_ATTRIBUTE, [token, token]).serialize()
        self.assertRefused(MalformedSignedAnswer, twice)
        media = (signed.media[0].with_attributes(SIGNATURE_ATTRIBUTE, [token]),
                 *signed.media[1:])
        at_media = SessionDescription(signed.origin, signed.session_name, signed.fields,
                                      signed.attributes, media)
        self.assertRefused(MalformedSignedAnswer, at_media.serialize())
        only_media = SessionDescription(signed.origin, signed.session_name, signed.fields,
                                        self.unsigned.attributes, media)
        self.assertRefused(MalformedSignedAnswer, only_media.serialize())
        # no value
        self.assertRefused(MalformedSignedAnswer,
                           self.unsigned.with_attributes(SIGNATURE_ATTRIBUTE, [None]).serialize())

    def test_garbage(self):
        for text in ("", "garbage", b"\xff\xfe", "v=0\r\n", "\x00" * 10, "v=0\r\n" * 3000):
            self.assertRefused(MalformedSignedAnswer, text)
        for token in ("abc", "a.b", "a.b.c", "....", "e30.e30.", "e30.e30.e30", "x" * 20000,
                      "eyJhbGciOiJFUzI1NiJ9.e30.e30"):
            raised = self.assertRaises(AnswerError, self.verify, self.with_token(token))
            self.assertIsInstance(raised, (MalformedSignedAnswer, BadAnswerSignature))

    def test_bad_header(self):
        ca_der = self.pki.ca_certificate.public_bytes(serialization.Encoding.DER)
        for header in ({"typ": None}, {"typ": "JWT"}, {"x5c": None}, {"x5c": []},
                       {"x5c": std_b64(self.kd_der)},
                       {"x5c": [std_b64(self.kd_der)] + [std_b64(ca_der)] * 4},
                       {"x5c": [b64url_encode(self.kd_der)]},  # base64url, not base64
                       {"x5c": [std_b64(self.kd_der)[:-8]]},
                       {"x5c": [std_b64(b"not a certificate")]},
                       {"x5c": [42]}, {"crit": ["exp"]}, {"jku": "https://evil.example/"},
                       {"x5u": "https://evil.example/"}):
            self.assertRefused(MalformedSignedAnswer, self.forge(header=header))

    def test_x5c_certificate_with_an_invalid_version(self):
        """Found by make fuzz: a DER certificate whose version is not v1-v3 made
        cryptography raise InvalidVersion (not a ValueError) out of the verifier."""
        saved = (FUZZ_INPUTS / "answer-x5c-invalid-version.hex").read_text()
        self.assertRefused(MalformedSignedAnswer, bytes.fromhex(saved))
        version_v3 = bytes.fromhex("a003020102")
        self.assertIn(version_v3, self.kd_der)
        der = self.kd_der.replace(version_v3, bytes.fromhex("a003020142"), 1)
        self.assertRefused(MalformedSignedAnswer, self.forge(header={"x5c": [std_b64(der)]}))

    def test_bad_claims(self):
        for claims in ({"aid": None}, {"cid": None}, {"sub": None}, {"offer": None},
                       {"answer": None}, {"iat": None}, {"exp": None}, {"aid": "x"},
                       {"aid": str(uuid.UUID(bytes=AID)).upper()}, {"cid": ""}, {"sub": 7},
                       {"exp": "soon"}, {"iat": True}, {"exp": 1e400}, {"offer": "short"},
                       {"answer": "\ud800" * 43}):
            self.assertRefused(MalformedSignedAnswer, self.forge(claims=claims))

    def test_bad_local_arguments(self):
        signed = self.sign()
        self.assertRaises(ValueError, self.verify, signed, kd_names=[])
        self.assertRaises(ValueError, self.verify, signed, kd_names=KD_NAME)
        self.assertRaises(ValueError, self.verify, signed, trust_roots=[])
        self.assertRaises(TypeError, verify_signed_answer, signed, OFFER.encode(),
                          trust_roots=self.roots, kd_names=[KD_NAME], now=self.now)


class FuzzTests(AnswerTestsBase):
    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.one_of(st.text(max_size=400), st.binary(max_size=400)))
    def test_arbitrary_input_raises_only_answer_errors(self, text):
        self.assertRaises(AnswerError, self.verify, text)

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.data())
    def test_mutated_signed_answer(self, data):
        signed = self.signed_once()
        position = data.draw(st.integers(0, len(signed) - 1))
        replacement = data.draw(st.text(max_size=3))
        mutated = signed[:position] + replacement + signed[position + 1:]
        try:
            verified = self.verify(mutated)
        except AnswerError:
            return
        # whatever still verifies is exactly what was signed
        self.assertEqual(verified.answer.serialize(), self.unsigned.serialize())

    def signed_once(self) -> str:
        if not hasattr(self, "_signed"):
            self._signed = self.sign()
        return self._signed



class UnknownKeyTypeTests(AnswerTestsBase):
    def test_leaf_with_unknown_key_algorithm(self):
        """Found by the fuzzer: a leaf whose key algorithm is unknown is an AnswerError,
        not cryptography's UnsupportedAlgorithm."""
        signed = self.sign()
        header_b64 = signed.split("a=perc-answer-signature:")[1].split(".")[0]
        header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
        der = base64.b64decode(header["x5c"][0])
        ec_public_key = bytes.fromhex("06072a8648ce3d0201")  # OID 1.2.840.10045.2.1
        self.assertIn(ec_public_key, der)
        der = der.replace(ec_public_key, bytes.fromhex("06072a8648ce3d0209"), 1)
        header["x5c"][0] = base64.b64encode(der).decode()
        new_b64 = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
        self.assertRaises(AnswerError, self.verify, signed.replace(header_b64, new_b64, 1))
