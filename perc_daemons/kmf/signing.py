"""The KMF's ES256 signing keys on disk, with rotation (issue 5).

A directory (e.g. ``/var/lib/perc/signing/``, mode 0700) holds one PEM file
per key, ``<kid>.pem`` (PKCS#8, mode 0600), and ``index.json`` (mode 0600)::

    {"version": 1,
     "keys": [{"kid": "...", "created_at": 1700000000.0, "retired_at": null}, ...]}

The ``kid`` is the key's RFC 7638 JWK thumbprint (SHA-256, base64url), checked
against the key file on load.  Exactly one key is active (``retired_at`` null):
it signs access tokens, identity assertions and rosters.  :meth:`SigningKeys.rotate`
creates a new active key and retires the previous one, which stays in the JWKS
for verification until ``retired_at + max_token_lifetime``; :meth:`SigningKeys.prune`
then deletes it (index first, then the key file is overwritten and unlinked;
on SSDs and copy-on-write file systems overwriting is best effort).

Every file is written to a temporary file and renamed into place, so a crash
leaves either the old or the new state; the index is the commit point.  A
directory writable by the group or accessible by others, and key or index
files with permissions beyond ``0640``, are refused.  There is no lock:
one process (``perc-admin keys rotate`` or the KMF) writes at a time; a
reader notices a rewrite with :meth:`SigningKeys.refresh` (which reads the
index file's inode and mtime).

Private keys are never logged nor shown in a ``repr``.  Nothing here reads a
clock: times are explicit ``now`` arguments in seconds since the epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from perc_daemons.protocol.jose import b64url_encode, public_jwk

__all__ = [
    "DEFAULT_MAX_TOKEN_LIFETIME",
    "INDEX_NAME",
    "ActiveKey",
    "CorruptKeyStore",
    "InsecurePermissions",
    "KeyInfo",
    "SigningKeyError",
    "SigningKeys",
    "UnknownKey",
    "jwk_thumbprint",
]

#: Default longest lifetime (seconds) of anything signed: how long a retired key is kept.
DEFAULT_MAX_TOKEN_LIFETIME = 3600.0
INDEX_NAME = "index.json"
_INDEX_VERSION = 1
_DIR_FORBIDDEN = 0o027  # group write, any access by others
_FILE_FORBIDDEN = 0o037  # group write/exec, any access by others
_MAX_FILE = 1 << 20
_KID = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url of a SHA-256 digest


class SigningKeyError(Exception):
    """The signing key directory cannot be used."""


class InsecurePermissions(SigningKeyError):
    """A key directory or file others can read (or the group can write)."""


class CorruptKeyStore(SigningKeyError):
    """Index or key file unreadable, inconsistent, or not an ES256 key."""


class UnknownKey(SigningKeyError, LookupError):
    """No key with that kid (never created, or pruned)."""


def jwk_thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) of a P-256 public key."""
    jwk = public_jwk(public_key)
    canonical = json.dumps(
        {name: jwk[name] for name in ("crv", "kty", "x", "y")},
        separators=(",", ":"),
        sort_keys=True,
    )
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


@dataclass(frozen=True)
class KeyInfo:
    """Metadata of one signing key, as kept in the index."""

    kid: str
    created_at: float
    retired_at: float | None = None


@dataclass(frozen=True, repr=False)
class ActiveKey:
    """The key that signs now; ``repr`` shows only the kid."""

    kid: str
    private_key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:
        return f"<ActiveKey kid={self.kid}>"


def _check_mode(path: Path, st: os.stat_result, forbidden: int, what: str) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & forbidden:
        raise InsecurePermissions(
            f"{path}: {what} mode {mode:04o} is too open; "
            f"use {0o700 if what == 'directory' else 0o600:04o}"
        )


