"""A recording TLS relay between the KD and the MD: what exactly was the MD sent?

For the demo's proof and the end-to-end tests only.  The tap holds the dev
PKI's MD certificate (so the KD, which checks the MD's name against the CA,
accepts it) and the KD's certificate (so the MD, which pins the KD's
fingerprint, accepts the onward connection), and copies the tunnel's
plaintext both ways, keeping a copy of every byte in :attr:`TunnelTap.to_md`
and :attr:`TunnelTap.to_kd`.  A real deployment has no such place: the
tunnel is end-to-end TLS 1.3 with mutual authentication.

Fault injection (tests only): each direction's byte stream is cut into
RFC 9185 frames with a :class:`~perc_daemons.protocol.tunnel.TunnelDecoder`;
every message goes through :attr:`TunnelTap.mutate_to_md` (KD -> MD) or
:attr:`TunnelTap.mutate_to_kd` (MD -> KD) when set, a callable
``message -> message | None`` (``None`` drops the message), and is
re-encoded.  The hooks may be set or cleared at any time.  :attr:`to_md` and
:attr:`to_kd` hold what was actually relayed, after mutation.  A stream that
does not decode (a peer's protocol error) ends both connections, as the
receiving daemon would have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from perc_daemons.protocol.tunnel import Message, TunnelDecoder, TunnelError

#: ``message -> message | None``: a fault-injection hook (see the module docstring).
Mutation = Callable[[Message], "Message | None"]


class _Direction:
    """One direction of one relayed connection: frames in, (mutated) frames out."""

    def __init__(self, tap: TunnelTap, to_md: bool) -> None:
        self.tap = tap
        self.to_md = to_md
        self.decoder = TunnelDecoder()

    def relay(self, data: bytes) -> bytes | None:
        """The bytes to pass on for ``data``; None when the stream is broken."""
        try:
            messages = self.decoder.feed(data)
        except TunnelError:
            return None
        hook = self.tap.mutate_to_md if self.to_md else self.tap.mutate_to_kd
        out = bytearray()
        for message in messages:
            if hook is not None:
                message = hook(message)
                if message is None:
                    continue
            out += message.encode()
        if self.to_md:
            self.tap.to_md += out
        else:
            self.tap.to_kd += out
        return bytes(out)


class _Upstream(Protocol):
    def __init__(self, downstream: _Downstream) -> None:
        self.downstream = downstream
        self.direction = _Direction(downstream.tap, to_md=False)

    def dataReceived(self, data: bytes) -> None:
        out = self.direction.relay(data)
        if out is None:
            self.transport.loseConnection()
            self.downstream.transport.loseConnection()
        elif out:
            self.downstream.transport.write(out)

    def connectionLost(self, reason: Any = None) -> None:
        self.downstream.transport.loseConnection()


class _Downstream(Protocol):
    def __init__(self, tap: TunnelTap) -> None:
        self.tap = tap
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []
        self.direction = _Direction(tap, to_md=True)

    def connectionMade(self) -> None:
        self.tap.connections.append(self)
        factory = Factory.forProtocol(lambda: _Upstream(self))
        endpoint = SSL4ClientEndpoint(self.tap.reactor, "127.0.0.1", self.tap.upstream_port,
                                      self.tap.client_options)
        d = endpoint.connect(factory)

        def connected(upstream: _Upstream) -> None:
            self.upstream = upstream
            for data in self.pending:
                upstream.transport.write(data)
            self.pending.clear()

        d.addCallbacks(connected, lambda _: self.transport.loseConnection())

    def dataReceived(self, data: bytes) -> None:
        out = self.direction.relay(data)
        if out is None:
            self.transport.loseConnection()
            if self.upstream is not None:
                self.upstream.transport.loseConnection()
        elif not out:
            pass
        elif self.upstream is None:
            self.pending.append(out)
        else:
            self.upstream.transport.write(out)

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.tap.connections:
            self.tap.connections.remove(self)
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class TunnelTap:
    """Listen on a loopback port; relay each connection to the MD's tunnel port, recording.

    ``mutate_to_md`` / ``mutate_to_kd``: optional fault-injection hooks
    (module docstring); plain attributes, settable later.
    """

    def __init__(self, reactor: Any, *, upstream_port: int, ca_pem: bytes, server_pem: bytes,
                 client_pem: bytes, mutate_to_md: Mutation | None = None,
                 mutate_to_kd: Mutation | None = None) -> None:
        self.reactor = reactor
        self.upstream_port = upstream_port
        self.server_options = ssl.PrivateCertificate.loadPEM(server_pem).options()
        self.client_options = ssl.optionsForClientTLS(
            "localhost", trustRoot=ssl.Certificate.loadPEM(ca_pem),
            clientCertificate=ssl.PrivateCertificate.loadPEM(client_pem))
        self.mutate_to_md = mutate_to_md
        self.mutate_to_kd = mutate_to_kd
        self.to_md = bytearray()
        self.to_kd = bytearray()
        self.connections: list[_Downstream] = []
        self._port: Any = None
        self.port = 0

    def listen(self) -> int:
        """Listen on a free loopback port (kept in :attr:`port`) and return it."""
        factory = Factory.forProtocol(lambda: _Downstream(self))
        self._port = self.reactor.listenSSL(0, factory, self.server_options,
                                            interface="127.0.0.1")
        self.port = self._port.getHost().port
        return self.port

    def messages_to_md(self) -> list[Any]:
        """Every tunnel message the MD was sent (decoded from :attr:`to_md`)."""
        decoder = TunnelDecoder()
        try:
            return decoder.feed(bytes(self.to_md))
        except TunnelError:
            return []

    def close(self) -> defer.Deferred:
        for connection in list(self.connections):
            connection.transport.loseConnection()
        if self._port is None:
            return defer.succeed(None)
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening)
