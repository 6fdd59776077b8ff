"""perc-daemons tests (twisted.trial).

Under CI (``CI`` set in the environment) hypothesis runs derandomized: the
same examples every run, so a CI result can be reproduced; developers' runs
keep exploring new examples (and hypothesis remembers failures locally).
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
