"""The MD's HTTPS conference API (Twisted Web), over the MD's conferences.

Routes (JSON bodies; every error is an RFC 9457 ``application/problem+json``
document with ``type`` ``urn:perc:problem:<slug>``, ``title``, ``status``,
``detail``):

===================================================================  ======================
``POST   /v1/conferences``  {"id", "kd_fingerprint"}                   provider token
``GET    /v1/conferences/{id}``                                        provider token
``DELETE /v1/conferences/{id}``                                        provider token
``POST   /v1/conferences/{id}/participants``  {"offer"}                none (the KD decides)
``DELETE /v1/conferences/{id}/participants/{association}``             the leave token
===================================================================  ======================

* ``POST /v1/conferences`` -> 201 ``{"id", "kd_fingerprint", "tunnel": {"port"},
  "media": {"host", "port"}}``; the same id with the same fingerprint again
  -> 200 (same body); with another fingerprint -> 409.
* ``GET`` -> 200 the same plus ``"kd_connected"`` and ``"participants"``:
  ``[{"association", "state", "joined_at", <LEG_COUNTERS>..., "drops": {reason: n}}]``.
* ``DELETE`` -> 204; the KD gets EndpointDisconnect for each participant.
* join -> 201 ``{"association", "answer", "leave_token"}`` (``answer`` is the
  KD's signed answer, verbatim); 404 unknown conference, 400 unusable offer
  (or the KD's BAD_OFFER), 403 the KD refused (``detail`` = its text,
  ``reason`` = the machine-readable code it starts with, e.g. ``not_invited``,
  ``not_started``, ``conference_ended``), 503
  no tunnel to the conference's KD (or too many joins waiting), 504 the KD
  did not answer within ``[api] join_timeout``, 502 another KD status.
* leave -> 204, also when the participant is already gone (it left, the KD
  or its consent ended it, the conference was deleted): a leave is idempotent;
  401 without ``Authorization: Bearer``, 403 a token that is not the (present)
  participant's own.

The provider token (``[api] provider_token_file``, :class:`ProviderToken`)
is compared in constant time; without it the provider routes answer 401,
with a wrong one 403, and while the file is missing or unusable 503.  Bodies
beyond ``max_body`` bytes are refused (413) without being buffered.

Problems, body limits and JSON bodies: :mod:`perc_daemons.problems`, shared
with the KMF.
"""

from __future__ import annotations

import hmac
import os
import re
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from perc_daemons import tls
from perc_daemons.logs import AccessLogSite
from perc_daemons.md.cluster import MdCluster
from perc_daemons.md.conferences import (
    FORWARDING,
    BadOffer,
    Conference,
    ConferenceConflict,
    KdFailed,
    KdRefused,
    KdTimeout,
    KdUnavailable,
    LeaveRefused,
    MdConferences,
    Participant,
    UnknownConference,
    UnknownParticipant,
)
from perc_daemons.md.links import (
    DEFAULT_PROFILE,
    Link,
    LinkConflict,
    LinkError,
    MdLinks,
    UnknownLink,
)
from perc_daemons.md.plane import LEG_BYTES, LEG_COUNTERS, Leg, leg_label
from perc_daemons.problems import JsonApi, LimitedRequest, Problem, Response, Routes, read_json
from perc_daemons.protocol.dtls import format_fingerprint, parse_fingerprint
from perc_daemons.protocol.selection import SelectionPolicy
from perc_daemons.protocol.tunnel import MAX_SDP_LENGTH, refusal_code

__all__ = ["MAX_BODY", "MdApi", "Problem", "ProviderToken", "md_site"]

#: Largest request body: an offer of MAX_SDP_LENGTH characters, JSON-escaped, fits.
MAX_BODY = 2 * MAX_SDP_LENGTH + 1024
_REALM = 'Bearer realm="perc-md"'
def _bearer(request: server.Request) -> str:
    header = request.getHeader(b"authorization")
    if header is None:
        raise Problem(401, "unauthorized", "Authentication required",
                      "a bearer token is required",
                      headers={b"www-authenticate": _REALM.encode()})
    kind, _, token = header.decode("latin-1").partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise Problem(401, "unauthorized", "Authentication required",
                      "the Authorization header must be 'Bearer <token>'",
                      headers={b"www-authenticate":
                               f'{_REALM}, error="invalid_request"'.encode()})
    return token.strip()


