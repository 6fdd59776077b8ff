"""SDP (RFC 8866) codec for the WebRTC/PERC subset, sans-I/O.

What is here:

* :class:`SessionDescription` / :class:`MediaDescription`: the parsed form.
  Attributes are kept as an ordered list of :class:`Attribute` (name, value),
  unknown ones exactly as received, so that ``serialize(parse(text)) == text``
  for canonical (CRLF, ``v o s ... t ... a ... m ...``) input and
  ``parse(x.serialize()) == x`` for every description;
* :func:`parse`: strict about the RFC 8866 line order (``v= o= s= i= u= e=
  p= c= b= t= r= z= k= a=`` then ``m=`` sections of ``i= c= b= k= a=``),
  line syntax (``<letter>=<value>``), sizes, and the attributes PERC relies
  on (``fingerprint``, ``setup``, ``tls-id``, ``ice-ufrag``, ``ice-pwd``,
  ``ice-lite``, ``candidate``, ``rtpmap``, ``ssrc``, ``extmap``, ``mid``,
  ``group``, ``rtcp-mux``, ``identity``, ``rid``, ``simulcast``).  Every
  failure is a typed :class:`SdpError` carrying the 1-based line number;
* typed accessors and ``with_*`` setters (descriptions are immutable, setters
  return a copy);
* :func:`make_answer`: the MD/KD side answer to an endpoint offer, leaving the
  endpoint as DTLS client (RFC 9185): offer ``actpass``/``active`` gives
  ``passive``; ``passive``, ``holdconn`` or no ``a=setup`` is refused.  An
  m= section the MD cannot relay (:func:`unrelayable`: a data channel, plain
  RTP, RTCP on its own port...) is rejected with port 0 and left out of the
  BUNDLE group (RFC 3264 s6, RFC 8843 s7.3.3); an offer with nothing the MD
  can relay is refused.  Simulcast (``a=rid``, RFC 8851 s10; ``a=simulcast``,
  RFC 8853 s5.1) is mirrored: what the offerer sends the answerer receives.

Project decisions: unknown line types are rejected (RFC 8866 §5 allows
"ignore or reject"); ``a=identity`` (RFC 8827) is session-level only;
``a=ice-lite`` session-level only (RFC 8839); ``a=tls-id`` (RFC 8842),
``a=mid``, ``a=rtpmap``, ``a=ssrc``, ``a=rid`` and ``a=simulcast`` media-level
only; ``a=group`` session-level only.  A ``rid-id`` is at most 255 characters
(the RtpStreamId SDES item limit, RFC 8852 s3.1).  Input may be ``str`` or
UTF-8 ``bytes``, with CRLF or LF line ends; :meth:`SessionDescription.serialize` always writes CRLF.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from perc_daemons.protocol.dtls.crypto import format_fingerprint, parse_fingerprint
from perc_daemons.protocol.errors import ProtocolError

#: Size limits checked before any other work.
MAX_SDP_LENGTH = 256 * 1024
MAX_LINES = 2000
#: Long enough for an ``a=identity`` of a 16 KiB assertion in base64.
MAX_LINE_LENGTH = 32 * 1024

SETUP_VALUES = frozenset({"actpass", "active", "passive", "holdconn"})
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
#: RFC 8122 hash function names and their digest lengths.
FINGERPRINT_LENGTHS = {
    "sha-1": 20,
    "sha-224": 28,
    "sha-256": 32,
    "sha-384": 48,
    "sha-512": 64,
    "md5": 16,
    "md2": 16,
}


# --------------------------------------------------------------------------- errors


class SdpError(ProtocolError):
    """Malformed or unacceptable SDP; ``line`` is the 1-based line number or None."""

    reason = "sdp_error"

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        self.message = message
        super().__init__(f"line {line}: {message}" if line is not None else message)


class SdpTooLarge(SdpError):
    """Too many bytes, too many lines or a line too long."""

    reason = "sdp_too_large"


class SdpSyntaxError(SdpError):
    """A line that is not ``<type>=<value>`` or whose value does not parse."""

    reason = "sdp_syntax"


class SdpOrderError(SdpError):
    """A line out of the RFC 8866 order, repeated, or at the wrong level."""

    reason = "sdp_order"


class SdpMissingLine(SdpError):
    """A required ``v=``, ``o=``, ``s=`` or ``t=`` line is absent."""

    reason = "sdp_missing_line"


class SdpAttributeError(SdpError):
    """A known attribute with a bad value."""

    reason = "sdp_bad_attribute"


class BadFingerprint(SdpAttributeError):
    reason = "sdp_bad_fingerprint"


class BadSetup(SdpAttributeError):
    reason = "sdp_bad_setup"


class BadTlsId(SdpAttributeError):
    reason = "sdp_bad_tls_id"


class BadIceCredentials(SdpAttributeError):
    reason = "sdp_bad_ice_credentials"


class BadIdentity(SdpAttributeError):
    reason = "sdp_bad_identity"


class BadRid(SdpAttributeError):
    """An ``a=rid`` (RFC 8851 s10) that does not parse or does not fit its m= section."""

    reason = "sdp_bad_rid"


class BadSimulcast(SdpAttributeError):
    """An ``a=simulcast`` (RFC 8853 s5.1) that does not parse or names an undeclared rid."""

    reason = "sdp_bad_simulcast"


class OfferRefused(SdpError):
    """An offer :func:`make_answer` cannot answer (e.g. ``a=setup:passive``)."""

    reason = "sdp_offer_refused"


# --------------------------------------------------------------------------- model

_TOKEN = r"[!#$%&'*+\-.^_`{|}~0-9A-Za-z]+"
_TOKEN_RE = re.compile(_TOKEN)
_TLS_ID_RE = re.compile(r"[A-Za-z0-9+/\-_]{20,255}")
_ICE_UFRAG_RE = re.compile(r"[A-Za-z0-9+/]{4,256}")
_ICE_PWD_RE = re.compile(r"[A-Za-z0-9+/]{22,256}")
_HEX_PAIRS_RE = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})*")
_DIGITS_RE = re.compile(r"[0-9]+")
_PAYLOAD_TYPE_RE = re.compile(r"[0-9]{1,3}")
_BASE64_RE = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_RTPMAP_RE = re.compile(r"([0-9]{1,3}) ([^/\s]+)/([0-9]{1,10})(?:/([0-9]{1,3}))?")
_SSRC_RE = re.compile(r"([0-9]{1,10}) (" + _TOKEN + r")(?::(.*))?", re.DOTALL)
_EXTMAP_RE = re.compile(
    r"([0-9]{1,4})(?:/(sendrecv|sendonly|recvonly|inactive))? (\S+)(?: (.+))?", re.DOTALL
)
_MEDIA_RE = re.compile(
    r"(" + _TOKEN + r") ([0-9]{1,5})(?:/([0-9]{1,5}))? (" + _TOKEN + r"(?:/" + _TOKEN + r")*)"
    r"((?: \S+)+)"
)
_NON_WS = re.compile(r"[^\s]+")
#: RFC 8851 s10 ``rid-id`` (alpha-numeric / "-" / "_"), at most an SDES item long.
_RID_ID = r"[A-Za-z0-9_\-]{1,255}"
_RID_ID_RE = re.compile(_RID_ID)
_RID_PARAM_NAME_RE = re.compile(r"[A-Za-z0-9\-]+")
#: RFC 8851 s10 ``param-val``: printable characters but ";".
_RID_PARAM_VALUE_RE = re.compile(r"[\x20-\x3a\x3c-\x7e]*")
_RID_INT_PARAMS = frozenset({"max-width", "max-height", "max-fps", "max-fs", "max-br", "max-pps"})
_RID_RE = re.compile(r"(" + _RID_ID + r") (send|recv)(?: (.+))?", re.DOTALL)
_SIMULCAST_LIST_RE = re.compile(
    r"~?" + _RID_ID + r"(?:,~?" + _RID_ID + r")*(?:;~?" + _RID_ID + r"(?:,~?" + _RID_ID + r")*)*"
)


@dataclass(frozen=True)
class Attribute:
    """``a=<name>`` (``value`` None) or ``a=<name>:<value>`` (value may be "")."""

    name: str
    value: str | None = None
    line: int | None = field(default=None, compare=False, repr=False)

    def render(self) -> str:
        return f"a={self.name}" if self.value is None else f"a={self.name}:{self.value}"


@dataclass(frozen=True)
class Field:
    """Any other ``<type>=<value>`` line kept verbatim (``i c b k t r z u e p``)."""

    type: str
    value: str

    def render(self) -> str:
        return f"{self.type}={self.value}"


@dataclass(frozen=True)
class Origin:
    """``o=<username> <sess-id> <sess-version> <nettype> <addrtype> <address>``."""

    username: str = "-"
    session_id: str = "0"
    session_version: str = "0"
    nettype: str = "IN"
    addrtype: str = "IP4"
    address: str = "0.0.0.0"

    def render(self) -> str:
        return "o=" + " ".join(
            (
                self.username,
                self.session_id,
                self.session_version,
                self.nettype,
                self.addrtype,
                self.address,
            )
        )


@dataclass(frozen=True)
class RtpMap:
    """``a=rtpmap:<pt> <encoding>/<clock rate>[/<channels>]``."""

    payload_type: int
    encoding: str
    clock_rate: int
    channels: int | None = None


@dataclass(frozen=True)
class SsrcAttribute:
    """``a=ssrc:<ssrc-id> <attribute>[:<value>]`` (RFC 5576)."""

    ssrc: int
    attribute: str
    value: str | None = None


@dataclass(frozen=True)
class ExtMap:
    """``a=extmap:<id>[/<direction>] <uri> [<extension attributes>]`` (RFC 8285)."""

    id: int
    uri: str
    direction: str | None = None
    attributes: str | None = None


@dataclass(frozen=True)
class Rid:
    """``a=rid:<rid-id> <send|recv> [pt=<fmt>,...;][<param>[=<value>];...]`` (RFC 8851 s10).

    ``formats`` is the ``pt=`` list (empty: every format of the m= line);
    ``params`` the restrictions in order, e.g. ``{"max-height": "720"}``
    (a parameter written without ``=`` has the value "").
    """

    id: str
    direction: str
    formats: tuple[str, ...] = ()
    params: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        """The attribute value (after ``a=rid:``)."""
        parts = [f"pt={','.join(self.formats)}"] if self.formats else []
        parts.extend(k if v == "" else f"{k}={v}" for k, v in self.params.items())
        return f"{self.id} {self.direction}" + (" " + ";".join(parts) if parts else "")

    def reversed(self) -> Rid:
        """The same restriction seen from the answerer (send <-> recv)."""
        return dataclasses.replace(self, direction="recv" if self.direction == "send" else "send")


@dataclass(frozen=True)
class Simulcast:
    """``a=simulcast`` (RFC 8853 s5.1): per direction, streams of alternative rid-ids.

    ``send``/``recv`` hold one tuple of alternatives per simulcast stream,
    rid-ids without their ``~`` prefix; ``paused`` the rid-ids written with
    it (RFC 8853 s5.1: proposed but paused).
    """

    send: tuple[tuple[str, ...], ...] = ()
    recv: tuple[tuple[str, ...], ...] = ()
    paused: frozenset[str] = frozenset()

    def rid_ids(self, direction: str) -> list[str]:
        """Every rid-id of ``direction`` ("send" or "recv"), in order."""
        streams = self.send if direction == "send" else self.recv
        return [rid for alternatives in streams for rid in alternatives]

    def render(self) -> str:
        """The attribute value (after ``a=simulcast:``)."""

        def stream_list(streams: tuple[tuple[str, ...], ...]) -> str:
            return ";".join(
                ",".join(("~" if r in self.paused else "") + r for r in alternatives)
                for alternatives in streams
            )

        parts = [f"{d} {stream_list(v)}" for d, v in (("send", self.send), ("recv", self.recv))
                 if v]
        return " ".join(parts)

    def reversed(self) -> Simulcast:
        """The answer's view (RFC 8853 s5.3): what the offerer sends we receive."""
        return Simulcast(send=self.recv, recv=self.send, paused=self.paused)


