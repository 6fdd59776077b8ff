"""DTLS 1.2 handshake messages, extensions, framing and reassembly (handshake.py)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol.dtls.alerts import (
    AlertDescription,
    AlertLevel,
    DecodeError,
    DtlsError,
    IllegalParameter,
)
from perc_daemons.protocol.dtls.handshake import (
    DTLS_1_0,
    DTLS_1_2,
    HANDSHAKE_HEADER_LENGTH,
    MAX_HANDSHAKE_MESSAGE,
    RANDOM_LENGTH,
    Certificate,
    CertificateRequest,
    CertificateVerify,
    CipherSuite,
    ClientCertificateType,
    ClientHello,
    ClientKeyExchange,
    ECCurveType,
    ECPointFormat,
    ExtensionType,
    Finished,
    HandshakeFragment,
    HandshakeType,
    HelloVerifyRequest,
    NamedGroup,
    Reassembler,
    ServerHello,
    ServerHelloDone,
    ServerKeyExchange,
    SignatureScheme,
    decode_ack,
    decode_alert,
    decode_ec_point_formats,
    decode_ekt_cipher_server,
    decode_ekt_ciphers_client,
    decode_empty,
    decode_external_session_id,
    decode_renegotiation_info,
    decode_signature_algorithms,
    decode_supported_groups,
    decode_use_srtp,
    encode_ack,
    encode_alert,
    encode_ec_point_formats,
    encode_ekt_cipher_server,
    encode_ekt_ciphers_client,
    encode_external_session_id,
    encode_renegotiation_info,
    encode_signature_algorithms,
    encode_supported_groups,
    encode_use_srtp,
    find_extension,
    fragment_message,
    full_message,
    parse_handshake_fragments,
)


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


SRTP_AEAD_AES_128_GCM = 0x0007
SRTP_AEAD_AES_256_GCM = 0x0008
SRTP_AES128_CM_HMAC_SHA1_80 = 0x0001
AESKW_128 = 1
AESKW_256 = 2
TLS_ID = b"0123456789abcdefABCD"  # 20 octets, the minimum (RFC 8844 §4.3)

CLIENT_RANDOM = bytes(range(32))
SERVER_RANDOM = bytes(range(32, 64))

# A ClientHello with a cookie and the extensions a PERC endpoint sends, written
# out by hand field by field (RFC 5246 §7.4.1.2, RFC 6347 §4.2.1).
CLIENT_HELLO_WIRE = h(
    "fe fd"  # client_version DTLS 1.2
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"  # random
    "00"  # session_id<0..32>: empty
    "04 de ad be ef"  # cookie<0..2^8-1>
    "00 06 c0 2b c0 2c 00 ff"  # cipher_suites: two GCM suites + SCSV
    "01 00"  # compression_methods: null
    "00 4b"  # extensions: 75 bytes
    "00 0a 00 06 00 04 00 17 00 18"  # supported_groups: secp256r1, secp384r1
    "00 0b 00 02 01 00"  # ec_point_formats: uncompressed
    "00 0d 00 04 00 02 04 03"  # signature_algorithms: ecdsa_secp256r1_sha256
    "00 0e 00 07 00 04 00 07 00 01 00"  # use_srtp: AEAD_AES_128_GCM, AES128_CM_80; no MKI
    "00 17 00 00"  # extended_master_secret
    "00 27 00 02 01 01"  # supported_ekt_ciphers: aeskw_128
    "00 38 00 15 14" + TLS_ID.hex() +  # external_session_id
    "ff 01 00 01 00"  # renegotiation_info: empty renegotiated_connection
)
CLIENT_HELLO_EXTENSIONS = [
    (ExtensionType.SUPPORTED_GROUPS, h("0004 0017 0018")),
    (ExtensionType.EC_POINT_FORMATS, h("01 00")),
    (ExtensionType.SIGNATURE_ALGORITHMS, h("0002 0403")),
    (ExtensionType.USE_SRTP, h("0004 0007 0001 00")),
    (ExtensionType.EXTENDED_MASTER_SECRET, b""),
    (ExtensionType.SUPPORTED_EKT_CIPHERS, h("01 01")),
    (ExtensionType.EXTERNAL_SESSION_ID, b"\x14" + TLS_ID),
    (ExtensionType.RENEGOTIATION_INFO, b"\x00"),
]
CLIENT_HELLO = ClientHello(
    version=DTLS_1_2,
    random=CLIENT_RANDOM,
    session_id=b"",
    cookie=h("deadbeef"),
    cipher_suites=[
        CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        CipherSuite.ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        CipherSuite.EMPTY_RENEGOTIATION_INFO_SCSV,
    ],
    compression_methods=[0],
    extensions=CLIENT_HELLO_EXTENSIONS,
)
# Where the optional extensions block starts: a ClientHello may end there.
CLIENT_HELLO_NO_EXT_LENGTH = 2 + 32 + 1 + 5 + 8 + 2

SERVER_HELLO_WIRE = h(
    "fe fd"  # server_version
    "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"  # random
    "04 0a 0b 0c 0d"  # session_id
    "c0 2b"  # cipher_suite
    "00"  # compression_method
    "00 36"  # extensions: 54 bytes
    "00 0e 00 05 00 02 00 07 00"  # use_srtp: AEAD_AES_128_GCM, no MKI
    "00 17 00 00"  # extended_master_secret
    "ff 01 00 01 00"  # renegotiation_info
    "00 27 00 01 01"  # supported_ekt_ciphers: selected aeskw_128
    "00 38 00 15 14" + TLS_ID.hex() +  # external_session_id
    "00 0b 00 02 01 00"  # ec_point_formats
)
SERVER_HELLO = ServerHello(
    version=DTLS_1_2,
    random=SERVER_RANDOM,
    session_id=h("0a0b0c0d"),
    cipher_suite=CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    compression_method=0,
    extensions=[
        (ExtensionType.USE_SRTP, h("0002 0007 00")),
        (ExtensionType.EXTENDED_MASTER_SECRET, b""),
        (ExtensionType.RENEGOTIATION_INFO, b"\x00"),
        (ExtensionType.SUPPORTED_EKT_CIPHERS, b"\x01"),
        (ExtensionType.EXTERNAL_SESSION_ID, b"\x14" + TLS_ID),
        (ExtensionType.EC_POINT_FORMATS, h("01 00")),
    ],
)
SERVER_HELLO_NO_EXT_LENGTH = 2 + 32 + 5 + 2 + 1

P256_POINT = b"\x04" + bytes(range(1, 65))  # uncompressed, 65 bytes
DER_SIGNATURE = b"\x30\x45" + bytes(range(0x45))  # ECDSA-Sig-Value shaped, 71 bytes


def realistic_messages() -> list[Any]:
    rng = random.Random(5246)
    return [
        CLIENT_HELLO,
        ClientHello(DTLS_1_2, CLIENT_RANDOM, b"", b"", [0xC02B], [0], []),
        SERVER_HELLO,
        ServerHello(DTLS_1_2, SERVER_RANDOM, bytes(32), 0xC02C, 0, []),
        HelloVerifyRequest(DTLS_1_0, rng.randbytes(32)),
        HelloVerifyRequest(DTLS_1_0, b""),
        Certificate([rng.randbytes(480), rng.randbytes(900)]),
        Certificate([]),
        ServerKeyExchange(
            NamedGroup.SECP256R1, P256_POINT,
            SignatureScheme.ECDSA_SECP256R1_SHA256, DER_SIGNATURE,
        ),
        ServerKeyExchange(NamedGroup.X25519, rng.randbytes(32), 0x0807, rng.randbytes(64)),
        CertificateRequest(
            [ClientCertificateType.ECDSA_SIGN],
            [SignatureScheme.ECDSA_SECP256R1_SHA256, SignatureScheme.ECDSA_SECP384R1_SHA384],
            [],
        ),
        CertificateRequest([64, 1], [0x0403], [rng.randbytes(60), b"\x30"]),
        ServerHelloDone(),
        ClientKeyExchange(P256_POINT),
        CertificateVerify(SignatureScheme.ECDSA_SECP256R1_SHA256, DER_SIGNATURE),
        CertificateVerify(SignatureScheme.ECDSA_SHA1, b""),
        Finished(rng.randbytes(12)),
    ]


class EnumTests(unittest.TestCase):
    def test_constants(self) -> None:
        self.assertEqual(
            (DTLS_1_2, DTLS_1_0, HANDSHAKE_HEADER_LENGTH, RANDOM_LENGTH, MAX_HANDSHAKE_MESSAGE),
            (0xFEFD, 0xFEFF, 12, 32, 65536),
        )

    def test_values(self) -> None:
        self.assertEqual(
            {e.name: e.value for e in HandshakeType},
            {
                "HELLO_REQUEST": 0, "CLIENT_HELLO": 1, "SERVER_HELLO": 2,
                "HELLO_VERIFY_REQUEST": 3, "CERTIFICATE": 11, "SERVER_KEY_EXCHANGE": 12,
                "CERTIFICATE_REQUEST": 13, "SERVER_HELLO_DONE": 14, "CERTIFICATE_VERIFY": 15,
                "CLIENT_KEY_EXCHANGE": 16, "FINISHED": 20, "EKT_KEY": 26,
            },
        )
        self.assertEqual(
            {e.name: e.value for e in ExtensionType},
            {
                "SUPPORTED_GROUPS": 10, "EC_POINT_FORMATS": 11, "SIGNATURE_ALGORITHMS": 13,
                "USE_SRTP": 14, "EXTENDED_MASTER_SECRET": 23, "SUPPORTED_EKT_CIPHERS": 39,
                "EXTERNAL_SESSION_ID": 56, "RENEGOTIATION_INFO": 0xFF01,
            },
        )
        self.assertEqual(
            [int(e) for e in CipherSuite], [0xC02B, 0xC02C, 0x00FF]
        )
        self.assertEqual([int(e) for e in NamedGroup], [23, 24, 29])
        self.assertEqual(
            [int(e) for e in SignatureScheme], [0x0403, 0x0503, 0x0203, 0x0401, 0x0804]
        )
        self.assertEqual(
            (ClientCertificateType.ECDSA_SIGN, ECCurveType.NAMED_CURVE, ECPointFormat.UNCOMPRESSED),
            (64, 3, 0),
        )


class KnownEncodingTests(unittest.TestCase):
    """Encodings written out byte by byte from the RFC structures."""

    def test_client_hello(self) -> None:
        self.assertEqual(CLIENT_HELLO.encode(), CLIENT_HELLO_WIRE)
        decoded = ClientHello.decode(CLIENT_HELLO_WIRE)
        self.assertEqual(decoded, CLIENT_HELLO)
        self.assertEqual(decoded.cookie, h("deadbeef"))

    def test_client_hello_extension_contents(self) -> None:
        exts = ClientHello.decode(CLIENT_HELLO_WIRE).extensions
        self.assertEqual(
            decode_supported_groups(find_extension(exts, ExtensionType.SUPPORTED_GROUPS)),
            [NamedGroup.SECP256R1, NamedGroup.SECP384R1],
        )
        self.assertEqual(
            decode_ec_point_formats(find_extension(exts, ExtensionType.EC_POINT_FORMATS)),
            [ECPointFormat.UNCOMPRESSED],
        )
        self.assertEqual(
            decode_signature_algorithms(find_extension(exts, ExtensionType.SIGNATURE_ALGORITHMS)),
            [SignatureScheme.ECDSA_SECP256R1_SHA256],
        )
        self.assertEqual(
            decode_use_srtp(find_extension(exts, ExtensionType.USE_SRTP)),
            ([SRTP_AEAD_AES_128_GCM, SRTP_AES128_CM_HMAC_SHA1_80], b""),
        )
        self.assertIsNone(decode_empty(find_extension(exts, ExtensionType.EXTENDED_MASTER_SECRET)))
        self.assertEqual(
            decode_ekt_ciphers_client(find_extension(exts, ExtensionType.SUPPORTED_EKT_CIPHERS)),
            [AESKW_128],
        )
        self.assertEqual(
            decode_external_session_id(find_extension(exts, ExtensionType.EXTERNAL_SESSION_ID)),
            TLS_ID,
        )
        self.assertEqual(
            decode_renegotiation_info(find_extension(exts, ExtensionType.RENEGOTIATION_INFO)), b""
        )
        self.assertIsNone(find_extension(exts, 0x0010))

    def test_client_hello_without_extensions(self) -> None:
        hello = ClientHello(DTLS_1_2, CLIENT_RANDOM, b"", b"", [0xC02B], [0], [])
        wire = h("fefd") + CLIENT_RANDOM + h("00 00 0002c02b 0100")
        self.assertEqual(hello.encode(), wire)
        self.assertEqual(ClientHello.decode(wire), hello)
        # A present but empty block is accepted and decodes to no extensions.
        self.assertEqual(ClientHello.decode(wire + h("0000")), hello)

    def test_server_hello(self) -> None:
        self.assertEqual(SERVER_HELLO.encode(), SERVER_HELLO_WIRE)
        self.assertEqual(ServerHello.decode(SERVER_HELLO_WIRE), SERVER_HELLO)
        exts = SERVER_HELLO.extensions
        self.assertEqual(
            decode_use_srtp(find_extension(exts, ExtensionType.USE_SRTP)),
            ([SRTP_AEAD_AES_128_GCM], b""),
        )
        self.assertEqual(
            decode_ekt_cipher_server(find_extension(exts, ExtensionType.SUPPORTED_EKT_CIPHERS)),
            AESKW_128,
        )

    def test_hello_verify_request(self) -> None:
        cookie = bytes(range(0xA0, 0xB0))
        wire = h("fe ff 10") + cookie
        self.assertEqual(HelloVerifyRequest(DTLS_1_0, cookie).encode(), wire)
        self.assertEqual(HelloVerifyRequest.decode(wire), HelloVerifyRequest(DTLS_1_0, cookie))

    def test_use_srtp(self) -> None:
        self.assertEqual(encode_use_srtp([0x0009, 0x0007]), h("00 04 00 09 00 07 00"))
        self.assertEqual(decode_use_srtp(h("00 04 00 09 00 07 00")), ([9, 7], b""))
        with_mki = h("00 02 00 08 03 01 02 03")
        self.assertEqual(encode_use_srtp([SRTP_AEAD_AES_256_GCM], b"\x01\x02\x03"), with_mki)
        self.assertEqual(decode_use_srtp(with_mki), ([8], b"\x01\x02\x03"))

    def test_supported_ekt_ciphers(self) -> None:
        self.assertEqual(encode_ekt_ciphers_client([AESKW_256, AESKW_128]), h("02 02 01"))
        self.assertEqual(decode_ekt_ciphers_client(h("02 02 01")), [2, 1])
        self.assertEqual(encode_ekt_cipher_server(AESKW_256), h("02"))
        self.assertEqual(decode_ekt_cipher_server(h("02")), 2)

    def test_external_session_id(self) -> None:
        self.assertEqual(encode_external_session_id(TLS_ID), b"\x14" + TLS_ID)
        self.assertEqual(decode_external_session_id(b"\x14" + TLS_ID), TLS_ID)
        longest = bytes(range(255))
        self.assertEqual(encode_external_session_id(longest), b"\xff" + longest)
        self.assertEqual(decode_external_session_id(b"\xff" + longest), longest)

    def test_other_extensions(self) -> None:
        self.assertEqual(encode_supported_groups([29, 23]), h("0004 001d 0017"))
        self.assertEqual(encode_ec_point_formats([0]), h("01 00"))
        self.assertEqual(encode_signature_algorithms([0x0403, 0x0804]), h("0004 0403 0804"))
        self.assertEqual(encode_renegotiation_info(), h("00"))
        self.assertEqual(encode_renegotiation_info(b"\xaa" * 12), h("0c") + b"\xaa" * 12)

    def test_certificate(self) -> None:
        cert = Certificate([h("3001"), h("30")])
        wire = h("000009 000002 3001 000001 30")
        self.assertEqual(cert.encode(), wire)
        self.assertEqual(Certificate.decode(wire), cert)
        self.assertEqual(Certificate([]).encode(), h("000000"))

    def test_server_key_exchange(self) -> None:
        ske = ServerKeyExchange(0x0017, P256_POINT, 0x0403, DER_SIGNATURE)
        params = h("03 0017 41") + P256_POINT
        self.assertEqual(ske.params(), params)
        wire = params + h("0403 0047") + DER_SIGNATURE
        self.assertEqual(ske.encode(), wire)
        self.assertEqual(ServerKeyExchange.decode(wire), ske)

    def test_certificate_request(self) -> None:
        req = CertificateRequest([64], [0x0403, 0x0503], [h("3000")])
        wire = h("01 40  0004 0403 0503  0004 0002 3000")
        self.assertEqual(req.encode(), wire)
        self.assertEqual(CertificateRequest.decode(wire), req)

    def test_small_messages(self) -> None:
        self.assertEqual(ServerHelloDone().encode(), b"")
        self.assertEqual(ServerHelloDone.decode(b""), ServerHelloDone())
        self.assertEqual(ClientKeyExchange(P256_POINT).encode(), h("41") + P256_POINT)
        self.assertEqual(CertificateVerify(0x0403, h("3006")).encode(), h("0403 0002 3006"))
        self.assertEqual(Finished(bytes(range(12))).encode(), bytes(range(12)))

    def test_handshake_header(self) -> None:
        self.assertEqual(full_message(1, 0, b"abc"), h("01 000003 0000 000000 000003 616263"))
        fragment = HandshakeFragment(11, 0x001234, 0x0203, 0x000100, b"xy")
        self.assertEqual(fragment.encode(), h("0b 001234 0203 000100 000002 7879"))
        self.assertEqual(parse_handshake_fragments(fragment.encode()), [fragment])

    def test_full_message_is_the_transcript_form(self) -> None:
        body = Certificate([bytes(700)]).encode()
        fragments = fragment_message(HandshakeType.CERTIFICATE, 2, body, 100)
        self.assertGreater(len(fragments), 1)
        self.assertEqual(
            full_message(HandshakeType.CERTIFICATE, 2, body),
            HandshakeFragment(HandshakeType.CERTIFICATE, len(body), 2, 0, body).encode(),
        )
        self.assertEqual(full_message(14, 3, b""), h("0e 000000 0003 000000 000000"))

    def test_alert_and_ack(self) -> None:
        self.assertEqual(
            encode_alert(AlertLevel.FATAL, AlertDescription.HANDSHAKE_FAILURE), h("02 28")
        )
        self.assertEqual(decode_alert(h("01 00")), (1, 0))
        wire = h("0020 0000000000000001 0000000000000002 0000000000000002 ffffffffffffffff")
        self.assertEqual(encode_ack([(1, 2), (2, 2**64 - 1)]), wire)
        self.assertEqual(decode_ack(wire), [(1, 2), (2, 2**64 - 1)])
        self.assertEqual(encode_ack([]), h("0000"))
        self.assertEqual(decode_ack(h("0000")), [])


class RoundTripTests(unittest.TestCase):
    def test_messages(self) -> None:
        for message in realistic_messages():
            encoded = message.encode()
            self.assertEqual(type(message).decode(encoded), message, message)
            self.assertEqual(type(message).decode(encoded).encode(), encoded)

    def test_extensions(self) -> None:
        cases: list[tuple[Callable[..., bytes], Callable[[bytes], Any], tuple[Any, ...], Any]] = [
            (encode_use_srtp, decode_use_srtp, ([7, 8, 1, 2],), ([7, 8, 1, 2], b"")),
            (encode_use_srtp, decode_use_srtp, ([7], b"\x00" * 255), ([7], b"\x00" * 255)),
            (encode_supported_groups, decode_supported_groups, ([29, 23, 24],), [29, 23, 24]),
            (encode_ec_point_formats, decode_ec_point_formats, ([0, 1, 2],), [0, 1, 2]),
            (
                encode_signature_algorithms, decode_signature_algorithms,
                ([0x0403, 0x0503, 0x0804, 0x0401, 0x0203],),
                [0x0403, 0x0503, 0x0804, 0x0401, 0x0203],
            ),
            (encode_renegotiation_info, decode_renegotiation_info, (b"v" * 24,), b"v" * 24),
            (encode_ekt_ciphers_client, decode_ekt_ciphers_client, ([1, 2],), [1, 2]),
            (encode_ekt_cipher_server, decode_ekt_cipher_server, (1,), 1),
            (encode_external_session_id, decode_external_session_id, (b"t" * 64,), b"t" * 64),
            (encode_alert, decode_alert, (2, 47), (2, 47)),
            (encode_ack, decode_ack, ([(0, 0), (1, 5), (1, 6)],), [(0, 0), (1, 5), (1, 6)]),
        ]
        for encode, decode, args, expected in cases:
            self.assertEqual(decode(encode(*args)), expected, encode.__name__)

    def test_unknown_values_stay_plain_ints(self) -> None:
        hello = ClientHello(
            DTLS_1_2, CLIENT_RANDOM, b"", b"",
            [0x1301, 0xC02B, 0xCCA9, 0x0A0A], [0, 1], [(0x3A3A, b"grease"), (0x0010, b"")],
        )
        decoded = ClientHello.decode(hello.encode())
        self.assertEqual(decoded.cipher_suites, [0x1301, 0xC02B, 0xCCA9, 0x0A0A])
        self.assertEqual(decoded.extensions, [(0x3A3A, b"grease"), (0x0010, b"")])
        self.assertEqual(decode_supported_groups(h("0004 001e 0a0a")), [30, 0x0A0A])

    def test_encoder_refuses_values_that_do_not_fit(self) -> None:
        bad: list[Callable[[], bytes]] = [
            lambda: encode_external_session_id(b"x" * 19),
            lambda: encode_external_session_id(b"x" * 256),
            lambda: encode_use_srtp([]),
            lambda: encode_use_srtp([7], b"m" * 256),
            lambda: encode_use_srtp([0x10000]),
            lambda: encode_ekt_ciphers_client([]),
            lambda: encode_ekt_cipher_server(256),
            lambda: Finished(b"\x00" * 11).encode(),
            lambda: ClientHello(DTLS_1_2, b"short", b"", b"", [0xC02B], [0], []).encode(),
            lambda: ClientHello(DTLS_1_2, CLIENT_RANDOM, b"s" * 33, b"", [1], [0], []).encode(),
            lambda: ClientHello(DTLS_1_2, CLIENT_RANDOM, b"", b"", [], [0], []).encode(),
            lambda: ClientHello(
                DTLS_1_2, CLIENT_RANDOM, b"", b"", [1], [0], [(14, b""), (14, b"")]
            ).encode(),
            lambda: ClientKeyExchange(b"").encode(),
            lambda: Certificate([b""]).encode(),
            lambda: encode_ack([(-1, 0)]),
            lambda: fragment_message(1, 0, b"abc", 0),
        ]
        for index, build in enumerate(bad):
            self.assertRaises(DtlsError, build)
            try:
                build()
            except DtlsError as e:
                self.assertEqual(e.alert, AlertDescription.INTERNAL_ERROR, index)


class MalformedTests(unittest.TestCase):
    def assertDecodeErrors(
        self, decode: Callable[[bytes], Any], cases: list[bytes],
        error: type[DtlsError] = DecodeError,
    ) -> None:
        for data in cases:
            try:
                result = decode(data)
            except error as e:
                self.assertIsInstance(e, DtlsError)
                self.assertTrue(str(e), "error without a message")
            else:
                self.fail(f"{decode.__qualname__}({data.hex()}) returned {result!r}")

    def test_client_hello_truncated(self) -> None:
        for cut in range(len(CLIENT_HELLO_WIRE)):
            if cut == CLIENT_HELLO_NO_EXT_LENGTH:
                self.assertEqual(ClientHello.decode(CLIENT_HELLO_WIRE[:cut]).extensions, [])
            else:
                self.assertDecodeErrors(ClientHello.decode, [CLIENT_HELLO_WIRE[:cut]])

    def test_client_hello_fields(self) -> None:
        head = h("fefd") + CLIENT_RANDOM
        self.assertDecodeErrors(ClientHello.decode, [
            CLIENT_HELLO_WIRE + b"\x00",  # trailing byte
            head + b"\x21" + bytes(33) + h("00 0002c02b 0100"),  # session_id of 33
            head + h("00 00 0003c02b00 0100"),  # odd cipher_suites
            head + h("00 00 0000 0100"),  # no cipher suites
            head + h("00 00 0002c02b 00"),  # no compression methods
            head + h("00 05 dead 0002c02b 0100"),  # cookie overruns
            head + h("00 00 0002c02b 0100 0005 0017 0000"),  # extensions block overruns
            head + h("00 00 0002c02b 0100 0004 0017 0001"),  # extension data overruns
            head + h("00 00 0002c02b 0100 0003 0017 00"),  # extension header cut
            head + h("00 00 0002c02b 0100 00"),  # half a block length
        ])

    def test_duplicate_extensions(self) -> None:
        base = h("fefd") + CLIENT_RANDOM + h("00 00 0002c02b 0100")
        dup = h("0008 0017 0000 0017 0000")
        self.assertDecodeErrors(ClientHello.decode, [base + dup])
        server = h("fefd") + SERVER_RANDOM + h("00 c02b 00")
        self.assertDecodeErrors(ServerHello.decode, [server + h("000a 000e 0001 00 000e 0001 00")])
        self.assertDecodeErrors(ServerHello.decode, [server + h("000a ff01 0001 00 ff01 0001 00")])
        # The same two extension types once each are fine.
        ok = ServerHello.decode(server + h("0009 ff01 0001 00 0017 0000"))
        self.assertEqual(ok.extensions, [(0xFF01, b"\x00"), (0x0017, b"")])

    def test_server_hello(self) -> None:
        for cut in range(len(SERVER_HELLO_WIRE)):
            if cut == SERVER_HELLO_NO_EXT_LENGTH:
                self.assertEqual(ServerHello.decode(SERVER_HELLO_WIRE[:cut]).extensions, [])
            else:
                self.assertDecodeErrors(ServerHello.decode, [SERVER_HELLO_WIRE[:cut]])
        self.assertDecodeErrors(ServerHello.decode, [
            SERVER_HELLO_WIRE + b"\x00",
            h("fefd") + SERVER_RANDOM + b"\x21" + bytes(33) + h("c02b 00"),
        ])

    def test_hello_verify_request(self) -> None:
        self.assertDecodeErrors(HelloVerifyRequest.decode, [
            b"", h("feff"), h("feff 05 0102"), h("feff 02 0102 03"), h("fe"),
        ])

    def test_certificate(self) -> None:
        self.assertDecodeErrors(Certificate.decode, [
            b"", h("0000"), h("000003 000000"),  # empty ASN.1Cert
            h("000004 000002 30"),  # outer list overruns
            h("000004 000005 3001"),  # inner cert overruns the list
            h("000003 000001 30 00"),  # trailing byte after the list
            h("000002 0000"),  # cert length cut inside the list
        ])

    def test_server_key_exchange(self) -> None:
        good = ServerKeyExchange(23, P256_POINT, 0x0403, DER_SIGNATURE).encode()
        self.assertDecodeErrors(ServerKeyExchange.decode, [
            good[:cut] for cut in range(len(good))
        ])
        self.assertDecodeErrors(ServerKeyExchange.decode, [
            good + b"\x00", h("03 0017 00 0403 0000"),  # empty ECPoint
        ])
        self.assertDecodeErrors(
            ServerKeyExchange.decode, [b"\x01" + good[1:], b"\x02" + good[1:]], IllegalParameter
        )

    def test_certificate_request(self) -> None:
        self.assertDecodeErrors(CertificateRequest.decode, [
            b"", h("00 0002 0403 0000"),  # no certificate types
            h("01 40 0000 0000"),  # no signature algorithms
            h("01 40 0003 040305 0000"),  # odd signature algorithms
            h("01 40 0002 0403 0002 0000"),  # empty DistinguishedName
            h("01 40 0002 0403 0004 0003 3000"),  # DN overruns
            h("01 40 0002 0403 0000 00"),  # trailing
            h("01 40 0002 0403"),  # missing authorities
        ])

    def test_small_messages(self) -> None:
        self.assertDecodeErrors(ServerHelloDone.decode, [b"\x00", b"\x00\x00"])
        self.assertDecodeErrors(ClientKeyExchange.decode, [
            b"", h("00"), h("41") + P256_POINT[:-1], h("41") + P256_POINT + b"\x00",
        ])
        self.assertDecodeErrors(CertificateVerify.decode, [
            b"", h("04"), h("0403"), h("0403 00"), h("0403 0003 3000"), h("0403 0001 30 00"),
        ])
        self.assertDecodeErrors(Finished.decode, [b"", bytes(11), bytes(13), bytes(36)])

    def test_use_srtp(self) -> None:
        self.assertDecodeErrors(decode_use_srtp, [
            b"", h("0000 00"),  # no profiles
            h("0003 000700 00"),  # odd profile list
            h("0002 0007"),  # missing srtp_mki
            h("0002 0007 02 01"),  # MKI overruns
            h("0002 0007 00 00"),  # trailing
            h("0004 0007"),  # profile list overruns
        ])

    def test_list_extensions(self) -> None:
        self.assertDecodeErrors(decode_supported_groups, [
            b"", h("00"), h("0000"), h("0003 001700"), h("0004 0017"), h("0002 0017 00"),
        ])
        self.assertDecodeErrors(decode_signature_algorithms, [
            b"", h("0000"), h("0001 04"), h("0004 0403"), h("0002 0403 04"),
        ])
        self.assertDecodeErrors(decode_ec_point_formats, [
            b"", h("00"), h("02 00"), h("01 00 00"),
        ])
        self.assertDecodeErrors(decode_ekt_ciphers_client, [
            b"", h("00"), h("03 0102"), h("01 01 02"),
        ])
        self.assertDecodeErrors(decode_ekt_cipher_server, [b"", h("0102")])

    def test_renegotiation_info_and_empty(self) -> None:
        self.assertDecodeErrors(decode_renegotiation_info, [b"", h("01"), h("00 00"), h("02 00")])
        self.assertDecodeErrors(decode_empty, [b"\x00", b"\x00\x00"])

    def test_external_session_id_lengths(self) -> None:
        self.assertDecodeErrors(decode_external_session_id, [
            b"",
            b"\x00",  # zero-length session_id
            b"\x13" + bytes(19),  # 19 < 20
            b"\x01" + bytes(1),
            b"\x14" + bytes(19),  # claims 20, has 19
            b"\x14" + bytes(21),  # trailing byte
            b"\xff" + bytes(254),  # claims 255, has 254
        ])

    def test_alert(self) -> None:
        self.assertDecodeErrors(decode_alert, [b"", b"\x02", b"\x02\x28\x00"])

    def test_ack(self) -> None:
        record = bytes(16)
        self.assertDecodeErrors(decode_ack, [
            b"", b"\x00",
            h("000f") + record[:15],  # length not a multiple of 16
            h("0011") + record + b"\x00",
            h("0008") + bytes(8),
            h("0010") + record[:8],  # overruns
            h("0010") + record + b"\x00",  # trailing
        ])

    def test_handshake_fragments(self) -> None:
        self.assertDecodeErrors(parse_handshake_fragments, [
            b"",
            h("01 000003 0000 000000 0000"),  # header of 11 bytes
            h("01 000003 0000 000000 000003 6162"),  # fragment overruns
            h("01 000003 0000 000002 000002 6162"),  # offset + length > message length
            h("01 000003 0000 000004 000000"),  # offset beyond the message
            h("01 010001 0000 000000 000000"),  # length > MAX_HANDSHAKE_MESSAGE
            full_message(1, 0, b"abc") + h("01 00"),  # a partial second header
        ])
        limit = h("01 010000 0000 000000 000000")
        self.assertEqual(parse_handshake_fragments(limit)[0].length, MAX_HANDSHAKE_MESSAGE)

    def test_several_fragments_in_one_record(self) -> None:
        record = full_message(2, 1, b"hello") + full_message(11, 2, b"") + full_message(14, 3, b"")
        self.assertEqual(parse_handshake_fragments(record), [
            HandshakeFragment(2, 5, 1, 0, b"hello"),
            HandshakeFragment(11, 0, 2, 0, b""),
            HandshakeFragment(14, 0, 3, 0, b""),
        ])


class FragmentationTests(unittest.TestCase):
    def certificate_body(self) -> bytes:
        rng = random.Random(6347)
        body = Certificate([rng.randbytes(1200), rng.randbytes(1000), rng.randbytes(788)]).encode()
        self.assertEqual(len(body), 3000)
        return body

    def test_fragment_message(self) -> None:
        body = self.certificate_body()
        fragments = fragment_message(HandshakeType.CERTIFICATE, 2, body, 200)
        self.assertEqual(len(fragments), 15)
        self.assertEqual([f.fragment_offset for f in fragments], list(range(0, 3000, 200)))
        for fragment in fragments:
            self.assertEqual(
                (fragment.msg_type, fragment.length, fragment.message_seq), (11, 3000, 2)
            )
            self.assertEqual(len(fragment.body), 200)
        self.assertEqual(b"".join(f.body for f in fragments), body)
        uneven = fragment_message(1, 0, b"x" * 450, 200)
        self.assertEqual([len(f.body) for f in uneven], [200, 200, 50])
        self.assertEqual(fragment_message(14, 3, b"", 200), [HandshakeFragment(14, 0, 3, 0, b"")])

    def test_reassemble_shuffled_duplicated_overlapping(self) -> None:
        body = self.certificate_body()
        rng = random.Random(20120101)
        fragments = fragment_message(HandshakeType.CERTIFICATE, 0, body, 200)
        fragments += fragment_message(HandshakeType.CERTIFICATE, 0, body, 137)
        for _ in range(20):
            start = rng.randrange(3000)
            end = rng.randrange(start, min(start + 300, 3000) + 1)
            fragments.append(HandshakeFragment(11, 3000, 0, start, body[start:end]))
        fragments += rng.sample(fragments, 10)  # duplicates
        rng.shuffle(fragments)
        # Carry them in records of one to four fragments, as a peer would.
        records = []
        while fragments:
            count = rng.randint(1, 4)
            records.append(b"".join(f.encode() for f in fragments[:count]))
            fragments = fragments[count:]
        reassembler = Reassembler()
        covered = bytearray(3000)
        delivered = None
        for record in records:
            for fragment in parse_handshake_fragments(record):
                reassembler.add(fragment)
                start = fragment.fragment_offset
                covered[start : start + len(fragment.body)] = b"\x01" * len(fragment.body)
                result = reassembler.pop()
                if delivered is not None:
                    self.assertIsNone(result)
                elif all(covered):
                    delivered = result
                    self.assertIsNotNone(delivered)
                else:
                    self.assertIsNone(result, "delivered before every byte arrived")
        self.assertEqual(delivered, (HandshakeType.CERTIFICATE, 0, body))
        certificates = Certificate.decode(delivered[2]).certificates
        self.assertEqual([len(c) for c in certificates], [1200, 1000, 788])
        self.assertEqual(reassembler.next_seq, 1)
        self.assertEqual(reassembler.buffered, 0)
        self.assertTrue(reassembler.saw_retransmission)  # duplicates after delivery

    def test_missing_piece_holds_the_message(self) -> None:
        body = self.certificate_body()
        fragments = fragment_message(11, 0, body, 200)
        reassembler = Reassembler()
        for fragment in fragments[:5] + fragments[6:]:
            reassembler.add(fragment)
        self.assertIsNone(reassembler.pop())
        reassembler.add(HandshakeFragment(11, 3000, 0, 1000, body[1000:1100]))
        self.assertIsNone(reassembler.pop())
        reassembler.add(HandshakeFragment(11, 3000, 0, 1050, body[1050:1200]))
        self.assertEqual(reassembler.pop(), (11, 0, body))

    def test_interleaved_single_byte_fragments(self) -> None:
        body = bytes(random.Random(4223).randbytes(4096))
        reassembler = Reassembler()
        for offsets in (range(0, 4096, 2), range(4095, 0, -2)):
            for offset in offsets:
                self.assertIsNone(reassembler.pop())
                reassembler.add(HandshakeFragment(11, 4096, 0, offset, body[offset : offset + 1]))
        self.assertEqual(reassembler.pop(), (11, 0, body))

    def test_out_of_order_messages(self) -> None:
        bodies = {seq: bytes([seq]) * (100 + seq) for seq in range(4)}
        reassembler = Reassembler()
        for seq in (3, 1, 2):
            for fragment in fragment_message(20 + seq, seq, bodies[seq], 64):
                reassembler.add(fragment)
            self.assertIsNone(reassembler.pop())
        self.assertEqual(reassembler.next_seq, 0)
        for fragment in fragment_message(20, 0, bodies[0], 64):
            reassembler.add(fragment)
        self.assertEqual(
            [reassembler.pop() for _ in range(5)],
            [(20 + seq, seq, bodies[seq]) for seq in range(4)] + [None],
        )
        self.assertEqual(reassembler.next_seq, 4)
        self.assertFalse(reassembler.saw_retransmission)

    def test_empty_messages(self) -> None:
        reassembler = Reassembler()
        reassembler.add(HandshakeFragment(14, 0, 0, 0, b""))
        self.assertEqual(reassembler.pop(), (14, 0, b""))
        self.assertIsNone(reassembler.pop())

    def test_retransmission_detection(self) -> None:
        reassembler = Reassembler()
        hello = full_message(1, 0, b"hello")
        reassembler.add(parse_handshake_fragments(hello)[0])
        self.assertFalse(reassembler.saw_retransmission)  # not yet delivered
        self.assertEqual(reassembler.pop(), (1, 0, b"hello"))
        self.assertFalse(reassembler.saw_retransmission)
        reassembler.add(parse_handshake_fragments(hello)[0])
        self.assertTrue(reassembler.saw_retransmission)
        self.assertIsNone(reassembler.pop())
        self.assertEqual(reassembler.buffered, 0)
        reassembler.saw_retransmission = False
        self.assertFalse(reassembler.saw_retransmission)
        reassembler.add(HandshakeFragment(1, 5, 1, 0, b"he"))  # a new message: not one
        self.assertFalse(reassembler.saw_retransmission)

    def test_next_seq_is_settable(self) -> None:
        reassembler = Reassembler()
        reassembler.add(HandshakeFragment(1, 100, 0, 0, b"x" * 10))  # incomplete seq 0
        self.assertEqual(reassembler.buffered, 100)
        reassembler.next_seq = 1  # e.g. after a stateless HelloVerifyRequest
        self.assertEqual(reassembler.buffered, 0)
        reassembler.add(HandshakeFragment(1, 3, 1, 0, b"abc"))
        self.assertEqual(reassembler.pop(), (1, 1, b"abc"))
        reassembler.add(HandshakeFragment(1, 100, 0, 0, b"x" * 100))
        self.assertTrue(reassembler.saw_retransmission)

    def test_too_far_ahead_is_dropped(self) -> None:
        reassembler = Reassembler()
        reassembler.add(HandshakeFragment(2, 10, 17, 0, bytes(10)))
        self.assertEqual(reassembler.buffered, 0)
        reassembler.add(HandshakeFragment(2, 10, 16, 0, bytes(10)))
        self.assertEqual(reassembler.buffered, 10)
        for seq in range(16):
            reassembler.add(HandshakeFragment(3, 1, seq, 0, b"\x00"))
        popped = []
        while (message := reassembler.pop()) is not None:
            popped.append(message[1])
        self.assertEqual(popped, list(range(17)))  # seq 17 was never kept
        self.assertFalse(reassembler.saw_retransmission)

    def test_buffer_limit(self) -> None:
        reassembler = Reassembler(max_buffered=1000)
        reassembler.add(HandshakeFragment(11, 600, 0, 0, bytes(10)))
        reassembler.add(HandshakeFragment(11, 400, 1, 0, bytes(10)))  # exactly at the limit
        self.assertEqual(reassembler.buffered, 1000)
        self.assertRaises(DecodeError, reassembler.add, HandshakeFragment(14, 1, 2, 0, b"\x00"))
        # More fragments of already-buffered messages still fit.
        reassembler.add(HandshakeFragment(11, 600, 0, 10, bytes(590)))
        self.assertEqual(reassembler.pop(), (11, 0, bytes(600)))
        reassembler.add(HandshakeFragment(14, 1, 2, 0, b"\x00"))  # room again
        self.assertEqual(reassembler.buffered, 401)
        default = Reassembler()
        self.assertEqual(default.max_buffered, 131072)
        default.add(HandshakeFragment(11, 65536, 0, 0, b""))
        default.add(HandshakeFragment(11, 65536, 1, 0, b""))
        self.assertRaises(DecodeError, default.add, HandshakeFragment(11, 1, 2, 0, b""))

    def test_inconsistent_fragments(self) -> None:
        reassembler = Reassembler()
        reassembler.add(HandshakeFragment(11, 300, 0, 0, b"a" * 100))
        self.assertRaises(
            IllegalParameter, reassembler.add, HandshakeFragment(12, 300, 0, 100, b"b" * 100)
        )
        self.assertRaises(
            IllegalParameter, reassembler.add, HandshakeFragment(11, 301, 0, 100, b"b" * 100)
        )
        self.assertRaises(
            IllegalParameter, reassembler.add, HandshakeFragment(11, 300, 0, 50, b"a" * 49 + b"X")
        )
        reassembler.add(HandshakeFragment(11, 300, 0, 50, b"a" * 50 + b"b" * 50))  # agrees
        reassembler.add(HandshakeFragment(11, 300, 0, 100, b"b" * 200))
        self.assertEqual(reassembler.pop(), (11, 0, b"a" * 100 + b"b" * 200))

    def test_invalid_fragment_objects(self) -> None:
        reassembler = Reassembler()
        self.assertRaises(DecodeError, reassembler.add, HandshakeFragment(1, 3, 0, 2, b"ab"))
        self.assertRaises(
            DecodeError, reassembler.add, HandshakeFragment(1, MAX_HANDSHAKE_MESSAGE + 1, 0, 0, b"")
        )
        self.assertRaises(DecodeError, reassembler.add, HandshakeFragment(1, 3, 0, -1, b"a"))
        self.assertEqual(reassembler.buffered, 0)


# ---------------------------------------------------------------------------
# Property tests

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
extension_lists = st.lists(
    st.tuples(u16, st.binary(max_size=40)), max_size=6, unique_by=lambda ext: ext[0]
)
client_hellos = st.builds(
    ClientHello, u16, st.binary(min_size=32, max_size=32), st.binary(max_size=32),
    st.binary(max_size=255), st.lists(u16, min_size=1, max_size=40),
    st.lists(u8, min_size=1, max_size=4), extension_lists,
)
server_hellos = st.builds(
    ServerHello, u16, st.binary(min_size=32, max_size=32), st.binary(max_size=32),
    u16, u8, extension_lists,
)
MESSAGE_STRATEGIES: list[tuple[type, st.SearchStrategy[Any]]] = [
    (ClientHello, client_hellos),
    (ServerHello, server_hellos),
    (HelloVerifyRequest, st.builds(HelloVerifyRequest, u16, st.binary(max_size=255))),
    (Certificate, st.builds(
        Certificate, st.lists(st.binary(min_size=1, max_size=100), max_size=4)
    )),
    (ServerKeyExchange, st.builds(
        ServerKeyExchange, u16, st.binary(min_size=1, max_size=255), u16, st.binary(max_size=300)
    )),
    (CertificateRequest, st.builds(
        CertificateRequest, st.lists(u8, min_size=1, max_size=5),
        st.lists(u16, min_size=1, max_size=20),
        st.lists(st.binary(min_size=1, max_size=60), max_size=4),
    )),
    (ServerHelloDone, st.builds(ServerHelloDone)),
    (ClientKeyExchange, st.builds(ClientKeyExchange, st.binary(min_size=1, max_size=255))),
    (CertificateVerify, st.builds(CertificateVerify, u16, st.binary(max_size=300))),
    (Finished, st.builds(Finished, st.binary(min_size=12, max_size=12))),
]
HELLOS = (ClientHello, ServerHello)

# (decoder, the encoder that turns its result back into the input)
EXTENSION_CODECS: list[tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] = [
    (decode_use_srtp, lambda v: encode_use_srtp(*v)),
    (decode_supported_groups, encode_supported_groups),
    (decode_ec_point_formats, encode_ec_point_formats),
    (decode_signature_algorithms, encode_signature_algorithms),
    (decode_renegotiation_info, encode_renegotiation_info),
    (decode_empty, lambda v: b""),
    (decode_ekt_ciphers_client, encode_ekt_ciphers_client),
    (decode_ekt_cipher_server, encode_ekt_cipher_server),
    (decode_external_session_id, encode_external_session_id),
    (decode_alert, lambda v: encode_alert(*v)),
    (decode_ack, encode_ack),
    (parse_handshake_fragments, lambda v: b"".join(f.encode() for f in v)),
]

mutations = st.one_of(
    st.tuples(st.just("cut"), st.integers(0, 2000)),
    st.tuples(st.just("flip"), st.integers(0, 2000), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2000), u8),
    st.tuples(st.just("delete"), st.integers(0, 2000)),
)


def mutate(data: bytes, mutation: tuple[Any, ...]) -> bytes:
    kind, position = mutation[0], mutation[1] % (len(data) + 1)
    if kind == "cut":
        return data[:position]
    if kind == "insert":
        return data[:position] + bytes([mutation[2]]) + data[position:]
    if not data:
        return data
    position %= len(data)
    if kind == "flip":
        return data[:position] + bytes([data[position] ^ mutation[2]]) + data[position + 1 :]
    return data[:position] + data[position + 1 :]


class PropertyTests(unittest.TestCase):
    def check_message_decoder(self, cls: type, data: bytes) -> None:
        """decode either raises a DtlsError or gives a value that re-encodes to ``data``."""
        try:
            message = cls.decode(data)
        except DtlsError as e:
            self.assertTrue(str(e))
            return
        encoded = message.encode()
        if cls in HELLOS and encoded != data:
            # The one non-canonical form: a present but empty extensions block.
            self.assertEqual(data, encoded + b"\x00\x00")
            self.assertEqual(message.extensions, [])
        else:
            self.assertEqual(encoded, data)
        self.assertEqual(cls.decode(encoded), message)

    def check_codec(
        self, decode: Callable[[bytes], Any], encode: Callable[[Any], bytes], data: bytes
    ) -> None:
        try:
            value = decode(data)
        except DtlsError as e:
            self.assertTrue(str(e))
            return
        self.assertEqual(encode(value), data, decode.__name__)
        if decode is parse_handshake_fragments:
            for fragment in value:
                self.assertLessEqual(fragment.length, MAX_HANDSHAKE_MESSAGE)
                self.assertLessEqual(
                    fragment.fragment_offset + len(fragment.body), fragment.length
                )

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_random_bytes_to_every_decoder(self, data: bytes) -> None:
        for cls, _ in MESSAGE_STRATEGIES:
            self.check_message_decoder(cls, data)
        for decode, encode in EXTENSION_CODECS:
            self.check_codec(decode, encode, data)

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_message_round_trip_and_mutations(self, data: st.DataObject) -> None:
        cls, strategy = data.draw(st.sampled_from(MESSAGE_STRATEGIES))
        message = data.draw(strategy)
        encoded = message.encode()
        self.assertEqual(cls.decode(encoded), message)
        self.assertEqual(cls.decode(encoded).encode(), encoded)
        for mutation in data.draw(st.lists(mutations, min_size=1, max_size=3)):
            encoded = mutate(encoded, mutation)
            self.check_message_decoder(cls, encoded)

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.builds(lambda p, m: (decode_use_srtp, encode_use_srtp(p, m)),
                      st.lists(u16, min_size=1, max_size=8), st.binary(max_size=255)),
            st.builds(lambda g: (decode_supported_groups, encode_supported_groups(g)),
                      st.lists(u16, min_size=1, max_size=20)),
            st.builds(lambda f: (decode_ec_point_formats, encode_ec_point_formats(f)),
                      st.lists(u8, min_size=1, max_size=5)),
            st.builds(lambda s: (decode_signature_algorithms, encode_signature_algorithms(s)),
                      st.lists(u16, min_size=1, max_size=20)),
            st.builds(lambda r: (decode_renegotiation_info, encode_renegotiation_info(r)),
                      st.binary(max_size=255)),
            st.builds(lambda c: (decode_ekt_ciphers_client, encode_ekt_ciphers_client(c)),
                      st.lists(u8, min_size=1, max_size=255)),
            st.builds(lambda c: (decode_ekt_cipher_server, encode_ekt_cipher_server(c)), u8),
            st.builds(lambda s: (decode_external_session_id, encode_external_session_id(s)),
                      st.binary(min_size=20, max_size=255)),
            st.builds(lambda a, b: (decode_alert, encode_alert(a, b)), u8, u8),
            st.builds(lambda r: (decode_ack, encode_ack(r)), st.lists(
                st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=10)),
            st.builds(lambda f: (parse_handshake_fragments, f.encode()), st.builds(
                lambda t, s, body, start: HandshakeFragment(t, len(body) + start, s, start, body),
                u8, u16, st.binary(max_size=100), st.integers(0, 1000))),
        ),
        st.lists(mutations, max_size=3),
    )
    def test_extension_round_trip_and_mutations(
        self, case: tuple[Callable[[bytes], Any], bytes], changes: list[tuple[Any, ...]]
    ) -> None:
        decode, data = case
        encode = dict(EXTENSION_CODECS)[decode]
        self.assertEqual(encode(decode(data)), data)
        for mutation in changes:
            data = mutate(data, mutation)
            self.check_codec(decode, encode, data)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=1500), min_size=1, max_size=5),
           st.integers(1, 400), st.randoms(use_true_random=False))
    def test_any_fragmentation_reassembles(
        self, bodies: list[bytes], max_fragment: int, rng: random.Random
    ) -> None:
        fragments = []
        for seq, body in enumerate(bodies):
            fragments += fragment_message(seq % 256, seq, body, max_fragment)
            fragments += fragment_message(seq % 256, seq, body, rng.randint(1, 500))
        fragments += rng.sample(fragments, min(len(fragments), 5))
        rng.shuffle(fragments)
        reassembler = Reassembler()
        delivered = []
        for fragment in fragments:
            reassembler.add(fragment)
            while (message := reassembler.pop()) is not None:
                delivered.append(message)
        self.assertEqual(delivered, [(seq % 256, seq, body) for seq, body in enumerate(bodies)])
        self.assertEqual(reassembler.buffered, 0)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.builds(
        HandshakeFragment, u8, st.integers(0, 70000), st.integers(0, 40),
        st.integers(0, 70000), st.binary(max_size=64),
    ), max_size=30), st.integers(0, 200000), st.lists(st.binary(max_size=80), max_size=5))
    def test_reassembler_never_raises_anything_else(
        self, fragments: list[HandshakeFragment], limit: int, records: list[bytes]
    ) -> None:
        reassembler = Reassembler(max_buffered=limit)
        fragments = list(fragments)
        for record in records:
            try:
                fragments += parse_handshake_fragments(record)
            except DtlsError:
                pass
        for fragment in fragments:
            seq_before = reassembler.next_seq
            try:
                reassembler.add(fragment)
            except DtlsError as e:
                self.assertIn(type(e), (DecodeError, IllegalParameter))
            self.assertLessEqual(reassembler.buffered, limit)
            while (message := reassembler.pop()) is not None:
                msg_type, seq, body = message
                self.assertEqual(seq, seq_before)
                seq_before += 1
                self.assertIsInstance(body, bytes)
                self.assertIn((msg_type, len(body)), {
                    (f.msg_type, f.length) for f in fragments if f.message_seq == seq
                })
                self.assertLessEqual(len(body), MAX_HANDSHAKE_MESSAGE)
            self.assertEqual(reassembler.next_seq, seq_before)
