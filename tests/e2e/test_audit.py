"""The audit trail agrees with what the endpoints saw (issue 14, "Audit trail"), real daemons.

A real perc-kmf, perc-md and perc-kd (twistd, the recording tunnel tap) and
reference endpoints run a conference: four joins, a member fetching its key
over HTTPS, a leave (close_notify), an invitation withdrawn while joined, the
policy changed to a 2 s ``rekey_interval`` and back (a timed epoch with
nobody joining or leaving between), a leave over the MD's HTTPS API alone (no
close_notify: the MD tells the KD why, EndpointDisconnect's private reason
byte), and the end.  Then
``perc-admin audit export CONF --jsonl`` and ``perc-admin audit verify``
(intact: exit 0, also offline with ``--file`` and a saved JWKS), and the
exported trail is checked event by event against the endpoints:

* one ``admitted`` per endpoint with its identity, the SHA-256 of the DTLS
  certificate it offered, its MD (the tunnel address the KD knows it by), its
  association and the epoch of the first EKT key it installed;
* every ``epoch-started`` with its cause, its members the associations that
  installed that epoch's SPI (the KMF's ``epoch`` record names it), and each
  endpoint's installed SPIs exactly those of the epochs it was a member of;
* each ``left`` with its reason (``close_notify``, ``uninvited``, ``md_leave``,
  ``conference_ended``), the ``uninvited`` record before the uninvited
  member's leave, ``policy-changed`` with the changes and who made them (the
  admin token's subject), ``key-delivered`` with the certificate the endpoint
  fetched with, ``ended``;

then the SQLite file is edited under the running KMF (a record's detail
changed, a record deleted, two records swapped) and ``verify`` fails naming
the record each time, and passes again once the file is restored.  With the
KMF on a real redis-server (:class:`RedisAuditTests`) the same for the Redis
list (LSET, LREM).

The trail's kinds and counts are printed (stderr) for the note.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor

from perc_daemons.endpoint.kmf import KmfRefused
from perc_daemons.kmf.admin_cli import run as admin_run
from perc_daemons.protocol.audit import AuditRecord, parse_export
from perc_daemons.protocol.dtls import certificate_fingerprint
from perc_daemons.site_setup import ADMIN_CLIENT
from tests.e2e.conference_support import RecordingEndpoint, StackTestCase, wait_for
from tests.unit.test_store import RedisServer


class _AuditCase(StackTestCase):
    timeout = 150
    users = ("alice", "bob", "carol", "erin")
    invited = ("alice", "bob", "carol", "erin")
    conference = "audited"

    # --- the KMF and perc-admin ---------------------------------------------------------

    async def kmf(self, method: str, suffix: str = "", body: Any = None) -> Any:
        token = await self.stack.admin_token()
        code, answer = await self.stack.request(
            method, f"{self.stack.kmf_url}/v1/conferences/{self.conference}{suffix}",
            token=token, body=body)
        self.assertEqual(code, 200, answer)
        return answer

    async def records(self) -> list[dict[str, Any]]:
        return list((await self.kmf("GET", "/audit"))["records"])

    async def wait_record(self, what: str, match: Callable[[dict[str, Any]], bool],
                          timeout: float = 20.0) -> dict[str, Any]:
        """Until the trail holds a record ``match`` accepts (the KD reports in batches)."""
        found: list[dict[str, Any]] = []
        deadline = reactor.seconds() + timeout
        while True:
            found = [r for r in await self.records() if match(r)]
            if found:
                return found[-1]
            self.assertLess(reactor.seconds(), deadline, f"not in the trail: {what}")
            await wait_for(lambda: True, "a moment", timeout=0.2)

    async def admin(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await admin_run([*argv, "--url", self.stack.kmf_url, "--config",
                                os.path.join(self.stack.dir, "etc", "admin.toml")],
                               reactor, stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    async def verify(self) -> tuple[int, str]:
        code, out, err = await self.admin("audit", "verify", self.conference)
        return code, out + err

    async def assertBroken(self, seq: int, reason: str) -> None:
        code, text = await self.verify()
        self.assertEqual(code, 1, text)
        self.assertIn(f"does not verify ({reason})", text)
        self.assertIn(f"record {seq}:", text)
        sys.stderr.write(f"\ntampered ({type(self).__name__}): {text.strip()}\n")

    async def export(self) -> tuple[str, list[AuditRecord], list[Any]]:
        path = os.path.join(self.stack.dir, f"audit-{secrets.token_hex(4)}.jsonl")
        code, out, err = await self.admin("audit", "export", self.conference, "--jsonl",
                                          "--output", path)
        self.assertEqual((code, err), (0, ""), out)
        with open(path, encoding="ascii") as f:
            conference, records, checkpoints = parse_export(f)
        self.assertEqual(conference, self.conference)
        return path, records, checkpoints

    async def verify_offline(self, path: str) -> tuple[int, str]:
        code, jwks = await self.stack.request("GET", self.stack.kmf_url
                                              + "/.well-known/jwks.json")
        self.assertEqual(code, 200)
        jwks_path = path + ".jwks.json"
        with open(jwks_path, "w", encoding="utf-8") as f:
            json.dump(jwks, f)
        out, err = io.StringIO(), io.StringIO()
        code = await admin_run(["audit", "verify", "--file", path, "--jwks", jwks_path],
                               reactor, stdout=out, stderr=err)
        return code, out.getvalue() + err.getvalue()

    async def fetch_key(self, endpoint: RecordingEndpoint) -> tuple[int, int | None]:
        """The key service's answer (epoch) once the KD's roster names the endpoint (it
        follows the EKTKey by a KMF round trip), and the SPI it held then."""
        assert endpoint.kmf is not None
        deadline = reactor.seconds() + 10
        while True:
            spi = endpoint.current_spi
            try:
                epoch, _key = await endpoint.kmf.conference_key(self.conference)
            except KmfRefused as e:
                if e.status != 403 or reactor.seconds() > deadline:
                    raise
                await wait_for(lambda: True, "a moment", timeout=0.2)
                continue
            if spi == endpoint.current_spi:
                return epoch, spi

    # --- what the endpoints saw ---------------------------------------------------------

    def md_name(self) -> str:
        """How the KD names the MD (its tunnel address; the tap's with a tap)."""
        return f"localhost:{self.stack.taps['md'].port}"

    @staticmethod
    def association(endpoint: RecordingEndpoint) -> str:
        assert endpoint.joined is not None
        return uuid.UUID(endpoint.joined.association).hex

    @staticmethod
    def fingerprint(endpoint: RecordingEndpoint) -> str:
        assert endpoint._certificate is not None
        return certificate_fingerprint(endpoint._certificate[0]).hex()

    def summary(self, records: list[AuditRecord], checkpoints: list[Any], title: str) -> None:
        kinds = Counter(r.kind for r in records)
        causes = Counter(r.detail.get("cause") for r in records if r.kind == "epoch-started")
        reasons = Counter(r.detail.get("reason") for r in records if r.kind == "left")
        text = (f"\n{title}: {len(records)} records, {len(checkpoints)} checkpoints; "
                + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
                + "; epoch causes " + ", ".join(f"{k} {n}" for k, n in sorted(causes.items()))
                + "; leave reasons " + ", ".join(f"{k} {n}" for k, n in sorted(reasons.items()))
                + "\n")
        sys.stderr.write(text)
        with open(os.path.join(self.stack.dir, "audit-summary.txt"), "a",
                  encoding="utf-8") as f:
            f.write(text)

    def check_against_endpoints(self, records: list[AuditRecord],
                                endpoints: dict[str, RecordingEndpoint],
                                seen: dict[str, dict[str, str]]) -> None:
        """Admissions and epochs of the trail against what each endpoint installed."""
        self.assertEqual([r.seq for r in records], list(range(1, len(records) + 1)))
        spi_of = {r.detail["epoch"]: r.detail["spi"] for r in records if r.kind == "epoch"}
        by_association = {seen[user]["association"]: user for user in endpoints}
        admitted = [r for r in records if r.kind == "admitted"]
        self.assertEqual(sorted(r.identity for r in admitted),
                         sorted(self.stack.identity(u) for u in endpoints))
        first_epoch: dict[str, int] = {}
        for r in admitted:
            user = by_association[r.detail["association"]]
            self.assertEqual(r.identity, self.stack.identity(user))
            self.assertEqual(r.detail["fingerprint"], seen[user]["fingerprint"], user)
            self.assertEqual(r.detail["md"], self.md_name(), user)
            self.assertEqual(r.detail["ssrcs"], [endpoints[user].ssrc], user)
            # the epoch of its first key: the first SPI the endpoint installed
            self.assertEqual(spi_of[r.detail["epoch"]], endpoints[user].epochs_installed[0],
                             user)
            first_epoch[user] = r.detail["epoch"]
        started = [r for r in records if r.kind == "epoch-started"]
        self.assertTrue(started)
        members_of: dict[int, set[str]] = {}
        for r in started:
            members = {m["association"] for m in r.detail["members"]}
            self.assertLessEqual(members, set(by_association), r)
            for m in r.detail["members"]:
                self.assertEqual(m["identity"],
                                 self.stack.identity(by_association[m["association"]]))
            self.assertIn(r.detail["cause"], r.detail["causes"])
            members_of[r.detail["epoch"]] = members
            for association in members:  # every member installed the epoch's key
                user = by_association[association]
                self.assertIn(spi_of[r.detail["epoch"]], endpoints[user].epochs_installed,
                              f"{user} is listed in epoch {r.detail['epoch']}")
        for user, endpoint in endpoints.items():
            # what it installed: its first key's epoch and those it was a member of
            expected = {spi_of[first_epoch[user]]} | {
                spi_of[e] for e, members in members_of.items()
                if seen[user]["association"] in members}
            self.assertEqual(set(endpoint.epochs_installed), expected, user)


class AuditTrailTests(_AuditCase):

    def sqlite_path(self) -> str:
        return os.path.join(self.stack.dir, "kmf", "kmf.sqlite3")

    async def test_the_trail_agrees_with_the_endpoints_and_tampering_is_named(self) -> None:
        identity = self.stack.identity
        eps = await self.join("alice", "bob", "carol", "erin")
        alice, bob, carol, erin = (eps[u] for u in ("alice", "bob", "carol", "erin"))
        seen = {user: {"association": self.association(ep), "fingerprint": self.fingerprint(ep)}
                for user, ep in eps.items()}
        sending = alice.run_media(60.0)
        # a member fetches the key it holds over HTTPS (its DTLS certificate as TLS
        # client certificate): key-delivered, never the key
        fetched_epoch, spi_at_fetch = await self.fetch_key(alice)
        # bob leaves (close_notify, then the MD's DELETE)
        await bob.leave()
        await self.wait_record("bob's leave", lambda r: r["kind"] == "left"
                               and r["identity"] == identity("bob"))
        # carol's invitation is withdrawn while she is in the call
        await self.kmf("DELETE", f"/invitations/{identity('carol')}")
        await wait_for(lambda: carol.closed_reason is not None, "carol closed by the KD")
        await self.wait_record("carol's leave", lambda r: r["kind"] == "left"
                               and r["identity"] == identity("carol"))
        await self.same_epoch(alice, erin)
        # the policy: a rekey every 2 s, then off again; nobody joins or leaves between
        changed_at = reactor.seconds()
        await self.kmf("PATCH", body={"rekey_interval": 2})
        await wait_for(lambda: alice.installed(since=changed_at + 1.5)
                       and erin.installed(since=changed_at + 1.5),
                       "a timed epoch at alice and erin", timeout=15)
        await self.kmf("PATCH", body={"rekey_interval": 0})
        await self.wait_record("the timed epoch", lambda r: r["kind"] == "epoch-started"
                               and r["detail"]["cause"] == "timer")
        await self.same_epoch(alice, erin)
        # erin leaves over the MD's HTTPS API alone: no close_notify reaches the KD
        assert erin.md is not None and erin.joined is not None
        erin_left_at = reactor.seconds()
        await erin.md.leave(self.conference, erin.joined)
        await self.wait_record("erin's leave", lambda r: r["kind"] == "left"
                               and r["identity"] == identity("erin"))
        await wait_for(lambda: alice.installed(since=erin_left_at), "alice rekeyed without erin")
        alice.stop_media()
        await sending
        # the end
        await self.stack.end_conference(self.conference)
        await wait_for(lambda: alice.closed_reason is not None, "alice closed at the end")
        await self.wait_record("alice's leave at the end", lambda r: r["kind"] == "left"
                               and r["identity"] == identity("alice"))

        # --- export, verify, and the trail event by event --------------------------------
        path, records, checkpoints = await self.export()
        code, text = await self.verify()
        self.assertEqual(code, 0, text)
        self.assertRegex(text, rf"verified: {len(records)} record\(s\) 1-{len(records)}, "
                               rf"\d+ checkpoint\(s\), signed through record {len(records)}")
        code, text = await self.verify_offline(path)
        self.assertEqual(code, 0, text)
        self.summary(records, checkpoints, "SQLite trail")
        self.check_against_endpoints(records, eps, seen)

        def one(kind: str, **where: Any) -> AuditRecord:
            found = [r for r in records if r.kind == kind and all(
                (r.identity if k == "identity" else r.detail.get(k)) == v
                for k, v in where.items())]
            self.assertEqual(len(found), 1, f"{kind} {where}: {found}")
            return found[0]

        created = one("created")
        self.assertEqual(created.seq, 1)
        self.assertEqual(created.identity, identity("alice"))
        self.assertEqual(created.detail["invited"], sorted(identity(u) for u in self.invited))
        left = {user: one("left", identity=identity(user)) for user in eps}
        self.assertEqual({u: r.detail["reason"] for u, r in left.items()},
                         {"alice": "conference_ended", "bob": "close_notify",
                          "carol": "uninvited", "erin": "md_leave"})
        for user, r in left.items():
            self.assertEqual(r.detail["association"], seen[user]["association"], user)
            self.assertEqual(r.detail["md"], self.md_name(), user)
        uninvited = one("uninvited", identity=identity("carol"))
        ended = one("ended")
        self.assertLess(uninvited.seq, left["carol"].seq)
        self.assertLess(left["bob"].seq, uninvited.seq)
        self.assertLess(left["erin"].seq, ended.seq)
        self.assertLess(ended.seq, left["alice"].seq)
        # each leave (and the uninvite) started an epoch without the one gone; every
        # epoch this KD started says why (no admin asked for one: none is "manual")
        started = [r for r in records if r.kind == "epoch-started"]
        self.assertNotIn("manual", {r.detail["cause"] for r in started})
        for user in ("bob", "carol", "erin"):
            after = [r for r in started if r.seq > left[user].seq]
            self.assertTrue(after, f"no epoch after {user} left")
            self.assertEqual(after[0].detail["cause"], "leave", after[0])
            self.assertNotIn(seen[user]["association"],
                             {m["association"] for m in after[0].detail["members"]})
        # the policy changes, with who made them
        changes = [r for r in records if r.kind == "policy-changed"]
        self.assertEqual([r.detail["changes"] for r in changes],
                         [{"rekey_interval": 2.0}, {"rekey_interval": 0.0}])
        self.assertEqual({r.detail.get("by") for r in changes}, {ADMIN_CLIENT})
        # the timed epoch(s): between them, nobody joined or left; members alice, erin
        timed = [r for r in started if r.detail["cause"] == "timer"]
        self.assertTrue(timed)
        for r in timed:
            self.assertLess(changes[0].seq, r.seq)
            self.assertLess(r.seq, left["erin"].seq)
            self.assertEqual({m["association"] for m in r.detail["members"]},
                             {seen["alice"]["association"], seen["erin"]["association"]})
            self.assertEqual(r.detail["causes"], ["timer"])
        between = [r for r in records if timed[0].seq <= r.seq <= timed[-1].seq]
        self.assertFalse([r for r in between if r.kind in ("admitted", "left")], between)
        # the key alice fetched over HTTPS
        delivered = one("key-delivered", recipient="endpoint")
        self.assertEqual(delivered.identity, identity("alice"))
        self.assertEqual(delivered.detail["certificate"], seen["alice"]["fingerprint"])
        self.assertEqual(delivered.detail["epoch"], fetched_epoch)
        self.assertEqual(delivered.detail["spi"], spi_at_fetch)
        self.assertTrue(all(r.detail["recipient"] == "kd" for r in records
                            if r.kind == "key-delivered" and r is not delivered))
        # nothing of a key: no record names a key-like member (the store refuses them)
        self.assertNotIn('"key"', "\n".join(json.dumps(r.detail) for r in records))
        self.assertEqual(checkpoints[-1].seq, records[-1].seq)

        # --- tampering with the SQLite file under the running KMF ------------------------
        await self.tamper_sqlite(left["bob"].seq, ended.seq)

    async def tamper_sqlite(self, victim: int, other: int) -> None:
        db = sqlite3.connect(self.sqlite_path(), isolation_level=None)
        self.addCleanup(db.close)
        db.execute("PRAGMA busy_timeout = 5000")
        cid = self.conference
        original = db.execute("SELECT seq, detail FROM audit WHERE conference_id = ? AND "
                              "number = ?", (cid, victim)).fetchone()
        # a record's content edited (bob "was uninvited")
        db.execute("UPDATE audit SET detail = ? WHERE seq = ?",
                   (original[1].replace("close_notify", "uninvited"), original[0]))
        await self.assertBroken(victim, "edited")
        db.execute("UPDATE audit SET detail = ? WHERE seq = ?", (original[1], original[0]))
        code, text = await self.verify()
        self.assertEqual(code, 0, text)
        # a record deleted
        row = db.execute("SELECT * FROM audit WHERE seq = ?", (original[0],)).fetchone()
        db.execute("DELETE FROM audit WHERE seq = ?", (original[0],))
        await self.assertBroken(victim, "missing")
        db.execute(f"INSERT INTO audit VALUES ({', '.join('?' * len(row))})", row)
        code, text = await self.verify()
        self.assertEqual(code, 0, text)
        # two records swapped (stored order: the rowid)
        a, b = (db.execute("SELECT seq FROM audit WHERE conference_id = ? AND number = ?",
                           (cid, n)).fetchone()[0] for n in (victim, other))
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE audit SET seq = -1 WHERE seq = ?", (a,))
        db.execute("UPDATE audit SET seq = ? WHERE seq = ?", (a, b))
        db.execute("UPDATE audit SET seq = ? WHERE seq = -1", (b,))
        db.execute("COMMIT")
        # the record found first at the victim's place is another one
        await self.assertBroken(other, "out_of_order")
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE audit SET seq = -1 WHERE seq = ?", (a,))
        db.execute("UPDATE audit SET seq = ? WHERE seq = ?", (a, b))
        db.execute("UPDATE audit SET seq = ? WHERE seq = -1", (b,))
        db.execute("COMMIT")
        code, text = await self.verify()
        self.assertEqual(code, 0, text)


class RedisAuditTests(_AuditCase):
    """The KMF on a real redis-server: the same trail, tampered with in the Redis list."""

    users = ("alice", "bob")
    invited = ("alice", "bob")

    async def setUp(self) -> None:
        redis_dir = os.path.abspath(self.mktemp())
        os.makedirs(redis_dir)
        self.redis = RedisServer(redis_dir)
        await self.redis.start()
        self.namespace = f"perc-{secrets.token_hex(4)}"
        password_file = os.path.join(redis_dir, "password")
        with open(password_file, "w", encoding="utf-8") as f:
            f.write(self.redis.password + "\n")
        os.chmod(password_file, 0o600)
        self.settings = {"kmf": {"store": {
            "backend": "redis", "redis_host": "127.0.0.1", "redis_port": self.redis.port,
            "redis_password_file": password_file, "redis_namespace": self.namespace}}}
        try:
            await super().setUp()
        except BaseException:
            await self.redis.stop()
            raise

    async def tearDown(self) -> None:
        try:
            await super().tearDown()
        finally:
            await self.redis.stop()

    def redis_cli(self, *args: str) -> str:
        done = subprocess.run(["redis-cli", "--no-auth-warning", "-h", "127.0.0.1", "-p",
                               str(self.redis.port), "-a", self.redis.password, *args],
                              capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.rstrip("\n")

    async def test_redis_trail_verifies_and_tampering_is_named(self) -> None:
        identity = self.stack.identity
        eps = await self.join("alice", "bob")
        seen = {user: {"association": self.association(ep), "fingerprint": self.fingerprint(ep)}
                for user, ep in eps.items()}
        left_at = reactor.seconds()
        await eps["bob"].leave()
        await self.wait_record("bob's leave", lambda r: r["kind"] == "left"
                               and r["identity"] == identity("bob"))
        await wait_for(lambda: eps["alice"].installed(since=left_at), "alice rekeyed")
        await self.wait_record("the epoch without bob", lambda r: r["kind"] == "epoch-started"
                               and r["detail"]["cause"] == "leave")
        await self.stack.end_conference(self.conference)
        await self.wait_record("alice's leave at the end", lambda r: r["kind"] == "left"
                               and r["identity"] == identity("alice"))
        _path, records, checkpoints = await self.export()
        code, text = await self.verify()
        self.assertEqual(code, 0, text)
        self.summary(records, checkpoints, "Redis trail")
        self.check_against_endpoints(records, eps, seen)
        self.assertEqual({r.identity: r.detail["reason"] for r in records if r.kind == "left"},
                         {identity("alice"): "conference_ended",
                          identity("bob"): "close_notify"})
        # the Redis list, edited directly
        key = f"{self.namespace}:conf:{self.conference}:audit"
        victim = next(r.seq for r in records if r.kind == "left")
        raw = self.redis_cli("LINDEX", key, str(victim - 1))
        self.assertEqual(json.loads(raw)["seq"], victim)
        self.redis_cli("LSET", key, str(victim - 1), raw.replace("close_notify", "uninvited"))
        await self.assertBroken(victim, "edited")
        self.redis_cli("LSET", key, str(victim - 1), raw)
        code, text = await self.verify()
        self.assertEqual(code, 0, text)
        self.redis_cli("LSET", key, str(victim - 1), "DELETED")
        self.redis_cli("LREM", key, "1", "DELETED")
        await self.assertBroken(victim, "missing")
        # put it back where it was
        after = self.redis_cli("LINDEX", key, str(victim - 1))
        self.redis_cli("LINSERT", key, "BEFORE", after, raw)
        code, text = await self.verify()
        self.assertEqual(code, 0, text)
        self.assertTrue(re.search(r"verified: \d+ record", text), text)
