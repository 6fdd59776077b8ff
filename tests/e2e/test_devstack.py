"""perc-admin devstack: detached daemons that outlive the command, used with the
commands its credentials.txt prints, then stopped and brought back with their state."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys

from twisted.trial import unittest

from perc_daemons.demo import devstack
from perc_daemons.demo.stack import Ports

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_ports(n: int, kind: int = socket.SOCK_STREAM) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, kind) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tool(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """A console script as a person runs it (here: its module under this Python)."""
    module = {"perc-admin": "perc_daemons.kmf.admin_cli",
              "perc-endpoint": "perc_daemons.endpoint.cli",
              "perc-provider": "perc_daemons.md.provider_cli"}[name]
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))


class DevstackTests(unittest.TestCase):
    timeout = 180

    def test_up_use_down_up_again(self) -> None:
        directory = os.path.abspath(self.mktemp())
        tcp = free_ports(6)
        ports = Ports(kmf_admin=tcp[0], kmf_https=tcp[1], kd_admin=tcp[2], md_admin=tcp[3],
                      md_api=tcp[4], md_tunnel=tcp[5],
                      md_media=free_ports(1, socket.SOCK_DGRAM)[0])
        self.addCleanup(devstack.down, directory)
        credentials = devstack.up(directory, ports=ports)
        self.assertTrue(all(s.healthy for s in devstack.status(directory)))
        # the daemons are detached: other processes than this one
        pids = {s.pid for s in devstack.status(directory)}
        self.assertNotIn(os.getpid(), pids)
        self.assertEqual(len(pids), 3)

        # what credentials.txt tells a person to run
        create = next(line for line in credentials.splitlines()
                      if line.startswith("perc-admin "))
        result = tool(*shlex.split(create))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertRegex(result.stdout, r"(?m)^kd connected to md: +yes$")
        join = next(line for line in credentials.splitlines()
                    if line.startswith("perc-endpoint "))
        argv = shlex.split(join)[1:]
        bob = [("bob" if a == "alice" else "660" if a == "440" else a) for a in argv]
        alice = subprocess.Popen(
            [sys.executable, "-m", "perc_daemons.endpoint.cli", *argv, "--duration", "3"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, PYTHONPATH=REPO))
        result = tool("perc-endpoint", *bob, "--duration", "3")
        out, _ = alice.communicate(timeout=60)
        for who, code, text in (("bob", result.returncode, result.stdout + result.stderr),
                                ("alice", alice.returncode, out)):
            self.assertEqual(code, 0, f"{who}: {text}")
            self.assertRegex(text, r"received \d+ from 1 senders \(\d+ lost, 0 decrypt "
                                   r"failures\)")

        # down, then up again: the same users, password and conference
        self.assertEqual(len(devstack.down(directory)), 3)
        self.assertFalse(any(s.healthy or s.pid for s in devstack.status(directory)))
        again = devstack.up(directory)
        self.assertEqual(re.findall(r"password: (\S+)", again),
                         re.findall(r"password: (\S+)", credentials))
        listed = tool("perc-admin", "--config", os.path.join(directory, "etc", "admin.toml"),
                      "conferences", "list", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn('"id": "demo"', listed.stdout)
        for name in ("kmf", "md", "kd"):
            with open(os.path.join(directory, "logs", f"perc-{name}.log")) as f:
                self.assertGreaterEqual(f.read().count("Server Shut Down"), 1, name)
