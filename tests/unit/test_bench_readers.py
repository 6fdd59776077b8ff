"""bench/cascade.py's two readers of a receiver's socket agree, datagram for datagram.

Real UDP sockets on loopback: one mix of datagrams (RTP from the "MD" with
and without a FullEKTField, RTCP, STUN, DTLS, too short to be RTP, empty,
the largest UDP/IPv4 datagram, and RTP from another address) is read once
with ``read_recvfrom`` (one recvfrom(2) per datagram) and once with
``read_mmsg`` (recvmmsg(2) batches, with a batch size that splits the mix):
both must count the same RTP datagrams and hand the same datagrams, with
the same source, to the receive path, and those must be the ones the
sampling rule says (RFC 3550 s5.1 header, RFC 8870 s4.1 EKTField).
"""

from __future__ import annotations

import select
import socket

from twisted.trial import unittest

from bench.cascade import read_mmsg, read_recvfrom
from bench.mmsg import Batch, Unavailable, sockaddr_key
from perc_daemons.protocol.ekt import FULL_EKT_TYPE

EVERY = 10  # not a power of two: the whole sequence number matters
END = b"\x01\x01end"  # STUN-like, from the MD, sent last


def rtp(sequence: int, size: int, last: int) -> bytes:
    return bytes([0x80, 0xE0, sequence >> 8, sequence & 0xFF]) + bytes(size - 5) + bytes([last])


class ReadersTests(unittest.TestCase):
    def setUp(self) -> None:
        self.sockets: list[socket.socket] = []
        self.receiver = self.udp()
        self.receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.receiver.setblocking(False)
        self.md, self.other = self.udp(), self.udp()
        self.md_address = self.md.getsockname()
        self.other_address = self.other.getsockname()

    def tearDown(self) -> None:
        for s in self.sockets:
            s.close()

    def udp(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        self.sockets.append(s)
        return s

    def mix(self) -> tuple[list[tuple[socket.socket, bytes]], int, list[tuple[bytes, tuple]]]:
        """(what to send, RTP datagrams to count, what the receive path is to get)."""
        md, other = self.md_address, self.other_address
        sends: list[tuple[socket.socket, bytes]] = []
        count, handed = 0, []

        def add(sock: socket.socket, data: bytes, is_rtp: bool, handed_on: bool) -> None:
            nonlocal count
            sends.append((sock, data))
            count += is_rtp
            if handed_on:
                handed.append((data, md if sock is self.md else other))

        for sequence in range(65520, 65536):  # the wrap of the sequence number too
            add(self.md, rtp(sequence, 1308, 0), True, sequence % EVERY == 0)
        for sequence in range(230, 380):  # over 255: both bytes
            full_ekt = sequence % 7 == 3
            last = FULL_EKT_TYPE if full_ekt else 0
            add(self.md, rtp(sequence, 200 + sequence * 3, last), True,
                sequence % EVERY == 0 or full_ekt)
            if sequence % 20 == 5:
                add(self.md, bytes([0x81, 200]) + bytes(26), False, True)  # RTCP SR
                add(self.md, b"\x00\x01\x00\x00" + bytes(16), False, True)  # STUN request
                add(self.md, bytes([22, 0xFE, 0xFD]) + bytes(40), False, True)  # DTLS
                add(self.md, rtp(sequence + 1, 12, 0), False, True)  # header only: not RTP
                add(self.md, b"", False, True)
                add(self.other, rtp(sequence + 2, 300, 0), False, True)  # foreign source
        add(self.md, rtp(65530, 65507, 0), True, True)  # the largest, sampled
        add(self.md, END, False, True)
        return sends, count, handed

    def read(self, reader: object) -> tuple[int, list[tuple[bytes, tuple]]]:
        sends, _, _ = self.mix()
        to = self.receiver.getsockname()
        for sock, data in sends:
            sock.sendto(data, to)
        got: list[tuple[bytes, tuple]] = []
        count = 0
        for _ in range(100):  # until the last one sent is read (loopback: almost at once)
            count += reader(lambda data, addr: got.append((data, tuple(addr))))
            if got and got[-1][0] == END:
                break
            select.select([self.receiver], [], [], 0.1)
        return count, got

    def test_both_readers_agree_with_the_rule(self) -> None:
        try:
            batch = Batch(16)  # the mix is some 200 datagrams: many batches, one not full
        except Unavailable as e:
            raise unittest.SkipTest(str(e)) from e
        _, expected_count, expected = self.mix()
        md = self.md_address
        old = self.read(lambda receive: read_recvfrom(self.receiver.recvfrom, md, EVERY,
                                                      receive))
        new = self.read(lambda receive: read_mmsg(batch, self.receiver.fileno(), md,
                                                  sockaddr_key(*md), EVERY, receive))
        self.assertEqual(old[0], expected_count)
        self.assertEqual(new[0], expected_count)
        self.assertEqual(len(old[1]), len(expected))
        self.assertEqual(old[1], expected)
        self.assertEqual(new[1], expected)

    def test_sockaddr_key_is_the_source_recvmmsg_reports(self) -> None:
        try:
            batch = Batch(4)
        except Unavailable as e:
            raise unittest.SkipTest(str(e)) from e
        self.other.sendto(b"x", self.receiver.getsockname())
        select.select([self.receiver], [], [], 5)
        self.assertEqual(batch.recv(self.receiver.fileno()), 1)
        sources, lengths, _ = batch.unpack(1)
        self.assertEqual(sources, (sockaddr_key(*self.other_address),))
        self.assertNotEqual(sources[0], sockaddr_key(*self.md_address))
        self.assertEqual(lengths, (1,))
        self.assertEqual(batch.source(0), self.other_address)
        self.assertEqual(batch.datagram(0, 1), b"x")
        self.assertEqual(batch.recv(self.receiver.fileno()), 0)  # empty: no wait, no error
