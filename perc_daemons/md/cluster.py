"""Several perc-md processes of one host sharing conferences: placement and hub links.

One perc-md process is single-threaded and so uses one core.  A host runs
one per core (``perc-md.service`` and ``perc-md@N.service``, each with its
own ports and state file) and names all of them, in the same order, in the
shared ``md.toml``: ``[cluster] processes``, their API URLs.  A conference
is created on every process (``perc-admin conferences create --md`` with
any one of them creates it on all and registers every process's tunnel
with the KMF, so the KD connects to each).  Then:

* **Placement.**  A join (``POST /v1/conferences/{id}/participants``) that
  reaches any process is placed on the least-loaded process hosting the
  conference: fewest participants (of every conference), this process on a
  tie (no extra hop), then the list order.  Another process gets the join by
  a ``307 Temporary Redirect`` to its own join URL with ``?placed=1`` (which
  it does not place again); the endpoint re-sends its offer there, and its
  answer, media and leave are that process's.  Load is counted in
  participants, not CPU: the count is exact at the moment of the join and
  does not swing with the media, which an instantaneous CPU reading would.
  Joins this process sent elsewhere in the last ``join_timeout`` seconds
  count as load there until the other process's count shows them (a burst
  of joins is spread, not all sent to the process idle a moment ago).
* **Hub links.**  Each conference has a hub, the process at index
  ``sha256(conference id) mod N`` (or the next one hosting it), the same at
  every process.  When a participant is placed on another process, that
  process gets a cascade link from the hub (the hub opens it, RFC 8871
  section 4.5.1; the three calls of :func:`~perc_daemons.md.provider_cli.create_link`),
  unless it has one: the processes of a conference form a star around its
  hub, a tree by construction, and different conferences have different
  hubs.  Two processes racing to link the same pair: the hub refuses the
  second link to the same peer (a cycle of two) and the loser's half goes.
  Links stay until the conference ends.

An unreachable process is skipped (and logged, once a minute); no process
reachable but this one: the join stays here.  The requests between
processes carry the provider token and check the processes' certificates
against ``[cluster] ca_file``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from perc_daemons.listening import RateLimitedLog

__all__ = ["MdCluster", "Placement"]


class Placement:
    """Where a join goes: ``url`` is None for this process, else the join URL there."""

    __slots__ = ("process", "url")

    def __init__(self, process: str | None, url: str | None) -> None:
        self.process = process
        self.url = url


def _same_process(url: str, port: int) -> bool:
    return urlsplit(url).port == port


class MdCluster:
    """This process's view of the host's perc-md processes (module docstring).

    ``processes``: every process's API URL (this one's is the one on
    ``own_port``); ``client_for(url)`` an :class:`~perc_daemons.cli.ApiClient`
    with the provider token (None while the token file is missing);
    ``local_load()`` this process's participant count.
    """

    log = Logger()

    def __init__(self, processes: Sequence[str], own_port: int, clock: Any, *,
                 client_for: Callable[[str], Any], local_load: Callable[[], int],
                 hold: float = 10.0) -> None:
        self.processes = [url.rstrip("/") for url in processes]
        self.own_port = own_port
        self.clock = clock
        self._client_for = client_for
        self._local_load = local_load
        self.hold = hold
        # process -> (time, its participants then) of each join sent there lately
        self._sent: dict[str, list[tuple[float, int]]] = {}
        self._linking: dict[tuple[str, str], defer.Deferred] = {}
        self._log = RateLimitedLog(self.log, clock, interval=60.0)
        self.placed = {"here": 0, "elsewhere": 0}

    @property
    def own(self) -> str | None:
        for url in self.processes:
            if _same_process(url, self.own_port):
                return url
        return None

    def is_own(self, url: str) -> bool:
        return _same_process(url, self.own_port)

    # -- what the other processes say ---------------------------------------------------

    async def _remote(self, url: str, conference_id: str) -> int | None:
        """Participants at ``url`` if it hosts the conference, else None (or unreachable)."""
        from perc_daemons.cli import OperationError

        client = self._client_for(url)
        if client is None:
            return None
        try:
            info = await client.call("GET", "/v1/md")
            await client.call("GET", f"/v1/conferences/{quote(conference_id, safe='')}")
        except OperationError as e:
            if e.status != 404:  # 404: it does not host the conference
                self._log.warn("md_cluster_unreachable",
                               "perc-md: cluster process {process} skipped for placement: "
                               "{error}", process=url, error=str(e))
            return None
        finally:
            await client.close()
        load = (info or {}).get("load", {}).get("participants")
        return load if isinstance(load, int) and not isinstance(load, bool) else None

    def _held(self, url: str, load: int) -> int:
        """Joins sent to ``url`` lately that its ``load`` does not show yet: the ones its
        participant count has not grown by since the oldest of them was sent."""
        now = self.clock.seconds()
        recent = [(t, at) for t, at in self._sent.get(url, []) if now - t < self.hold]
        self._sent[url] = recent
        if not recent:
            return 0
        return max(0, len(recent) - max(0, load - min(at for _, at in recent)))

    def hub(self, conference_id: str, hosting: Sequence[str]) -> str:
        """The conference's hub among the processes ``hosting`` it (list order kept)."""
        start = int.from_bytes(hashlib.sha256(conference_id.encode()).digest()[:8], "big") \
            % len(self.processes)
        for i in range(len(self.processes)):
            url = self.processes[(start + i) % len(self.processes)]
            if url in hosting:
                return url
        return hosting[0]

    # -- placement ----------------------------------------------------------------------

    async def place(self, conference_id: str) -> Placement:
        """Where a join for ``conference_id`` goes; links the hub to it when needed."""
        own = self.own
        others = [url for url in self.processes if not self.is_own(url)]
        loads = await defer.gatherResults(
            [defer.ensureDeferred(self._remote(url, conference_id)) for url in others])
        candidates: list[tuple[int, int, str]] = [(self._local_load(), 0, own or "")]
        reported: dict[str, int] = {}
        for index, (url, load) in enumerate(zip(others, loads, strict=True), start=1):
            if load is not None:
                reported[url] = load
                candidates.append((load + self._held(url, load), index, url))
        hosting = [own or ""] + [url for _, _, url in candidates[1:]]
        ordered_hosting = [url for url in self.processes if url in hosting] or hosting
        _, _, chosen = min(candidates)
        hub = self.hub(conference_id, ordered_hosting)
        if chosen != hub and not await self.ensure_link(conference_id, hub, chosen):
            chosen = hub  # the hub needs no link to reach everyone
        if chosen == (own or ""):
            self.placed["here"] += 1
            return Placement(None, None)
        self._sent.setdefault(chosen, []).append((self.clock.seconds(), reported[chosen]))
        self.placed["elsewhere"] += 1
        return Placement(chosen, f"{chosen}/v1/conferences/{quote(conference_id, safe='')}"
                                 "/participants?placed=1")

    async def ensure_link(self, conference_id: str, hub: str, spoke: str) -> bool:
        """A link hub -> spoke in the conference, made unless one exists (one at a time
        per pair in this process; a concurrent one made elsewhere wins the race);
        False when it cannot be made."""
        key = (conference_id, spoke)
        running = self._linking.get(key)
        if running is None:
            running = defer.ensureDeferred(self._ensure_link(conference_id, hub, spoke))
            self._linking[key] = running
            running.addBoth(lambda result: (self._linking.pop(key, None), result)[1])
        return bool(await _shared(running))

    async def _ensure_link(self, conference_id: str, hub: str, spoke: str) -> bool:
        from perc_daemons.cli import OperationError
        from perc_daemons.md.provider_cli import create_link

        opener, acceptor = self._client_for(hub), self._client_for(spoke)
        if opener is None or acceptor is None:
            return False
        path = f"/v1/conferences/{quote(conference_id, safe='')}/links"
        try:
            spoke_md = await acceptor.call("GET", "/v1/md")
            media = spoke_md.get("media") if isinstance(spoke_md, dict) else None
            links = (await opener.call("GET", path)).get("links", [])
            if any(link.get("peer") == media for link in links):
                return True
            try:
                await create_link(opener, acceptor, conference_id, "AEAD_AES_128_GCM")
            except OperationError as e:
                links = (await opener.call("GET", path)).get("links", [])
                if not any(link.get("peer") == media for link in links):
                    raise
                self.log.info("perc-md: conference {conference}: hub link {hub} -> {spoke} "
                              "made meanwhile elsewhere ({error})", conference=conference_id,
                              hub=hub, spoke=spoke, error=str(e))
                return True
            self.log.info("perc-md: conference {conference}: hub {hub} linked to {spoke}",
                          conference=conference_id, hub=hub, spoke=spoke)
            return True
        except OperationError as e:
            self._log.warn("md_cluster_link_failed",
                           "perc-md: conference {conference}: cannot link hub {hub} to "
                           "{spoke}: {error}", conference=conference_id, hub=hub, spoke=spoke,
                           error=str(e))
            return False
        finally:
            await opener.close()
            await acceptor.close()


def _shared(d: defer.Deferred) -> defer.Deferred:
    """A Deferred firing with ``d``'s result without taking it from ``d``'s other waiters."""
    out: defer.Deferred = defer.Deferred()

    def passing(result: Any) -> Any:
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return result

    d.addBoth(passing)
    return out
