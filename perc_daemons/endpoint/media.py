"""Media for the reference endpoint: G.711 mu-law, tone/WAV/video-like sources, WAV sinks.

* :func:`ulaw_encode` / :func:`ulaw_decode`: ITU-T G.711 mu-law (PCMU, RFC
  3551 s4.5.14) between 16-bit linear PCM and 8-bit codes, written here (the
  stdlib ``audioop`` is deprecated, PEP 594), bit-exact with the G.711
  reference (Sun) code: 0 encodes to 0xFF, the sign is bit 7 (clear for
  negative), every code is bit-inverted; decoding returns the middle of the
  quantisation step (0x00 -> -32124, 0x80 -> 32124).
* Sources (:class:`MediaSource`) produce :class:`MediaFrame` objects to be
  sent every :attr:`~MediaSource.interval` seconds:
  :class:`ToneSource` and :class:`WavSource` give 160-byte PCMU frames (20 ms
  at 8 kHz, 50 packets per second, RTP timestamp +160 per frame, RFC 3551
  s4.5.14 and s4.2), the first one with the marker bit (start of a talkspurt,
  RFC 3551 s4.1); :class:`VideoSource` gives 1200-byte VP8-like packets (RFC
  7741 payload descriptor and frame tag, the key frame flag set every
  ``keyframe_every`` packets) at a configurable rate on a 90 kHz clock;
  :class:`SimulcastVideo` three such encodings at once (h, m, l: 30, 15 and
  7.5 packets per second by default, RFC 8853 simulcast), key frames at the
  same frame index on all three and on request for one.
* :func:`audio_level`: the RFC 6464 level (-dBov of the RMS, 127 for digital
  silence) of a PCMU frame, for the client-to-mixer header extension;
  :data:`QUIET_FRAMES` what an endpoint that is not talking sends: the noise
  of a microphone in a quiet room (about -60 dBov, level 60), as a real
  unmuted client does, never digital silence, so that a dominant speaker
  detector (Jitsi's, ours) learns each source's noise floor from it.
* :class:`PcmuWavWriter` decodes one sender's PCMU payloads into a 8 kHz mono
  16-bit WAV file (timestamp gaps filled with silence); :class:`WavSinks`
  keeps one writer per sender SSRC in a directory.

No clock and no I/O beyond the WAV files themselves: the caller paces.
"""

from __future__ import annotations

import array
import math
import os
import secrets
import sys
import wave
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "FRAME_SAMPLES",
    "PCMU_RATE",
    "QUIET_FRAMES",
    "SILENCE_FRAME",
    "MediaFrame",
    "MediaSource",
    "PcmuWavWriter",
    "SimulcastVideo",
    "ToneSource",
    "VideoSource",
    "WavSinks",
    "WavSource",
    "audio_level",
    "read_wav_8k_mono",
    "ulaw_decode",
    "ulaw_decode_sample",
    "ulaw_encode",
    "ulaw_encode_sample",
]

PCMU_RATE = 8000
FRAME_SAMPLES = 160  # 20 ms at 8 kHz: one PCMU packet
PCMU_SILENCE = 0xFF
_BIAS = 0x21  # 14-bit bias (0x84 in 16-bit terms)
_CLIP = 8159
_MAX_GAP_SAMPLES = PCMU_RATE  # fill at most one second of silence for a timestamp gap
#: One 20 ms PCMU frame of digital silence (every sample 0).
SILENCE_FRAME = bytes([PCMU_SILENCE]) * FRAME_SAMPLES
#: RMS of :data:`QUIET_FRAMES`, in 16-bit units: some -60 dBov.
_ROOM_NOISE_RMS = 33


# --- G.711 mu-law ----------------------------------------------------------------------------


