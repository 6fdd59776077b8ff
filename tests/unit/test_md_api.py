"""perc-md in-process: HTTPS conference API, a real KD tunnel client, real UDP, /metrics.

The MD service is the daemon's own (``md_service``) on loopback ports; the
KD is a real :class:`~perc_daemons.kd.tunnel.KdTunnelClient` whose handler
plays the KD's part (answers SignAnswer, sends MediaKeys and DTLS); the
endpoint is a UDP socket sending real STUN checks.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import uuid
from dataclasses import dataclass
from typing import Any

import treq
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor, ssl, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer
from zope.interface.verify import verifyObject

from perc_daemons import config
from perc_daemons.devpki import DevPki
from perc_daemons.interfaces import ITunnelHandler
from perc_daemons.kd.tunnel import KdTunnelClient
from perc_daemons.md.service import md_service
from perc_daemons.protocol import sdp
from perc_daemons.protocol.answer import sign_answer
from perc_daemons.protocol.ekt import EktCipher, EktParameterSet
from perc_daemons.protocol.stun import BINDING_SUCCESS, StunMessage
from perc_daemons.protocol.tunnel import (
    DISCONNECT_CONFERENCE_DELETED,
    DISCONNECT_CONSENT_TIMEOUT,
    DISCONNECT_LEAVE,
    DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM,
    MAX_ASSOCIATIONS,
    REASONS_ANNOUNCEMENT,
    SIGN_STATUS_BAD_OFFER,
    SIGN_STATUS_OK,
    SIGN_STATUS_REFUSED,
    SRTP_AEAD_AES_128_GCM,
    Associations,
    ConferenceEnded,
    EndpointDisconnect,
    MediaKeys,
    SignAnswer,
    SignAnswerAck,
    TunneledDtls,
)
from tests.unit.test_md_media import P128, Collector, Endpoint, binding_request, rtcp_rr

PROVIDER_TOKEN = "provider-secret-0123456789"
ENDPOINT_FP = ":".join(f"{b:02X}" for b in range(32))


def offer(ufrag: str = "EpUf") -> str:
    lines = [
        "v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=group:BUNDLE 0",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111", "c=IN IP4 0.0.0.0",
        f"a=ice-ufrag:{ufrag}", "a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y",
        f"a=fingerprint:sha-256 {ENDPOINT_FP}", "a=setup:actpass",
        "a=tls-id:abc3de65cddef001be82", "a=mid:0", "a=sendrecv", "a=rtcp-mux",
        "a=rtpmap:111 opus/48000/2", "a=ssrc:1001 cname:user@example",
    ]
    return "".join(line + "\r\n" for line in lines)


def browser_offer(*, media: bool = True) -> str:
    """A browser's offer: audio, video and a data channel (RFC 8841), all bundled."""
    common = ["c=IN IP4 0.0.0.0", "a=ice-ufrag:EpUf", "a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y",
              f"a=fingerprint:sha-256 {ENDPOINT_FP}", "a=setup:actpass",
              "a=tls-id:abc3de65cddef001be82"]
    audio = ["m=audio 9 UDP/TLS/RTP/SAVPF 111", *common, "a=mid:0", "a=sendrecv",
             "a=rtcp-mux", "a=rtpmap:111 opus/48000/2", "a=ssrc:1001 cname:user@example"]
    video = ["m=video 9 UDP/TLS/RTP/SAVPF 96", *common, "a=mid:1", "a=sendrecv",
             "a=rtcp-mux", "a=rtpmap:96 VP8/90000", "a=ssrc:1002 cname:user@example"]
    data = ["m=application 9 UDP/DTLS/SCTP webrtc-datachannel", *common, "a=mid:2",
            "a=sctp-port:5000"]
    bundle = "a=group:BUNDLE 0 1 2" if media else "a=group:BUNDLE 2"
    lines = ["v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "t=0 0", bundle,
             *(audio + video if media else []), *data]
    return "".join(line + "\r\n" for line in lines)


@implementer(IPolicyForHTTPS)
class TrustCa:
    """Verify the MD's certificate against the dev CA and the name "localhost"."""

    def __init__(self, ca_pem: bytes) -> None:
        self._options = ssl.optionsForClientTLS(
            "localhost", trustRoot=ssl.Certificate.loadPEM(ca_pem))

    def creatorForNetloc(self, hostname: bytes, port: int):
        return self._options


@implementer(ITunnelHandler)
class PlayKd:
    """The KD's side of the tunnel, scripted by the test; it signs answers for real
    (protocol.answer.sign_answer) with ``issued``'s certificate and key."""

    def __init__(self, issued: Any) -> None:
        # ok | refuse | bad | silent | other-conference | other-association
        self.mode = "ok"
        self.messages: list[Any] = []
        self.peer: Any = None
        self._waiters: list[tuple[Any, defer.Deferred]] = []
        self.answers: dict[bytes, str] = {}
        self._chain = [x509.load_pem_x509_certificate(issued.certificate.read_bytes())
                       .public_bytes(serialization.Encoding.DER)]
        self._key = serialization.load_pem_private_key(issued.private_key.read_bytes(), None)

    def signed(self, request: SignAnswer, conference: str | None = None,
               association: bytes | None = None) -> str:
        text = sign_answer(sdp.parse(request.answer_sdp), request.offer_sdp,
                           association_id=association or request.association_id,
                           conference_id=conference or request.conference_id,
                           identity="alice@example.com", certificate_chain=self._chain,
                           private_key=self._key, now=reactor.seconds())
        self.answers[request.association_id] = text
        return text

    def tunnel_up(self, peer: Any) -> None:
        self.peer = peer

    def tunnel_down(self, peer: Any, reason: str) -> None:
        self.peer = None

    def tunnel_message(self, peer: Any, message: Any) -> None:
        self.messages.append(message)
        if isinstance(message, SignAnswer):
            aid = message.association_id
            if self.mode == "ok":
                peer.send(SignAnswerAck(aid, SIGN_STATUS_OK, self.signed(message)))
            elif self.mode == "other-conference":
                peer.send(SignAnswerAck(aid, SIGN_STATUS_OK,
                                        self.signed(message, conference="c-other")))
            elif self.mode == "other-association":
                peer.send(SignAnswerAck(aid, SIGN_STATUS_OK,
                                        self.signed(message, association=uuid.uuid4().bytes)))
            elif self.mode == "refuse":
                peer.send(SignAnswerAck(aid, SIGN_STATUS_REFUSED, "alice is not invited"))
            elif self.mode == "bad":
                peer.send(SignAnswerAck(aid, SIGN_STATUS_BAD_OFFER, "no a=identity"))
        for entry in list(self._waiters):
            if entry[0](message):
                self._waiters.remove(entry)
                entry[1].callback(message)

    def wait_for(self, predicate) -> defer.Deferred:
        for message in self.messages:
            if predicate(message):
                return defer.succeed(message)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((predicate, d))
        return d.addTimeout(10, reactor)


def disconnect_of(aid: bytes):
    return lambda m: isinstance(m, EndpointDisconnect) and m.association_id == aid


