"""Tunnel addresses: where a Media Distributor listens for its Key Distributor.

A tunnel address is the text ``host:port`` an MD gives back when it
acknowledges a conference, and which the application passes to the KD so that
it connects there (draft-roach-perc-webrtc slides 4.1.1 steps 9-12; the
connection is the RFC 9185 tunnel over TLS, and the KD checks the MD's
certificate against ``host``).  The KD's ``[tunnel] mds`` setting and the
KMF's per-conference list of Media Distributors both hold them, and both
validate them here.

``host`` is one of (the URI authority forms of RFC 3986 section 3.2.2, without
user information or an IPvFuture literal):

- a DNS name: labels of RFC 1123 section 2.1 (letters, digits, inner hyphens,
  1-63 characters each), at most 253 characters in all, no trailing dot.  A
  name whose last label is all digits is refused: resolvers read such text as
  an IPv4 address (``1.2.3`` is 1.2.0.3, ``010.0.0.1`` octal);
- an IPv4 address in dotted-quad form (no leading zeros);
- an IPv6 address in brackets, ``[2001:db8::1]`` (an unbracketed one is
  ambiguous with its port, and a zone id means nothing to another host).

``port`` is 1-65535 in ASCII decimal digits.

:func:`parse_tunnel_address` gives the canonical form, which is what stores
keep and compare: DNS names in lower case, IPv6 compressed (RFC 5952), the
port without leading zeros.  Malformed text raises
:class:`TunnelAddressError` (a :class:`ProtocolError` and a ``ValueError``),
never anything else.  Nothing here resolves a name or opens a socket.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from perc_daemons.protocol.errors import ProtocolError

__all__ = ["MAX_TUNNEL_ADDRESS", "TunnelAddress", "TunnelAddressError",
           "check_tunnel_address", "parse_tunnel_address"]

#: The longest acceptable text: a 253-character name, ":" and 5 digits.
MAX_TUNNEL_ADDRESS = 253 + 1 + 5

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT = re.compile(r"[0-9]{1,5}")


class TunnelAddressError(ProtocolError, ValueError):
    """Text that is not a tunnel address ``host:port`` (module docstring)."""

    reason = "bad_tunnel_address"


@dataclass(frozen=True)
class TunnelAddress:
    """A parsed tunnel address.

    ``host`` is what a socket connects to and the certificate is checked
    against: a lower-case DNS name, or an IP address as text (IPv6 without
    brackets); ``str()`` is the canonical ``host:port`` text.
    """

    host: str
    port: int
    ipv6: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.ipv6 else self.host
        return f"{host}:{self.port}"


def _refuse(text: str, why: str) -> TunnelAddressError:
    return TunnelAddressError(f"{text[:MAX_TUNNEL_ADDRESS + 1]!r} {why}")


def parse_tunnel_address(text: object) -> TunnelAddress:
    """The :class:`TunnelAddress` of ``text`` ("host:port"), or TunnelAddressError."""
    if not isinstance(text, str):
        raise TunnelAddressError(f'a tunnel address is a "host:port" string, not '
                                 f"{type(text).__name__}")
    if len(text) > MAX_TUNNEL_ADDRESS:
        raise _refuse(text, f"is longer than {MAX_TUNNEL_ADDRESS} characters")
    host, sep, port = text.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise _refuse(text, 'is not "host:port" with a port 1-65535')
    number = int(port)
    if host.startswith("[") and host.endswith("]"):
        literal = host[1:-1]
        try:
            address = ipaddress.IPv6Address(literal)
        except ValueError:
            raise _refuse(text, f"has {host!r}, which is not an IPv6 address") from None
        if "%" in literal:
            raise _refuse(text, "names an IPv6 zone, which means nothing to another host")
        return TunnelAddress(address.compressed, number, ipv6=True)
    try:
        ipv4 = ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return TunnelAddress(str(ipv4), number)
    if (len(host) > 253 or not _DNS_NAME.fullmatch(host)
            or host.rpartition(".")[2].isdigit()):
        raise _refuse(text, f"has {host!r}, which is not a DNS name, an IPv4 address or an "
                            "[IPv6] address")
    return TunnelAddress(host.lower(), number)


def check_tunnel_address(text: object) -> str:
    """The canonical form of the tunnel address ``text``, or TunnelAddressError."""
    return str(parse_tunnel_address(text))