def ulaw_encode_sample(sample: int) -> int:
    """The mu-law code (0-255) of one 16-bit signed linear sample (G.711 s3.2).

    As the G.711 reference code (and Sun's ``g711.c``): the 16-bit sample is
    taken as a 14-bit one (arithmetic shift), its magnitude clipped to 8159,
    biased by 33, split into segment and 4-bit mantissa, and inverted.
    """
    sample >>= 2
    if sample < 0:
        sample, mask = -sample, 0x7F
    else:
        mask = 0xFF
    sample = min(sample, _CLIP) + _BIAS
    segment = max(0, sample.bit_length() - 6)
    if segment > 7:
        return 0x7F ^ mask
    return ((segment << 4) | ((sample >> (segment + 1)) & 0x0F)) ^ mask


def ulaw_decode_sample(code: int) -> int:
    """The 16-bit linear value (middle of the step) of one mu-law code."""
    code = ~code & 0xFF
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return -magnitude if code & 0x80 else magnitude


_ENCODE = bytes(ulaw_encode_sample(s - 65536 if s >= 32768 else s) for s in range(65536))
_DECODE = array.array("h", (ulaw_decode_sample(c) for c in range(256)))


def ulaw_encode(samples: Iterable[int]) -> bytes:
    """PCMU bytes of 16-bit signed samples (values outside the range are clipped)."""
    table = _ENCODE
    return bytes(table[max(-32768, min(32767, s)) & 0xFFFF] for s in samples)


def ulaw_decode(data: bytes) -> array.array:
    """16-bit signed samples (``array('h')``) of PCMU bytes."""
    table = _DECODE
    return array.array("h", (table[b] for b in data))


def audio_level(payload: bytes) -> int:
    """The RFC 6464 s3 level of a PCMU frame: -dBov of its RMS, 0 (loudest) to 127.

    dBov is relative to the overload point, a full-scale square wave (RMS
    32767); digital silence (every sample 0) and anything quieter than
    -127 dBov are 127.
    """
    if not payload:
        return 127
    table = _DECODE
    power = sum(table[b] * table[b] for b in payload) / len(payload)
    if power <= 0:
        return 127
    level = -10 * math.log10(power / (32767 * 32767))
    return max(0, min(127, round(level)))


# --- sources -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaFrame:
    """One RTP payload to send with its RTP timestamp and marks."""

    payload: bytes
    timestamp: int
    marker: bool = False
    keyframe: bool = False


class MediaSource(Protocol):
    """Something producing frames every ``interval`` seconds (``kind``: audio or video)."""

    kind: str
    interval: float

    def next_frame(self) -> MediaFrame | None:
        """The next frame, or None when the source is exhausted."""


def _initial_timestamp(timestamp: int | None) -> int:
    # RFC 3550 s5.1: the initial timestamp SHOULD be random
    return secrets.randbits(32) if timestamp is None else timestamp & 0xFFFFFFFF


class _PcmuSource:
    kind = "audio"
    interval = FRAME_SAMPLES / PCMU_RATE

    def __init__(self, timestamp: int | None) -> None:
        self.timestamp = _initial_timestamp(timestamp)
        self.frames = 0

    def _samples(self) -> list[int] | None:
        raise NotImplementedError

    def next_frame(self) -> MediaFrame | None:
        samples = self._samples()
        if samples is None:
            return None
        frame = MediaFrame(ulaw_encode(samples), self.timestamp, marker=self.frames == 0)
        self.timestamp = (self.timestamp + FRAME_SAMPLES) & 0xFFFFFFFF
        self.frames += 1
        return frame


class ToneSource(_PcmuSource):
    """A sine tone of ``frequency`` Hz as PCMU, 160-byte frames, phase-continuous."""

    def __init__(self, frequency: float = 440.0, *, amplitude: float = 0.3,
                 timestamp: int | None = None) -> None:
        if not 0 < frequency < PCMU_RATE / 2:
            raise ValueError(f"frequency must be between 0 and {PCMU_RATE // 2} Hz")
        if not 0 <= amplitude <= 1:
            raise ValueError("amplitude must be between 0 and 1")
        super().__init__(timestamp)
        self.frequency = frequency
        self._peak = amplitude * 32767
        self._step = 2 * math.pi * frequency / PCMU_RATE
        self._n = 0

    def _samples(self) -> list[int]:
        start, self._n = self._n, self._n + FRAME_SAMPLES
        return [round(self._peak * math.sin(self._step * (start + i)))
                for i in range(FRAME_SAMPLES)]


