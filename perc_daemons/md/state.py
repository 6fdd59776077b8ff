"""What perc-md keeps across a restart: its conferences and their cascade links.

A perc-md that crashes or is restarted by systemd comes back with the
conferences the provider created on it (each with its KD's fingerprint) and
their cascade links (RFC 8871 section 4.5.1: peer fingerprint, address, role,
profile and the links' ICE credentials), so that

* the KDs it trusts for those conferences can connect again (their tunnels
  re-open by themselves and get the MD's ``Associations`` listing, empty:
  RFC 9185 section 5.4, the KD forgets the lost associations and rekeys the
  members on the other MDs);
* its links come up again with the same credentials (the opening side
  re-dials with back-off, the accepting side welcomes a peer that restarted:
  :mod:`perc_daemons.protocol.cascade`), so media between the MDs on either
  side flows again without any endpoint rejoining.

Nothing secret to the media is kept: no hop-by-hop key (those come only from
the KD, per association, and die with the process), no participant (an
endpoint on a restarted MD joins again; its reference client does so by
itself when the roster drops it).  The file holds the links' ICE passwords,
short-term STUN credentials between two MDs that both also pin each other's
certificate; it is written with mode 0600 in the state directory (0750,
owned by the perc user) and replaced atomically (write, fsync, rename), so a
crash mid-write leaves the previous version.

The file is JSON: ``{"version": 1, "conferences": [...], "links": [...]}``.
A file that cannot be read or parsed stops start-up (exit status 2) with its
path and reason; it is never silently discarded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from perc_daemons.protocol.selection import SelectionPolicy

__all__ = ["MdStateKeeper", "SavedConference", "SavedLink", "SavedState", "StateError", "StateFile"]

VERSION = 1
#: The conference policy kept (SelectionPolicy fields set by the provider).
_POLICY_KEYS = ("last_n", "audio_levels", "audio_top_k")


class StateError(Exception):
    """The state file cannot be read, parsed or written (the message says which and why)."""


@dataclass(frozen=True)
class SavedConference:
    conference_id: str
    kd_fingerprint: bytes
    created_at: float
    forwarding: str = "sfu"
    #: SelectionPolicy's fields (last_n, audio_levels, audio_top_k)
    policy: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SavedLink:
    link_id: str
    conference_id: str
    role: str
    peer_fingerprint: bytes
    profile: str
    created_at: float
    peer_address: tuple[str, int] | None
    local_ufrag: str
    local_pwd: str = field(repr=False)
    remote_ufrag: str
    remote_pwd: str = field(repr=False)
    started: bool


@dataclass(frozen=True)
class SavedState:
    conferences: tuple[SavedConference, ...] = ()
    links: tuple[SavedLink, ...] = ()


def _conference(item: Any) -> SavedConference:
    if not isinstance(item, dict):
        raise TypeError("a conference entry is not an object")
    policy = item.get("policy", {})
    if not isinstance(policy, dict):
        raise TypeError("policy is not an object")
    return SavedConference(str(item["conference_id"]), bytes.fromhex(item["kd_fingerprint"]),
                           float(item["created_at"]), str(item.get("forwarding", "sfu")),
                           {k: policy[k] for k in _POLICY_KEYS if k in policy})


def _link(item: Any) -> SavedLink:
    address = item["peer_address"]
    return SavedLink(
        link_id=str(item["link_id"]), conference_id=str(item["conference_id"]),
        role=str(item["role"]), peer_fingerprint=bytes.fromhex(item["peer_fingerprint"]),
        profile=str(item["profile"]), created_at=float(item["created_at"]),
        peer_address=None if address is None else (str(address[0]), int(address[1])),
        local_ufrag=str(item["local_ufrag"]), local_pwd=str(item["local_pwd"]),
        remote_ufrag=str(item["remote_ufrag"]), remote_pwd=str(item["remote_pwd"]),
        started=bool(item["started"]))


def encode(state: SavedState) -> bytes:
    """The file's bytes for ``state`` (stable key order, one trailing newline)."""
    body = {
        "version": VERSION,
        "conferences": [{"conference_id": c.conference_id,
                         "kd_fingerprint": c.kd_fingerprint.hex(),
                         "created_at": c.created_at, "forwarding": c.forwarding,
                         "policy": c.policy} for c in state.conferences],
        "links": [{"link_id": k.link_id, "conference_id": k.conference_id, "role": k.role,
                   "peer_fingerprint": k.peer_fingerprint.hex(), "profile": k.profile,
                   "created_at": k.created_at,
                   "peer_address": None if k.peer_address is None else list(k.peer_address),
                   "local_ufrag": k.local_ufrag, "local_pwd": k.local_pwd,
                   "remote_ufrag": k.remote_ufrag, "remote_pwd": k.remote_pwd,
                   "started": k.started} for k in state.links],
    }
    return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode("utf-8")


