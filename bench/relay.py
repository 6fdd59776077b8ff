"""Benchmark: the MD's per-packet relay against plain libsrtp, in one run.

For 1200-byte RTP payloads from one sender (pinned seed), it measures:

* relay: what the MD does per packet (RFC 8723 section 5.2): find and keep the
  EKTField, outer layer off with the sender's HBH key (replay-checked),
  optionally an OHB edit (SEQ rewritten, original recorded), outer layer on
  with each receiver's HBH key, EKTField re-appended; once forwarding only
  (the common case) and once with an edit on every packet;
* baseline: pylibsrtp (C libsrtp) unprotect with the sender's key and protect
  with each receiver's key of single-layer SRTP packets of the same size.

Both are run for 1 and for 10 receivers.  It prints relayed packets per second
of CPU time (one core) for each and the ratio of our CPU time per packet to
the baseline's.  Targets (issue 3): ratio <= 1.3 and >= 100k relayed
packets/s for one receiver.  CPU time is process time, so other load on the
machine matters less than wall time would; still, compare ratios, not
absolute figures, between machines.

Usage: python bench/relay.py [--packets N] [--rounds N]
"""

from __future__ import annotations

import argparse
import gc
import random
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pylibsrtp import Policy, Session

from perc_daemons.protocol import double
from perc_daemons.protocol.ekt import EktCipher, EktParameterSet, EktSender
from perc_daemons.protocol.srtp import SrtpContext, libsrtp_session

SEED = 8723
PAYLOAD = 1200
SSRC = 0x5EED0001


def make_inputs(count: int, receivers: int):
    rng = random.Random(SEED)
    key = lambda n: rng.randbytes(n)  # noqa: E731
    sender_outer = (key(16), key(12))
    receiver_keys = [(key(16), key(12)) for _ in range(receivers)]
    params = EktParameterSet(key=key(16), cipher=EktCipher.AESKW_128, master_salt=key(12),
                             spi=1, ttl=3600)
    ekt = EktSender(SSRC, 16, params, 0.0, random_bytes=rng.randbytes)
    sender = double.DoubleSender(SrtpContext(*sender_outer), ekt)
    plain = []
    for i in range(count):
        header = struct.pack("!BBHII", 0x80, 96, i & 0xFFFF, i * 3000, SSRC)
        plain.append(header + rng.randbytes(PAYLOAD))
    # 50 packets/s of media time: Full EKT fields appear as a real sender sends them.
    protected = [sender.protect(p, i * 0.02) for i, p in enumerate(plain)]
    # Baseline input: single-layer SRTP of the same size as the double packets.
    libsrtp_key = sender_outer[0] + sender_outer[1]
    tx = Session(Policy(key=libsrtp_key, ssrc_type=Policy.SSRC_ANY_OUTBOUND,
                        srtp_profile=Policy.SRTP_PROFILE_AEAD_AES_128_GCM))
    baseline_in = [tx.protect(p[:12] + rng.randbytes(len(d) - 12 - 16 - 1))
                   for p, d in zip(plain, protected, strict=True)]
    return sender_outer, receiver_keys, protected, baseline_in


def run_relay(sender_outer, receiver_keys, packets, edit: bool) -> float:
    inbound = libsrtp_session(*sender_outer, inbound=True)
    outbound = [libsrtp_session(*k, inbound=False) for k in receiver_keys]
    relay = double.Relay()
    sent = 0
    start = time.process_time()
    for packet in packets:
        relay.open(packet, inbound)
        if edit:
            # The MD renumbers SEQ (e.g. after dropping a layer): original goes to the OHB.
            relay.edit(seq=(sent + 7) & 0xFFFF)
        for context in outbound:
            relay.seal(context)
        sent += 1
    return time.process_time() - start


def run_baseline(sender_outer, receiver_keys, packets) -> float:
    rx = Session(Policy(key=sender_outer[0] + sender_outer[1], ssrc_type=Policy.SSRC_ANY_INBOUND,
                        srtp_profile=Policy.SRTP_PROFILE_AEAD_AES_128_GCM))
    txs = [Session(Policy(key=k + s, ssrc_type=Policy.SSRC_ANY_OUTBOUND,
                          srtp_profile=Policy.SRTP_PROFILE_AEAD_AES_128_GCM))
           for k, s in receiver_keys]
    start = time.process_time()
    for packet in packets:
        plain = rx.unprotect(packet)
        for tx in txs:
            tx.protect(plain)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5, help="best of N rounds")
    args = parser.parse_args()
    print(f"perc-daemons relay benchmark: {args.packets} packets of {PAYLOAD}-byte payload, "
          f"best of {args.rounds} rounds, CPU time (python {sys.version.split()[0]})")
    for receivers in (1, 10):
        inputs = make_inputs(args.packets, receivers)
        sender_outer, receiver_keys, protected, baseline_in = inputs
        gc.collect()
        gc.disable()
        try:
            base = min(run_baseline(sender_outer, receiver_keys, baseline_in)
                       for _ in range(args.rounds))
            for edit in (False, True):
                ours = min(run_relay(sender_outer, receiver_keys, protected, edit)
                           for _ in range(args.rounds))
                n = args.packets
                label = "forward + OHB edit" if edit else "forward          "
                print(f"receivers={receivers:2d}  {label}: {n / ours:8.0f} packets/s in "
                      f"({n * receivers / ours:8.0f} out/s, {ours / n * 1e6:5.2f} us/packet)"
                      f"   libsrtp baseline {base / n * 1e6:5.2f} us/packet"
                      f"   ratio {ours / base:.2f}")
        finally:
            gc.enable()


if __name__ == "__main__":
    main()
