"""bench/rekey.py's reading of the KD's JSON log lines (not its figures)."""

from __future__ import annotations

import io
import json

from twisted.logger import LogLevel
from twisted.trial import unittest

from bench.rekey import kd_events, timed_epochs
from perc_daemons import logs


def kd_log(*events: tuple[float, str, dict]) -> str:
    out = io.StringIO()
    observer = logs.observer("perc-kd", format="json", level="info", stream=out)
    for at, text, fields in events:
        observer({"log_level": LogLevel.info, "log_format": text, "log_namespace": "perc.kd",
                  "log_time": at, **fields})
    return out.getvalue()


class TimedEpochTests(unittest.TestCase):
    def test_a_timed_epoch_is_the_timer_then_its_kmf_start_then_its_installation(self):
        text = kd_log(
            (100.0, "epoch {epoch} of {conference} started at the KMF (cause: {cause}; "
                    "{members} member(s))",
             {"epoch": 3, "conference": "c", "cause": "membership", "members": 2}),
            (100.01, "epoch {epoch} of {conference} installed (SPI {spi}); sent to "
                     "{members} member(s)", {"epoch": 3, "conference": "c", "spi": 3,
                                             "members": 3}),
            (103.000125, "timed rekey of {conference} (rekey_interval {interval:.0f} s)",
             {"conference": "c", "interval": 3.0}),
            (103.0, "timed rekey of {conference} (rekey_interval {interval:.0f} s)",
             {"conference": "other", "interval": 3.0}),
            (103.02, "epoch {epoch} of {conference} started at the KMF (cause: {cause}; "
                     "{members} member(s))",
             {"epoch": 4, "conference": "c", "cause": "timer", "members": 3}),
            (103.025, "epoch {epoch} of {conference} installed (SPI {spi}); sent to "
                      "{members} member(s)", {"epoch": 4, "conference": "c", "spi": 4,
                                              "members": 3}))
        self.assertIn('"time"', text.splitlines()[0])
        found = timed_epochs(kd_events(text + "not json\n{broken\n"), "c")
        self.assertEqual(len(found), 1)
        [epoch] = found
        self.assertEqual((epoch["epoch"], epoch["spi"], epoch["members"]), (4, 4, 3))
        self.assertAlmostEqual(epoch["t0"], 103.000125, places=6)
        self.assertAlmostEqual(epoch["kmf"], 103.02, places=6)
        self.assertAlmostEqual(epoch["sent"], 103.025, places=6)
        json.loads(text.splitlines()[0])
