"""Differential tests: the C batch engine (``_cbatch`` + csrc/spialloc.c) and the
pure-Python one (``_pybatch``) must be indistinguishable, without a kernel.

Encoding: both engines really run (``alloc_batch`` / ``delsa_batch``) on one end
of an ``AF_UNIX SOCK_SEQPACKET`` socketpair.  Seqpacket keeps datagram
boundaries and, unlike ``SOCK_DGRAM`` (EINVAL), ignores the ``sockaddr_nl``
the C engine passes to sendmsg(), so each chunk arrives whole at the other end,
where a reader thread collects it.  No replies come back, so every request ends
LOST: that is expected here.  The bytes are compared between the engines and
with ``Request.message`` (the model's own encoder), request by request.

Parsing, two ways:

* through the socket: the peer end is bound to an abstract Unix address, which
  ``recvmsg_into`` returns as bytes whose first byte (what ``_pybatch`` takes
  as the sender's pid) is always 0, "the kernel"; the C engine reads no sender
  address (a real request socket is connected to the kernel, which refuses
  anyone else's unicast: tests/kernel/test_paths.py).  So replies written by the
  test before the batch starts are read by each engine's real receive path
  (recvmmsg with 1 KiB slots / recvmsg_into).  Only for a single chunk: C reads
  up to 64 datagrams per recvmmsg, so replies meant for a later chunk would be
  consumed early as strays (the kernel never queues a reply before its request).
* datagram by datagram, for everything else (sender pid != 0, MSG_TRUNC):
  ``lib.spialloc_batch_feed`` against ``_pybatch._drain`` reading from a fake
  socket that truncates to the same 1 KiB slot and reports MSG_TRUNC as the
  kernel would.  Same spis, errs and first error text.
"""

from __future__ import annotations

import array
import errno
import ipaddress
import os
import socket
import struct
import threading
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spialloc import _cbatch, _pybatch
from spialloc import _wire as w
from spialloc._model import Request, build_request

lib = pytest.importorskip("spialloc._native").lib
ffi = pytest.importorskip("spialloc._native").ffi

ENGINES = {"c": _cbatch, "python": _pybatch}
PORTID = 0x1234ABCD
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- requests ---------------------------------------------------------------------

V4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
V6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
U32 = st.integers(0, 2**32 - 1)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    fam = draw(st.sampled_from([V4, V6]))
    dst = draw(fam)
    src = draw(st.none() | fam)
    proto = draw(st.sampled_from(["esp", "ah", "comp"]))
    hi_max = 0xFFFF if proto == "comp" else 2**32 - 1
    lo = draw(st.integers(0x100, hi_max))
    hi = draw(st.integers(lo, hi_max))
    return build_request(
        dst,
        proto,
        src=src,
        spi_range=(lo, hi),
        mode=draw(st.sampled_from(["transport", "tunnel", "ro", "in_trigger", "beet"])),
        reqid=draw(U32),
        mark=draw(st.none() | st.tuples(U32, U32) | U32),
        if_id=draw(st.none() | U32),
        direction=draw(st.sampled_from([None, "in", "out"])),
        pcpu=draw(st.none() | st.integers(0, 4096)),
    )


def u32_arrays(count: int) -> st.SearchStrategy[tuple[array.array[int], array.array[int]]]:
    pair = st.lists(st.tuples(U32, U32), min_size=count, max_size=count)
    return pair.map(lambda ps: (array.array("I", [p[0] for p in ps]), array.array("I", [p[1] for p in ps])))


# --- the socketpair harness -----------------------------------------------------------


class Wire:
    """A seqpacket pair: the engine gets ``engine_end``; what it sends is
    collected from the other end by a thread (so a small SO_SNDBUF never
    blocks the sender)."""

    def __init__(self, sndbuf: int | None = None, kernel_name: bool = False) -> None:
        self.engine_end, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if sndbuf is not None:
            self.engine_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        if kernel_name:
            # Named, so that Python's engine sees a sender; its first byte, 0, reads as the kernel.
            self.peer.bind(b"\0K" + os.urandom(12).hex().encode())
        self.sent: list[bytes] = []
        self._reader: threading.Thread | None = None

    def start_reader(self) -> None:
        def read() -> None:
            while True:
                data = self.peer.recv(1 << 20)
                if not data:
                    return
                self.sent.append(data)

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def finish(self) -> list[bytes]:
        self.engine_end.close()
        if self._reader is not None:
            self._reader.join(10)
            assert not self._reader.is_alive()
        self.peer.close()
        return self.sent


