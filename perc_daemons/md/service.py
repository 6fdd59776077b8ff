"""twistd plugin module for perc-md (see the package docstring for its role).

The service runs, besides the admin listener (/healthz, /metrics):

* the HTTPS conference API (:mod:`perc_daemons.md.api`) on ``[api]``;
* the shared UDP media port (:class:`~perc_daemons.md.media.MediaPlaneProtocol`)
  on ``[media]``;
* the KD tunnel listener (:class:`~perc_daemons.md.tunnel.MdTunnelServer`,
  TLS 1.3, KD certificates pinned) on ``[tunnel]``;

around one :class:`~perc_daemons.md.conferences.MdConferences`.

Start-up checks (one line naming the file, key and reason, exit status 2):
``[api] certificate`` must exist and ``private_key`` be mode 0600/0640 (the
tunnel uses the same pair); an existing ``provider_token_file`` must be
usable (mode 0600/0640, not empty).  A missing token file is not an error:
the provider routes answer 503 until it appears, and the log says so.

``/metrics`` gains, computed at scrape time from the counters the media
plane keeps anyway (no per-packet metric work): per participant
``perc_md_participant_datagrams_total{conference,association,kind}`` and
``perc_md_participant_dropped_total{conference,association,reason}``; per
cascade link the same two, ``perc_md_link_datagrams_total{conference,link,kind}``
and ``perc_md_link_dropped_total{conference,link,reason}`` (``rtp_out``: copies
sent over the link, ``rtp_in``: packets received from it);
``perc_md_plane_dropped_total{reason}``, ``perc_md_tunnel_events_total{event}``
and the gauges ``perc_md_conferences``, ``perc_md_participants``,
``perc_md_pending_joins``, ``perc_md_kd_tunnels``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.application.service import MultiService, Service
from twisted.internet.interfaces import IListeningPort

from perc_daemons import config as config_module
from perc_daemons import tls
from perc_daemons.daemon import EXIT_CONFIG, DaemonOptions, base_service
from perc_daemons.listening import HttpsService, ListeningService, url_host
from perc_daemons.md.api import MdApi, ProviderToken, md_site
from perc_daemons.md.cluster import MdCluster
from perc_daemons.md.conferences import EVENTS, MdConferences
from perc_daemons.md.links import MdLinks
from perc_daemons.md.media import MediaPlaneProtocol
from perc_daemons.md.plane import (
    LEG_BYTES,
    LEG_COUNTERS,
    LEG_DROP_REASONS,
    LINK_BYTES,
    PLANE_DROP_REASONS,
    MediaPlane,
    leg_label,
)
from perc_daemons.md.state import MdStateKeeper, StateError, StateFile
from perc_daemons.md.tunnel import MdTunnelServer
from perc_daemons.protocol.dtls import parse_fingerprint
from perc_daemons.protocol.selection import RECEIVER_COUNTERS
from perc_daemons.protocol.srtp import MAX_DATAGRAM

__all__ = ["MdCollector", "Options", "advertised_host", "makeService", "md_service"]


class Options(DaemonOptions):
    daemon = "md"
    synopsis = "[--config /etc/perc/md.toml]"


def _error(cfg: config_module.Config, key: str, reason: str) -> config_module.ConfigError:
    return config_module.ConfigError(cfg.origin(key), key, reason)


def advertised_host(bind: str, advertise: str) -> str:
    """``[media] advertise``, else the bind address, else 127.0.0.1 for a wildcard bind."""
    if advertise:
        return advertise
    if ipaddress.ip_address(bind).is_unspecified:
        return "127.0.0.1"
    return bind


class MdCollector(Collector):
    """Prometheus collector reading the plane's and conferences' counters at scrape time."""

    def __init__(self, conferences: MdConferences) -> None:
        self.conferences = conferences

    def describe(self) -> Iterator[Any]:
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        families = self._families()
        (datagrams, dropped, link_datagrams, link_dropped, plane, events, confs, parts,
         pending, tunnels, sent_bytes, link_bytes, selection, remb, layer) = families
        c = self.conferences
        for participant in c.participants():
            labels = [participant.conference_id, participant.association]
            leg = participant.leg
            for kind in LEG_COUNTERS:
                datagrams.add_metric([*labels, kind], leg.counters[kind])
            for kind in LEG_BYTES:
                sent_bytes.add_metric([*labels, kind], leg.counters[kind])
            for reason in LEG_DROP_REASONS:
                dropped.add_metric([*labels, reason], leg.drops[reason])
            if leg.selection is not None:
                view = leg.selection.receiver_view(leg.leg_id)
                for kind in RECEIVER_COUNTERS:
                    if kind != "remb_bitrate":
                        selection.add_metric([*labels, kind], view[kind])
                remb.add_metric(labels, view["remb_bitrate"])
                for forwarded in view["layers"]:  # type: ignore[attr-defined]
                    layer.add_metric([*labels, leg_label(forwarded["source"]),
                                      str(forwarded["rid"])], forwarded["height"] or 0)
        for leg in c.plane.legs():
            if leg.link is None:
                continue
            labels = [str(leg.group), str(leg.leg_id)]
            for kind in LEG_COUNTERS:
                link_datagrams.add_metric([*labels, kind], leg.counters[kind])
            for kind in LINK_BYTES:
                link_bytes.add_metric([*labels, kind], leg.counters[kind])
            for reason in LEG_DROP_REASONS:
                link_dropped.add_metric([*labels, reason], leg.drops[reason])
        for reason in PLANE_DROP_REASONS:
            plane.add_metric([reason], c.plane.drops[reason])
        for event in EVENTS:
            events.add_metric([event], c.events[event])
        confs.add_metric([], len(c.conferences()))
        parts.add_metric([], len(c.participants()))
        pending.add_metric([], c.pending_joins)
        tunnels.add_metric([], c.kd_tunnels)
        return iter(families)

    @staticmethod
    def _families() -> list[Any]:
        return [
            CounterMetricFamily("perc_md_participant_datagrams",
                                "Datagrams of a participant's leg, by kind (in/out)",
                                labels=["conference", "association", "kind"]),
            CounterMetricFamily("perc_md_participant_dropped",
                                "Datagrams of a participant's leg dropped, by reason",
                                labels=["conference", "association", "reason"]),
            CounterMetricFamily("perc_md_link_datagrams",
                                "Datagrams of a cascade link, by kind (in/out)",
                                labels=["conference", "link", "kind"]),
            CounterMetricFamily("perc_md_link_dropped",
                                "Datagrams of a cascade link dropped, by reason",
                                labels=["conference", "link", "reason"]),
            CounterMetricFamily("perc_md_plane_dropped",
                                "Media datagrams dropped before a participant is known",
                                labels=["reason"]),
            CounterMetricFamily("perc_md_tunnel_events",
                                "Unexpected or refused tunnel and plane events",
                                labels=["event"]),
            GaugeMetricFamily("perc_md_conferences", "Conferences"),
            GaugeMetricFamily("perc_md_participants", "Admitted participants"),
            GaugeMetricFamily("perc_md_pending_joins", "Joins waiting for the KD"),
            GaugeMetricFamily("perc_md_kd_tunnels", "Connected KD tunnels"),
            CounterMetricFamily("perc_md_participant_bytes",
                                "SRTP/SRTCP bytes sent to a participant's leg, by kind",
                                labels=["conference", "association", "kind"]),
            CounterMetricFamily("perc_md_link_bytes",
                                "SRTP/SRTCP bytes over a cascade link, by kind (in/out)",
                                labels=["conference", "link", "kind"]),
            CounterMetricFamily("perc_md_receiver_feedback",
                                "Selective forwarding for a receiver: NACKs received, "
                                "packets retransmitted, NACKs forwarded upstream, PLIs "
                                "received and requested for it, layer switches",
                                labels=["conference", "association", "kind"]),
            GaugeMetricFamily("perc_md_receiver_remb_bits_per_second",
                              "A receiver's last REMB estimate (0: none yet)",
                              labels=["conference", "association"]),
            GaugeMetricFamily("perc_md_receiver_layer_height",
                              "Height (a=rid max-height; 0 unknown) of the simulcast layer "
                              "forwarded to a receiver, per source",
                              labels=["conference", "association", "source", "rid"]),
        ]


def udp_socket_drops(sock: socket.socket, proc_net: str = "/proc/self/net") -> int | None:
    """The kernel's drop count of UDP socket ``sock`` (the ``drops`` column of
    ``/proc/net/udp`` and ``udp6``, matched by the socket's inode): datagrams the
    kernel discarded for it, mostly for a full receive buffer; None off Linux."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    for table in ("udp", "udp6"):
        try:
            with open(os.path.join(proc_net, table), encoding="ascii") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) >= 13 and fields[9] == inode:
                return int(fields[12])
    return None


