"""Benchmark: perc-kmf token issuance and key requests per second over real HTTPS.

Starts a real perc-kmf (``twistd perc-kmf`` subprocess, SQLite store, state in
a temporary directory, generated server certificate) on loopback, then
measures through real TLS with treq and a persistent connection pool (one
pool, i.e. one set of up to C kept-alive connections, per phase):

* token issuance: ``POST /oauth/token`` ``grant_type=client_credentials``
  with HTTP Basic client authentication (the client's secret is checked
  against its ``$sha256$`` hash, or with ``--argon2`` against a legacy
  argon2id hash with production parameters, as before issue 10);
* bogus token requests: the same with a wrong secret for that client
  (answered 401, then 429 beyond the failure limit): what a flood costs;
* key requests: ``POST /v1/conferences/{id}/keys`` of an invited identity,
  with its certificate-bound access token (PKCE flow) and its TLS client
  certificate; each answer's ``Encryption-Key`` is checked.

N requests, at most C in flight, after C warm-up requests (not counted) that
open the connections.  It prints requests/s (wall time) and p50/p99 latency
of each phase.  The KMF process and the temporary directory are always
removed at the end.

Usage: python bench/kmf.py [--requests N] [--concurrency C] [--argon2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import treq
from argon2 import PasswordHasher
from twisted.internet import defer, task
from twisted.web.client import Agent, HTTPConnectionPool

from tests.e2e.test_kmf_restart import (
    ADMIN_ID,
    ADMIN_SECRET,
    ENCRYPTION_KEY,
    FORM,
    Kmf,
    Policy,
    basic,
)

REQUESTS = 500
CONCURRENCY = 8
CONFERENCE = "bench-1"


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, -(-len(sorted_values) * fraction // 1))
    return sorted_values[int(rank) - 1]


@defer.inlineCallbacks
def measure(reactor, name: str, one, requests: int, concurrency: int):
    """Run ``one()`` (a Deferred) ``requests`` times, ``concurrency`` at a time."""
    yield defer.gatherResults([one() for _ in range(concurrency)], consumeErrors=True)
    latencies: list[float] = []
    remaining = [requests]

    @defer.inlineCallbacks
    def worker():
        while remaining[0] > 0:
            remaining[0] -= 1
            start = time.perf_counter()
            yield one()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    yield defer.gatherResults([worker() for _ in range(concurrency)], consumeErrors=True)
    elapsed = time.perf_counter() - start
    latencies.sort()
    print(f"{name:<16} {requests / elapsed:8.1f} req/s   "
          f"p50 {percentile(latencies, 0.50) * 1000:7.2f} ms   "
          f"p99 {percentile(latencies, 0.99) * 1000:7.2f} ms   "
          f"({requests} requests in {elapsed:.2f} s, concurrency {concurrency})", flush=True)


@defer.inlineCallbacks
def run(reactor, args):
    directory = tempfile.mkdtemp(prefix="perc-kmf-bench-")
    hasher = PasswordHasher() if args.argon2 else None
    pools = [HTTPConnectionPool(reactor, persistent=True) for _ in range(2)]
    for pool in pools:
        pool.maxPersistentPerHost = args.concurrency
        pool.retryAutomatically = False
    kmf = None
    try:
        kmf = Kmf(os.path.join(directory, "kmf"),
                  **({"client_secret_hash": hasher.hash} if hasher is not None else {}))
        yield kmf.start()
        admin = yield kmf.admin_token()
        yield kmf.conference(CONFERENCE, admin["access_token"])
        user = yield kmf.user_tokens()  # bound to kmf.alice_cert
        yield kmf.admit(CONFERENCE, 1)  # the KD's report: the key service serves members only
        kind = ("$sha256$" if hasher is None else f"argon2id t={hasher.time_cost} "
                f"m={hasher.memory_cost} KiB p={hasher.parallelism} (legacy)")
        print(f"perc-kmf (twistd, SQLite) on {kmf.base}, Python {platform.python_version()}, "
              f"{os.cpu_count()} CPUs; client secret {kind}", flush=True)

        token_agent = Agent(reactor, contextFactory=Policy(kmf.server_cert, None),
                            pool=pools[0])
        token_body = urllib.parse.urlencode({"grant_type": "client_credentials"}).encode()
        token_headers = {"Authorization": basic(ADMIN_ID, ADMIN_SECRET), "Content-Type": FORM}

        @defer.inlineCallbacks
        def token():
            response = yield treq.post(kmf.base + "/oauth/token", data=token_body,
                                       headers=token_headers, agent=token_agent, timeout=30)
            body = yield treq.json_content(response)
            if response.code != 200 or "access_token" not in body:
                raise RuntimeError(f"token: {response.code} {body!r}")

        bogus_headers = {"Authorization": basic(ADMIN_ID, ADMIN_SECRET[:-1] + "!"),
                         "Content-Type": FORM}

        @defer.inlineCallbacks
        def bogus():
            response = yield treq.post(kmf.base + "/oauth/token", data=token_body,
                                       headers=bogus_headers, agent=token_agent, timeout=30)
            yield treq.content(response)
            if response.code not in (401, 429):
                raise RuntimeError(f"bogus token request: {response.code}")

        key_agent = Agent(reactor, contextFactory=Policy(kmf.server_cert, kmf.alice_cert),
                          pool=pools[1])
        key_url = f"{kmf.base}/v1/conferences/{CONFERENCE}/keys"
        key_headers = {"Authorization": f"Bearer {user['access_token']}"}

        @defer.inlineCallbacks
        def key():
            response = yield treq.post(key_url, headers=key_headers, agent=key_agent,
                                       timeout=30)
            content = yield treq.content(response)
            header = (response.headers.getRawHeaders("encryption-key") or [""])[0]
            match = ENCRYPTION_KEY.fullmatch(header)
            if response.code != 200 or match is None or match["keyid"] != f"{CONFERENCE}/1":
                raise RuntimeError(f"key: {response.code} {header!r} {content[:300]!r}")

        yield measure(reactor, "token issuance", token, args.requests, args.concurrency)
        yield measure(reactor, "bogus tokens", bogus, args.requests, args.concurrency)
        yield measure(reactor, "key requests", key,
                      args.requests, args.concurrency)
    finally:
        for pool in pools:
            yield pool.closeCachedConnections()
        if kmf is not None:
            if kmf.running:
                try:
                    yield kmf.stop()
                except Exception:
                    pass
            yield kmf.kill()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=REQUESTS,
                        help=f"requests per phase (default {REQUESTS})")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY,
                        help=f"requests in flight (default {CONCURRENCY})")
    parser.add_argument("--argon2", action="store_true",
                        help="give the client a legacy argon2id secret_hash (t=3 m=64 MiB p=4, "
                             "the form before issue 10)")
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    task.react(run, [args])


if __name__ == "__main__":
    main()