# --------------------------------------------------------------------------- validators
#
# Each takes the attribute and returns its typed value or raises with the
# attribute's line number.  parse() runs them on every known attribute, the
# accessors run them again (for hand-built descriptions).


def _fingerprint(a: Attribute) -> tuple[str, bytes]:
    parts = (a.value or "").split(" ")
    if len(parts) != 2 or not _TOKEN_RE.fullmatch(parts[0]):
        raise BadFingerprint("a=fingerprint is not '<hash-func> <hex:pairs>'", a.line)
    algorithm, hex_text = parts[0].lower(), parts[1]
    if not _HEX_PAIRS_RE.fullmatch(hex_text):
        raise BadFingerprint("a=fingerprint digest is not colon-separated hex pairs", a.line)
    if algorithm == "sha-256":
        try:
            return algorithm, parse_fingerprint(hex_text)
        except ValueError as e:
            raise BadFingerprint(f"a=fingerprint: {e}", a.line) from None
    digest = bytes.fromhex(hex_text.replace(":", ""))
    expected = FINGERPRINT_LENGTHS.get(algorithm)
    if expected is not None and len(digest) != expected:
        raise BadFingerprint(f"a {algorithm} fingerprint has {expected} bytes", a.line)
    if len(digest) > 64:
        raise BadFingerprint("a=fingerprint digest too long", a.line)
    return algorithm, digest