class ProviderToken:
    """The conference provider's bearer token, read from ``path`` (first line).

    The file is checked on each use (one ``lstat``: type, owner and mode,
    even when the cached token is used) and re-read when it changed, so it
    can be created or rotated without a restart, and a ``chmod 0644`` is
    noticed at the next request.  Missing, too open (not 0600/0640), not ours
    or root's, unreadable or empty: :meth:`current` is None (the API answers
    503) and the reason is logged, with the file's name, once per change.
    """

    log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token: bytes | None = None
        self._problem: str | None = None

    def check(self) -> str | None:
        """Load now; the reason the file is unusable (None when usable or just missing)."""
        self.current()
        if self._problem is None or not os.path.lexists(self.path):
            return None
        return self._problem

    def current(self) -> bytes | None:
        try:
            st = os.lstat(self.path)
            tls.check_private_stat(self.path, st)  # on every use, the cached token too
        except FileNotFoundError:
            return self._unusable("file not found: conference creation and deletion are "
                                  "refused (503) until it exists")
        except OSError as e:
            return self._unusable(e.strerror or str(e))
        except tls.TlsFileError as e:
            return self._unusable(str(e))
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return self._token
        try:
            token = tls.read_secret_line(self.path)
        except tls.TlsFileError as e:
            return self._unusable(str(e))
        self._stamp, self._token = stamp, token.encode("utf-8")
        if self._problem is not None:
            self.log.info("perc-md: provider token {path} loaded", path=self.path)
        self._problem = None
        return self._token

    def _unusable(self, reason: str) -> None:
        self._stamp = self._token = None
        if reason != self._problem:
            self._problem = reason
            self.log.error("perc-md: [api] provider_token_file {path}: {reason}",
                           path=self.path, reason=reason)
        return None


