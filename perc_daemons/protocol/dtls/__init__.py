"""Sans-I/O DTLS 1.2 (RFC 6347) with DTLS-SRTP (RFC 5764) and EKT (RFC 8870 s5.2).

:class:`DtlsConnection` is the state machine for either role; see its module
for what it implements.  Handshake and record codecs live in
:mod:`~perc_daemons.protocol.dtls.handshake` and
:mod:`~perc_daemons.protocol.dtls.record`, the key schedule and certificate
helpers in :mod:`~perc_daemons.protocol.dtls.crypto`.
"""

from perc_daemons.protocol.dtls.connection import (
    ApplicationDataReceived,
    ConnectionClosed,
    DtlsConfiguration,
    DtlsConnection,
    EktKeyAcknowledged,
    EktKeyReceived,
    Event,
    HandshakeComplete,
    Role,
)
from perc_daemons.protocol.dtls.crypto import (
    certificate_fingerprint,
    format_fingerprint,
    generate_certificate,
    parse_fingerprint,
)

__all__ = [
    "ApplicationDataReceived",
    "ConnectionClosed",
    "DtlsConfiguration",
    "DtlsConnection",
    "EktKeyAcknowledged",
    "EktKeyReceived",
    "Event",
    "HandshakeComplete",
    "Role",
    "certificate_fingerprint",
    "format_fingerprint",
    "generate_certificate",
    "parse_fingerprint",
]