def _setup(a: Attribute) -> str:
    if a.value not in SETUP_VALUES:
        raise BadSetup(f"a=setup must be one of {sorted(SETUP_VALUES)}", a.line)
    return a.value


def _tls_id(a: Attribute) -> str:
    if a.value is None or not _TLS_ID_RE.fullmatch(a.value):
        raise BadTlsId("a=tls-id must be 20-255 chars of [A-Za-z0-9+/-_]", a.line)
    return a.value


def _ice_ufrag(a: Attribute) -> str:
    if a.value is None or not _ICE_UFRAG_RE.fullmatch(a.value):
        raise BadIceCredentials("a=ice-ufrag must be 4-256 chars of [A-Za-z0-9+/]", a.line)
    return a.value


def _ice_pwd(a: Attribute) -> str:
    if a.value is None or not _ICE_PWD_RE.fullmatch(a.value):
        raise BadIceCredentials("a=ice-pwd must be 22-256 chars of [A-Za-z0-9+/]", a.line)
    return a.value


def _flag(a: Attribute) -> bool:
    if a.value is not None:
        raise SdpAttributeError(f"a={a.name} takes no value", a.line)
    return True


def _candidate(a: Attribute) -> str:
    fields = (a.value or "").split(" ")
    if len(fields) < 8 or fields[6] != "typ" or not all(fields):
        raise SdpAttributeError("a=candidate is not an RFC 8839 candidate", a.line)
    return a.value or ""


def _rtpmap(a: Attribute) -> RtpMap:
    m = _RTPMAP_RE.fullmatch(a.value or "")
    if m is None or int(m[1]) > 127:
        raise SdpAttributeError("a=rtpmap is not '<pt> <encoding>/<clock>[/<ch>]'", a.line)
    channels = int(m[4]) if m[4] is not None else None
    return RtpMap(int(m[1]), m[2], int(m[3]), channels)


def _ssrc(a: Attribute) -> SsrcAttribute:
    m = _SSRC_RE.fullmatch(a.value or "")
    if m is None or int(m[1]) > 0xFFFFFFFF:
        raise SdpAttributeError("a=ssrc is not '<ssrc-id> <attribute>[:<value>]'", a.line)
    return SsrcAttribute(int(m[1]), m[2], m[3])


def _extmap(a: Attribute) -> ExtMap:
    m = _EXTMAP_RE.fullmatch(a.value or "")
    if m is None:
        raise SdpAttributeError("a=extmap is not '<id>[/<direction>] <uri> ...'", a.line)
    ident = int(m[1])
    if not (1 <= ident <= 255 or 4096 <= ident <= 4351):
        raise SdpAttributeError("a=extmap id must be 1-255 or 4096-4351", a.line)
    return ExtMap(ident, m[3], m[2], m[4])


def _mid(a: Attribute) -> str:
    if a.value is None or not _TOKEN_RE.fullmatch(a.value):
        raise SdpAttributeError("a=mid must be a token", a.line)
    return a.value


def _group(a: Attribute) -> tuple[str, tuple[str, ...]]:
    parts = (a.value or "").split(" ")
    if not all(_TOKEN_RE.fullmatch(p) for p in parts):
        raise SdpAttributeError("a=group is not '<semantics> *(SP <mid>)'", a.line)
    return parts[0], tuple(parts[1:])


def _identity(a: Attribute) -> str:
    assertion = (a.value or "").split(" ", 1)[0]
    if not assertion or not _BASE64_RE.fullmatch(assertion):
        raise BadIdentity("a=identity is not base64", a.line)
    try:
        binascii.a2b_base64(assertion.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError):
        raise BadIdentity("a=identity is not base64", a.line) from None
    return assertion


def _rid(a: Attribute) -> Rid:
    m = _RID_RE.fullmatch(a.value or "")
    if m is None:
        raise BadRid("a=rid is not '<rid-id> <send|recv> [<params>]'", a.line)
    formats: tuple[str, ...] = ()
    params: dict[str, str] = {}
    pieces = m[3].split(";") if m[3] is not None else []
    if pieces and pieces[0].startswith("pt="):
        formats = tuple(pieces.pop(0)[3:].split(","))
        if not all(_TOKEN_RE.fullmatch(f) for f in formats):
            raise BadRid("a=rid pt= is not a comma-separated list of formats", a.line)
    for piece in pieces:
        name, sep, value = piece.partition("=")
        if not _RID_PARAM_NAME_RE.fullmatch(name) or not _RID_PARAM_VALUE_RE.fullmatch(value):
            raise BadRid(f"a=rid parameter {piece[:40]!r} is not '<name>[=<value>]'", a.line)
        if name in params or name == "pt":
            raise BadRid(f"a=rid parameter {name} repeated or out of place", a.line)
        if name in _RID_INT_PARAMS and sep and not _DIGITS_RE.fullmatch(value):
            raise BadRid(f"a=rid {name} must be a decimal integer", a.line)
        if name == "max-bpp" and sep and not re.fullmatch(r"[0-9]+\.[0-9]+", value):
            raise BadRid("a=rid max-bpp must be '<digits>.<digits>'", a.line)
        if name == "depend" and not all(_RID_ID_RE.fullmatch(r) for r in value.split(",")):
            raise BadRid("a=rid depend= is not a list of rid-ids", a.line)
        params[name] = value
    return Rid(m[1], m[2], formats, params)


