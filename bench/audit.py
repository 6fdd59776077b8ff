"""Benchmark: the cost of one audit record, SQLite and Redis (issue 14, "Audit trail").

For each store: N sequential ``append_audit`` calls (a KD "admitted" report of
realistic size, chained to the previous record: SHA-256 over the canonical
JSON, in Python for SQLite, in Lua inside the Redis script), then the same
with a signed checkpoint every 32 records (the KMF's default), then one
``audit_trail`` read plus ``verify_trail`` of the whole chain.  SQLite runs
with the daemon's settings (WAL, ``synchronous=FULL``: every record is on
disk when the call returns); Redis is a real ``redis-server`` on a free
loopback port with ``appendonly yes`` / ``appendfsync everysec`` (the
setting the store's documentation recommends).  It prints microseconds per
record (wall time, one writer, no concurrency) and the verify rate.

Usage: python bench/audit.py [--records N] [--no-redis]
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer, task

from perc_daemons.protocol.audit import sign_checkpoint, verify_trail
from perc_daemons.protocol.jose import public_jwk
from perc_daemons.store import Conference
from perc_daemons.store.redis import RedisConferenceStore
from perc_daemons.store.sqlite import SqliteConferenceStore

REDIS_SERVER = "/usr/bin/redis-server"
KEY = ec.generate_private_key(ec.SECP256R1())
JWKS = {"keys": [{**public_jwk(KEY.public_key()), "kid": "k", "alg": "ES256"}]}
DETAIL = {"association": "ab" * 16, "fingerprint": "cd" * 32, "md": "md1.example.com:9450",
          "epoch": 7, "ssrcs": [123456789, 987654321], "reported_at": 1790000000.25}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(store, cid: str, records: int) -> tuple[float, float, float, float]:
    await store.create(Conference(cid, title="bench", initiator="alice@example.com",
                                  created_at=time.time()))
    start = time.perf_counter()
    for _ in range(records):  # the round trip of a one-key read, for comparison
        await store.get(cid)
    read = (time.perf_counter() - start) / records
    start = time.perf_counter()
    for _ in range(records):
        await store.append_audit(cid, "admitted", "alice@example.com", DETAIL, time.time())
    plain = (time.perf_counter() - start) / records
    start = time.perf_counter()
    for n in range(records):
        record = await store.append_audit(cid, "admitted", "alice@example.com", DETAIL,
                                          time.time())
        if n % 32 == 31:
            await store.add_audit_checkpoint(sign_checkpoint(("k", KEY), issuer="i",
                                                             record=record, now=time.time()))
    checkpointed = (time.perf_counter() - start) / records
    start = time.perf_counter()
    chain, checkpoints = await store.audit_trail(cid)
    verify_trail(cid, chain, checkpoints, JWKS)
    verify = len(chain) / (time.perf_counter() - start)
    return plain, checkpointed, verify, read


def line(name: str, result: tuple[float, float, float, float]) -> None:
    plain, checkpointed, verify, read = result
    print(f"{name:<26} {plain * 1e6:6.0f} us/record, {checkpointed * 1e6:6.0f} with a "
          f"checkpoint every 32 (get(): {read * 1e6:4.0f} us); read+verify "
          f"{verify:6.0f} records/s")


async def run(reactor, args) -> None:
    print(f"audit write cost, {args.records} records per run, Python "
          f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPU(s)")
    directory = tempfile.mkdtemp(prefix="perc-bench-audit-")
    process = None
    try:
        sqlite = await SqliteConferenceStore.open(os.path.join(directory, "kmf.sqlite3"))
        try:
            line("SQLite (WAL, sync FULL)", await measure(sqlite, "bench", args.records))
        finally:
            await sqlite.close()
        if args.redis and os.access(REDIS_SERVER, os.X_OK):
            port, password = free_port(), secrets.token_hex(16)
            process = subprocess.Popen(
                [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                 "--appendonly", "yes", "--appendfsync", "everysec", "--dir", directory,
                 "--requirepass", password, "--logfile", "", "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            store = None
            for _ in range(100):
                try:
                    store = await RedisConferenceStore.open("127.0.0.1", port, password=password,
                                                            connect_timeout=1)
                    break
                except Exception:
                    await task.deferLater(reactor, 0.05, lambda: None)
            if store is None:
                raise SystemExit("redis-server did not start")
            try:
                line("Redis (AOF everysec, Lua)", await measure(store, "bench", args.records))
            finally:
                await store.close()
        elif args.redis:
            print(f"Redis: {REDIS_SERVER} not installed, skipped")
    finally:
        if process is not None:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--no-redis", dest="redis", action="store_false")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