def run_alloc(
    engine: str,
    template: bytes,
    count: int,
    seq0: int,
    ranges: Any,
    chunk: int,
    sndbuf: int | None = None,
    replies: list[bytes] = (),  # type: ignore[assignment]
) -> tuple[tuple[list[int], list[int], str | None, int], list[bytes]]:
    wire = Wire(sndbuf, kernel_name=bool(replies))
    wire.peer.setblocking(False)
    for r in replies:
        wire.peer.send(r)  # queued at engine_end before the batch starts
    wire.peer.setblocking(True)
    wire.start_reader()
    try:
        result = ENGINES[engine].alloc_batch(
            wire.engine_end, PORTID, template, count, seq0, ranges, chunk, lambda: None
        )
    finally:
        sent = wire.finish()
    spis, errs, text, overruns = result
    return (list(spis), list(errs), text, overruns), sent  # the C engine's arrays, compared as lists


def split_messages(datagram: bytes) -> list[bytes]:
    out = []
    off = 0
    while off < len(datagram):
        length = struct.unpack_from("=I", datagram, off)[0]
        assert length >= 16 and off + length <= len(datagram)
        out.append(datagram[off : off + length])
        off += w.align4(length)
    assert off == len(datagram)
    return out


# --- encoding -----------------------------------------------------------------------------


@SETTINGS
@given(
    data=st.data(),
    req=requests(),
    count=st.integers(1, 120),
    chunk=st.integers(1, 200),
    seq0=U32,
    with_ranges=st.booleans(),
    small_sndbuf=st.booleans(),
)
@example(
    data=None, req=build_request("10.0.0.1"), count=70, chunk=64, seq0=2**32 - 3, with_ranges=True, small_sndbuf=True
)
def test_alloc_batch_bytes_on_the_wire_are_identical(
    data: Any, req: Request, count: int, chunk: int, seq0: int, with_ranges: bool, small_sndbuf: bool
) -> None:
    if with_ranges:
        if data is None:
            ranges = (array.array("I", range(count)), array.array("I", range(10**6, 10**6 + count)))
        else:
            ranges = data.draw(u32_arrays(count))
    else:
        ranges = None
    # A 4 KiB SO_SNDBUF holds at most ~16 requests per datagram: both engines
    # must halve the chunk on EMSGSIZE the same way.
    sndbuf = 1 if small_sndbuf else None
    res_c, wire_c = run_alloc("c", req.template, count, seq0, ranges, chunk, sndbuf)
    res_py, wire_py = run_alloc("python", req.template, count, seq0, ranges, chunk, sndbuf)

    assert wire_c == wire_py  # same datagrams: same chunking, same bytes
    # ... and every request is what the model encodes for it, seq and range patched
    msgs = [m for d in wire_c for m in split_messages(d)]
    assert len(msgs) == count
    for i, m in enumerate(msgs):
        lo, hi = (ranges[0][i], ranges[1][i]) if ranges is not None else (req.spi_min, req.spi_max)
        assert m == req.message((seq0 + i) & 0xFFFFFFFF, lo, hi), f"request {i}"
    if not small_sndbuf:
        assert [len(split_messages(d)) for d in wire_c[:-1]] == [min(chunk, count)] * (len(wire_c) - 1)
    # nothing answered: all LOST, no text, no overrun - identically
    assert res_c == res_py == ([0] * count, [_cbatch.LOST] * count, None, 0)


