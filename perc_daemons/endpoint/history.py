"""The endpoint's side of a recording kept as ciphertext: capturing one, decrypting one.

``perc-endpoint --capture FILE`` (:class:`CaptureFile`): every RTP packet the
endpoint receives whose hop-by-hop layer verified is appended to FILE with
that layer off -- RTP header, inner (end-to-end) ciphertext, OHB and
EKTField, the format of :mod:`perc_daemons.protocol.recording`.  That is what
the provider's side may keep of a conference (an MD holds exactly this
between its two outer operations): without the epochs' EKTKeys nothing in
it can be read.  Under ``--load`` only the decrypted share of the datagrams
would be captured: capture with one endpoint.

``perc-endpoint --record-dir DIR --history FILE`` (:func:`decrypt_history`),
a late joiner once admitted: the EKT SPIs FILE's FullEKTFields were sent
under say which epochs it needs; it asks the KMF for the earlier epochs'
EKT parameter sets, newest first, until it has them all
(``POST .../keys?epoch=N``: only under the conference's ``late_join =
"history"`` policy, only to an admitted member, each delivery logged by
the KMF), learns every sender's keys from the FullEKTFields, opens the
inner layer and writes each audio sender to ``DIR/history/ssrc-XXXXXXXX.wav``.
Under another policy the KMF refuses the first earlier epoch (403
``history-not-allowed``): :class:`HistoryRefused`, nothing decrypted,
nothing written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import IO, Any

from perc_daemons.endpoint.kmf import KmfClient, KmfRefused
from perc_daemons.endpoint.media import WavSinks
from perc_daemons.protocol.ekt import EktParameterSet
from perc_daemons.protocol.recording import (
    CaptureError,
    CaptureWriter,
    HistoryDecryptor,
    capture_spis,
    parse_capture,
)
from perc_daemons.protocol.rtp import parse_fixed_header

__all__ = ["CaptureFile", "HistoryError", "HistoryRefused", "HistoryResult",
           "decrypt_history"]

class HistoryError(Exception):
    """The recording could not be decrypted (unreadable file, another conference)."""


class HistoryRefused(HistoryError):
    """The KMF refused an earlier epoch's key (``slug``: e.g. ``history-not-allowed``)."""

    def __init__(self, epoch: int, refusal: KmfRefused) -> None:
        super().__init__(f"the KMF refused the key of earlier epoch {epoch}: "
                         f"{refusal.status} {refusal.slug or refusal.title}: {refusal.detail}")
        self.epoch = epoch
        self.slug = refusal.slug
        self.status = refusal.status


class CaptureFile:
    """Appends records to a capture file (header first); flushed on :meth:`close`."""

    def __init__(self, path: str, conference_id: str) -> None:
        self.path = path
        self._writer = CaptureWriter(conference_id)
        self._file: IO[bytes] | None = open(path, "wb")
        self._file.write(self._writer.header())
        self.records = 0

    def write(self, record: bytes, now: float) -> None:
        if self._file is not None:
            self._file.write(self._writer.record(now, record))
            self.records += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class HistoryResult:
    """What :func:`decrypt_history` did: the epochs fetched, packets per sender SSRC,
    the records that did not decrypt by reason, the WAV files written."""

    records: int = 0
    epochs: list[int] = field(default_factory=list)
    missing_spis: list[int] = field(default_factory=list)
    decrypted: dict[int, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    recordings: dict[int, str] = field(default_factory=dict)
    packets: list[tuple[int, int, bytes]] = field(default_factory=list, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {"records": self.records, "epochs": self.epochs,
                "missing_spis": self.missing_spis,
                "decrypted": [{"ssrc": s, "packets": n, "recording": self.recordings.get(s)}
                              for s, n in sorted(self.decrypted.items())],
                "failures": dict(sorted(self.failures.items()))}


async def decrypt_history(kmf: KmfClient, conference_id: str, key_length: int,
                          capture_path: str, record_dir: str | None) -> HistoryResult:
    """Decrypt the capture at ``capture_path`` (module docstring); WAVs under
    ``record_dir/history`` if given.  ``result.packets`` holds (SSRC, sequence,
    payload) of every decrypted packet.  Raises :class:`HistoryRefused` or
    :class:`HistoryError`."""
    try:
        with open(capture_path, "rb") as f:
            capture = parse_capture(f.read())
    except OSError as e:
        raise HistoryError(f"--history {capture_path}: {e.strerror or e}") from None
    except CaptureError as e:
        raise HistoryError(f"--history {capture_path}: {e}") from None
    if capture.conference_id != conference_id:
        raise HistoryError(f"--history {capture_path} was captured in conference "
                           f"{capture.conference_id!r}, not {conference_id!r}")
    result = HistoryResult(records=len(capture.records))
    needed = capture_spis(capture.records)
    current, params = await kmf.epoch_parameters(conference_id)
    sets: dict[int, EktParameterSet] = {}
    if params.spi in needed:
        sets[params.spi] = params
    epoch = current - 1
    while epoch >= 1 and not needed <= set(sets):
        try:
            _, earlier = await kmf.epoch_parameters(conference_id, epoch)
        except KmfRefused as e:
            if e.slug != "unknown-epoch":
                raise HistoryRefused(epoch, e) from None
        else:
            result.epochs.append(epoch)
            if earlier.spi in needed:
                sets[earlier.spi] = earlier
        epoch -= 1
    result.missing_spis = sorted(needed - set(sets))
    decryptor = HistoryDecryptor(key_length, sets.values())
    sinks = WavSinks(os.path.join(record_dir, "history")) if record_dir is not None else None
    try:
        for _now, received in decryptor.decrypt(capture.records):
            _marker, pt, sequence, timestamp, ssrc = parse_fixed_header(received.packet)
            payload = received.payload
            result.packets.append((ssrc, sequence, payload))
            if sinks is not None and pt == 0:  # PCMU (RFC 3551), as the live recording
                sinks.write(ssrc, payload, timestamp)
    finally:
        decryptor.close()
        if sinks is not None:
            sinks.close()
            result.recordings = sinks.paths()
    result.decrypted = dict(decryptor.decrypted)
    result.failures = dict(decryptor.failures)
    return result
