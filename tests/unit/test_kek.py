"""perc_daemons.kmf.kek: the key file's checks, and wrapping with AES-256-GCM."""

from __future__ import annotations

import os
import pickle

from twisted.trial import unittest

from perc_daemons.kmf.kek import KeyEncryptionKey, KeyFileError, KeyUnwrapError

KEY = bytes(range(32))


class KeyFileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def write(self, data: bytes, mode: int = 0o600, name: str = "kek") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        return path

    def assertSameKey(self, a: KeyEncryptionKey, b: KeyEncryptionKey) -> None:
        blob = a.wrap(b"k" * 16, conference_id="c", epoch=1)
        self.assertEqual(b.unwrap(blob, conference_id="c", epoch=1), b"k" * 16)

    def test_raw_and_hex(self) -> None:
        raw = KeyEncryptionKey.load(self.write(KEY))
        for text in (KEY.hex().encode(), KEY.hex().encode() + b"\n", KEY.hex().upper().encode()):
            self.assertSameKey(raw, KeyEncryptionKey.load(self.write(text, name="hex")))
            os.unlink(os.path.join(self.dir, "hex"))
        self.assertSameKey(raw, KeyEncryptionKey(KEY))

    def test_modes_accepted(self) -> None:
        for mode in (0o600, 0o640, 0o400, 0o440):
            KeyEncryptionKey.load(self.write(KEY, mode, name=f"k{mode:o}"))

    def test_modes_refused(self) -> None:
        for mode in (0o644, 0o604, 0o660, 0o602, 0o601, 0o610, 0o666, 0o777):
            path = self.write(KEY, mode, name=f"k{mode:o}")
            e = self.assertRaises(KeyFileError, KeyEncryptionKey.load, path)
            self.assertIn(path, str(e))
            self.assertIn(f"{mode:04o}", str(e))

    def test_bad_content(self) -> None:
        for data in (b"", KEY[:31], KEY + b"\n", b"zz" * 32, KEY.hex().encode() + b"\n\n",
                     b"x" * 5000):
            path = self.write(data)
            e = self.assertRaises(KeyFileError, KeyEncryptionKey.load, path)
            self.assertIn(path, str(e))
            os.unlink(path)

    def test_missing_directory_symlink(self) -> None:
        missing = os.path.join(self.dir, "missing")
        e = self.assertRaises(KeyFileError, KeyEncryptionKey.load, missing)
        self.assertIn(missing, str(e))
        self.assertRaises(KeyFileError, KeyEncryptionKey.load, self.dir)
        link = os.path.join(self.dir, "link")
        os.symlink(self.write(KEY), link)
        self.assertRaises(KeyFileError, KeyEncryptionKey.load, link)

    def test_foreign_owner(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("only root can give a file to another user")
        path = self.write(KEY)
        os.chown(path, 12345, -1)
        # root loads its own and root's files, but not another user's
        e = self.assertRaises(KeyFileError, KeyEncryptionKey.load, path)
        self.assertIn("uid 12345", str(e))
        os.chown(path, 0, -1)
        KeyEncryptionKey.load(path)

    def test_generate(self) -> None:
        path = os.path.join(self.dir, "new")
        kek = KeyEncryptionKey.generate(path)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path, "rb") as f:
            data = f.read()
        self.assertEqual(len(data), 32)
        self.assertSameKey(kek, KeyEncryptionKey.load(path))
        # never overwrites
        self.assertRaises(FileExistsError, KeyEncryptionKey.generate, path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        other = KeyEncryptionKey.generate(os.path.join(self.dir, "other"))
        blob = kek.wrap(b"k" * 16, conference_id="c", epoch=1)
        self.assertRaises(KeyUnwrapError, other.unwrap, blob, conference_id="c", epoch=1)

    def test_generate_ignores_umask(self) -> None:
        old = os.umask(0)
        try:
            path = os.path.join(self.dir, "new")
            KeyEncryptionKey.generate(path)
        finally:
            os.umask(old)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)


class WrapTests(unittest.TestCase):
    def setUp(self) -> None:
        self.kek = KeyEncryptionKey(KEY)
        self.ekt = os.urandom(32)
        self.blob = self.kek.wrap(self.ekt, conference_id="conf-1", epoch=3)

    def test_round_trip(self) -> None:
        self.assertEqual(self.kek.unwrap(self.blob, conference_id="conf-1", epoch=3), self.ekt)
        self.assertEqual(len(self.blob), 1 + 12 + 32 + 16)
        self.assertEqual(self.blob[0], 1)
        self.assertNotIn(self.ekt, self.blob)
        # a fresh nonce every time
        again = self.kek.wrap(self.ekt, conference_id="conf-1", epoch=3)
        self.assertNotEqual(again[1:13], self.blob[1:13])
        self.assertEqual(self.kek.unwrap(again, conference_id="conf-1", epoch=3), self.ekt)

    def test_bound_to_conference_and_epoch(self) -> None:
        for cid, epoch in (("conf-2", 3), ("conf-1", 2), ("conf-1", 4), ("conf-", 13),
                           ("conf-13", 0)):
            self.assertRaises(KeyUnwrapError, self.kek.unwrap, self.blob,
                              conference_id=cid, epoch=epoch)

    def test_tampering(self) -> None:
        for i in range(len(self.blob)):
            bad = bytearray(self.blob)
            bad[i] ^= 0x01
            self.assertRaises(KeyUnwrapError, self.kek.unwrap, bytes(bad),
                              conference_id="conf-1", epoch=3)
        for bad in (self.blob[:-1], self.blob + b"\x00", b"", self.blob[:29]):
            self.assertRaises(KeyUnwrapError, self.kek.unwrap, bad,
                              conference_id="conf-1", epoch=3)

    def test_other_key(self) -> None:
        other = KeyEncryptionKey(bytes(32))
        self.assertRaises(KeyUnwrapError, other.unwrap, self.blob, conference_id="conf-1",
                          epoch=3)

    def test_repr_hides_key(self) -> None:
        text = repr(self.kek) + str(self.kek)
        for form in (KEY.hex(), KEY.hex().upper(), repr(KEY), repr(bytearray(KEY))):
            self.assertNotIn(form, text)
        self.assertNotIn("\\x1f", text)
        self.assertRaises(TypeError, pickle.dumps, self.kek)

    def test_close(self) -> None:
        internal = self.kek._key
        self.kek.close()
        self.assertEqual(internal, bytearray(32))
        self.assertRaises(ValueError, self.kek.wrap, b"k", conference_id="c", epoch=1)
        self.assertIn("closed", repr(self.kek))
        self.kek.close()

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, KeyEncryptionKey, KEY[:16])
        self.assertRaises(ValueError, self.kek.wrap, b"k", conference_id="", epoch=1)
        self.assertRaises(ValueError, self.kek.wrap, b"k", conference_id="c", epoch=-1)
        self.assertRaises(ValueError, self.kek.wrap, b"k", conference_id="c", epoch=True)
