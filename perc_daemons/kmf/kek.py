"""The key-encryption key (KEK) that wraps EKT keys before they are stored.

The KEK is 32 random bytes in a file (raw, or 64 hex digits and an optional
newline) that only its owner (or root) may write and nobody but the owner and
its group may read: mode 0600 or 0640.  A wrapped key is::

    version (1 byte, 1) || nonce (12 bytes) || AES-256-GCM ciphertext || tag (16 bytes)

with additional authenticated data binding the blob to its conference and
epoch, so a blob copied to another conference or epoch does not unwrap.
"""

from __future__ import annotations

import binascii
import os
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KEK_SIZE", "KeyEncryptionKey", "KeyFileError", "KeyUnwrapError"]

KEK_SIZE = 32
VERSION = 1
NONCE_SIZE = 12
TAG_SIZE = 16
_AAD_LABEL = b"perc-kmf ekt-key v1"
_MAX_FILE = 1024


class KeyFileError(Exception):
    """The KEK file is missing, malformed, or too widely accessible."""


class KeyUnwrapError(Exception):
    """A wrapped key does not unwrap: wrong KEK, conference or epoch, or tampered."""


def _aad(conference_id: str, epoch: int) -> bytes:
    if not isinstance(conference_id, str) or not conference_id:
        raise ValueError("conference_id must be a non-empty string")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < 2**64:
        raise ValueError(f"epoch must be a non-negative 64-bit integer: {epoch!r}")
    cid = conference_id.encode("utf-8")
    return (
        _AAD_LABEL + b"\x00" + len(cid).to_bytes(2, "big") + cid + epoch.to_bytes(8, "big")
    )


def _parse(path: str, data: bytes) -> bytearray:
    if len(data) == KEK_SIZE:
        return bytearray(data)
    text = data[:-1] if data.endswith(b"\n") else data
    if len(text) == 2 * KEK_SIZE:
        try:
            return bytearray(binascii.unhexlify(text))
        except (binascii.Error, ValueError):
            pass
    raise KeyFileError(
        f"{path}: not a key-encryption key (want {KEK_SIZE} raw bytes or "
        f"{2 * KEK_SIZE} hex digits, got {len(data)} bytes)"
    )


class KeyEncryptionKey:
    """An AES-256-GCM key-encryption key; use :meth:`load` or :meth:`generate`."""

    def __init__(self, key: bytes | bytearray) -> None:
        if len(key) != KEK_SIZE:
            raise ValueError(f"a key-encryption key is {KEK_SIZE} bytes")
        self._key: bytearray | None = bytearray(key)

    @classmethod
    def load(cls, path: str) -> KeyEncryptionKey:
        """Read the KEK from ``path`` after checking its owner and mode.

        Refused (KeyFileError) when the file is a symlink or not a regular
        file, is owned by someone other than the current user or root, or has
        any permission beyond 0640 (group write, anything for others).
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
        except OSError as e:
            raise KeyFileError(f"{path}: cannot open key-encryption key: {e.strerror}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"{path}: key-encryption key is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o037:
                raise KeyFileError(
                    f"{path}: key-encryption key has mode {mode:04o}; it must not be "
                    f"accessible beyond 0640 (chmod 0600 {path})"
                )
            if st.st_uid not in (os.geteuid(), 0):
                raise KeyFileError(
                    f"{path}: key-encryption key is owned by uid {st.st_uid}, not by this "
                    f"user (uid {os.geteuid()}) or root"
                )
            data = bytearray()
            while len(data) <= _MAX_FILE:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
        try:
            return cls(_parse(path, bytes(data)))
        finally:
            data[:] = bytes(len(data))

    @classmethod
    def generate(cls, path: str) -> KeyEncryptionKey:
        """Write a new random KEK to ``path`` (mode 0600, raw bytes); never overwrites.

        Fails with FileExistsError when ``path`` exists.
        """
        key = bytearray(os.urandom(KEK_SIZE))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(key)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return cls(key)

    def _aesgcm(self) -> AESGCM:
        if self._key is None:
            raise ValueError("the key-encryption key has been closed")
        return AESGCM(bytes(self._key))

    def wrap(self, plaintext: bytes, *, conference_id: str, epoch: int) -> bytes:
        """Encrypt ``plaintext`` (an EKT key) for storage under ``conference_id``/``epoch``."""
        aad = _aad(conference_id, epoch)
        nonce = os.urandom(NONCE_SIZE)
        return bytes([VERSION]) + nonce + self._aesgcm().encrypt(nonce, bytes(plaintext), aad)

    def unwrap(self, blob: bytes, *, conference_id: str, epoch: int) -> bytes:
        """Decrypt what :meth:`wrap` made for the same conference and epoch.

        Raises KeyUnwrapError if the blob is malformed, of another version,
        tampered with, wrapped for another conference or epoch, or under
        another KEK.
        """
        aad = _aad(conference_id, epoch)
        blob = bytes(blob)
        if len(blob) < 1 + NONCE_SIZE + TAG_SIZE:
            raise KeyUnwrapError("wrapped key too short")
        if blob[0] != VERSION:
            raise KeyUnwrapError(f"unknown wrapped key version {blob[0]}")
        nonce, sealed = blob[1:1 + NONCE_SIZE], blob[1 + NONCE_SIZE:]
        try:
            return self._aesgcm().decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise KeyUnwrapError(
                f"wrapped key does not unwrap for conference {conference_id!r} epoch {epoch}"
            ) from None

    def close(self) -> None:
        """Overwrite the key in memory; the object is unusable afterwards."""
        if self._key is not None:
            self._key[:] = bytes(len(self._key))
            self._key = None

    def __repr__(self) -> str:
        state = "closed" if self._key is None else "loaded"
        return f"<KeyEncryptionKey {state}>"

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError("a KeyEncryptionKey cannot be pickled")
