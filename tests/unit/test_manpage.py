"""perc_daemons.manpage: the tools' manual pages say what --help says."""

from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess

from twisted.trial import unittest

from perc_daemons.manpage import TOOLS, main, render


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.update(_option_strings(sub))
    return found


class ManPageTests(unittest.TestCase):
    def test_every_option_is_documented(self) -> None:
        for tool, (factory, _summary, _sections) in TOOLS.items():
            page = render(tool, date=datetime.date(2026, 11, 23))
            text = page.replace("\\-", "-").replace("\\e", "\\")
            self.assertTrue(page.startswith(f'.TH {tool.upper()} 1 "2026-11-23"'), page[:80])
            for option in _option_strings(factory()):
                self.assertIn(option, text, f"{tool}: {option}")
            self.assertIn(".SH EXIT STATUS", page)

    def test_admin_lists_every_command(self) -> None:
        page = render("perc-admin").replace("\\-", "-")
        for command in ("conferences create", "conferences invite", "roster show",
                        "users add", "keys rotate"):
            self.assertIn(command, page)

    def test_man_renders_it(self) -> None:
        if shutil.which("man") is None:
            raise unittest.SkipTest("man is not installed")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(render("perc-endpoint"))
        shown = subprocess.run(["man", "-l", path], capture_output=True, text=True,
                               env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"},
                               check=True).stdout
        self.assertIn("perc-endpoint - the reference PERC endpoint", shown)

    def test_usage(self) -> None:
        self.assertEqual(main(["nothing"]), 2)
