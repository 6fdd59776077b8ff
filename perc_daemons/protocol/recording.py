"""A conference recording kept as ciphertext, and its decryption by a late joiner.

Seed draft-westerlund section 4.8: "a late joining participant should get
access to keying material to decrypt a conference recording".  The
recording is what the conference provider's side may hold without trusting
it: every packet with the hop-by-hop (outer) layer off and the end-to-end
(inner) layer on, i.e. RTP header || inner ciphertext || inner tag || OHB
|| EKTField -- what a Media Distributor holds between its two outer
operations (RFC 8723 s5.2, :class:`~perc_daemons.protocol.double.Relay`).
Nothing in it is readable without the EKTKeys of the epochs it covers (RFC
8870 s4.3.2): the senders' end-to-end keys travel in it, wrapped.  The
reference endpoint makes one from what it receives (``perc-endpoint
--capture FILE``: its own outer layer removed, its hop-by-hop key being
its own business); a recorder of the provider could equally make one at
the MD.  Its own sent packets are not in a member's capture (the MD does
not echo them).

File format (version 1), all integers big-endian::

    "PERCCAP1"                          8 bytes, the magic
    u16 length, conference id (UTF-8)   the conference it was taken in
    records, to the end of the file:
        u64 time                        microseconds since the POSIX epoch, received
        u16 length, record              the packet, outer layer off (as above)

:class:`CaptureWriter` encodes, :func:`parse_capture` decodes (raising only
:class:`CaptureError`).  :class:`HistoryDecryptor` opens the inner layer of
the records with the EKT parameter sets of the epochs the late joiner was
given (``POST /v1/conferences/{id}/keys?epoch=N``, only under the
``late_join = "history"`` policy): each sender's keys are learnt from its
FullEKTFields as a live receiver learns them
(:meth:`~perc_daemons.protocol.double.DoubleReceiver.open_recorded`),
with the record times as ``now``.

Not here: the file I/O, the key fetches and the WAV files (the endpoint,
:mod:`perc_daemons.endpoint.client`).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from perc_daemons.protocol.double import DoubleReceiver, ReceivedPacket
from perc_daemons.protocol.ekt import (
    FULL_EKT_TYPE,
    EktError,
    EktParameterSet,
    EktReceiver,
    FullEktField,
    ekt_field_length,
)
from perc_daemons.protocol.errors import ProtocolError

__all__ = [
    "MAGIC",
    "Capture",
    "CaptureError",
    "CaptureWriter",
    "HistoryDecryptor",
    "capture_spis",
    "parse_capture",
]

MAGIC = b"PERCCAP1"
_TIME = struct.Struct("!Q")
_LENGTH = struct.Struct("!H")
_MAX_RECORD = 0xFFFF


class CaptureError(ProtocolError):
    """Not a capture file of this format, or a truncated one."""

    reason = "capture_malformed"


@dataclass(frozen=True)
class Capture:
    """A parsed capture: its conference and its ``(time, record)`` pairs in order."""

    conference_id: str
    records: tuple[tuple[float, bytes], ...]


class CaptureWriter:
    """The bytes of a capture: :meth:`header` once, then :meth:`record` per packet."""

    def __init__(self, conference_id: str) -> None:
        encoded = conference_id.encode("utf-8")
        if not encoded or len(encoded) > _MAX_RECORD:
            raise ValueError("conference id must be 1-65535 bytes of UTF-8")
        self.conference_id = conference_id
        self._header = MAGIC + _LENGTH.pack(len(encoded)) + encoded

    def header(self) -> bytes:
        return self._header

    @staticmethod
    def record(now: float, packet: bytes) -> bytes:
        """One record: ``packet`` (outer layer off) received at ``now`` (POSIX seconds)."""
        if not 0 < len(packet) <= _MAX_RECORD:
            raise ValueError("a record is 1-65535 bytes")
        if now < 0:
            raise ValueError("time must not be negative")
        return _TIME.pack(round(now * 1e6)) + _LENGTH.pack(len(packet)) + packet


def parse_capture(data: bytes) -> Capture:
    """Decode a whole capture file (format in the module docstring)."""
    if data[:len(MAGIC)] != MAGIC:
        raise CaptureError("not a perc-endpoint capture (no PERCCAP1 magic)")
    offset = len(MAGIC)
    if len(data) < offset + _LENGTH.size:
        raise CaptureError("truncated before the conference id")
    (length,) = _LENGTH.unpack_from(data, offset)
    offset += _LENGTH.size
    if length == 0 or len(data) < offset + length:
        raise CaptureError("empty or truncated conference id")
    try:
        conference_id = data[offset:offset + length].decode("utf-8")
    except UnicodeDecodeError:
        raise CaptureError("the conference id is not UTF-8") from None
    offset += length
    records = []
    while offset < len(data):
        if len(data) < offset + _TIME.size + _LENGTH.size:
            raise CaptureError(f"record header truncated at byte {offset}")
        (micros,) = _TIME.unpack_from(data, offset)
        (size,) = _LENGTH.unpack_from(data, offset + _TIME.size)
        offset += _TIME.size + _LENGTH.size
        if size == 0 or len(data) < offset + size:
            raise CaptureError(f"empty or truncated record at byte {offset}")
        records.append((micros / 1e6, bytes(data[offset:offset + size])))
        offset += size
    return Capture(conference_id, tuple(records))


def capture_spis(records: Iterable[tuple[float, bytes]]) -> set[int]:
    """The EKT SPIs of the FullEKTFields in ``records``: the epochs whose EKTKeys it needs
    (records whose EKTField cannot be framed are left out)."""
    spis = set()
    for _, record in records:
        if record and record[-1] == FULL_EKT_TYPE:
            try:
                spis.add(FullEktField.decode(record[len(record) - ekt_field_length(record):]).spi)
            except EktError:
                continue
    return spis


class HistoryDecryptor:
    """Decrypts records with the EKT parameter sets a late joiner was given.

    ``key_length`` is the inner (end-to-end) key length of the DOUBLE profile
    (16 or 32 bytes, as the live session's); ``epochs`` the parameter sets,
    any number.  :meth:`decrypt` yields each record that decrypted, and
    counts the others in :attr:`failures` by reason (``ekt_unknown_spi``: an
    epoch not given, ``e2e_key_unknown``: no FullEKTField of that sender
    seen yet, ``e2e_auth``: not under any key learnt).
    """

    def __init__(self, key_length: int, epochs: Iterable[EktParameterSet]) -> None:
        self.ekt = EktReceiver(key_length)
        self._first = True
        self._epochs = list(epochs)
        self.receiver = DoubleReceiver(None, self.ekt)
        self.failures: Counter[str] = Counter()
        self.decrypted: Counter[int] = Counter()  # per SSRC

    def decrypt(self, records: Iterable[tuple[float, bytes]]
                ) -> Iterator[tuple[float, ReceivedPacket]]:
        for now, record in records:
            if self._first:
                self._first = False
                for params in self._epochs:  # usable from the capture's start for ttl s
                    self.ekt.add_parameter_set(params, now)
            try:
                received = self.receiver.open_recorded(record, now)
            except ProtocolError as e:
                self.failures[e.reason] += 1
                continue
            self.decrypted[received.ssrc] += 1
            yield now, received

    def close(self) -> None:
        self.receiver.close()

