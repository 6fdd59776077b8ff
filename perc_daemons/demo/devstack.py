"""``perc-admin devstack up|down|status``: a persistent local stack for people and scripts.

:class:`~perc_daemons.demo.stack.LocalStack` (what the tests, ``make demo``
and ``bench/conference.py`` run) makes the files: ``perc-admin setup``'s
CA, certificates, OAuth clients and secrets under ``DIR/etc``, the KMF's
state, users alice, bob, carol and dave with one password, and the three
configurations.  Here they get fixed ports (:data:`PORTS`, away from the
package's own, so a devstack runs beside an installed perc-daemons) and the
daemons run detached (``twistd`` with a pid file and a log file each), so
the stack outlives the command, and ``up`` again after a reboot brings the
same stack back: same certificates, users, conferences and keys.

``DIR`` then holds, besides ``etc/`` and ``kmf/``:

* ``credentials.txt`` (0600): the URLs and the users' password, and the
  commands to use them (``perc-admin``/``perc-provider`` with
  ``etc/admin.toml`` / ``etc/provider.toml``, ``perc-endpoint`` with
  ``--password-file DIR/password``);
* ``logs/perc-{kmf,md,kd}.log`` (kept across restarts), ``run/*.pid`` and
  ``ports.json`` (the ports it was made with).

The KD has no ``[tunnel] mds``: it connects to the MD a conference names
(``perc-admin conferences create ... --md URL``), as on a real site.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from perc_daemons.cli import healthz_ok
from perc_daemons.demo.stack import DOMAIN, LocalStack, Ports

__all__ = ["PORTS", "DevstackError", "down", "status", "up"]

#: The devstack's ports: the package's defaults plus 10000.
PORTS = Ports(kmf_admin=19463, kmf_https=18443, kd_admin=19462, md_admin=19461,
              md_api=19443, md_tunnel=19450, md_media=19470)
DAEMONS = ("kmf", "md", "kd")  # started in this order, stopped in reverse
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class DevstackError(Exception):
    """A daemon did not start or stop; the message says which and where its log is."""


@dataclass(frozen=True)
class DaemonStatus:
    name: str
    pid: int | None
    healthy: bool

    @property
    def text(self) -> str:
        if self.healthy:
            return f"perc-{self.name}: running (pid {self.pid})"
        if self.pid is not None:
            return f"perc-{self.name}: process {self.pid} alive but /healthz does not answer"
        return f"perc-{self.name}: stopped"


def _ports(directory: str, default: Ports | None = None) -> Ports:
    """The stack's ports: ``DIR/ports.json`` once made, else ``default`` (or :data:`PORTS`)."""
    try:
        with open(os.path.join(directory, "ports.json")) as f:
            return Ports(**json.load(f))
    except FileNotFoundError:
        return Ports(**vars(default or PORTS))
    except (OSError, ValueError, TypeError) as e:
        raise DevstackError(f"{directory}/ports.json: {e}") from None


def _admin_port(ports: Ports, name: str) -> int:
    return {"kmf": ports.kmf_admin, "kd": ports.kd_admin, "md": ports.md_admin}[name]


def _pidfile(directory: str, name: str) -> str:
    return os.path.join(directory, "run", f"perc-{name}.pid")


def _pid(directory: str, name: str) -> int | None:
    try:
        with open(_pidfile(directory, name)) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _healthy(ports: Ports, name: str) -> bool:
    return healthz_ok("127.0.0.1", _admin_port(ports, name))


def _prepare(directory: str, ports: Ports) -> LocalStack:
    """The stack's files (made on the first ``up``, kept afterwards)."""
    from twisted.internet import reactor

    stack = LocalStack(directory, reactor, static_mds=False,
                       password=_saved_password(directory))
    stack.ports = ports
    stack.prepare()
    with open(os.path.join(stack.dir, "ports.json"), "w") as f:
        json.dump(vars(ports), f)
    for name in DAEMONS:
        stack._write_config(name)
    etc = os.path.join(stack.dir, "etc")
    _rewrite_url(os.path.join(etc, "admin.toml"), stack.kmf_url)
    _rewrite_url(os.path.join(etc, "provider.toml"), stack.md_url)
    password = os.path.join(stack.dir, "password")
    if not os.path.exists(password):
        _write_private(password, stack.password + "\n")
    _write_private(os.path.join(stack.dir, "credentials.txt"), _credentials(stack))
    return stack


