"""Run OpenSSL's DTLS retransmission timers on the tests' fake clock.

OpenSSL's DTLS timer reads the wall clock (``ossl_time_now()`` ->
``gettimeofday()``); ``DTLSv1_handle_timeout`` does nothing until that much
real time has passed, and pyOpenSSL exposes no ``DTLS_set_timer_cb``.  The
OpenSSL used by pyOpenSSL lives statically inside cryptography's
``_rust.abi3.so`` (or in a shared libcrypto), which imports ``gettimeofday``
from libc through one GOT slot.  :func:`install` points that slot at a ctypes
callback: while a thread is inside :func:`openssl_time`, OpenSSL sees
``BASE + fake_now``; otherwise the call goes straight to libc.  Nothing else in
the process is affected (Python and Rust read the clock with
``clock_gettime``).

Measured with OpenSSL 4.0.3 (pyOpenSSL 26.4): under the fake clock the timer
starts at 1 s, doubles to a 60 s cap, and the handshake fails with "read
timeout expired" after the 12th timeout, exactly as in real time.

Linux ELF64 little-endian only.  :func:`install` probes the hook with a real
DTLS client the first time and returns False (with :data:`UNAVAILABLE_REASON`)
anywhere it does not work; tests that need OpenSSL to retransmit skip then.
Tests install it in setUp and :func:`uninstall` it in cleanup (see
``fake_openssl_time``), so the rest of the test run sees an untouched OpenSSL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import sys
import threading
import time
from collections.abc import Iterator

# OpenSSL sees BASE + fake time, so certificates and sessions look current.
BASE = float(int(time.time()))

UNAVAILABLE_REASON: str | None = None

_installed = False
_lock = threading.Lock()
_overrides: dict[int, float] = {}  # thread id -> absolute time OpenSSL sees


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


_GETTIMEOFDAY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_Timeval), ctypes.c_void_p)


def _got_offsets(path: str, symbol: bytes) -> list[int]:
    """Offsets (relative to the load base) of the relocation slots for symbol."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []  # not ELF64 little-endian
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(e_shnum):
        fields = struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
        # (sh_type, sh_offset, sh_size, sh_link)
        sections.append((fields[1], fields[4], fields[5], fields[6]))
    offsets = []
    for sh_type, offset, size, link in sections:
        if sh_type != 4:  # SHT_RELA
            continue
        _, sym_offset, _, str_link = sections[link]
        str_offset = sections[str_link][1]
        for j in range(size // 24):
            r_offset, r_info, _ = struct.unpack_from("<QQq", data, offset + j * 24)
            sym_index = r_info >> 32
            if not sym_index:
                continue
            (st_name,) = struct.unpack_from("<I", data, sym_offset + sym_index * 24)
            start = str_offset + st_name
            if data[start : data.index(b"\0", start)] == symbol:
                offsets.append(r_offset)
    return offsets


def _mappings() -> list[tuple[int, int, str, int, str]]:
    """(start, end, perms, file offset, path) for every mapping of this process."""
    result = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            result.append((start, end, parts[1], int(parts[2], 16), parts[5].strip()))
    return result


def _openssl_modules() -> list[str]:
    paths = []
    try:
        from cryptography.hazmat.bindings import _rust

        paths.append(os.path.realpath(_rust.__file__))
    except ImportError:
        pass
    for *_, path in _mappings():
        if "libcrypto" in os.path.basename(path) or "libssl" in os.path.basename(path):
            real = os.path.realpath(path)
            if real not in paths:
                paths.append(real)
    return paths


def _fake_gettimeofday(original):
    def gettimeofday(tv, tz):
        now = _overrides.get(threading.get_ident())
        if now is None:
            return original(tv, tz)
        seconds = int(now)
        tv[0].tv_sec = seconds
        tv[0].tv_usec = min(999_999, round((now - seconds) * 1e6))
        return 0

    return gettimeofday


class _Slot:
    """One GOT slot: its address, libc's pointer, our callback, page protection."""

    def __init__(self, address: int, original: int, prot: int) -> None:
        self.address = address
        self.original = original
        self.prot = prot
        self.callback = _GETTIMEOFDAY(_fake_gettimeofday(_GETTIMEOFDAY(original)))
        self.replacement = ctypes.cast(self.callback, ctypes.c_void_p).value


_slots: list[_Slot] | None = None
_libc = None


def _find_slots() -> tuple[list[_Slot], str | None]:
    global _libc
    if not sys.platform.startswith("linux") or struct.calcsize("P") != 8:
        return [], "needs 64-bit Linux"
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc_gettimeofday = ctypes.cast(_libc.gettimeofday, ctypes.c_void_p).value
    maps = _mappings()
    slots = []
    for path in _openssl_modules():
        bases = [m[0] for m in maps if m[3] == 0 and os.path.realpath(m[4]) == path]
        if not bases:
            continue
        for offset in _got_offsets(path, b"gettimeofday"):
            address = bases[0] + offset
            if ctypes.c_uint64.from_address(address).value != libc_gettimeofday:
                continue  # not what we expect: leave it alone
            perms = next(m[2] for m in maps if m[0] <= address < m[1])
            prot = (1 if "r" in perms else 0) | (2 if "w" in perms else 0)
            prot |= 4 if "x" in perms else 0
            slots.append(_Slot(address, libc_gettimeofday, prot))
    if not slots:
        return [], "no gettimeofday relocation found in OpenSSL's module"
    return slots, None


def _write(slots: list[_Slot], hooked: bool) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    for slot in slots:
        start = slot.address & ~(page - 1)
        if _libc.mprotect(start, page, 3) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
        value = slot.replacement if hooked else slot.original
        ctypes.c_uint64.from_address(slot.address).value = value
        _libc.mprotect(start, page, slot.prot)


def _probe() -> str | None:
    """Check that a DTLS client's timer now follows the fake clock."""
    from OpenSSL import SSL

    context = SSL.Context(SSL.DTLS_METHOD)
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    with openssl_time(1000.0):
        try:
            connection.do_handshake()
        except SSL.WantReadError:
            pass
    with openssl_time(1000.25):
        remaining = connection.DTLSv1_get_timeout()
    with openssl_time(1001.5):
        fired = connection.DTLSv1_handle_timeout()
    if remaining is None or abs(remaining - 0.75) > 0.01 or not fired:
        return f"OpenSSL's DTLS timer ignores the hook (remaining={remaining}, fired={fired})"
    return None


def install() -> bool:
    """Hook OpenSSL's clock (idempotent); True when its DTLS timers follow openssl_time().

    The first call also probes the hook; if that fails it is removed again and
    every later call returns False (:data:`UNAVAILABLE_REASON` says why).
    """
    global _installed, _slots, UNAVAILABLE_REASON
    with _lock:
        if _installed:
            return True
        if UNAVAILABLE_REASON is not None:
            return False
        try:
            probe = _slots is None
            if probe:
                _slots, reason = _find_slots()
                if reason is not None:
                    UNAVAILABLE_REASON = reason
                    return False
            _write(_slots, True)
            _installed = True
            reason = _probe() if probe else None
        except Exception as e:  # any surprise means "not available"
            reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            UNAVAILABLE_REASON = reason
            uninstall_locked()
        return bool(_installed)


def uninstall_locked() -> None:
    global _installed
    if _installed and _slots:
        _write(_slots, False)
    _installed = False


def uninstall() -> None:
    """Give OpenSSL libc's gettimeofday back."""
    with _lock:
        uninstall_locked()


def available() -> bool:
    """Whether the hook works here (installs it, so pair with uninstall())."""
    return install()


@contextlib.contextmanager
def openssl_time(now: float | None) -> Iterator[None]:
    """OpenSSL calls made by this thread inside the block see BASE + now.

    ``now=None`` (or a hook that is not installed) leaves OpenSSL on the wall clock.
    """
    if now is None or not _installed:
        yield
        return
    ident = threading.get_ident()
    previous = _overrides.get(ident)
    _overrides[ident] = BASE + now
    try:
        yield
    finally:
        if previous is None:
            del _overrides[ident]
        else:
            _overrides[ident] = previous


def use_fake_time(test, *, required: bool = True) -> bool:
    """Install the hook for one trial test (uninstalled in its cleanup).

    With required=True the test is skipped where the hook does not work.
    """
    from twisted.trial.unittest import SkipTest

    ok = install()
    test.addCleanup(uninstall)
    if required and not ok:
        raise SkipTest(f"OpenSSL's DTLS timer cannot follow a fake clock: {UNAVAILABLE_REASON}")
    return ok
