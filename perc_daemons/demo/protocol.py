"""PERC media protection, one packet at a time: ``python -m perc_daemons.demo.protocol``.

A self-contained walk through what PERC (RFC 8871) does to a media packet,
with the real cryptography of :mod:`perc_daemons.protocol` and nothing
simulated except the DTLS handshakes (their exporter output is random bytes):

1. The parties and their keys (RFC 8871 section 6.1 tables, section 6.2).
   The Key Distributor (KD) makes the conference's EKT key (RFC 8870 section
   4.2, delivered in the DTLS EKTKey message, section 5.2.2) and each
   endpoint's DTLS-SRTP double keys, split into inner and outer halves (RFC
   5764 section 4.2, RFC 8723 section 5); the Media Distributors (MD1, MD2)
   receive only outer (hop-by-hop) halves; MD1 and MD2 key their cascade
   link themselves (DTLS-SRTP between the MDs, RFC 8871).
2. One RTP packet from endpoint A, hex-dumped at every hop: A's double
   protection (RFC 8723 section 5.1) with a FullEKTField (RFC 8870 section
   4.1, 4.3.1); MD1 removing the outer layer, forwarding to B unchanged and
   to MD2 with SEQ and PT rewritten, the originals recorded in the Original
   Header Block (RFC 8723 sections 4 and 5.2); MD2 relaying to C with the
   EKTField untouched; C learning A's end-to-end key from the EKTField (RFC
   8870 section 4.3.2), restoring the header from the OHB and removing the
   inner layer (RFC 8723 section 5.3).
3. What a Media Distributor cannot do: read the media (RFC 8871 section
   4.2), alter it undetected (RFC 8723 section 5.3, RFC 8871 section 8) or
   replay it (RFC 3711 section 3.3.2).
4. A rekey when C leaves (RFC 8871 section 4.5.2; RFC 8870 sections 4.3.1
   and 4.5): the KD gives a new EKT key (new SPI) to A and B only; after
   the 250 ms hold, A's media is under a key C cannot learn.

``--seed N`` draws every key from ``random.Random(N)`` so the output is
reproducible (never use such keys for anything real); otherwise keys come
from :func:`os.urandom`.  ``--profile 256`` selects
DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM.  ``--quiet`` prints only the
summary.  Exit status 0 when every check holds, 1 otherwise.

Key material is never printed: only fingerprints, the first 4 bytes of the
SHA-256 of a key, in hex.  All output is ASCII and fits 100 columns.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
from collections.abc import Callable, Sequence

from perc_daemons.protocol.double import (
    DoubleKeys,
    DoubleReceiver,
    DoubleSender,
    InnerAuthenticationFailed,
    LayerKeys,
    Relay,
    UnknownSender,
    exporter_length,
    parse_ohb,
    split_keying_material,
)
from perc_daemons.protocol.ekt import (
    EktCipher,
    EktParameterSet,
    EktReceiver,
    EktSender,
    FullEktField,
    UnknownSpi,
    ekt_field_length,
)
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.rtp import (
    RtpPacket,
    header_length,
    parse_extensions,
    parse_fixed_header,
)
from perc_daemons.protocol.srtp import (
    LAYER_KEY_LENGTH,
    TAG_LENGTH,
    AuthenticationFailed,
    Profile,
    ReplayError,
    SrtpContext,
)

PROFILES = {
    "128": Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM,
    "256": Profile.DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM,
}

FRAME_TEXT = "Hello from A: PERC demo frame %d"  # frames 1-9 only: the tests count frame 1
FRAME_LENGTH = 32  # the text is padded with "." to this many bytes
OPUS_PT = 111  # A's payload type
LINK_PT = 100  # the payload type MD1 and MD2 use for A's stream on their link
AUDIO_LEVEL_ID = 1  # RFC 8285 one-byte extension element id: audio level (RFC 6464)
AUDIO_LEVEL = 0x80 | 42  # voice activity, -42 dBov
FIRST_SEQ = 100  # A's first RTP sequence number
LINK_FIRST_SEQ = 5000  # MD1's sequence numbers on the cascade link
SAMPLES_PER_FRAME = 960  # 20 ms at 48 kHz
EKT_TTL = 3600
EKT_SPI = 1
NEW_EKT_SPI = 2
REKEY_AT = 1.0  # seconds
REKEY_FRAMES = 6
REKEY_SPACING_MS = 100
HOLD = 0.25  # RFC 8870 section 4.3.1: the sender keeps its old key this long

DUMP_HEADER = "  offset  " + "hex".ljust(49) + "ascii".ljust(20) + "region"


class DemoFailure(Exception):
    """A step did not give the result PERC promises: the demo exits with status 1."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailure(message)


