"""DTLS/TLS alerts and the errors that end a DTLS association (RFC 5246 s7.2).

Every error raised while processing a peer's handshake carries the alert that
is sent before the association is closed, in the style of aioquic's tls.py.
"""

from __future__ import annotations

from enum import IntEnum

from perc_daemons.protocol.errors import ProtocolError


class AlertLevel(IntEnum):
    WARNING = 1
    FATAL = 2


class AlertDescription(IntEnum):
    """RFC 5246 section 7.2 (and RFC 5746, RFC 7301 numbering)."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_EXPIRED = 45
    CERTIFICATE_UNKNOWN = 46
    ILLEGAL_PARAMETER = 47
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    PROTOCOL_VERSION = 70
    INSUFFICIENT_SECURITY = 71
    INTERNAL_ERROR = 80
    USER_CANCELED = 90
    NO_RENEGOTIATION = 100
    UNSUPPORTED_EXTENSION = 110


class DtlsError(ProtocolError):
    """A DTLS failure; ``alert`` is what we tell the peer (fatal)."""

    reason = "dtls_error"
    alert = AlertDescription.INTERNAL_ERROR


class DecodeError(DtlsError):
    """A malformed record, handshake message or extension."""

    reason = "dtls_decode"
    alert = AlertDescription.DECODE_ERROR


class IllegalParameter(DtlsError):
    reason = "dtls_illegal_parameter"
    alert = AlertDescription.ILLEGAL_PARAMETER


class UnexpectedMessage(DtlsError):
    reason = "dtls_unexpected_message"
    alert = AlertDescription.UNEXPECTED_MESSAGE


class HandshakeFailure(DtlsError):
    """No acceptable parameters (cipher suite, group, SRTP profile, EKT cipher)."""

    reason = "dtls_handshake_failure"
    alert = AlertDescription.HANDSHAKE_FAILURE


class NoCommonSrtpProfile(HandshakeFailure):
    """The client offers no use_srtp, or none of our profiles (with PERC: no DOUBLE
    profile, RFC 8723 s4)."""

    reason = "dtls_no_srtp_profile"


class NoCommonEktCipher(HandshakeFailure):
    """The client offers no supported_ekt_ciphers we take (RFC 8870 s5.1)."""

    reason = "dtls_no_ekt"


class ExternalSessionIdMismatch(HandshakeFailure):
    """external_session_id (RFC 8844) is not the tls-id signalled in SDP (RFC 8842)."""

    reason = "dtls_wrong_tls_id"


class BadCertificate(DtlsError):
    """The peer's certificate is malformed or does not match the expected fingerprint."""

    reason = "dtls_bad_certificate"
    alert = AlertDescription.BAD_CERTIFICATE


class FingerprintMismatch(BadCertificate):
    """The peer's certificate is not the one whose fingerprint SDP signalled."""

    reason = "dtls_wrong_certificate"


class DecryptError(DtlsError):
    """A signature or Finished verify_data did not verify."""

    reason = "dtls_decrypt_error"
    alert = AlertDescription.DECRYPT_ERROR


class InsufficientSecurity(DtlsError):
    reason = "dtls_insufficient_security"
    alert = AlertDescription.INSUFFICIENT_SECURITY


class ProtocolVersionError(DtlsError):
    reason = "dtls_protocol_version"
    alert = AlertDescription.PROTOCOL_VERSION


class NoRenegotiation(DtlsError):
    reason = "dtls_no_renegotiation"
    alert = AlertDescription.NO_RENEGOTIATION


class RecordOverflow(DtlsError):
    reason = "dtls_record_overflow"
    alert = AlertDescription.RECORD_OVERFLOW
