"""perc-admin doctor with several perc-md processes (md@N.toml over md.toml, the
perc-md@N units): each file checked as its unit reads it, one [cluster] for all, each
process's /healthz and ports."""

from __future__ import annotations

import os
import pwd
import shutil

from twisted.trial import unittest

from perc_daemons.doctor import diagnose
from perc_daemons.site_setup import SetupOptions, setup

ME = pwd.getpwuid(os.geteuid()).pw_name
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class MdProcessesDoctorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.etc = os.path.abspath(self.mktemp())
        os.makedirs(self.etc)
        shutil.copy(os.path.join(ROOT, "etc", "perc", "md.toml"), self.etc)
        setup(SetupOptions(etc_dir=self.etc, user=ME, roles=frozenset({"md"}),
                           md_processes=2, host_names=("localhost",)))

    def findings(self, network: bool = False) -> list[tuple[str, str, str]]:
        return [(f.status, f.what, f.detail) for f in
                diagnose(self.etc, ME, network=network, timeout=0.2,
                         roles=frozenset({"md"}))]

    def test_each_process_file_is_checked_over_md_toml(self) -> None:
        found = self.findings()
        for k in (1, 2):
            self.assertIn(("ok", os.path.join(self.etc, f"md@{k}.toml"),
                           f"valid (perc-md@{k}, over md.toml)"), found)

    def test_a_bad_or_diverging_process_file_fails(self) -> None:
        path = os.path.join(self.etc, "md@2.toml")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("[media]\nport = 9570", "[media]\nport = 95700"))
        found = self.findings()
        self.assertTrue(any(s == "fail" and w == path and "media.port" in d
                            for s, w, d in found), found)
        with open(path, "w") as f:
            f.write(text.replace('"https://localhost:9543"]',
                                 '"https://localhost:9543", "https://localhost:9643"]'))
        found = self.findings()
        self.assertIn(("fail", path, "[cluster] processes differs from perc-md@1's"), found)

    def test_network_names_each_process_unit(self) -> None:
        found = self.findings(network=True)
        units = {w for s, w, d in found if w.startswith("perc-md")}
        self.assertEqual(units, {"perc-md@1", "perc-md@2"}, found)  # not perc-md itself