def fingerprint(key: bytes) -> str:
    """The first 4 bytes of SHA-256 of ``key``, in hex: identifies a key without showing it."""
    return hashlib.sha256(key).digest()[:4].hex()


def frame_payload(frame: int) -> bytes:
    return (FRAME_TEXT % frame).encode("ascii").ljust(FRAME_LENGTH, b".")


# -- printing -------------------------------------------------------------------------


class Output:
    """Prints to (the current) ``sys.stdout`` unless quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.where = "setup"  # the current section or step, for failure messages

    def __call__(self, text: str = "") -> None:
        if not self.quiet:
            print(text)

    def section(self, title: str) -> None:
        self.where = title
        self()
        self(f"== {title} ==")

    def step(self, title: str) -> None:
        self.where = title
        self()
        self(f"-- {title} --")

    def dump(self, data: bytes, regions: Sequence[tuple[str, int]], note: str = "") -> None:
        for line in hexdump(data, regions):
            self(line)
        if note:
            self(f"  {note}")


def hexdump(data: bytes, regions: Sequence[tuple[str, int]]) -> list[str]:
    """Offset, hex, ASCII, at most 16 bytes a line, a new line at each region."""
    covered = sum(length for _, length in regions)
    check(covered == len(data), f"internal: regions cover {covered} of {len(data)} bytes")
    lines = [DUMP_HEADER]
    offset = 0
    for label, length in regions:
        for start in range(offset, offset + length, 16):
            chunk = data[start:min(start + 16, offset + length)]
            hex_part = " ".join(f"{b:02x}" for b in chunk)
            text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
            tag = f"{label} {length}B" if start == offset else ""
            lines.append(f"  {start:04x}    {hex_part:<47}  |{text:<16}|  {tag}".rstrip())
        offset += length
    return lines


def header_regions(header: bytes) -> list[tuple[str, int]]:
    base = 12 + 4 * (header[0] & 0x0F)
    regions = [("RTP header", base)]
    if len(header) > base:
        regions.append(("hdr extension", len(header) - base))
    return regions


def ekt_regions(field: bytes, detailed: bool) -> list[tuple[str, int]]:
    if len(field) == 1:
        return [("EKTField (Short)", 1)]
    if not detailed:
        return [("EKTField (Full)", len(field))]
    return [("EKT ciphertext", len(field) - 7), ("EKT SPI", 2), ("EKT epoch", 2),
            ("EKT length", 2), ("EKT type 2=Full", 1)]


def layer_regions(plain: bytes, outer: bool) -> list[tuple[str, int]]:
    """Regions of inner ciphertext || inner tag || OHB (``*``: under the outer layer)."""
    ohb_length = parse_ohb(plain)[0]
    star = "*" if outer else ""
    return [(f"{star}payload ct", len(plain) - TAG_LENGTH - ohb_length),
            (f"{star}inner tag", TAG_LENGTH), (f"{star}OHB", ohb_length)]


def describe_header(header: bytes) -> str:
    marker, pt, seq, timestamp, ssrc = parse_fixed_header(header)
    text = f"M={marker} PT={pt} SEQ={seq} TS={timestamp} SSRC=0x{ssrc:08x}"
    base = 12 + 4 * (header[0] & 0x0F)
    if header[0] & 0x10:
        profile = int.from_bytes(header[base:base + 2], "big")
        elements = parse_extensions(profile, header[base + 4:header_length(header)])
        text += " ext " + ", ".join(f"id {i}=0x{v.hex()}" for i, v in elements)
    return text


def describe_ohb(plain: bytes) -> str:
    length, pt, seq, marker = parse_ohb(plain)
    raw = " ".join(f"{b:02x}" for b in plain[-length:])
    if length == 1 and pt is None and marker is None:
        return f"OHB = {raw}: empty, no header field changed so far"
    recorded = []
    if pt is not None:
        recorded.append(f"original PT {pt}")
    if seq is not None:
        recorded.append(f"original SEQ {seq}")
    if marker is not None:
        recorded.append(f"original marker {marker}")
    return f"OHB = {raw} (config 0x{plain[-1]:02x}): " + ", ".join(recorded)


# -- the conference -----------------------------------------------------------------


class Conference:
    """Every party of the demo, each holding only the keys PERC gives it.

    A sends; MD1 relays to B and, over a cascade link, to MD2, which relays to C.
    """

    def __init__(self, profile: Profile, random_bytes: Callable[[int], bytes]) -> None:
        self.profile = profile
        self.n = n = LAYER_KEY_LENGTH[profile]
        # KD: one DTLS-SRTP association per endpoint (exporter output simulated).
        self.dtls: dict[str, DoubleKeys] = {
            name: split_keying_material(profile, random_bytes(exporter_length(profile)))
            for name in "ABC"
        }
        # KD: the conference's EKT key (RFC 8870 section 4.2).
        cipher = EktCipher.AESKW_128 if n == 16 else EktCipher.AESKW_256
        self.cipher = cipher
        self.ekt = EktParameterSet(key=random_bytes(cipher.key_length), cipher=cipher,
                                   master_salt=random_bytes(12), spi=EKT_SPI, ttl=EKT_TTL)
        # MD1 and MD2: their cascade link key, from DTLS-SRTP between the two MDs with a
        # single AEAD-GCM profile; the KD plays no part (RFC 8871 sections 4.5, 6.5).
        self.link = LayerKeys(random_bytes(n), random_bytes(12))
        # A: its SSRC, its E2E key (chosen by its EktSender), its outer key toward MD1.
        self.ssrc = int.from_bytes(random_bytes(4), "big")
        self.ekt_a = EktSender(self.ssrc, n, self.ekt, 0.0, old_key_hold=HOLD,
                               random_bytes=random_bytes)
        self.sender = DoubleSender(self.dtls["A"].client_outer.context(), self.ekt_a)
        self.e2e_key_a = self.ekt_a.current_key
        # MD1: outer halves only, plus the link (libsrtp sessions, as the MD uses).
        self.md1_from_a = self.dtls["A"].client_outer.session(inbound=True)
        self.md1_to_b = self.dtls["B"].server_outer.session(inbound=False)
        self.md1_to_md2 = self.link.session(inbound=False)
        # MD2: the link and the outer half toward C.
        self.md2_from_md1 = self.link.session(inbound=True)
        self.md2_to_c = self.dtls["C"].server_outer.session(inbound=False)
        # B and C: their own outer key from the MD, the EKT key from the KD.
        self.receivers: dict[str, DoubleReceiver] = {}
        for name in "BC":
            ekt = EktReceiver(n)
            ekt.add_parameter_set(self.ekt, 0.0)
            self.receivers[name] = DoubleReceiver(self.dtls[name].server_outer.context(), ekt)
        self.link_seq = LINK_FIRST_SEQ

    def packet(self, frame: int) -> bytes:
        """A's plain RTP packet for ``frame`` (1-based): Opus-like PT, audio level extension."""
        index = frame - 1
        return RtpPacket(payload_type=OPUS_PT, sequence_number=FIRST_SEQ + index,
                         timestamp=SAMPLES_PER_FRAME * index, ssrc=self.ssrc,
                         extensions=[(AUDIO_LEVEL_ID, bytes((AUDIO_LEVEL,)))],
                         payload=frame_payload(frame)).serialize()

    def md1_open(self, wire: bytes) -> Relay:
        """MD1 removes A's outer layer (RFC 8723 section 5.2 steps 1-2)."""
        md1 = Relay()
        md1.open(wire, self.md1_from_a)
        return md1

    def md1_to_link(self, md1: Relay) -> bytes:
        """MD1 renumbers A's stream for the link, maps its PT, seals with the link key."""
        md1.edit(seq=self.link_seq, pt=LINK_PT)
        self.link_seq += 1
        return md1.seal(self.md1_to_md2)

    def md2_open(self, on_link: bytes) -> Relay:
        """MD2 removes the link's outer layer."""
        md2 = Relay()
        md2.open(on_link, self.md2_from_md1)
        return md2


