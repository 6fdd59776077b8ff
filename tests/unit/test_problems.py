"""perc_daemons.problems.parse_problem: what clients say about an error answer."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.problems import ProblemText, parse_problem


class ParseProblemTests(unittest.TestCase):
    def test_rfc9457(self) -> None:
        body = json.dumps({"type": "urn:perc:problem:kd-refused", "status": 403,
                           "title": "Refused by the key distributor",
                           "detail": "not invited"}).encode()
        self.assertEqual(parse_problem(403, body),
                         ProblemText("kd-refused", "Refused by the key distributor",
                                     "not invited"))

    def test_oauth_error(self) -> None:
        body = b'{"error": "invalid_grant", "error_description": "code expired"}'
        self.assertEqual(parse_problem(400, body),
                         ProblemText("invalid_grant", "invalid_grant", "code expired"))

    def test_anything_else(self) -> None:
        for body in (b"", b"<html>502</html>", b"[1, 2]", b"\xff\xfe", b'{"title": 5}'):
            problem = parse_problem(502, body)
            self.assertEqual(problem.title, "HTTP 502")
            self.assertEqual(problem.slug, "")

    @given(st.binary(max_size=300))
    def test_never_raises(self, body: bytes) -> None:
        self.assertIsInstance(parse_problem(500, body), ProblemText)