@SETTINGS
@given(data=st.data(), count=st.integers(1, 60), chunk=st.integers(1, 80), seq0=U32, extra=st.integers(0, 3))
def test_delsa_batch_bytes_on_the_wire_are_identical(data: Any, count: int, chunk: int, seq0: int, extra: int) -> None:
    marked = data.draw(st.booleans())
    msgs = []
    for _ in range(count):
        fam = data.draw(st.sampled_from([w.AF_INET, w.AF_INET6]))
        sa_id = w.usersa_id(
            data.draw(st.binary(min_size=16, max_size=16)),
            data.draw(U32),
            fam,
            data.draw(st.sampled_from([50, 51, 108])),
        )
        mark = (data.draw(U32), data.draw(U32)) if marked else None
        msgs.append(w.delsa(data.draw(U32), sa_id, w.sa_attrs(mark, None, None, None)))
    size = len(msgs[0])
    stride = size + 4 * extra
    # slack after each message is junk: neither engine may send it
    blob = b"".join(m + os.urandom(stride - size) for m in msgs)

    out = {}
    for name, engine in ENGINES.items():
        wire = Wire()
        wire.start_reader()
        try:
            errs = engine.delsa_batch(wire.engine_end, PORTID, blob, stride, count, seq0, chunk)
        finally:
            sent = wire.finish()
        assert errs == [_cbatch.LOST] * count
        out[name] = sent
    assert out["c"] == out["python"]
    got = [m for d in out["c"] for m in split_messages(d)]
    assert got == [m[:8] + struct.pack("=I", (seq0 + i) & 0xFFFFFFFF) + m[12:] for i, m in enumerate(msgs)]


def _bad_templates() -> list[tuple[str, bytes, Any]]:
    good = build_request("10.0.0.1").template
    ack = bytearray(good)
    struct.pack_into("=H", ack, 6, w.NLM_F_REQUEST | w.NLM_F_ACK)
    noreq = bytearray(good)
    struct.pack_into("=H", noreq, 6, 0)
    return [
        ("short", good[:-4], None),
        ("len mismatch", good + b"\0" * 4, None),
        ("ack", bytes(ack), None),
        ("not a request", bytes(noreq), None),
        ("wrong type", w.delsa(0, bytes(24), b"") + bytes(300), None),
        ("ranges list", good, ([1], [2])),
        ("ranges 'Q'", good, (array.array("Q", [1]), array.array("Q", [2]))),
        ("ranges short", good, (array.array("I", [1]), array.array("I", []))),
    ]


@pytest.mark.parametrize("what, template, ranges", _bad_templates(), ids=[t[0] for t in _bad_templates()])
def test_both_engines_reject_the_same_bad_input_the_same_way(what: str, template: bytes, ranges: Any) -> None:
    errors = []
    for engine in ENGINES.values():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with pytest.raises(Exception) as info:
                engine.alloc_batch(a, PORTID, template, 1, 1, ranges, 1, lambda: None)
            errors.append((type(info.value), str(info.value)))
            b.setblocking(False)
            with pytest.raises(BlockingIOError):
                b.recv(4096)  # and nothing was sent
        finally:
            a.close()
            b.close()
    assert errors[0] == errors[1], what


def test_both_engines_reject_bad_delsa_messages_the_same_way() -> None:
    good = w.delsa(0, bytes(24), b"")
    no_ack = w.delsa(0, bytes(24), b"", flags=w.NLM_F_REQUEST)
    cases = [
        (good * 3 + no_ack, len(good), 4),
        (good * 3, len(good), 4),
        (good * 4 + bytes(8), len(good) + 2, 4),
        (w.allocspi(0, bytes(232), b"") * 2, 248, 2),
    ]
    for blob, stride, count in cases:
        errors = []
        for engine in ENGINES.values():
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                with pytest.raises(Exception) as info:
                    engine.delsa_batch(a, PORTID, blob, stride, count, 1, 4)
                errors.append((type(info.value), str(info.value)))
            finally:
                a.close()
                b.close()
        assert errors[0] == errors[1]


# --- replies ------------------------------------------------------------------------


def nlmsg(kind: int, flags: int, seq: int, payload: bytes, pid: int = PORTID, length: int | None = None) -> bytes:
    n = 16 + len(payload) if length is None else length
    return struct.pack("=IHHII", n, kind, flags, seq, pid) + payload


def newsa_payload(spi: int, payload_len: int) -> bytes:
    info = bytearray(w.XFRM_USERSA_INFO_LEN)
    w.BE32.pack_into(info, w.SA_ID_SPI, spi)
    full = bytes(info) + w.attr(w.XFRMA_REPLAY_VAL, bytes(12)) + w.attr(w.XFRMA_MARK, bytes(8))
    return full[:payload_len] if payload_len <= len(full) else full + bytes(payload_len - len(full))