class UdpDropsCollector(Collector):
    """``perc_md_udp_socket_drops_total{socket="media"}``: :func:`udp_socket_drops` of
    the media port, read at scrape time (no sample before it listens or off Linux)."""

    def __init__(self, media: MediaService) -> None:
        self.media = media

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily(
            "perc_md_udp_socket_drops",
            "Datagrams the kernel dropped for the MD's UDP socket (receive buffer full), "
            "from /proc/net/udp", labels=["socket"])
        port = self.media.port
        sock = getattr(port, "socket", None)
        if sock is not None:
            drops = udp_socket_drops(sock)
            if drops is not None:
                family.add_metric(["media"], drops)
        yield family


class MediaService(ListeningService):
    """The shared UDP media port; tells the conferences its actual port."""

    def __init__(self, reactor: Any, bind: str, port: int, protocol: MediaPlaneProtocol,
                 conferences: MdConferences, receive_buffer: int = 0) -> None:
        super().__init__("md-media")
        self._reactor = reactor
        self._bind = bind
        self._port_number = port
        self.protocol = protocol
        self._conferences = conferences
        self._receive_buffer = receive_buffer

    def listen(self) -> IListeningPort:
        # Any datagram whole (Twisted's default of 8192 would cut jumbo-frame media).
        port = self._reactor.listenUDP(self._port_number, self.protocol,
                                       interface=self._bind, maxPacketSize=MAX_DATAGRAM)
        if self._receive_buffer:
            # Room for the datagrams that arrive while the MD is off its core: the
            # kernel's default (rmem_default) holds some 90 video packets.
            port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)
        return port

    def listening(self, address: Any) -> None:
        self._conferences.media_port = address.port
        self._conferences.media = self.protocol
        got = self.port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # type: ignore
        if self._receive_buffer:  # Linux reports twice what was set (its overhead), capped
            got //= 2
        self.log.info("perc-md media (UDP) listening on {host}:{port}, advertised as "
                      "{advertised}:{port}, receive buffer {got} bytes",
                      host=url_host(address.host), port=address.port,
                      advertised=url_host(self._conferences.media_host), got=got)
        if self._receive_buffer and got < self._receive_buffer:
            self.log.warn("perc-md: [media] receive_buffer is {wanted} bytes but the kernel "
                          "gave {got} (net.core.rmem_max): media arriving while the MD is "
                          "busy may be dropped; raise net.core.rmem_max to at least {wanted}",
                          wanted=self._receive_buffer, got=got)

    def stopService(self) -> Any:
        self._conferences.media = None
        return super().stopService()


