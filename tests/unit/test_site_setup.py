"""perc-admin setup (perc_daemons.site_setup): the files, owners and modes; what it keeps."""

from __future__ import annotations

import grp
import hashlib
import io
import os
import pwd
import stat
import subprocess

from cryptography import x509
from twisted.trial import unittest

from perc_daemons import tls
from perc_daemons.kmf import admin_cli
from perc_daemons.kmf.clients import ClientRegistry
from perc_daemons.pki import CertificateAuthority, chains_to
from perc_daemons.site_setup import MANIFEST, SetupError, SetupOptions, setup

ME = pwd.getpwuid(os.geteuid()).pw_name
FILES = ["tls/ca.crt", "tls/ca.key", "tls/kmf.crt", "tls/kmf.key", "tls/md.crt",
         "tls/md.key", "tls/kd.crt", "tls/kd.key", "kmf-clients.toml", "kd-client.secret",
         "admin-client.secret", "admin.toml", "md-provider.token", "provider.toml"]
#: One step per file, a leaf's key going with its certificate.
STEPS = [f for f in FILES if f not in ("tls/kmf.key", "tls/md.key", "tls/kd.key")]


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def names(pem: bytes) -> list[str]:
    certificate = x509.load_pem_x509_certificate(pem)
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in san]


class SetupTests(unittest.TestCase):
    def setUp(self) -> None:
        self.etc = os.path.abspath(self.mktemp())
        os.makedirs(self.etc)

    def run_setup(self, **kwargs) -> dict[str, tuple[str, str]]:
        options = SetupOptions(etc_dir=self.etc, user=kwargs.pop("user", ME), **kwargs)
        return {os.path.relpath(s.path, self.etc): (s.action, s.detail) for s in setup(options)}

    def read(self, relative: str) -> bytes:
        with open(os.path.join(self.etc, relative), "rb") as f:
            return f.read()

    def test_first_run_makes_every_file_the_daemons_need(self):
        steps = self.run_setup(host_names=["perc.example.com"])
        self.assertEqual(sorted(steps), sorted(STEPS))
        self.assertEqual({action for action, _ in steps.values()}, {"made"})
        ca = self.read("tls/ca.crt")
        for name in ("kmf", "md", "kd"):
            self.assertTrue(chains_to(self.read(f"tls/{name}.crt"), ca), name)
            # the certificate and key belong together (the daemons' own loader)
            tls.server_context_factory(os.path.join(self.etc, f"tls/{name}.crt"),
                                       os.path.join(self.etc, f"tls/{name}.key"))
        self.assertEqual(names(self.read("tls/kmf.crt")),
                         ["perc.example.com", "localhost", "127.0.0.1", "::1"])
        self.assertEqual(names(self.read("tls/kd.crt")), ["kd.localhost"])
        for relative in FILES:
            want = {"tls/ca.crt": 0o644, "tls/kmf.crt": 0o644, "tls/md.crt": 0o644,
                    "tls/kd.crt": 0o644, "tls/ca.key": 0o600,
                    "admin-client.secret": 0o600}.get(relative, 0o640)
            self.assertEqual(mode(os.path.join(self.etc, relative)), want, relative)
        self.assertEqual(mode(os.path.join(self.etc, "tls")), 0o750)

    def test_the_client_registry_holds_the_secrets_it_wrote(self):
        self.run_setup()
        registry = ClientRegistry.load(os.path.join(self.etc, "kmf-clients.toml"))
        self.assertEqual(len(registry), 3)
        for cid, secret_file in (("kd", "kd-client.secret"),
                                 ("perc-admin", "admin-client.secret")):
            secret = self.read(secret_file).decode().strip()
            self.assertGreaterEqual(len(secret), 43)
            client = registry.get(cid)
            self.assertTrue(client.secret_hash.startswith("$sha256$"))
            d = registry.authenticate(cid, secret, "127.0.0.1")
            self.assertEqual(self.successResultOf(d).client_id, cid)
        self.assertEqual(registry.get("perc-endpoint").type, "public")
        # perc-admin reads what setup wrote
        config = admin_cli.load_admin_config(os.path.join(self.etc, "admin.toml"),
                                             required=True)
        self.assertEqual((config.client_id, config.ca_file),
                         ("perc-admin", os.path.join(self.etc, "tls/ca.crt")))
        admin_cli.read_secret_file(config.client_secret_file, config.path, "x")

    def test_second_run_keeps_everything(self):
        self.run_setup()
        before = {relative: self.read(relative) for relative in FILES}
        steps = self.run_setup()
        self.assertEqual({action for action, _ in steps.values()}, {"kept"})
        self.assertEqual({relative: self.read(relative) for relative in FILES}, before)

    def test_manifest_records_what_it_made(self):
        self.run_setup()
        lines = self.read(MANIFEST).decode().splitlines()
        recorded = dict(reversed(line.split("  ", 1)) for line in lines)
        self.assertEqual(sorted(recorded), sorted(FILES))
        for relative, digest in recorded.items():
            self.assertEqual(hashlib.sha256(self.read(relative)).hexdigest(), digest)
        # the same check postrm makes: sha256sum -c from /etc/perc
        result = subprocess.run(["sha256sum", "--check", "--quiet", MANIFEST], cwd=self.etc,
                                capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def package_self_signed(self, name: str) -> None:
        """What postinst does: a self-signed certificate, recorded in the manifest."""
        tls_dir = os.path.join(self.etc, "tls")
        os.makedirs(tls_dir, exist_ok=True)
        tls.generate_self_signed(f"{tls_dir}/{name}.crt", f"{tls_dir}/{name}.key")
        with open(os.path.join(self.etc, MANIFEST), "a") as f:
            for relative in (f"tls/{name}.key", f"tls/{name}.crt"):
                f.write(f"{hashlib.sha256(self.read(relative)).hexdigest()}  {relative}\n")

    def test_replaces_the_package_self_signed_certificates_only(self):
        self.package_self_signed("kmf")
        self.package_self_signed("md")
        # the admin replaced the MD's with one of their own (not from tls/ca.crt)
        foreign = CertificateAuthority.create("other CA", days=30)
        cert, key = foreign.issue(["md.example.com"], days=30)
        with open(os.path.join(self.etc, "tls/md.crt"), "wb") as f:
            f.write(cert)
        with open(os.path.join(self.etc, "tls/md.key"), "wb") as f:
            f.write(key)
        steps = self.run_setup()
        self.assertEqual(steps["tls/kmf.crt"][0], "replaced")
        self.assertTrue(chains_to(self.read("tls/kmf.crt"), self.read("tls/ca.crt")))
        self.assertEqual(steps["tls/md.crt"][0], "warning")
        self.assertIn("does not chain to tls/ca.crt", steps["tls/md.crt"][1])
        self.assertEqual(self.read("tls/md.crt"), cert)
        self.assertEqual(self.read("tls/md.key"), key)

    def test_issues_from_the_sites_own_ca_without_copying_its_key(self):
        ca = CertificateAuthority.create("Example Corp CA", days=365)
        site = os.path.abspath(self.mktemp())
        os.makedirs(site)
        with open(f"{site}/ca.crt", "wb") as f:
            f.write(ca.certificate_pem)
        with open(f"{site}/ca.key", "wb") as f:
            f.write(ca.key_pem)
        steps = self.run_setup(ca_certificate=f"{site}/ca.crt", ca_key=f"{site}/ca.key")
        self.assertNotIn("tls/ca.key", steps)
        self.assertFalse(os.path.exists(os.path.join(self.etc, "tls/ca.key")))
        self.assertEqual(self.read("tls/ca.crt"), ca.certificate_pem)
        for name in ("kmf", "md", "kd"):
            self.assertTrue(chains_to(self.read(f"tls/{name}.crt"), ca.certificate_pem))
        # a key of another certificate, or a leaf as "CA": refused, nothing made
        other = CertificateAuthority.create("other", days=30)
        with open(f"{site}/other.key", "wb") as f:
            f.write(other.key_pem)
        with self.assertRaisesRegex(SetupError, "the key does not belong to the certificate"):
            self.run_setup(ca_certificate=f"{site}/ca.crt", ca_key=f"{site}/other.key")
        leaf_cert, leaf_key = ca.issue(["leaf.example.com"], days=30)
        with open(f"{site}/leaf.crt", "wb") as f:
            f.write(leaf_cert)
        with open(f"{site}/leaf.key", "wb") as f:
            f.write(leaf_key)
        with self.assertRaisesRegex(SetupError, "not a CA certificate"):
            self.run_setup(ca_certificate=f"{site}/leaf.crt", ca_key=f"{site}/leaf.key")

    def test_a_broken_client_registry_is_reported_not_overwritten(self):
        with open(os.path.join(self.etc, "kmf-clients.toml"), "w") as f:
            f.write("[client.x]\ntype = 'nonsense'\n")
        os.chmod(os.path.join(self.etc, "kmf-clients.toml"), 0o600)
        with self.assertRaisesRegex(SetupError, "kmf-clients.toml"):
            self.run_setup()
        with open(os.path.join(self.etc, "kmf-clients.toml")) as f:
            self.assertEqual(f.read(), "[client.x]\ntype = 'nonsense'\n")

    def test_an_existing_registry_gains_only_the_missing_clients(self):
        with open(os.path.join(self.etc, "kmf-clients.toml"), "w") as f:
            f.write('[client.perc-endpoint]\ntype = "public"\n'
                    'grant_types = ["authorization_code"]\n'
                    'redirect_uris = ["https://app.example.com/cb"]\nscopes = ["identity"]\n')
        os.chmod(os.path.join(self.etc, "kmf-clients.toml"), 0o600)
        steps = self.run_setup()
        self.assertEqual(steps["kmf-clients.toml"], ("replaced", "clients kd, perc-admin"))
        registry = ClientRegistry.load(os.path.join(self.etc, "kmf-clients.toml"))
        self.assertEqual(registry.get("perc-endpoint").redirect_uris,
                         ("https://app.example.com/cb",))
        self.assertIsNotNone(registry.get("kd"))

    def test_owners_as_root(self):
        """As root: keys and daemon files root:<daemon group> 0640, the rest root's."""
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root (CI runs as root)")
        user = next((u for u in ("nobody", "daemon") if _exists(u)), None)
        if user is None:
            raise unittest.SkipTest("no unprivileged system user")
        entry = pwd.getpwnam(user)
        gid = grp.getgrnam(user).gr_gid if _group_exists(user) else entry.pw_gid
        self.run_setup(user=user)
        for relative in FILES:
            st = os.stat(os.path.join(self.etc, relative))
            group = gid if mode(os.path.join(self.etc, relative)) == 0o640 else 0
            self.assertEqual((st.st_uid, st.st_gid), (0, group), relative)

    def test_a_providers_md_host_gets_nothing_of_the_enterprise(self):
        steps = self.run_setup(roles=frozenset({"md"}))
        self.assertEqual(sorted(steps), ["md-provider.token", "provider.toml", "tls/ca.crt",
                                         "tls/ca.key", "tls/md.crt"])
        for relative in ("tls/kd.key", "tls/kmf.key", "kd-client.secret",
                         "admin-client.secret", "kmf-clients.toml", "admin.toml"):
            self.assertFalse(os.path.exists(os.path.join(self.etc, relative)), relative)
        with self.assertRaisesRegex(SetupError, "roles are kmf, kd and md"):
            self.run_setup(roles=frozenset({"sfu"}))

    def test_md_processes_get_their_own_ports_state_and_one_cluster(self):
        from perc_daemons import config

        steps = self.run_setup(roles=frozenset({"md"}), md_processes=3,
                               host_names=["md.example.net"])
        self.assertEqual([f for f in sorted(steps) if f.startswith("md@")],
                         ["md@1.toml", "md@2.toml", "md@3.toml"])
        shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))), "etc", "perc", "md.toml")
        loaded = [config.load_layers("md", [shipped, os.path.join(self.etc, f"md@{k}.toml")])
                  for k in (1, 2, 3)]
        self.assertEqual([c.api.port for c in loaded], [9443, 9543, 9643])
        self.assertEqual([c.media.port for c in loaded], [9470, 9570, 9670])
        self.assertEqual(len({(c.admin.port, c.tunnel.port, c.state.file) for c in loaded}), 3)
        self.assertEqual({tuple(c.cluster.processes) for c in loaded},
                         {("https://md.example.net:9443", "https://md.example.net:9543",
                           "https://md.example.net:9643")})
        self.assertIn("md.example.net", names(self.read("tls/md.crt")))
        self.assertEqual(mode(os.path.join(self.etc, "md@2.toml")), 0o640)
        with self.assertRaisesRegex(SetupError, "--md-processes must be 1-64"):
            self.run_setup(roles=frozenset({"md"}), md_processes=0)

    def test_refuses_an_unknown_user(self):
        with self.assertRaisesRegex(SetupError, "no user 'no-such-perc-user'"):
            self.run_setup(user="no-such-perc-user")


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


class SetupCommandTests(unittest.TestCase):
    def test_perc_admin_setup_prints_each_file_and_what_next(self):
        etc = os.path.abspath(self.mktemp())
        os.makedirs(etc)
        out, err = io.StringIO(), io.StringIO()
        code = admin_cli.main(["setup", "--etc-dir", etc, "--user", ME], stdout=out,
                              stderr=err)
        self.assertEqual((code, err.getvalue()), (0, ""))
        text = out.getvalue()
        for relative in STEPS:
            self.assertRegex(text, rf"(?m)^made +{etc}/{relative}\b")
        self.assertIn("systemctl restart perc-kmf perc-md perc-kd", text)
        self.assertNotIn(open(f"{etc}/kd-client.secret").read().strip(), text)
        code = admin_cli.main(["setup", "--etc-dir", etc + "/missing", "--user", ME],
                              stdout=io.StringIO(), stderr=err)
        self.assertEqual(code, 1)
        self.assertIn("no such directory", err.getvalue())
