"""perc-admin rotates signing keys in another process; the running perc-kmf
picks the new key up (issue 5: keys rotate with the old key kept for
verification until its tokens expire)."""

from __future__ import annotations

import os

from twisted.trial import unittest

from perc_daemons.kmf.service import refresh_signing_keys
from perc_daemons.kmf.signing import INDEX_NAME, SigningKeys

NOW = 1_800_000_000.0


class KeyRefreshTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.daemon_keys = SigningKeys.create(self.directory, NOW)

    def test_rotation_by_another_process_is_picked_up(self) -> None:
        old_kid = self.daemon_keys.active.kid
        self.assertFalse(refresh_signing_keys(self.daemon_keys))  # nothing changed yet
        admin_keys = SigningKeys.load(self.directory)  # perc-admin keys rotate
        admin_keys.rotate(NOW + 60)
        new_kid = admin_keys.active.kid
        self.assertNotEqual(new_kid, old_kid)
        self.assertTrue(refresh_signing_keys(self.daemon_keys))
        self.assertEqual(self.daemon_keys.active.kid, new_kid)
        published = {jwk["kid"] for jwk in self.daemon_keys.jwks(NOW + 61)["keys"]}
        self.assertEqual(published, {old_kid, new_kid})  # the old key still verifies

    def test_failed_reload_keeps_the_keys_in_use(self) -> None:
        kid = self.daemon_keys.active.kid
        os.chmod(self.directory, 0o777)  # now refused as too open
        self.addCleanup(os.chmod, self.directory, 0o700)
        os.utime(os.path.join(self.directory, INDEX_NAME), ns=(1, 1))  # looks rewritten
        self.assertFalse(refresh_signing_keys(self.daemon_keys))
        self.assertEqual(self.daemon_keys.active.kid, kid)
