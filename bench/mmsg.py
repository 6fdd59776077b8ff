"""Batched reading of UDP sockets for the benchmarks: Linux recvmmsg(2) through ctypes.

One :class:`Batch` holds preallocated buffers for up to ``size`` datagrams
(each in its own 64 KiB slot, so no UDP/IPv4 datagram is ever truncated)
and their sources; :meth:`Batch.recv` fills them from one socket with a
single system call, without blocking, and :meth:`Batch.unpack` gives, in a
few C calls and no Python object per datagram but ints, each datagram's
source (the first 8 bytes of its ``sockaddr_in``: family, port, address,
as one int to compare with :func:`sockaddr_key`), length and first four
bytes (big-endian: for RTP, RFC 3550 s5.1, V/P/X/CC, M/PT and the sequence
number).  The bytes of a datagram are built only when the caller asks
(:meth:`Batch.datagram`).  The buffers are shared by every socket read in
turn: read one socket's batch to the end before the next ``recv``.

Linux only (recvmmsg(2) since 2.6.33, in glibc since 2.12); elsewhere
:class:`Batch` raises :class:`Unavailable` and the caller reads as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket
import struct
import sys

MSG_DONTWAIT = 0x40  # Linux <bits/socket.h>
SLOT = 65536  # > 65507, the largest UDP payload over IPv4
_SOCKADDR_IN = 16
_KEY = struct.Struct("=HH4s")  # family (native), then port and address (network order)
_RETRY = (errno.EINTR, errno.ECONNREFUSED)  # an ICMP error reported on the socket: read on


class Unavailable(Exception):
    """recvmmsg(2) cannot be used here (not Linux, or no such libc function)."""


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def sockaddr_key(host: str, port: int) -> int:
    """The int :meth:`Batch.unpack` gives for a datagram from IPv4 ``(host, port)``."""
    return int.from_bytes(_KEY.pack(socket.AF_INET, socket.htons(port),
                                    socket.inet_aton(host)), sys.byteorder)


def _function() -> ctypes._CFuncPtr:
    if not sys.platform.startswith("linux"):
        raise Unavailable(f"recvmmsg(2) is Linux only (this is {sys.platform})")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.recvmmsg
    except (OSError, AttributeError) as e:
        raise Unavailable(f"no recvmmsg in the C library: {e}") from e
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                         ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


class Batch:
    """Buffers for ``size`` datagrams and one recvmmsg(2) call to fill them."""

    def __init__(self, size: int = 64) -> None:
        self._recvmmsg = _function()
        self.size = size
        self._data = ctypes.create_string_buffer(size * SLOT)
        self._names = ctypes.create_string_buffer(size * _SOCKADDR_IN)
        self._iovecs = (_Iovec * size)()
        self._headers = (_Mmsghdr * size)()
        data, names = ctypes.addressof(self._data), ctypes.addressof(self._names)
        for i in range(size):
            self._iovecs[i].iov_base = data + i * SLOT
            self._iovecs[i].iov_len = SLOT
            hdr = self._headers[i].msg_hdr
            hdr.msg_name = names + i * _SOCKADDR_IN
            hdr.msg_namelen = _SOCKADDR_IN
            hdr.msg_iov = ctypes.pointer(self._iovecs[i])
            hdr.msg_iovlen = 1
        self._address = ctypes.addressof(self._headers)
        self.data = memoryview(self._data).cast("B")
        self.offsets = tuple(i * SLOT for i in range(size))
        length_at = _Mmsghdr.msg_len.offset
        stride = ctypes.sizeof(_Mmsghdr)
        # per n: (sources, lengths, first words) of datagrams 0..n-1, one C call each
        self._formats = [(struct.Struct("=" + "Q8x" * n),
                          struct.Struct("=" + f"{length_at}xI{stride - length_at - 4}x" * n),
                          struct.Struct(">" + f"I{SLOT - 4}x" * n))
                         for n in range(size + 1)]

    def recv(self, fd: int) -> int:
        """Datagrams read from socket ``fd`` into the buffers, 0 if there were none."""
        while True:
            n = self._recvmmsg(fd, self._address, self.size, MSG_DONTWAIT, None)
            if n >= 0:
                return n
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            if code not in _RETRY:
                raise OSError(code, f"recvmmsg: {errno.errorcode.get(code, code)}")

    def unpack(self, n: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(source keys, lengths, first four bytes big-endian) of the first ``n`` datagrams
        (a datagram shorter than 4 bytes has stale bytes there: check its length)."""
        sources, lengths, words = self._formats[n]
        return (sources.unpack_from(self._names), lengths.unpack_from(self._headers),
                words.unpack_from(self._data))

    def datagram(self, i: int, length: int) -> bytes:
        return bytes(self.data[i * SLOT:i * SLOT + length])

    def source(self, i: int) -> tuple[str, int]:
        """The (host, port) datagram ``i`` came from."""
        family, port, address = _KEY.unpack_from(self._names, i * _SOCKADDR_IN)
        if family != socket.AF_INET:
            raise OSError(f"recvmmsg: datagram from address family {family}")
        return socket.inet_ntoa(address), socket.ntohs(port)