def _simulcast(a: Attribute) -> Simulcast:
    words = (a.value or "").split(" ")
    if len(words) not in (2, 4):
        raise BadSimulcast("a=simulcast is not '<send|recv> <streams> [<recv|send> ...]'",
                           a.line)
    found: dict[str, tuple[tuple[str, ...], ...]] = {}
    paused: set[str] = set()
    seen: set[str] = set()
    for direction, streams in zip(words[::2], words[1::2], strict=True):
        if direction not in ("send", "recv") or direction in found:
            raise BadSimulcast("a=simulcast directions are 'send' and 'recv', once each",
                               a.line)
        if not _SIMULCAST_LIST_RE.fullmatch(streams):
            raise BadSimulcast(f"a=simulcast {direction} list is not 'rid,...;rid,...'", a.line)
        parsed = []
        for alternatives in streams.split(";"):
            ids = []
            for item in alternatives.split(","):
                rid = item.removeprefix("~")
                if rid in seen:
                    raise BadSimulcast(f"a=simulcast names rid {rid} twice", a.line)
                seen.add(rid)
                if item.startswith("~"):
                    paused.add(rid)
                ids.append(rid)
            parsed.append(tuple(ids))
        found[direction] = tuple(parsed)
    return Simulcast(found.get("send", ()), found.get("recv", ()), frozenset(paused))


def _check_simulcast(media: MediaDescription) -> None:
    """The cross-line rules of RFC 8851 s4 / RFC 8853 s5.1 for one m= section."""
    rids: dict[str, Rid] = {}
    for a in media.get_all("rid"):
        rid = _rid(a)
        if rid.id in rids:
            raise BadRid(f"a=rid {rid.id} declared twice", a.line)
        unknown = [f for f in rid.formats if f not in media.formats]
        if unknown:
            raise BadRid(f"a=rid {rid.id} pt {unknown[0]} is not a format of the m= line",
                         a.line)
        rids[rid.id] = rid
    attribute = media.get("simulcast")
    if attribute is None:
        return
    simulcast = _simulcast(attribute)
    for direction in ("send", "recv"):
        for rid_id in simulcast.rid_ids(direction):
            declared = rids.get(rid_id)
            if declared is None or declared.direction != direction:
                raise BadSimulcast(f"a=simulcast {direction} {rid_id} has no "
                                   f"'a=rid:{rid_id} {direction}'", attribute.line)


_VALIDATORS = {
    "fingerprint": _fingerprint,
    "setup": _setup,
    "tls-id": _tls_id,
    "ice-ufrag": _ice_ufrag,
    "ice-pwd": _ice_pwd,
    "ice-lite": _flag,
    "rtcp-mux": _flag,
    "candidate": _candidate,
    "rtpmap": _rtpmap,
    "ssrc": _ssrc,
    "extmap": _extmap,
    "mid": _mid,
    "group": _group,
    "identity": _identity,
    "rid": _rid,
    "simulcast": _simulcast,
}
_SINGLE = frozenset(
    {"setup", "tls-id", "ice-ufrag", "ice-pwd", "ice-lite", "rtcp-mux", "mid", "identity",
     "simulcast"}
)
_SESSION_ONLY = frozenset({"ice-lite", "group", "identity"})
_MEDIA_ONLY = frozenset({"tls-id", "mid", "rtpmap", "ssrc", "rid", "simulcast"})


def _check_attributes(attributes: Iterable[Attribute], media: bool) -> None:
    seen: set[str] = set()
    for a in attributes:
        if a.name in (_SESSION_ONLY if media else _MEDIA_ONLY):
            level = "media" if media else "session"
            raise SdpOrderError(f"a={a.name} is not allowed at {level} level", a.line)
        if a.name in _SINGLE:
            if a.name in seen:
                raise SdpOrderError(f"a={a.name} repeated", a.line)
            seen.add(a.name)
        validator = _VALIDATORS.get(a.name)
        if validator is not None:
            validator(a)


# --------------------------------------------------------------------------- descriptions


