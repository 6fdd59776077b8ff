"""``GET /v1/conferences/{cid}/invitations/{identity}``: the KD's admission check.

Real KMF over real TLS on loopback with SQLite and real tokens (the set-up of
:mod:`tests.unit.test_kmf_api`); the group test runs a real ldaptor LDAP
server (the directory of :mod:`tests.unit.test_auth`: alice is in eng, all
and admins; bob in all and ops; alicia in none).
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from perc_daemons import config
from perc_daemons.kmf import service
from perc_daemons.kmf.api import GroupCache
from perc_daemons.kmf.auth import BackendUnavailable
from tests.unit import test_kmf_api
from tests.unit.test_auth import LdapTestMixin
from tests.unit.test_kmf_api import ALICE, BOB, DOMAIN
from tests.unit.test_kmf_groups import ALICIA, ldap_settings

CAROL = "carol@example.com"


def path(cid: str, identity: str) -> str:
    return f"/v1/conferences/{cid}/invitations/{identity}"


class InvitationHelpers:
    # the HTTPS client and token helpers of the KMF API tests (through the
    # module: a TestCase bound to a name here would be collected again)
    open_store = test_kmf_api.KmfApiTests.open_store
    token = test_kmf_api.KmfApiTests.token
    alice = test_kmf_api.KmfApiTests.alice
    admin = test_kmf_api.KmfApiTests.admin
    kd = test_kmf_api.KmfApiTests.kd
    call = test_kmf_api.KmfApiTests.call
    ok = test_kmf_api.KmfApiTests.ok
    problem = test_kmf_api.KmfApiTests.problem

    async def conference(self, cid: str = "conf-1", *, invited=(ALICE,), groups=(),
                         start: bool = True, late: bool = False) -> None:
        await self.ok("POST", "/v1/conferences", 201, token=self.admin(),
                      body={"id": cid, "invited": list(invited), "invited_groups": list(groups),
                            "late_joiners_get_earlier_epochs": late})
        if start:
            await self.ok("POST", f"/v1/conferences/{cid}/start", token=self.admin())

    async def status(self, cid: str, identity: str, token: str | None = None) -> dict:
        response, body = await self.ok("GET", path(cid, identity), token=token or self.kd(),
                                       cert=None)
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        return body


class InvitationTests(InvitationHelpers, unittest.TestCase):
    timeout = 20

    setUp = test_kmf_api.KmfApiTests.setUp

    async def test_invited_and_not_invited(self):
        await self.conference(invited=(ALICE,))
        policy = {"late_joiners_get_earlier_epochs": False, "late_join": "none",
                  "rekey_interval": 0.0, "schedule": "open", "starts_at": None,
                  "admission_opens_at": None}
        self.assertEqual(await self.status("conf-1", ALICE), {
            "conference": "conf-1", "identity": ALICE, "invited": True, "state": "running",
            **policy})
        self.assertEqual(await self.status("conf-1", BOB), {
            "conference": "conf-1", "identity": BOB, "invited": False, "state": "running",
            **policy})
        # admin may ask too; an invitation shows at once, a withdrawn one is gone
        await self.ok("POST", "/v1/conferences/conf-1/invitations", token=self.admin(),
                      body={"identity": BOB})
        self.assertTrue((await self.status("conf-1", BOB, self.admin()))["invited"])
        await self.ok("DELETE", path("conf-1", BOB), token=self.admin())
        self.assertFalse((await self.status("conf-1", BOB))["invited"])

    async def test_identity_is_percent_decoded(self):
        await self.conference(invited=(ALICE,))
        body = await self.status("conf-1", "alice%40example.com")
        self.assertEqual((body["identity"], body["invited"]), (ALICE, True))
        await self.problem("GET", path("conf-1", "not-an-identity"), 400, "invalid-request",
                           token=self.kd())

    async def test_state_and_late_joiner_policy_reported(self):
        await self.conference("sched", invited=(ALICE,), start=False, late=True)
        body = await self.status("sched", ALICE)
        self.assertEqual((body["state"], body["invited"], body["late_joiners_get_earlier_epochs"]),
                         ("scheduled", True, True))
        await self.conference("conf-1", invited=(ALICE,))
        await self.ok("POST", "/v1/conferences/conf-1/end", token=self.admin())
        body = await self.status("conf-1", ALICE)
        self.assertEqual((body["state"], body["late_joiners_get_earlier_epochs"]),
                         ("ended", False))

    async def test_scope_and_authentication(self):
        await self.conference()
        where = path("conf-1", ALICE)
        response, _ = await self.problem("GET", where, 401, "unauthorized")
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"),
                         ['Bearer realm="perc-kmf"'])
        for scope in ("keys", "identity"):
            response, _ = await self.problem("GET", where, 403, "insufficient-scope",
                                             token=self.alice(scope))
            self.assertIn('scope="kd admin"',
                          response.headers.getRawHeaders("www-authenticate")[0])
        # the token's own subject does not matter: a keys token cannot ask for itself
        await self.problem("GET", where, 403, "insufficient-scope",
                           token=self.token(["keys"], subject=ALICE))

    async def test_unknown_conference(self):
        for cid in ("nope", "no%20pe"):
            _, body = await self.problem("GET", path(cid, ALICE), 404, "not-found",
                                         token=self.kd())
            self.assertEqual(body["detail"], "no such conference")

    async def test_method_not_allowed_lists_get_and_delete(self):
        await self.conference()
        response, _ = await self.problem("PUT", path("conf-1", ALICE), 405,
                                         "method-not-allowed", token=self.kd())
        self.assertEqual(response.headers.getRawHeaders("allow"), ["DELETE, GET"])


class GroupInvitationStatusTests(InvitationHelpers, LdapTestMixin, unittest.TestCase):
    """LDAP groups are honoured as by the key service."""

    timeout = 20

    async def setUp(self):
        self.ldap_server, ldap_port = self.start_ldap()
        cfg = config.validate("kmf", "kmf.toml", {
            "idp": {"domain": DOMAIN},
            "auth": {"backends": ["file", "ldap"], "ldap": ldap_settings(ldap_port)}})
        self.ldap = service.ldap_authenticator(cfg, reactor)
        await test_kmf_api.KmfApiTests.setUp(self)
        self.api.groups = GroupCache(self.ldap.groups, clock=reactor)

    async def test_group_members_invited(self):
        await self.conference("conf-g", invited=(CAROL,), groups=("OPS",))
        self.assertTrue((await self.status("conf-g", BOB))["invited"])  # ops, case-folded
        for who in (ALICE, ALICIA):
            self.assertFalse((await self.status("conf-g", who))["invited"], who)
        connections = self.ldap_server.connections
        self.assertTrue((await self.status("conf-g", CAROL))["invited"])  # by name
        self.assertEqual(self.ldap_server.connections, connections)  # no look-up needed

    async def test_directory_down_is_503(self):
        await self.conference("conf-g", invited=(CAROL,), groups=("ops",))
        self.api.groups = GroupCache(lambda identity: defer.fail(BackendUnavailable("down")),
                                     clock=reactor)
        await self.problem("GET", path("conf-g", BOB), 503, "directory-unavailable",
                           token=self.kd())
        self.assertTrue((await self.status("conf-g", CAROL))["invited"])
