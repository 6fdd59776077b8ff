"""The endpoint's media: G.711 mu-law, tone/WAV/video sources, the per-sender WAV writer."""

from __future__ import annotations

import array
import itertools
import math
import os
import wave

from twisted.trial import unittest

from perc_daemons.endpoint.media import (
    FRAME_SAMPLES,
    PcmuWavWriter,
    ToneSource,
    VideoSource,
    WavSinks,
    WavSource,
    read_wav_8k_mono,
    ulaw_decode,
    ulaw_decode_sample,
    ulaw_encode,
    ulaw_encode_sample,
)

# (16-bit linear, mu-law code) from the G.711 reference encoder (Sun g711.c, as the
# former stdlib audioop.lin2ulaw): 0 is 0xFF, negative values have bit 7 clear.
KNOWN_ENCODE = [
    (0, 0xFF), (1, 0xFF), (-1, 0x7E), (-4, 0x7E), (100, 0xF2), (-100, 0x72),
    (1000, 0xCE), (-1000, 0x4E), (8000, 0xA0), (-8000, 0x20), (16000, 0x90),
    (-16000, 0x10), (32767, 0x80), (-32768, 0x00),
]
# (code, 16-bit linear): the G.711 decoding table (middle of each step)
KNOWN_DECODE = [
    (0xFF, 0), (0x7F, 0), (0x80, 32124), (0x00, -32124), (0xFE, 8), (0x7E, -8),
    (0xF0, 120), (0xEF, 132), (0xDF, 396), (0x8F, 16764), (0x0F, -16764),
]


