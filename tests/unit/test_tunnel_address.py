"""perc_daemons.protocol.tunnel_address: the "host:port" of an MD's tunnel listener."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.tunnel_address import (
    MAX_TUNNEL_ADDRESS,
    TunnelAddress,
    TunnelAddressError,
    check_tunnel_address,
    parse_tunnel_address,
)

FUZZ = settings(max_examples=400, deadline=None)

_LABEL = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", fullmatch=True)
# a name whose last label is not all digits (those read as IPv4)
DNS_NAMES = st.tuples(st.lists(_LABEL, max_size=4), _LABEL.filter(lambda s: not s.isdigit())
                      ).map(lambda t: ".".join([*t[0], t[1]]))
PORTS = st.integers(1, 65535)


class ParseTests(unittest.TestCase):
    def test_accepted_forms_and_their_canonical_text(self):
        for text, parsed, canonical in (
            ("md1.example.com:4443", TunnelAddress("md1.example.com", 4443),
             "md1.example.com:4443"),
            ("MD1.Example.COM:4443", TunnelAddress("md1.example.com", 4443),
             "md1.example.com:4443"),
            ("localhost:1", TunnelAddress("localhost", 1), "localhost:1"),
            ("127.0.0.1:65535", TunnelAddress("127.0.0.1", 65535), "127.0.0.1:65535"),
            ("md1:04443", TunnelAddress("md1", 4443), "md1:4443"),
            ("[::1]:4443", TunnelAddress("::1", 4443, ipv6=True), "[::1]:4443"),
            ("[2001:DB8:0:0:0:0:0:1]:9", TunnelAddress("2001:db8::1", 9, ipv6=True),
             "[2001:db8::1]:9"),
            ("a" * 63 + "." + "b" * 63 + ".c:80", None, "a" * 63 + "." + "b" * 63 + ".c:80"),
            ("1md.example.com:80", None, "1md.example.com:80"),  # a label may start with a digit
        ):
            if parsed is not None:
                self.assertEqual(parse_tunnel_address(text), parsed, text)
            self.assertEqual(check_tunnel_address(text), canonical, text)
            self.assertEqual(check_tunnel_address(canonical), canonical, text)

    def test_refused_forms(self):
        for text in (
            "", ":", "md1", "md1:", ":4443", "md1:0", "md1:65536", "md1:99999", "md1:123456",
            "md1:-1", "md1:+80", "md1: 80", "md1:80 ", " md1:80", "md1:\u00b2", "md1:\u0661",
            "md1:0x50", "md1.:80", ".md1:80", "md1..example:80", "-md1:80", "md1-:80",
            "md_1:80", "m d1:80", "md1.example.com./:80", "m\u00e9dia:80", "xn--:80",
            "a" * 64 + ":80",  # a label of 64
            ".".join(["a" * 63] * 4) + ":80",  # 255 characters of name
            "::1:4443",  # IPv6 without brackets: which colon is the port's?
            "[::1]", "[::1]:", "[::1]4443", "[md1.example.com]:80", "[127.0.0.1]:80",
            "[fe80::1%eth0]:4443", "[fe80::1%25eth0]:4443", "[[::1]]:80", "[]:80", "[:80",
            "::1]:80", "[::1:80",
            "1.2.3:80", "010.0.0.1:80", "256.0.0.1:80", "1.2.3.4.5:80", "12345:80",
            "example.123:80",  # the last label all digits: read as IPv4 by resolvers
            "user@md1:80", "http://md1:80", "md1:80/path", "md1:80\n", "md1\x00:80",
        ):
            with self.assertRaises(TunnelAddressError, msg=repr(text)) as cm:
                check_tunnel_address(text)
            self.assertIsInstance(cm.exception, ValueError)
            self.assertIsInstance(cm.exception, ProtocolError)
            self.assertEqual(cm.exception.reason, "bad_tunnel_address")

    def test_not_a_string(self):
        for value in (None, 4443, b"md1:4443", ["md1:4443"], ("md1", 4443)):
            self.assertRaises(TunnelAddressError, check_tunnel_address, value)

    def test_too_long_is_refused_before_it_is_parsed(self):
        error = self.assertRaises(TunnelAddressError, check_tunnel_address,
                                  "a" * 1_000_000 + ":80")
        self.assertLess(len(str(error)), MAX_TUNNEL_ADDRESS + 100)

    @FUZZ
    @given(st.text(max_size=300))
    def test_any_text_is_an_address_or_a_typed_error(self, text):
        try:
            canonical = check_tunnel_address(text)
        except TunnelAddressError:
            return
        self.assertEqual(check_tunnel_address(canonical), canonical)
        self.assertTrue(canonical.isascii())

    @FUZZ
    @given(st.one_of(st.text(alphabet="[]:.0123456789abcdefABCDEF%-xn", max_size=60),
                     st.binary(max_size=40), st.integers(), st.none(), st.floats(),
                     st.lists(st.text(max_size=5), max_size=3)))
    def test_address_like_junk_is_an_address_or_a_typed_error(self, value):
        try:
            address = parse_tunnel_address(value)
        except TunnelAddressError:
            return
        self.assertIsInstance(value, str)
        self.assertTrue(1 <= address.port <= 65535)
        self.assertEqual(parse_tunnel_address(str(address)), address)

    @FUZZ
    @given(st.one_of(DNS_NAMES, st.ip_addresses(v=4).map(str),
                     st.ip_addresses(v=6).map(lambda a: f"[{a}]")), PORTS)
    def test_every_valid_address_round_trips(self, host, port):
        address = parse_tunnel_address(f"{host}:{port}")
        self.assertEqual(address.port, port)
        if host.startswith("["):
            self.assertTrue(address.ipv6)
            self.assertEqual(ipaddress.IPv6Address(address.host),
                             ipaddress.IPv6Address(host[1:-1]))
        else:
            self.assertEqual(address.host, host.lower())
        self.assertEqual(parse_tunnel_address(str(address)), address)

    @FUZZ
    @given(DNS_NAMES, st.integers().filter(lambda n: not 1 <= n <= 65535))
    def test_ports_out_of_range_are_refused(self, host, port):
        self.assertRaises(TunnelAddressError, check_tunnel_address, f"{host}:{port}")
