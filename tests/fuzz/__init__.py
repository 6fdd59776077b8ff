"""``make fuzz``: mutation fuzzing of the sans-I/O parsers; see :mod:`tests.fuzz.harness`."""
