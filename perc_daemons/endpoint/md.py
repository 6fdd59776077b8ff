"""The endpoint's client of the MD's HTTPS conference API (docs/API.md, "perc-md").

* ``POST /v1/conferences/{cid}/participants`` ``{"offer": sdp}`` -> 201
  ``{"association", "answer", "leave_token"}``: :meth:`MdClient.join`.  No
  authorization: the KD decides from the offer's identity assertion.  The
  answer is the KD-signed SDP the caller must verify before any media
  (:func:`~perc_daemons.protocol.answer.verify_signed_answer`).
* ``DELETE /v1/conferences/{cid}/participants/{association}`` with
  ``Authorization: Bearer <leave_token>`` -> 204: :meth:`MdClient.leave`.

The MD's certificate is checked against the CA and its name (no client
certificate: the MD is only semi-trusted and learns nothing from one).
Failures are typed: :class:`JoinRefused` carries the HTTP status and the
RFC 9457 problem's title and detail (403: the KD's reason; 404 unknown
conference; 503 the conference's KD is not connected; 504 the KD did not
answer).  The leave token is never logged nor shown in ``repr``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from cryptography import x509

from perc_daemons.endpoint.https import (
    ClientTlsPolicy,
    EndpointHttpError,
    HttpsClient,
    problem_text,
)
from perc_daemons.protocol import jsontext

__all__ = ["JoinRefused", "JoinResponse", "LeaveFailed", "MdClient", "MdError",
           "ReceiveRefused"]


class MdError(EndpointHttpError):
    """The MD answered something unusable."""


class JoinRefused(MdError):
    """The MD (or through it, the KD) refused the offer: ``status``, ``title``, ``detail``."""

    def __init__(self, status: int, title: str, detail: str = "") -> None:
        super().__init__(f"join refused: {title} ({status})" + (f": {detail}" if detail else ""))
        self.status = status
        self.title = title
        self.detail = detail


class LeaveFailed(MdError):
    """The MD refused the DELETE of our participant."""

    def __init__(self, status: int, title: str, detail: str = "") -> None:
        super().__init__(f"leave refused: {title} ({status})" + (f": {detail}" if detail else ""))
        self.status = status


class ReceiveRefused(MdError):
    """The MD refused the PATCH of what we receive (e.g. 409: it forwards everything)."""

    def __init__(self, status: int, title: str, detail: str = "") -> None:
        super().__init__(f"receive change refused: {title} ({status})"
                         + (f": {detail}" if detail else ""))
        self.status = status
        self.title = title
        self.detail = detail


@dataclass(frozen=True)
class JoinResponse:
    """The MD's 201 answer to an offer."""

    association: str  # canonical UUID string
    association_id: bytes  # its 16 bytes
    signed_answer: str
    leave_token: str = field(repr=False)
    #: The MD process holding the participant (another of the host's after a 307).
    md_url: str = ""