class RestoreService(Service):
    """Restores the saved conferences and links (md/state.py) once the media port listens;
    an unusable state file stops start-up with its path and reason (exit status 2)."""

    def __init__(self, keeper: MdStateKeeper, cfg: config_module.Config) -> None:
        self.keeper = keeper
        self.cfg = cfg

    def startService(self) -> None:
        super().startService()
        try:
            self.keeper.restore()
        except StateError as e:
            origin = self.cfg.origin("state.file")
            sys.stderr.write(f"perc-md: configuration error: {origin}: state.file: "
                             f"{self.keeper.file.path}: {e} (move it away to start without "
                             "the saved conferences)\n")
            sys.stderr.flush()
            raise SystemExit(EXIT_CONFIG) from None


def tls_files(cfg: config_module.Config) -> tls.ServerContextFactory:
    """The API's TLS context; the certificate and key must be usable (ConfigError)."""
    cert, key = cfg.api.certificate, cfg.api.private_key
    if not os.path.exists(cert):
        raise _error(cfg, "api.certificate", f"{cert}: file not found")
    try:
        tls.check_private_key_file(key)
    except tls.TlsFileError as e:
        raise _error(cfg, "api.private_key", f"{key}: {e}") from None
    try:
        return tls.server_context_factory(cert, key)
    except tls.TlsFileError as e:
        name = "api.private_key" if str(e).startswith("private key") else "api.certificate"
        raise _error(cfg, name, str(e)) from None


def link_credentials(cfg: config_module.Config) -> tuple[bytes, Any]:
    """The MD's certificate (DER) and key for cascade links (RFC 8871 s4.5.1): the API's.

    Links need an ECDSA P-256 key (the DTLS engine's); with another kind of
    key the key returned is None: the MD serves without links, and says so.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    with open(cfg.api.certificate, "rb") as f:
        der = x509.load_pem_x509_certificate(f.read()).public_bytes(serialization.Encoding.DER)
    key = serialization.load_pem_private_key(tls.read_private_file(cfg.api.private_key), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        MdApi.log.warn("perc-md: [api] private_key is not ECDSA P-256: cascade links are "
                       "unavailable (the links API answers 404)")
        return der, None
    return der, key


def md_cluster(cfg: config_module.Config, reactor: Any, conferences: MdConferences,
               token: ProviderToken) -> MdCluster | None:
    """The host's perc-md processes (``[cluster]``, md/cluster.py), None when alone."""
    if not cfg.cluster.processes:
        return None
    from perc_daemons.cli import ApiClient, trust_root

    try:
        trust = trust_root(cfg.cluster.ca_file, cfg.origin("cluster.ca_file"))
    except config_module.ConfigError as e:
        raise _error(cfg, "cluster.ca_file", e.reason) from None

    def client_for(url: str) -> ApiClient | None:
        secret = token.current()
        if secret is None:
            return None
        client = ApiClient(reactor, url, trust)
        client.token = secret.decode("utf-8")
        return client

    return MdCluster(cfg.cluster.processes, cfg.api.port, reactor, client_for=client_for,
                     local_load=lambda: len(conferences.participants()) +
                     conferences.pending_joins, hold=float(cfg.api.join_timeout))


