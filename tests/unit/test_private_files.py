"""perc_daemons.tls.read_private_file / read_secret_line: keys and secrets on disk."""

from __future__ import annotations

import os

from twisted.trial import unittest

from perc_daemons.tls import TlsFileError, read_private_file, read_secret_line


class PrivateFileTests(unittest.TestCase):
    def write(self, data: bytes, mode: int = 0o600) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        return path

    def assertRefused(self, reason: str, function, *args, **kwargs) -> None:
        error = self.assertRaises(TlsFileError, function, *args, **kwargs)
        self.assertIn(reason, str(error))

    def test_secret_line(self) -> None:
        self.assertEqual(read_secret_line(self.write(b"  s3cret \nsecond line\n")), "s3cret")
        self.assertEqual(read_secret_line(self.write(b"group-readable", 0o640)),
                         "group-readable")

    def test_refusals(self) -> None:
        self.assertRefused("mode 0644 is too open: it must be 0600 or 0640",
                           read_secret_line, self.write(b"x", 0o644))
        self.assertRefused("mode 0640 is too open: it must be 0600",
                           read_secret_line, self.write(b"x", 0o640), forbidden=0o077)
        self.assertRefused("empty", read_secret_line, self.write(b"\n  \n"))
        self.assertRefused("not UTF-8", read_secret_line, self.write(b"\xff\xfe"))
        self.assertRefused("file not found", read_secret_line, self.mktemp())
        self.assertRefused("larger than 16 bytes", read_private_file,
                           self.write(b"x" * 17), max_size=16)
        self.assertRefused("not a regular file", read_private_file, os.path.dirname(
            self.write(b"x")))

    def test_symlink_not_followed(self) -> None:
        target = self.write(b"secret")
        link = os.path.abspath(self.mktemp())
        os.symlink(target, link)
        self.assertRaises(TlsFileError, read_private_file, link)
        self.assertEqual(read_private_file(target), b"secret")
