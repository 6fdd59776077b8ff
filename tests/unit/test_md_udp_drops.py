"""perc_md_udp_socket_drops_total: the kernel's drops of a real UDP socket."""

from __future__ import annotations

import os
import socket
import sys

from twisted.trial import unittest

from perc_daemons.md.service import udp_socket_drops


class UdpSocketDropsTests(unittest.TestCase):
    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("/proc/net/udp is Linux's")

    def _pair(self, family: int, host: str) -> tuple[socket.socket, socket.socket]:
        receiver = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the minimum
        receiver.bind((host, 0))
        sender = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(sender.close)
        return receiver, sender

    def check(self, family: int, host: str) -> None:
        receiver, sender = self._pair(family, host)
        self.assertEqual(udp_socket_drops(receiver), 0)
        for _ in range(200):  # never read: the buffer fills and the kernel drops
            sender.sendto(b"x" * 1000, receiver.getsockname())
        drops = udp_socket_drops(receiver)
        self.assertIsNotNone(drops)
        self.assertGreater(drops, 100)
        self.assertLessEqual(drops, 200)

    def test_ipv4(self):
        self.check(socket.AF_INET, "127.0.0.1")

    def test_ipv6(self):
        if not socket.has_ipv6 or not os.path.exists("/proc/self/net/udp6"):
            raise unittest.SkipTest("no IPv6")
        try:
            self.check(socket.AF_INET6, "::1")
        except OSError as e:  # no ::1 on this host
            raise unittest.SkipTest(str(e)) from None

    def test_a_socket_not_in_the_tables(self):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(tcp.close)
        self.assertIsNone(udp_socket_drops(tcp))
        self.assertIsNone(udp_socket_drops(tcp, proc_net=self.mktemp()))