class _AttributeList:
    """Accessors and setters shared by session and media descriptions."""

    attributes: tuple[Attribute, ...]

    def get_all(self, name: str) -> list[Attribute]:
        return [a for a in self.attributes if a.name == name]

    def get(self, name: str) -> Attribute | None:
        found = self.get_all(name)
        return found[0] if found else None

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    def _single(self, name: str, validator):  # type: ignore[no-untyped-def]
        a = self.get(name)
        return None if a is None else validator(a)

    def with_attributes(self, name: str, values: Iterable[str | None]):  # type: ignore[no-untyped-def]
        """A copy where the ``a=<name>`` lines are replaced by ``values``.

        The new lines take the place of the first old one, or go at the end.
        """
        new = [Attribute(name, v) for v in values]
        out: list[Attribute] = []
        placed = False
        for a in self.attributes:
            if a.name == name:
                if not placed:
                    out.extend(new)
                    placed = True
            else:
                out.append(a)
        if not placed:
            out.extend(new)
        return dataclasses.replace(self, attributes=tuple(out))  # type: ignore[type-var]

    def without(self, name: str):  # type: ignore[no-untyped-def]
        return self.with_attributes(name, [])

    # typed accessors -------------------------------------------------------

    def fingerprints(self) -> list[tuple[str, bytes]]:
        """``(algorithm, digest)`` of every ``a=fingerprint`` here."""
        return [_fingerprint(a) for a in self.get_all("fingerprint")]

    @property
    def setup(self) -> str | None:
        return self._single("setup", _setup)

    @property
    def ice_ufrag(self) -> str | None:
        return self._single("ice-ufrag", _ice_ufrag)

    @property
    def ice_pwd(self) -> str | None:
        return self._single("ice-pwd", _ice_pwd)

    def extmaps(self) -> list[ExtMap]:
        return [_extmap(a) for a in self.get_all("extmap")]

    # setters -----------------------------------------------------------------

    def with_fingerprints(self, fingerprints: Iterable[tuple[str, bytes]]):  # type: ignore[no-untyped-def]
        values = [f"{alg} {format_fingerprint(digest)}" for alg, digest in fingerprints]
        for v in values:
            _fingerprint(Attribute("fingerprint", v))
        return self.with_attributes("fingerprint", values)

    def with_setup(self, setup: str):  # type: ignore[no-untyped-def]
        return self.with_attributes("setup", [_setup(Attribute("setup", setup))])

    def with_ice_credentials(self, ufrag: str, pwd: str):  # type: ignore[no-untyped-def]
        _ice_ufrag(Attribute("ice-ufrag", ufrag))
        _ice_pwd(Attribute("ice-pwd", pwd))
        return self.with_attributes("ice-ufrag", [ufrag]).with_attributes("ice-pwd", [pwd])


@dataclass(frozen=True)
class MediaDescription(_AttributeList):
    """``m=<media> <port>[/<count>] <proto> <fmt> ...`` and its lines."""

    media: str
    port: int
    proto: str
    formats: tuple[str, ...]
    port_count: int | None = None
    #: ``i= c= b= k=`` lines, in order.
    fields: tuple[Field, ...] = ()
    attributes: tuple[Attribute, ...] = ()

    def lines(self) -> list[str]:
        port = str(self.port) if self.port_count is None else f"{self.port}/{self.port_count}"
        out = [f"m={self.media} {port} {self.proto} {' '.join(self.formats)}"]
        out.extend(f.render() for f in self.fields)
        out.extend(a.render() for a in self.attributes)
        return out

    @property
    def connection(self) -> str | None:
        found = [f.value for f in self.fields if f.type == "c"]
        return found[0] if found else None

    @property
    def tls_id(self) -> str | None:
        return self._single("tls-id", _tls_id)

    @property
    def mid(self) -> str | None:
        return self._single("mid", _mid)

    @property
    def rtcp_mux(self) -> bool:
        return self._single("rtcp-mux", _flag) or False

    @property
    def direction(self) -> str:
        for a in self.attributes:
            if a.name in DIRECTIONS and a.value is None:
                return a.name
        return "sendrecv"

    def candidates(self) -> list[str]:
        return [_candidate(a) for a in self.get_all("candidate")]

    def rtpmaps(self) -> dict[int, RtpMap]:
        return {r.payload_type: r for r in (_rtpmap(a) for a in self.get_all("rtpmap"))}

    def ssrc_attributes(self) -> list[SsrcAttribute]:
        return [_ssrc(a) for a in self.get_all("ssrc")]

    def ssrcs(self) -> list[int]:
        """Distinct SSRC ids of the ``a=ssrc`` lines, in order of appearance."""
        return list(dict.fromkeys(s.ssrc for s in self.ssrc_attributes()))

    def rids(self) -> list[Rid]:
        """The ``a=rid`` lines (RFC 8851), in order."""
        return [_rid(a) for a in self.get_all("rid")]

    def simulcast(self) -> Simulcast | None:
        """The ``a=simulcast`` line (RFC 8853), or None."""
        return self._single("simulcast", _simulcast)

    def with_simulcast(self, rids: Iterable[Rid], simulcast: Simulcast | None) -> MediaDescription:
        """A copy with these ``a=rid`` lines and ``a=simulcast`` (None: none).

        Raises :class:`BadRid` / :class:`BadSimulcast` if they do not fit.
        """
        values = [r.render() for r in rids]
        for v in values:
            _rid(Attribute("rid", v))
        out = self.with_attributes("rid", values).with_attributes(
            "simulcast", [] if simulcast is None else [simulcast.render()])
        if simulcast is not None:
            _simulcast(Attribute("simulcast", simulcast.render()))
        _check_simulcast(out)
        return out

    def with_tls_id(self, tls_id: str) -> MediaDescription:
        return self.with_attributes("tls-id", [_tls_id(Attribute("tls-id", tls_id))])

    def with_candidates(self, candidates: Iterable[str]) -> MediaDescription:
        values = [_candidate(Attribute("candidate", c)) for c in candidates]
        return self.with_attributes("candidate", values)


