"""The root of every protocol parsing and processing error."""


class ProtocolError(Exception):
    """Malformed or unacceptable protocol input.

    Every parser in :mod:`perc_daemons.protocol` raises a subclass of this
    (never IndexError, struct.error or ValueError) so that a daemon can drop
    the one offending packet or connection and count it.
    """

    #: Short, stable label used as the metrics ``reason`` for drops.
    reason = "protocol_error"