def _check_directory(directory: Path) -> None:
    try:
        st = directory.stat()
    except OSError as e:
        raise SigningKeyError(f"{directory}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SigningKeyError(f"{directory}: not a directory")
    _check_mode(directory, st, _DIR_FORBIDDEN, "directory")


def _read_secret_file(path: Path) -> bytes:
    """Contents of a regular file (no symlink) after checking its mode on the open fd."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise CorruptKeyStore(f"{path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptKeyStore(f"{path}: not a regular file")
        _check_mode(path, st, _FILE_FORBIDDEN, "file")
        if st.st_size > _MAX_FILE:
            raise CorruptKeyStore(f"{path}: too large")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _overwrite_and_unlink(path: Path) -> None:
    """Overwrite a key file with zeros, sync, then unlink it (missing is fine)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        zeros = bytes(min(size, 65536))
        written = 0
        while written < size:
            written += os.write(fd, zeros[: size - written])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)
    _fsync_directory(path.parent)


def _private_pem(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class SigningKeys:
    """The ES256 signing keys of one directory; build with :meth:`load` or :meth:`create`."""

    def __init__(
        self,
        directory: Path,
        infos: list[KeyInfo],
        private_keys: dict[str, ec.EllipticCurvePrivateKey],
        *,
        max_token_lifetime: float,
        index_stamp: tuple[int, int] | None = None,
    ) -> None:
        active = [info for info in infos if info.retired_at is None]
        if len(active) != 1:
            raise CorruptKeyStore(f"{directory}: need exactly one active key, found {len(active)}")
        self.directory = directory
        self.max_token_lifetime = float(max_token_lifetime)
        self._infos = list(infos)
        self._private = dict(private_keys)
        self._index_stamp = index_stamp

    def __repr__(self) -> str:
        return (
            f"<SigningKeys {self.directory} active={self.active.kid} "
            f"keys={len(self._infos)}>"
        )

    # --- construction -------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        now: float,
        *,
        max_token_lifetime: float = DEFAULT_MAX_TOKEN_LIFETIME,
    ) -> SigningKeys:
        """Make the directory (0700) if needed and its first key; refuses an initialised one."""
        directory = Path(directory)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise SigningKeyError(f"{directory}: {e.strerror}") from None
        _check_directory(directory)
        if (directory / INDEX_NAME).exists():
            raise SigningKeyError(f"{directory}: already holds signing keys")
        private_key = ec.generate_private_key(ec.SECP256R1())
        kid = jwk_thumbprint(private_key.public_key())
        keys = cls(
            directory,
            [KeyInfo(kid, float(now))],
            {kid: private_key},
            max_token_lifetime=max_token_lifetime,
        )
        _write_atomically(directory / f"{kid}.pem", _private_pem(private_key))
        keys._write_index()
        return keys

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        max_token_lifetime: float = DEFAULT_MAX_TOKEN_LIFETIME,
    ) -> SigningKeys:
        """Read the index and every key it lists, checking modes and kids."""
        directory = Path(directory)
        _check_directory(directory)
        infos, private_keys, stamp = cls._read(directory)
        return cls(
            directory,
            infos,
            private_keys,
            max_token_lifetime=max_token_lifetime,
            index_stamp=stamp,
        )

    @staticmethod
    def _read(
        directory: Path,
    ) -> tuple[list[KeyInfo], dict[str, ec.EllipticCurvePrivateKey], tuple[int, int]]:
        index_path = directory / INDEX_NAME
        raw = _read_secret_file(index_path)
        st = os.stat(index_path)
        try:
            index = json.loads(raw)
            if index.get("version") != _INDEX_VERSION:
                raise ValueError("unknown index version")
            infos = []
            for entry in index["keys"]:
                kid = entry["kid"]
                if not isinstance(kid, str) or not _KID.fullmatch(kid):
                    raise ValueError("bad kid")
                created_at = float(entry["created_at"])
                retired_at = entry.get("retired_at")
                infos.append(
                    KeyInfo(kid, created_at, None if retired_at is None else float(retired_at))
                )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptKeyStore(f"{index_path}: unreadable index ({e})") from None
        if len({info.kid for info in infos}) != len(infos):
            raise CorruptKeyStore(f"{index_path}: a kid appears twice")
        if sum(info.retired_at is None for info in infos) != 1:
            raise CorruptKeyStore(f"{index_path}: need exactly one active key")
        private_keys = {}
        for info in infos:
            path = directory / f"{info.kid}.pem"
            try:
                key = serialization.load_pem_private_key(_read_secret_file(path), password=None)
            except (ValueError, TypeError):
                raise CorruptKeyStore(f"{path}: not an unencrypted PEM private key") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
                key.curve, ec.SECP256R1
            ):
                raise CorruptKeyStore(f"{path}: not a P-256 key")
            if jwk_thumbprint(key.public_key()) != info.kid:
                raise CorruptKeyStore(f"{path}: key does not match its kid")
            private_keys[info.kid] = key
        return infos, private_keys, (st.st_ino, st.st_mtime_ns)

    def refresh(self) -> bool:
        """Reload if another process rewrote the index (inode or mtime changed)."""
        try:
            st = os.stat(self.directory / INDEX_NAME)
        except OSError as e:
            raise SigningKeyError(f"{self.directory / INDEX_NAME}: {e.strerror}") from None
        if (st.st_ino, st.st_mtime_ns) == self._index_stamp:
            return False
        _check_directory(self.directory)
        infos, private_keys, stamp = self._read(self.directory)
        self._infos, self._private, self._index_stamp = infos, private_keys, stamp
        return True

    def _write_index(self) -> None:
        index = {
            "version": _INDEX_VERSION,
            "keys": [
                {"kid": i.kid, "created_at": i.created_at, "retired_at": i.retired_at}
                for i in self._infos
            ],
        }
        path = self.directory / INDEX_NAME
        _write_atomically(path, json.dumps(index, indent=1).encode("ascii") + b"\n")
        st = os.stat(path)
        self._index_stamp = (st.st_ino, st.st_mtime_ns)

    # --- rotation -----------------------------------------------------------

    def rotate(self, now: float) -> str:
        """Make a new active key (returned: its kid) and retire the previous one at ``now``."""
        private_key = ec.generate_private_key(ec.SECP256R1())
        kid = jwk_thumbprint(private_key.public_key())
        _write_atomically(self.directory / f"{kid}.pem", _private_pem(private_key))
        infos = [
            KeyInfo(i.kid, i.created_at, float(now)) if i.retired_at is None else i
            for i in self._infos
        ]
        infos.append(KeyInfo(kid, float(now)))
        old_infos, self._infos = self._infos, infos
        self._private[kid] = private_key
        try:
            self._write_index()
        except BaseException:
            self._infos = old_infos
            del self._private[kid]
            with contextlib.suppress(OSError):
                _overwrite_and_unlink(self.directory / f"{kid}.pem")
            raise
        return kid

    def _expired(self, info: KeyInfo, now: float) -> bool:
        return info.retired_at is not None and info.retired_at + self.max_token_lifetime <= now

    def prune(self, now: float) -> list[str]:
        """Delete retired keys whose tokens have all expired; returns their kids."""
        gone = [info.kid for info in self._infos if self._expired(info, now)]
        if not gone:
            return []
        self._infos = [info for info in self._infos if info.kid not in gone]
        self._write_index()
        for kid in gone:
            del self._private[kid]
            _overwrite_and_unlink(self.directory / f"{kid}.pem")
        return gone

    # --- use ----------------------------------------------------------------

    @property
    def active(self) -> ActiveKey:
        """The signing key (kid and private key)."""
        info = next(i for i in self._infos if i.retired_at is None)
        return ActiveKey(info.kid, self._private[info.kid])

    @property
    def infos(self) -> list[KeyInfo]:
        """Metadata of every key held, oldest first."""
        return list(self._infos)

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey:
        """The public key of ``kid`` (active or retired, not yet pruned)."""
        try:
            return self._private[kid].public_key()
        except KeyError:
            raise UnknownKey(f"no signing key {kid!r}") from None

    def public_keys(self, now: float) -> dict[str, ec.EllipticCurvePublicKey]:
        """``{kid: public key}`` of the keys valid for verification at ``now``."""
        return {
            info.kid: self._private[info.kid].public_key()
            for info in reversed(self._infos)
            if not self._expired(info, now)
        }

    def jwks(self, now: float) -> dict[str, Any]:
        """The JWKS to publish: active key first, then retired keys still in use."""
        keys = []
        for kid, public_key in self.public_keys(now).items():
            jwk = public_jwk(public_key)
            jwk.update({"use": "sig", "alg": "ES256", "kid": kid})
            keys.append(jwk)
        keys.sort(key=lambda jwk: jwk["kid"] != self.active.kid)
        return {"keys": keys}