@st.composite
def error_payload(draw: st.DrawFn, code: int) -> tuple[int, bytes]:
    """struct nlmsgerr (+ echoed request) + ext-ack TLVs, sometimes broken."""
    capped = draw(st.booleans())
    tlvs = draw(st.booleans())
    flags = (w.NLM_F_CAPPED if capped else 0) | (w.NLM_F_ACK_TLVS if tlvs else 0)
    request = build_request("10.0.0.1").template
    echoed = request[:16] if capped else request[: draw(st.sampled_from([16, 100, len(request)]))]
    if not capped and draw(st.integers(0, 9)) == 0:
        # a forged echoed nlmsg_len, up to 4 GiB (C once wrapped its 64-bit offset)
        echoed = struct.pack("=I", draw(st.sampled_from([0, 7, 2**32 - 4, 2**32 - 1, draw(U32)]))) + echoed[4:]
    body = struct.pack("=i", code) + echoed
    body += bytes(w.align4(len(body)) - len(body))
    for _ in range(draw(st.integers(0, 3))):
        choice = draw(st.integers(0, 5))
        if choice == 0:
            value = draw(st.binary(max_size=300))  # any bytes: NULs, bad UTF-8, > 255 bytes
            kind = w.NLMSGERR_ATTR_MSG
        elif choice == 1:
            value = draw(st.text(max_size=80)).encode() + b"\0"
            kind = w.NLMSGERR_ATTR_MSG | draw(st.sampled_from([0, 0x8000, 0x4000]))  # flag bits masked
        elif choice == 2:
            value, kind = struct.pack("=I", draw(U32)), w.NLMSGERR_ATTR_OFFS
        elif choice == 3:
            body += struct.pack("=HH", draw(st.sampled_from([0, 3, 2000])), w.NLMSGERR_ATTR_MSG) + b"abc\0"
            continue  # broken nla_len
        elif choice == 4:
            body += b"\0" * draw(st.integers(1, 3))  # misalignment
            continue
        else:
            value, kind = draw(st.binary(max_size=20)), draw(st.integers(0, 0xFFFF))
        a = struct.pack("=HH", 4 + len(value), kind) + value
        pad = draw(st.booleans())
        body += a + (bytes(w.align4(len(a)) - len(a)) if pad else b"")
    return flags, body


@st.composite
def reply_datagrams(draw: st.DrawFn, count: int, seq0: int, acks: bool) -> tuple[bytes, int]:
    """One datagram (1-3 messages, maybe damaged) and its sender's pid."""
    msgs = b""
    for _ in range(draw(st.integers(1, 3))):
        idx = draw(st.integers(-2, count + 1))
        seq = (seq0 + idx) & 0xFFFFFFFF
        pid = draw(st.sampled_from([PORTID, PORTID, PORTID, 0, PORTID + 1]))
        kind = draw(st.sampled_from(["newsa", "newsa", "error", "error", "ack", "other"]))
        if kind == "newsa":
            plen = draw(st.sampled_from([w.XFRM_USERSA_INFO_LEN, 240, 260, 200, 0]))
            msg = nlmsg(w.XFRM_MSG_NEWSA, 0, seq, newsa_payload(draw(U32), plen), pid)
        elif kind in ("error", "ack"):
            if kind == "ack":
                code = 0
            else:
                code = draw(
                    st.sampled_from(
                        [
                            -errno.ENOENT,
                            -errno.EINVAL,
                            -errno.ESRCH,
                            -errno.EPERM,
                            -errno.EEXIST,
                            -65528,
                            -(2**31),
                            5,
                            -(2**31) + 1,
                        ]
                    )
                )
            flags, body = draw(error_payload(code))
            if draw(st.integers(0, 9)) == 0:
                body = body[: draw(st.integers(0, 19))]  # shorter than struct nlmsgerr
            msg = nlmsg(w.NLMSG_ERROR, flags, seq, body, pid)
        else:
            msg = nlmsg(
                draw(st.sampled_from([w.NLMSG_DONE, w.XFRM_MSG_EXPIRE, w.XFRM_MSG_ACQUIRE, 1])),
                0,
                seq,
                bytes(draw(st.integers(0, 300))),
                pid,
            )
        damage = draw(st.integers(0, 14))
        if damage == 0:
            msg = msg[: draw(st.integers(0, len(msg)))]  # cut short: nlmsg_len beyond the datagram
        elif damage == 1:
            msg = struct.pack("=I", draw(st.integers(0, 15))) + msg[4:]  # nlmsg_len < header
        msgs += msg + bytes(w.align4(len(msg)) - len(msg))
    tail = draw(st.integers(0, 9))
    if tail == 0:
        msgs += os.urandom(draw(st.integers(1, 15)))  # trailing junk
    elif tail == 1:
        msgs += nlmsg(w.NLMSG_NOOP, 0, 0, bytes(1100))  # longer than a 1 KiB slot: truncated
    src = draw(st.sampled_from([0, 0, 0, 0, 7]))
    return msgs, src


