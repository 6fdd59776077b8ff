"""perc_daemons.config: the shipped etc/perc/*.toml files and every kind of bad file."""

from __future__ import annotations

import os
import re
import tomllib

from twisted.trial import unittest

from perc_daemons import config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DAEMONS = ("md", "kd", "kmf")

#: A commented-out setting in a shipped file: ``# key = value``.
COMMENTED_KEY = re.compile(r"^#\s?([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(.+)$")
SECTION = re.compile(r"^\[([A-Za-z_][A-Za-z0-9_.-]*)\]\s*$")


def shipped_path(daemon: str) -> str:
    return os.path.join(REPO, "etc", "perc", f"{daemon}.toml")


def defaults(daemon: str) -> dict[str, dict[str, object]]:
    return {
        section: {key: setting.default for key, setting in settings.items()}
        for section, settings in config.SCHEMAS[daemon].items()
    }


def as_dict(cfg: config.Config) -> dict[str, dict[str, object]]:
    return {name: dict(section) for name, section in cfg.items()}


def nested(flat: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """Sections named "a.b" as TOML reads them: key "b" of table "a"."""
    out: dict[str, dict[str, object]] = {}
    for name, values in flat.items():
        parent, _, child = name.rpartition(".")
        if parent:
            out.setdefault(parent, {})[child] = dict(values)
        else:
            out.setdefault(name, {}).update(values)
    return out


class ShippedFilesTests(unittest.TestCase):
    """etc/perc/<daemon>.toml documents exactly the schema, with its defaults."""

    def documented(self, daemon: str) -> tuple[str, list[tuple[str, str]]]:
        """The file with its ``# key = value`` lines uncommented, and (section, key) pairs.

        Also checks each documented key is preceded by a prose comment.
        """
        with open(shipped_path(daemon), encoding="utf-8") as f:
            lines = f.read().splitlines()
        out: list[str] = []
        keys: list[tuple[str, str]] = []
        section = ""
        for number, line in enumerate(lines, 1):
            match = SECTION.match(line)
            if match:
                section = match.group(1)
            match = COMMENTED_KEY.match(line)
            if match:
                self.assertTrue(section, f"{daemon}.toml:{number}: key outside a [section]")
                before = lines[number - 2] if number >= 2 else ""
                self.assertTrue(
                    before.startswith("#") and not COMMENTED_KEY.match(before),
                    f"{daemon}.toml:{number}: {match.group(1)} has no description above it",
                )
                keys.append((section, match.group(1)))
                line = f"{match.group(1)} = {match.group(2)}"
            out.append(line)
        return "\n".join(out) + "\n", keys

    def test_commented_values_are_the_defaults(self) -> None:
        for daemon in DAEMONS:
            text, _ = self.documented(daemon)
            self.assertEqual(tomllib.loads(text), nested(defaults(daemon)), daemon)
            # ... and they validate.
            cfg = config.validate(daemon, shipped_path(daemon), tomllib.loads(text))
            self.assertEqual(as_dict(cfg), defaults(daemon), daemon)

    def test_documented_keys_are_the_schema_keys(self) -> None:
        for daemon in DAEMONS:
            _, keys = self.documented(daemon)
            schema_keys = sorted(
                (section, key)
                for section, settings in config.SCHEMAS[daemon].items()
                for key in settings
            )
            self.assertEqual(sorted(keys), schema_keys, daemon)
            self.assertEqual(len(keys), len(set(keys)), f"{daemon}: a key documented twice")

    def test_shipped_file_loads_to_defaults(self) -> None:
        for daemon in DAEMONS:
            cfg = config.load(daemon, shipped_path(daemon))
            self.assertEqual(cfg.path, shipped_path(daemon))
            self.assertEqual(as_dict(cfg), defaults(daemon), daemon)

    def test_default_admin_ports(self) -> None:
        ports = {d: config.load(d, shipped_path(d)).admin.port for d in DAEMONS}
        self.assertEqual(ports, {"md": 9461, "kd": 9462, "kmf": 9463})
        for daemon in DAEMONS:
            self.assertEqual(config.load(daemon, shipped_path(daemon)).admin.bind, "127.0.0.1")


class LoadTests(unittest.TestCase):
    def write(self, content: str | bytes) -> str:
        path = self.mktemp()
        data = content.encode() if isinstance(content, str) else content
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assertConfigError(self, path: str, key: str, reason: str,
                          daemon: str = "md") -> config.ConfigError:
        error = self.assertRaises(config.ConfigError, config.load, daemon, path)
        self.assertEqual((error.path, error.key, error.reason), (path, key, reason))
        where = f"{path}: {key}: " if key else f"{path}: "
        self.assertEqual(str(error), where + reason)
        return error

    def test_values_given(self) -> None:
        path = self.write('[admin]\nbind = "::1"\nport = 1234\n')
        cfg = config.load("kd", path)
        self.assertEqual(cfg.admin.port, 1234)
        self.assertEqual(cfg["admin"]["bind"], "::1")
        self.assertEqual(as_dict(cfg), {**defaults("kd"),
                                        "admin": {"bind": "::1", "port": 1234}})

    def test_kd_sections(self) -> None:
        cfg = config.load("kd", self.write(
            '[tunnel]\nmds = ["md1.example.com:4443", "127.0.0.1:9444"]\n'
            '[kmf]\nurl = "https://kmf.example.com:8443"\nclient_id = "kd-1"\n'
            '[idp]\ndomain = "example.com"\n'))
        self.assertEqual(cfg.tunnel.mds, ["md1.example.com:4443", "127.0.0.1:9444"])
        self.assertEqual((cfg.kmf.url, cfg.kmf.client_id, cfg.idp.domain),
                         ("https://kmf.example.com:8443", "kd-1", "example.com"))
        self.assertConfigError(self.write('[tunnel]\nmds = ["md1.example.com"]\n'),
                               "tunnel.mds", "'md1.example.com' is not \"host:port\" with a "
                               "port 1-65535 (got ['md1.example.com'])", daemon="kd")
        self.assertConfigError(self.write('[tunnel]\nmds = ["md1:\u00b2"]\n'),  # isdigit()
                               "tunnel.mds", "'md1:\u00b2' is not \"host:port\" with a "
                               "port 1-65535 (got ['md1:\u00b2'])", daemon="kd")
        self.assertConfigError(self.write('[kmf]\nurl = "http://kmf:8443"\n'),
                               "kmf.url", "must be an https:// URL without query or fragment "
                               "(got 'http://kmf:8443')", daemon="kd")

    def test_kd_mds_are_tunnel_addresses(self) -> None:
        """tunnel.mds is checked by the validator the KMF's MD list uses too."""
        cfg = config.load("kd", self.write('[tunnel]\nmds = ["[2001:db8::1]:4443"]\n'))
        self.assertEqual(cfg.tunnel.mds, ["[2001:db8::1]:4443"])
        self.assertConfigError(
            self.write('[tunnel]\nmds = ["::1:4443"]\n'), "tunnel.mds",
            "'::1:4443' has '::1', which is not a DNS name, an IPv4 address or an [IPv6] "
            "address (got ['::1:4443'])", daemon="kd")
        self.assertConfigError(
            self.write('[tunnel]\nmds = ["md1.example.com:4443", "MD1.example.com:04443"]\n'),
            "tunnel.mds", "must not name an MD twice (got ['md1.example.com:4443', "
            "'MD1.example.com:04443'])", daemon="kd")
        self.assertConfigError(
            self.write('[tunnel]\nmds = [4443]\n'), "tunnel.mds",
            'a tunnel address is a "host:port" string, not int (got [4443])', daemon="kd")

    def test_partial_section_fills_defaults(self) -> None:
        cfg = config.load("kmf", self.write("[admin]\nport = 0\n"))
        self.assertEqual(dict(cfg.admin), {"bind": "127.0.0.1", "port": 0})
        self.assertEqual(as_dict(cfg), {**defaults("kmf"),
                                        "admin": {"bind": "127.0.0.1", "port": 0}})

    def test_empty_file_is_defaults(self) -> None:
        cfg = config.load("md", self.write(""))
        self.assertEqual(as_dict(cfg), defaults("md"))
        self.assertEqual(dict(cfg.admin), {"bind": "127.0.0.1", "port": 9461})

    def test_missing_attribute(self) -> None:
        cfg = config.load("md", self.write(""))
        self.assertRaises(AttributeError, getattr, cfg, "nosuchsection")
        self.assertRaises(AttributeError, getattr, cfg.admin, "nosuchkey")

    def test_port_range_edges_accepted(self) -> None:
        for port in (0, 1, 65535):
            cfg = config.load("md", self.write(f"[admin]\nport = {port}\n"))
            self.assertEqual(cfg.admin.port, port)

    def test_missing_file(self) -> None:
        path = os.path.join(self.mktemp(), "md.toml")
        self.assertConfigError(path, "", "file not found")

    def test_directory(self) -> None:
        path = self.mktemp()
        os.mkdir(path)
        self.assertConfigError(path, "", "is a directory, not a file")

    def test_invalid_toml(self) -> None:
        path = self.write("[admin\nport = 1\n")
        error = self.assertRaises(config.ConfigError, config.load, "md", path)
        self.assertEqual((error.path, error.key), (path, ""))
        self.assertTrue(error.reason.startswith("invalid TOML: "), error.reason)
        self.assertIn("line 1", error.reason)

    def test_duplicate_key_is_invalid_toml(self) -> None:
        path = self.write("[admin]\nport = 1\nport = 2\n")
        error = self.assertRaises(config.ConfigError, config.load, "md", path)
        self.assertEqual((error.path, error.key), (path, ""))
        self.assertTrue(error.reason.startswith("invalid TOML: "), error.reason)

    def test_not_utf8(self) -> None:
        path = self.write(b'[admin]\n# caf\xe9\nbind = "127.0.0.1"\n')
        self.assertConfigError(path, "", "not UTF-8 text")

    def test_unknown_section(self) -> None:
        path = self.write("[nope]\nx = 1\n")
        self.assertConfigError(path, "nope",
                               "unknown section (known: admin, api, cluster, connections, logging, "
                               "media, state, tunnel)")

    def test_top_level_key_is_unknown_section(self) -> None:
        path = self.write("port = 1\n")
        self.assertConfigError(path, "port",
                               "unknown section (known: admin, api, cluster, connections, logging, "
                               "media, state, tunnel)")

    def test_section_not_a_table(self) -> None:
        path = self.write("admin = 1\n")
        self.assertConfigError(path, "admin", "must be a table ([section])")

    def test_unknown_key_lists_known_keys(self) -> None:
        path = self.write("[admin]\nprot = 9461\n")
        self.assertConfigError(path, "admin.prot", "unknown key (known: bind, port)",
                               daemon="kd")

    def test_port_string(self) -> None:
        path = self.write('[admin]\nport = "9461"\n')
        self.assertConfigError(path, "admin.port", "must be an integer, not str")

    def test_port_bool_refused(self) -> None:
        path = self.write("[admin]\nport = true\n")
        self.assertConfigError(path, "admin.port", "must be an integer, not bool")

    def test_port_float(self) -> None:
        path = self.write("[admin]\nport = 9461.0\n")
        self.assertConfigError(path, "admin.port", "must be an integer, not float")

    def test_seconds_as_integer_or_float(self) -> None:
        path = self.write("[tunnel]\nliveness_interval = 2\nliveness_timeout = 0.5\n")
        cfg = config.load("kd", path)
        self.assertEqual((cfg.tunnel.liveness_interval, cfg.tunnel.liveness_timeout), (2.0, 0.5))
        self.assertIsInstance(cfg.tunnel.liveness_interval, float)
        path = self.write("[tunnel]\nliveness_timeout = true\n")
        self.assertConfigError(path, "tunnel.liveness_timeout", "must be a number, not bool",
                               daemon="kd")
        path = self.write('[tunnel]\nliveness_timeout = "5"\n')
        self.assertConfigError(path, "tunnel.liveness_timeout", "must be a number, not str")
        path = self.write("[tunnel]\nliveness_interval = 0\n")
        self.assertConfigError(path, "tunnel.liveness_interval", "must be positive (got 0.0)")

    def test_bind_not_string(self) -> None:
        path = self.write("[admin]\nbind = 127\n")
        self.assertConfigError(path, "admin.bind", "must be a string, not int")

    def test_port_out_of_range(self) -> None:
        path = self.write("[admin]\nport = 65536\n")
        self.assertConfigError(path, "admin.port",
                               "must be a TCP/UDP port number, 0-65535 (got 65536)")
        path = self.write("[admin]\nport = -1\n")
        self.assertConfigError(path, "admin.port",
                               "must be a TCP/UDP port number, 0-65535 (got -1)")

    def test_bad_bind_address(self) -> None:
        path = self.write('[admin]\nbind = "localhost"\n')
        self.assertConfigError(path, "admin.bind",
                               "must be an IPv4 or IPv6 address (got 'localhost')")
        path = self.write('[admin]\nbind = "127.0.0.256"\n')
        self.assertConfigError(path, "admin.bind",
                               "must be an IPv4 or IPv6 address (got '127.0.0.256')")

    def test_permission_denied(self) -> None:
        if os.geteuid() == 0:
            raise unittest.SkipTest("running as root: root can read a mode 000 file")
        path = self.write("[admin]\n")
        os.chmod(path, 0)
        self.addCleanup(os.chmod, path, 0o600)
        self.assertConfigError(path, "", "permission denied")

    def test_md_sections(self) -> None:
        fp = ":".join(["AB"] * 32)
        cfg = config.load("md", self.write(
            f'[media]\nadvertise = "192.0.2.1"\nreplay_window = 64\n'
            f'[tunnel]\nkd_fingerprints = ["{fp}"]\n'))
        self.assertEqual((cfg.media.advertise, cfg.media.replay_window), ("192.0.2.1", 64))
        self.assertEqual(cfg.tunnel.kd_fingerprints, [fp])
        self.assertConfigError(self.write('[tunnel]\nkd_fingerprints = ["AB:CD"]\n'),
                               "tunnel.kd_fingerprints",
                               'must be a list of SHA-256 fingerprints "AA:BB:..." '
                               "(32 hex pairs) (got ['AB:CD'])")
        self.assertConfigError(self.write("[media]\nreplay_window = 32\n"),
                               "media.replay_window", "must be 64-32767 packets (got 32)")
        self.assertConfigError(self.write('[media]\nadvertise = "md.example"\n'),
                               "media.advertise",
                               "must be an IPv4 or IPv6 address (got 'md.example')")
        self.assertConfigError(self.write("[api]\njoin_timeout = 0\n"),
                               "api.join_timeout", "must be positive (got 0)")


class LayerTests(unittest.TestCase):
    """``--config A --config B``: B's keys replace A's; errors name the file that set the key."""

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.base = self.write("md.toml", '[api]\nport = 9443\njoin_timeout = 7\n'
                                          '[media]\nport = 9470\n')

    def test_later_file_wins_key_by_key(self) -> None:
        instance = self.write("md@2.toml", '[api]\nport = 9444\n[media]\nport = 9471\n'
                                           '[state]\nfile = "/var/lib/perc/md@2-state.json"\n')
        cfg = config.load_layers("md", [self.base, instance])
        self.assertEqual((cfg.api.port, cfg.api.join_timeout, cfg.media.port),
                         (9444, 7, 9471))
        self.assertEqual(cfg.state.file, "/var/lib/perc/md@2-state.json")
        self.assertEqual(cfg.paths, (self.base, instance))
        self.assertEqual((cfg.origin("api.port"), cfg.origin("api.join_timeout"),
                          cfg.origin("tunnel.port")), (instance, self.base, self.base))

    def test_error_names_the_file_that_set_the_key(self) -> None:
        instance = self.write("md@2.toml", '[media]\nport = 70000\n')
        with self.assertRaises(config.ConfigError) as raised:
            config.load_layers("md", [self.base, instance])
        self.assertEqual((raised.exception.path, raised.exception.key),
                         (instance, "media.port"))
        broken = self.write("md@3.toml", '[media]\nnope = 1\n')
        with self.assertRaises(config.ConfigError) as raised:
            config.load_layers("md", [self.base, broken])
        self.assertEqual((raised.exception.path, raised.exception.key), (broken, "media.nope"))
        with self.assertRaises(config.ConfigError) as raised:
            config.load_layers("md", [self.base, os.path.join(self.dir, "missing.toml")])
        self.assertEqual(raised.exception.reason, "file not found")

    def test_options_take_config_twice(self) -> None:
        from perc_daemons.md.service import Options

        instance = self.write("md@2.toml", '[api]\nport = 9444\n')
        options = Options()
        options.parseOptions(["--config", self.base, "--config", instance])
        self.assertEqual((options.loaded.api.port, options.loaded.media.port), (9444, 9470))
        self.assertEqual(options.loaded.paths, (self.base, instance))