@dataclass(frozen=True)
class SessionDescription(_AttributeList):
    """A whole SDP: ``v=0``, ``o=``, ``s=``, other session lines, ``a=``, ``m=`` sections."""

    version = 0

    origin: Origin
    session_name: str = "-"
    #: ``i= u= e= p= c= b= t= r= z= k=`` lines, in order (at least one ``t=``).
    fields: tuple[Field, ...] = (Field("t", "0 0"),)
    attributes: tuple[Attribute, ...] = ()
    media: tuple[MediaDescription, ...] = ()

    def serialize(self) -> str:
        lines = ["v=0", self.origin.render(), f"s={self.session_name}"]
        lines.extend(f.render() for f in self.fields)
        lines.extend(a.render() for a in self.attributes)
        for m in self.media:
            lines.extend(m.lines())
        for line in lines:
            if "\r" in line or "\n" in line or "\0" in line:
                raise ValueError(f"SDP line contains CR, LF or NUL: {line!r}")
        return "".join(line + "\r\n" for line in lines)

    @property
    def timing(self) -> tuple[int, int]:
        """Start and stop of the first ``t=`` line."""
        for f in self.fields:
            if f.type == "t":
                start, stop = f.value.split(" ")
                return int(start), int(stop)
        raise SdpMissingLine("no t= line")

    @property
    def ice_lite(self) -> bool:
        return self._single("ice-lite", _flag) or False

    @property
    def identity(self) -> str | None:
        """The base64 RFC 8827 assertion of ``a=identity`` (extensions dropped)."""
        return self._single("identity", _identity)

    def groups(self) -> list[tuple[str, tuple[str, ...]]]:
        return [_group(a) for a in self.get_all("group")]

    @property
    def bundle(self) -> tuple[str, ...] | None:
        """The mids of the first ``a=group:BUNDLE``, or None."""
        for semantics, mids in self.groups():
            if semantics == "BUNDLE":
                return mids
        return None

    def fingerprints_for(self, media: MediaDescription) -> list[tuple[str, bytes]]:
        """Media-level fingerprints, or the session-level ones if there are none."""
        return media.fingerprints() or self.fingerprints()

    def setup_for(self, media: MediaDescription) -> str | None:
        return media.setup or self.setup

    def with_ice_lite(self, ice_lite: bool = True) -> SessionDescription:
        return self.with_attributes("ice-lite", [None] if ice_lite else [])

    def with_identity(self, identity: str) -> SessionDescription:
        return self.with_attributes("identity", [_identity(Attribute("identity", identity))])

    def with_bundle(self, mids: Iterable[str]) -> SessionDescription:
        value = " ".join(["BUNDLE", *mids])
        _group(Attribute("group", value))
        others = [a.value for a in self.get_all("group") if _group(a)[0] != "BUNDLE"]
        return self.with_attributes("group", [value, *others])


# --------------------------------------------------------------------------- parser

# Session-level line types and their rank in the RFC 8866 order.
_SESSION_RANK = {
    "v": 0, "o": 1, "s": 2, "i": 3, "u": 4, "e": 5, "p": 6, "c": 7, "b": 8,
    "t": 9, "r": 9, "z": 10, "k": 11, "a": 12, "m": 13,
}  # fmt: skip
_MEDIA_RANK = {"i": 0, "c": 1, "b": 2, "k": 3, "a": 4}
_REPEATABLE = frozenset("epbtra")


def _split_lines(text: str | bytes) -> list[str]:
    if len(text) > MAX_SDP_LENGTH:
        raise SdpTooLarge(f"SDP longer than {MAX_SDP_LENGTH}")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SdpSyntaxError("not UTF-8", text.count(b"\n", 0, e.start) + 1) from None
    if not isinstance(text, str):
        raise TypeError("SDP text must be str or bytes")
    pieces = text.split("\n")
    if pieces[-1] == "":
        pieces.pop()
    if len(pieces) > MAX_LINES:
        raise SdpTooLarge(f"more than {MAX_LINES} lines", MAX_LINES + 1)
    lines = []
    for number, piece in enumerate(pieces, 1):
        line = piece[:-1] if piece.endswith("\r") else piece
        if len(line) > MAX_LINE_LENGTH:
            raise SdpTooLarge(f"line longer than {MAX_LINE_LENGTH}", number)
        lines.append(line)
    return lines


def _parse_attribute(value: str, number: int) -> Attribute:
    name, sep, rest = value.partition(":")
    if not _TOKEN_RE.fullmatch(name):
        raise SdpSyntaxError("attribute name is not a token", number)
    return Attribute(name, rest if sep else None, line=number)


def _parse_origin(value: str, number: int) -> Origin:
    parts = value.split(" ")
    if len(parts) != 6 or not all(_NON_WS.fullmatch(p) for p in parts):
        raise SdpSyntaxError("o= needs 6 space-separated fields", number)
    if not (_DIGITS_RE.fullmatch(parts[1]) and _DIGITS_RE.fullmatch(parts[2])):
        raise SdpSyntaxError("o= session id and version must be decimal", number)
    return Origin(*parts)


def _parse_media(value: str, number: int) -> MediaDescription:
    m = _MEDIA_RE.fullmatch(value)
    if m is None or int(m[2]) > 65535:
        raise SdpSyntaxError("m= is not '<media> <port> <proto> <fmt> ...'", number)
    port_count = int(m[3]) if m[3] is not None else None
    return MediaDescription(m[1], int(m[2]), m[4], tuple(m[5][1:].split(" ")), port_count)


def _check_field(kind: str, value: str, number: int) -> None:
    if kind == "t" and not re.fullmatch(r"[0-9]{1,20} [0-9]{1,20}", value):
        raise SdpSyntaxError("t= is not '<start> <stop>'", number)
    if kind == "c" and not re.fullmatch(r"\S+ \S+ \S+", value):
        raise SdpSyntaxError("c= is not '<nettype> <addrtype> <address>'", number)
    if kind == "b" and not re.fullmatch(_TOKEN + r":[0-9]+", value):
        raise SdpSyntaxError("b= is not '<bwtype>:<bandwidth>'", number)
    if kind == "s" and value == "":
        raise SdpSyntaxError("s= must not be empty", number)


