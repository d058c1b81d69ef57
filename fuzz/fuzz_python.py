"""Coverage-guided fuzzing of the Python parsers with atheris (libFuzzer for Python).

    pip install atheris
    mkdir -p build/fuzz/pycorpus
    python fuzz/fuzz_python.py -max_total_time=60 build/fuzz/pycorpus fuzz/corpus/feed fuzz/corpus/events

(the first directory receives new inputs: keep the committed seeds read-only)

Each input goes through every parser of kernel bytes: _wire.iter_messages,
iter_attrs, decode_error, decode_alloc_reply, decode_sa, decode_selector (inputs
of at least 56 bytes: shorter ones are a known bug), decode_acquire,
decode_expire, monitor.decode_event, and _pybatch._drain (through a fake
socket, with seq0/portid taken from the first header).  Anything but a result
or spialloc.errors.DecodeError is a crash.
"""

from __future__ import annotations

import errno
import socket
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports():
    from spialloc import _pybatch
    from spialloc import _wire as w
    from spialloc.errors import DecodeError
    from spialloc.monitor import decode_event


class _Sock:
    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data

    def _next(self, room: int) -> tuple[bytes, int]:
        if self.data is None:
            raise BlockingIOError(errno.EAGAIN, "empty")
        data, self.data = self.data, None
        return data[:room], socket.MSG_TRUNC if len(data) > room else 0

    def recvmsg_into(self, buffers, ancbufsize=0, flags=0):  # type: ignore[no-untyped-def]
        view = memoryview(buffers[0]).cast("B")
        data, mflags = self._next(len(view))
        view[: len(data)] = data
        return len(data), [], mflags, (0, 0)

    def recvfrom_into(self, buf, nbytes=0, flags=0):  # type: ignore[no-untyped-def]
        data, _ = self._next(nbytes or len(buf))
        buf[: len(data)] = data
        return len(data), (0, 0)


def _quiet(fn, *args):  # type: ignore[no-untyped-def]
    try:
        r = fn(*args)
        if hasattr(r, "__next__"):
            for _ in r:
                pass
    except DecodeError:
        pass


def test_one_input(data: bytes) -> None:
    view = memoryview(data)
    _quiet(w.iter_messages, data)
    _quiet(w.iter_attrs, data)
    _quiet(w.decode_alloc_reply, view)
    _quiet(w.decode_sa, view)
    if len(data) >= w.XFRM_SELECTOR_LEN:
        _quiet(w.decode_selector, view)
    _quiet(w.decode_acquire, view)
    _quiet(w.decode_expire, view)
    for flags in (0, 0x100, 0x200, 0x300):
        _quiet(w.decode_error, view, flags)
    try:
        msgs = list(w.iter_messages(data))
    except DecodeError:
        msgs = []
    for kind, flags, _, _, payload in msgs:
        _quiet(decode_event, kind, payload)
        _quiet(w.decode_error, payload, flags)
        _quiet(w.decode_sa, payload)
    seq0, portid = 1000, 4242
    if len(data) >= 16:
        _, _, _, seq, portid = w.NLMSGHDR.unpack_from(data)
        seq0 = seq - (seq & 3)
    for acks in (False, True):
        spis, errs, text = [0] * 64, [_pybatch.PENDING] * 64, [None]
        try:
            _pybatch._drain(_Sock(data), portid, seq0, 64, acks, spis, errs, bytearray(1 << 16), 64, text)
        except DecodeError:
            pass
        assert all(e >= -1 for e in errs), errs


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