_TABLES = (dict, set, frozenset, list, tuple, collections.deque)


def _attributes(obj: Any) -> dict[str, Any]:
    names = set(getattr(obj, "__dict__", ()))
    for cls in type(obj).__mro__:
        slots = getattr(cls, "__slots__", ())
        names.update((slots,) if isinstance(slots, str) else slots)
    return {name: getattr(obj, name) for name in sorted(names) if hasattr(obj, name)}


def md_tables(md: Any) -> dict[str, int]:
    """The size of every table (dict, set, list, tuple...) the MD's objects hold.

    Found by looking, not from a list: every container attribute of the
    conference state (:class:`MdConferences` and each conference), the media
    plane and each of its legs, the KD tunnel server, the API and the media
    protocol, and the containers held one level inside them (the disconnects
    queued per KD, the legs per group).  A table added later is counted
    without touching this helper.  Not countable from here: the per-SSRC
    streams inside libsrtp sessions (see MediaPlane.remove_leg).
    """
    conferences = md.conferences
    objects = [("conferences", conferences), ("plane", conferences.plane),
               ("tunnel", md.tunnel), ("api", md.api), ("media", md.media)]
    objects += [(f"conference {c.conference_id}", c) for c in conferences.conferences()]
    objects += [(f"leg {leg.leg_id.hex()}", leg) for leg in conferences.plane.legs()]
    sizes = {}
    for where, obj in objects:
        for name, value in _attributes(obj).items():
            if isinstance(value, _TABLES):
                sizes[f"{where}.{name}"] = len(value)
                inner = value.items() if isinstance(value, dict) else enumerate(value)
                for key, item in inner:
                    if isinstance(item, _TABLES):
                        sizes[f"{where}.{name}[{key!r}]"] = len(item)
    return sizes


@dataclass
class MediaParticipant:
    """A joined, keyed participant: the MD's answer, its UDP socket and its SRTP sides."""

    aid: bytes
    body: dict[str, Any]
    endpoint: Endpoint
    sock: Any
    collector: Collector


class MdServiceTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        pki = DevPki(os.path.join(self.dir, "pki"))
        self.ca_path = str(pki.ca_certificate_path)
        md = pki.issue("md", ["localhost"], ["127.0.0.1"])
        self.kd_cert = pki.issue("kd", ["kd.localhost"])
        der = x509.load_pem_x509_certificate(self.kd_cert.certificate.read_bytes()).public_bytes(
            serialization.Encoding.DER)
        self.kd_fp = hashlib.sha256(der).digest().hex(":").upper()
        self.token_path = os.path.join(self.dir, "md-provider.token")
        self.write_token(PROVIDER_TOKEN)
        cfg = config.validate("md", os.path.join(self.dir, "md.toml"), {
            "admin": {"bind": "127.0.0.1", "port": 0},
            "api": {"bind": "127.0.0.1", "port": 0, "certificate": str(md.certificate),
                    "private_key": str(md.private_key),
                    "provider_token_file": self.token_path},
            "media": {"bind": "127.0.0.1", "port": 0},
            "tunnel": {"bind": "127.0.0.1", "port": 0},
            "state": {"file": os.path.join(self.dir, "md-state.json")},
        })
        self.md = md_service(cfg, reactor)
        self.md.startService()
        self.addCleanup(self.md.stopService)
        self.conferences = self.md.conferences
        api_port = self.md.getServiceNamed("md-api").port.getHost().port
        self.base = f"https://127.0.0.1:{api_port}"
        self.admin = f"http://127.0.0.1:{self.md.getServiceNamed('admin').port.getHost().port}"
        self.media_address = ("127.0.0.1", self.conferences.media_port)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        with open(self.ca_path, "rb") as f:
            self.http = treq.client.HTTPClient(
                Agent(reactor, contextFactory=TrustCa(f.read()), pool=self.pool))
        self.kd = PlayKd(self.kd_cert)
        self.pki = pki

    def write_token(self, token: str) -> None:
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")

    # -- helpers ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                raw: bytes | None = None):
        headers = {}
        if token is not None:
            headers[b"authorization"] = [f"Bearer {token}".encode()]
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            headers[b"content-type"] = [b"application/json"]
        response = yield self.http.request(method, self.base + path, data=data,
                                           headers=headers)
        content = yield response.content()
        parsed = json.loads(content) if content else None
        if response.code >= 400:
            self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                             [b"application/problem+json"])
            self.assertEqual(parsed["status"], response.code)
        return response.code, parsed

    def create(self, cid: str = "c1", fp: str | None = None, token: str = PROVIDER_TOKEN):
        return self.request("POST", "/v1/conferences",
                            {"id": cid, "kd_fingerprint": fp or self.kd_fp}, token)

    @defer.inlineCallbacks
    def connect_kd(self, cert: Any = None, handler: PlayKd | None = None):
        cert = cert or self.kd_cert
        client = KdTunnelClient(
            reactor, host="127.0.0.1", port=self.md.tunnel.port, name="localhost",
            ca_certificate=self.ca_path, certificate=str(cert.certificate),
            private_key=str(cert.private_key), handler=handler or self.kd, metrics=None,
            min_delay=0.05, max_delay=0.5)
        before = self.conferences.kd_tunnels
        client.startService()
        self.addCleanup(client.stopService)
        yield client.when_up()
        yield self.eventually(lambda: self.conferences.kd_tunnels == before + 1,
                              "MD sees the KD")
        return client

    @defer.inlineCallbacks
    def eventually(self, check, what: str):
        for _ in range(500):
            if check():
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail(f"{what}: did not happen")

    @defer.inlineCallbacks
    def join(self, cid: str = "c1", text: str | None = None):
        code, body = yield self.request("POST", f"/v1/conferences/{cid}/participants",
                                        {"offer": text or offer()})
        return code, body

    def udp_endpoint(self) -> tuple[Any, Collector]:
        collector = Collector()
        port = reactor.listenUDP(0, collector, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port, collector

    @defer.inlineCallbacks
    def media_participant(self, cid: str = "c1", kd: PlayKd | None = None):
        """Join ``cid`` over HTTP, ICE-check from a real UDP socket, have ``kd`` key the leg."""
        kd = kd or self.kd
        if not hasattr(self, "rng"):
            self.rng = random.Random(18)
            self.params = EktParameterSet(key=self.rng.randbytes(16),
                                          cipher=EktCipher.AESKW_128,
                                          master_salt=self.rng.randbytes(12), spi=1, ttl=600)
        n = self.joined_count = getattr(self, "joined_count", 0) + 1
        code, body = yield self.join(cid, offer(f"EpU{n:03d}"))
        self.assertEqual(code, 201, body)
        aid = uuid.UUID(body["association"]).bytes
        media = sdp.parse(body["answer"]).media[0]
        sock, collector = self.udp_endpoint()
        endpoint = Endpoint(str(n), self.rng, self.params, ("127.0.0.1", sock.getHost().port))
        endpoint.md_ufrag, endpoint.md_pwd = media.ice_ufrag, media.ice_pwd
        waiting = collector.next()
        sock.write(endpoint.stun(), self.media_address)
        yield waiting
        k = endpoint.keys
        kd.peer.send(MediaKeys(aid, int(P128), b"", k.client_outer.key, k.server_outer.key,
                               k.client_outer.salt, k.server_outer.salt))
        leg = self.conferences.plane.leg(aid)
        yield self.eventually(lambda: leg.keyed, "leg keyed")
        return MediaParticipant(aid, body, endpoint, sock, collector)

    @defer.inlineCallbacks
    def send_media(self, participant: MediaParticipant, seq: int):
        """One SRTP packet (and one SRTCP report) from ``participant``, relayed by the MD."""
        ep = participant.endpoint
        leg = self.conferences.plane.leg(participant.aid)
        before = leg.counters["rtp_in"], leg.counters["rtcp_in"]
        participant.sock.write(ep.sender.protect(ep.rtp(seq, b"m" * 200), seq * 0.02),
                               self.media_address)
        participant.sock.write(ep.rtcp_out.protect_rtcp(rtcp_rr(ep.ssrc, seq)),
                               self.media_address)
        yield self.eventually(lambda: (leg.counters["rtp_in"], leg.counters["rtcp_in"])
                              == (before[0] + 1, before[1] + 1), "media relayed")

    # -- conferences ------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_create_conference_requires_the_provider_token(self):
        code, body = yield self.create(token=None)
        self.assertEqual((code, body["type"]), (401, "urn:perc:problem:unauthorized"))
        code, body = yield self.create(token="wrong")
        self.assertEqual(code, 403)
        code, body = yield self.create()
        self.assertEqual(code, 201)
        self.assertEqual(body, {"id": "c1", "kd_fingerprint": self.kd_fp,
                                "tunnel": {"host": "127.0.0.1", "port": self.md.tunnel.port},
                                "media": {"host": "127.0.0.1",
                                          "port": self.conferences.media_port},
                                "forwarding": "sfu", "last_n": -1, "audio_levels": True,
                                "audio_top_k": 0})
        code, again = yield self.create()
        self.assertEqual((code, again), (200, body))
        code, _ = yield self.create(fp=":".join(["AB"] * 32))
        self.assertEqual(code, 409)
        code, _ = yield self.request("POST", "/v1/conferences",
                                     {"id": "bad id!", "kd_fingerprint": self.kd_fp},
                                     PROVIDER_TOKEN)
        self.assertEqual(code, 400)
        code, _ = yield self.request("POST", "/v1/conferences",
                                     {"id": "c2", "kd_fingerprint": "AB:CD"}, PROVIDER_TOKEN)
        self.assertEqual(code, 400)
        code, body = yield self.request("GET", "/v1/conferences/c1", token=PROVIDER_TOKEN)
        self.assertEqual((code, body["kd_connected"], body["participants"]), (200, False, []))
        code, _ = yield self.request("GET", "/v1/conferences/c1", token="wrong")
        self.assertEqual(code, 403)
        code, _ = yield self.request("GET", "/v1/conferences/nope", token=PROVIDER_TOKEN)
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_missing_token_file_is_503_then_picked_up(self):
        os.unlink(self.token_path)
        code, body = yield self.create()
        self.assertEqual((code, body["type"]),
                         (503, "urn:perc:problem:provider-token-unavailable"))
        self.write_token("rotated-token-abcdef")
        code, _ = yield self.create(token=PROVIDER_TOKEN)
        self.assertEqual(code, 403)
        code, _ = yield self.create(token="rotated-token-abcdef")
        self.assertEqual(code, 201)

    @defer.inlineCallbacks
    def test_token_file_made_readable_is_refused_at_the_next_use(self):
        # The token was read and cached; then someone runs chmod 0644 on the file.
        code, _ = yield self.create()
        self.assertEqual(code, 201)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        os.chmod(self.token_path, 0o644)
        code, body = yield self.create()
        self.assertEqual(code, 503, body)
        self.assertEqual(body["type"], "urn:perc:problem:provider-token-unavailable")
        [text] = [formatEvent(e) for e in events if e.get("path") == self.token_path]
        self.assertIn(self.token_path, text)
        self.assertIn("mode 0644 is too open", text)
        self.assertNotIn(PROVIDER_TOKEN, text)
        os.chmod(self.token_path, 0o600)
        code, _ = yield self.create()
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_body_limits_and_errors(self):
        yield self.create()
        code, _ = yield self.request(
            "POST", "/v1/conferences/c1/participants",
            raw=json.dumps({"offer": "x" * 100_000}).encode())
        self.assertEqual(code, 413)
        code, _ = yield self.request("POST", "/v1/conferences/c1/participants", raw=b"{")
        self.assertEqual(code, 400)
        code, _ = yield self.request("PUT", "/v1/conferences/c1", token=PROVIDER_TOKEN)
        self.assertEqual(code, 405)
        code, _ = yield self.request("GET", "/nothing")
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_deeply_nested_json_is_400_and_the_md_keeps_serving(self):
        # An unauthenticated endpoint posts 30000 nested arrays/objects to the join route.
        yield self.create()
        for raw in (b"[" * 30000, b'{"a":' * 12000):  # within the MD's body limit
            code, body = yield self.request("POST", "/v1/conferences/c1/participants", raw=raw)
            self.assertEqual((code, body["type"]), (400, "urn:perc:problem:malformed-json"))
            self.assertIn("nested deeper than", body["detail"])
            code, body = yield self.request("POST", "/v1/conferences", raw=raw,
                                            token=PROVIDER_TOKEN)
            self.assertEqual((code, body["type"]), (400, "urn:perc:problem:malformed-json"))
        code, _ = yield self.request("GET", "/v1/conferences/c1", token=PROVIDER_TOKEN)
        self.assertEqual(code, 200)

    # -- joins ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_join_without_kd_is_503_and_unknown_conference_404(self):
        code, _ = yield self.join("nope")
        self.assertEqual(code, 404)
        yield self.create()
        code, body = yield self.join()
        self.assertEqual((code, body["type"]), (503, "urn:perc:problem:kd-unavailable"))

    @defer.inlineCallbacks
    def test_join_ok_refused_bad_and_silent(self):
        yield self.create()
        yield self.connect_kd()
        code, body = yield self.join()
        self.assertEqual(code, 201, body)
        request = next(m for m in self.kd.messages if isinstance(m, SignAnswer))
        self.assertEqual(request.offer_sdp, offer())  # verbatim
        draft = sdp.parse(request.answer_sdp)
        self.assertEqual(draft.media[0].fingerprints(),
                         [("sha-256", bytes.fromhex(self.kd_fp.replace(":", "")))])
        self.assertEqual(draft.media[0].candidates(),
                         [f"1 1 udp 2130706431 127.0.0.1 {self.conferences.media_port} typ host"])
        self.assertEqual(body["answer"], self.kd.answers[request.association_id])  # verbatim
        self.assertEqual(str(uuid.UUID(bytes=request.association_id)), body["association"])
        self.assertTrue(body["leave_token"])
        code, conf = yield self.request("GET", "/v1/conferences/c1", token=PROVIDER_TOKEN)
        self.assertEqual(conf["kd_connected"], True)
        self.assertEqual([(p["association"], p["state"]) for p in conf["participants"]],
                         [(body["association"], "checking")])

        self.kd.mode = "refuse"
        code, body = yield self.join()
        self.assertEqual((code, body["type"], body["detail"]),
                         (403, "urn:perc:problem:kd-refused", "alice is not invited"))
        self.kd.mode = "bad"
        code, body = yield self.join()
        self.assertEqual((code, body["detail"]), (400, "no a=identity"))
        self.kd.mode = "silent"
        self.conferences.join_timeout = 0.2
        code, body = yield self.join()
        self.assertEqual((code, body["type"]), (504, "urn:perc:problem:kd-timeout"))
        self.assertEqual(len(self.conferences.participants()), 1)

    @defer.inlineCallbacks
    def test_answer_signed_for_another_conference_adds_no_leg(self):
        """Issue 10 item 3: the MD asks the KD for conference c1 (SignAnswer carries
        it) and adds the leg only if the signed answer is for c1 and this association."""
        yield self.create()
        yield self.connect_kd()
        code, _ = yield self.join()
        self.assertEqual(code, 201)
        request = next(m for m in self.kd.messages if isinstance(m, SignAnswer))
        self.assertEqual(request.conference_id, "c1")
        before = len(self.conferences.participants())
        for mode in ("other-conference", "other-association"):
            self.kd.mode = mode
            self.kd.messages.clear()
            code, body = yield self.join()
            self.assertEqual((code, body["type"]), (502, "urn:perc:problem:kd-failed"), body)
            self.assertEqual(len(self.conferences.participants()), before)
            request = next(m for m in self.kd.messages if isinstance(m, SignAnswer))
            yield self.kd.wait_for(disconnect_of(request.association_id))  # KD told to forget
        self.assertEqual(self.conferences.events["answer_refused"], 2)

    @defer.inlineCallbacks
    def test_browser_offer_data_channel_is_rejected_in_the_draft(self):
        yield self.create()
        yield self.connect_kd()
        code, body = yield self.join(text=browser_offer())
        self.assertEqual(code, 201, body)
        request = next(m for m in self.kd.messages if isinstance(m, SignAnswer))
        draft = sdp.parse(request.answer_sdp)
        self.assertEqual([(m.mid, m.media, m.port != 0) for m in draft.media],
                         [("0", "audio", True), ("1", "video", True),
                          ("2", "application", False)])
        self.assertEqual(draft.bundle, ("0", "1"))
        # nothing the MD can relay: refused before the KD is asked
        code, body = yield self.join(text=browser_offer(media=False))
        self.assertEqual((code, body["type"]), (400, "urn:perc:problem:bad-offer"))
        self.assertIn("no m= section the MD can relay", body["detail"])
        self.assertIn("mid 2 (application UDP/DTLS/SCTP)", body["detail"])
        self.assertEqual(len([m for m in self.kd.messages if isinstance(m, SignAnswer)]), 1)

    @defer.inlineCallbacks
    def test_late_ok_after_timeout_is_disconnected(self):
        yield self.create()
        yield self.connect_kd()
        self.kd.mode = "silent"
        self.conferences.join_timeout = 0.1
        code, _ = yield self.join()
        self.assertEqual(code, 504)
        request = next(m for m in self.kd.messages if isinstance(m, SignAnswer))
        self.kd.peer.send(SignAnswerAck(request.association_id, SIGN_STATUS_OK, "late"))
        yield self.kd.wait_for(disconnect_of(request.association_id))
        self.assertEqual(self.conferences.participants(), [])
        self.assertEqual(self.conferences.events["late_answer"], 1)

    @defer.inlineCallbacks
    def test_bad_offers_are_400(self):
        yield self.create()
        yield self.connect_kd()
        code, body = yield self.join(text="not sdp")
        self.assertEqual((code, body["type"]), (400, "urn:perc:problem:bad-offer"))
        code, _ = yield self.join(text=offer().replace("a=setup:actpass", "a=setup:passive"))
        self.assertEqual(code, 400)
        code, _ = yield self.request("POST", "/v1/conferences/c1/participants", {"offer": 1})
        self.assertEqual(code, 400)
        self.assertEqual([m for m in self.kd.messages if isinstance(m, SignAnswer)], [])

    @defer.inlineCallbacks
    def test_leave_needs_the_leave_token(self):
        yield self.create()
        yield self.connect_kd()
        _, body = yield self.join()
        path = f"/v1/conferences/c1/participants/{body['association']}"
        aid = uuid.UUID(body["association"]).bytes
        code, _ = yield self.request("DELETE", path)
        self.assertEqual(code, 401)
        code, _ = yield self.request("DELETE", path, token="not-the-token")
        self.assertEqual(code, 403)
        code, _ = yield self.request("DELETE", path, token=PROVIDER_TOKEN)
        self.assertEqual(code, 403)
        self.assertEqual(len(self.conferences.participants()), 1)
        code, _ = yield self.request("DELETE", path, token=body["leave_token"])
        self.assertEqual(code, 204)
        yield self.kd.wait_for(disconnect_of(aid))
        self.assertEqual(self.conferences.participants(), [])
        self.assertEqual(self.conferences.plane.legs(), [])

    @defer.inlineCallbacks
    def test_leave_is_idempotent_and_still_needs_the_token_of_a_present_leg(self):
        yield self.create()
        yield self.connect_kd()
        _, first = yield self.join()
        _, second = yield self.join(text=offer("EpU2"))

        def path(body: dict) -> str:
            return f"/v1/conferences/c1/participants/{body['association']}"

        # Leaving twice: the second is a success too, and the KD heard of it once.
        for _ in range(2):
            code, _ = yield self.request("DELETE", path(first), token=first["leave_token"])
            self.assertEqual(code, 204)
        aid = uuid.UUID(first["association"]).bytes
        self.assertEqual(len([m for m in self.kd.messages if disconnect_of(aid)(m)]), 1)
        # Another participant's token still cannot remove a present leg.
        code, _ = yield self.request("DELETE", path(second), token=first["leave_token"])
        self.assertEqual(code, 403)
        self.assertEqual([p.association for p in self.conferences.participants()],
                         [second["association"]])
        # The KD ended it (e.g. after its DTLS close_notify): the endpoint's leave is a success.
        self.kd.peer.send(EndpointDisconnect(uuid.UUID(second["association"]).bytes))
        yield self.eventually(lambda: not self.conferences.participants(), "KD ended it")
        code, _ = yield self.request("DELETE", path(second), token=second["leave_token"])
        self.assertEqual(code, 204)
        # Gone with its conference: a success as well; without a bearer token still 401.
        _, third = yield self.join(text=offer("EpU3"))
        code, _ = yield self.request("DELETE", "/v1/conferences/c1", token=PROVIDER_TOKEN)
        self.assertEqual(code, 204)
        code, _ = yield self.request("DELETE", path(third), token=third["leave_token"])
        self.assertEqual(code, 204)
        code, _ = yield self.request("DELETE", path(third))
        self.assertEqual(code, 401)
        # A path that cannot name a participant is still 404.
        code, _ = yield self.request("DELETE", "/v1/conferences/c1/participants/not-a-uuid",
                                     token=third["leave_token"])
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_every_way_a_participant_ends_leaves_no_state_behind(self):
        """Legs that join, send media and end, each way a leg can end: every table of
        the MD (see md_tables) is back to its size before they joined."""
        yield self.create()
        client = yield self.connect_kd()
        stayer = yield self.media_participant()
        plane = self.conferences.plane
        # Selective forwarding keeps everyone's media from the stayer: the stayer's leg
        # counts a gap per sender SSRC, which must go with the sender.
        plane.should_forward = lambda src, dst, ssrc: dst != stayer.aid
        yield self.send_media(stayer, 0)
        baseline = md_tables(self.md)
        seq = 1

        @defer.inlineCallbacks
        def join_and_talk(cid: str = "c1", kd: PlayKd | None = None, n: int = 3):
            nonlocal seq
            legs = []
            for _ in range(n):
                legs.append((yield self.media_participant(cid, kd)))
            for _ in range(2):
                for talker in (*legs, stayer):
                    yield self.send_media(talker, seq)
                seq += 1
            self.assertNotEqual(md_tables(self.md), baseline)
            return legs

        @defer.inlineCallbacks
        def back_to_baseline(how: str):
            for _ in range(500):
                if md_tables(self.md) == baseline:
                    break
                yield task.deferLater(reactor, 0.01, lambda: None)
            now = md_tables(self.md)
            self.assertEqual({k: now.get(k) for k in now.keys() | baseline.keys()
                              if now.get(k) != baseline.get(k)},
                             {k: baseline.get(k) for k in now.keys() | baseline.keys()
                              if now.get(k) != baseline.get(k)}, how)

        # 1. Leave requests.
        for p in (yield join_and_talk()):
            code, _ = yield self.request(
                "DELETE", f"/v1/conferences/c1/participants/{p.body['association']}",
                token=p.body["leave_token"])
            self.assertEqual(code, 204)
        yield back_to_baseline("after leave requests")
        # 2. EndpointDisconnect from the KD.
        for p in (yield join_and_talk()):
            self.kd.peer.send(EndpointDisconnect(p.aid))
        yield back_to_baseline("after the KD's EndpointDisconnect")
        # 3. Consent (ICE) lapses: no STUN check for longer than [media] consent_timeout.
        legs = yield join_and_talk()
        stayer.sock.write(stayer.endpoint.stun(), self.media_address)
        for p in legs:
            plane.leg(p.aid).last_consent -= 3600.0
        yield back_to_baseline("after consent expiry")
        # 4. The KD sends keys the MD refuses (not DOUBLE): the association is ended.
        for p in (yield join_and_talk()):
            self.kd.peer.send(MediaKeys(p.aid, SRTP_AEAD_AES_128_GCM, b"", os.urandom(16),
                                        os.urandom(16), os.urandom(12), os.urandom(12)))
        yield back_to_baseline("after refused MediaKeys")
        # 5. Tunnel loss: joins waiting on it fail; legs that leave meanwhile are queued
        #    for the KD and delivered when it is back.
        legs = yield join_and_talk()
        self.kd.mode = "silent"
        pending = [self.join(text=offer(f"Pend{i}")) for i in range(3)]
        yield self.eventually(lambda: self.conferences.pending_joins == 3, "joins waiting")
        yield client.stopService()
        for code, _ in (yield defer.gatherResults(pending)):
            self.assertEqual(code, 503)
        for p in legs:
            code, _ = yield self.request(
                "DELETE", f"/v1/conferences/c1/participants/{p.body['association']}",
                token=p.body["leave_token"])
            self.assertEqual(code, 204)
        self.kd = PlayKd(self.kd_cert)
        client = yield self.connect_kd()
        for p in legs:
            yield self.kd.wait_for(disconnect_of(p.aid))
        yield back_to_baseline("after tunnel loss and return")
        # 6. Conference end, its KD's tunnel down: no conference names that KD any more,
        #    so nothing is kept for it either.
        other, other_fp = self.other_kd()
        yield self.create("c2", fp=other_fp)
        kd2 = PlayKd(other)
        client2 = yield self.connect_kd(other, kd2)
        yield join_and_talk("c2", kd2)
        yield client2.stopService()
        yield self.eventually(lambda: self.conferences.kd_tunnels == 1, "KD 2 gone")
        code, _ = yield self.request("DELETE", "/v1/conferences/c2", token=PROVIDER_TOKEN)
        self.assertEqual(code, 204)
        yield back_to_baseline("after the end of a conference")
        # 7. The conference's KD says it has ended (ConferenceEnded, after the KD's
        #    EndpointDisconnects for some of its participants): as DELETE.
        yield self.create("c3")
        legs = yield join_and_talk("c3")
        self.kd.peer.send(EndpointDisconnect(legs[0].aid))
        self.kd.peer.send(ConferenceEnded("c3"))
        yield back_to_baseline("after ConferenceEnded from the conference's KD")
        self.assertEqual(plane.leg(stayer.aid).counters["rtp_out"], 0)  # the hook held

    @defer.inlineCallbacks
    def test_disconnect_reasons_go_only_to_a_kd_that_announced_it_reads_them(self):
        """EndpointDisconnect's private reason byte: none to a KD that did not announce
        it (an RFC 9185 KD would refuse the byte); once it did (on this tunnel): a leave
        over HTTPS (md_leave), consent expiry (consent_timeout), the conference deleted
        (conference_deleted); a new tunnel of that KD starts without."""
        yield self.create()
        client = yield self.connect_kd()

        @defer.inlineCallbacks
        def leave(p: MediaParticipant):
            code, _ = yield self.request(
                "DELETE", f"/v1/conferences/c1/participants/{p.body['association']}",
                token=p.body["leave_token"])
            self.assertEqual(code, 204)
            message = yield self.kd.wait_for(disconnect_of(p.aid))
            return message.reason

        p = yield self.media_participant()
        self.assertIsNone((yield leave(p)))  # no announcement yet: RFC 9185 only
        self.kd.peer.send(EndpointDisconnect(REASONS_ANNOUNCEMENT))
        yield self.eventually(lambda: self.conferences._reasons_read, "announcement read")
        self.assertEqual(self.conferences.events["unknown_association"], 0)
        p = yield self.media_participant()
        self.assertEqual((yield leave(p)), DISCONNECT_LEAVE)
        # consent lapses (no STUN check within [media] consent_timeout)
        stayer = yield self.media_participant()
        lapsing = yield self.media_participant()
        self.conferences.plane.leg(lapsing.aid).last_consent -= 3600.0
        stayer.sock.write(stayer.endpoint.stun(), self.media_address)
        message = yield self.kd.wait_for(disconnect_of(lapsing.aid))
        self.assertEqual(message.reason, DISCONNECT_CONSENT_TIMEOUT)
        # the tunnel goes and comes back: no reasons until the KD announces again
        yield client.stopService()
        yield self.eventually(lambda: self.kd.peer is None, "tunnel down")
        self.assertEqual(self.conferences._reasons_read, {})
        self.kd.messages.clear()
        client = yield self.connect_kd()
        p = yield self.media_participant()
        self.assertIsNone((yield leave(p)))
        self.kd.peer.send(EndpointDisconnect(REASONS_ANNOUNCEMENT))
        yield self.eventually(lambda: self.conferences._reasons_read, "announced again")
        code, _ = yield self.request("DELETE", "/v1/conferences/c1", token=PROVIDER_TOKEN)
        self.assertEqual(code, 204)
        message = yield self.kd.wait_for(disconnect_of(stayer.aid))
        self.assertEqual(message.reason, DISCONNECT_CONFERENCE_DELETED)

    @defer.inlineCallbacks
    def test_delete_conference_disconnects_every_participant(self):
        yield self.create()
        yield self.connect_kd()
        joined = []
        for _ in range(2):
            code, body = yield self.join()
            self.assertEqual(code, 201)
            joined.append(uuid.UUID(body["association"]).bytes)
        code, _ = yield self.request("DELETE", "/v1/conferences/c1")
        self.assertEqual(code, 401)
        code, _ = yield self.request("DELETE", "/v1/conferences/c1", token=PROVIDER_TOKEN)
        self.assertEqual(code, 204)
        for aid in joined:
            yield self.kd.wait_for(disconnect_of(aid))
        self.assertEqual(self.conferences.plane.legs(), [])
        code, _ = yield self.request("GET", "/v1/conferences/c1", token=PROVIDER_TOKEN)
        self.assertEqual(code, 404)
        # No conference names this KD any more: its tunnel is closed.
        yield self.eventually(lambda: self.conferences.kd_tunnels == 0, "KD tunnel closed")

    # -- ConferenceEnded (our 0xF5) from the tunnel ---------------------------------

    def log_events(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    @defer.inlineCallbacks
    def metric(self, name: str) -> Any:
        response = yield treq.get(self.admin + "/metrics", pool=self.pool)
        text = yield response.text()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    @defer.inlineCallbacks
    def test_conference_ended_by_its_kd_is_a_delete(self):
        """The conference's KD sends ConferenceEnded: the conference ends exactly as after
        the provider's DELETE (legs gone, joins in progress 404, GET 404, the KD told of
        every participant it had not disconnected itself)."""
        yield self.create()
        yield self.create("c2")  # the same KD's other conference is untouched
        yield self.connect_kd()
        gone = yield self.media_participant()
        stays = yield self.media_participant()
        other = yield self.media_participant("c2")
        code, body = yield self.join()
        self.assertEqual(code, 201)
        unkeyed = uuid.UUID(body["association"]).bytes
        self.kd.mode = "silent"
        pending = self.join()
        yield self.eventually(lambda: self.conferences.pending_joins == 1, "join waiting")
        # What the KD sends at the end: EndpointDisconnect for what it knew, then the end.
        self.kd.peer.send(EndpointDisconnect(gone.aid))
        self.kd.peer.send(ConferenceEnded("c1"))
        code, problem = yield pending
        self.assertEqual((code, problem["type"]), (404, "urn:perc:problem:not-found"))
        code, _ = yield self.request("GET", "/v1/conferences/c1", token=PROVIDER_TOKEN)
        self.assertEqual(code, 404)
        for aid in (stays.aid, unkeyed):  # as DELETE: the KD hears of each
            yield self.kd.wait_for(disconnect_of(aid))
        # The KD ended that one itself: not told back.
        self.assertEqual([m for m in self.kd.messages if disconnect_of(gone.aid)(m)], [])
        self.assertEqual([leg.leg_id for leg in self.conferences.plane.legs()], [other.aid])
        self.assertEqual([c.conference_id for c in self.conferences.conferences()], ["c2"])
        code, _ = yield self.join()
        self.assertEqual(code, 404)
        yield self.send_media(other, 1)  # c2 still relays
        self.assertEqual(self.conferences.kd_tunnels, 1)  # c2 still names the KD
        # A second ConferenceEnded (the KMF event and a 410 both seen) and one for a
        # conference this MD never had: nothing happens, nothing is counted.
        self.kd.peer.send(ConferenceEnded("c1"))
        self.kd.peer.send(ConferenceEnded("never-here"))
        self.kd.peer.send(ConferenceEnded("c2"))
        yield self.eventually(lambda: self.conferences.conferences() == [], "c2 ended")
        self.assertEqual(self.conferences.plane.legs(), [])
        self.assertEqual(self.conferences.events["end_wrong_kd"], 0)
        self.assertEqual(self.conferences.events["unexpected_message"], 0)
        # The last conference naming the (unpinned) KD is gone: as DELETE, its tunnel too.
        yield self.eventually(lambda: self.conferences.kd_tunnels == 0, "KD tunnel closed")

    @defer.inlineCallbacks
    def test_another_conferences_kd_cannot_end_a_conference(self):
        """The attack: KD 2 (its own certificate, trusted for c2 on this MD) sends
        ConferenceEnded for c1, whose KD is KD 1: ignored, counted, logged once per
        interval; c1 keeps serving.  KD 2 can still end its own c2."""
        other, other_fp = self.other_kd()
        yield self.create()
        yield self.create("c2", fp=other_fp)
        yield self.connect_kd()
        kd2 = PlayKd(other)
        yield self.connect_kd(other, kd2)
        alice = yield self.media_participant()
        bob = yield self.media_participant()
        carol = yield self.media_participant("c2", kd2)
        yield self.send_media(alice, 1)
        events = self.log_events()
        for _ in range(3):
            kd2.peer.send(ConferenceEnded("c1"))
        yield self.eventually(lambda: self.conferences.events["end_wrong_kd"] == 3,
                              "refusals counted")
        code, body = yield self.request("GET", "/v1/conferences/c1", token=PROVIDER_TOKEN)
        self.assertEqual(code, 200)
        self.assertEqual(sorted(p["association"] for p in body["participants"]),
                         sorted(str(uuid.UUID(bytes=p.aid)) for p in (alice, bob)))
        self.assertTrue(all(p["state"] == "keyed" for p in body["participants"]))
        yield self.send_media(alice, 2)
        yield self.send_media(bob, 2)
        self.assertEqual([m for m in self.kd.messages if isinstance(m, EndpointDisconnect)],
                         [])
        self.assertEqual(self.conferences.kd_tunnels, 2)
        logged = [formatEvent(e) for e in events if e.get("log_key") == "md_end_wrong_kd"]
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("ConferenceEnded for conference c1", logged[0])
        self.assertIn(other_fp, logged[0])
        self.assertIn(self.kd_fp, logged[0])
        self.assertEqual((yield self.metric(
            'perc_md_tunnel_events_total{event="end_wrong_kd"}')), 3.0)
        # A KD pinned in [tunnel] kd_fingerprints is not another conference's KD either.
        self.conferences.pinned = frozenset({bytes.fromhex(other_fp.replace(":", ""))})
        kd2.peer.send(ConferenceEnded("c1"))
        yield self.eventually(lambda: self.conferences.events["end_wrong_kd"] == 4,
                              "pinned KD refused")
        self.assertEqual(len(self.conferences.conferences()), 2)
        # KD 2 ends its own conference: that one goes, c1 stays.
        kd2.peer.send(ConferenceEnded("c2"))
        yield self.eventually(lambda: [c.conference_id for c in self.conferences.conferences()]
                              == ["c1"], "c2 ended")
        code, _ = yield self.request("GET", "/v1/conferences/c2", token=PROVIDER_TOKEN)
        self.assertEqual(code, 404)
        self.assertEqual(sorted(leg.leg_id for leg in self.conferences.plane.legs()),
                         sorted((alice.aid, bob.aid)))
        self.assertRaises(KeyError, self.conferences.plane.leg, carol.aid)
        yield self.send_media(alice, 3)

    # -- media ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_keys_dtls_both_ways_consent_expiry_and_metrics(self):
        yield self.create()
        yield self.connect_kd()
        code, body = yield self.join()
        self.assertEqual(code, 201)
        aid = uuid.UUID(body["association"]).bytes
        answer = sdp.parse(body["answer"])
        media = answer.media[0]
        host, port = media.candidates()[0].split(" ")[4:6]
        md = (host, int(port))
        self.assertEqual(md, self.media_address)

        # A real ICE connectivity check from the endpoint's socket.
        sock, collector = self.udp_endpoint()
        waiting = collector.next()
        sock.write(binding_request(media.ice_ufrag, "EpUf", media.ice_pwd), md)
        response = yield waiting
        self.assertEqual(StunMessage.parse(response).message_type, BINDING_SUCCESS)

        # MediaKeys from the KD key the leg.
        keys = MediaKeys(aid, DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM, b"",
                         os.urandom(16), os.urandom(16), os.urandom(12), os.urandom(12))
        self.kd.peer.send(keys)
        leg = self.conferences.plane.leg(aid)
        yield self.eventually(lambda: leg.keyed, "leg keyed")
        _, conf = yield self.request("GET", "/v1/conferences/c1", token=PROVIDER_TOKEN)
        self.assertEqual(conf["participants"][0]["state"], "keyed")

        # DTLS: endpoint -> MD -> tunnel -> KD, and back.
        record = b"\x16\xfe\xfd" + os.urandom(40)
        sock.write(record, md)
        got = yield self.kd.wait_for(lambda m: isinstance(m, TunneledDtls))
        self.assertEqual((got.association_id, got.dtls_message), (aid, record))
        waiting = collector.next()
        self.kd.peer.send(TunneledDtls(aid, b"\x16\xfe\xfdserver-flight"))
        self.assertEqual((yield waiting), b"\x16\xfe\xfdserver-flight")

        # Per-participant counters in /metrics.
        response = yield treq.get(self.admin + "/metrics", pool=self.pool)
        text = (yield response.text())
        labels = f'association="{body["association"]}",conference="c1"'
        for kind, value in (("stun_in", 1), ("dtls_in", 1), ("dtls_out", 1)):
            self.assertIn(f'perc_md_participant_datagrams_total{{{labels},kind="{kind}"}} '
                          f'{value:.1f}', text)
        self.assertIn(f'perc_md_participant_dropped_total{{{labels},reason="srtp_auth"}} 0.0',
                      text)
        self.assertIn("perc_md_conferences 1.0", text)
        self.assertIn("perc_md_participants 1.0", text)
        self.assertIn("perc_md_kd_tunnels 1.0", text)
        self.assertIn('perc_md_plane_dropped_total{reason="unknown_address"}', text)

        # Consent lapses: the KD is told, the participant is gone.
        self.md.media.consent_timeout = 0.0
        yield self.kd.wait_for(disconnect_of(aid))
        _, conf = yield self.request("GET", "/v1/conferences/c1", token=PROVIDER_TOKEN)
        self.assertEqual(conf["participants"], [])

    @defer.inlineCallbacks
    def test_non_double_keys_refused_and_wrong_kd_ignored(self):
        yield self.create()
        yield self.connect_kd()
        _, body = yield self.join()
        aid = uuid.UUID(body["association"]).bytes
        stray = uuid.uuid4().bytes
        self.kd.peer.send(TunneledDtls(stray, b"\x16x"))  # unknown here: disowned
        yield self.kd.wait_for(disconnect_of(stray))
        self.kd.peer.send(MediaKeys(aid, SRTP_AEAD_AES_128_GCM, b"", os.urandom(16),
                                    os.urandom(16), os.urandom(12), os.urandom(12)))
        yield self.kd.wait_for(disconnect_of(aid))
        self.assertEqual(self.conferences.participants(), [])
        self.assertEqual(self.conferences.events["keys_refused"], 1)
        self.assertEqual(self.conferences.events["unknown_association"], 1)

    @defer.inlineCallbacks
    def test_another_conferences_kd_cannot_touch_a_participant(self):
        other = self.pki.issue("kd2", ["kd2.localhost"])
        der = x509.load_pem_x509_certificate(other.certificate.read_bytes()).public_bytes(
            serialization.Encoding.DER)
        yield self.create()
        yield self.create("c2", fp=hashlib.sha256(der).digest().hex(":").upper())
        yield self.connect_kd()
        kd2 = PlayKd(other)
        yield self.connect_kd(other, kd2)
        _, body = yield self.join()
        aid = uuid.UUID(body["association"]).bytes
        kd2.peer.send(MediaKeys(aid, DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM, b"",
                                os.urandom(16), os.urandom(16), os.urandom(12),
                                os.urandom(12)))
        kd2.peer.send(TunneledDtls(aid, b"\x16x"))
        kd2.peer.send(EndpointDisconnect(aid))
        yield self.eventually(lambda: self.conferences.events["wrong_kd"] == 3, "refusals")
        (participant,) = self.conferences.participants()
        self.assertEqual((participant.aid, participant.state), (aid, "checking"))

    @defer.inlineCallbacks
    def test_tunnel_down_keeps_participants_and_fails_pending_joins(self):
        yield self.create()
        client = yield self.connect_kd()
        _, body = yield self.join()
        self.kd.mode = "silent"
        pending = self.join()
        yield self.kd.wait_for(lambda m: isinstance(m, SignAnswer)
                               and m.association_id != uuid.UUID(body["association"]).bytes)
        yield client.stopService()
        code, problem = yield pending
        self.assertEqual((code, problem["type"]), (503, "urn:perc:problem:kd-unavailable"))
        self.assertEqual(len(self.conferences.participants()), 1)
        # Leaving while the KD is away: the disconnect is delivered when it is back.
        code, _ = yield self.request(
            "DELETE", f"/v1/conferences/c1/participants/{body['association']}",
            token=body["leave_token"])
        self.assertEqual(code, 204)
        self.kd = PlayKd(self.kd_cert)
        yield self.connect_kd()
        yield self.kd.wait_for(disconnect_of(uuid.UUID(body["association"]).bytes))

    # -- Associations on every tunnel_up ---------------------------------------------

    def other_kd(self) -> tuple[Any, str]:
        other = self.pki.issue("kd2", ["kd2.localhost"])
        der = x509.load_pem_x509_certificate(other.certificate.read_bytes()).public_bytes(
            serialization.Encoding.DER)
        return other, hashlib.sha256(der).digest().hex(":").upper()

    @defer.inlineCallbacks
    def test_tunnel_up_lists_the_kds_admitted_participants(self):
        other, other_fp = self.other_kd()
        yield self.create()
        yield self.create("c2", fp=other_fp)
        first = yield self.connect_kd()
        # Nobody yet: one empty Associations.
        empty = yield self.kd.wait_for(lambda m: isinstance(m, Associations))
        self.assertEqual(empty, Associations())
        kd2 = PlayKd(other)
        yield self.connect_kd(other, kd2)
        yield kd2.wait_for(lambda m: isinstance(m, Associations))
        joined = []
        for _ in range(3):
            code, body = yield self.join()
            self.assertEqual(code, 201)
            joined.append(body)
        code, c2_body = yield self.join("c2")
        self.assertEqual(code, 201)
        self.kd.mode = "silent"  # a join still waiting for its ack is not admitted
        self.conferences.join_timeout = 0.2
        pending = self.join()
        yield self.kd.wait_for(lambda m: isinstance(m, SignAnswer) and str(
            uuid.UUID(bytes=m.association_id)) not in [b["association"] for b in joined])
        yield first.stopService()
        code, _ = yield pending
        self.assertEqual(code, 503)
        # One leaves while the KD is away: its disconnect comes first, it is not listed.
        gone = joined.pop()
        code, _ = yield self.request(
            "DELETE", f"/v1/conferences/c1/participants/{gone['association']}",
            token=gone["leave_token"])
        self.assertEqual(code, 204)
        self.kd = PlayKd(self.kd_cert)
        yield self.connect_kd()
        message = yield self.kd.wait_for(lambda m: isinstance(m, Associations))
        self.assertIsInstance(self.kd.messages[0], EndpointDisconnect)
        self.assertEqual(self.kd.messages[0].association_id,
                         uuid.UUID(gone["association"]).bytes)
        self.assertEqual(sorted((str(uuid.UUID(bytes=e.association_id)), e.conference_id)
                                for e in message.entries),
                         sorted((b["association"], "c1") for b in joined))
        self.assertEqual(len([m for m in self.kd.messages if isinstance(m, Associations)]), 1)
        # The other conference's KD hears only of its own participant.
        self.assertEqual([m for m in kd2.messages if isinstance(m, Associations)],
                         [Associations()])
        conferences = self.conferences.associations_for(
            bytes.fromhex(other_fp.replace(":", "")))
        self.assertEqual([[(str(uuid.UUID(bytes=e.association_id)), e.conference_id)
                           for e in m.entries] for m in conferences],
                         [[(c2_body["association"], "c2")]])

    def test_conferences_is_the_tunnel_handler(self):
        verifyObject(ITunnelHandler, self.conferences)

    @defer.inlineCallbacks
    def test_many_participants_are_split_over_several_messages(self):
        yield self.create()
        client = yield self.connect_kd()
        results = yield defer.gatherResults(
            [self.conferences.join("c1", offer(f"U{i:03d}")) for i in
             range(MAX_ASSOCIATIONS + 1)], consumeErrors=True)
        yield client.stopService()
        self.kd = PlayKd(self.kd_cert)
        yield self.connect_kd()
        yield self.kd.wait_for(lambda m: isinstance(m, Associations)
                               and len(m.entries) < MAX_ASSOCIATIONS)
        messages = [m for m in self.kd.messages if isinstance(m, Associations)]
        self.assertEqual([len(m.entries) for m in messages], [MAX_ASSOCIATIONS, 1])
        self.assertEqual(sorted(e.association_id for m in messages for e in m.entries),
                         sorted(aid for aid, _, _ in results))

    @defer.inlineCallbacks
    def test_kd_pinned_by_its_conference(self):
        """Until a conference names the KD its tunnel is refused; then it comes up."""
        client = KdTunnelClient(
            reactor, host="127.0.0.1", port=self.md.tunnel.port, name="localhost",
            ca_certificate=self.ca_path, certificate=str(self.kd_cert.certificate),
            private_key=str(self.kd_cert.private_key), handler=self.kd, metrics=None,
            min_delay=0.05, max_delay=0.2)
        client.startService()
        self.addCleanup(client.stopService)
        link = yield client.when_connected()
        yield link.when_lost()
        self.assertIsNone(self.kd.peer)
        self.assertEqual(self.conferences.kd_tunnels, 0)
        yield self.create()
        yield client.when_up()
        yield self.eventually(lambda: self.conferences.kd_tunnels == 1, "MD sees the KD")


class StartupTests(unittest.TestCase):
    def cfg(self, directory: str, **api: Any) -> config.Config:
        return config.validate("md", os.path.join(directory, "md.toml"), {
            "admin": {"bind": "127.0.0.1", "port": 0},
            "api": {"bind": "127.0.0.1", "port": 0,
                    "provider_token_file": os.path.join(directory, "token"), **api},
            "media": {"bind": "127.0.0.1", "port": 0},
            "tunnel": {"bind": "127.0.0.1", "port": 0},
        })

    def test_file_errors_name_the_key(self) -> None:
        directory = os.path.abspath(self.mktemp())
        issued = DevPki(os.path.join(directory, "pki")).issue("md", ["localhost"])
        files = {"certificate": str(issued.certificate), "private_key": str(issued.private_key)}
        error = self.assertRaises(config.ConfigError, md_service,
                                  self.cfg(directory, certificate=f"{directory}/none.crt"),
                                  reactor)
        self.assertEqual((error.key, error.reason),
                         ("api.certificate", f"{directory}/none.crt: file not found"))
        token = os.path.join(directory, "token")
        with open(token, "w") as f:
            f.write("secret\n")
        os.chmod(token, 0o644)
        error = self.assertRaises(config.ConfigError, md_service,
                                  self.cfg(directory, **files), reactor)
        self.assertEqual(error.key, "api.provider_token_file")
        self.assertIn("mode 0644 is too open", error.reason)
        os.chmod(issued.private_key, 0o644)
        os.unlink(token)
        error = self.assertRaises(config.ConfigError, md_service,
                                  self.cfg(directory, **files), reactor)
        self.assertEqual(error.key, "api.private_key")

    def test_advertised_host(self) -> None:
        from perc_daemons.md.service import advertised_host

        self.assertEqual(advertised_host("0.0.0.0", ""), "127.0.0.1")
        self.assertEqual(advertised_host("::", ""), "127.0.0.1")
        self.assertEqual(advertised_host("192.0.2.5", ""), "192.0.2.5")
        self.assertEqual(advertised_host("0.0.0.0", "198.51.100.9"), "198.51.100.9")