class FakeKernelSocket:
    """What _pybatch._drain reads from: datagrams with their sender pid,
    truncated to the receive buffer with MSG_TRUNC, like recvmsg(2)."""

    def __init__(self, datagrams: list[tuple[bytes, int]]) -> None:
        self.queue = list(datagrams)

    def recvmsg_into(self, buffers: list[Any], ancbufsize: int = 0, flags: int = 0) -> tuple[int, list[Any], int, Any]:
        assert flags & socket.MSG_DONTWAIT
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "empty")
        data, pid = self.queue.pop(0)
        buf = buffers[0]
        n = min(len(data), len(buf))
        buf[:n] = data[:n]
        return n, [], socket.MSG_TRUNC if len(data) > len(buf) else 0, (pid, 0)


def parse_c(
    datagrams: list[tuple[bytes, int]], count: int, seq0: int, acks: bool
) -> tuple[list[int], list[int], str | None]:
    b: Any = ffi.new("struct spialloc_batch *")
    spis = array.array("I", bytes(4 * count))
    errs = array.array("i", bytes(4 * count))
    if acks:
        one = w.delsa(0, w.usersa_id(bytes(16), 1, 2, 50), b"")
        tmpl = one * count
        b.stride = len(one)
    else:
        tmpl = build_request("10.0.0.1").template
    keep = [
        ffi.from_buffer("uint8_t[]", tmpl),
        ffi.new("uint8_t[]", len(tmpl) * count + 4),
        ffi.new("uint8_t[]", lib.SPIALLOC_RECV_SLOT),
        ffi.new("char[]", 256),
        ffi.from_buffer("uint32_t[]", spis),
        ffi.from_buffer("int32_t[]", errs),
    ]
    b.fd, b.portid, b.count, b.seq0, b.chunk = -1, PORTID, count, seq0, count
    b.tmpl, b.tmpl_len = keep[0], len(tmpl)
    b.sendbuf, b.sendbuf_len = keep[1], len(tmpl) * count + 4
    b.recvbuf, b.recvbuf_len = keep[2], lib.SPIALLOC_RECV_SLOT
    b.errmsg, b.errmsg_len = keep[3], 256
    b.errs = keep[5]
    if not acks:
        b.spis = keep[4]
    init = lib.spialloc_batch_init_delsa if acks else lib.spialloc_batch_init_allocspi
    assert init(b) == 0
    b.sent = b.pending = count
    slot = lib.SPIALLOC_RECV_SLOT
    for data, pid in datagrams:
        if b.pending == 0:
            break  # collect() stops reading once nothing is pending
        cut = data[:slot]
        lib.spialloc_batch_feed(b, cut, len(cut), pid, len(data) > slot)
    text = ffi.string(b.errmsg).decode("utf-8", "replace") or None
    return list(spis), list(errs), text


def parse_py(
    datagrams: list[tuple[bytes, int]], count: int, seq0: int, acks: bool
) -> tuple[list[int], list[int], str | None]:
    spis = [0] * count
    errs = [_pybatch.PENDING] * count
    text: list[str | None] = [None]
    buf = bytearray(_pybatch.RECV_SLOT)
    _pybatch._drain(FakeKernelSocket(datagrams), PORTID, seq0, count, acks, spis, errs, buf, count, text)  # type: ignore[arg-type]
    return spis, errs, text[0]


def test_receive_slot_sizes_agree() -> None:
    assert _pybatch.RECV_SLOT == lib.SPIALLOC_RECV_SLOT


