"""Local user file back-end, and the user-file operations behind ``perc-admin user``.

The file is UTF-8 JSON lines, one user per line (blank lines are ignored)::

    {"user": "alice", "hash": "$argon2id$v=19$m=65536,t=3,p=4$...", "disabled": false}

* ``user``: lower-case ``[a-z0-9._-]{1,64}``; names are accepted in any case
  and lower-cased, so "Alice" and "alice" are the same account;
* ``hash``: an argon2 hash string (argon2-cffi's PasswordHasher; argon2id
  with RFC 9106 "low memory" parameters unless configured stronger);
* ``disabled``: optional, default false.

Writers take an exclusive ``flock`` on ``<file>.lock`` and replace the file
atomically (temporary file in the same directory, fsync, rename) with mode
0600, keeping the previous owner and group when allowed.  The daemon notices
a changed file (inode, size, mtime, ctime) on the next login and re-reads it;
a file that does not parse fails every login (closed) until it is fixed, and
a missing file means no local users.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from perc_daemons.interfaces import IAuthenticator
from perc_daemons.kmf.auth import (
    AuthenticationFailed,
    BackendUnavailable,
    UnknownUser,
    UnsupportedCredentials,
    UsernamePassword,
    make_identity,
)

log = Logger()

USERNAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
#: Longer passwords are refused before any hashing (argon2 work grows with length).
MAX_PASSWORD_BYTES = 1024


class UserFileError(Exception):
    """A user-file operation failed (bad name or password, unreadable file, ...)."""


class UserExists(UserFileError):
    pass


class NoSuchUser(UserFileError):
    pass


@dataclass(frozen=True)
class UserRecord:
    username: str
    hash: str = field(repr=False)
    disabled: bool = False


def normalize_username(username: str) -> str:
    """The canonical (lower-case) form of a valid username; ValueError otherwise."""
    if not isinstance(username, str) or not USERNAME_RE.match(username):
        raise ValueError("usernames are 1-64 characters from A-Z a-z 0-9 . _ -")
    return username.lower()


def _check_new_password(password: str) -> None:
    if not isinstance(password, str) or not password:
        raise UserFileError("the password must not be empty")
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        raise UserFileError(f"the password must be at most {MAX_PASSWORD_BYTES} bytes")


def read_users(path: str) -> dict[str, UserRecord]:
    """Parse the user file; a missing file has no users."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise UserFileError(f"{path}: {e}") from e
    users: dict[str, UserRecord] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            name = normalize_username(obj["user"])
            hash_ = obj["hash"]
            disabled = obj.get("disabled", False)
            if not isinstance(hash_, str) or not hash_.startswith("$argon2"):
                raise ValueError("hash is not an argon2 hash string")
            if not isinstance(disabled, bool):
                raise ValueError("disabled must be true or false")
            if name in users:
                raise ValueError(f"user {name!r} appears twice")
        except (ValueError, KeyError, TypeError) as e:
            raise UserFileError(f"{path}:{number}: {e}") from e
        users[name] = UserRecord(name, hash_, disabled)
    return users


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_owner(path: str) -> tuple[int, int, int] | None:
    """(uid, gid, mode) a user file (or its lock) written by root must get, or None.

    ``perc-admin users add`` is run as root as often as as the daemon's user;
    a file it created owned by root (mode 0600) could not be read by perc-kmf,
    whose logins would then all fail.  So a file written by root belongs to
    the owner of its directory (``/var/lib/perc``: perc), as the KMF writes
    it: an existing file keeps its owner unless that is root in a directory
    owned by someone else (what earlier versions left).  A file in a
    root-owned directory stays root's, readable by the directory's group
    (mode 0640).  Run as anyone else, the file is simply that user's (None).
    """
    if os.geteuid() != 0:
        return None
    directory = os.stat(os.path.dirname(os.path.abspath(path)))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and (st.st_uid != 0 or directory.st_uid == 0):
        uid, gid = st.st_uid, st.st_gid
    else:
        uid, gid = directory.st_uid, directory.st_gid
    return uid, gid, 0o640 if uid == 0 and gid != 0 else 0o600


