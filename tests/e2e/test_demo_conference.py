"""``make demo``: the conference over two cascaded MDs runs, every check holds, what it
prints says what it claims (who is on which MD, what crossed the link both ways, every
payload byte-identical, the key search over both MDs), and nothing is left running."""

from __future__ import annotations

import os
import re
import sys

from twisted.internet import utils
from twisted.trial import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MDS = ("md", "md2")


class ConferenceDemoTests(unittest.TestCase):
    timeout = 120

    async def test_demo(self) -> None:
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        keep = os.path.abspath(self.mktemp())  # to look for any process still using it
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "perc_daemons.demo.conference", "--seconds", "2",
                             "--keep", keep], env=env, path=REPO)
        text = out.decode() + err.decode()
        self.assertEqual(code, 0, text[-5000:])
        checks = re.search(r"^(\d+) of (\d+) checks passed\.$", text, re.M)
        self.assertIsNotNone(checks, text[-3000:])
        self.assertEqual(checks.group(1), checks.group(2))
        self.assertGreaterEqual(int(checks.group(2)), 23)
        self.assertNotIn("FAILED", text)
        self.assertIn("dave refused", text)

        # four daemons, two of them perc-md
        daemons = re.findall(r"^  (perc-\w+(?: \(\w+\))?) +running, pid (\d+)$", text, re.M)
        self.assertEqual([d for d, _ in daemons],
                         ["perc-kmf", "perc-md (md)", "perc-md (md2)", "perc-kd"], text[:2000])

        # who is on which MD, as each MD lists its participants
        self.assertIn("[ok] md's participants are who joined through it: alice\n", text)
        self.assertIn("[ok] md2's participants are who joined through it: bob and carol\n", text)
        self.assertIn("[ok] each MD pins the other's own certificate", text)

        # what crossed the link, each way, as both ends counted it
        crossed = {(m[0], m[1]): tuple(int(n) for n in m[2:]) for m in re.findall(
            r"^  (md2?) +-> (md2?) *: \1 sent (\d+) RTP packets, (\d+) bytes; \2 took in "
            r"(\d+), (\d+) bytes \(and \d+ RTCP packets: SR, receiver reports, stream "
            r"announcements\)$", text, re.M)}
        self.assertEqual(set(crossed), {("md", "md2"), ("md2", "md")}, text)
        for way, (sent, sent_bytes, got, got_bytes) in crossed.items():
            self.assertGreater(got, 0, way)
            self.assertGreater(got_bytes, 100 * got, way)  # PCMU: 160-byte payloads
            self.assertLessEqual((got, got_bytes), (sent, sent_bytes), way)
        # bob and carol (md2) send more over the link than alice alone (md)
        self.assertGreater(crossed[("md2", "md")][0], crossed[("md", "md2")][0])

        # every receiver, every sender: all decrypted payloads byte-identical, and
        # media went both ways across the link
        rows = re.findall(r"^  (\w+) \((md2?)\) +(\w+) \((md2?)\) +(md2?(?: -> md2?)?) +"
                          r"(\d+) +(\d+) +(\d+) +(\d+) +(\d+)  \[", text, re.M)
        self.assertEqual(len(rows), 6, text)
        paths = set()
        for receiver, _, sender, _, path, packets, identical, _, _, failed in rows:
            self.assertGreater(int(packets), 0, (receiver, sender))
            self.assertEqual(identical, packets, (receiver, sender))
            self.assertEqual(failed, "0", (receiver, sender))
            paths.add(path)
        # alice is alone on md; bob and carol hear each other within md2
        self.assertEqual(paths, {"md2", "md -> md2", "md2 -> md"}, rows)

        # the key search, over both MDs: what each was sent and wrote, searched
        search = text[text.index("== 10."):]
        sections = re.split(r"^  (md2?):$", search, flags=re.M)[1:]
        self.assertEqual(sections[::2], list(MDS), search)
        for md, section in zip(sections[::2], sections[1::2], strict=True):
            tunnel = int(re.search(r"tunnel from the KD: (\d+) bytes", section).group(1))
            udp = re.search(r"UDP from [\w ]+: (\d+) datagrams, (\d+) bytes", section)
            files = re.search(r"files: (\d+), (\d+) bytes", section)
            searched = re.search(r"\[ok\] none of the (\d+) keys in any of it \((\d+) bytes",
                                 section)
            self.assertIsNotNone(searched, section)
            self.assertGreater(tunnel, 0, md)
            self.assertGreater(int(udp.group(2)), 10_000, md)
            self.assertGreaterEqual(int(files.group(1)), 4, md)  # config, cert, key, token
            self.assertGreater(int(searched.group(1)), 20, md)
            self.assertGreater(int(searched.group(2)), tunnel + int(udp.group(2)), md)
            self.assertIn(f"[ok] {md} got hop-by-hop keys only", section)

        # nothing left running: the daemons it named, nor anything using its directory
        for _, pid in daemons:
            self.assertFalse(_alive(int(pid)), pid)
        self.assertEqual(_using(keep), [])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _using(directory: str) -> list[str]:
    """Live processes whose command line names ``directory`` (``pgrep -af`` by hand)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if directory in cmdline and _alive(int(pid)):
            found.append(f"{pid} {cmdline}")
    return found