@SETTINGS
@given(data=st.data(), count=st.integers(1, 8), seq0=st.sampled_from([1, 1000, 2**32 - 2]) | U32, acks=st.booleans())
def test_reply_parsing_is_identical(data: Any, count: int, seq0: int, acks: bool) -> None:
    datagrams = data.draw(st.lists(reply_datagrams(count, seq0, acks), min_size=1, max_size=12))
    assert parse_c(datagrams, count, seq0, acks) == parse_py(datagrams, count, seq0, acks)


def _error(seq: int, code: int, orig_len: int, attrs: bytes, flags: int = w.NLM_F_ACK_TLVS) -> tuple[bytes, int]:
    body = struct.pack("=i", code) + struct.pack("=IHHII", orig_len, w.XFRM_MSG_ALLOCSPI, 1, seq, PORTID) + attrs
    return nlmsg(w.NLMSG_ERROR, flags, seq, body), 0


@pytest.mark.parametrize(
    "datagrams, expect_errs, expect_text",
    [
        # The kernel's own shape: capped error with the text.
        (
            [
                (
                    nlmsg(
                        w.NLMSG_ERROR,
                        w.NLM_F_CAPPED | w.NLM_F_ACK_TLVS,
                        5,
                        struct.pack("=i", -errno.ENOENT) + bytes(16) + w.attr(1, b"No SPI available\0"),
                    ),
                    0,
                )
            ],
            [errno.ENOENT, -1],
            "No SPI available",
        ),
        # Positive code / INT_MIN: no errno, the request stays pending.
        ([_error(5, 2, 16, w.attr(1, b"x\0")), _error(6, -(2**31), 16, w.attr(1, b"y\0"))], [-1, -1], None),
        # Regression: an echoed nlmsg_len near 4 GiB made C's 64-bit TLV offset
        # wrap to 0 (a 32-bit alignment mask), so it read "text" out of the error
        # code and the echoed header.  Python skips past the payload: no text.
        ([_error(5, -65528, 2**32 - 4, bytes(40))], [65528, -1], None),
        # Only the first MSG attribute counts; an empty one is no text.
        (
            [
                _error(5, -1, 16, w.attr(1, b"\0") + w.attr(1, b"second\0"), w.NLM_F_ACK_TLVS | w.NLM_F_CAPPED),
                _error(6, -2, 16, w.attr(1, b"third\0"), w.NLM_F_ACK_TLVS | w.NLM_F_CAPPED),
            ],
            [1, 2],
            "third",
        ),
        # Text longer than the C buffer (255 bytes) is cut there, in both.
        (
            [_error(5, -2, 16, w.attr(1, b"a" * 400 + b"\0"), w.NLM_F_ACK_TLVS | w.NLM_F_CAPPED)],
            [errno.ENOENT, -1],
            "a" * 255,
        ),
        # A datagram longer than the 1 KiB slot is skipped whole (MSG_TRUNC).
        ([(nlmsg(w.XFRM_MSG_NEWSA, 0, 5, newsa_payload(7, 1100)), 0)], [-1, -1], None),
    ],
    ids=["kernel-shape", "no-errno", "forged-orig-len", "first-text", "long-text", "truncated"],
)
def test_reply_parsing_cases(
    datagrams: list[tuple[bytes, int]], expect_errs: list[int], expect_text: str | None
) -> None:
    for parse in (parse_c, parse_py):
        spis, errs, text = parse(datagrams, 2, 5, False)
        assert (errs, text) == (expect_errs, expect_text), parse.__name__


@SETTINGS
@given(data=st.data(), count=st.integers(1, 40), seq0=U32)
def test_replies_through_the_socket_are_read_identically(data: Any, count: int, seq0: int) -> None:
    """Each engine's real receive path (recvmmsg slots / recvmsg_into), one chunk."""
    datagrams = data.draw(st.lists(reply_datagrams(count, seq0, False), max_size=min(2 * count, 24)))
    replies = [d for d, pid in datagrams if pid == 0 and d]  # the peer's address says pid 0
    template = build_request("192.0.2.1").template
    chunk = data.draw(st.integers(count, count + 100))
    res_c, wire_c = run_alloc("c", template, count, seq0, None, chunk, replies=replies)
    res_py, wire_py = run_alloc("python", template, count, seq0, None, chunk, replies=replies)
    assert wire_c == wire_py and len(wire_c) == 1
    assert res_c == res_py
    # and that is what the datagram-by-datagram parsers say, LOST for the rest
    spis, errs, text = parse_py([(d, 0) for d in replies], count, seq0, False)
    assert res_py == (spis, [_cbatch.LOST if e == _pybatch.PENDING else e for e in errs], text, 0)


