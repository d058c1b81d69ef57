"""Logging: the ``spialloc`` logger and its children, silent by default.

A library must not print: the root of the tree has a NullHandler, so nothing
appears unless the application configures logging (``logging.basicConfig``,
or handlers on ``spialloc``).  What is logged is what an operator needs to
understand a daemon's behaviour after the fact; nothing is logged per SPI on
the success path at INFO or above.

    spialloc.guard    collisions and their retries, refused directed picks,
                      reservations lost, holds renewed, failing callbacks
    spialloc.kernel   replies or events the kernel dropped (ENOBUFS), and
                      the orphaned larval states found or left behind
    spialloc.watcher  the expiry watcher's own failures
"""

from __future__ import annotations

import logging

from ._model import Proto, guard_dst_address, proto_or_int

root = logging.getLogger("spialloc")
root.addHandler(logging.NullHandler())
guard = logging.getLogger("spialloc.guard")
kernel = logging.getLogger("spialloc.kernel")
watcher = logging.getLogger("spialloc.watcher")


def tuple_text(dst_key: bytes, proto: int, spi: int) -> str:
    """A guard tuple as ip(8) would name it: "esp spi 0xc0001234 dst 192.0.2.1"."""
    p = proto_or_int(proto)
    name = p.name.lower() if isinstance(p, Proto) else f"proto {p}"
    return f"{name} spi {spi:#010x} dst {guard_dst_address(dst_key)}"
