"""KeyDistributorCore against real DtlsConnection clients over an in-memory tunnel."""

from __future__ import annotations

import os
import uuid

from twisted.trial import unittest

from perc_daemons.kd.associations import (
    DEFAULT_EXPECT_TIMEOUT,
    KeyDistributorCore,
    NoCurrentEpoch,
    ReusedSpi,
    StaleEpoch,
)
from perc_daemons.protocol.double import split_keying_material
from perc_daemons.protocol.dtls import (
    ConnectionClosed,
    DtlsConfiguration,
    DtlsConnection,
    EktKeyReceived,
    HandshakeComplete,
    Role,
    certificate_fingerprint,
    generate_certificate,
)
from perc_daemons.protocol.ekt import EktCipher, EktParameterSet
from perc_daemons.protocol.srtp import Profile
from perc_daemons.protocol.tunnel import EndpointDisconnect, MediaKeys, TunneledDtls

KD_CERT, KD_KEY = generate_certificate("key-distributor")
KD_FP = certificate_fingerprint(KD_CERT)
CERTS = {name: generate_certificate(name) for name in ("alice", "bob", "carol", "mallory")}
P128 = Profile.DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM
CONF = "conf-1"


class KeySource:
    """What the KMF would hand out: a fresh key per epoch, SPI 100 + epoch."""

    def __init__(self) -> None:
        self.issued: dict[tuple[str, int], EktParameterSet] = {}

    def __call__(self, conference_id: str, epoch: int) -> EktParameterSet:
        params = EktParameterSet(key=os.urandom(16), cipher=EktCipher.AESKW_128,
                                 master_salt=os.urandom(12), spi=100 + epoch, ttl=3600)
        self.issued[(conference_id, epoch)] = params
        return params


class Endpoint:
    def __init__(self, name: str, *, cert_name: str | None = None,
                 kd_tls_id: bytes | None = None, srtp_profiles: list[int] | None = None,
                 ekt_ciphers: list[int] | None = None) -> None:
        cert, key = CERTS[cert_name or name]
        self.name = name
        self.aid = uuid.uuid4().bytes
        self.tls_id = name.encode().ljust(20, b"-") + os.urandom(4)
        #: what the KD's answer for this association carries (RFC 8842 s5.3)
        self.kd_tls_id = kd_tls_id or b"KD-" + os.urandom(12).hex().encode()
        self.fingerprint = certificate_fingerprint(CERTS[name][0])
        self.conn = DtlsConnection(Role.CLIENT, DtlsConfiguration(
            cert, key, srtp_profiles=srtp_profiles or [P128],
            ekt_ciphers=[EktCipher.AESKW_128] if ekt_ciphers is None else ekt_ciphers,
            expected_peer_fingerprint=KD_FP, external_session_id=self.tls_id,
            expected_peer_external_session_id=self.kd_tls_id))
        self.events: list[object] = []

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


class Harness:
    def __init__(self) -> None:
        self.now = 0.0
        self.keys = KeySource()
        self.kd = KeyDistributorCore(KD_CERT, KD_KEY, b"c" * 32)
        self.endpoints: dict[bytes, Endpoint] = {}
        self.to_md: list[object] = []
        self.drop_to_endpoint = False

    def new_epoch(self, conference: str = CONF) -> EktParameterSet:
        """What the KD service does for a due conference: next epoch in, outputs out."""
        epoch = self.kd.epoch(conference) + 1
        params = self.keys(conference, epoch)
        self.deliver(self.kd.install_epoch(conference, epoch, params, self.now))
        self.run()
        return params

    def rekey_due(self) -> None:
        for conference in self.kd.take_rekeys():
            self.new_epoch(conference)

    def expect(self, ep: Endpoint, conference: str = CONF) -> None:
        if self.kd.epoch(conference) == 0:
            self.new_epoch(conference)
        self.kd.expect(ep.aid, conference, ep.name, ep.fingerprint, ep.tls_id,
                       ssrcs=[0x1000 + len(self.endpoints)], kd_tls_id=ep.kd_tls_id)

    def join(self, ep: Endpoint) -> None:
        self.endpoints[ep.aid] = ep
        ep.conn.connect(self.now)
        self.run()

    def deliver(self, messages: list) -> None:
        """KD -> MD; TunneledDtls goes on to its endpoint."""
        for m in messages:
            self.to_md.append(m)
            if isinstance(m, TunneledDtls) and not self.drop_to_endpoint:
                ep = self.endpoints.get(m.association_id)
                if ep is not None:
                    ep.conn.receive_datagram(m.dtls_message, self.now)

    def run(self, steps: int = 200, *, grant: bool = True) -> None:
        """Until quiet; with ``grant``, waiting joiners get the current key, as the
        service does once their invitations are re-checked."""
        for _ in range(steps):
            busy = False
            for ep in list(self.endpoints.values()):
                while (e := ep.conn.next_event()) is not None:
                    ep.events.append(e)
                for d in ep.conn.datagrams_to_send(self.now):
                    busy = True
                    self.deliver(self.kd.tunneled_dtls(ep.aid, d, self.now))
            if grant:
                for conference in self.kd.take_grants():
                    busy = True
                    self.deliver(self.kd.grant(conference, self.now))
            if not busy:
                return
        raise AssertionError("no quiescence")

    def md(self, kind: type, aid: bytes | None = None) -> list:
        return [m for m in self.to_md if isinstance(m, kind)
                and (aid is None or m.association_id == aid)]