def _to_mono_16(frames: bytes, width: int, channels: int) -> list[int]:
    """Signed 16-bit mono samples of little-endian WAV frames of any width/channels."""
    if width == 1:  # unsigned 8-bit
        values = [(b - 128) << 8 for b in frames]
    elif width == 2:
        a = array.array("h")
        a.frombytes(frames[:len(frames) - len(frames) % 2])
        if sys.byteorder == "big":
            a.byteswap()
        values = a.tolist()
    elif width in (3, 4):
        values = [int.from_bytes(frames[i:i + width], "little", signed=True) >> (8 * (width - 2))
                  for i in range(0, len(frames) - width + 1, width)]
    else:
        raise ValueError(f"unsupported sample width {width}")
    if channels == 1:
        return values
    return [sum(values[i:i + channels]) // channels
            for i in range(0, len(values) - channels + 1, channels)]


def _resample(samples: list[int], rate: int, target: int = PCMU_RATE) -> list[int]:
    """Linear-interpolation resampling (with a box pre-filter when downsampling)."""
    if rate == target or not samples:
        return list(samples)
    ratio = rate / target
    if ratio > 1:  # moving average over one output period: crude anti-aliasing
        width = max(1, int(ratio))
        acc = 0
        filtered = []
        for i, s in enumerate(samples):
            acc += s
            if i >= width:
                acc -= samples[i - width]
            filtered.append(acc // min(i + 1, width))
        samples = filtered
    count = int(len(samples) / ratio)
    last = len(samples) - 1
    out = []
    for j in range(count):
        pos = j * ratio
        i = int(pos)
        frac = pos - i
        a = samples[min(i, last)]
        b = samples[min(i + 1, last)]
        out.append(round(a + (b - a) * frac))
    return out


def read_wav_8k_mono(path: str | os.PathLike[str]) -> list[int]:
    """The samples of a PCM WAV file as 8 kHz mono 16-bit; ValueError if unusable."""
    try:
        with wave.open(os.fspath(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            data = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{path}: not a PCM WAV file ({e})") from None
    if rate <= 0 or channels <= 0:
        raise ValueError(f"{path}: bad WAV header")
    return _resample(_to_mono_16(data, width, channels), rate)


class WavSource(_PcmuSource):
    """A WAV file (any rate, width, channels) as 160-byte PCMU frames; ``loop`` repeats it.

    The last partial frame is padded with silence.
    """

    def __init__(self, path: str | os.PathLike[str], *, loop: bool = True,
                 timestamp: int | None = None) -> None:
        super().__init__(timestamp)
        self.samples = read_wav_8k_mono(path)
        if not self.samples:
            raise ValueError(f"{path}: no audio")
        self.loop = loop
        self._pos = 0

    def _samples(self) -> list[int] | None:
        if self._pos >= len(self.samples):
            if not self.loop:
                return None
            self._pos = 0
        chunk = self.samples[self._pos:self._pos + FRAME_SAMPLES]
        self._pos += FRAME_SAMPLES
        if len(chunk) < FRAME_SAMPLES:
            chunk = chunk + [0] * (FRAME_SAMPLES - len(chunk))
        return chunk


class VideoSource:
    """VP8-like packets of ``size`` bytes at ``rate`` per second, a key frame every N.

    Each packet is one frame (marker set, RFC 7741 s4.2), timestamps advance
    ``90000 / rate``.  The payload starts with the RFC 7741 s4.2 payload
    descriptor (S=1, partition 0) and a VP8 frame tag whose P bit is 0 on key
    frames (RFC 6386 s9.1, with the key frame start code 9d 01 2a); then a
    packet counter and a filler pattern.
    """

    kind = "video"
    CLOCK_RATE = 90000

    def __init__(self, *, rate: float = 50.0, keyframe_every: int = 30, size: int = 1200,
                 timestamp: int | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if keyframe_every < 1:
            raise ValueError("keyframe_every must be at least 1")
        if size < 16:
            raise ValueError("size must be at least 16 bytes")
        self.rate = rate
        self.interval = 1.0 / rate
        self.keyframe_every = keyframe_every
        self.size = size
        self.timestamp = _initial_timestamp(timestamp)
        self._ticks = 0.0
        self._start = self.timestamp
        self.packets = 0

    def next_frame(self) -> MediaFrame:
        index = self.packets
        keyframe = index % self.keyframe_every == 0
        header = bytes([0x10])  # X=0 R=0 N=0 S=1 PID=0
        if keyframe:
            header += bytes([0x00, 0x00, 0x00, 0x9D, 0x01, 0x2A, 0x80, 0x02, 0xE0, 0x01])
        else:
            header += bytes([0x01, 0x00, 0x00])
        header += index.to_bytes(4, "big")
        filler = bytes((index + i) & 0xFF for i in range(self.size - len(header)))
        timestamp = (self._start + round(index * self.CLOCK_RATE / self.rate)) & 0xFFFFFFFF
        self.packets += 1
        return MediaFrame(header + filler, timestamp, marker=True, keyframe=keyframe)


class SimulcastVideo:
    """Three simulcast encodings (RFC 8853) of one video-like source: h, m and l.

    Every :attr:`interval` (1 / ``rate``) :meth:`next_frames` returns the
    frames due at that frame index, as ``(encoding, frame)`` with encoding 0
    (h), 1 (m) or 2 (l): h every frame, m every second, l every fourth (30,
    15 and 7.5 packets per second at the default rate), each a VP8-like
    packet of ``size`` bytes as :class:`VideoSource` makes.  A frame index
    that is a multiple of ``keyframe_every`` (itself a multiple of 4, so all
    three send then) is a key frame on all three; :meth:`request_keyframe`
    makes the next frame of one encoding a key frame (a PLI or FIR for its
    SSRC).  Timestamps are on a 90 kHz clock from one random start per
    encoding (RFC 3550 s5.1).
    """

    kind = "video"
    CLOCK_RATE = 90000
    #: Frame index divisors of the encodings: h every frame, m every 2nd, l every 4th.
    DIVISORS = (1, 2, 4)
    NAMES = ("h", "m", "l")

    def __init__(self, *, rate: float = 30.0, keyframe_every: int = 60, size: int = 1200,
                 encodings: int = 3) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if keyframe_every < 4 or keyframe_every % 4:
            raise ValueError("keyframe_every must be a positive multiple of 4")
        if size < 16:
            raise ValueError("size must be at least 16 bytes")
        if not 1 <= encodings <= 3:
            raise ValueError("encodings must be 1, 2 or 3")
        self.rate = rate
        self.interval = 1.0 / rate
        self.keyframe_every = keyframe_every
        self.size = size
        self.encodings = encodings
        self._starts = [_initial_timestamp(None) for _ in range(encodings)]
        self._requested: set[int] = set()
        self.index = 0
        #: Frames sent per encoding, and key frames among them.
        self.frames = [0] * encodings
        self.keyframes = [0] * encodings

    def request_keyframe(self, encoding: int) -> None:
        """Make the next frame of ``encoding`` (0 h, 1 m, 2 l) a key frame."""
        if not 0 <= encoding < self.encodings:
            raise ValueError(f"no encoding {encoding}")
        self._requested.add(encoding)

    def next_frames(self) -> list[tuple[int, MediaFrame]]:
        """The frames of this frame index, then moves to the next."""
        index = self.index
        self.index += 1
        out = []
        for encoding in range(self.encodings):
            if index % self.DIVISORS[encoding]:
                continue
            keyframe = index % self.keyframe_every == 0 or encoding in self._requested
            self._requested.discard(encoding)
            timestamp = (self._starts[encoding]
                         + round(index * self.CLOCK_RATE / self.rate)) & 0xFFFFFFFF
            out += ((encoding, frame) for frame in self._packets(encoding, keyframe, timestamp))
            self.frames[encoding] += 1
            self.keyframes[encoding] += keyframe
        return out

    def _packets(self, encoding: int, keyframe: bool, timestamp: int) -> list[MediaFrame]:
        """One frame of ``encoding``: here one VP8-like packet (a subclass may make more)."""
        count = self.frames[encoding]
        header = bytes([0x10])  # X=0 R=0 N=0 S=1 PID=0 (RFC 7741 s4.2)
        if keyframe:
            header += bytes([0x00, 0x00, 0x00, 0x9D, 0x01, 0x2A, 0x80, 0x02, 0xE0, 0x01])
        else:
            header += bytes([0x01, 0x00, 0x00])
        header += bytes([encoding]) + count.to_bytes(4, "big")
        filler = bytes((count + i) & 0xFF for i in range(self.size - len(header)))
        return [MediaFrame(header + filler, timestamp, marker=True, keyframe=keyframe)]

    def next_frame(self) -> MediaFrame | None:
        """:class:`MediaSource` compatibility: the h encoding's frame (one per index)."""
        frames = self.next_frames()
        return frames[0][1] if frames else None


# --- sinks ---------------------------------------------------------------------------------


class PcmuWavWriter:
    """One sender's PCMU payloads decoded into an 8 kHz mono 16-bit WAV file.

    :meth:`write` takes the payload and its RTP timestamp: a forward gap (lost
    packets) is filled with silence up to one second; late or repeated
    packets (timestamp not ahead) are dropped.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._wave = wave.open(self.path, "wb")
        self._wave.setnchannels(1)
        self._wave.setsampwidth(2)
        self._wave.setframerate(PCMU_RATE)
        self._next: int | None = None
        self.samples = 0
        self.dropped = 0

    def write(self, payload: bytes, timestamp: int) -> None:
        if self._next is not None:
            delta = (timestamp - self._next) & 0xFFFFFFFF
            if delta >= 1 << 31:  # behind what was written: late or duplicate
                self.dropped += 1
                return
            if delta:
                self._append(array.array("h", bytes(2 * min(delta, _MAX_GAP_SAMPLES))))
        self._append(ulaw_decode(payload))
        self._next = (timestamp + len(payload)) & 0xFFFFFFFF

    def _append(self, samples: array.array) -> None:
        if sys.byteorder == "big":
            samples = array.array("h", samples)
            samples.byteswap()
        self._wave.writeframes(samples.tobytes())
        self.samples += len(samples)

    def close(self) -> None:
        self._wave.close()


class WavSinks:
    """A :class:`PcmuWavWriter` per sender SSRC in ``directory`` (``ssrc-<hex>.wav``)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.writers: dict[int, PcmuWavWriter] = {}

    def write(self, ssrc: int, payload: bytes, timestamp: int) -> None:
        writer = self.writers.get(ssrc)
        if writer is None:
            writer = PcmuWavWriter(os.path.join(self.directory, f"ssrc-{ssrc:08x}.wav"))
            self.writers[ssrc] = writer
        writer.write(payload, timestamp)

    def paths(self) -> dict[int, str]:
        return {ssrc: w.path for ssrc, w in self.writers.items()}

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _quiet_frames(count: int = 50, seed: int = 6464) -> tuple[bytes, ...]:
    """``count`` frames of white noise at about -60 dBov (fixed seed: pinned input)."""
    import random

    rng = random.Random(seed)
    scale = _ROOM_NOISE_RMS * math.sqrt(3)  # uniform noise: RMS = peak / sqrt(3)
    return tuple(ulaw_encode(round(rng.uniform(-scale, scale)) for _ in range(FRAME_SAMPLES))
                 for _ in range(count))


#: What a silent (not talking) endpoint sends, cycled: one second of quiet-room noise.
QUIET_FRAMES = _quiet_frames()

