"""Recordings kept as ciphertext (perc_daemons.protocol.recording): the capture format, and
a late joiner decrypting one with the EKTKeys of the epochs it was given (seed
draft-westerlund s4.8) -- and nothing without them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from perc_daemons.protocol.double import Relay
from perc_daemons.protocol.ekt import EktCipher, EktParameterSet
from perc_daemons.protocol.recording import (
    MAGIC,
    CaptureError,
    CaptureWriter,
    HistoryDecryptor,
    capture_spis,
    parse_capture,
)
from tests.unit.test_double import P128, P256, Conference

T0 = 1_800_000_000.0


class FormatTests(unittest.TestCase):
    def test_round_trip(self) -> None:
        writer = CaptureWriter("conf-1")
        data = (writer.header() + writer.record(T0, b"\x80" * 40)
                + writer.record(T0 + 0.020001, b"x"))
        capture = parse_capture(data)
        self.assertEqual(capture.conference_id, "conf-1")
        self.assertEqual([r for _, r in capture.records], [b"\x80" * 40, b"x"])
        self.assertAlmostEqual(capture.records[1][0], T0 + 0.020001, places=6)

    def test_empty_capture_and_bad_inputs(self) -> None:
        self.assertEqual(parse_capture(CaptureWriter("c").header()).records, ())
        for bad in (b"", b"PERCCAP2\x00\x01c", MAGIC, MAGIC + b"\x00\x00", MAGIC + b"\x00\x05c",
                    MAGIC + b"\x00\x01\xff", CaptureWriter("c").header() + b"\x00" * 9,
                    CaptureWriter("c").header() + b"\x00" * 8 + b"\x00\x00",
                    CaptureWriter("c").header() + b"\x00" * 8 + b"\x00\x05abc"):
            with self.assertRaises(CaptureError, msg=bad):
                parse_capture(bad)
        with self.assertRaises(ValueError):
            CaptureWriter("")
        with self.assertRaises(ValueError):
            CaptureWriter.record(T0, b"")

    @settings(deadline=None, max_examples=300)
    @given(st.binary(max_size=200))
    def test_random_bytes_raise_only_capture_error(self, data: bytes) -> None:
        for candidate in (data, MAGIC + data, CaptureWriter("c").header() + data):
            try:
                parse_capture(candidate)
            except CaptureError as e:
                self.assertEqual(e.reason, "capture_malformed")

    @settings(deadline=None, max_examples=100)
    @given(st.text(min_size=1, max_size=20),
           st.lists(st.tuples(st.integers(0, 2**40), st.binary(min_size=1, max_size=300)),
                    max_size=10))
    def test_any_records_round_trip(self, conference: str, records) -> None:
        writer = CaptureWriter(conference)
        data = writer.header() + b"".join(writer.record(t / 1e6, r) for t, r in records)
        capture = parse_capture(data)
        self.assertEqual(capture.conference_id, conference)
        self.assertEqual([(round(t * 1e6), r) for t, r in capture.records], records)


class HistoryTests(unittest.TestCase):
    """A member's capture over two epochs (a rekey at packet 20), decrypted later."""

    def capture(self, profile=P128):
        conf = Conference(profile, seed=11)
        receiver = conf.receivers["b"]
        records: list[tuple[float, bytes]] = []
        receiver.on_outer = lambda record, now: records.append((now, record))
        n = len(conf.params.key)
        second = EktParameterSet(key=conf.rng.randbytes(n), cipher=conf.params.cipher,
                                 master_salt=conf.rng.randbytes(12), spi=8, ttl=600)
        receiver.ekt.add_parameter_set(second, 100.0)
        sent = []
        for i in range(60):
            now = 100.0 + i * 0.02
            if i == 20:
                conf.ekt_a.rekey(second, now)
            original = conf.packet(i, conf.rng.randbytes(160))
            sent.append(original)
            relay = Relay()
            relay.open(conf.sender.protect(original, now), conf.md1_from_a)
            self.assertEqual(receiver.unprotect(relay.seal(conf.md1_to_b), now).packet,
                             original)
        return conf, second, records, sent

    def test_the_epochs_keys_decrypt_every_packet_byte_identical(self) -> None:
        for profile in (P128, P256):
            conf, second, records, sent = self.capture(profile)
            self.assertEqual(capture_spis(records), {7, 8})
            history = HistoryDecryptor(len(conf.params.key), [conf.params, second])
            got = [p.packet for _, p in history.decrypt(records)]
            self.assertEqual(got, sent)
            self.assertEqual(history.failures, {})

    def test_without_the_earlier_epoch_only_what_followed_the_switch(self) -> None:
        _conf, second, records, sent = self.capture()
        history = HistoryDecryptor(16, [second])
        got = [p.packet for _, p in history.decrypt(records)]
        # packets 0-19 under epoch 7's key; 20-32 still under it (the 250 ms hold)
        self.assertEqual(got, sent[33:])
        self.assertEqual(set(history.failures), {"ekt_unknown_spi", "e2e_key_unknown",
                                                 "e2e_auth"})

    def test_without_keys_nothing_decrypts(self) -> None:
        _conf, _second, records, _sent = self.capture()
        history = HistoryDecryptor(16, [])
        self.assertEqual(list(history.decrypt(records)), [])
        self.assertEqual(sum(history.failures.values()), len(records))

    def test_a_wrong_ektkey_under_the_right_spi_decrypts_nothing(self) -> None:
        conf, second, records, _sent = self.capture()
        forged = [EktParameterSet(key=b"\x01" * 16, cipher=EktCipher.AESKW_128,
                                  master_salt=p.master_salt, spi=p.spi, ttl=600)
                  for p in (conf.params, second)]
        history = HistoryDecryptor(16, forged)
        self.assertEqual(list(history.decrypt(records)), [])
        self.assertIn("ekt_unwrap_failed", history.failures)

    def test_a_tampered_record_fails_end_to_end(self) -> None:
        conf, second, records, sent = self.capture()
        t, record = records[30]
        tampered = bytearray(record)
        tampered[20] ^= 1
        records[30] = (t, bytes(tampered))
        history = HistoryDecryptor(16, [conf.params, second])
        got = [p.packet for _, p in history.decrypt(records)]
        self.assertEqual(got, sent[:30] + sent[31:])
        self.assertEqual(history.failures, {"e2e_auth": 1})