# --- interrupts (no kernel): partial results ---------------------------------------------


class InterruptingSocket:
    """Wraps a seqpacket end: the n-th send goes through and then "Ctrl-C"
    arrives as the syscall returns, as a signal delivered during a long
    netlink sendmsg does (Python runs the handler right after the call)."""

    def __init__(self, sock: socket.socket, on_send: int) -> None:
        self._sock = sock
        self._left = on_send

    def send(self, data: Any) -> int:
        n = self._sock.send(data)
        self._left -= 1
        if self._left == 0:
            raise KeyboardInterrupt
        return n

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return getattr(self._sock, name)  # type: ignore[no-any-return]


@pytest.mark.parametrize("on_send", [1, 2, 3])
def test_python_engine_interrupted_right_after_a_send_marks_that_chunk_lost(on_send: int) -> None:
    """Regression: the chunk whose send was cut short by KeyboardInterrupt was
    left PENDING ("never sent"), so the allocator neither released nor
    recovered up to a window (4096) of larval states."""
    wire = Wire()
    wire.start_reader()
    sock = InterruptingSocket(wire.engine_end, on_send)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            _pybatch.alloc_batch(sock, PORTID, build_request("10.0.0.1").template, 10, 1, None, 4, lambda: None)  # type: ignore[arg-type]
    finally:
        sent = wire.finish()
    spis, errs = info.value.spialloc_partial  # type: ignore[attr-defined]
    went_out = sum(len(split_messages(d)) for d in sent)
    assert went_out == min(4 * on_send, 10)
    # everything that went out is settled (LOST: no replies here); nothing else
    assert errs == [_pybatch.LOST] * went_out + [_pybatch.PENDING] * (10 - went_out)


# --- ERESTARTSYS: re-sent alike ------------------------------------------------------------


@pytest.mark.parametrize("with_ranges", [False, True])
def test_requests_answered_erestartsys_are_sent_again_identically(with_ranges: bool) -> None:
    """Linux 6.17+ answers a request with -ERESTARTSYS (512) when a signal is
    pending after a failed pick.  Both engines send those requests again, in
    one more datagram, with the same sequence numbers from seq0 on and their
    own ranges; here no reply comes for the second round, so they end LOST."""
    count, seq0 = 6, 77
    template = build_request("10.0.0.1").template
    ranges = (array.array("I", range(100, 106)), array.array("I", range(200, 206))) if with_ranges else None
    replies = [
        nlmsg(w.XFRM_MSG_NEWSA, 0, seq0 + 0, newsa_payload(0xC0000001, 240)),
        nlmsg(w.NLMSG_ERROR, w.NLM_F_CAPPED, seq0 + 1, struct.pack("=i", -512) + bytes(16)),
        nlmsg(
            w.NLMSG_ERROR,
            w.NLM_F_CAPPED | w.NLM_F_ACK_TLVS,
            seq0 + 2,
            struct.pack("=i", -errno.ENOENT) + bytes(16) + w.attr(1, b"No SPI\0"),
        ),
        nlmsg(w.NLMSG_ERROR, w.NLM_F_CAPPED, seq0 + 4, struct.pack("=i", -512) + bytes(16)),
        nlmsg(w.XFRM_MSG_NEWSA, 0, seq0 + 5, newsa_payload(0xC0000005, 240)),
    ]
    res_c, wire_c = run_alloc("c", template, count, seq0, ranges, 64, replies=replies)
    res_py, wire_py = run_alloc("python", template, count, seq0, ranges, 64, replies=replies)
    assert wire_c == wire_py
    LOST = _cbatch.LOST
    assert (
        res_c == res_py == ([0xC0000001, 0, 0, 0, 0, 0xC0000005], [0, LOST, errno.ENOENT, LOST, LOST, 0], "No SPI", 0)
    )
    first, *again = wire_c
    assert len(split_messages(first)) == 6
    # request 3 got no reply (LOST, not re-sent); 1 and 4 go again as seq0, seq0 + 1
    assert len(again) == 1  # one more round: unanswered there, they are LOST, not ERESTARTSYS
    again_msgs = split_messages(again[0])
    assert len(again_msgs) == 2
    for k, i in enumerate([1, 4]):
        lo, hi = (ranges[0][i], ranges[1][i]) if ranges else (0xC0000000, 0xCFFFFFFF)
        assert again_msgs[k] == build_request("10.0.0.1").message(seq0 + k, lo, hi)