class TestJoin(unittest.TestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.alice, self.bob = Endpoint("alice"), Endpoint("bob")
        for ep in (self.alice, self.bob):
            self.h.expect(ep)
            self.h.join(ep)

    def test_both_get_profile_and_epoch_one_key(self) -> None:
        epoch1 = self.h.keys.issued[(CONF, 1)]
        for ep in (self.alice, self.bob):
            [done] = ep.of(HandshakeComplete)
            self.assertEqual(done.srtp_profile, 0x0009)
            self.assertEqual([e.params for e in ep.of(EktKeyReceived)], [epoch1])
        self.assertEqual(self.h.kd.members(CONF),
                         [("alice", self.alice.aid), ("bob", self.bob.aid)])
        self.assertEqual(self.h.kd.epoch(CONF), 1)
        self.assertEqual(self.h.kd.acknowledged_spis(self.alice.aid), [epoch1.spi])
        self.assertEqual(self.h.md(EndpointDisconnect), [])

    def test_media_keys_are_the_outer_halves_only(self) -> None:
        for ep in (self.alice, self.bob):
            [done] = ep.of(HandshakeComplete)
            split = split_keying_material(P128, done.keying_material)
            [mk] = self.h.md(MediaKeys, ep.aid)
            self.assertEqual(mk.protection_profile, 0x0009)
            self.assertEqual((mk.client_write_key, mk.client_write_salt),
                             (split.client_outer.key, split.client_outer.salt))
            self.assertEqual((mk.server_write_key, mk.server_write_salt),
                             (split.server_outer.key, split.server_outer.salt))
            wire = mk.encode()
            for inner in (split.client_inner, split.server_inner):
                self.assertNotIn(inner.key, wire)
                self.assertNotIn(inner.salt, wire)

    def test_roster_and_updates(self) -> None:
        self.assertEqual(self.h.kd.roster(CONF), [("alice", [0x1000]), ("bob", [0x1001])])
        self.assertEqual(self.h.kd.take_roster_updates(), [CONF])
        self.assertEqual(self.h.kd.take_roster_updates(), [])
        self.assertEqual(self.h.kd.take_rekeys(), [])  # joins do not rekey by default
        self.assertEqual((self.h.kd.association_count(), self.h.kd.member_count()), (2, 2))
        self.assertEqual(self.h.kd.conference_of(self.bob.aid), CONF)

    def test_unused_expectation_expires(self) -> None:
        carol = Endpoint("carol")
        self.h.kd.expect(carol.aid, CONF, "carol", carol.fingerprint, carol.tls_id,
                         kd_tls_id=carol.kd_tls_id,
                         now=self.h.now)
        self.assertEqual(self.h.kd.next_timer(), self.h.now + DEFAULT_EXPECT_TIMEOUT)
        self.assertEqual(self.h.kd.handle_timers(self.h.now + DEFAULT_EXPECT_TIMEOUT - 1), [])
        self.assertTrue(self.h.kd.knows(carol.aid))
        self.assertEqual(self.h.kd.handle_timers(self.h.now + DEFAULT_EXPECT_TIMEOUT),
                         [EndpointDisconnect(carol.aid)])
        self.assertFalse(self.h.kd.knows(carol.aid))
        self.assertEqual(self.h.kd.take_rekeys(), [])  # never a member: nothing to rekey
        self.assertIsNone(self.h.kd.next_timer())

    def test_expectation_used_in_time_stays(self) -> None:
        carol = Endpoint("carol")
        self.h.kd.expect(carol.aid, CONF, "carol", carol.fingerprint, carol.tls_id,
                         kd_tls_id=carol.kd_tls_id,
                         now=self.h.now)
        self.h.join(carol)
        self.h.kd.handle_timers(self.h.now + 2 * DEFAULT_EXPECT_TIMEOUT)
        self.assertIn(("carol", carol.aid), self.h.kd.members(CONF))

    def test_roster_lists_an_identity_once_for_all_its_devices(self) -> None:
        second = Endpoint("alice")  # alice again, from another device (association)
        self.h.expect(second)
        self.h.join(second)
        self.assertEqual(self.h.kd.roster(CONF), [("alice", [0x1000, 0x1002]),
                                                  ("bob", [0x1001])])

    def test_leave_rekeys_the_rest(self) -> None:
        self.h.to_md.clear()
        out = self.h.kd.endpoint_disconnect(self.alice.aid, self.h.now)
        self.assertEqual(out, [EndpointDisconnect(self.alice.aid)])  # RFC 9185 s5.4
        self.assertEqual(self.h.kd.endpoint_disconnect(self.alice.aid, self.h.now), [])
        self.h.deliver(out)
        self.h.run()
        self.assertEqual(self.h.kd.roster(CONF), [("bob", [0x1001])])
        self.assertEqual(self.h.kd.epoch(CONF), 1)  # nothing happens until the service acts
        self.assertEqual(self.h.kd.take_rekeys(), [CONF])
        self.assertEqual(self.h.kd.take_rekeys(), [])
        self.h.new_epoch()
        epoch1, epoch2 = self.h.keys.issued[(CONF, 1)], self.h.keys.issued[(CONF, 2)]
        self.assertNotEqual(epoch1.spi, epoch2.spi)
        self.assertEqual([e.params for e in self.bob.of(EktKeyReceived)], [epoch1, epoch2])
        self.assertEqual([e.params for e in self.alice.of(EktKeyReceived)], [epoch1])
        self.assertEqual(self.h.md(TunneledDtls, self.alice.aid), [])
        self.assertEqual(self.h.kd.members(CONF), [("bob", self.bob.aid)])
        self.assertFalse(self.h.kd.knows(self.alice.aid))

    def test_two_leaves_coalesce_into_one_rekey(self) -> None:
        self.h.deliver(self.h.kd.endpoint_disconnect(self.alice.aid, self.h.now))
        self.h.deliver(self.h.kd.endpoint_disconnect(self.bob.aid, self.h.now))
        self.assertEqual(self.h.kd.take_rekeys(), [CONF])
        self.assertEqual(self.h.kd.members(CONF), [])

    def test_late_joiner_gets_current_epoch_only(self) -> None:
        self.h.deliver(self.h.kd.endpoint_disconnect(self.alice.aid, self.h.now))
        self.h.run()
        self.h.rekey_due()
        carol = Endpoint("carol")
        self.h.expect(carol)
        self.h.join(carol)
        self.assertEqual([e.params for e in carol.of(EktKeyReceived)],
                         [self.h.keys.issued[(CONF, 2)]])
        self.assertEqual(self.h.kd.epoch(CONF), 2)

    def test_joiner_during_a_due_rekey_waits_for_the_new_epoch(self) -> None:
        self.h.deliver(self.h.kd.endpoint_disconnect(self.alice.aid, self.h.now))
        carol = Endpoint("carol")
        self.h.expect(carol)
        self.h.join(carol)
        self.assertEqual(len(self.h.md(MediaKeys, carol.aid)), 1)
        self.assertEqual(carol.of(EktKeyReceived), [])  # epoch 1 is known to alice
        self.h.rekey_due()
        self.assertEqual([e.params for e in carol.of(EktKeyReceived)],
                         [self.h.keys.issued[(CONF, 2)]])
        self.assertEqual(self.h.kd.roster(CONF), [("bob", [0x1001]), ("carol", [0x1002])])

    def test_close_notify_from_endpoint_disconnects_and_rekeys(self) -> None:
        self.alice.conn.close()
        self.h.run()
        self.assertEqual(self.h.md(EndpointDisconnect), [EndpointDisconnect(self.alice.aid)])
        self.h.to_md.clear()
        self.h.rekey_due()
        self.assertEqual(self.h.md(TunneledDtls, self.alice.aid), [])
        self.assertEqual([e.params for e in self.alice.of(EktKeyReceived)],
                         [self.h.keys.issued[(CONF, 1)]])
        self.assertEqual(self.bob.of(EktKeyReceived)[-1].params,
                         self.h.keys.issued[(CONF, 2)])

    def test_no_key_before_the_grant(self) -> None:
        """A finished handshake gets MediaKeys, but the EKTKey waits for grant(): the
        service re-checks the invitation first (membership checked where a key leaves)."""
        carol = Endpoint("carol")
        self.h.expect(carol)
        self.h.endpoints[carol.aid] = carol
        carol.conn.connect(self.h.now)
        self.h.run(grant=False)
        self.assertEqual(len(carol.of(HandshakeComplete)), 1)
        self.assertEqual(len(self.h.md(MediaKeys, carol.aid)), 1)
        self.assertEqual(carol.of(EktKeyReceived), [])
        self.assertNotIn(("carol", carol.fingerprint), self.h.kd.admitted(CONF))
        self.assertEqual(self.h.kd.identities(CONF), ["alice", "bob", "carol"])
        self.assertEqual(self.h.kd.take_grants(), [CONF])
        self.assertEqual(self.h.kd.take_grants(), [])
        self.h.deliver(self.h.kd.grant(CONF, self.h.now))
        self.h.run()
        self.assertEqual([e.params for e in carol.of(EktKeyReceived)],
                         [self.h.keys.issued[(CONF, 1)]])
        self.assertIn(("carol", carol.fingerprint), self.h.kd.admitted(CONF))
        self.assertEqual(self.h.kd.grant(CONF, self.h.now), [])  # nobody waits now

    def test_admitted_lists_identity_and_certificate_of_keyed_members(self) -> None:
        self.assertEqual(self.h.kd.admitted(CONF), [("alice", self.alice.fingerprint),
                                                    ("bob", self.bob.fingerprint)])
        self.h.deliver(self.h.kd.endpoint_disconnect(self.alice.aid, self.h.now))
        self.assertEqual(self.h.kd.admitted(CONF), [("bob", self.bob.fingerprint)])

    def test_removed_identity_is_closed_and_gets_no_later_key(self) -> None:
        second = Endpoint("alice")  # alice from a second device
        self.h.expect(second)
        self.h.join(second)
        pending = Endpoint("alice")  # and a third, signed but not connected yet
        self.h.expect(pending)
        self.h.to_md.clear()
        out = self.h.kd.remove_identity(CONF, "alice", self.h.now)
        self.h.deliver(out)
        self.h.run()
        self.assertEqual({m.association_id for m in out if isinstance(m, EndpointDisconnect)},
                         {self.alice.aid, second.aid, pending.aid})
        for ep in (self.alice, second):
            self.assertEqual(len(ep.of(ConnectionClosed)), 1)  # close_notify reached it
            self.assertFalse(self.h.kd.knows(ep.aid))
        self.assertFalse(self.h.kd.knows(pending.aid))
        self.assertEqual(self.h.kd.identities(CONF), ["bob"])
        self.assertEqual(self.h.kd.take_rekeys(), [CONF])  # a keyed member is gone
        self.h.new_epoch()
        epoch2 = self.h.keys.issued[(CONF, 2)]
        self.assertEqual(self.bob.of(EktKeyReceived)[-1].params, epoch2)
        for ep in (self.alice, second):
            self.assertNotIn(epoch2, [e.params for e in ep.of(EktKeyReceived)])
        self.assertEqual(self.h.kd.remove_identity(CONF, "alice", self.h.now), [])

    def test_removing_an_unkeyed_identity_needs_no_rekey(self) -> None:
        carol = Endpoint("carol")
        self.h.expect(carol)
        self.h.endpoints[carol.aid] = carol
        carol.conn.connect(self.h.now)
        self.h.run(grant=False)  # handshake done, key not granted yet
        self.h.deliver(self.h.kd.remove_identity(CONF, "carol", self.h.now))
        self.assertEqual(self.h.kd.take_rekeys(), [])
        self.assertEqual(self.h.kd.grant(CONF, self.h.now), [])
        self.assertEqual(carol.of(EktKeyReceived), [])

    def test_end_conference(self) -> None:
        out = self.h.kd.end_conference(CONF, self.h.now)
        self.h.deliver(out)
        self.h.run()
        self.assertEqual({m.association_id for m in out if isinstance(m, EndpointDisconnect)},
                         {self.alice.aid, self.bob.aid})
        for ep in (self.alice, self.bob):
            self.assertEqual(len(ep.of(ConnectionClosed)), 1)
            self.assertFalse(self.h.kd.knows(ep.aid))
        self.assertEqual(self.h.kd.members(CONF), [])
        self.assertIsNone(self.h.kd.current_params(CONF))

    def test_lost_ekt_key_is_retransmitted_on_timer(self) -> None:
        self.h.drop_to_endpoint = True
        lost = self.h.kd.install_epoch(CONF, 2, self.h.keys(CONF, 2), self.h.now)
        self.h.deliver(lost)
        self.assertEqual(len([m for m in lost if isinstance(m, TunneledDtls)]), 2)
        self.h.drop_to_endpoint = False
        self.h.run()
        epoch2 = self.h.keys.issued[(CONF, 2)]
        self.assertNotIn(epoch2, [e.params for e in self.bob.of(EktKeyReceived)])
        timer = self.h.kd.next_timer()
        self.assertIsNotNone(timer)
        self.assertEqual(self.h.kd.handle_timers(timer - 0.01), [])
        self.h.now = timer
        self.h.deliver(self.h.kd.handle_timers(self.h.now))
        self.h.run()
        for ep in (self.alice, self.bob):
            self.assertEqual(ep.of(EktKeyReceived)[-1].params, epoch2)
            self.assertEqual(self.h.kd.acknowledged_spis(ep.aid)[-1], epoch2.spi)
        self.assertIsNone(self.h.kd.next_timer())


class TestRefusals(unittest.TestCase):
    def assertRefused(self, h: Harness, ep: Endpoint, cause: str | None = None) -> None:
        if cause is not None:  # the reason the KD logs and counts (issue 10 item 15)
            [refusal] = h.kd.take_refusals()
            self.assertEqual((refusal.association_id, refusal.identity, refusal.cause),
                             (ep.aid, ep.name, cause))
            self.assertEqual(h.kd.take_refusals(), [])
        self.assertEqual(ep.of(EktKeyReceived), [])
        self.assertEqual(ep.of(HandshakeComplete), [])
        self.assertEqual(len(ep.of(ConnectionClosed)), 1)
        self.assertIsNotNone(ep.of(ConnectionClosed)[0].alert)
        self.assertEqual(h.md(MediaKeys), [])
        self.assertIn(EndpointDisconnect(ep.aid), h.md(EndpointDisconnect))
        self.assertFalse(h.kd.knows(ep.aid))
        self.assertEqual(h.kd.members(CONF), [])

    def test_wrong_certificate(self) -> None:
        h = Harness()
        ep = Endpoint("alice", cert_name="mallory")
        h.expect(ep)
        h.join(ep)
        self.assertRefused(h, ep, "dtls_wrong_certificate")

    def test_no_double_profile(self) -> None:
        """A WebRTC client without PERC: plain AES-GCM SRTP only (RFC 7714)."""
        h = Harness()
        ep = Endpoint("alice", srtp_profiles=[0x0007])
        h.expect(ep)
        h.join(ep)
        self.assertRefused(h, ep, "dtls_no_srtp_profile")

    def test_no_ekt(self) -> None:
        h = Harness()
        ep = Endpoint("alice", ekt_ciphers=[])
        h.expect(ep)
        h.join(ep)
        self.assertRefused(h, ep, "dtls_no_ekt")

    def test_unused_expectation_is_a_refusal_too(self) -> None:
        h = Harness()
        ep = Endpoint("alice")
        h.expect(ep)
        h.kd.expect(ep.aid, CONF, "alice", ep.fingerprint, ep.tls_id, kd_tls_id=ep.kd_tls_id,
                    now=0.0)
        h.kd.handle_timers(DEFAULT_EXPECT_TIMEOUT)
        [refusal] = h.kd.take_refusals()
        self.assertEqual(refusal.cause, "no_dtls")

    def test_wrong_tls_id(self) -> None:
        h = Harness()
        ep = Endpoint("alice")
        h.new_epoch()
        h.kd.expect(ep.aid, CONF, "alice", ep.fingerprint, b"x" * 20, kd_tls_id=ep.kd_tls_id)
        h.join(ep)
        self.assertRefused(h, ep, "dtls_wrong_tls_id")

    def test_each_association_has_its_own_kd_tls_id(self) -> None:
        """RFC 8842 s5.3 / RFC 8844: the KD's external_session_id is the tls-id of this
        association's answer, so an endpoint bound to another answer is refused."""
        h = Harness()
        alice, bob = Endpoint("alice"), Endpoint("bob")
        for ep in (alice, bob):
            h.expect(ep)
            h.join(ep)
        self.assertNotEqual(alice.kd_tls_id, bob.kd_tls_id)
        for ep in (alice, bob):
            [done] = ep.of(HandshakeComplete)
            self.assertEqual(done.peer_external_session_id, ep.kd_tls_id)
        # carol's DTLS expects the tls-id of bob's answer: the KD's for hers differs
        carol = Endpoint("carol", kd_tls_id=bob.kd_tls_id)
        h.kd.expect(carol.aid, CONF, "carol", carol.fingerprint, carol.tls_id,
                    kd_tls_id=b"KD-for-carol-" + os.urandom(8).hex().encode())
        h.join(carol)
        self.assertEqual(carol.of(HandshakeComplete), [])
        self.assertEqual(carol.of(EktKeyReceived), [])
        self.assertFalse(h.kd.knows(carol.aid))

    def test_unexpected_association(self) -> None:
        h = Harness()
        ep = Endpoint("alice")
        h.join(ep)
        self.assertEqual(h.to_md, [EndpointDisconnect(ep.aid)])
        self.assertFalse(h.kd.knows(ep.aid))
        self.assertIsNone(h.kd.next_timer())
        self.assertEqual(h.kd.epoch(CONF), 0)


class TestRekeyOnJoin(unittest.TestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.h.kd.set_policy(CONF, rekey_on_join=True)
        self.alice = Endpoint("alice")
        self.h.expect(self.alice)
        self.h.join(self.alice)
        self.h.rekey_due()

    def test_joiner_gets_only_the_new_epoch_key(self) -> None:
        epoch1, epoch2 = self.h.keys.issued[(CONF, 1)], self.h.keys.issued[(CONF, 2)]
        self.assertEqual([e.params for e in self.alice.of(EktKeyReceived)], [epoch2])
        bob = Endpoint("bob")
        self.h.expect(bob)
        self.h.join(bob)
        # MediaKeys at once, EKTKey only with the epoch the join starts.
        self.assertEqual(len(self.h.md(MediaKeys, bob.aid)), 1)
        self.assertEqual(bob.of(EktKeyReceived), [])
        self.assertEqual(self.h.kd.members(CONF), [("alice", self.alice.aid)])
        self.assertEqual(self.h.kd.take_rekeys(), [CONF])
        epoch3 = self.h.new_epoch()
        self.assertEqual([e.params for e in bob.of(EktKeyReceived)], [epoch3])
        self.assertEqual([e.params for e in self.alice.of(EktKeyReceived)], [epoch2, epoch3])
        self.assertNotIn(epoch1, [e.params for e in bob.of(EktKeyReceived)])
        self.assertEqual(self.h.kd.members(CONF),
                         [("alice", self.alice.aid), ("bob", bob.aid)])
        self.assertEqual(self.h.kd.roster(CONF), [("alice", [0x1000]), ("bob", [0x1001])])

    def test_joins_coalesce(self) -> None:
        for name in ("bob", "carol"):
            ep = Endpoint(name)
            self.h.expect(ep)
            self.h.join(ep)
        self.assertEqual(self.h.kd.take_rekeys(), [CONF])
        epoch3 = self.h.new_epoch()
        for ep in self.h.endpoints.values():
            self.assertEqual(ep.of(EktKeyReceived)[-1].params, epoch3)

    def test_waiting_joiner_that_leaves_is_never_keyed(self) -> None:
        bob = Endpoint("bob")
        self.h.expect(bob)
        self.h.join(bob)
        self.h.deliver(self.h.kd.endpoint_disconnect(bob.aid, self.h.now))
        self.h.to_md.clear()
        self.h.rekey_due()  # the join's rekey is still due; harmless
        self.assertEqual(bob.of(EktKeyReceived), [])
        self.assertEqual(self.h.md(TunneledDtls, bob.aid), [])


class TestEpochs(unittest.TestCase):
    def params(self, spi: int, cipher: EktCipher = EktCipher.AESKW_128) -> EktParameterSet:
        return EktParameterSet(key=os.urandom(cipher.key_length), cipher=cipher,
                               master_salt=os.urandom(12), spi=spi, ttl=60)

    def test_epochs_must_grow_and_spis_never_repeat(self) -> None:
        kd = Harness().kd
        self.assertEqual(kd.install_epoch(CONF, 3, self.params(7), 0.0), [])
        self.assertEqual(kd.epoch(CONF), 3)
        self.assertRaises(StaleEpoch, kd.install_epoch, CONF, 3, self.params(8), 0.0)
        self.assertRaises(StaleEpoch, kd.install_epoch, CONF, 2, self.params(8), 0.0)
        self.assertRaises(ReusedSpi, kd.install_epoch, CONF, 4, self.params(7), 0.0)
        self.assertEqual(kd.epoch(CONF), 3)
        kd.install_epoch(CONF, 5, self.params(8), 0.0)
        self.assertEqual(kd.current_params(CONF).spi, 8)
        # Another conference has its own numbering and SPIs.
        kd.install_epoch("conf-2", 1, self.params(7), 0.0)
        self.assertRaises(ValueError, kd.install_epoch, CONF, 0, self.params(9), 0.0)

    def test_join_needs_a_current_epoch(self) -> None:
        kd = Harness().kd
        ep = Endpoint("alice")
        self.assertRaises(NoCurrentEpoch, kd.expect, ep.aid, CONF, "alice", ep.fingerprint,
                          ep.tls_id, [1], kd_tls_id=ep.kd_tls_id)
        self.assertFalse(kd.knows(ep.aid))
        kd.set_policy(CONF, rekey_on_join=True)  # a policy is not an epoch
        self.assertRaises(NoCurrentEpoch, kd.expect, ep.aid, CONF, "alice", ep.fingerprint,
                          ep.tls_id, [1], kd_tls_id=ep.kd_tls_id)

    def test_end_conference_forgets_due_rekeys_and_epochs(self) -> None:
        h = Harness()
        alice = Endpoint("alice")
        h.expect(alice)
        h.join(alice)
        h.deliver(h.kd.endpoint_disconnect(alice.aid, h.now))
        h.kd.end_conference(CONF, h.now)
        self.assertEqual(h.kd.take_rekeys(), [])
        self.assertEqual(h.kd.epoch(CONF), 0)

    def test_member_with_another_cipher_is_dropped_on_rekey(self) -> None:
        h = Harness()
        alice = Endpoint("alice")
        h.expect(alice)
        h.join(alice)
        h.to_md.clear()
        h.deliver(h.kd.install_epoch(CONF, 2, self.params(900, EktCipher.AESKW_256), h.now))
        h.run()
        self.assertEqual(set(h.md(EndpointDisconnect)), {EndpointDisconnect(alice.aid)})
        self.assertEqual(len(alice.of(EktKeyReceived)), 1)
        self.assertFalse(h.kd.knows(alice.aid))
