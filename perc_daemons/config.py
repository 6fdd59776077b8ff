"""Load and validate the daemons' TOML configuration (/etc/perc/<daemon>.toml).

Every key has a documented default (see etc/perc/*.toml, which a test keeps in
step with :data:`SCHEMAS`).  Any problem stops start-up with a
:class:`ConfigError` naming the file, the dotted key and the reason; the
daemons turn it into one line on stderr and exit status 2.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(Exception):
    """A configuration problem: which file, which key, and why."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + reason)


@dataclass(frozen=True)
class Setting:
    """One configuration key: its type, default and an optional extra check.

    ``check`` returns ``None`` when the value is acceptable, otherwise the
    reason it is not.
    """

    kind: type
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP/UDP port number, 0-65535"


def _ip_address(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be an IPv4 or IPv6 address"
    return None


def _admin_section(port: int) -> dict[str, Setting]:
    return {
        "bind": Setting(
            str,
            "127.0.0.1",
            "Address of the admin HTTP listener (/healthz, /metrics). Keep it on loopback.",
            _ip_address,
        ),
        "port": Setting(int, port, "TCP port of the admin HTTP listener (0 picks a free port).",
                        _port),
    }


#: Per daemon: section -> key -> Setting.  Later features add their sections here.
SCHEMAS: dict[str, dict[str, dict[str, Setting]]] = {
    "md": {"admin": _admin_section(9461)},
    "kd": {"admin": _admin_section(9462)},
    "kmf": {"admin": _admin_section(9463)},
}


class Section(Mapping[str, Any]):
    """Read-only view of one validated section, with attribute access."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class Config(Section):
    """A daemon's validated configuration: ``config.admin.port``, and its ``path``."""

    def __init__(self, path: str, sections: dict[str, Section]) -> None:
        super().__init__(sections)
        self.path = path


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", float: "a number",
            list: "a list"}.get(kind, kind.__name__)


def validate(daemon: str, path: str, raw: Mapping[str, Any]) -> Config:
    """Check ``raw`` (parsed TOML) against the daemon's schema, filling defaults."""
    schema = SCHEMAS[daemon]
    for section_name, section_value in raw.items():
        if section_name not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(path, section_name, f"unknown section (known: {known})")
        if not isinstance(section_value, dict):
            raise ConfigError(path, section_name, "must be a table ([section])")
        for key in section_value:
            if key not in schema[section_name]:
                known = ", ".join(sorted(schema[section_name]))
                raise ConfigError(path, f"{section_name}.{key}", f"unknown key (known: {known})")
    sections: dict[str, Section] = {}
    for section_name, settings in schema.items():
        given = raw.get(section_name, {})
        values: dict[str, Any] = {}
        for key, setting in settings.items():
            value = given.get(key, setting.default)
            # bool is a subclass of int: refuse `port = true`.
            if not isinstance(value, setting.kind) or (
                setting.kind is not bool and isinstance(value, bool)
            ):
                raise ConfigError(
                    path, f"{section_name}.{key}",
                    f"must be {_type_name(setting.kind)}, not {type(value).__name__}",
                )
            if setting.check is not None:
                reason = setting.check(value)
                if reason is not None:
                    raise ConfigError(path, f"{section_name}.{key}", f"{reason} (got {value!r})")
            values[key] = value
        sections[section_name] = Section(values)
    return Config(path, sections)


def load(daemon: str, path: str) -> Config:
    """Read and validate ``path`` for ``daemon`` ("md", "kd" or "kmf")."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None
    return validate(daemon, path, raw)