def test_restart_rounds_are_bounded_and_merge_partial_results() -> None:
    calls: list[tuple[int, int, Any]] = []

    def once(
        sock: Any,
        portid: int,
        template: bytes,
        count: int,
        seq0: int,
        ranges: Any,
        chunk: int,
        check: Any,
        box: Any = None,
    ) -> tuple[list[int], list[int], str | None, int]:
        calls.append((count, seq0, None if ranges is None else (list(ranges[0]), list(ranges[1]))))
        if len(calls) == 1:
            return [1, 0, 3, 0], [0, 512, 0, 512], None, 1
        if len(calls) < 4:
            return [0] * count, [512] * count, "t", 0  # still interrupted
        exc = KeyboardInterrupt()
        exc.spialloc_partial = ([9, 0], [0, _pybatch.PENDING])  # type: ignore[attr-defined]
        raise exc

    ranges = (array.array("I", [10, 11, 12, 13]), array.array("I", [20, 21, 22, 23]))
    with pytest.raises(KeyboardInterrupt) as info:
        _pybatch.restart_interrupted(
            lambda a: once(*a),
            _pybatch.BatchArgs(None, 1, b"", 4, 5, ranges, 64, lambda: None),  # type: ignore[arg-type]
        )
    assert calls[1:] == [(2, 5, ([11, 13], [21, 23]))] * 3
    # round 4 re-sent request 1 (now SPI 9), never request 3: its 512 stands
    assert info.value.spialloc_partial == ([1, 9, 3, 0], [0, 0, 0, 512])  # type: ignore[attr-defined]

    calls.clear()

    def always(*args: Any) -> tuple[list[int], list[int], str | None, int]:
        calls.append(args[3])
        return [0] * args[3], [512] * args[3], None, 0

    res = _pybatch.restart_interrupted(
        lambda a: always(*a),
        _pybatch.BatchArgs(None, 1, b"", 3, 5, None, 64, lambda: None),  # type: ignore[arg-type]
    )
    assert res == ([0, 0, 0], [512, 512, 512], None, 0)
    assert len(calls) == 1 + _pybatch.MAX_RESTARTS


def test_restart_round_cut_off_on_its_way_back_is_merged_from_its_box() -> None:
    """A signal delivered as a re-send round's engine call returns: its
    result never reaches restart_interrupted, but the engine put it in the
    round's box, so the partial result the caller releases includes it."""
    calls = []

    def once(args: _pybatch.BatchArgs) -> Any:
        calls.append(args.n)
        if len(calls) == 1:
            return [1, 0], [0, 512], None, 0
        assert args.box is not None
        args.box[0] = ([7], [0])  # what the engine filled in
        raise KeyboardInterrupt  # delivered when the call returned

    with pytest.raises(KeyboardInterrupt) as info:
        _pybatch.restart_interrupted(once, _pybatch.BatchArgs(None, 1, b"", 2, 5, None, 64, lambda: None))  # type: ignore[arg-type]
    assert calls == [2, 1]
    assert info.value.spialloc_partial == ([1, 7], [0, 0])  # type: ignore[attr-defined]


def test_restart_rounds_that_settle_something_are_not_counted() -> None:
    """20 requests interrupted, one settled per round: 21 rounds, all done."""
    calls = []

    def one_per_round(sock: Any, portid: int, template: bytes, count: int, *rest: Any) -> Any:
        calls.append(count)
        return [7] * count, [0] + [512] * (count - 1), None, 0

    spis, errs, _, _ = _pybatch.restart_interrupted(
        lambda a: one_per_round(*a),
        _pybatch.BatchArgs(None, 1, b"", 20, 5, None, 64, lambda: None),  # type: ignore[arg-type]
    )
    assert errs == [0] * 20 and spis == [7] * 20
    assert calls == list(range(20, 0, -1))
