"""Tests for perc_daemons.kmf.signing (ES256 signing keys on disk, rotation)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.trial import unittest

from perc_daemons.kmf.signing import (
    INDEX_NAME,
    CorruptKeyStore,
    InsecurePermissions,
    SigningKeyError,
    SigningKeys,
    UnknownKey,
    jwk_thumbprint,
)
from perc_daemons.protocol.jose import InvalidJwks, parse_jwks, verification_keys

T0 = 1_800_000_000.0
LIFETIME = 600.0


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class SigningKeysTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.directory = self.root / "signing"

    def create(self) -> SigningKeys:
        return SigningKeys.create(self.directory, T0, max_token_lifetime=LIFETIME)

    def test_create_modes_and_index(self) -> None:
        keys = self.create()
        kid = keys.active.kid
        self.assertEqual(mode_of(self.directory), 0o700)
        self.assertEqual(mode_of(self.directory / f"{kid}.pem"), 0o600)
        self.assertEqual(mode_of(self.directory / INDEX_NAME), 0o600)
        index = json.loads((self.directory / INDEX_NAME).read_text())
        self.assertEqual(
            index, {"version": 1, "keys": [{"kid": kid, "created_at": T0, "retired_at": None}]}
        )
        self.assertEqual(sorted(p.name for p in self.directory.iterdir()), sorted(
            [f"{kid}.pem", INDEX_NAME]
        ))  # no temporary files left behind

    def test_create_refuses_initialised_directory(self) -> None:
        self.create()
        self.assertRaises(SigningKeyError, SigningKeys.create, self.directory, T0)

    def test_kid_is_rfc7638_thumbprint(self) -> None:
        keys = self.create()
        numbers = keys.active.private_key.public_key().public_numbers()

        def b64(n: int) -> str:
            return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

        canonical = '{"crv":"P-256","kty":"EC","x":"%s","y":"%s"}' % (  # noqa: UP031
            b64(numbers.x),
            b64(numbers.y),
        )
        expected = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest())
        self.assertEqual(keys.active.kid, expected.rstrip(b"=").decode())
        self.assertEqual(jwk_thumbprint(keys.public_key(keys.active.kid)), keys.active.kid)

    def test_load_round_trip(self) -> None:
        keys = self.create()
        keys.rotate(T0 + 10)
        loaded = SigningKeys.load(self.directory, max_token_lifetime=LIFETIME)
        self.assertEqual(loaded.active.kid, keys.active.kid)
        self.assertEqual(loaded.infos, keys.infos)
        self.assertEqual(loaded.jwks(T0 + 20), keys.jwks(T0 + 20))

    def test_repr_hides_private_key(self) -> None:
        keys = self.create()
        secret = keys.active.private_key.private_numbers().private_value
        pem = (self.directory / f"{keys.active.kid}.pem").read_text()
        for text in (repr(keys), repr(keys.active), str(keys.active)):
            self.assertNotIn(str(secret), text)
            self.assertNotIn(pem.splitlines()[1], text)
            self.assertNotIn("cryptography", text)
        self.assertIn(keys.active.kid, repr(keys))

    def test_jwks_contents(self) -> None:
        keys = self.create()
        (jwk,) = keys.jwks(T0)["keys"]
        self.assertEqual(set(jwk), {"kty", "crv", "x", "y", "use", "alg", "kid"})
        self.assertEqual(
            (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"], jwk["kid"]),
            ("EC", "P-256", "sig", "ES256", keys.active.kid),
        )
        public = parse_jwks(keys.jwks(T0))[keys.active.kid]
        self.assertEqual(
            public.public_numbers(), keys.active.private_key.public_key().public_numbers()
        )

    def test_rotate_keeps_old_key_for_verification(self) -> None:
        keys = self.create()
        old = keys.active.kid
        new = keys.rotate(T0 + 100)
        self.assertNotEqual(new, old)
        self.assertEqual(keys.active.kid, new)
        info = {i.kid: i for i in keys.infos}
        self.assertEqual(info[old].retired_at, T0 + 100)
        self.assertIsNone(info[new].retired_at)
        self.assertEqual(info[new].created_at, T0 + 100)
        kids = [jwk["kid"] for jwk in keys.jwks(T0 + 100)["keys"]]
        self.assertEqual(kids, [new, old])  # active first
        self.assertEqual(mode_of(self.directory / f"{new}.pem"), 0o600)
        keys.public_key(old)  # still available

    def test_jwks_drops_retired_key_after_retention(self) -> None:
        keys = self.create()
        old = keys.active.kid
        new = keys.rotate(T0 + 100)
        last_ok = T0 + 100 + LIFETIME - 1
        self.assertIn(old, [jwk["kid"] for jwk in keys.jwks(last_ok)["keys"]])
        after = T0 + 100 + LIFETIME
        self.assertEqual([jwk["kid"] for jwk in keys.jwks(after)["keys"]], [new])
        self.assertEqual(list(keys.public_keys(after)), [new])

    def test_prune(self) -> None:
        keys = self.create()
        old = keys.active.kid
        keys.rotate(T0 + 100)
        self.assertEqual(keys.prune(T0 + 100 + LIFETIME - 1), [])
        self.assertTrue((self.directory / f"{old}.pem").exists())
        self.assertEqual(keys.prune(T0 + 100 + LIFETIME), [old])
        self.assertFalse((self.directory / f"{old}.pem").exists())
        self.assertRaises(UnknownKey, keys.public_key, old)
        index = json.loads((self.directory / INDEX_NAME).read_text())
        self.assertEqual([k["kid"] for k in index["keys"]], [keys.active.kid])
        reloaded = SigningKeys.load(self.directory, max_token_lifetime=LIFETIME)
        self.assertEqual([i.kid for i in reloaded.infos], [keys.active.kid])

    def test_prune_overwrites_before_unlinking(self) -> None:
        keys = self.create()
        old = keys.active.kid
        keys.rotate(T0)
        # A second link to the same inode shows what happened to the file's data.
        witness = self.root / "witness"
        os.link(self.directory / f"{old}.pem", witness)
        size = witness.stat().st_size
        keys.prune(T0 + LIFETIME)
        self.assertEqual(witness.read_bytes(), bytes(size))

    def test_prune_never_removes_active_key(self) -> None:
        keys = self.create()
        self.assertEqual(keys.prune(T0 + 10 * LIFETIME), [])
        self.assertEqual(len(keys.infos), 1)

    def test_refresh_sees_rotation_by_another_process(self) -> None:
        daemon = self.create()
        admin = SigningKeys.load(self.directory, max_token_lifetime=LIFETIME)
        self.assertFalse(daemon.refresh())
        new = admin.rotate(T0 + 5)
        self.assertTrue(daemon.refresh())
        self.assertEqual(daemon.active.kid, new)
        self.assertFalse(daemon.refresh())

    def test_verification_keys_accepts_keys_or_jwks(self) -> None:
        keys = self.create()
        keys.rotate(T0 + 1)
        from_keys = verification_keys(keys, T0 + 1)
        from_jwks = verification_keys(keys.jwks(T0 + 1), T0 + 1)
        self.assertEqual(sorted(from_keys), sorted(from_jwks))
        self.assertEqual(len(from_keys), 2)
        self.assertRaises(InvalidJwks, verification_keys, {"nokeys": []}, T0)


class PermissionTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.keys = SigningKeys.create(self.directory, T0)
        self.pem = self.directory / f"{self.keys.active.kid}.pem"

    def assertRefused(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)
        e = self.assertRaises(InsecurePermissions, SigningKeys.load, self.directory)
        self.assertIn(str(path), str(e))
        self.assertIn(f"{mode:04o}", str(e))

    def test_world_readable_directory(self) -> None:
        self.assertRefused(self.directory, 0o705)

    def test_group_writable_directory(self) -> None:
        self.assertRefused(self.directory, 0o770)

    def test_world_readable_key(self) -> None:
        self.assertRefused(self.pem, 0o604)

    def test_group_writable_key(self) -> None:
        self.assertRefused(self.pem, 0o660)

    def test_world_readable_index(self) -> None:
        self.assertRefused(self.directory / INDEX_NAME, 0o644)

    def test_group_readable_allowed(self) -> None:
        os.chmod(self.directory, 0o750)
        os.chmod(self.pem, 0o640)
        self.assertEqual(SigningKeys.load(self.directory).active.kid, self.keys.active.kid)

    def test_symlinked_key_refused(self) -> None:
        target = self.directory / "elsewhere.pem"
        os.replace(self.pem, target)
        os.symlink(target, self.pem)
        self.assertRaises(CorruptKeyStore, SigningKeys.load, self.directory)


class CorruptionTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.keys = SigningKeys.create(self.directory, T0)
        self.kid = self.keys.active.kid

    def test_key_not_matching_kid(self) -> None:
        other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pem = self.directory / f"{self.kid}.pem"
        pem.write_bytes(other)
        e = self.assertRaises(CorruptKeyStore, SigningKeys.load, self.directory)
        self.assertIn("kid", str(e))

    def test_missing_key_file(self) -> None:
        (self.directory / f"{self.kid}.pem").unlink()
        self.assertRaises(CorruptKeyStore, SigningKeys.load, self.directory)

    def test_bad_index(self) -> None:
        index = self.directory / INDEX_NAME
        for text in ("not json", '{"version": 2, "keys": []}', '{"version": 1, "keys": []}',
                     '{"version": 1, "keys": [{"kid": "../../etc/passwd", "created_at": 1}]}'):
            index.write_text(text)
            self.assertRaises(CorruptKeyStore, SigningKeys.load, self.directory)

    def test_two_active_keys(self) -> None:
        self.keys.rotate(T0 + 1)
        index_path = self.directory / INDEX_NAME
        index = json.loads(index_path.read_text())
        for entry in index["keys"]:
            entry["retired_at"] = None
        index_path.write_text(json.dumps(index))
        e = self.assertRaises(CorruptKeyStore, SigningKeys.load, self.directory)
        self.assertIn("exactly one active", str(e))

    def test_missing_directory(self) -> None:
        self.assertRaises(SigningKeyError, SigningKeys.load, self.directory / "nope")