def open_inner(key: bytes, salt: bytes, header: bytes, plain: bytes) -> bytes:
    """Try to remove the inner layer of a packet (original header, outer plaintext).

    What a receiver does after the OHB is applied (RFC 8723 section 5.3): AES-GCM
    over the header without extensions (X bit cleared) with ``key``.  Raises
    :class:`AuthenticationFailed` when ``key`` is not the sender's E2E key.
    """
    base = 12 + 4 * (header[0] & 0x0F)
    synthetic = bytes((header[0] & 0xEF,)) + header[1:base]
    _marker, _pt, seq, _ts, ssrc = parse_fixed_header(header)
    ohb_length = parse_ohb(plain)[0]
    context = SrtpContext(key, salt)
    try:
        return context.open(ssrc, seq, synthetic, plain[:len(plain) - ohb_length])
    finally:
        context.close()


def expect_refusal(expected: type[ProtocolError], action: Callable[[], object],
                   what: str) -> str:
    """Run ``action``; it must raise ``expected``.  Returns the exception's name."""
    try:
        action()
    except expected as exc:
        return type(exc).__name__
    except ProtocolError as exc:
        raise DemoFailure(f"{what}: expected {expected.__name__}, got "
                          f"{type(exc).__name__}: {exc}") from exc
    raise DemoFailure(f"{what}: accepted, but PERC must refuse it ({expected.__name__})")


