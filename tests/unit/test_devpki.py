"""perc_daemons.devpki: the development CA and its leaves."""

from __future__ import annotations

import os
import stat

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from twisted.trial import unittest

from perc_daemons.devpki import DevPki


class DevPkiTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.pki = DevPki(self.dir)

    def verifier(self, name: str):
        store = Store([self.pki.ca_certificate])
        return PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name))

    def test_leaf_verifies_for_its_names_only(self) -> None:
        issued = self.pki.issue("kd", ["kd.localhost"])
        leaf = x509.load_pem_x509_certificate(issued.certificate.read_bytes())
        chain = self.verifier("kd.localhost").verify(leaf, [])
        self.assertEqual(chain[-1], self.pki.ca_certificate)
        with self.assertRaises(VerificationError):
            self.verifier("md.localhost").verify(leaf, [])

    def test_keys_are_private(self) -> None:
        issued = self.pki.issue("md", ["localhost"], ["127.0.0.1"])
        for path in (issued.private_key, os.path.join(self.dir, "ca.key")):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_reopening_keeps_the_ca(self) -> None:
        again = DevPki(self.dir)
        self.assertEqual(again.ca_certificate, self.pki.ca_certificate)
        issued = again.issue("x", ["x.localhost"])
        leaf = x509.load_pem_x509_certificate(issued.certificate.read_bytes())
        self.verifier("x.localhost").verify(leaf, [])

    def test_another_ca_does_not_verify(self) -> None:
        other = DevPki(self.mktemp())
        issued = other.issue("kd", ["kd.localhost"])
        leaf = x509.load_pem_x509_certificate(issued.certificate.read_bytes())
        with self.assertRaises(VerificationError):
            self.verifier("kd.localhost").verify(leaf, [])

    def test_a_leaf_needs_a_name(self) -> None:
        with self.assertRaises(ValueError):
            self.pki.issue("nothing")
