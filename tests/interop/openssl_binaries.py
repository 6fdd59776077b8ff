"""Drive the ``openssl s_server`` / ``s_client`` binaries over real UDP.

Measured with /usr/bin/openssl 3.0:

* ``s_server -dtls1_2`` prints ``ACCEPT`` once its socket is bound, and after a
  handshake the session, "Client certificate" (PEM), "SRTP Extension
  negotiated, profile=...", and with ``-keymatexport`` a line
  ``    Keying material: <HEX, upper case>``.  ``s_client`` prints the same
  exporter block and the "Server certificate" PEM.  Both print the peer's
  application data on stdout and send what is written to their stdin, so
  stdin must stay open (EOF ends the session).
* ``s_server`` over UDP always does the cookie exchange (HelloVerifyRequest
  before the ServerHello), and fills datagrams up to its fallback MTU
  (228 bytes on an unconnected socket) with several records each.
* Default DTLS 1.2 ClientHello of ``s_client``: groups x25519, P-256, x448,
  P-521, P-384; session_ticket, EMS, encrypt_then_mac, renegotiation_info.
"""

from __future__ import annotations

import re
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.interop.link import Endpoint

OPENSSL = shutil.which("openssl")
KEYING_MATERIAL = re.compile(r"^\s*Keying material: ([0-9A-Fa-f]+)\s*$", re.MULTILINE)
SRTP_PROFILE = re.compile(r"SRTP Extension negotiated, profile=(\S+)")
PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----\n.*?-----END CERTIFICATE-----\n?", re.DOTALL
)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenSSLProcess:
    """An ``openssl`` subprocess whose combined output is collected by a thread."""

    def __init__(self, args: list[str]) -> None:
        if OPENSSL is None:
            raise RuntimeError("no openssl binary on PATH")
        self.args = [OPENSSL, *args]
        self.process = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._output = bytearray()
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.process.stdout
        while chunk := stdout.read1(65536):
            with self._changed:
                self._output += chunk
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return self._output.decode("utf-8", "replace")

    def wait_for(self, pattern: str | re.Pattern, timeout: float) -> re.Match:
        """Wait until the output matches; AssertionError (with the output) if not."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = regex.search(self._output.decode("utf-8", "replace"))
                if match:
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    output = self._output.decode(errors="replace")
                    raise AssertionError(
                        f"{' '.join(self.args)}: no {regex.pattern!r} within {timeout}s;"
                        f" exit={self.process.poll()} output:\n{output}"
                    )
                self._changed.wait(min(left, 0.1))

    def write(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._reader.join(timeout=5)

    def keying_material(self, timeout: float) -> bytes:
        return bytes.fromhex(self.wait_for(KEYING_MATERIAL, timeout).group(1))

    def srtp_profile(self, timeout: float) -> str:
        return self.wait_for(SRTP_PROFILE, timeout).group(1)

    def peer_certificate_der(self, timeout: float) -> bytes:
        """The peer certificate it printed ("Client/Server certificate" PEM)."""
        match = self.wait_for(PEM_CERTIFICATE, timeout)
        certificate = x509.load_pem_x509_certificate(match.group(0).encode())
        return certificate.public_bytes(serialization.Encoding.DER)


def exporter_args(profile: str, keymat_length: int) -> list[str]:
    return [
        "-use_srtp",
        profile,
        "-keymatexport",
        "EXTRACTOR-dtls_srtp",
        "-keymatexportlen",
        str(keymat_length),
    ]


def s_server(
    port: int, cert: str, key: str, *, profile: str, keymat_length: int, extra=()
) -> OpenSSLProcess:
    """``openssl s_server`` on 127.0.0.1:port, requiring a client certificate."""
    args = ["s_server", "-dtls1_2", "-accept", f"127.0.0.1:{port}", "-cert", cert, "-key", key]
    args += ["-Verify", "1", *exporter_args(profile, keymat_length), *extra]
    return OpenSSLProcess(args)


def s_client(
    port: int, cert: str, key: str, *, profile: str, keymat_length: int, extra=()
) -> OpenSSLProcess:
    args = ["s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}", "-cert", cert, "-key", key]
    args += [*exporter_args(profile, keymat_length), *extra]
    return OpenSSLProcess(args)


class UdpDriver:
    """Run one sans-I/O endpoint over a real UDP socket, in real (monotonic) time."""

    def __init__(self, endpoint: Endpoint, sock: socket.socket, peer=None) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.peer = peer  # learnt from the first datagram when None (server side)
        self.sock.setblocking(False)

    def run(self, until: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            for datagram in self.endpoint.transmit(now):
                if self.peer is not None:
                    self.sock.sendto(datagram, self.peer)
            if until():
                return
            if now > deadline:
                raise AssertionError(
                    f"{self.endpoint.name}: condition not met within {timeout}s"
                    f" (complete={self.endpoint.complete}, failed={self.endpoint.failed})"
                )
            timer = self.endpoint.next_timer(now)
            wait = 0.05 if timer is None else min(0.05, max(0.0, timer - now))
            readable, _, _ = select.select([self.sock], [], [], wait)
            now = time.monotonic()
            if readable:
                try:
                    datagram, address = self.sock.recvfrom(65535)
                except (BlockingIOError, ConnectionRefusedError):
                    continue  # ICMP port unreachable before the peer is up
                if self.peer is None:
                    self.peer = address
                if address == self.peer:
                    self.endpoint.receive(datagram, now)
            timer = self.endpoint.next_timer(now)
            if timer is not None and timer <= now:
                self.endpoint.on_timer(now)
