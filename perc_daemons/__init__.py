"""perc-daemons: the server side of Privacy Enhanced RTP Conferencing (RFC 8871)."""

__version__ = "0.1.0"