class MdClient:
    """The MD's conference API at ``url`` (``https://host:port``), server checked with ``ca``."""

    def __init__(self, reactor: Any, url: str, *, ca: Sequence[x509.Certificate]) -> None:
        self.http = HttpsClient(reactor, url, ClientTlsPolicy(ca))

    def __repr__(self) -> str:
        return f"<MdClient {self.http.base}>"

    async def close(self) -> None:
        await self.http.close()

    async def join(self, conference_id: str, offer: str,
                   receive: Mapping[str, Any] | None = None) -> JoinResponse:
        """POST the offer; the association, signed answer and leave token.

        ``receive`` (an SFU's receive preferences: ``last_n``, ``max_height``,
        ``max_bitrate``) goes into the join body beside the offer when given.

        An MD of several processes may place the participant on another one
        of the same host (docs/API.md, "Placement"): a ``307`` whose
        ``Location`` is that process's join URL, on the same host name and
        checked with the same CA.  The offer is sent there once more (no
        further redirect followed), and the leave goes there too
        (:attr:`JoinResponse.md_url`).
        """
        path = f"/v1/conferences/{quote(conference_id, safe='')}/participants"
        code, body, content, where = await self._post_offer(path, offer, receive)
        if code == 307:
            code, body, content, where = await self._post_offer(
                self._placed_at(body, where), offer, receive)
            if code == 307:
                raise MdError("the MD's process redirected the join again")
        if code != 201:
            raise JoinRefused(code, *problem_text(code, content))
        if not isinstance(body, dict) or not all(
                isinstance(body.get(k), str) and body[k]
                for k in ("association", "answer", "leave_token")):
            raise MdError("the MD's join answer lacks association, answer or leave_token")
        try:
            association = uuid.UUID(body["association"])
        except ValueError:
            raise MdError("the MD's association is not a UUID") from None
        return JoinResponse(str(association), association.bytes, body["answer"],
                            body["leave_token"], md_url=where)

    async def _post_offer(self, path: str, offer: str,
                          receive: Mapping[str, Any] | None = None
                          ) -> tuple[int, Any, bytes, str]:
        """(status, JSON body, raw body, base URL) of the offer POSTed to ``path`` (a path
        on the MD, or an absolute URL of one of its processes)."""
        body: dict[str, Any] = {"offer": offer}
        if receive is not None:
            body["receive"] = dict(receive)
        data = json.dumps(body).encode("utf-8")
        code, headers, content = await self.http.request(
            "POST", path, headers={"Accept": "application/json",
                                   "Content-Type": "application/json"}, data=data)
        where = self.http.base
        if path.startswith("https://"):
            parts = urlsplit(path)
            where = f"https://{parts.netloc}"
        if code == 307:
            location = headers.getRawHeaders(b"location", [b""])[0].decode("ascii", "replace")
            return code, location, content, where
        try:
            parsed = jsontext.loads(content) if content.strip() else None
        except jsontext.JsonError:
            parsed = None
        return code, parsed, content, where

    def _placed_at(self, location: str, where: str) -> str:
        """The absolute join URL of a 307; MdError unless https on the MD's own host name."""
        target = urlsplit(urljoin(where + "/", location))
        ours = urlsplit(self.http.base)
        if target.scheme != "https" or target.hostname != ours.hostname or not target.port:
            raise MdError(f"the MD redirected the join to {location!r}, not to another "
                          f"process on {ours.hostname}")
        return urlunsplit(target)

    async def set_receive(self, conference_id: str, joined: JoinResponse,
                          receive: Mapping[str, Any]) -> dict[str, Any]:
        """PATCH what our participant receives from now on (docs/API.md: ``last_n``,
        ``max_height``, ``max_bitrate``; a key left out is no limit), authenticated by
        the leave token; the MD's receive view (forwarded layers, counters).
        :class:`ReceiveRefused` if the MD says no."""
        path = (f"{joined.md_url if joined.md_url != self.http.base else ''}"
                f"/v1/conferences/{quote(conference_id, safe='')}/participants/"
                f"{joined.association}")
        code, _, content = await self.http.request(
            "PATCH", path, headers={"Authorization": f"Bearer {joined.leave_token}",
                                    "Accept": "application/json",
                                    "Content-Type": "application/json"},
            data=json.dumps({"receive": dict(receive)}).encode("utf-8"))
        if code != 200:
            raise ReceiveRefused(code, *problem_text(code, content))
        try:
            body = jsontext.loads(content)
        except jsontext.JsonError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("receive"), dict):
            raise MdError("the MD's receive answer lacks 'receive'")
        return dict(body["receive"])

    async def leave(self, conference_id: str, joined: JoinResponse) -> None:
        """DELETE our participant (204, also when already gone; an older MD's 404 accepted)."""
        path = (f"{joined.md_url if joined.md_url != self.http.base else ''}"
                f"/v1/conferences/{quote(conference_id, safe='')}/participants/"
                f"{joined.association}")
        code, _, content = await self.http.request(
            "DELETE", path, headers={"Authorization": f"Bearer {joined.leave_token}",
                                     "Accept": "application/json"})
        if code not in (200, 204, 404):
            raise LeaveFailed(code, *problem_text(code, content))
