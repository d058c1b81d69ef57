"""ALLOCSPI against NEWSA as the SA table grows, inside one booted kernel.

Run by ``benchmarks/kernels.py`` through the VM tier's runner (one boot per
kernel, ``python -m tests.vm --kernel K -- benchmarks/vm_tablesize.py``); not
a test: it asserts only that it measured, and writes
``$SPIALLOC_VM_OUT/tablesize.json``.

Absolute times under QEMU's software emulation mean little, so each table
size gives a ratio measured in the same boot, interleaved: the median cost
of one ALLOCSPI (spialloc's single ``allocate``, guard off: one request and
its reply) over the median cost of one NEWSA that installs a real ESP SA
(the same socket, request and ack, built below with the same framing).  The
table is grown with larval states (``allocate_many``); kernels with the new
duplicate rule (6.17+, and the CVE-2025-39797 backports) walk every byspi
bucket per pick, so their ratio grows with the table; old-rules kernels stay
flat.
"""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import statistics
import struct
import time
from pathlib import Path

from spialloc import Allocator, Namespace
from spialloc import _wire as w
from spialloc._netlink import XfrmSocket

SIZES = (0, 1_000, 10_000, 20_000)
ROUNDS, PER_ROUND = 5, 40
XFRMA_ALG_AEAD = 18
KEY = bytes(range(20))  # rfc4106: 16 bytes of AES key and 4 of salt
AEAD = struct.pack("=64sII", b"rfc4106(gcm(aes))", len(KEY) * 8, 128) + KEY
NEWSA_DST = ipaddress.ip_address("198.20.0.1").packed.ljust(16, b"\0")


def newsa(sock: XfrmSocket, spi: int) -> None:
    """Install one ESP SA (transport, AEAD) with this SPI; NEWSA wants an ack."""
    info = bytearray(w.userspi_info(
        family=w.AF_INET, daddr=NEWSA_DST, saddr=bytes(16), proto=w.IPPROTO_ESP,
        mode=w.XFRM_MODE_TRANSPORT, reqid=0, acq_seq=0, spi_min=0, spi_max=0,
    )[: w.XFRM_USERSA_INFO_LEN])  # fmt: skip
    w.BE32.pack_into(info, w.SA_ID_SPI, spi)
    seq = sock.next_seq()
    msg = w.message(w.XFRM_MSG_NEWSA, w.NLM_F_REQUEST | w.NLM_F_ACK, seq, bytes(info) + w.attr(XFRMA_ALG_AEAD, AEAD))
    sock.transact(msg, seq, "newsa")


def delsa(sock: XfrmSocket, spi: int) -> None:
    seq = sock.next_seq()
    sock.transact(w.delsa(seq, w.usersa_id(NEWSA_DST, spi, w.AF_INET, w.IPPROTO_ESP), b""), seq, "delsa")


def per_op(fn: object, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)  # type: ignore[operator]
    return (time.perf_counter() - t) / n


def test_allocspi_against_newsa_as_the_table_grows() -> None:
    ns = Namespace.isolated()
    results = []
    try:
        with Allocator(ns, guard=False) as alloc:
            alloc.acq_expires = 3600  # the table must outlive the run
            sock = XfrmSocket(ns)
            filled, spi_base = 0, 0x10000000
            for size in SIZES:
                if size > filled:
                    alloc.allocate_many(size - filled, "198.18.0.1")
                    filled = size
                alloc_t, newsa_t = [], []
                for r in range(ROUNDS):  # interleaved: both see the same machine
                    got: list[object] = []
                    alloc_t.append(per_op(lambda i, got=got: got.append(alloc.allocate("198.19.0.1")), PER_ROUND))
                    alloc.release(got)  # type: ignore[arg-type]
                    base = spi_base + r * PER_ROUND
                    newsa_t.append(per_op(lambda i, b=base: newsa(sock, b + i), PER_ROUND))
                    for i in range(PER_ROUND):
                        delsa(sock, base + i)
                a, n = statistics.median(alloc_t), statistics.median(newsa_t)
                results.append({"states": size, "allocspi_us": a * 1e6, "newsa_us": n * 1e6, "ratio": a / n})
                print(f"states {size:6d}: ALLOCSPI {a * 1e6:9.1f} us  NEWSA {n * 1e6:9.1f} us  ratio {a / n:6.2f}")
            sock.close()
    finally:
        ns.close()
    out = Path(os.environ.get("SPIALLOC_VM_OUT", "/tmp")) / "tablesize.json"
    out.write_text(json.dumps({"kernel": platform.release(), "rounds": ROUNDS, "per_round": PER_ROUND,
                               "results": results}, indent=1) + "\n")  # fmt: skip
    assert len(results) == len(SIZES)