def write_users(path: str, users: dict[str, UserRecord]) -> None:
    """Replace the user file atomically (mode 0600; owner: :func:`file_owner`)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        os.fchmod(fd, 0o600)
        owner = file_owner(path)
        if owner is not None:
            os.fchown(fd, owner[0], owner[1])
            os.fchmod(fd, owner[2])
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for name in sorted(users):
                rec = users[name]
                obj = {"user": rec.username, "hash": rec.hash, "disabled": rec.disabled}
                f.write(json.dumps(obj, separators=(", ", ": ")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        owner = file_owner(path + ".lock")
        if owner is not None:  # the KMF takes this lock too when it re-hashes
            os.fchown(fd, owner[0], owner[1])
            os.fchmod(fd, owner[2])
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _update(path: str, change) -> None:  # change(users) mutates the dict
    with _locked(path):
        users = read_users(path)
        change(users)
        write_users(path, users)


def add_user(path: str, username: str, password: str, *, hasher: PasswordHasher | None = None,
             disabled: bool = False) -> None:
    """Add a user; fails with UserExists if the name is taken."""
    try:
        name = normalize_username(username)
    except ValueError as e:
        raise UserFileError(str(e)) from None
    _check_new_password(password)
    hash_ = (hasher or PasswordHasher()).hash(password)

    def change(users: dict[str, UserRecord]) -> None:
        if name in users:
            raise UserExists(f"user {name!r} exists")
        users[name] = UserRecord(name, hash_, disabled)

    _update(path, change)


def _modify(path: str, username: str, **changes) -> None:
    try:
        name = normalize_username(username)
    except ValueError as e:
        raise UserFileError(str(e)) from None

    def change(users: dict[str, UserRecord]) -> None:
        if name not in users:
            raise NoSuchUser(f"no user {name!r}")
        users[name] = dataclasses.replace(users[name], **changes)

    _update(path, change)


def set_password(path: str, username: str, password: str, *,
                 hasher: PasswordHasher | None = None) -> None:
    _check_new_password(password)
    _modify(path, username, hash=(hasher or PasswordHasher()).hash(password))


def disable_user(path: str, username: str) -> None:
    _modify(path, username, disabled=True)


def enable_user(path: str, username: str) -> None:
    _modify(path, username, disabled=False)


@implementer(IAuthenticator)
class FileAuthenticator:
    """Checks :class:`UsernamePassword` against the user file; identity ``user@domain``.

    An unknown user costs the same argon2 verification as a known one (a
    dummy hash made with the same parameters), so timing does not reveal
    which names exist.  Verification runs in the reactor's thread pool.
    After a successful login with a hash whose parameters are weaker than
    ``hasher``'s, the password is re-hashed and the file rewritten (best
    effort: a read-only file is only logged).
    """

    name = "file"

    def __init__(self, path: str, domain: str, *, hasher: PasswordHasher | None = None,
                 rehash: bool = True, reactor=None) -> None:
        if not domain or "@" in domain:
            raise ValueError("domain must be a DNS name")
        self.path = path
        self.domain = domain.lower()
        self._hasher = hasher or PasswordHasher()
        self._rehash = rehash
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._dummy_hash = self._hasher.hash(secrets.token_hex(16))
        self._stamp: tuple[int, ...] | None = None
        self._users: dict[str, UserRecord] = {}

    def _load(self) -> dict[str, UserRecord]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._users = None, {}
            return self._users
        except OSError as e:
            raise BackendUnavailable(f"user file: {e}") from e
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if stamp != self._stamp:
            try:
                users = read_users(self.path)
            except UserFileError as e:
                hint = ""
                if isinstance(e.__cause__, PermissionError):
                    hint = (f" (perc-kmf runs as uid {os.geteuid()}: chown it to that user, "
                            "or run perc-admin users as root, which does)")
                log.error("user file unusable, refusing logins: {error}{hint}",
                          error=str(e), hint=hint)
                self._stamp = None
                raise BackendUnavailable(f"user file: {e}") from e
            if stat.S_IMODE(st.st_mode) & 0o007:
                log.warn("user file {path} is world-accessible", path=self.path)
            self._stamp, self._users = stamp, users
        return self._users

    def _verify(self, hash_: str, password: str) -> bool:
        try:
            return self._hasher.verify(hash_, password)
        except VerifyMismatchError:
            return False
        except (InvalidHashError, VerificationError) as e:
            log.error("user file: unusable hash: {error}", error=str(e))
            return False

    def _in_thread(self, f, *args) -> defer.Deferred:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def authenticate(self, credentials: object) -> defer.Deferred[str]:
        if not isinstance(credentials, UsernamePassword):
            return defer.fail(UnsupportedCredentials(type(credentials).__name__))
        return defer.Deferred.fromCoroutine(self._authenticate(credentials))

    async def _authenticate(self, credentials: UsernamePassword) -> str:
        try:
            name = normalize_username(credentials.username)
        except ValueError:
            raise UnknownUser("not a local username") from None
        password = credentials.password
        if not isinstance(password, str) or not password:
            raise AuthenticationFailed("empty password")
        if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
            raise AuthenticationFailed("password too long")
        record = self._load().get(name)
        hash_ = record.hash if record is not None else self._dummy_hash
        ok = await self._in_thread(self._verify, hash_, password)
        if record is None:
            raise UnknownUser("unknown user")
        if not ok:
            raise AuthenticationFailed(f"wrong password for {name}")
        if record.disabled:
            raise AuthenticationFailed(f"account {name} disabled")
        if self._rehash and self._hasher.check_needs_rehash(record.hash):
            try:
                await self._in_thread(self._rehash_user, name, record.hash, password)
            except Exception as e:
                log.warn("user file: could not re-hash {user}: {error}", user=name, error=str(e))
        return make_identity(name, self.domain)

    def _rehash_user(self, name: str, old_hash: str, password: str) -> None:
        new_hash = self._hasher.hash(password)

        def change(users: dict[str, UserRecord]) -> None:
            rec = users.get(name)
            if rec is not None and rec.hash == old_hash:  # unchanged meanwhile
                users[name] = dataclasses.replace(rec, hash=new_hash)

        _update(self.path, change)
        log.info("user file: re-hashed {user} with current parameters", user=name)
