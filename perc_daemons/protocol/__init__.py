"""Sans-I/O protocol cores: bytes and explicit time in, bytes and events out.

Nothing in this package imports Twisted, reads a clock or touches a socket.
"""