def decode(data: bytes) -> SavedState:
    """Parse the file's bytes; StateError with the reason for anything else."""
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"not JSON ({e})") from None
    if not isinstance(body, dict) or body.get("version") != VERSION:
        raise StateError(f"not a version {VERSION} perc-md state file")
    try:
        conferences = tuple(_conference(item) for item in body["conferences"])
        links = tuple(_link(item) for item in body["links"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise StateError(f"malformed entry ({type(e).__name__}: {e})") from None
    known = {c.conference_id for c in conferences}
    for link in links:
        if link.conference_id not in known:
            raise StateError(f"link {link.link_id} names conference {link.conference_id!r}, "
                             "which the file does not hold")
    return SavedState(conferences, links)


class StateFile:
    """The state file at ``path`` (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> SavedState:
        """The saved state; an empty one when the file does not exist (a first start)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return SavedState()
        except OSError as e:
            raise StateError(f"cannot be read ({e.strerror})") from None
        return decode(data)

    def save(self, state: SavedState) -> None:
        """Replace the file atomically (a temporary file beside it, fsync, rename)."""
        directory = os.path.dirname(self.path) or "."
        temporary = os.path.join(directory, f".{os.path.basename(self.path)}.new")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                data = memoryview(encode(state))
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a power cut
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise StateError(f"cannot be written ({e.strerror})") from None


class MdStateKeeper:
    """Saves an MD's conferences and links on every change, restores them at start-up.

    ``links`` is the :class:`~perc_daemons.md.links.MdLinks` (None when the MD
    has no link key: then only conferences are kept).  A failed save is
    logged (it does not undo the change the provider asked for) and counted
    in :attr:`failed_saves`; the next change tries again.
    """

    log = Logger()

    def __init__(self, file: StateFile, conferences: Any, links: Any = None) -> None:
        self.file = file
        self.conferences = conferences
        self.links = links
        self.failed_saves = 0
        self._restoring = False

    def snapshot(self) -> SavedState:
        conferences = tuple(SavedConference(c.conference_id, c.kd_fingerprint, c.created_at,
                                            c.forwarding,
                                            {k: getattr(c.policy, k) for k in _POLICY_KEYS})
                            for c in self.conferences.conferences())
        known = {c.conference_id for c in conferences}
        links = () if self.links is None else tuple(
            SavedLink(link.link_id, link.conference_id, link.role, link.peer_fingerprint,
                      link.profile, link.created_at,
                      link.peer_address if link.role == "client" else None,
                      link.local_ufrag, link.local_pwd, link.remote_ufrag, link.remote_pwd,
                      self.links.started(link))
            for link in self.links.all_links() if link.conference_id in known)
        return SavedState(conferences, links)

    def changed(self) -> None:
        if self._restoring:
            return
        try:
            self.file.save(self.snapshot())
        except StateError as e:
            self.failed_saves += 1
            self.log.error("perc-md: state file {path} {reason}: a restart would lose the "
                           "latest conference or link change", path=self.file.path,
                           reason=str(e))

    def restore(self) -> tuple[int, int]:
        """Re-create the saved conferences and links (the media port must listen already);
        ``(conferences, links)`` restored.  Raises StateError for an unusable file."""
        from perc_daemons.md.links import Link, LinkError

        state = self.file.load()
        self._restoring = True
        restored_links = 0
        try:
            for saved in state.conferences:
                try:
                    self.conferences.create(saved.conference_id, saved.kd_fingerprint,
                                            created_at=saved.created_at,
                                            forwarding=saved.forwarding,
                                            policy=SelectionPolicy(**saved.policy))
                except Exception as e:  # ValueError, ConferenceConflict
                    raise StateError(f"conference {saved.conference_id!r}: {e}") from None
            for k in state.links:
                if self.links is None:
                    self.log.warn("perc-md: link {link} of conference {conference} not "
                                  "restored: this MD has no link key now", link=k.link_id,
                                  conference=k.conference_id)
                    continue
                link = Link(k.link_id, k.conference_id, k.role, k.peer_fingerprint, k.profile,
                            k.created_at, peer_address=k.peer_address,
                            local_ufrag=k.local_ufrag, local_pwd=k.local_pwd,
                            remote_ufrag=k.remote_ufrag, remote_pwd=k.remote_pwd)
                try:
                    self.links.restore(link, started=k.started)
                except LinkError as e:
                    raise StateError(f"link {k.link_id}: {e}") from None
                restored_links += 1
        finally:
            self._restoring = False
        # Written back at once: a state directory we cannot write stops start-up now,
        # not at the first change.
        self.file.save(self.snapshot())
        if state.conferences:
            self.log.info("perc-md: restored {conferences} conferences and {links} cascade "
                          "links from {path}; their participants join again",
                          conferences=len(state.conferences), links=restored_links,
                          path=self.file.path)
        return len(state.conferences), restored_links
