"""What the Media Distributors of a cascade can and cannot do (issue 12), real twistd children.

The chain ``md - md2 - md3`` built as :mod:`tests.e2e.test_cascade` builds it
(``perc-admin conferences create --start --md`` per MD, ``perc-provider links
create`` md -> md2 and md2 -> md3): alice on md, bob on md2 (the middle),
carol on md3, erin joining later at md2.  One stack, the scenarios in order:

1. **A late joiner on another MD cannot decrypt what came before** (RFC 8871
   s5.2, no history by default): alice's packets sent before erin joined,
   exactly as md2 relayed them, re-sealed for erin with her hop-by-hop keys,
   fail at erin for want of a key; what alice sends after the join, erin
   decrypts.
2. **A colluding middle MD decrypts nothing**: md2 holds the hop-by-hop keys
   of its endpoints (their MediaKeys, RFC 9185) and of its links (from its own
   MD-MD DTLS exports, RFC 8871 s4.5.1).  A third link from md2 to a
   :class:`LinkSpy` (a peer MD the provider links md2 to, so the test holds
   that link's keys, as md2 does) receives what md2 sends across a link:
   outer layer removed, alice's and carol's inner layers open with none of
   the hop-by-hop keys and with their own end-to-end keys (the control).
3. **Tampering by the middle MD is caught by receivers** (RFC 8723 s5.3):
   md2, simulated with :class:`~tests.e2e.conference_support.ColludingMd`,
   alters alice's packets for carol on md3 (inner ciphertext, OHB, EKTField,
   header fields not recorded in the OHB); carol's outer layer verifies and
   the inner does not.  Edits recorded in the OHB by two MDs in turn decrypt.
4. **No MD holds an end-to-end or EKT key**: every key the endpoints hold is
   searched for, in every encoding :func:`secret_forms` knows, in every MD's
   log, configuration, provider and admin API answers, in what its endpoints
   sent it and in what crossed the links (outer layer removed); positive
   controls show the search finds what is there.

What the MDs got from the KD is not searched here: with ``--md`` the KMF
gives the KD each MD's own tunnel address, so no tunnel tap sits between
them (:mod:`tests.e2e.test_conference` searches the tunnel of one MD).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import secrets
import struct
from collections.abc import Iterable
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from perc_daemons.demo.stack import sleep
from perc_daemons.protocol.cascade import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    CLIENT,
    CascadeLink,
    LinkUp,
)
from perc_daemons.protocol.double import Relay, parse_ohb
from perc_daemons.protocol.dtls import (
    certificate_fingerprint,
    format_fingerprint,
    generate_certificate,
    parse_fingerprint,
)
from perc_daemons.protocol.errors import ProtocolError
from perc_daemons.protocol.participant import DecryptFailed, MediaReceived
from perc_daemons.protocol.rtp import header_length
from perc_daemons.protocol.srtp import AuthenticationFailed, SrtpContext, libsrtp_session
from tests.e2e.cascade_support import CascadeChainMixin
from tests.e2e.conference_support import (
    ColludingMd,
    RecordingEndpoint,
    StackTestCase,
    assert_undecryptable,
    full_ekt_spi,
    is_rtp,
    leaks,
    rtp_header,
    wait_for,
)
from tests.e2e.test_conference import MIN_DELIVERY

#: The link profiles by the name the provider API gives them (docs/API.md).
LINK_PROFILE_NAMES = {"AEAD_AES_128_GCM": 0x0007, "AEAD_AES_256_GCM": 0x0008}


class LinkSpy(DatagramProtocol):
    """A peer MD at the end of one more cascade link of md2: it opens the link (DTLS
    client) with the product's own :class:`~perc_daemons.protocol.cascade.CascadeLink`
    and records what md2 sends across it.

    What a provider (or whoever holds its token) can set up; the test then holds
    that link's SRTP keys, which md2 holds too (:attr:`keys`), and sees the
    packets as md2 relays them to a link (:meth:`relays`: outer layer removed
    with md2's outbound key for the link).  It sends no media.
    """

    def __init__(self) -> None:
        self.certificate, self._private_key = generate_certificate("link spy")
        self.fingerprint = certificate_fingerprint(self.certificate)
        self.ufrag, self.pwd = secrets.token_hex(4), secrets.token_hex(16)
        self.channel = CHANNEL_MIN + secrets.randbelow(CHANNEL_MAX - CHANNEL_MIN + 1)
        self.link: CascadeLink | None = None
        #: The LinkUp of the association (both directions' keys and salts).
        self.keys: LinkUp | None = None
        #: ``(time, datagram)`` of everything md2 sent (STUN, ChannelData).
        self.raw: list[tuple[float, bytes]] = []
        #: ``(time, SRTP datagram)`` of the media md2 relayed, unframed.
        self.media: list[tuple[float, bytes]] = []
        self.misframed = 0
        #: Media datagrams the link key did not open (replayed, altered).
        self.unopened = 0
        self._seen = 0
        self._opened: list[tuple[float, Relay]] = []
        self._inbound: Any = None
        self._timer: Any = None
        self._udp: Any = None

    def listen(self) -> int:
        self._udp = reactor.listenUDP(0, self, interface="127.0.0.1")
        return self._udp.getHost().port

    def open(self, accepted: dict[str, Any]) -> None:
        """Open the link md2 accepted (its ``POST .../links {"role": "server"}`` answer)."""
        self.link = CascadeLink(
            CLIENT, local_ufrag=self.ufrag, local_pwd=self.pwd,
            remote_ufrag=accepted["ice_ufrag"], remote_pwd=accepted["ice_pwd"],
            certificate=self.certificate, private_key=self._private_key,
            peer_fingerprint=parse_fingerprint(accepted["fingerprint"]),
            profile=LINK_PROFILE_NAMES[accepted["srtp_profile"]], local_channel=self.channel,
            now=reactor.seconds(),
            peer_address=(accepted["media"]["host"], accepted["media"]["port"]))
        self._pump()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        now = reactor.seconds()
        self.raw.append((now, datagram))
        if self.link is None:
            return
        if 64 <= datagram[0] <= 79:  # TURN ChannelData (docs/PROTOCOL.md "Cascade links")
            channel, length = struct.unpack_from("!HH", datagram)
            data = datagram[4:]
            if channel != self.channel or length != len(data):
                self.misframed += 1
                return
            if is_rtp(data):
                self.media.append((now, data))
                return
            if 128 <= data[0] <= 191:
                return  # SRTCP: hop by hop
            self.link.receive(data, tuple(addr), now)
        else:
            self.link.receive(datagram, tuple(addr), now)
        self._pump()

    def _pump(self) -> None:
        link = self.link
        assert link is not None
        now = reactor.seconds()
        while (event := link.next_event()) is not None:
            if isinstance(event, LinkUp):
                self.keys = event
        for data in link.datagrams_to_send(now):
            if data[0] <= 3:  # STUN goes unframed
                self._udp.write(data, link.peer_address)
            elif link.remote_channel is not None:
                self._udp.write(struct.pack("!HH", link.remote_channel, len(data)) + data,
                                link.peer_address)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        when = link.next_timer()
        if when is not None:
            self._timer = reactor.callLater(max(0.0, when - now), self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self.link is not None:
            self.link.handle_timer(reactor.seconds())
            self._pump()

    def relays(self) -> list[tuple[float, Relay]]:
        """Every media packet so far, outer layer removed with md2's outbound link key,
        in arrival order: what md2 had of it in the clear (RFC 8723 s5.2)."""
        assert self.keys is not None, "the link never came up"
        if self._inbound is None:
            self._inbound = libsrtp_session(self.keys.remote_write_key,
                                            self.keys.remote_write_salt, inbound=True)
        for when, datagram in self.media[self._seen:]:
            self._seen += 1
            relay = Relay()
            try:
                relay.open(datagram, self._inbound)
            except ProtocolError:
                self.unopened += 1
                continue
            self._opened.append((when, relay))
        return list(self._opened)

    def close(self) -> defer.Deferred:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.link is not None:
            self.link.close()
            self._pump()
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
        return defer.maybeDeferred(self._udp.stopListening)


def inner_open(relay: Relay, key: bytes, salt: bytes, roc: int) -> bytes | None:
    """The inner (end-to-end) layer of ``relay`` opened with ``key``/``salt`` as a
    receiver does (RFC 8723 s5.3: OHB back into a synthetic header, X bit cleared,
    extensions removed): the payload, or None when the tag does not verify."""
    packet = relay.packet
    h = header_length(packet)
    b0, b1 = packet[0], packet[1]
    header = rtp_header(packet)
    plaintext = packet[h:]
    ohb_length, o_pt, o_seq, o_marker = parse_ohb(plaintext)
    seq = header.sequence if o_seq is None else o_seq
    marker = (b1 >> 7) if o_marker is None else o_marker
    synthetic = (bytes((b0 & 0xEF, (marker << 7) | ((b1 & 0x7F) if o_pt is None else o_pt)))
                 + seq.to_bytes(2, "big") + packet[4:12 + 4 * (b0 & 0x0F)])
    context = SrtpContext(key, salt)
    context.set_roc(header.ssrc, roc)
    try:
        return context.open(header.ssrc, seq, synthetic, plaintext[:len(plaintext) - ohb_length])
    except AuthenticationFailed:
        return None
    finally:
        context.close()


def rocs(endpoint: RecordingEndpoint) -> dict[tuple[int, int], int]:
    """``(sequence, timestamp) -> ROC`` of every RTP datagram ``endpoint`` sent."""
    out, roc, previous = {}, 0, None
    for datagram in endpoint.rtp_sent():
        header = rtp_header(datagram)
        if previous is not None and previous - header.sequence > 0x8000:
            roc += 1
        previous = header.sequence
        out[(header.sequence, header.timestamp)] = roc
    return out


def key_pairs(material: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    """Every (16 or 32-byte key, 12-byte salt) pairing of ``material``."""
    values = list(dict.fromkeys(material))
    return [(k, s) for k in values if len(k) in (16, 32) for s in values if len(s) == 12]


class CascadeAttackTests(CascadeChainMixin, StackTestCase):
    timeout = 120

    async def spy_on(self, md: str) -> LinkSpy:
        """A :class:`LinkSpy` linked to ``md`` through the provider API (``md`` accepts)."""
        stack, base = self.stack, self.stack.md_api_url(md) + f"/v1/conferences/{self.conference}"
        spy = LinkSpy()
        spy.listen()
        self.addCleanup(spy.close)
        status, accepted = await stack.request(
            "POST", base + "/links", token=stack.provider_token,
            body={"role": "server", "peer_fingerprint": format_fingerprint(spy.fingerprint)})
        self.assertEqual(status, 201, accepted)
        spy.open(accepted)
        status, body = await stack.request(
            "PATCH", base + f"/links/{accepted['id']}", token=stack.provider_token,
            body={"peer_ice_ufrag": spy.ufrag, "peer_ice_pwd": spy.pwd})
        self.assertEqual(status, 200, body)
        await wait_for(lambda: spy.keys is not None, f"the spy's link to {md} is up")
        self.assertEqual(spy.link.peer_address, ("127.0.0.1", stack.md_ports[md].media))
        return spy

    async def test_what_cascaded_mds_cannot_do(self) -> None:
        """The four scenarios of the module docstring, in order, on one chain."""
        stack, cid = self.stack, self.conference
        started = reactor.seconds()
        figures: dict[str, Any] = {}
        await self.create_chain(("alice", "bob", "carol", "erin"))
        spy = await self.spy_on("md2")
        expected = {"md": 1, "md2": 3, "md3": 1}
        states: dict[str, list[str]] = {}

        async def all_up() -> bool:
            for md in stack.md_names:
                states[md] = [link["state"] for link in await self.links(md)]
            return all(states[md] == ["up"] * n for md, n in expected.items())

        deadline = reactor.seconds() + 20
        while not await all_up():
            self.assertLess(reactor.seconds(), deadline, f"links not up: {states}")
            await sleep(reactor, 0.1)

        eps: dict[str, RecordingEndpoint] = {}
        for user, md in (("alice", "md"), ("bob", "md2"), ("carol", "md3")):
            eps.update(await self.join(user, md=md))
        await self.same_epoch(*eps.values())
        alice, bob, carol = eps["alice"], eps["bob"], eps["carol"]

        # --- 1. a late joiner at md2 cannot decrypt what came before ---------------------
        await defer.gatherResults([ep.run_media(1.0) for ep in eps.values()],
                                  consumeErrors=True)
        early = alice.rtp_sent()
        await wait_for(lambda: len({e.sequence for e in carol.received(alice.ssrc)})
                       >= MIN_DELIVERY * len(early)
                       and len(alice.received(carol.ssrc)) >= MIN_DELIVERY * len(
                           carol.rtp_sent()), "alice and carol talk across both links")
        await sleep(reactor, 0.3)  # whatever is still in flight
        self.assertGreater(len(early), 30)
        early_spis = {full_ekt_spi(d) for d in early} - {None}
        self.assertTrue(early_spis, "no FullEKTField among alice's early packets")
        joined_at = reactor.seconds()
        erin = (await self.join("erin", md="md2"))["erin"]
        eps["erin"] = erin
        await self.same_epoch(*eps.values())
        self.assertFalse(early_spis & set(erin.epochs_installed),
                         "erin was given an epoch in use before she joined")
        self.assertFalse(early_spis & set(erin.session.epochs_seen))
        # what md2 relayed of alice's early packets is exactly what she sent, less the
        # outer layer: md2 could have kept every one of them
        colluding = ColludingMd(endpoints=eps.values())
        own = {rtp_header(d).sequence: colluding.open(alice.joined.association, d)
               for d in early}
        relayed = [r for t, r in spy.relays()
                   if t < joined_at and rtp_header(r.packet).ssrc == alice.ssrc]
        self.assertGreaterEqual(len(relayed), MIN_DELIVERY * len(early))
        for relay in relayed:
            mine = own[rtp_header(relay.packet).sequence]
            self.assertEqual((relay.packet, relay.ekt_field), (mine.packet, mine.ekt_field),
                             "md2 relayed more than the outer layer changed")
        resealed = [colluding.seal(own[rtp_header(d).sequence], erin.joined.association)
                    for d in early]
        assert_undecryptable(self, erin, resealed, alice,
                             "erin decrypted alice's media from before she joined")
        figures["late joiner: alice's earlier packets re-sealed, decrypted"] = (
            len(resealed), 0)
        # what everyone sends after the join, erin decrypts, but for each sender's first
        # 250 ms: the old-key hold after announcing its new key (RFC 8870 s4.3.1)
        media_at = reactor.seconds()
        await defer.gatherResults([ep.run_media(1.5) for ep in eps.values()],
                                  consumeErrors=True)
        held = media_at + 0.5  # the hold, from each sender's first packet, and jitter

        def short() -> dict[str, tuple[int, int]]:
            out = {}
            for ep in eps.values():
                for other in eps.values():
                    sent = {rtp_header(d).sequence for d in other.rtp_sent(after=held)}
                    got = {e.sequence for e in ep.received(other.ssrc)} & sent
                    if other is not ep and len(got) < MIN_DELIVERY * len(sent):
                        out[f"{ep.label} from {other.label}"] = (len(got), len(sent))
            return out

        try:
            await wait_for(lambda: not short(), "everyone, erin included, decrypts "
                                                "everyone after the join")
        except AssertionError as e:
            raise AssertionError(f"{e}: (decrypted, sent) {short()}") from None
        await sleep(reactor, 0.3)  # whatever is still in flight
        later = {rtp_header(d).sequence for d in alice.rtp_sent(after=media_at)}
        self.assertGreater(len(later), 50)
        got = {e.sequence for e in erin.received(alice.ssrc)}
        self.assertLessEqual(got, later, "erin decrypted something alice sent before")
        for ep in (alice, bob, carol):
            self.assertEqual(ep.decrypt_failures(since=media_at), [], ep.label)
        for ep in eps.values():
            self.assertEqual(ep.unattributed_decrypt_failures, 0, ep.label)
        during = erin.decrypt_failures(since=media_at)
        self.assertLessEqual({(e.ssrc, e.reason) for e in during},
                             {(ep.ssrc, "e2e_key_held_back") for ep in (alice, bob, carol)})
        for ep in (alice, bob, carol):
            held_back = sum(1 for e in during if e.ssrc == ep.ssrc)
            self.assertLessEqual(held_back, 25, f"erin: {ep.label}'s held-back packets")
        figures["late joiner: alice's later packets decrypted, sent, held back"] = (
            len(got), len(later), sum(1 for e in during if e.ssrc == alice.ssrc))

        # --- 2. md2, colluding, decrypts nothing -------------------------------------------
        # Every hop-by-hop key and salt md2 holds or could hold: its endpoints' MediaKeys,
        # the spy link's keys; and, beyond md2's reach, md's and md3's endpoints' too.
        hop: dict[str, list[bytes]] = {}
        for user, ep in eps.items():
            keys = ep.media_keys
            self.assertIsNotNone(keys, user)
            hop[f"{user}'s MediaKeys"] = [keys.client_write_key, keys.client_write_salt,
                                          keys.server_write_key, keys.server_write_salt]
        assert spy.keys is not None
        hop["md2's link to the spy"] = [spy.keys.local_write_key, spy.keys.local_write_salt,
                                        spy.keys.remote_write_key, spy.keys.remote_write_salt]
        hop_values = [v for values in hop.values() for v in values]
        self.assertEqual(len(set(hop_values)), len(hop_values), "two hop keys are equal")
        audit = {user: list(ep.session.audit_secrets()) for user, ep in eps.items()}
        self.assertFalse(set(hop_values) & {s for a in audit.values() for s in a},
                         "a hop-by-hop key is an end-to-end or EKT key")
        hop_pairs = key_pairs(hop_values)
        self.assertEqual(len(hop_pairs), 10 * 10)
        relays = spy.relays()
        self.assertEqual((spy.misframed, spy.unopened), (0, 0))
        attempts = 0
        for sender in (alice, carol):
            mine = [r for _, r in relays if rtp_header(r.packet).ssrc == sender.ssrc]
            self.assertGreaterEqual(len(mine), MIN_DELIVERY * len(sender.rtp_sent()),
                                    f"the spy got too little of {sender.label}")
            roc_of = rocs(sender)
            payloads = sender.sent_payloads(sender.source)
            own_pairs = key_pairs(audit[sender.label])
            for relay in mine:
                header = rtp_header(relay.packet)
                roc = roc_of[(header.sequence, header.timestamp)]
                for key, salt in hop_pairs:
                    attempts += 1
                    self.assertIsNone(inner_open(relay, key, salt, roc),
                                      f"{sender.label}'s inner layer opened with a hop key")
                # control: the sender's own end-to-end key opens it, to the payload sent
                opened = [p for p in (inner_open(relay, k, s, roc) for k, s in own_pairs)
                          if p is not None]
                self.assertEqual(opened, [payloads[(header.ssrc, header.sequence)]],
                                 f"{sender.label}'s #{header.sequence}: own key")
        figures["md2: inner openings tried with hop keys, opened"] = (attempts, 0)
        # nothing md2 sees in the clear of the media, nor what its endpoints send it,
        # holds a key
        secrets_held = [(f"{user}'s secret #{i}", secret) for user, a in audit.items()
                        for i, secret in enumerate(a)]
        clear = b"".join(r.packet + r.ekt_field for _, r in relays)
        md2_inputs = [("media md2 relays to a link, outer layer removed", clear),
                      ("what md2 sends to a link (STUN, DTLS, SRTP)",
                       b"".join(d for _, d in spy.raw))]
        md2_inputs += [(f"datagrams {ep.label} sent md2", b"".join(d for _, d in ep.sent))
                       for ep in (bob, erin)]
        self.assertEqual(leaks(secrets_held, md2_inputs), [])
        # positive control: alice's inner tag (under her outer layer when she sends it)
        tag = own[rtp_header(relayed[0].packet).sequence].packet[-17:-1]
        self.assertTrue(leaks([("alice's inner tag", tag)], md2_inputs[:1]))
        self.assertFalse(leaks([("alice's inner tag", tag)],
                               [("alice's datagrams", b"".join(alice.rtp_sent()))]))

        # --- 3. md2 tampering with alice's packets is caught by carol on md3 ---------------
        colluding = ColludingMd(endpoints=eps.values())
        from_alice, to_carol = alice.joined.association, carol.joined.association
        for datagram in alice.rtp_sent():  # in order: the outer ROC
            colluding.open(from_alice, datagram)

        def fresh(keyframe: bool = False) -> tuple[bytes, bytes]:
            payload = os.urandom(160)
            return payload, alice.session.send_media(payload, timestamp=0x2000, marker=False,
                                                     keyframe=keyframe, now=reactor.seconds())

        # md2 renumbers alice's SEQ for carol, 1000 past what carol has seen.  Carol's
        # outer receiver counts SEQ wraps (the ROC, RFC 3711 s3.3.1) from alice's first
        # packet; the colluding sender must too: it seals throw-away packets along the
        # way (steps under 2^15) so its ROC is carol's wherever alice's SEQ started.
        seqs = [rtp_header(d).sequence for d in alice.rtp_sent()]
        index = seqs[0]
        for previous, current in itertools.pairwise(seqs):
            step = (current - previous) & 0xFFFF
            index += step - 0x10000 if step >= 0x8000 else step
        target = index + 1000
        for point in [*range(seqs[0], target, 0x4000), target]:
            relay = colluding.open(from_alice, fresh()[1])
            relay.edit(seq=point & 0xFFFF)
            colluding.seal(relay, to_carol)
        outer_seq = [target & 0xFFFF]

        def next_seq() -> int:
            outer_seq[0] = (outer_seq[0] + 1) & 0xFFFF
            return outer_seq[0]

        def flip_inner(relay: Relay) -> None:
            packet = bytearray(relay.packet)
            packet[header_length(packet) + 5] ^= 0x10
            relay.packet = bytes(packet)

        def flip_inner_tag(relay: Relay) -> None:
            packet = bytearray(relay.packet)
            packet[-2 - 2 * (packet[-1] & 1)] ^= 0x01  # the tag's last byte, before the OHB
            relay.packet = bytes(packet)

        def corrupt_ohb_seq(relay: Relay) -> None:
            packet = bytearray(relay.packet)
            self.assertEqual(packet[-1] & 0x01, 0x01, "SEQ not recorded in the OHB")
            packet[-2] ^= 0x01
            relay.packet = bytes(packet)

        def seq_unrecorded(relay: Relay) -> None:
            packet = bytearray(relay.packet)  # the new SEQ stays, the OHB is emptied
            self.assertEqual(packet[-1], 0x01)
            relay.packet = bytes(packet[:-3] + b"\x00")

        def pt_unrecorded(relay: Relay) -> None:
            packet = bytearray(relay.packet)
            packet[1] = (packet[1] & 0x80) | ((packet[1] + 1) & 0x7F)
            relay.packet = bytes(packet)

        def marker_unrecorded(relay: Relay) -> None:
            packet = bytearray(relay.packet)
            packet[1] ^= 0x80
            relay.packet = bytes(packet)

        def timestamp_changed(relay: Relay) -> None:
            packet = bytearray(relay.packet)  # the OHB has no place for it
            packet[7] ^= 0x01
            relay.packet = bytes(packet)

        def flip_ekt(relay: Relay) -> None:
            field = bytearray(relay.ekt_field)
            self.assertEqual(field[-1], 0x02, "not a FullEKTField")
            field[0] ^= 0x01
            relay.ekt_field = bytes(field)

        def two_mds_edit(relay: Relay) -> None:
            # md3 renumbers again and changes PT: the OHB keeps md2's recorded original
            # SEQ (the sender's) and gains the original PT (RFC 8723 s5.2 step 3)
            relay.edit(seq=(rtp_header(relay.packet).sequence + 7) & 0xFFFF,
                       pt=(rtp_header(relay.packet).payload_type + 1) & 0x7F)

        def deliver(datagram: bytes, tamper: Any = None) -> list[Any]:
            return carol.inject([colluding.forward(datagram, from_alice, to_carol,
                                                   seq=next_seq(), tamper=tamper)])

        def control(what: str, keyframe: bool = False, edit: Any = None) -> None:
            payload, datagram = fresh(keyframe)
            original = rtp_header(datagram)
            events = deliver(datagram, edit)
            self.assertEqual(len(events), 1, f"{what}: {events}")
            event = events[0]
            self.assertIsInstance(event, MediaReceived, f"{what}: {events}")
            self.assertEqual((event.ssrc, event.sequence, event.payload_type, event.payload),
                             (alice.ssrc, original.sequence, original.payload_type, payload),
                             what)

        control("SEQ renumbered by md2, recorded in the OHB")
        cases = [("inner ciphertext bit", False, flip_inner, {"e2e_auth"}),
                 ("inner tag bit", False, flip_inner_tag, {"e2e_auth"}),
                 ("OHB original SEQ", False, corrupt_ohb_seq, {"e2e_auth"}),
                 ("SEQ rewritten, not recorded in the OHB", False, seq_unrecorded,
                  {"e2e_auth"}),
                 ("PT changed, not recorded in the OHB", False, pt_unrecorded, {"e2e_auth"}),
                 ("marker flipped, not recorded in the OHB", False, marker_unrecorded,
                  {"e2e_auth"}),
                 ("timestamp changed", False, timestamp_changed, {"e2e_auth"}),
                 ("EKTField bit", True, flip_ekt, {"ekt_unwrap_failed"})]
        for what, keyframe, tamper, expected_reasons in cases:
            _, datagram = fresh(keyframe)
            events = deliver(datagram, tamper)
            self.assertEqual(len(events), 1, f"{what}: {events}")
            event = events[0]
            self.assertIsInstance(event, DecryptFailed, f"{what}: {events}")
            self.assertEqual(event.ssrc, alice.ssrc,
                             f"{what}: not attributed to alice (the outer layer failed)")
            self.assertIn(event.reason, expected_reasons, what)
        control("SEQ and PT edited by md2 then md3, recorded", keyframe=True,
                edit=two_mds_edit)
        self.assertEqual(carol.unattributed_decrypt_failures, 0)
        figures["tampering cases caught at carol"] = len(cases)

        # --- 4. no MD holds an end-to-end or EKT key ------------------------------------------
        audit = {user: list(ep.session.audit_secrets()) for user, ep in eps.items()}
        secrets_held = [(f"{user}'s secret #{i}", secret) for user, a in audit.items()
                        for i, secret in enumerate(a)]
        for user, ep in eps.items():  # her newest EKTKey and her own inner keys among them
            self.assertIn(ep.session._ekt_params[ep.current_spi].key, audit[user], user)
            self.assertGreaterEqual(len(audit[user]), 6, user)
        places = {"md": [alice], "md2": [bob, erin], "md3": [carol]}
        neighbours = {"md": ["md2"], "md2": ["md", "md3"], "md3": ["md2"]}
        fingerprints: dict[str, bytes] = {}
        answers: dict[str, list[tuple[str, bytes]]] = {}
        for name in stack.md_names:
            found = []
            api = stack.md_api_url(name)
            for path in ("/v1/md", f"/v1/conferences/{cid}", f"/v1/conferences/{cid}/links"):
                status, body = await stack.request("GET", api + path,
                                                   token=stack.provider_token)
                self.assertEqual(status, 200, (name, path, body))
                found.append((f"{name}'s GET {path}", json.dumps(body).encode()))
                if path == "/v1/md":
                    fingerprints[name] = parse_fingerprint(body["fingerprint"])
            response = await treq.get(f"http://127.0.0.1:{stack.admin_port(name)}/metrics",
                                      pool=stack.pool)
            self.assertEqual(response.code, 200)
            found.append((f"{name}'s /metrics", await treq.content(response)))
            answers[name] = found
        searched = 0
        for name in stack.md_names:
            output = bytes(stack.children[name].output)
            with open(stack.configs[name], "rb") as f:
                config = f.read()
            haystacks = [(f"{name}'s log output", output), (f"{name}'s configuration", config),
                         *answers[name], *md2_inputs[:1]]
            rundir = os.path.join(stack.dir, f"run-{name}")
            for entry in os.listdir(rundir):
                path = os.path.join(rundir, entry)
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        haystacks.append((f"run-{name}/{entry}", f.read()))
            for ep in places[name]:
                haystacks.append((f"datagrams {ep.label} sent {name}",
                                  b"".join(d for _, d in ep.sent)))
                haystacks += [(f"{ep.label}'s offer to {name}", o.encode()) for o in ep.offers]
            self.assertEqual(leaks(secrets_held, haystacks), [], name)
            searched += sum(len(h) for _, h in haystacks)
            # positive controls: the same search finds what is there, in each kind of place
            self.assertIn(b"perc-md", output)
            for peer in neighbours[name]:
                self.assertTrue(leaks([(f"{peer}'s fingerprint", fingerprints[peer])],
                                      haystacks[:1]), f"{name}'s log names no link to {peer}")
            self.assertTrue(leaks([(f"{name}'s fingerprint", fingerprints[name])],
                                  answers[name][:1]))
            for ep in places[name]:
                ssrc = ep.ssrc.to_bytes(4, "big")
                self.assertTrue(leaks([(f"{ep.label}'s SSRC", ssrc)],
                                      [h for h in haystacks if h[0].startswith("datagrams")]))
                dtls = certificate_fingerprint(ep._certificate[0])
                self.assertTrue(leaks([(f"{ep.label}'s DTLS fingerprint", dtls)],
                                      [h for h in haystacks if "offer" in h[0]]))
            # ... and a key written into a log in any encoding, at any place
            label, secret = secrets_held[0]
            for text in (secret.hex(), secret.hex().upper(),
                         json.dumps({"k": base64.b64encode(secret).decode()})):
                self.assertTrue(leaks([(label, secret)],
                                      [("a leaking log", output + text.encode())]))
        self.assertTrue(leaks([("spy link key", spy.keys.remote_write_key)],
                              [("a synthetic leak", b"x" + spy.keys.remote_write_key.hex()
                                .encode())]))
        figures["secrets searched, bytes searched"] = (len(secrets_held), searched)
        figures["elapsed"] = round(reactor.seconds() - started, 1)
        Logger().info("cascade attack figures: {figures}", figures=figures)