def parse(text: str | bytes) -> SessionDescription:
    """Parse an SDP; raises an :class:`SdpError` subclass on any problem."""
    lines = _split_lines(text)
    origin: Origin | None = None
    session_name: str | None = None
    fields: list[Field] = []
    attributes: list[Attribute] = []
    media: list[MediaDescription] = []
    m_fields: list[Field] = []
    m_attributes: list[Attribute] = []
    rank = -1
    saw_t = False

    def close_media() -> None:
        if media:
            media[-1] = dataclasses.replace(
                media[-1], fields=tuple(m_fields), attributes=tuple(m_attributes)
            )

    for number, line in enumerate(lines, 1):
        if len(line) < 2 or line[1] != "=" or not ("a" <= line[0] <= "z"):
            raise SdpSyntaxError("line is not '<type>=<value>'", number)
        kind, value = line[0], line[2:]
        if "\r" in value or "\0" in value:
            raise SdpSyntaxError("CR or NUL inside a line", number)
        if kind not in _SESSION_RANK:
            raise SdpSyntaxError(f"unknown line type {kind}=", number)
        if session_name is None and _SESSION_RANK[kind] != rank + 1:
            expected = "vos"[rank + 1]
            raise SdpMissingLine(f"expected {expected}= before {kind}=", number)
        if media and kind != "m":
            # Inside a media section.
            if kind not in _MEDIA_RANK:
                raise SdpOrderError(f"{kind}= is not allowed in a media section", number)
            if _MEDIA_RANK[kind] < rank or (_MEDIA_RANK[kind] == rank and kind not in "cba"):
                raise SdpOrderError(f"{kind}= out of order in a media section", number)
            rank = _MEDIA_RANK[kind]
            if kind == "a":
                m_attributes.append(_parse_attribute(value, number))
            else:
                _check_field(kind, value, number)
                m_fields.append(Field(kind, value))
            continue
        required = _SESSION_RANK[kind]
        if kind != "m":
            if required < rank or (required == rank and kind not in _REPEATABLE):
                raise SdpOrderError(f"{kind}= out of order or repeated", number)
            if kind == "r" and not saw_t:
                raise SdpOrderError("r= before any t=", number)
        if required > _SESSION_RANK["t"] and not saw_t:
            if any(later.startswith("t=") for later in lines[number:]):
                raise SdpOrderError(f"{kind}= before t=", number)
            raise SdpMissingLine(f"no t= line before {kind}=", number)
        _check_field(kind, value, number)
        if kind == "v":
            if value != "0":
                raise SdpSyntaxError("only v=0 is known", number)
        elif kind == "o":
            origin = _parse_origin(value, number)
        elif kind == "s":
            session_name = value
        elif kind == "a":
            attributes.append(_parse_attribute(value, number))
        elif kind == "m":
            close_media()
            m_fields, m_attributes = [], []
            media.append(_parse_media(value, number))
            rank = -1
            continue
        else:
            saw_t = saw_t or kind == "t"
            fields.append(Field(kind, value))
        rank = required
    close_media()
    if origin is None or session_name is None:
        missing = "v" if rank < 0 else "vos"[rank + 1]
        raise SdpMissingLine(f"no {missing}= line", len(lines) + 1)
    if not saw_t:
        raise SdpMissingLine("no t= line", len(lines) + 1)
    _check_attributes(attributes, media=False)
    for m in media:
        _check_attributes(m.attributes, media=True)
        _check_simulcast(m)
    return SessionDescription(origin, session_name, tuple(fields), tuple(attributes), tuple(media))


# --------------------------------------------------------------------------- answer

_ANSWER_DIRECTION = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}
#: Per payload type attributes copied for the formats we keep.
_PT_ATTRIBUTES = ("rtpmap", "fmtp", "rtcp-fb")
#: What the MD relays: RTP audio and video ...
RELAYED_MEDIA = frozenset({"audio", "video"})
#: ... as DTLS-SRTP over UDP (RFC 5764 s8; WebRTC sends the F(eedback) profile).
RELAYED_PROTOS = frozenset({"UDP/TLS/RTP/SAVPF", "UDP/TLS/RTP/SAVP"})


def _payload_type(fmt: str) -> int | None:
    """The RTP payload type (0-127) an m= line format names, or None.

    ASCII digits only: ``str.isdigit`` also takes e.g. superscripts that
    ``int`` refuses, and ``int`` refuses more than 4300 digits.
    """
    if not _PAYLOAD_TYPE_RE.fullmatch(fmt):
        return None
    pt = int(fmt)
    return pt if pt <= 127 else None


def unrelayable(offered: MediaDescription) -> str | None:
    """Why the MD cannot relay the offered m= section, or None when it can.

    The MD forwards SRTP/SRTCP of audio and video on one UDP port: a section
    offered with port 0, of another media type (``application``: a WebRTC
    data channel is SCTP, RFC 8841, which the MD cannot see into), another
    transport (plain RTP, TCP, SCTP), without an RTP payload type, or
    without ``a=rtcp-mux`` (RTCP on the RTP port, RFC 5761; required for
    bundled RTP media, RFC 8843 s9.3) cannot be served.
    """
    if offered.port == 0:
        return "offered with port 0"
    if offered.media not in RELAYED_MEDIA:
        return f"m={offered.media} is not audio or video"
    if offered.proto not in RELAYED_PROTOS:
        return f"transport {offered.proto} is not DTLS-SRTP over UDP (UDP/TLS/RTP/SAVPF)"
    if not any(_payload_type(f) is not None for f in offered.formats):
        return "no RTP payload type"
    if not offered.rtcp_mux:
        return "no a=rtcp-mux (the MD takes RTP and RTCP on one port)"
    return None


def _local(validator, name: str, value: str) -> None:  # type: ignore[no-untyped-def]
    try:
        validator(Attribute(name, value))
    except SdpError as e:
        raise ValueError(f"bad local {name}: {e.message}") from None