# -- the sections -------------------------------------------------------------------


class Demo:
    """The four sections, in order; :meth:`run` returns the summary line."""

    def __init__(self, profile: Profile, random_bytes: Callable[[int], bytes],
                 out: Output) -> None:
        self.conf = Conference(profile, random_bytes)
        self.random_bytes = random_bytes
        self.out = out
        self.rejected = 0
        self.rekey_result = ""
        self.frame1 = b""  # A's first packet as sent, replayed in section 3

    def run(self) -> str:
        self.parties()
        self.one_packet()
        self.attacks()
        self.rekey()
        layer = f"AES-{self.conf.n * 8}-GCM"
        return (f"demo OK: double {layer}; frame 1 intact at B and C; "
                f"{self.rejected} attacks refused; after rekey {self.rekey_result}")

    # 1 ------------------------------------------------------------------------------

    def parties(self) -> None:
        conf, out = self.conf, self.out
        out.section("1. The parties and the keys each holds (RFC 8871 s6.1)")
        out("  KD   Key Distributor: trusted; makes the EKT key and runs DTLS-SRTP with each")
        out("       endpoint (tunnelled through the MD), so it derives every endpoint's keys.")
        out("  A    endpoint (trusted with media), the sender; endpoints B and C receive.")
        out("  MD1  Media Distributor (an SFU): NOT trusted with media; A and B connect to it.")
        out("  MD2  Media Distributor linked to MD1 (a cascade); C connects to it.")
        out()
        out(f"  DTLS-SRTP with the KD, profile {conf.profile.name}: the exporter")
        out(f"  output ({exporter_length(conf.profile)} bytes; simulated here with random "
            "bytes) splits into inner|outer halves")
        out("  (RFC 5764 s4.2, RFC 8723 s5).  Fingerprints = first 4 bytes of SHA-256 of "
            "the key, in hex;")
        out("  no key is ever printed.")
        out()
        out("       " + "".join(f"{h:<21}" for h in (
            "client_write inner", "client_write outer", "server_write inner",
            "server_write outer")).rstrip())
        for name, keys in conf.dtls.items():
            out(f"    {name}  " + "".join(f"{fingerprint(k.key):<21}" for k in (
                keys.client_inner, keys.client_outer, keys.server_inner,
                keys.server_outer)).rstrip())
        out("  The endpoint and the KD hold all four halves; the KD gives the MD only the two "
            "outer")
        out("  halves (RFC 8871 s6.2, RFC 9185 MediaKeys).  Media is sent under an E2E key "
            "the sender")
        out("  chooses itself and announces in EKT (RFC 8871 s4.5.2), not under the inner "
            "half.")
        out()
        keys = [
            ("E2E key of A", conf.e2e_key_a,
             "inner layer; chosen by A, sent wrapped in A's EKTField"),
            ("EKT key", conf.ekt.key,
             f"SPI {conf.ekt.spi}, {conf.cipher.name}; KD -> A, B, C in DTLS EKTKey"),
            ("A->MD1", conf.dtls["A"].client_outer.key, "outer half of A's client_write key"),
            ("MD1->B", conf.dtls["B"].server_outer.key, "outer half of B's server_write key"),
            ("MD1<->MD2", conf.link.key, "cascade link: DTLS-SRTP between the MDs, no KD"),
            ("MD2->C", conf.dtls["C"].server_outer.key, "outer half of C's server_write key"),
        ]
        out("  key            fingerprint  what it is")
        for name, key, what in keys:
            out(f"  {name:<13}  {fingerprint(key):<11}  {what}")
        out()
        holds = {
            "KD": (False, True, True, True, False, True),
            "A": (True, True, True, False, False, False),
            "B": (True, True, False, True, False, False),
            "C": (True, True, False, False, False, True),
            "MD1": (False, False, True, True, True, False),
            "MD2": (False, False, False, False, True, True),
        }
        out("  party  " + "".join(f"{name:<14}" for name, _, _ in keys).rstrip())
        for party, row in holds.items():
            out(f"  {party:<5}  " + "".join(f"{'holds' if h else '-':<14}" for h in row)
                .rstrip())
        out("  B and C learn A's E2E key from A's EKTField.  The KD could unwrap it too (it "
            "makes the")
        out("  EKT key) but is trusted and never on the media path.  The MDs hold only "
            "hop-by-hop keys.")

    # 2 ------------------------------------------------------------------------------

    def one_packet(self) -> None:
        conf, out = self.conf, self.out
        payload = frame_payload(1)
        text = payload.rstrip(b".")
        out.section("2. One RTP packet from A, hop by hop")

        out.step("2.1 A: the plain RTP packet")
        original = conf.packet(1)
        h = header_length(original)
        out(f"  header: {describe_header(original[:h])}")
        out(f"  (ext id {AUDIO_LEVEL_ID} = RFC 6464 audio level; RFC 8285 one-byte form)")
        out(f"  payload: \"{payload.decode('ascii')}\" ({len(payload)} bytes)")
        out.dump(original, [*header_regions(original[:h]), ("payload", len(original) - h)])

        out.step("2.2 A: after double protection (RFC 8723 s5.1, RFC 8870 s4.3.1)")
        wire = conf.sender.protect(original, 0.0)
        n_ekt = ekt_field_length(wire)
        ekt_a = wire[len(wire) - n_ekt:]
        field = FullEktField.decode(ekt_a)
        out("  1. inner AES-GCM with A's E2E key over the header without extensions + payload")
        out("  2. an empty OHB (00) appended; 3. outer AES-GCM with the A->MD1 key, the full")
        out("     header as AAD; 4. the EKTField appended (outside both tags: AES-KW protects it)")
        out.dump(wire, [*header_regions(wire[:h]), ("*payload ct", len(original) - h),
                        ("*inner tag", TAG_LENGTH), ("*OHB", 1), ("outer tag", TAG_LENGTH),
                        *ekt_regions(ekt_a, detailed=True)],
                 "* = under the outer layer too: what travels is ciphertext of ciphertext")
        out(f"  EKTField: Full, SPI {field.spi}, epoch {field.epoch}, {len(field.ciphertext)}-"
            f"byte AES-KW ciphertext of (A's E2E key, SSRC, ROC)")
        check(wire[:h] == original[:h], "A's header should travel in the clear")
        check(text not in wire, "the payload text is visible in A's packet")
        out("  header in the clear (authenticated, not encrypted): yes; payload text visible: no")

        out.step("2.3 MD1: outer layer removed with the A->MD1 key (RFC 8723 s5.2)")
        md1 = conf.md1_open(wire)
        header, plain, ekt = md1.header, md1.plaintext, md1.ekt_field
        view = header + plain + ekt
        out.dump(view, [*header_regions(header), *layer_regions(plain, outer=False),
                        *ekt_regions(ekt, detailed=False)])
        out(f"  {describe_ohb(plain)}")
        check(text not in view, "MD1 can see the payload text")
        out("  MD1 searched everything it holds for the payload text: not found.  The payload")
        out("  is still inner ciphertext; MD1 can read and edit only the header and the OHB.")

        out.step("2.4 MD1 -> B: outer layer re-applied with the MD1->B key, no edits")
        to_b = md1.seal(conf.md1_to_b)
        check(to_b[:h] == wire[:h] and to_b[len(to_b) - n_ekt:] == ekt_a,
              "MD1 changed the header or the EKTField toward B")
        check(to_b != wire, "the packet to B is the packet A sent: one key on two hops")
        out(f"  {len(to_b)} bytes: same header, same EKTField; the outer ciphertext and tag differ"
            f" from 2.2")

        out.step("2.5 B decrypts (RFC 8723 s5.3)")
        got_b = conf.receivers["B"].unprotect(to_b, 0.0)
        check(got_b.packet == original, "B did not recover A's packet")
        out(f"  B recovered: \"{got_b.payload.decode('ascii')}\"")
        out("  identical to A's original packet: yes")

        out.step("2.6 MD1 -> MD2: SEQ and PT rewritten for the link, re-encrypted with the "
                 "link key")
        on_link = conf.md1_to_link(md1)
        h1, p1 = md1.header, md1.plaintext
        out(f"  header now: {describe_header(h1)}")
        out(f"  {describe_ohb(p1)}")
        out("  (the OHB lets the receiver restore A's values, which the inner tag covers)")
        out.dump(on_link, [*header_regions(h1), *layer_regions(p1, outer=True),
                           ("outer tag", TAG_LENGTH), *ekt_regions(ekt, detailed=False)])

        out.step("2.7 MD2: link outer layer removed with the MD1<->MD2 key")
        md2 = conf.md2_open(on_link)
        h2, p2, ekt2 = md2.header, md2.plaintext, md2.ekt_field
        view2 = h2 + p2 + ekt2
        out.dump(view2, [*header_regions(h2), *layer_regions(p2, outer=False),
                         *ekt_regions(ekt2, detailed=False)])
        check(ekt2 == ekt_a, "the EKTField at MD2 differs from what A sent")
        check(text not in view2, "MD2 can see the payload text")
        out(f"  EKTField byte-identical to what A sent ({len(ekt2)} bytes): yes")
        out("  payload text in anything MD2 holds: no")

        out.step("2.8 MD2 -> C: outer layer re-applied with the MD2->C key")
        to_c = md2.seal(conf.md2_to_c)
        out.dump(to_c, [*header_regions(h2), *layer_regions(p2, outer=True),
                        ("outer tag", TAG_LENGTH), *ekt_regions(ekt2, detailed=False)])

        out.step("2.9 C decrypts (RFC 8723 s5.3, RFC 8870 s4.3.2)")
        learned = conf.ekt.unwrap(FullEktField.decode(ekt2).ciphertext)
        check(learned.master_key == conf.e2e_key_a, "the EKTField does not carry A's E2E key")
        out(f"  1. outer layer off with the MD2->C key; 2. EKTField unwrapped with the EKT key"
            f" (SPI {field.spi}):")
        out(f"     A's E2E key, fingerprint {fingerprint(learned.master_key)}, SSRC "
            f"0x{learned.ssrc:08x}, ROC {learned.roc}")
        got_c = conf.receivers["C"].unprotect(to_c, 0.0)
        _m, pt_c, seq_c, _ts, _ssrc = parse_fixed_header(got_c.packet)
        out(f"  3. header restored from the OHB: PT {got_c.outer_pt} -> {pt_c}, "
            f"SEQ {got_c.outer_seq} -> {seq_c}")
        out("  4. inner layer off with A's E2E key")
        if got_c.payload != payload or got_c.packet != original:
            raise DemoFailure("C's decrypted payload differs from what A sent")
        out(f"  C recovered: \"{got_c.payload.decode('ascii')}\"")
        out("  identical to A's original packet: yes")
        self.frame1 = wire

    # 3 ------------------------------------------------------------------------------

    def refused(self, what: str, outcome: str) -> None:
        self.rejected += 1
        self.out(f"  {what:<64} -> {outcome}")

    def attacks(self) -> None:
        conf, out = self.conf, self.out
        out.section("3. What an MD cannot do")
        original = conf.packet(2)
        wire = conf.sender.protect(original, 0.02)
        md1 = conf.md1_open(wire)
        header, plain = md1.header, md1.plaintext
        out("  A sends frame 2; MD1 removes the outer layer as in 2.3, then misbehaves:")
        for name, keys in (("A->MD1", conf.dtls["A"].client_outer),
                           ("MD1->B", conf.dtls["B"].server_outer),
                           ("MD1<->MD2", conf.link)):
            outcome = expect_refusal(
                AuthenticationFailed,
                lambda keys=keys: open_inner(keys.key, keys.salt, header, plain),
                f"MD1 decrypting the inner layer with the {name} key")
            self.refused(f"MD1 opens the inner layer with its {name} key", outcome)

        # MD1 flips the first bit of the inner ciphertext, then relays as usual.
        md1.packet = header + bytes((plain[0] ^ 0x80,)) + plain[1:]
        md2 = conf.md2_open(conf.md1_to_link(md1))  # the outer tag is MD1's own: valid
        out(f"  {'MD1 flips 1 payload bit, re-applies the outer layer toward MD2':<64}"
            f" -> MD2 accepts")
        to_c = md2.seal(conf.md2_to_c)
        outcome = expect_refusal(InnerAuthenticationFailed,
                                 lambda: conf.receivers["C"].unprotect(to_c, 0.02),
                                 "C receiving a payload altered by MD1")
        self.refused("  ...C: outer layer fine, inner (end-to-end) tag fails", outcome)

        outcome = expect_refusal(ReplayError, lambda: conf.md1_open(self.frame1),
                                 "MD1 receiving frame 1 a second time")
        self.refused("frame 1 replayed to MD1", outcome)

    # 4 ------------------------------------------------------------------------------

    def rekey(self) -> None:
        conf, out = self.conf, self.out
        out.section("4. Rekey: C leaves, the KD issues a new EKT key (RFC 8871 s4.5.2)")
        old_key, old_salt = conf.ekt_a.current_key, conf.ekt_a.master_salt
        # The KD starts a new epoch; random bytes come from the same source as every key.
        new = EktParameterSet(key=self.random_bytes(conf.cipher.key_length),
                              cipher=conf.cipher, master_salt=self.random_bytes(12),
                              spi=NEW_EKT_SPI, ttl=EKT_TTL)
        conf.receivers["B"].ekt.add_parameter_set(new, REKEY_AT)
        conf.ekt_a.rekey(new, REKEY_AT)
        new_key, new_salt = conf.ekt_a.current_key, conf.ekt_a.master_salt
        out(f"  t={REKEY_AT:.3f} s  KD -> A and B only: EKT key SPI {new.spi}, fingerprint "
            f"{fingerprint(new.key)}")
        out(f"  A (EktSender.rekey): new E2E key {fingerprint(new_key)}; it keeps protecting "
            f"with the old")
        out(f"  key {fingerprint(old_key)} for {int(HOLD * 1000)} ms after first announcing the"
            f" new one (RFC 8870 s4.3.1),")
        out("  so receivers have learnt it before it is used.  C keeps the old EKT key, and "
            "MD2 still")
        out("  forwards to C (as a misbehaving MD could): cryptography alone must exclude C.")
        out()
        row = "  {:<5}  {:<5}  {:<14}  {:<14}  {:<10}  {}"
        out(row.format("frame", "t (s)", "EKTField", "protected with", "B", "C"))
        b_ok = c_ok = after_hold = 0
        for i in range(REKEY_FRAMES):
            frame = 3 + i
            now = (REKEY_AT * 1000 + i * REKEY_SPACING_MS) / 1000
            wire = conf.sender.protect(conf.packet(frame), now)
            field = wire[len(wire) - ekt_field_length(wire):]
            if len(field) == 1:
                kind = "Short"
            else:
                parsed = FullEktField.decode(field)
                kind = f"Full SPI {parsed.spi}"
            md1 = conf.md1_open(wire)
            used = self.key_used(md1.header, md1.plaintext,
                                 (("old E2E key", old_key, old_salt),
                                  ("new E2E key", new_key, new_salt)))
            got_b = conf.receivers["B"].unprotect(md1.seal(conf.md1_to_b), now)
            check(got_b.payload == frame_payload(frame), f"B lost frame {frame} in the rekey")
            b_ok += 1
            to_c = conf.md2_open(conf.md1_to_link(md1)).seal(conf.md2_to_c)
            try:
                got_c = conf.receivers["C"].unprotect(to_c, now)
            except (UnknownSpi, UnknownSender, InnerAuthenticationFailed) as exc:
                c_result = f"{type(exc).__name__}"
            else:
                check(got_c.payload == frame_payload(frame), "C decrypted garbage")
                c_result = "decrypted"
                c_ok += 1
            if used == "new E2E key":
                after_hold += 1
                check(c_result != "decrypted", f"C decrypted frame {frame} under the new key")
            out(row.format(frame, f"{now:.3f}", kind, used, "decrypted", c_result))
        check(after_hold > 0, "no frame was sent under the new key")
        self.rekey_result = f"B {b_ok}/{REKEY_FRAMES}, C {c_ok}/{REKEY_FRAMES}"
        out(f"  B decrypted {b_ok} of {REKEY_FRAMES} frames, C {c_ok}.  UnknownSpi: C has no "
            f"EKT key for SPI {new.spi};")
        out("  UnknownSender: the new E2E key was announced under that EKT key, so C never "
            "learnt it;")
        out("  InnerAuthenticationFailed: C has no E2E key that opens the inner layer.")
        out("  (\"protected with\" was found by trial decryption by this demo, which holds "
            "every key.)")

    def key_used(self, header: bytes, plain: bytes,
                 candidates: Sequence[tuple[str, bytes, bytes]]) -> str:
        """Which E2E key protects a packet: found by trial, as the narrator holds them all."""
        for name, key, salt in candidates:
            try:
                open_inner(key, salt, header, plain)
            except AuthenticationFailed:
                continue
            return name
        raise DemoFailure("a packet is under neither the old nor the new E2E key")


# -- command line -------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="perc-protocol-demo",
        description="Walk one media packet through PERC (RFC 8871) with real cryptography.")
    parser.add_argument("--seed", type=int, default=None,
                        help="draw keys from random.Random(SEED): reproducible output, "
                             "insecure keys (default: os.urandom)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="128",
                        help="DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM (128, default) or "
                             "the 256-bit profile")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")
    args = parser.parse_args(argv)

    if args.seed is None:
        random_bytes: Callable[[int], bytes] = os.urandom
        source = "os.urandom"
    else:
        random_bytes = random.Random(args.seed).randbytes
        source = f"random.Random({args.seed}) (reproducible output; such keys are NOT secret)"
    out = Output(args.quiet)
    profile = PROFILES[args.profile]
    out("PERC protocol demo: RFC 8871 framework, RFC 8723 double SRTP, RFC 8870 EKT")
    out(f"profile {profile.name}")
    out(f"keys from {source}")
    try:
        summary = Demo(profile, random_bytes, out).run()
    except DemoFailure as exc:
        print(f"demo FAILED in \"{out.where}\": {exc}", file=sys.stderr)
        return 1
    except ProtocolError as exc:
        print(f"demo FAILED in \"{out.where}\": a step that must succeed raised "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    out()
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
