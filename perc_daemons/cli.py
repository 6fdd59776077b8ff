"""What the operators' command lines (perc-admin, perc-provider) share.

Errors and their exit statuses (0 done, 1 :class:`OperationError`: the
server or the operation refused, 2 :class:`UsageError` or
:class:`~perc_daemons.config.ConfigError`), secret files, the HTTPS JSON
client (:class:`ApiClient`, RFC 9457 problems as OperationError) and plain
ASCII output (tables and fields; ``--json`` prints JSON instead).  Secrets
and tokens are never printed.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

from perc_daemons import tls
from perc_daemons.config import ConfigError
from perc_daemons.problems import parse_problem
from perc_daemons.protocol import jsontext

REQUEST_TIMEOUT = 30.0


# --- flat TOML configuration files (admin.toml, provider.toml) --------------------------------


def check_https_url(value: str) -> str | None:
    """None for an ``https://`` URL without query or fragment, else why not."""
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        return "must be an https:// URL without query or fragment"
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "has a bad port"
    return None


def check_optional_path(value: str) -> str | None:
    return None if value == "" or os.path.isabs(value) else "must be an absolute path"


def load_flat_toml(path: str, keys: dict[str, Callable[[str], str | None]], *,
                   required: bool) -> dict[str, str] | None:
    """The string keys of a flat TOML file, each checked by ``keys[name]``.

    None for a missing file unless ``required``; ConfigError (file, key, reason)
    for anything else wrong.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(path, "", "file not found") from None
        return None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None
    values: dict[str, str] = {}
    for key, value in raw.items():
        if key not in keys:
            raise ConfigError(path, key, "unknown key (known: " + ", ".join(sorted(keys)) + ")")
        if not isinstance(value, str):
            raise ConfigError(path, key, f"must be a string, not {type(value).__name__}")
        reason = keys[key](value)
        if reason is not None:
            raise ConfigError(path, key, f"{reason} (got {value!r})")
        values[key] = value
    return values


def healthz_ok(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a daemon's admin listener answers ``GET /healthz`` with 200."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


class OperationError(Exception):
    """The KMF (or a local operation) refused: exit status 1."""

    def __init__(self, title: str, detail: str = "", status: int | None = None) -> None:
        super().__init__(f"{title}: {detail}" if detail else title)
        self.title = title
        self.detail = detail
        self.status = status


class UsageError(Exception):
    """Bad command line: exit status 2."""


def read_secret_file(path: str, config_path: str, key: str) -> str:
    """The first line of a private (no group/other access) file, stripped."""
    try:
        return tls.read_secret_line(path, forbidden=0o077)
    except tls.TlsFileError as e:
        raise ConfigError(config_path, key, f"{path}: {e}") from None


def trust_root(path: str, config_path: str) -> Any:
    from twisted.internet import ssl

    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ConfigError(config_path, "ca_file", f"{path}: {e.strerror}") from None
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem,
                        re.DOTALL)
    if not blocks:
        raise ConfigError(config_path, "ca_file", f"{path}: no PEM certificate")
    try:
        certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception:
        raise ConfigError(config_path, "ca_file", f"{path}: not a usable PEM certificate"
                          ) from None
    return ssl.trustRootFromCertificates(certificates)


def _problem(code: int, content: bytes) -> OperationError:
    """An error answer (RFC 9457 problem, or anything else) as an OperationError."""
    problem = parse_problem(code, content)
    return OperationError(f"{problem.title} ({code})", problem.detail, status=code)


class ApiClient:
    """An HTTPS JSON API (the KMF's, the MD's) with a bearer token (``token`` may be set later)."""

    def __init__(self, reactor: Any, url: str, trust_root: Any = None) -> None:
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

        self.reactor = reactor
        self.base = url.rstrip("/")
        self.token: str | None = None
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trust_root),
                           pool=self.pool)

    async def close(self) -> None:
        await self.pool.closeCachedConnections()

    async def raw(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                  data: bytes | None = None) -> tuple[int, bytes]:
        import treq
        from twisted.internet import error as net_error
        from twisted.web import _newclient

        try:
            response = await treq.request(method, self.base + path, headers=headers or {},
                                          data=data, agent=self.agent, timeout=REQUEST_TIMEOUT,
                                          reactor=self.reactor, allow_redirects=False)
            content = await treq.content(response)
        except (net_error.ConnectError, net_error.DNSLookupError) as e:
            raise OperationError(f"cannot connect to {self.base}", str(e)) from None
        except net_error.TimeoutError:
            raise OperationError(f"{self.base} did not answer", "timed out") from None
        except _newclient.ResponseNeverReceived as e:
            reasons = "; ".join(_reason(f) for f in e.reasons)
            raise OperationError(f"no response from {self.base}", reasons) from None
        except _newclient.RequestTransmissionFailed as e:
            reasons = "; ".join(_reason(f) for f in e.reasons)
            raise OperationError(f"cannot send to {self.base}", reasons) from None
        return response.code, content

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        code, content = await self.raw(method, path, headers=headers, data=data)
        if code >= 400:
            raise _problem(code, content)
        if not content.strip():
            return None
        try:
            return jsontext.loads(content)
        except jsontext.JsonError:
            raise OperationError(f"bad response from {self.base}",
                                 f"{method} {path}: not JSON") from None


def _reason(failure: Any) -> str:
    value = getattr(failure, "value", failure)
    text = str(value) or type(value).__name__
    if "certificate verify failed" in text or "verify" in text.lower():
        return f"TLS certificate not trusted ({text})"
    return text


def ascii_text(value: Any) -> str:
    """``value`` as printable ASCII (other characters escaped)."""
    if value is None:
        return "-"
    text = str(value)
    return "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def time_text(value: Any) -> str:
    if value is None:
        return "-"
    try:
        moment = datetime.datetime.fromtimestamp(float(value), datetime.UTC)
    except (TypeError, ValueError, OverflowError):
        return ascii_text(value)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[ascii_text(h) for h in headers]] + [[ascii_text(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(name) for name, _ in pairs)
    return "".join(f"{(name + ':').ljust(width + 1)} {ascii_text(value)}\n"
                   for name, value in pairs)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


@dataclass
class Io:
    stdout: IO[str]
    stderr: IO[str]
    getpass: Callable[[str], str]
    as_json: bool = False

    def emit(self, data: Any, text: str) -> None:
        if self.as_json:
            self.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        else:
            self.stdout.write(text)


def report(io: Io, error: BaseException, prog: str) -> int:
    """One line on stderr for a Usage/Config/OperationError; its exit status."""
    if isinstance(error, UsageError):
        io.stderr.write(f"{error}\n")
        return 2
    if isinstance(error, ConfigError):
        io.stderr.write(f"{prog}: {error}\n")
        return 2
    assert isinstance(error, OperationError)
    detail = f": {error.detail}" if error.detail else ""
    io.stderr.write(f"{prog}: {ascii_text(error.title)}{ascii_text(detail)}\n")
    return 1


def unexpected(io: Io, error: BaseException, prog: str) -> int:
    """An error no command expects: one line, status 1, never a traceback."""
    io.stderr.write(f"{prog}: unexpected error: {type(error).__name__}: "
                    f"{ascii_text(error)}\n")
    return 1