def _conference_id(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise Problem(404, "not-found", "Not found", "no such conference")
    return value


#: What a receiver may ask for (join body and PATCH), each an integer or null.
RECEIVE_KEYS = ("last_n", "max_height", "max_bitrate")


def _receive(value: Any, *, every_key: bool = False) -> dict[str, int | None]:
    """The ``receive`` object of a join or PATCH body, checked (400 otherwise).

    In a PATCH a key left out means "no limit" (every key is set)."""
    if not isinstance(value, dict):
        raise Problem(400, "invalid-request", "Invalid request",
                      '"receive" must be an object')
    unknown = sorted(set(value) - set(RECEIVE_KEYS))
    if unknown:
        raise Problem(400, "invalid-request", "Invalid request",
                      f'"receive" has unknown keys: {", ".join(unknown)} '
                      f'(known: {", ".join(RECEIVE_KEYS)})')
    out: dict[str, int | None] = {}
    for key in RECEIVE_KEYS:
        item = value.get(key)
        if item is None:
            if every_key:
                out[key] = None
            continue
        if isinstance(item, bool) or not isinstance(item, int) or not (
                item >= -1 if key == "last_n" else item > 0):
            raise Problem(400, "invalid-request", "Invalid request",
                          f'"receive.{key}" must be '
                          + ("-1 (all) or a count" if key == "last_n" else "a positive integer"))
        out[key] = item
    return out


def _association(value: str) -> bytes:
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise Problem(404, "not-found", "Not found", "no such participant") from None
    return parsed.bytes


def participant_json(participant: Participant) -> dict[str, Any]:
    leg = participant.leg
    body: dict[str, Any] = {"association": participant.association,
                            "state": participant.state, "joined_at": participant.joined_at}
    for name in (*LEG_COUNTERS, *LEG_BYTES):
        body[name] = leg.counters[name]
    body["drops"] = dict(leg.drops)
    if leg.selection is not None:
        body["receive"] = receive_json(leg)
    return body


def receive_json(leg: Leg) -> dict[str, Any]:
    """What the selection forwards to this participant (docs/API.md)."""
    view = leg.selection.receiver_view(leg.leg_id)  # type: ignore[union-attr]
    view["layers"] = [{**layer, "source": leg_label(layer["source"])}
                      for layer in view["layers"]]  # type: ignore[attr-defined]
    return view


def _forwarding(body: dict[str, Any]) -> tuple[str, SelectionPolicy]:
    """``forwarding`` and the selection policy of a conference creation body (400 if bad)."""
    forwarding = body.get("forwarding", "sfu")
    if forwarding not in FORWARDING:
        raise Problem(400, "invalid-request", "Invalid request",
                      f'"forwarding" must be one of {", ".join(FORWARDING)}')
    last_n, levels, top_k = (body.get("last_n", -1), body.get("audio_levels", True),
                             body.get("audio_top_k", 0))
    if isinstance(last_n, bool) or not isinstance(last_n, int) or last_n < -1:
        raise Problem(400, "invalid-request", "Invalid request",
                      '"last_n" must be -1 (every source) or a count of video sources')
    if not isinstance(levels, bool):
        raise Problem(400, "invalid-request", "Invalid request",
                      '"audio_levels" must be true or false')
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise Problem(400, "invalid-request", "Invalid request",
                      '"audio_top_k" must be 0 (every sender) or a count')
    return forwarding, SelectionPolicy(last_n=last_n, audio_levels=levels, audio_top_k=top_k)


class MdApi(JsonApi):
    """The routes above as one leaf resource.

    ``tunnel_port`` returns the KD tunnel's listening port (known once it listens).
    """

    def __init__(self, conferences: MdConferences, provider_token: ProviderToken, *,
                 tunnel_port: Callable[[], int], clock: IReactorTime,
                 links: MdLinks | None = None, fingerprint: bytes = b"",
                 cluster: MdCluster | None = None) -> None:
        super().__init__()
        self.conferences = conferences
        self.provider_token = provider_token
        self.tunnel_port = tunnel_port
        self.clock = clock
        self.links = links
        self.cluster = cluster
        self.fingerprint = fingerprint
        cid = r"(?P<cid>[^/]+)"
        self._routes: Routes = [
            (re.compile(r"/v1/md"), {b"GET": self.md_info}),
            (re.compile(rf"/v1/conferences/{cid}/links"),
             {b"GET": self.list_links, b"POST": self.create_link}),
            (re.compile(rf"/v1/conferences/{cid}/links/(?P<link>[^/]+)"),
             {b"PATCH": self.complete_link, b"DELETE": self.delete_link}),
            (re.compile(r"/v1/conferences"), {b"POST": self.create_conference}),
            (re.compile(rf"/v1/conferences/{cid}"),
             {b"GET": self.get_conference, b"DELETE": self.delete_conference}),
            (re.compile(rf"/v1/conferences/{cid}/participants"), {b"POST": self.join}),
            (re.compile(rf"/v1/conferences/{cid}/participants/(?P<association>[^/]+)"),
             {b"DELETE": self.leave, b"PATCH": self.change_receive}),
        ]

    # -- plumbing ---------------------------------------------------------------------

    def problem_for(self, request: server.Request, failure: Failure) -> Problem:
        error = failure.value
        if isinstance(error, UnknownConference):
            problem = Problem(404, "not-found", "Not found", "no such conference")
        elif isinstance(error, UnknownParticipant):
            problem = Problem(404, "not-found", "Not found", "no such participant")
        elif isinstance(error, ConferenceConflict):
            problem = Problem(409, "conference-exists", "Conference exists", str(error))
        elif isinstance(error, LeaveRefused):
            problem = Problem(403, "forbidden", "Forbidden", str(error))
        elif isinstance(error, BadOffer):
            problem = Problem(400, "bad-offer", "Unusable offer", str(error))
        elif isinstance(error, KdRefused):
            # the KD's text starts with its machine-readable code ("not_started: ...")
            code = refusal_code(str(error))
            problem = Problem(403, "kd-refused", "Refused by the key distributor", str(error),
                              extensions={"reason": code} if code else None)
        elif isinstance(error, KdUnavailable):
            problem = Problem(503, "kd-unavailable", "Key distributor unavailable", str(error),
                              headers={b"retry-after": b"5"})
        elif isinstance(error, KdTimeout):
            problem = Problem(504, "kd-timeout", "Key distributor timeout", str(error))
        elif isinstance(error, KdFailed):
            problem = Problem(502, "kd-failed", "Key distributor failure", str(error))
        elif isinstance(error, UnknownLink):
            problem = Problem(404, "not-found", "Not found", str(error))
        elif isinstance(error, LinkConflict):
            problem = Problem(409, "link-conflict", "Link conflict", str(error))
        elif isinstance(error, LinkError):
            problem = Problem(400, "invalid-request", "Invalid request", str(error))
        else:
            problem = super().problem_for(request, failure)
        return problem

    def _provider(self, request: server.Request) -> None:
        """Require the conference provider's token (constant-time comparison)."""
        given = _bearer(request)
        expected = self.provider_token.current()
        if expected is None:
            raise Problem(503, "provider-token-unavailable", "Service unavailable",
                          "the MD has no usable provider token file; see its log",
                          headers={b"retry-after": b"60"})
        if not hmac.compare_digest(given.encode("utf-8", "replace"), expected):
            raise Problem(403, "forbidden", "Forbidden", "wrong provider token")

    def _conference_json(self, conference: Conference,
                         request: server.Request) -> dict[str, Any]:
        # The tunnel is served with the API's certificate: the name the provider used
        # to reach the API is one the KD can verify the MD by.
        host = request.getRequestHostname().decode("ascii", "replace")
        return {
            "id": conference.conference_id,
            "kd_fingerprint": format_fingerprint(conference.kd_fingerprint),
            "tunnel": {"host": host, "port": self.tunnel_port()},
            "media": {"host": self.conferences.media_host,
                      "port": self.conferences.media_port},
            "forwarding": conference.forwarding,
            **({"last_n": conference.policy.last_n,
                "audio_levels": conference.policy.audio_levels,
                "audio_top_k": conference.policy.audio_top_k}
               if conference.forwarding == "sfu" else {}),
        }

    # -- routes -----------------------------------------------------------------------

    async def create_conference(self, request: server.Request) -> Response:
        self._provider(request)
        body = read_json(request)
        cid, fp_text = body.get("id"), body.get("kd_fingerprint")
        if not isinstance(cid, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", cid):
            raise Problem(400, "invalid-request", "Invalid request",
                          '"id" must be 1-64 characters of A-Z a-z 0-9 . _ -')
        try:
            if not isinstance(fp_text, str):
                raise ValueError
            fingerprint = parse_fingerprint(fp_text)
        except ValueError:
            raise Problem(400, "invalid-request", "Invalid request",
                          '"kd_fingerprint" must be a SHA-256 fingerprint "AA:BB:..."'
                          ) from None
        forwarding, policy = _forwarding(body)
        conference, created = self.conferences.create(cid, fingerprint, forwarding=forwarding,
                                                      policy=policy)
        location = f"/v1/conferences/{cid}".encode()
        return Response(201 if created else 200, self._conference_json(conference, request),
                        {b"location": location})

    async def get_conference(self, request: server.Request, cid: str) -> Response:
        self._provider(request)
        conference = self.conferences.conference(_conference_id(cid))
        body = self._conference_json(conference, request)
        body["kd_connected"] = self.conferences.kd_connected(conference.kd_fingerprint)
        body["participants"] = [participant_json(p)
                                for p in conference.participants.values()]
        return Response(200, body)

    async def delete_conference(self, request: server.Request, cid: str) -> Response:
        self._provider(request)
        self.conferences.delete(_conference_id(cid))
        return Response(204)

    # -- cascade links (md/links.py) ------------------------------------------------

    def _media(self) -> dict[str, Any]:
        return {"host": self.conferences.media_host, "port": self.conferences.media_port}

    async def md_info(self, request: server.Request) -> Response:
        """What another MD (and the provider linking them) needs to know of this one."""
        self._provider(request)
        host = request.getRequestHostname().decode("ascii", "replace")
        c = self.conferences
        return Response(200, {"fingerprint": format_fingerprint(self.fingerprint),
                              "media": self._media(),
                              "tunnel": {"host": host, "port": self.tunnel_port()},
                              "load": {"participants": len(c.participants()) + c.pending_joins,
                                       "conferences": len(c.conferences())},
                              "cluster": list(self.cluster.processes)
                              if self.cluster is not None else []})

    def _link_json(self, link: Link) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": link.link_id, "conference": link.conference_id, "role": link.role,
            "srtp_profile": link.profile, "state": self._links().state(link),
            "peer_fingerprint": format_fingerprint(link.peer_fingerprint),
            "peer": ({"host": link.peer_address[0], "port": link.peer_address[1]}
                     if link.peer_address else None),
            "fingerprint": format_fingerprint(self.fingerprint), "media": self._media(),
        }
        # what the other MD's half needs (RFC 8445 section 5.3 credentials)
        body["ice_ufrag"], body["ice_pwd"] = link.local_ufrag, link.local_pwd
        # what crossed it: "*_in" from the peer MD, "*_out" to it (LINK_COUNTERS)
        counters, drops = self._links().counters(link)
        body.update(counters)
        body["drops"] = drops
        return body

    def _links(self) -> MdLinks:
        if self.links is None:
            raise Problem(404, "not-found", "Not found", "this MD has no cascade links")
        return self.links

    async def list_links(self, request: server.Request, cid: str) -> Response:
        self._provider(request)
        conference = self.conferences.conference(_conference_id(cid))
        return Response(200, {"links": [self._link_json(link) for link in
                                        self._links().links(conference.conference_id)]})

    async def create_link(self, request: server.Request, cid: str) -> Response:
        self._provider(request)
        conference = self.conferences.conference(_conference_id(cid))
        body = read_json(request)
        allowed = {"role", "peer_fingerprint", "peer", "peer_ice_ufrag", "peer_ice_pwd",
                   "srtp_profile"}
        if set(body) - allowed:
            raise LinkError("unknown member(s): " + ", ".join(sorted(set(body) - allowed)))
        try:
            if not isinstance(body.get("peer_fingerprint"), str):
                raise ValueError
            peer_fingerprint = parse_fingerprint(body["peer_fingerprint"])
        except ValueError:
            raise LinkError('"peer_fingerprint" must be the peer MD\'s SHA-256 certificate '
                            'fingerprint "AA:BB:..."') from None
        profile = body.get("srtp_profile", DEFAULT_PROFILE)
        role = body.get("role")
        if role == "server":
            link = self._links().accept(conference.conference_id, peer_fingerprint,
                                        profile=profile)
        elif role == "client":
            peer = body.get("peer")
            if not isinstance(peer, dict):
                raise LinkError('"peer" must be {"host", "port"}: the accepting MD\'s media '
                                'address')
            link = self._links().open(conference.conference_id, peer_fingerprint,
                                      peer.get("host"), peer.get("port"),
                                      body.get("peer_ice_ufrag"), body.get("peer_ice_pwd"),
                                      profile=profile)
        else:
            raise LinkError('"role" must be "server" (accept the link) or "client" (open it)')
        return Response(201, self._link_json(link),
                        {b"location": f"/v1/conferences/{cid}/links/{link.link_id}".encode()})

    async def complete_link(self, request: server.Request, cid: str, link: str) -> Response:
        self._provider(request)
        conference = self.conferences.conference(_conference_id(cid))
        body = read_json(request)
        if set(body) - {"peer_ice_ufrag", "peer_ice_pwd"}:
            raise LinkError('only "peer_ice_ufrag" and "peer_ice_pwd" may be given')
        done = self._links().complete(conference.conference_id, link,
                                      body.get("peer_ice_ufrag"), body.get("peer_ice_pwd"))
        return Response(200, self._link_json(done))

    async def delete_link(self, request: server.Request, cid: str, link: str) -> Response:
        self._provider(request)
        conference = self.conferences.conference(_conference_id(cid))
        self._links().remove(conference.conference_id, link)
        return Response(204)

    async def join(self, request: server.Request, cid: str) -> Response:
        _conference_id(cid)
        self.conferences.conference(cid)  # 404 before reading the body
        body = read_json(request)
        offer = body.get("offer")
        if not isinstance(offer, str) or not offer:
            raise Problem(400, "invalid-request", "Invalid request",
                          '"offer" must be the SDP offer text')
        if self.cluster is not None and request.args.get(b"placed") != [b"1"]:
            placement = await self.cluster.place(cid)
            if placement.url is not None:  # another process of this host takes it
                return Response(307, {"placed": placement.process},
                                {b"location": placement.url.encode()})
        receive = _receive(body.get("receive", {}))
        aid, answer, leave_token = await self.conferences.join(cid, offer, receive or None)
        association = str(uuid.UUID(bytes=aid))
        return Response(201, {"association": association, "answer": answer,
                              "leave_token": leave_token},
                        {b"location": f"/v1/conferences/{cid}/participants/{association}"
                         .encode()})

    async def change_receive(self, request: server.Request, cid: str,
                             association: str) -> Response:
        """PATCH {"receive": {...}}: what the participant receives from now on."""
        token = _bearer(request)
        body = read_json(request)
        receive = _receive(body.get("receive"), every_key=True)
        try:
            leg = self.conferences.set_receive(_conference_id(cid), _association(association),
                                               token, receive)
        except ValueError as e:
            raise Problem(400, "invalid-request", "Invalid request", str(e)) from None
        return Response(200, {"receive": receive_json(leg)})

    async def leave(self, request: server.Request, cid: str, association: str) -> Response:
        token = _bearer(request)
        self.conferences.leave(_conference_id(cid), _association(association), token)
        return Response(204)


def md_site(api: MdApi, *, max_body: int = MAX_BODY) -> server.Site:
    site = AccessLogSite(api, requestFactory=LimitedRequest)
    site.max_body = max_body  # type: ignore[attr-defined]
    site.displayTracebacks = False
    site.noisy = False
    return site
