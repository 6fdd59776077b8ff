"""Baseline for bench/conference.py: a plain Twisted UDP relay, no crypto.

One UDP socket.  A client registers by sending ``REGISTER`` (answered
``OK``); every other datagram from a registered address is forwarded to
every other registered address, the same fan-out as the MD (each packet to
every other leg of the conference).  As in the MD, the list of destinations
of each source is recomputed when membership changes, not per packet, and
each copy is one ``transport.write``.  ``STATS`` is answered with JSON
``{"received": n, "forwarded": n, "dropped": n}``: forwarded counts copies
handed to the kernel, like the MD's ``rtp_out``.

Usage: python bench/udp_relay.py --port N [--bind 127.0.0.1]
(prints ``listening on HOST:PORT`` once the socket is bound; SIGTERM stops it).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol

REGISTER = b"REGISTER"
STATS = b"STATS"


class Relay(DatagramProtocol):
    def __init__(self) -> None:
        self.members: list[tuple[str, int]] = []
        self.peers: dict[tuple[str, int], tuple[tuple[str, int], ...]] = {}
        self.received = 0
        self.forwarded = 0
        self.dropped = 0

    def _rebuild(self) -> None:
        self.peers = {m: tuple(o for o in self.members if o != m) for m in self.members}

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        peers = self.peers.get(addr)
        if peers is not None and datagram != STATS:
            self.received += 1
            write = self.transport.write
            for peer in peers:
                write(datagram, peer)
            self.forwarded += len(peers)
        elif datagram == REGISTER:
            if addr not in self.peers:
                self.members.append(addr)
                self._rebuild()
            self.transport.write(b"OK", addr)
        elif datagram == STATS:
            self.transport.write(json.dumps({"received": self.received,
                                             "forwarded": self.forwarded,
                                             "dropped": self.dropped}).encode(), addr)
        else:
            self.dropped += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="127.0.0.1")
    args = parser.parse_args()
    port = reactor.listenUDP(args.port, Relay(), interface=args.bind)
    host = port.getHost()
    print(f"listening on {host.host}:{host.port}", flush=True)
    reactor.run()
    sys.exit(0)


if __name__ == "__main__":
    main()