def md_service(cfg: config_module.Config, reactor: Any = None) -> MultiService:
    """The whole daemon; raises ConfigError for unusable files.

    The returned service has ``conferences``, ``api``, ``media`` (the
    :class:`MediaPlaneProtocol`) and ``tunnel`` (the :class:`MdTunnelServer`).
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    context = tls_files(cfg)
    token = ProviderToken(cfg.api.provider_token_file)
    problem = token.check()
    if problem is not None:
        raise _error(cfg, "api.provider_token_file",
                     f"{cfg.api.provider_token_file}: {problem}")
    media_host = advertised_host(cfg.media.bind, cfg.media.advertise)
    if not cfg.media.advertise and media_host != cfg.media.bind:
        MdApi.log.warn("perc-md: [media] advertise is empty and bind is {bind}: answers "
                       "advertise {host}, reachable from this host only; set [media] "
                       "advertise", bind=cfg.media.bind, host=media_host)

    top = base_service("md", cfg, reactor)
    api_der, link_key = link_credentials(cfg)
    plane = MediaPlane(replay_window=cfg.media.replay_window,
                       link_certificate=api_der if link_key is not None else None,
                       link_private_key=link_key)
    conferences = MdConferences(
        plane, reactor, media_host=media_host, media_port=cfg.media.port,
        pinned_kd_fingerprints=[parse_fingerprint(fp) for fp in cfg.tunnel.kd_fingerprints],
        join_timeout=float(cfg.api.join_timeout))
    plane.on_dtls = conferences.dtls_from_endpoint
    protocol = MediaPlaneProtocol(plane, reactor, consent_timeout=float(cfg.media.consent_timeout),
                                  on_expired=conferences.legs_expired)
    try:
        tunnel = MdTunnelServer(reactor, bind=cfg.tunnel.bind, port=cfg.tunnel.port,
                                certificate=cfg.api.certificate,
                                private_key=cfg.api.private_key,
                                is_trusted_kd=conferences.is_trusted_kd, handler=conferences,
                                metrics=top.metrics,  # type: ignore[attr-defined]
                                liveness_interval=cfg.tunnel.liveness_interval,
                                liveness_timeout=cfg.tunnel.liveness_timeout,
                                limits=top.limits)  # type: ignore[attr-defined]
    except tls.TlsFileError as e:
        raise _error(cfg, "api.certificate", str(e)) from None
    links = MdLinks(plane, reactor, media=lambda: conferences.media) \
        if link_key is not None else None
    if links is not None:
        conferences.on_deleted = links.conference_deleted
    keeper = MdStateKeeper(StateFile(cfg.state.file), conferences, links)
    conferences.on_changed = keeper.changed
    if links is not None:
        links.on_changed = keeper.changed
    cluster = md_cluster(cfg, reactor, conferences, token)
    api = MdApi(conferences, token, tunnel_port=lambda: tunnel.port, clock=reactor,
                links=links, fingerprint=hashlib.sha256(api_der).digest(), cluster=cluster)
    top.metrics.registry.register(MdCollector(conferences))  # type: ignore[attr-defined]
    api.measure(top.metrics, "md")  # type: ignore[attr-defined]

    # Started in this order (stopped in reverse): media and tunnel before the API.
    media = MediaService(reactor, cfg.media.bind, cfg.media.port, protocol, conferences,
                         receive_buffer=cfg.media.receive_buffer)
    media.setServiceParent(top)
    top.metrics.registry.register(UdpDropsCollector(media))  # type: ignore[attr-defined]
    tunnel.setServiceParent(top)
    RestoreService(keeper, cfg).setServiceParent(top)
    HttpsService(reactor, "md-api", "perc-md HTTPS conference API", cfg.api.bind,
                 cfg.api.port, md_site(api), context,
                 limits=top.limits, metrics=top.metrics,  # type: ignore[attr-defined]
                 ).setServiceParent(top)
    top.conferences = conferences  # type: ignore[attr-defined]
    top.api = api  # type: ignore[attr-defined]
    top.media = protocol  # type: ignore[attr-defined]
    top.tunnel = tunnel  # type: ignore[attr-defined]
    top.state = keeper  # type: ignore[attr-defined]
    top.cluster = cluster  # type: ignore[attr-defined]
    return top


def makeService(options: Options) -> MultiService:
    try:
        return md_service(options.loaded)
    except config_module.ConfigError as e:
        sys.stderr.write(f"perc-md: configuration error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_CONFIG) from None