def write_wav(path, samples, *, rate, width=2, channels=1):
    with wave.open(path, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        frames = bytearray()
        for s in samples:
            for _ in range(channels):
                if width == 1:
                    frames.append((s >> 8) + 128)
                else:
                    frames += (s << (8 * (width - 2))).to_bytes(width, "little", signed=True)
        w.writeframes(bytes(frames))


class MuLawTests(unittest.TestCase):
    def test_known_values(self):
        for linear, code in KNOWN_ENCODE:
            self.assertEqual(ulaw_encode_sample(linear), code, linear)
        for code, linear in KNOWN_DECODE:
            self.assertEqual(ulaw_decode_sample(code), linear, hex(code))

    def test_sign_handling(self):
        for x in (4, 76, 300, 5000, 20000):  # multiples of 4: exact in 14 bits
            pos, neg = ulaw_encode_sample(x), ulaw_encode_sample(-x)
            self.assertEqual(pos & 0x80, 0x80)
            self.assertEqual(neg & 0x80, 0)
            self.assertEqual(pos & 0x7F, neg & 0x7F)  # same magnitude, other sign
            self.assertEqual(ulaw_decode_sample(pos), -ulaw_decode_sample(neg))

    def test_monotonic_and_round_trip_error_bound(self):
        previous = None
        for x in range(-32768, 32768):
            y = ulaw_decode_sample(ulaw_encode_sample(x))
            # at most half a quantisation step (relative 1/32) plus the 14-bit truncation
            self.assertLessEqual(abs(y - x), abs(x) / 32 + 8, x)
            if previous is not None:
                self.assertGreaterEqual(y, previous)
            previous = y

    def test_every_code_is_a_fixed_point(self):
        for code in range(256):
            if code == 0x7F:  # -0 encodes as +0
                continue
            self.assertEqual(ulaw_encode_sample(ulaw_decode_sample(code)), code, hex(code))

    def test_bulk_functions(self):
        samples = [0, 1000, -1000, 40000, -40000]
        self.assertEqual(ulaw_encode(samples), bytes([0xFF, 0xCE, 0x4E, 0x80, 0x00]))
        self.assertEqual(ulaw_decode(bytes([0xFF, 0x80, 0x00])).tolist(), [0, 32124, -32124])
        self.assertIsInstance(ulaw_decode(b"\xff"), array.array)


class SourceTests(unittest.TestCase):
    def test_tone_frames_and_timestamps(self):
        source = ToneSource(1000, timestamp=0xFFFFFF00)
        self.assertEqual(source.interval, 0.02)
        self.assertEqual(source.kind, "audio")
        frames = [source.next_frame() for _ in range(4)]
        self.assertEqual([len(f.payload) for f in frames], [160] * 4)
        self.assertEqual([f.timestamp for f in frames],
                         [0xFFFFFF00, 0xFFFFFFA0, 0x40, 0xE0])  # += 160, mod 2^32
        self.assertEqual([f.marker for f in frames], [True, False, False, False])
        # 1 kHz at 8 kHz: period 8 samples, decoded amplitude about 0.3 of full scale
        decoded = ulaw_decode(frames[1].payload).tolist()
        self.assertEqual(decoded[:8], decoded[8:16])
        self.assertLessEqual(abs(max(decoded) / 32767 - 0.3), 0.02)
        self.assertNotEqual(ToneSource(440).timestamp, ToneSource(440).timestamp)  # random

    def test_tone_is_phase_continuous(self):
        source = ToneSource(440, timestamp=0)
        joined = ulaw_decode(b"".join(source.next_frame().payload for _ in range(3))).tolist()
        expected = [0.3 * 32767 * math.sin(2 * math.pi * 440 * n / 8000) for n in range(480)]
        for got, want in zip(joined, expected, strict=True):
            self.assertLessEqual(abs(got - want), abs(want) / 32 + 9)

    def test_wav_source_converts_any_format(self):
        directory = self.mktemp()
        os.makedirs(directory)
        tone = [round(8000 * math.sin(2 * math.pi * 500 * n / 16000)) for n in range(16000)]
        for rate, width, channels in ((16000, 2, 2), (16000, 1, 1), (16000, 3, 1),
                                      (16000, 4, 2)):
            path = os.path.join(directory, f"in-{rate}-{width}-{channels}.wav")
            write_wav(path, tone, rate=rate, width=width, channels=channels)
            samples = read_wav_8k_mono(path)
            self.assertEqual(len(samples), 8000, (width, channels))
            # 500 Hz at 8 kHz: period 16 samples, amplitude kept (8-bit: coarser)
            self.assertLessEqual(abs(max(samples[100:200]) - 8000), 400)
        path = os.path.join(directory, "in-16000-2-2.wav")
        source = WavSource(path, timestamp=1000, loop=False)
        frames = []
        while (frame := source.next_frame()) is not None:
            frames.append(frame)
        self.assertEqual(len(frames), 50)  # one second
        self.assertEqual({len(f.payload) for f in frames}, {FRAME_SAMPLES})
        self.assertEqual([f.timestamp for f in frames[:3]], [1000, 1160, 1320])
        looping = WavSource(path, timestamp=0)
        for _ in range(120):
            self.assertIsNotNone(looping.next_frame())

    def test_wav_partial_last_frame_padded(self):
        path = self.mktemp()
        write_wav(path, [1000] * 200, rate=8000)
        source = WavSource(path, timestamp=0, loop=False)
        first, second = source.next_frame(), source.next_frame()
        self.assertIsNone(source.next_frame())
        self.assertEqual(len(second.payload), 160)
        self.assertEqual(second.payload[40:], b"\xff" * 120)
        self.assertEqual(first.payload, bytes([ulaw_encode_sample(1000)]) * 160)

    def test_bad_wav(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"not a wav file at all")
        self.assertRaises(ValueError, WavSource, path)

    def test_video_sizes_and_keyframes(self):
        source = VideoSource(rate=25, keyframe_every=5, size=1200, timestamp=0)
        self.assertEqual(source.interval, 0.04)
        self.assertEqual(source.kind, "video")
        frames = [source.next_frame() for _ in range(12)]
        self.assertEqual({len(f.payload) for f in frames}, {1200})
        self.assertEqual([i for i, f in enumerate(frames) if f.keyframe], [0, 5, 10])
        self.assertEqual([f.timestamp for f in frames[:3]], [0, 3600, 7200])
        self.assertTrue(all(f.marker for f in frames))
        for f in frames:  # the VP8 frame tag's P bit is 0 on key frames only
            self.assertEqual(f.payload[0], 0x10)
            self.assertEqual(f.payload[1] & 1, 0 if f.keyframe else 1)
        self.assertEqual(frames[0].payload[4:7], b"\x9d\x01\x2a")
        self.assertRaises(ValueError, VideoSource, rate=0)
        self.assertRaises(ValueError, VideoSource, keyframe_every=0)


class WavWriterTests(unittest.TestCase):
    def test_written_file_is_readable(self):
        path = self.mktemp()
        writer = PcmuWavWriter(path)
        source = ToneSource(440, timestamp=5000)
        frames = [source.next_frame() for _ in range(5)]
        writer.write(frames[0].payload, frames[0].timestamp)
        writer.write(frames[2].payload, frames[2].timestamp)  # frame 1 lost: silence
        writer.write(frames[1].payload, frames[1].timestamp)  # late: dropped
        writer.write(frames[3].payload, frames[3].timestamp)
        writer.close()
        self.assertEqual(writer.dropped, 1)
        with wave.open(path, "rb") as w:
            self.assertEqual((w.getnchannels(), w.getsampwidth(), w.getframerate()),
                             (1, 2, 8000))
            self.assertEqual(w.getnframes(), 4 * 160)
            data = array.array("h", w.readframes(w.getnframes()))
        self.assertEqual(data[160:320].tolist(), [0] * 160)
        self.assertEqual(data[:160].tolist(), ulaw_decode(frames[0].payload).tolist())
        self.assertEqual(data[480:].tolist(), ulaw_decode(frames[3].payload).tolist())

    def test_sinks_one_file_per_ssrc(self):
        directory = self.mktemp()
        sinks = WavSinks(directory)
        for ssrc in (0x11, 0xDEADBEEF):
            source = ToneSource(300, timestamp=0)
            for _ in range(3):
                frame = source.next_frame()
                sinks.write(ssrc, frame.payload, frame.timestamp)
        sinks.close()
        self.assertEqual(sorted(os.listdir(directory)),
                         ["ssrc-00000011.wav", "ssrc-deadbeef.wav"])
        for path in sinks.paths().values():
            with wave.open(path, "rb") as w:
                self.assertEqual(w.getnframes(), 480)


class AudioLevelTests(unittest.TestCase):
    """RFC 6464 s3: -dBov of the frame's RMS, 127 for digital silence."""

    def test_silence_full_scale_and_a_tone(self):
        from perc_daemons.endpoint.media import SILENCE_FRAME, audio_level
        self.assertEqual(audio_level(SILENCE_FRAME), 127)
        self.assertEqual(audio_level(bytes([0x7F]) * 160), 127)  # the other zero code
        self.assertEqual(audio_level(b""), 127)
        # a full-scale square wave (codes 0x80 / 0x00: +-32124) is the overload point
        self.assertEqual(audio_level(bytes([0x80, 0x00]) * 80), 0)
        # a sine of amplitude A has RMS A/sqrt(2): 20*log10(0.3/sqrt(2)) = -13.5 dBov
        frame = ToneSource(440, amplitude=0.3).next_frame().payload
        self.assertIn(audio_level(frame), (13, 14))
        quiet = ToneSource(440, amplitude=0.001).next_frame().payload
        self.assertIn(audio_level(quiet), range(60, 66))
        self.assertEqual(audio_level(ulaw_encode([1] * 160)), 127)  # encodes to 0xFF: zero


class SimulcastVideoTests(unittest.TestCase):
    def test_rates_sizes_and_common_key_frames(self):
        from perc_daemons.endpoint.media import SimulcastVideo
        video = SimulcastVideo(rate=30.0, keyframe_every=8)
        self.assertEqual(video.interval, 1 / 30)
        ticks = [video.next_frames() for _ in range(16)]
        sent = [[encoding for encoding, _ in tick] for tick in ticks]
        self.assertEqual(sent[:4], [[0, 1, 2], [0], [0, 1], [0]])
        self.assertEqual(video.frames, [16, 8, 4])  # 30, 15 and 7.5 packets per second
        keys = [(i, e) for i, tick in enumerate(ticks) for e, f in tick if f.keyframe]
        self.assertEqual(keys, [(0, 0), (0, 1), (0, 2), (8, 0), (8, 1), (8, 2)])
        for tick in ticks:
            for _encoding, frame in tick:
                self.assertEqual(len(frame.payload), 1200)
                self.assertTrue(frame.marker)
                # the VP8 frame tag's P bit is 0 on key frames (RFC 6386 s9.1)
                self.assertEqual(frame.payload[1] & 1, 0 if frame.keyframe else 1)
        h = [f.timestamp for tick in ticks for e, f in tick if e == 0]
        m = [f.timestamp for tick in ticks for e, f in tick if e == 1]
        self.assertEqual({(b - a) % 2**32 for a, b in itertools.pairwise(h)}, {3000})
        self.assertEqual({(b - a) % 2**32 for a, b in itertools.pairwise(m)}, {6000})

    def test_a_requested_key_frame_is_the_next_frame_of_that_encoding(self):
        from perc_daemons.endpoint.media import SimulcastVideo
        video = SimulcastVideo(keyframe_every=60)
        video.next_frames()
        video.request_keyframe(2)  # l: next sends at index 4
        video.request_keyframe(0)
        frames = [video.next_frames() for _ in range(4)]
        keys = [(i + 1, e) for i, tick in enumerate(frames) for e, f in tick if f.keyframe]
        self.assertEqual(keys, [(1, 0), (4, 2)])
        self.assertEqual(video.keyframes, [2, 1, 2])
        self.assertRaises(ValueError, video.request_keyframe, 3)
        for bad in ({"keyframe_every": 30}, {"rate": 0}, {"size": 8}, {"encodings": 4}):
            self.assertRaises(ValueError, SimulcastVideo, **bad)