def _mirrored_simulcast(offered: MediaDescription, kept: Collection[str]) -> list[Attribute]:
    """The answer's ``a=rid`` and ``a=simulcast`` lines: the offer's, reversed.

    RFC 8851 s6 / RFC 8853 s5.3: a rid the offerer sends the answerer
    receives, with the same restrictions.  A rid whose ``pt=`` formats were
    all refused is left out, and so are simulcast streams left with no rid.
    """
    rids = [r for r in offered.rids() if not r.formats or any(f in kept for f in r.formats)]
    out = [
        Attribute("rid", dataclasses.replace(
            r.reversed(), formats=tuple(f for f in r.formats if f in kept)).render())
        for r in rids
    ]
    simulcast = offered.simulcast()
    if simulcast is not None:
        ids = {r.id for r in rids}

        def keep(streams: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
            narrowed = (tuple(r for r in alternatives if r in ids) for alternatives in streams)
            return tuple(a for a in narrowed if a)

        mirrored = Simulcast(send=keep(simulcast.recv), recv=keep(simulcast.send),
                             paused=simulcast.paused & ids)
        if mirrored.send or mirrored.recv:
            out.append(Attribute("simulcast", mirrored.render()))
    return out


def make_answer(
    offer: SessionDescription,
    *,
    fingerprint: bytes,
    setup: str = "passive",
    tls_id: str,
    ice_ufrag: str,
    ice_pwd: str,
    candidates: list[str],
    ice_lite: bool = True,
    origin: Origin | None = None,
    codecs: Collection[str] | None = None,
) -> SessionDescription:
    """The MD/KD answer to an endpoint offer, leaving the endpoint as DTLS client.

    Every offered m= section gets one in the answer, in order, with the same
    mid.  A section the MD cannot relay (:func:`unrelayable`, e.g. the data
    channel of a browser's offer, or one offered with port 0) is rejected:
    port 0, its first format, only ``a=mid`` (RFC 3264 s6).  ``codecs``
    (encoding names, case-insensitive; None accepts all) selects the payload
    types kept; a section left without any is rejected too.  Accepted
    sections carry our ``ice-ufrag``/``ice-pwd``, SHA-256 ``fingerprint``,
    ``setup``, ``tls-id`` and ``candidates``, ``rtcp-mux``, the mirrored
    direction, extmaps, the kept payload types' ``rtpmap``, ``fmtp``,
    ``rtcp-fb``, and the mirrored ``a=rid`` / ``a=simulcast``
    (:func:`_mirrored_simulcast`: ``send`` becomes ``recv``).  The BUNDLE
    group keeps the accepted mids only, in the offer's order: a rejected
    section leaves it (RFC 8843 s7.3.3), and the first accepted one is the
    answerer-tagged section (s7.3.1).

    Raises :class:`OfferRefused` if no section can be accepted (the message
    says why for each), if an accepted section's offer ``a=setup`` is
    ``passive``, ``holdconn`` or absent, if it has no ``a=fingerprint``, or
    if a section has no ``a=mid``; ValueError for bad local parameters.
    """
    if setup != "passive":
        raise ValueError("the MD/KD answers a=setup:passive: the endpoint is the DTLS client")
    if len(fingerprint) != 32:
        raise ValueError("fingerprint must be a 32-byte SHA-256 digest")
    _local(_tls_id, "tls-id", tls_id)
    _local(_ice_ufrag, "ice-ufrag", ice_ufrag)
    _local(_ice_pwd, "ice-pwd", ice_pwd)
    for c in candidates:
        _local(_candidate, "candidate", c)
    wanted = None if codecs is None else {c.lower() for c in codecs}

    answers: list[MediaDescription] = []
    accepted_mids: list[str] = []
    rejected: list[str] = []
    for offered in offer.media:
        mid = offered.mid
        if mid is None:
            raise OfferRefused("offered m= section has no a=mid", None)
        mid_attr = [Attribute("mid", mid)]
        rtpmaps = offered.rtpmaps()
        formats = tuple(
            f
            for f in offered.formats
            if wanted is None
            or ((pt := _payload_type(f)) in rtpmaps and rtpmaps[pt].encoding.lower() in wanted)
        )
        reason = unrelayable(offered) or (None if formats else "none of the MD's codecs")
        if reason is not None:
            rejected.append(f"mid {mid} ({offered.media} {offered.proto}): {reason}")
            answers.append(
                MediaDescription(
                    offered.media, 0, offered.proto, formats or offered.formats[:1],
                    attributes=tuple(mid_attr),
                )
            )  # fmt: skip
            continue
        offered_setup = offer.setup_for(offered)
        if offered_setup not in ("actpass", "active"):
            raise OfferRefused(
                f"offer a=setup:{offered_setup} for mid {mid}: the endpoint must be DTLS client"
            )
        if not offer.fingerprints_for(offered):
            raise OfferRefused(f"offer has no a=fingerprint for mid {mid}")
        attrs: list[Attribute] = [
            *mid_attr,
            Attribute(_ANSWER_DIRECTION[offered.direction]),
            Attribute("ice-ufrag", ice_ufrag),
            Attribute("ice-pwd", ice_pwd),
            Attribute("fingerprint", "sha-256 " + format_fingerprint(fingerprint)),
            Attribute("setup", setup),
            Attribute("tls-id", tls_id),
        ]
        attrs.append(Attribute("rtcp-mux"))
        attrs.extend(Attribute("extmap", a.value) for a in offered.get_all("extmap"))
        kept = set(formats)
        for a in offered.attributes:
            if a.name in _PT_ATTRIBUTES and a.value is not None:
                pt = a.value.split(" ", 1)[0]
                if pt in kept or (a.name == "rtcp-fb" and pt == "*"):
                    attrs.append(Attribute(a.name, a.value))
        attrs.extend(_mirrored_simulcast(offered, kept))
        attrs.extend(Attribute("candidate", c) for c in candidates)
        answers.append(
            MediaDescription(
                offered.media, 9, offered.proto, formats,
                fields=(Field("c", "IN IP4 0.0.0.0"),), attributes=tuple(attrs),
            )
        )  # fmt: skip
        accepted_mids.append(mid)
    if not accepted_mids:
        raise OfferRefused("the offer has no m= section the MD can relay (audio or video, "
                           "UDP/TLS/RTP/SAVPF, a=rtcp-mux): " + "; ".join(rejected or ["none"]))

    session_attrs: list[Attribute] = []
    if ice_lite:
        session_attrs.append(Attribute("ice-lite"))
    bundle = offer.bundle
    if bundle is not None:
        kept_bundle = [m for m in bundle if m in accepted_mids]
        if kept_bundle:
            session_attrs.append(Attribute("group", " ".join(["BUNDLE", *kept_bundle])))
    answer = SessionDescription(
        origin or Origin(),
        "-",
        (Field("t", "0 0"),),
        tuple(session_attrs),
        tuple(answers),
    )
    _check_attributes(answer.attributes, media=False)
    for m in answer.media:
        _check_attributes(m.attributes, media=True)
        _check_simulcast(m)
    return answer


def new_tls_id() -> str:
    """A fresh a=tls-id (RFC 8842 s4): 192 random bits, 32 base64url characters.

    RFC 8842 s5.3: a new, unique value for every new DTLS association (the
    endpoint for each offer, the KD for each answer).
    """
    return base64.urlsafe_b64encode(os.urandom(24)).decode("ascii")