def _saved_password(directory: str) -> str | None:
    try:
        with open(os.path.join(directory, "password")) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def _rewrite_url(path: str, url: str) -> None:
    with open(path) as f:
        lines = f.read().splitlines()
    lines = [f'url = "{url}"' if line.startswith("url = ") else line for line in lines]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _credentials(stack: LocalStack) -> str:
    d, ports = stack.dir, stack.ports
    users = ", ".join(f"{u}@{DOMAIN}" for u in stack.users)
    return (f"perc-daemons devstack in {d}\n\n"
            f"KMF:  {stack.kmf_url}   (admin http://127.0.0.1:{ports.kmf_admin}/metrics)\n"
            f"MD:   {stack.md_url}   (tunnel {ports.md_tunnel}, media UDP {ports.md_media}, "
            f"admin {ports.md_admin})\n"
            f"KD:   admin http://127.0.0.1:{ports.kd_admin}/metrics\n"
            f"CA:   {d}/etc/tls/ca.crt\n"
            f"Users: {users}; password: {stack.password} (also in {d}/password)\n\n"
            f"perc-admin --config {d}/etc/admin.toml conferences create demo --title Demo "
            f"--invite alice@{DOMAIN} --invite bob@{DOMAIN} --start --md {stack.md_url}\n"
            f"perc-endpoint --kmf {stack.kmf_url} --md {stack.md_url} --ca {d}/etc/tls/ca.crt "
            f"--conference demo --user alice --password-file {d}/password --tone 440\n"
            f"perc-provider --config {d}/etc/provider.toml conferences show demo\n"
            f"Logs: {d}/logs/perc-{{kmf,md,kd}}.log\n")


def _start(directory: str, stack: LocalStack, name: str, python: str) -> None:
    logs = os.path.join(directory, "logs")
    run = os.path.join(directory, "run")
    os.makedirs(logs, exist_ok=True)
    os.makedirs(run, exist_ok=True)
    log = os.path.join(logs, f"perc-{name}.log")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [repo, os.environ.get("PYTHONPATH")])))
    # twistd detaches (double fork) once its options, our config included, are valid
    result = subprocess.run(
        [python, "-c", "from twisted.scripts.twistd import run; run()",
         f"--pidfile={_pidfile(directory, name)}", f"--logfile={log}", "--umask=0077",
         f"perc-{name}", "--config", stack.configs[name]],
        cwd=run, env=env, capture_output=True, text=True, timeout=START_TIMEOUT)
    if result.returncode != 0:
        raise DevstackError(f"perc-{name} did not start (status {result.returncode}): "
                            f"{(result.stderr or result.stdout).strip()}")
    started = time.monotonic()
    while not _healthy(stack.ports, name):
        waited = time.monotonic() - started
        if waited > START_TIMEOUT:
            raise DevstackError(f"perc-{name} is not healthy after {START_TIMEOUT:.0f} s; "
                                f"see {log}:\n" + _tail(log))
        if waited > 3 and _pid(directory, name) is None:  # it exited after detaching
            raise DevstackError(f"perc-{name} stopped during start-up; see {log}:\n"
                                + _tail(log))
        time.sleep(0.1)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def up(directory: str, *, python: str = sys.executable, ports: Ports | None = None) -> str:
    """Start what is not running; the text of ``credentials.txt``.  ``ports`` are used
    when the stack is made (default :data:`PORTS`) and kept in ``DIR/ports.json``."""
    directory = os.path.abspath(directory)
    stack = _prepare(directory, _ports(directory, ports))
    for name in DAEMONS:
        if _pid(directory, name) is not None and _healthy(stack.ports, name):
            continue
        _start(directory, stack, name, python)
    with open(os.path.join(directory, "credentials.txt")) as f:
        return f.read()


def down(directory: str) -> list[str]:
    """SIGTERM each running daemon (KD, MD, KMF) and wait for it; what happened."""
    directory = os.path.abspath(directory)
    done = []
    for name in reversed(DAEMONS):
        pid = _pid(directory, name)
        if pid is None:
            done.append(f"perc-{name}: not running")
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _pid(directory, name) is not None:
            if time.monotonic() > deadline:
                raise DevstackError(f"perc-{name} (pid {pid}) did not stop within "
                                    f"{STOP_TIMEOUT:.0f} s")
            time.sleep(0.1)
        done.append(f"perc-{name}: stopped (pid {pid})")
    return done


def status(directory: str) -> list[DaemonStatus]:
    directory = os.path.abspath(directory)
    ports = _ports(directory)
    return [DaemonStatus(name, _pid(directory, name), _healthy(ports, name))
            for name in DAEMONS]
