"""The MD's cascade links: the conference provider's side of MD-to-MD links.

A cascade link (RFC 8871 section 4.5.1) carries one conference between two
MDs: a DTLS-SRTP association of the two MDs themselves (the KD takes no
part), with the single RFC 7714 GCM profile of the conference's outer half,
each end pinning the other's certificate fingerprint, no EKT.  It runs on the
shared UDP media port as one more kind of leg of the conference's group
(:meth:`perc_daemons.md.plane.MediaPlane.add_link`), so media and RTCP
cross it hop by hop exactly as between endpoint legs.

The provider sets one up in two calls, like an offer and an answer:

1. on the MD that will *accept* the link (the DTLS server, ICE-lite side):
   ``POST /v1/conferences/{id}/links`` ``{"role": "server",
   "peer_fingerprint": FP_A}``; the answer carries what the other MD needs:
   this MD's media address, certificate fingerprint and the link's ICE
   credentials (``ice_ufrag``, ``ice_pwd``);
2. on the MD that will *open* it (the DTLS client, which sends the STUN
   checks): ``{"role": "client", "peer": {"host", "port"},
   "peer_fingerprint": FP_B, "peer_ice_ufrag", "peer_ice_pwd"}``; it starts
   at once and answers with its own credentials;
3. back on the accepting MD: ``PATCH .../links/{link}`` ``{"peer_ice_ufrag",
   "peer_ice_pwd"}`` with those; the link starts there too (state
   ``awaiting_peer`` until then).

``perc-provider links create`` does all three.  The two links of a pair know each
other only by fingerprint and address; a link to the same peer address twice
in one conference (a cycle of two) is refused (:class:`LinkConflict`).

A conference's links go when the conference is deleted or ended.  Nothing
here is per packet: :meth:`MdLinks.counters` reads what the media plane
counted for a link (packets and bytes each way, drops).
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from perc_daemons.md.plane import LEG_DROP_REASONS, LINK_COUNTERS
from perc_daemons.protocol.dtls import format_fingerprint

__all__ = ["Link", "LinkConflict", "LinkError", "MdLinks", "UnknownLink"]

#: RFC 7714 profiles a link may use: the single GCM transform of a DOUBLE
#: profile's outer half (0x0009 -> 0x0007, 0x000A -> 0x0008).
LINK_PROFILES = {"AEAD_AES_128_GCM": 0x0007, "AEAD_AES_256_GCM": 0x0008}
DEFAULT_PROFILE = "AEAD_AES_128_GCM"
#: Most links one conference may have on one MD (a tree's degree).
MAX_LINKS_PER_CONFERENCE = 16


class LinkError(Exception):
    """A link request that cannot be carried out (its message says why)."""


class UnknownLink(LinkError):
    pass


class LinkConflict(LinkError):
    pass


def _credential(nbytes: int) -> str:
    """ICE-safe random text ([A-Za-z0-9+/], RFC 8445 section 5.3)."""
    return base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii").rstrip("=")


@dataclass(eq=False)
class Link:
    link_id: str
    conference_id: str
    role: str  # "client" (opens it) or "server" (accepts it)
    peer_fingerprint: bytes
    profile: str
    created_at: float
    peer_address: tuple[str, int] | None = None  # client: given; server: learnt
    local_ufrag: str = ""
    local_pwd: str = field(default="", repr=False)
    remote_ufrag: str = ""
    remote_pwd: str = field(default="", repr=False)


def _host(value: object) -> str:
    if not isinstance(value, str):
        raise LinkError('"peer.host" must be an IP address')
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise LinkError('"peer.host" must be an IP address (the peer MD\'s media '
                        'address)') from None


class MdLinks:
    """The links of one MD's conferences, over the media protocol ``media()`` returns
    (a :class:`~perc_daemons.md.media.MediaPlaneProtocol`, once it listens)."""

    log = Logger()

    def __init__(self, plane: Any, clock: IReactorTime, *,
                 media: Callable[[], Any]) -> None:
        self.plane = plane
        self.clock = clock
        self._media = media
        self._links: dict[str, Link] = {}
        self._started: set[str] = set()  # link ids handed to the plane
        self.events = {"up": 0, "down": 0}
        #: Called after a link was added, started or removed (md/state.py saves then).
        self.on_changed: Callable[[], None] | None = None
        plane.on_link = self._on_link

    def _changed(self) -> None:
        if self.on_changed is not None:
            self.on_changed()

    def all_links(self) -> list[Link]:
        return list(self._links.values())

    def started(self, link: Link) -> bool:
        """Whether the link runs on the plane (an accepting link: once :meth:`complete`)."""
        return link.link_id in self._started

    def restore(self, link: Link, *, started: bool) -> None:
        """Add a link a restarted MD saved (md/state.py), running again if it ran.

        The same id and ICE credentials as before the restart: the peer MD's
        link, which kept them, re-establishes the association with this one.
        """
        if link.link_id in self._links:
            raise LinkConflict(f"link {link.link_id} exists already")
        self._check(link.conference_id, link.profile)
        self._links[link.link_id] = link
        if started:
            try:
                self._start(link)
            except (LinkError, ValueError) as e:
                del self._links[link.link_id]
                raise LinkError(str(e)) from None

    def links(self, conference_id: str) -> list[Link]:
        return [link for link in self._links.values() if link.conference_id == conference_id]

    def link(self, conference_id: str, link_id: str) -> Link:
        link = self._links.get(link_id)
        if link is None or link.conference_id != conference_id:
            raise UnknownLink(f"no link {link_id!r} in conference {conference_id!r}")
        return link

    def state(self, link: Link) -> str:
        if link.link_id not in self._started:
            return "awaiting_peer"  # an accepting link before the opener's credentials
        return self.plane.link_state(link.link_id)

    def counters(self, link: Link) -> tuple[dict[str, int], dict[str, int]]:
        """What crossed the link so far: its counters
        (:data:`~perc_daemons.md.plane.LINK_COUNTERS`: datagrams, and the media's bytes,
        each way) and its drops by reason (:data:`~perc_daemons.md.plane.LEG_DROP_REASONS`);
        zeros while it awaits its peer.  They run on across the link going down and
        up again."""
        if link.link_id not in self._started:
            return dict.fromkeys(LINK_COUNTERS, 0), dict.fromkeys(LEG_DROP_REASONS, 0)
        leg = self.plane.leg(link.link_id)
        return dict(leg.counters), dict(leg.drops)

    def _on_link(self, link_id: str, event: Any) -> None:
        link = self._links.get(link_id)
        if link is None:
            return
        up = type(event).__name__ == "LinkUp"
        self.events["up" if up else "down"] += 1
        if up and link.role == "server":
            # learnt from the peer's authenticated check: listed, and refused as the
            # peer of a second link (a cycle of two, whichever MD opened the first)
            address = self.plane.link(link_id).peer_address
            if address is not None:
                link.peer_address = (str(address[0]), int(address[1]))
        if up:
            self.log.info("perc-md: conference {conference}: link {link} up", link=link_id,
                          conference=link.conference_id)
        else:
            self.log.warn("perc-md: conference {conference}: link {link} down ({reason}); "
                          "{what}", link=link_id, conference=link.conference_id,
                          reason=getattr(event, "reason", "?"),
                          what="opening it again" if link.role == "client"
                          else "waiting for the peer to open it again")

    def _check(self, conference_id: str, profile: str) -> None:
        if profile not in LINK_PROFILES:
            raise LinkError('"srtp_profile" must be one of ' + ", ".join(LINK_PROFILES))
        if len(self.links(conference_id)) >= MAX_LINKS_PER_CONFERENCE:
            raise LinkConflict(f"conference {conference_id!r} has "
                               f"{MAX_LINKS_PER_CONFERENCE} links already")

    def _start(self, link: Link) -> None:
        media = self._media()
        if media is None:
            raise LinkError("the media port is not listening yet")
        media.add_link(
            link.link_id, link.conference_id, role=link.role, local_ufrag=link.local_ufrag,
            local_pwd=link.local_pwd, remote_ufrag=link.remote_ufrag,
            remote_pwd=link.remote_pwd, peer_address=link.peer_address,
            peer_fingerprint=link.peer_fingerprint, profile=LINK_PROFILES[link.profile])
        self._started.add(link.link_id)
        self.log.info("perc-md: conference {conference}: {role} link {link} to the MD "
                      "{fingerprint}{at}", conference=link.conference_id, role=link.role,
                      link=link.link_id, fingerprint=format_fingerprint(link.peer_fingerprint),
                      at=f" at {link.peer_address[0]}:{link.peer_address[1]}"
                      if link.peer_address else "")

    def accept(self, conference_id: str, peer_fingerprint: bytes, *,
               profile: str = DEFAULT_PROFILE) -> Link:
        """A link the peer MD will open (this MD: DTLS server): step 1 of the module doc.
        It starts once :meth:`complete` gives it the opening link's credentials."""
        self._check(conference_id, profile)
        link = Link(str(uuid.uuid4()), conference_id, "server", peer_fingerprint, profile,
                    self.clock.seconds(), local_ufrag=_credential(6),
                    local_pwd=_credential(18))
        self._links[link.link_id] = link
        self._changed()
        return link

    def open(self, conference_id: str, peer_fingerprint: bytes, peer_host: object,
             peer_port: object, peer_ufrag: object, peer_pwd: object, *,
             profile: str = DEFAULT_PROFILE) -> Link:
        """A link this MD opens (DTLS client) toward a link the peer accepted (step 2)."""
        self._check(conference_id, profile)
        host = _host(peer_host)
        if isinstance(peer_port, bool) or not isinstance(peer_port, int) \
                or not 0 < peer_port < 65536:
            raise LinkError('"peer.port" must be a UDP port, 1-65535')
        ufrag, pwd = _peer_credentials(peer_ufrag, peer_pwd)
        if any(link.peer_address == (host, peer_port) for link in self.links(conference_id)):
            raise LinkConflict(f"conference {conference_id!r} has a link to {host}:{peer_port} "
                               "already: a second one would close a cycle")
        link = Link(str(uuid.uuid4()), conference_id, "client", peer_fingerprint, profile,
                    self.clock.seconds(), peer_address=(host, peer_port),
                    local_ufrag=_credential(6), local_pwd=_credential(18),
                    remote_ufrag=ufrag, remote_pwd=pwd)
        self._links[link.link_id] = link
        try:
            self._start(link)
        except (LinkError, ValueError) as e:
            del self._links[link.link_id]
            raise LinkError(str(e)) from None
        self._changed()
        return link

    def complete(self, conference_id: str, link_id: str, peer_ufrag: object,
                 peer_pwd: object) -> Link:
        """Step 3: the accepting link learns the opening link's credentials and starts."""
        link = self.link(conference_id, link_id)
        if link.role != "server" or link.link_id in self._started:
            raise LinkConflict(f"link {link_id} is not waiting for its peer's credentials")
        link.remote_ufrag, link.remote_pwd = _peer_credentials(peer_ufrag, peer_pwd)
        try:
            self._start(link)
        except ValueError as e:
            raise LinkError(str(e)) from None
        self._changed()
        return link

    def remove(self, conference_id: str, link_id: str) -> None:
        self.link(conference_id, link_id)  # UnknownLink for another conference's
        del self._links[link_id]
        if link_id in self._started:
            self._started.discard(link_id)
            media = self._media()
            if media is not None:
                media.remove_link(link_id)
        self.log.info("perc-md: conference {conference}: link {link} removed",
                      conference=conference_id, link=link_id)
        self._changed()

    def conference_deleted(self, conference_id: str) -> int:
        """Remove every link of a deleted (or ended) conference; how many."""
        links = self.links(conference_id)
        for link in links:
            self.remove(conference_id, link.link_id)
        return len(links)


def _peer_credentials(ufrag: object, pwd: object) -> tuple[str, str]:
    for name, value, low in (("peer_ice_ufrag", ufrag, 4), ("peer_ice_pwd", pwd, 22)):
        if not isinstance(value, str) or not low <= len(value) <= 256 or not value.isascii() \
                or not value.isprintable() or ":" in value or " " in value:
            raise LinkError(f'"{name}" must be the peer link\'s ICE credential '
                            f'(RFC 8445 section 5.3: {low}-256 characters)')
    return ufrag, pwd  # type: ignore[return-value]
