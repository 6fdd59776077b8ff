"""Tests for perc_daemons.kmf.roster (the signed per-epoch roster)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.trial import unittest

from perc_daemons.kmf.signing import SigningKeys
from perc_daemons.kmf.tokens import issue_access_token
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.roster import (
    ROSTER_TYP,
    DuplicateSsrc,
    InvalidRoster,
    Roster,
    RosterError,
    RosterMember,
    StaleRoster,
    WrongConference,
    sign_roster,
    verify_roster,
)

T0 = 1_800_000_000
ISSUER = "https://kmf.example.com"
MEMBERS = [("bob@example.com", [7, 3]), ("alice@example.com", [0xFFFFFFFF, 1])]


class RosterTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.keys = SigningKeys.create(Path(self.mktemp()), T0)

    def sign(self, **overrides: Any) -> str:
        kwargs: dict[str, Any] = {
            "issuer": ISSUER, "conference_id": "conf-1", "epoch": 4, "members": MEMBERS,
            "now": T0,
        }
        kwargs.update(overrides)
        return sign_roster(self.keys, **kwargs)

    def verify(self, token: str, **overrides: Any) -> Roster:
        kwargs: dict[str, Any] = {"issuer": ISSUER, "conference_id": "conf-1", "now": T0 + 1}
        kwargs.update(overrides)
        jwks = kwargs.pop("jwks", self.keys.jwks(T0))
        return verify_roster(token, jwks, **kwargs)

    def resign(self, claims: dict[str, Any], key: Any = None) -> str:
        return jwt.encode(
            claims, key or self.keys.active.private_key, algorithm="ES256",
            headers={"kid": self.keys.active.kid, "typ": ROSTER_TYP},
        )

    def test_identities_in_normal_form(self) -> None:
        roster = self.verify(self.sign(members=[("Bob@Example.COM", [7])]))
        self.assertEqual(roster.identity_of(7), "bob@example.com")
        # a roster signed before the rule still reads in the normal form
        claims = {"iss": ISSUER, "conference": "conf-1", "epoch": 4, "iat": T0,
                  "members": [{"identity": "ALICE@example.com", "ssrcs": [1]}]}
        self.assertEqual(self.verify(self.resign(claims)).identity_of(1), "alice@example.com")
        self.assertRaises(ValueError, self.sign,
                          members=[("bob@example.com", [1]), ("BOB@example.com", [2])])

    def test_valid(self) -> None:
        token = self.sign()
        self.assertEqual(
            jwt.get_unverified_header(token),
            {"alg": "ES256", "typ": ROSTER_TYP, "kid": self.keys.active.kid},
        )
        roster = self.verify(token, min_epoch=4)
        self.assertEqual(
            roster,
            Roster(
                conference_id="conf-1",
                epoch=4,
                issued_at=T0,
                members=(
                    RosterMember("alice@example.com", (1, 0xFFFFFFFF)),
                    RosterMember("bob@example.com", (3, 7)),
                ),
            ),
        )
        self.assertEqual(roster.identity_of(7), "bob@example.com")
        self.assertIsNone(roster.identity_of(8))
        self.assertEqual(self.verify(token, jwks=self.keys).epoch, 4)

    def test_deterministic_order(self) -> None:
        a = jwt.decode(self.sign(), options={"verify_signature": False})
        b = jwt.decode(self.sign(members=list(reversed(MEMBERS))),
                       options={"verify_signature": False})
        self.assertEqual(a, b)
        self.assertEqual([m["identity"] for m in a["members"]],
                         ["alice@example.com", "bob@example.com"])
        self.assertEqual(a["members"][0]["ssrcs"], [1, 0xFFFFFFFF])

    def test_tampered(self) -> None:
        head, _body, sig = self.sign().split(".")
        claims = jwt.decode(self.sign(), options={"verify_signature": False})
        claims["members"][0]["ssrcs"].append(99)
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        self.assertRaises(InvalidRoster, self.verify, f"{head}.{body}.{sig}")

    def test_bad_signature(self) -> None:
        claims = jwt.decode(self.sign(), options={"verify_signature": False})
        forged = self.resign(claims, ec.generate_private_key(ec.SECP256R1()))
        self.assertRaises(InvalidRoster, self.verify, forged)
        self.verify(self.resign(claims))

    def test_wrong_conference(self) -> None:
        self.assertRaises(WrongConference, self.verify, self.sign(conference_id="conf-2"))

    def test_old_epoch_refused(self) -> None:
        token = self.sign(epoch=4)
        self.verify(token, min_epoch=4)
        self.verify(token, min_epoch=0)
        e = self.assertRaises(StaleRoster, self.verify, token, min_epoch=5)
        self.assertIn("4", str(e))

    def test_duplicate_ssrc(self) -> None:
        members = [("a@example.com", [5]), ("b@example.com", [5])]
        self.assertRaises(DuplicateSsrc, self.sign, members=members)
        self.assertRaises(DuplicateSsrc, self.sign, members=[("a@example.com", [5, 5])])
        claims = jwt.decode(self.sign(), options={"verify_signature": False})
        claims["members"][1]["ssrcs"].append(claims["members"][0]["ssrcs"][0])
        self.assertRaises(DuplicateSsrc, self.verify, self.resign(claims))

    def test_wrong_issuer(self) -> None:
        self.assertRaises(InvalidRoster, self.verify, self.sign(issuer="https://md.example"))

    def test_issued_in_future(self) -> None:
        self.assertRaises(InvalidRoster, self.verify, self.sign(now=T0 + 60))

    def test_access_token_is_not_a_roster(self) -> None:
        token = issue_access_token(
            self.keys, issuer=ISSUER, subject="alice@example.com", audience="conf-1",
            client_id="c", scopes=[], now=T0,
        )
        self.assertRaises(InvalidRoster, self.verify, token)

    def test_malformed_members(self) -> None:
        good = jwt.decode(self.sign(), options={"verify_signature": False})
        for members in ("x", [1], [{"identity": "a@example.com", "ssrcs": [-1]}],
                        [{"identity": "a@example.com", "ssrcs": [1 << 32]}],
                        [{"identity": "a@example.com", "ssrcs": [True]}],
                        [{"identity": "", "ssrcs": [1]}],
                        [{"identity": "a@example.com", "ssrcs": [1]},
                         {"identity": "a@example.com", "ssrcs": [2]}]):
            self.assertRaises(InvalidRoster, self.verify, self.resign({**good, "members": members}))
        for epoch in (-1, "4", 4.5, True):
            self.assertRaises(InvalidRoster, self.verify, self.resign({**good, "epoch": epoch}))

    def test_sign_refuses_bad_arguments(self) -> None:
        self.assertRaises(ValueError, self.sign, epoch=-1)
        self.assertRaises(ValueError, self.sign, members=[("a@example.com", [1 << 32])])
        self.assertRaises(ValueError, self.sign, conference_id="")

    def test_garbage(self) -> None:
        for token in ("", "a.b.c", "x" * 50_000):
            self.assertRaises(InvalidRoster, self.verify, token)

    def test_errors(self) -> None:
        classes = (InvalidRoster, WrongConference, StaleRoster, DuplicateSsrc)
        for cls in classes:
            self.assertTrue(issubclass(cls, RosterError))
        self.assertTrue(issubclass(RosterError, ProtocolError))
        self.assertEqual(len({c.reason for c in (RosterError, *classes)}), 5)
